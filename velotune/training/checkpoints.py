"""Atomic training checkpoints: a save is staged in a hidden folder, then renamed into place.

transformers' Trainer writes ``checkpoint-N`` file by file in place; a process killed half-way (SIGKILL,
OOM killer, preemption) leaves a ``checkpoint-N`` without its optimizer or trainer state, which
``resume`` then picks as the newest and fails on. Here every checkpoint is written into
``output_dir/.tmp-checkpoint-N-XXXX``, its files are fsynced, and one ``os.rename`` makes it
``checkpoint-N``: at any moment of a save, the folders named ``checkpoint-*`` are complete, and the
previous one is still there (old checkpoints are rotated only after the new one is in place).

Leftovers of an interrupted save (``.tmp-checkpoint-*``) are removed when the next run starts
(:func:`clean_interrupted_saves`).

Several processes (DDP): rank 0 writes the weights, optimizer, scheduler and trainer state; every rank
writes its own ``rng_state_{rank}.pth`` (transformers' design, for an exact resume). They all write
into one staging folder with a name every rank can compute (``.tmp-checkpoint-N-ddp``); a barrier
waits for the last rank's file, then rank 0 renames the folder into place, as for one process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .._notices import VelotuneError, say

_STAGING = ".tmp-" + PREFIX_CHECKPOINT_DIR
_OLD = ".old-" + PREFIX_CHECKPOINT_DIR
_FINAL_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def _fsync_tree(folder: Path) -> None:
    """Flush file contents and folder entries to disk, so a power cut cannot leave empty files behind
    a completed rename (a SIGKILL alone cannot: the page cache outlives the process)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Rename the complete folder ``staged`` to ``final``; an existing ``final`` is replaced (moved aside
    first, removed after), so a reader always sees one complete checkpoint under that name."""
    _fsync_tree(staged)
    old = None
    if final.exists():
        old = final.parent / f"{_OLD}-{final.name.rsplit('-', 1)[1]}-{os.getpid()}"
        os.rename(final, old)
    os.rename(staged, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_interrupted_saves(output_dir: str | os.PathLike) -> list[str]:
    """Remove staging folders of saves that never finished; restore a checkpoint moved aside by a
    replacement that was interrupted. Returns what was removed (also said)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    removed = []
    for p in sorted(out.iterdir()):
        if p.name.startswith(_OLD) and p.is_dir():
            final = out / f"{PREFIX_CHECKPOINT_DIR}-{p.name[len(_OLD) + 1:].split('-')[0]}"
            if not final.exists():
                os.rename(p, final)
                say(f"restored {final.name} (a replacement save of it was interrupted)")
                continue
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(_STAGING) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if removed:
        say(f"removed {len(removed)} unfinished checkpoint save(s) left by an interrupted run in {out}: "
            f"{', '.join(removed)} (the complete checkpoints are untouched)")
    return removed


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir`` (``checkpoint-N`` with a trainer state), oldest step first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _FINAL_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).is_file()]


def check_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` as a checkpoint folder one can resume from, or a ``VelotuneError`` saying what is wrong."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise VelotuneError(f"resume: {path} is not a folder; pass a checkpoint-N folder or resume=true")
    state = p / TRAINER_STATE
    if not state.is_file():
        raise VelotuneError(f"resume: {p} is not a complete checkpoint (no {TRAINER_STATE}); pass another "
                            "checkpoint-N folder, or resume=true for the newest complete one")
    try:
        json.loads(state.read_text())
    except ValueError as e:
        raise VelotuneError(f"resume: {state} is not valid JSON ({e}); pass another checkpoint") from None
    return p


class AtomicCheckpointMixin:
    """Mixed into a ``transformers.Trainer``: checkpoints are staged, fsynced and renamed into place."""

    def _save_checkpoint(self, model, trial):
        from ..distributed import barrier

        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        several = self.args.world_size > 1
        publisher = self.args.should_save  # rank 0 (the main process of each node with save_on_each_node)
        if several:
            # one folder every rank computes the same way; a leftover of an interrupted run is removed first
            staging = run_dir / f"{_STAGING}-{self.state.global_step}-ddp"
            if publisher:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            barrier()  # the folder exists (and is empty) before any rank writes into it
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}-{self.state.global_step}-", dir=run_dir))
        limit = self.args.save_total_limit
        # transformers writes into _get_output_dir(trial)/checkpoint-N and rotates that folder; point it
        # at the staging folder (instance attributes shadow the methods), rotate the real folder after.
        self._get_output_dir = lambda trial=None: str(staging)
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
            if several:
                barrier()  # every rank's RNG state is in the staging folder
            best = self.state.best_model_checkpoint
            if best and best.startswith(str(staging)):  # every rank: where the best checkpoint will be
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                if publisher:
                    self.state.save_to_json(str(staging / name / TRAINER_STATE))
            if publisher:
                publish(staging / name, run_dir / name)
        finally:  # a failed save (disk full, ...) leaves nothing half-written behind
            del self._get_output_dir
            self.args.save_total_limit = limit
            if publisher:
                shutil.rmtree(staging, ignore_errors=True)
        if publisher:
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        if several:
            barrier()  # checkpoint-N is in place before any rank goes on (and might read or resume from it)
