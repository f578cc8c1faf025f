"""Each benchmark peer runs in a process of its own (Unsloth patches transformers at import, and a
crash or out-of-memory must not take the other peers down): the two halves of that hand-off, shared
by the bench scripts. The child writes one JSON result file; a peer that fails is a result too."""
from __future__ import annotations

import json
import subprocess
import traceback
from pathlib import Path


def write_result(path, run, failed):
    """Child side: ``run()``'s result, or ``failed(message)`` if it raises, written as JSON to ``path``;
    returns that result."""
    try:
        res = run()
    except Exception as e:  # noqa: BLE001 - any failure is recorded as the peer's result
        traceback.print_exc()
        res = failed(f"{type(e).__name__}: {e}"[:2000])
    Path(path).write_text(json.dumps(res))
    return res


def run_child(cmd: list[str], path, timeout: float, failed):
    """Parent side: run ``cmd`` (a child that writes its JSON result to ``path``) for at most ``timeout``
    seconds; its result (also when the child wrote it and then overran in its exit, e.g. releasing ~100 GiB
    of page-locked memory), or ``failed(message)`` when it wrote nothing readable. A result left at ``path``
    by an earlier run is removed first, so it is never read as this one's."""
    path = Path(path)
    path.unlink(missing_ok=True)
    late = None
    try:
        subprocess.run(cmd, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:  # its result may be written already: only its exit was slow
        late = e
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        e = late or e
        return failed(f"{type(e).__name__}: {e}")
