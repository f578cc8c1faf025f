"""Progress bars for velotune's long steps (merging, GGUF files, training postfix).

tqdm on stderr, off when transformers' progress bars are off (``transformers.utils.logging.
disable_progress_bar()`` or ``HF_HUB_DISABLE_PROGRESS_BARS=1``), so one switch silences every bar.
"""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled()


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "tensor") -> Iterator[T]:
    """Yield ``items`` while a bar counts them (``total`` known up front) on stderr."""
    if not enabled():
        yield from items
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True) as bar:
        for item in items:
            yield item
            bar.update(1)
