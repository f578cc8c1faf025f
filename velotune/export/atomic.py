"""Atomic saves: write into a temporary folder next to the target, then move into place.

Nothing the user had is lost if a save fails half-way (disk full, Ctrl-C, a crash): the temporary
folder is removed and the target is untouched. A target that does not exist (or is empty) is
replaced in one ``os.replace``; an existing folder receives each new file by ``os.replace`` (atomic
per file), then the weight files of an earlier save that the new one did not write are removed, so
a loader never mixes two saves. Other files the user keeps in that folder are left alone.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# Files of an earlier model save that must not outlive a new one in the same folder.
_WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def _move_into(tmp: Path, target: Path) -> None:
    written = set()
    for src in sorted(tmp.rglob("*")):
        rel = src.relative_to(tmp)
        dst = target / rel
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        os.replace(src, dst)
        written.add(rel)
    for pattern in _WEIGHT_PATTERNS:
        for old in target.glob(pattern):
            if old.relative_to(target) not in written and old.is_file():
                old.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Context manager yielding a fresh temporary folder; on success its files land in ``target``."""
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is a file; pass a folder path to save into")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the folder 0700; the saved model folder should get the usual umask permissions
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if not target.exists() or not any(target.iterdir()):
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
        else:
            _move_into(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_free_disk(folder: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Raise before a long write when the disk holding ``folder`` has less than ``need_bytes`` free."""
    folder = Path(folder).expanduser().resolve()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise OSError(
            f"not enough free disk for {what}: need about {need_bytes / 1024**3:.2f} GiB in {probe}, "
            f"{free / 1024**3:.2f} GiB free; free some space or save elsewhere"
        )
