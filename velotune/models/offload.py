"""Offloaded gradient checkpointing for one decoder layer (the eager path; graphs.py has its own).

``use_gradient_checkpointing="unsloth"`` / ``"offload"``: a layer's forward runs without building a
graph, its input ``x`` is copied to pinned host memory on a side stream (overlapping the next layers)
and dropped from the GPU; backward copies it back, recomputes the layer with grad and returns the
gradients of ``x`` and of the layer's trainable parameters. GPU memory for checkpoints drops from one
activation per layer to the few in flight. Used for layers with nothing random in them (no dropout:
the recompute must reproduce the forward exactly without replaying RNG state; decoder.py checks);
other layers keep torch's recompute checkpointing. On CPU: plain recompute.

Host copies live in exact-size page-locked buffers (:class:`PinnedPool`), reused from step to step:
torch's ``pin_memory=True`` rounds every allocation up to a power of two, which at long context (a
409,600-token layer input is 3.1 GiB, rounded to 4 GiB, times 31 layers) asks for more host memory
than the machine has. While the pool grows (the first step at a new length), the next layer's buffer is
page-locked on a helper thread as the current layer runs (PIN_AHEAD), instead of inline at ~0.5 s per GB.
"""
from __future__ import annotations

import threading
import time

import torch

from .._notices import say_once
from . import recompute
from .graphs import autocast_state

# On since tests/test_fast_forward_gpu.py::test_cuda_graphs_train_like_eager[llama-offload-*] passed on
# an H200 (2026-11-28). A kill switch: False makes "unsloth" / "offload" run plain recompute on CUDA
# (same numerics, more GPU memory; adapters.py says so).
ENABLED_ON_CUDA = True
# Tests set this to run the offload paths on CPU (the "host copy" is then a CPU clone).
ON_CPU = False

_side_streams: dict = {}


def _cuda_register(t: torch.Tensor) -> bool:
    """Page-lock ``t``'s memory in place (cudaHostRegister); False where the driver refuses."""
    return int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) == 0


def _cuda_unregister(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


_PAGE = 4096
# Host memory offloading leaves to everything else: a new buffer is only taken while MemAvailable stays
# above max(HOST_RESERVE_GIB, 5% of the machine's memory) after it.
HOST_RESERVE_GIB = 4.0
# Page-lock the next layer's buffer on a helper thread while the current layer runs, when the pool is
# growing (the first step at a new length): page-locking costs ~0.5 s per GB, which at 409,600 tokens of
# the 8B shape is ~1.7 s per layer and ~52 s in that step if done inline, while the layer's own forward
# there takes ~3 s of GPU time. cudaHostRegister releases the GIL, so the main thread keeps launching.
PIN_AHEAD = True


def host_reserve(total: int) -> float:
    """Bytes of host memory page-locking leaves to everything else on a machine of ``total`` bytes."""
    return max(HOST_RESERVE_GIB * 2**30, 0.05 * total)


def _meminfo() -> tuple[int, int]:
    """(MemAvailable, MemTotal) in bytes from /proc/meminfo; (-1, -1) where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return -1, -1


class PinnedPool:
    """Page-locked host buffers of exactly the requested size, reused across steps.

    ``take(shape, dtype)`` returns ``(buffer, tensor)``: the smallest free buffer that is big enough (after
    waiting for the event its last user gave back, normally long done), else a new one; when a new one is
    needed, free buffers too small for this request are released first, so the pool holds about as many
    buffers as are in use at once, each at most the largest size seen. ``give(buffer, event)`` returns a
    buffer once the copy that reads it (``event``, None = done) is queued. Where page-locking fails, the
    buffer stays pageable (copies are then synchronous; the same bytes) and this is said once.

    Host memory: a new buffer is taken only if the machine keeps its reserve after it (HOST_RESERVE_GIB,
    at least 5% of its memory); otherwise ``take`` returns None and the caller keeps that activation on
    the GPU (said once, with what it costs): the kernel's out-of-memory killer would otherwise end the
    process without a word (page-locked memory cannot be swapped).
    """

    def __init__(self, register=_cuda_register, unregister=_cuda_unregister, meminfo=_meminfo, device=None):
        self.register, self.unregister, self.meminfo = register, unregister, meminfo
        self.device = device  # CUDA device index the helper thread page-locks for (None: its current device)
        self.lock = threading.Lock()  # a lease may come back from another thread (its garbage collection)
        self.free: list = []  # (buffer, event)
        self.held_bytes = 0
        self.register_s = 0.0  # time spent page-locking (about 0.5 s per GB: a first step at a new length)
        self.wait_s = 0.0  # of which callers of take waited for (inline, or for a buffer still being locked ahead)
        self.ahead = None  # the helper thread page-locking one buffer ahead (prefetch), while it runs

    def lease(self, shape, dtype: torch.dtype) -> "_Lease":
        """``take`` wrapped so the buffer comes back to the pool even if nobody calls ``give`` (a forward
        whose backward never runs): ``lease.tensor`` is the host tensor, ``lease.back(event)`` returns it."""
        taken = self.take(shape, dtype)
        return _Lease(self, *taken) if taken is not None else None

    def take(self, shape, dtype: torch.dtype):
        need = _nbytes(shape, dtype)
        taken = self._take_free(need)
        if taken is None and self.ahead is not None:  # a buffer is being page-locked ahead: wait for it
            t0 = time.perf_counter()
            self._join_ahead()
            self.wait_s += time.perf_counter() - t0
            taken = self._take_free(need)
        if taken is not None:
            buf, event = taken
            if event is not None:
                event.synchronize()
        else:
            t0 = time.perf_counter()
            buf = self._new(need, say=True)
            self.wait_s += time.perf_counter() - t0
            if buf is None:
                return None
        return buf, buf[:need].view(dtype).view(tuple(shape))

    def prefetch(self, shape, dtype: torch.dtype) -> None:
        """Page-lock one buffer for a ``take(shape, dtype)`` that will follow, on a helper thread, unless a free
        buffer already fits or one is being locked (PIN_AHEAD). The caller goes on at once; ``take`` waits
        for the thread only if it asks before the buffer is ready. Host memory short: nothing is taken
        (``take`` then says so)."""
        if not PIN_AHEAD:
            return
        need = _nbytes(shape, dtype)
        if self.ahead is not None and not self.ahead.is_alive():
            self._join_ahead()
        with self.lock:
            if self.ahead is not None or any(b.numel() >= need for b, _ in self.free):
                return
            self.ahead = threading.Thread(target=self._ahead_run, args=(need,), name="velotune-pin-ahead",
                                          daemon=True)
        self.ahead.start()

    def _ahead_run(self, need: int) -> None:
        if self.device is not None:
            torch.cuda.set_device(self.device)
        buf = self._new(need, say=False)
        if buf is not None:
            self.give(buf)

    def _join_ahead(self) -> None:
        thread = self.ahead
        if thread is not None:
            thread.join()
            self.ahead = None

    def _take_free(self, need: int):
        """The smallest free (buffer, event) of at least ``need`` bytes, removed from the free list; or None."""
        with self.lock:
            fits = [(b, e) for b, e in self.free if b.numel() >= need]
            if not fits:
                return None
            buf, event = min(fits, key=lambda be: be[0].numel())
            self.free = [(b, e) for b, e in self.free if b is not buf]
        return buf, event

    def _new(self, need: int, say: bool):
        """A new page-locked buffer of ``need`` bytes (whole pages), the free buffers (all smaller: none fit)
        released first; None where that would leave the host less than its reserve (said once if ``say``)."""
        size = -(-max(need, 1) // _PAGE) * _PAGE
        with self.lock:
            spare = sum(b.numel() for b, _ in self.free if b.numel() < need)  # released below: available
        available, total = self.meminfo()
        reserve = host_reserve(total)
        if available >= 0 and available + spare - size < reserve:
            if say:
                say_once("pinned-short", f"offloaded checkpointing: host memory is short ({available / 2**30:.1f} "
                         f"GiB available, {size / 2**30:.2f} GiB asked, {reserve / 2**30:.1f} GiB kept free), so "
                         "some layer inputs stay on the GPU (same results, more GPU memory). For longer sequences "
                         "use a machine with more host memory (about layers x tokens x hidden x 2 bytes)")
            return None
        with self.lock:
            smaller = [(b, e) for b, e in self.free if b.numel() < need]
            self.free = [(b, e) for b, e in self.free if b.numel() >= need]
        self._release(smaller)
        raw = torch.empty(size + _PAGE, dtype=torch.uint8)
        off = -raw.data_ptr() % _PAGE
        buf = raw[off:off + size]  # whole pages of its own: page-locking touches no neighbour
        t0 = time.perf_counter()
        pinned = self.register(buf)
        with self.lock:
            self.register_s += time.perf_counter() - t0
            self.held_bytes += buf.numel()
        if not pinned:
            say_once("pinned-register", "offloaded checkpointing: host memory could not be page-locked; "
                     "copies to and from the host run synchronously (same results, slower)")
        return buf

    def give(self, buf: torch.Tensor, event=None) -> None:
        with self.lock:
            self.free.append((buf, event))

    def _release(self, entries) -> None:
        for buf, event in entries:
            if event is not None:
                event.synchronize()
            self.unregister(buf)
            with self.lock:
                self.held_bytes -= buf.numel()


def _nbytes(shape, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


class _Lease:
    def __init__(self, pool: PinnedPool, buf: torch.Tensor, tensor: torch.Tensor):
        self.pool, self.buf, self.tensor, self.event = pool, buf, tensor, None

    def back(self, event=None) -> None:
        if self.buf is not None:
            self.pool.give(self.buf, event if event is not None else self.event)
            self.buf = self.tensor = None

    def __del__(self):
        self.back()


_pools: dict = {}


def pinned_pool(device: torch.device) -> PinnedPool:
    """The process's :class:`PinnedPool` for copies to and from ``device``."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _pools:
        _pools[key] = PinnedPool(device=key)
    return _pools[key]


def _side(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(device=device)
    return _side_streams[key]


class OffloadedCheckpoint(torch.autograd.Function):
    """``run_layer(layer, x)`` with ``x`` kept in pinned host memory until backward recomputes the layer."""

    @staticmethod
    def forward(ctx, run_layer, layer, ahead, x, *params):
        ctx.run_layer, ctx.layer, ctx.device = run_layer, layer, x.device
        ctx.autocast = autocast_state(x.device.type)
        out = run_layer(layer, x)  # autograd.Function.forward runs without grad: nothing is saved
        if x.is_cuda:
            side = _side(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            pool = pinned_pool(x.device)
            ctx.lease = pool.lease(x.shape, x.dtype)
            if ahead:  # another offloaded layer follows in this forward: its buffer, page-locked meanwhile
                pool.prefetch(x.shape, x.dtype)
            if ctx.lease is None:  # host memory is short: this input stays on the GPU (the pool said so)
                ctx.host, ctx.copied = x.detach(), None
                return out
            host = ctx.lease.tensor
            with torch.cuda.stream(side):
                host.copy_(x, non_blocking=True)
                ctx.copied = torch.cuda.Event()
                ctx.copied.record(side)
            ctx.lease.event = ctx.copied  # if no backward comes, the buffer is free once this copy ends
            x.record_stream(side)  # the allocator keeps x's memory until the copy has read it
        else:
            host, ctx.copied = x.detach().clone(), None
        ctx.host = host
        return out

    @staticmethod
    def backward(ctx, dy):
        if ctx.copied is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
        x = ctx.host.to(ctx.device, non_blocking=True)
        if getattr(ctx, "lease", None) is not None:  # the buffer is free again once this copy has read it
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(ctx.device))
            ctx.lease.back(done)
            ctx.lease = None
        params = [p for p in ctx.layer.parameters() if p.requires_grad]
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            with torch.autocast(**ctx.autocast), recompute.for_backward():  # its output only roots this backward
                out = ctx.run_layer(ctx.layer, xr)
            grads = torch.autograd.grad(out, [xr] + params, grad_outputs=dy, allow_unused=True)
        ctx.host = None
        return (None, None, None, *grads)


def offloaded_layer(run_layer, layer, x, ahead: bool = False):
    """Run one layer under offloaded checkpointing (see the module docstring). ``ahead``: another layer of the
    same forward follows under offloading (its host buffer can be page-locked while this one runs)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    return OffloadedCheckpoint.apply(run_layer, layer, ahead, x, *params)


def available(x: torch.Tensor) -> bool:
    """Whether offloading applies to activations like ``x`` (see ENABLED_ON_CUDA / ON_CPU)."""
    return ENABLED_ON_CUDA if x.is_cuda else ON_CPU
