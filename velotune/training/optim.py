"""bitsandbytes optimizers without a host synchronisation per parameter.

bitsandbytes (0.45+) ends the update of EVERY parameter with ``torch.cuda.synchronize()``
(``bitsandbytes.utils.sync_gpu``), which its paged optimizers need: their state lives in unified
memory that the driver pages asynchronously. For the ordinary (non-paged) optimizers the update is one
kernel per parameter on the current stream, so stream order already makes it correct; the syncs only
make the GPU wait for the host between the ~200 updates of a LoRA model (measured on an H200, Llama-3.1-8B
QLoRA: the optimizer step took 33-55 ms of GPU time for ~5 ms of kernels, bench/NOTES.md).

``without_host_syncs(optimizer)`` switches a non-paged bitsandbytes optimizer to a ``step`` that runs the
same bitsandbytes update of each parameter (same kernels, same arguments, same order: results are
bitwise the same) without the per-parameter synchronisation. velotune's SFTTrainer applies it to the
optimizer that ``TrainingArguments(optim=...)`` builds; anything else (paged bitsandbytes optimizers,
torch optimizers) is left as it is.
"""
from __future__ import annotations

import torch

# The bitsandbytes methods the step below calls; if a future version renames one, the optimizer keeps
# bitsandbytes' own step (said once) rather than a half-working copy.
_NEEDED = ("check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")
_classes: dict = {}


class _StepWithoutHostSyncs:
    """Mixin placed before a bitsandbytes optimizer class: its step without ``sync_gpu`` per parameter."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)  # a no-op for non-paged state, kept for the same call sequence
                self.update_step(group, p, gindex, pindex)
        return loss


def without_host_syncs(optimizer):
    """Return ``optimizer`` with a step free of bitsandbytes' per-parameter ``torch.cuda.synchronize``.

    Applies to non-paged bitsandbytes optimizers (``optim="adamw_8bit"``, ``"adamw_bnb_8bit"``,
    ``"lion_8bit"``, bitsandbytes' 32-bit ones); the same object is returned with its class switched to
    a subclass whose ``step`` differs only by the missing syncs. Other optimizers are returned unchanged.
    """
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return optimizer
    cls = type(optimizer)
    if not isinstance(optimizer, Optimizer8bit) or isinstance(optimizer, _StepWithoutHostSyncs):
        return optimizer
    if getattr(optimizer, "is_paged", False):
        return optimizer  # paged state needs bitsandbytes' syncs
    missing = [m for m in _NEEDED if not hasattr(optimizer, m)]
    if missing:
        from .._notices import say_once

        say_once("optim-syncs", f"bitsandbytes {_bnb_version()} has no {', '.join(missing)} on {cls.__name__}: "
                                "its optimizer step runs as bitsandbytes ships it (a host sync per parameter)")
        return optimizer
    if cls not in _classes:
        _classes[cls] = type(cls.__name__, (_StepWithoutHostSyncs, cls), {"__module__": __name__,
                                                                            "__doc__": cls.__doc__})
    optimizer.__class__ = _classes[cls]
    return optimizer


def _bnb_version() -> str:
    import bitsandbytes

    return getattr(bitsandbytes, "__version__", "?")
