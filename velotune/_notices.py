"""User-facing notices: printed once per process per key, never silently dropped.

A notice tells the user that velotune made a choice for them (a fallback, a default, an ignored
option). Each distinct key prints once so a training loop does not spam; the text goes to stderr
through the ``velotune`` logger so users can route or silence it with ``logging``.

In a multi-process run (torchrun / accelerate launch) only rank 0 prints: the other ranks log the same
messages at DEBUG (hidden unless ``logging.getLogger("velotune").setLevel(logging.DEBUG)``), so N GPUs
do not print every notice N times.
"""
from __future__ import annotations

import logging
import threading

logger = logging.getLogger("velotune")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("velotune: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

_said: set[str] = set()
_lock = threading.Lock()


def _level() -> int:
    """INFO on rank 0 (and in a single process), DEBUG on the other ranks of a multi-process run."""
    from .distributed import is_main_process

    return logging.INFO if is_main_process() else logging.DEBUG


def say_once(key: str, message: str) -> bool:
    """Log ``message`` the first time ``key`` is seen in this process (INFO; DEBUG on ranks other than 0).
    Returns True if it was logged at INFO."""
    with _lock:
        if key in _said:
            return False
        _said.add(key)
    level = _level()
    logger.log(level, message)
    return level == logging.INFO


def say(message: str) -> None:
    """Log ``message`` every time (INFO; DEBUG on ranks other than 0 of a multi-process run)."""
    logger.log(_level(), message)


class VelotuneError(ValueError):
    """Bad input or an unsupported request; the message names the problem and the fix."""
