"""User-facing notices: printed once per process per key, never silently dropped.

A notice tells the user that velotune made a choice for them (a fallback, a default, an ignored
option). Each distinct key prints once so a training loop does not spam; the text goes to stderr
through the ``velotune`` logger so users can route or silence it with ``logging``.
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


def say_once(key: str, message: str) -> bool:
    """Log ``message`` at INFO the first time ``key`` is seen in this process. Returns True if printed."""
    with _lock:
        if key in _said:
            return False
        _said.add(key)
    logger.info(message)
    return True


def say(message: str) -> None:
    """Log ``message`` at INFO (every time)."""
    logger.info(message)


class VelotuneError(ValueError):
    """Bad input or an unsupported request; the message names the problem and the fix."""
