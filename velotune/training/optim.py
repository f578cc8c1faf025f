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

The same step also calls the C function of the 8-bit blockwise update directly (DIRECT_ON_CUDA). On its
way there bitsandbytes passes each parameter through ~6 Python layers (``update_step``, ``get_config``,
``functional.optimizer_update_8bit_blockwise``, ``is_on_gpu``, the ``torch.ops`` dispatcher, the CUDA
backend's impl converting 20 arguments to ctypes): ~50-100 us of host time per parameter, 10-20 ms a step
for the 224-448 LoRA tensors of a 1B-8B model against ~3 ms of kernels. The direct call passes the same
function the same arguments (pointers converted once per parameter) and runs only where bitsandbytes'
own path would have taken exactly that call: a two-state optimizer (Adam / AdamW / AdEMAMix...), 8-bit state,
CUDA tensors, contiguous, no per-parameter config override; everything else goes through ``update_step``.
"""
from __future__ import annotations

import ctypes

import torch

# The bitsandbytes methods the step below calls; if a future version renames one, the optimizer keeps
# bitsandbytes' own step (said once) rather than a half-working copy.
_NEEDED = ("check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")
_classes: dict = {}


# Whether the step calls bitsandbytes' 8-bit blockwise update function directly on CUDA (see the module
# docstring); False: every parameter through bitsandbytes' update_step. On since
# tests/test_optim.py::test_direct_update_on_cuda_is_bitwise_bitsandbytes passed on an H200 (2026-11-28, 8th
# session; the 1B seed step 52.6K vs 52.3K tok/s through bitsandbytes' path: run 20261128T133421Z).
DIRECT_ON_CUDA = True
_DIRECT_DEVICES = ("cuda",)  # tests add "cpu" (with a fake function: bitsandbytes' C update is CUDA-only)


def _update_fn(name: str, grad_dtype: torch.dtype):
    """bitsandbytes' C function of the 8-bit blockwise update ``name`` for gradients of ``grad_dtype``
    (what its CUDA backend's impl calls), or None where this bitsandbytes has no such table."""
    try:
        from bitsandbytes.backends.cuda.ops import str2optimizer8bit_blockwise
    except (ImportError, AttributeError):  # pragma: no cover - a bitsandbytes without the CUDA backend
        return None
    fns = str2optimizer8bit_blockwise.get(name)
    order = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    return None if fns is None or grad_dtype not in order else fns[order[grad_dtype]]


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


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
                if not self._direct_update(group, p, gindex, pindex):
                    self.update_step(group, p, gindex, pindex)
        return loss

    def _direct_update(self, group, p, gindex, pindex) -> bool:
        """Optimizer2State.update_step's 8-bit blockwise call, made straight to its C function (the module
        docstring); False (nothing done) where that call is not exactly what bitsandbytes would make."""
        state, grad = self.state[p], p.grad
        s1 = state.get("state1")
        if not (DIRECT_ON_CUDA and self._velotune_two_state and s1 is not None and s1.dtype == torch.uint8
                and grad.numel() == p.numel() and p.device.type in _DIRECT_DEVICES and grad.device == p.device
                and p.is_contiguous() and grad.is_contiguous() and (gindex, pindex) not in self.mng.index2config
                and id(p) not in self.mng.pid2config):
            return False
        cache = self.__dict__.setdefault("_velotune_direct", {})
        key = (p.data_ptr(), grad.dtype, s1.data_ptr(), state["state2"].data_ptr(), state["absmax1"].data_ptr(),
               state["absmax2"].data_ptr(), state["qmap1"].data_ptr(), state["qmap2"].data_ptr(), p.numel())
        hit = cache.get(id(p))
        if hit is None or hit[0] != key:
            fn = _update_fn(self.optimizer_name, grad.dtype)
            if fn is None:
                return False
            hit = cache[id(p)] = (key, fn, _ptr(p), _ptr(s1), _ptr(state["state2"]), _ptr(state["qmap1"]),
                                  _ptr(state["qmap2"]), _ptr(state["absmax1"]), _ptr(state["absmax2"]),
                                  ctypes.c_int32(grad.numel()), p.device if torch.cuda.device_count() > 1 else None)
        _, fn, pp, s1p, s2p, q1, q2, a1, a2, n, device = hit
        state["step"] += 1
        betas = group["betas"]
        args = (pp, ctypes.c_void_p(grad.data_ptr()), s1p, s2p, ctypes.c_float(betas[0]), ctypes.c_float(betas[1]),
                ctypes.c_float(betas[2] if len(betas) >= 3 else 0.0), ctypes.c_float(group.get("alpha", 0.0)),
                ctypes.c_float(group["eps"]), ctypes.c_int32(state["step"]), ctypes.c_float(group["lr"]), q1, q2, a1,
                a2, ctypes.c_float(group["weight_decay"]), ctypes.c_float(1.0), ctypes.c_bool(self.args.skip_zeros), n)
        if device is None:
            fn(*args)
        else:  # as bitsandbytes does on machines with several GPUs: the kernel runs on the tensors' device
            with torch.cuda.device(device):
                fn(*args)
        return True


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
        from bitsandbytes.optim.optimizer import Optimizer2State

        # whether its update is Optimizer2State's own (Adam, AdamW, ...; not AdEMAMix's): the direct call's case
        two_state = getattr(cls, "update_step", None) is Optimizer2State.update_step
        _classes[cls] = type(cls.__name__, (_StepWithoutHostSyncs, cls),
                             {"__module__": __name__, "__doc__": cls.__doc__, "_velotune_two_state": two_state})
    optimizer.__class__ = _classes[cls]
    return optimizer


def _bnb_version() -> str:
    import bitsandbytes

    return getattr(bitsandbytes, "__version__", "?")
