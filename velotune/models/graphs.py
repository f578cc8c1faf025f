"""CUDA graphs for the decoder stack of a checkpointed training step.

Why: at 1B-8B shapes the fused step is host-bound. Every layer launches ~100 kernels (forward,
recompute, backward), each costing the CPU 10-100 us in Python, torch's dispatcher and Triton's
launcher, while the GPU finishes most of them sooner (bench/NOTES.md). A CUDA graph records a
layer's kernels once and replays them with one call.

What is captured, per decoder layer ``l``, by policy (POLICIES, from use_gradient_checkpointing):

* "recompute" (True): forward graph ``F_l``: ``x[l+1] = layer_l(x[l])`` under no_grad, ``x[l]`` static
  buffers chained through the stack and kept until backward, as checkpointing keeps each layer's
  input; backward graph ``B_l``: recompute ``layer_l(x[l])`` with grad, then ``torch.autograd.grad``
  against the incoming gradient, giving ``dx[l]`` and the layer's parameter gradients (LoRA A/B) in
  static buffers. ``dy``/``dx`` ping-pong between two buffers.
* "offload" ("unsloth" / "offload"): as "recompute", but the layer inputs pass through three GPU slots
  and wait in pinned host memory (GraphSet).
* "keep" (False): ``F_l`` runs with grad, so its activations stay in the graphs' pool; ``B_l`` is the
  backward of that recorded graph (no recompute). "auto": the first layers keep, the rest recompute,
  as many as the memory budget allows (plan_keep). GPU-tested (KEEP_ON_CUDA: the kill switch). Where
  offloading is available (AUTO_OFFLOAD_ON_CUDA), the layers "auto" does not keep wait in host memory
  like "offload"'s (kept layers: a GPU input buffer each; the others: the ring).

Numerics are those of the eager fast forward: the same kernels run on the same inputs (the graphs
are recorded from that code). When graphs are used (all must hold, checked per call):
CUDA, training, grad enabled, every projection of every layer on the fused LoRA path (no dropout, no
8-bit base), and any attention the fast forward plans (plain causal, packed rows, padding masks, windows): its
per-call inputs are static copies refilled every call (STATIC_INPUTS_ON_CUDA: the kill switch; off,
only plain causal attention with positions 0..T-1 is recorded). A capture
costs about two eager steps and is kept per batch shape (up to 8 shapes; their static buffers are
shared, sized for batch x max_seq_length); ``mode="auto"`` records the first 8 shapes it sees and then
stops recording new ones; a shape dropped since, when the shared buffers grew for a longer batch, is recorded
again. Batches whose length changes every step gain nothing: pad them to a few fixed lengths, as SFTTrainer
does. Otherwise the eager path runs, unchanged. All sets share one memory pool for their temporaries, sized at
its first capture for the longest batch expected (RESERVE_POOL; SFTTrainer reads it from its dataset); the
later captures' warm-ups run inside it (WARM_UP_IN_POOL), and so do the fused loss's temporaries between the
forward's replays and the backward's (LOSS_IN_POOL, loss_scratch).

Measured (H200, 1B shape, bs 2 x 2048, bench/run_train_step.py): 47.8K tokens/s with graphs vs 16.8K
eager and Unsloth 21.3K in the same session. A capture attempted at the *second* step of the
benchmark (after one eager step whose loss was still referenced) failed on the GPU ("operation failed
due to a previous error during capture", in the first backward graph), as did every capture under DDP
(8B, 2 x H200): autograd waited on the default stream of the parameters' AccumulateGrad nodes, kept
alive from before the capture. Recorded backwards that differentiate views of the parameters avoid
those nodes (PARAM_VIEWS, on: both cases capture on an H200 since, and DDP scales 1.91x with it). A
failed capture is said once, its memory given back, and training continues eagerly with the same numerics.

Limits, each checked with a clear error or an eager fallback: one forward per backward (a second
forward before ``backward()`` overwrites the static buffers, so that backward raises); parameters
replaced by new tensors (e.g. loading another adapter) are detected and the graphs recaptured.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import gc
import math
import time
from typing import Optional

import torch

from .._notices import VelotuneError, say, say_once
from . import recompute
from .pointers import Slots

# "auto": record the first _MAX_CAPTURES batch shapes; True: record every new shape; False: never.
# Set per model with set_cuda_graphs().
MODES = ("auto", True, False)
_MAX_SETS = 8  # batch shapes kept per model (their static buffers are shared: _Arena)
_MAX_CAPTURES = 8  # per model in "auto": distinct shapes recorded; shapes that keep changing stay eager
# "auto" leaves batches of more tokens than this eager: their step is seconds of GPU work, so launching
# kernels one by one costs nothing measurable, while the graphs' pool would hold one layer's
# temporaries (GiBs at such lengths) that the eager loss could otherwise reuse: long-context runs are
# memory-bound. mode=True still records them.
AUTO_MAX_TOKENS = 65536
_WARMUP_STEPS = 1  # eager runs of each captured piece before capture (Triton compile, cuBLAS init)
# Size the graphs' pool at the first capture for the longest batch a trainer expects (VelotuneState.
# longest_batch_tokens) instead of letting each new longest batch shape add segments of its own. Why: the
# caching allocator cuts a segment per large temporary of a capture (the MLP's, ~64 MiB each at the 1B shape,
# bs 2 x 2048), and a later capture of a longer batch cannot use the shorter batch's free blocks, while a
# shorter one fits in a longer one's. Measured (H200, the SFTTrainer workflow, 1B, bucket lengths arriving
# 1280, 1792, 1024, 2048, ...): the pool grew 394 -> 620 -> 878 MiB, against 508 MiB when 2 x 2048 is
# recorded alone. With it, one free segment of the size the first capture's warm-up measured, scaled to the
# longest batch (when longer than the first), is taken before the first capture, and every capture splits its
# temporaries from it. Measured the same way (H200, 128 examples, 8 bucket lengths): pool 596 MiB instead of
# 880, peak reserved 2.29 GiB instead of 2.70 (with the default pool's cache given back before each warm-up).
# Only "recompute" / "offload" (the pool holds temporaries alone; "keep" / "auto" hold activations per set).
RESERVE_POOL = True
# With the pool sized, each later capture's eager warm-up runs on the captures' stream and allocates from the
# pool, whose free blocks the capture reuses, instead of cutting its own segments beside it: those came on top
# of everything else while the warm-up ran (H200, the 1B SFTTrainer workflow: the warm-up of 2 x 2048 cut 538
# MiB beside a 596 MiB pool with 532 free, the run's peak reserved memory). Uses torch's private allocator
# bindings (_can_route); without them, the warm-up runs as before.
WARM_UP_IN_POOL = True
# Whether a pool whose first batch is already the longest expected (or none is expected) is sized too, at what
# that batch's warm-up cut; False: such a pool gets only what its captures cut (later warm-ups still run inside
# it). Measured (H200, the 1B seed step, one shape, one run, 13th session), peak allocated / reserved and pool:
# True 1.54 / 1.82 GiB, pool 0.53; False 1.52 / 1.90, pool 0.62. Alone, True cost 0.04 GiB reserved (2.10 vs 2.06:
# the warm-up's cut exceeds what the capture needs); with the loss's temporaries in the pool (LOSS_IN_POOL), that
# one free segment is where they fit, while the capture's own free blocks, cut to its temporaries, are too small
# for the loss's chunk of logits and the pool grows by it.
SIZE_FIXED_SHAPE_POOL = True
# The fused loss's temporaries (the chunk of logits, the selected rows, the per-row losses) in the graphs' pool,
# which sits unused between the forward's replays and the backward's (loss_scratch), instead of in the default
# pool, where their segments came on top of the pool's. Only in a pool whose warm-ups run in it (policies
# "recompute" / "offload"): there no block is read from one replay to the next, so the pool's free blocks are
# free between them; the loss's outputs (the loss, the hidden state's gradient) stay in the default pool.
# Measured (H200, 13th session, same runs): the 1B seed step's peak reserved 1.82 GiB (pool sized) or 1.90 (cut
# by its capture) vs 2.06 with the loss apart (Unsloth 1.87); the 8B step's 7.26 vs 7.48; the 1B SFTTrainer
# workflow's 1.81 / 2.00 / 1.83 GiB (padded / padding-free / packed) vs 2.01 / 2.17 / 2.10. Same peak allocated;
# speed within the runs' noise.
LOSS_IN_POOL = True

# torch.cuda.graph's capture_error_mode (CUDA's stream-capture interaction mode); bench/diag_graphs.py
# tries the others.
CAPTURE_ERROR_MODE = "global"
# Whether recorded backwards differentiate views of the parameters rather than the parameters
# (GraphSet._run_with_grad). Under DDP the capture of the parameters' path failed on the GPU (8B step,
# 2 x H200, 2026-11-28: "operation failed due to a previous error during capture" in the first backward
# graph, after torch's warning of an AccumulateGrad stream mismatch: DDP keeps those nodes from wrapping
# on), as did a capture at the second step while the first step's loss was still referenced.
# True: views everywhere (tests/test_fast_forward_gpu.py::test_cuda_graphs_capture_after_eager_step_and_under_ddp
# passed on an H200, 2026-11-28, 6th session; DDP 8B on 2 x H200: 1.91x one rank with graphs recorded);
# False: the parameters themselves; None: views only in processes of a torch.distributed group.
PARAM_VIEWS: Optional[bool] = True


def _param_views() -> bool:
    if PARAM_VIEWS is not None:
        return PARAM_VIEWS
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()

# Batches that need attention inputs per call (packed rows, padding masks, sliding windows, positions
# other than 0..T-1) are recorded with static copies of those inputs. On since
# tests/test_fast_forward_gpu.py::test_cuda_graphs_packed_rows passed on an H200 (2026-11-28).
STATIC_INPUTS_ON_CUDA = True

# Tests set this to emulate graphs on CPU: a "replay" then re-runs the recorded function and copies
# its results into the static buffers, which exercises every part of this file but the capture.
EMULATE_ON_CPU = False


class _Replay:
    """A recorded piece of work: a CUDA graph, or (emulation) the function itself, run again on replay.
    The function writes its results into static buffers, so a replay needs no outputs."""

    def __init__(self, fn, pool, emulate: bool, stream=None):
        self.fn = fn
        if emulate:
            self.graph = None
            fn()
            return
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode=CAPTURE_ERROR_MODE):
            fn()

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


def _capture(fn, pool, emulate: bool, what: str, stream=None) -> _Replay:
    try:
        return _Replay(fn, pool, emulate, stream)
    except Exception as e:
        raise RuntimeError(f"while capturing {what}: {type(e).__name__}: {e}") from e


_RING = 3  # GPU slots for layer inputs when they are offloaded (x[l] lives in slot l % 3)

# Per layer, how its activations reach the backward: "keep" (recorded with grad: no recompute, all
# activations stay; use_gradient_checkpointing=False), "recompute" (True), "offload" ("unsloth" /
# "offload"), "auto" (the planner, plan_keep: keep as many layers as the memory budget allows, recompute
# the rest, from host memory where AUTO_OFFLOAD_ON_CUDA).
POLICIES = ("keep", "recompute", "offload", "auto")
# "keep" and "auto" record forwards with grad and replay a retained backward. On since
# tests/test_fast_forward_gpu.py::test_cuda_graphs_train_like_eager[*-keep / *-auto] passed on an H200
# (2026-11-28); False (a kill switch) runs those policies eagerly on CUDA.
KEEP_ON_CUDA = True
# "auto", when every layer keeps its activations and memory is still left: the frozen 4-bit weights of the
# layers are kept dequantised (the values every step dequantises anyway, held once) so the recorded steps
# launch no dequantisation. On since tests/test_fast_forward_gpu.py::test_cuda_graphs_auto_with_held_4bit_weights
# passed on an H200 and bench/run_train_step.py measured it (8B, bs 2 x 2048, same run: 15.72K tok/s held vs
# 14.92K not, the same first losses; peak 46.8 GiB vs 20.8: memory "auto" had left over). ON_CPU: tests,
# with the emulation.
RESIDENT_ON_CUDA = True
RESIDENT_ON_CPU = False
# "auto": the layers the planner does not keep have their inputs wait in pinned host memory until their
# backward, as "unsloth" / "offload" does for every layer (the same speed as recompute where measured: the
# copies overlap the layers), instead of each holding a GPU buffer: room for more kept layers. On CUDA since
# tests/test_fast_forward_gpu.py::test_cuda_graphs_auto_keeps_some_and_offloads_the_rest passed on an H200
# (8B, budget 16 GiB: 20 layers kept instead of 19, 13.20K vs 13.03K tok/s, same memory; 2026-11-28); on CPU
# it follows offload.ON_CPU (tests, with the emulation).
AUTO_OFFLOAD_ON_CUDA = True
_AUTO_RESERVE = 0.10  # "auto" without a budget: leave this fraction of the card free ...
_AUTO_RESERVE_MIN = 2 << 30  # ... and at least this much (the loss, optimizer and allocator slack)


def plan_keep(policy: str, n: int, layer_bytes, budget=None, mem_info=None, input_bytes: int = 0,
              offload_rest: bool = False, in_use: int = 0) -> list:
    """Which layers keep their activations (True) instead of recomputing them.

    "auto": keep the first ``k`` layers, as many as fit in usable memory: with a ``budget`` (bytes, an int,
    or a fraction of the card, a float <= 1: the process's whole memory on the card) what it leaves beside
    the ``in_use`` bytes (allocated: weights, adapters, ...; and gradients still to come), by default the
    free memory minus 10% of the card (at least 2 GiB); either way less two layers' worth for the recompute
    temporaries and the layer-input buffers still to be allocated (``input_bytes`` each: one per layer and
    the output, or with ``offload_rest`` one per kept layer plus a ring of _RING, the other layers' inputs
    waiting in host memory). ``mem_info``: (free, total) bytes, as ``torch.cuda.mem_get_info()``; without it (or without
    ``layer_bytes``) nothing is kept.
    """
    if policy == "keep":
        return [True] * n
    if policy != "auto" or not layer_bytes or mem_info is None:
        return [False] * n
    usable = _usable(layer_bytes, budget, mem_info, in_use)
    if offload_rest:  # a kept layer costs its activations and its own input buffer
        k = (usable - (_RING + 2) * input_bytes) // (layer_bytes + input_bytes)
    else:  # every layer's input has a buffer anyway
        k = (usable - (n + 3) * input_bytes) // layer_bytes
    k = max(0, min(n, int(k)))
    return [i < k for i in range(n)]


def _pending_grad_bytes(params: list, arena: "_Arena") -> int:
    """Bytes the first recorded step has yet to allocate for the gradients of ``params`` (per layer, a list):
    the graphs' gradient buffers (those the arena does not hold yet from another batch shape) and each
    ``.grad`` autograd fills from them (not yet there). An optimizer's state comes on top (not counted:
    which optimizer follows is not known here)."""
    total, k = 0, 0
    for ps in params:
        for j, p in enumerate(ps):
            nbytes = p.numel() * p.element_size()
            held = arena.holds(("g", k + j), p.numel(), p.dtype, p.device)
            total += (0 if held else nbytes) + (nbytes if p.grad is None else 0)
        k += len(ps)
    return total


def _say_if_short(budget, total: int, need: int) -> None:
    """Tell the user (once per budget) when an explicit "auto" budget is below ``need``: what the step holds
    with no layer keeping its activations (plan_keep's count: in use, the gradients still to come, two
    layers' recompute temporaries and the layer-input buffers)."""
    limit = _budget_bytes(budget, total)
    if limit < need:
        say_once(f"budget-short-{limit}", f"memory planner: the budget of {limit / 2**30:.2f} GiB is less than this "
                 f"step needs with no layer keeping its activations (~{need / 2**30:.2f} GiB: weights and adapters, "
                 "their gradients, two layers' recompute temporaries, the layer-input buffers), so the process "
                 "will hold more than the budget; raise memory_budget, or lower the batch size or sequence length")


def _buffer_bytes(keep: list, input_bytes: int, offloaded: bool) -> int:
    """GPU bytes of a graph set's layer inputs and gradient ping-pong (plan_keep's accounting)."""
    return ((sum(keep) + _RING + 2) if offloaded else (len(keep) + 3)) * input_bytes


def _usable(layer_bytes: int, budget, mem_info, in_use: int = 0) -> float:
    """Bytes the "auto" planner may fill (see plan_keep), two layers' recompute temporaries set aside."""
    free, total = mem_info
    if budget is None:
        return free - max(_AUTO_RESERVE * total, _AUTO_RESERVE_MIN) - 2 * layer_bytes
    return min(free, _budget_bytes(budget, total) - in_use) - 2 * layer_bytes


def _budget_bytes(budget, total: int):
    """A memory budget in bytes: ``budget`` bytes (an int), or that fraction of the card's ``total`` (a float <= 1)."""
    return budget * total if isinstance(budget, float) and budget <= 1.0 else int(budget)


def plan_spare(policy: str, keep: list, layer_bytes, budget=None, mem_info=None, input_bytes: int = 0,
               offloaded: bool = False, in_use: int = 0) -> int:
    """Bytes of the "auto" budget (as :func:`plan_keep` counts it) left after the kept layers' activations
    and the input buffers (``offloaded``: some layers' inputs wait in host memory); 0 for other policies or
    without the numbers."""
    if policy != "auto" or not layer_bytes or mem_info is None:
        return 0
    used = sum(keep) * layer_bytes + _buffer_bytes(keep, input_bytes, offloaded)
    return max(0, int(_usable(layer_bytes, budget, mem_info, in_use) - used))


def _host_has_room(nbytes: int) -> bool:
    """Whether ``nbytes`` more of page-locked host memory leaves the machine its reserve (offload.py's rule)."""
    from .offload import _meminfo, host_reserve

    available, total = _meminfo()
    return available < 0 or available - nbytes >= host_reserve(total)


class HostMemoryShort(Exception):
    """A graph set's page-locked host copies of offloaded layer inputs would leave the machine less than its
    reserve (run_stack then runs that batch shape without graphs)."""

    def __init__(self, nbytes: int):
        super().__init__(f"{nbytes / 2**30:.1f} GiB of page-locked host memory")
        self.nbytes = nbytes


def _pinned_bytes(nbytes: int, emulate: bool) -> int:
    """Host memory a buffer of ``nbytes`` takes: torch's page-locked allocator rounds up to a power of two."""
    return nbytes if emulate or nbytes <= 0 else 1 << (nbytes - 1).bit_length()


class _Arena:
    """Static buffers shared by every graph set of one model.

    Only one set runs at a time, so the layer inputs, the gradient ping-pong, the host copies and the
    parameter gradients of every captured batch shape live in the same memory, sized for the largest
    shape (at least ``min_numel`` elements, e.g. batch x max_seq_length x hidden). Growing a buffer
    bumps ``generation``: sets recorded against the old memory are dropped (run_stack).
    """

    def __init__(self):
        self.flat: dict = {}
        self.generation = 0
        self.forwards = 0  # stack forwards run through any set: one backward may follow each

    def holds(self, name, numel: int, dtype, device) -> bool:
        """Whether ``view(name, ...)`` of ``numel`` elements would reuse a buffer already allocated."""
        buf = self.flat.get((name, dtype, str(device)))
        return buf is not None and buf.numel() >= numel

    def view(self, name, shape, dtype, device, min_numel: int = 0, pin: bool = False) -> torch.Tensor:
        n = int(math.prod(shape))
        key = (name, dtype, str(device))
        buf = self.flat.get(key)
        if buf is None or buf.numel() < n:
            if buf is not None:
                self.generation += 1
            buf = torch.empty(max(n, min_numel), dtype=dtype, device=device, pin_memory=pin)
            self.flat[key] = buf
        return buf[:n].view(tuple(shape))


class GraphSet:
    """Forward and backward graphs of every decoder layer for one batch shape.

    Static buffers come from the model's :class:`_Arena`. ``offload=False``: each layer input ``x[l]``
    has its own GPU buffer (what checkpointing keeps). ``offload=True`` (``use_gradient_checkpointing=
    "unsloth"`` / ``"offload"``): layer inputs pass through a ring of three GPU slots; after the forward
    graph that produces ``x[l]``, a side stream copies it to pinned host memory while the next layers
    run, and the backward copies it back one layer ahead of its graph. GPU memory for checkpoints drops
    from ``L + 1`` activations to three. Every graph writes its results into arena buffers (a copy
    kernel each), so the graphs' own memory pool holds only temporaries, shared by all sets.
    """

    def __init__(self, make_run_layer, layers, x_example: torch.Tensor, autocast, emulate: bool, policy: str,
                 arena: _Arena, pool=None, min_numel: int = 0, budget=None, inputs=None, hold_weights=None,
                 offload_rest: bool = False, reserve=None, stream=None, warm_in_pool: bool = False):
        self.layers, self.autocast, self.emulate = list(layers), autocast, emulate
        # per-call attention inputs (positions, masks, sequence starts): this set's own static copies,
        # refilled before every replay (set_inputs); the layers read them through run_layer. Not in the shared
        # arena: their sizes follow the batch length, and a longer batch growing a shared buffer would drop
        # every recorded shape (padding-free rows re-recorded step after step until the capture limit). The
        # price: a mask ([rows, 1, T, T], only for sliding windows shorter than the batch, or packed rows
        # without varlen attention) is held once per recorded shape
        self.inputs = {k: torch.empty_like(v) for k, v in (inputs or {}).items()}
        self.set_inputs(inputs or {})
        self.run_layer = make_run_layer(self.inputs)
        if policy not in POLICIES:
            raise ValueError(f"checkpointing policy {policy!r}: one of {POLICIES}")
        self.policy = policy
        self.params = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layers]
        self.param_slots = [_slots(layer) for layer in self.layers]  # (module, name) of each, same order
        self.param_views = _param_views()
        self.flat_params = [p for ps in self.params for p in ps]
        self._slots = Slots(grad_flags=True, buffers=True)
        self.ptrs = self.current_ptrs()
        n = len(self.layers)
        shape, dt, dev = tuple(x_example.shape), x_example.dtype, x_example.device
        self.used = [None] * n  # per layer: which parameters got a gradient at capture
        self.saved = [None] * n  # kept layers: (input, output) of the recorded forward, whose graph holds
        # activations one kept layer holds and the segments the warm-up's temporaries took (CUDA), else None
        self.layer_bytes, self.scratch = self._warm_up(x_example, pool if warm_in_pool else None, stream)
        if not emulate:
            # the warm-up ran on a stream of its own (unless in the pool), and the allocator keeps what was
            # freed there for that stream alone: given back now, before the planner reads the free memory and
            # the capture takes its pool, instead of staying reserved for the rest of the run (one layer's
            # temporaries per captured shape). cuBLAS also keeps a workspace per stream (32 MiB each on Hopper, two with
            # cuBLASLt's) that no free gives back: dropped too (the main stream's comes back at its next matmul)
            _clear_cublas_workspaces()
            torch.cuda.empty_cache()
            if reserve is not None and self.scratch is not None:
                reserve(*self.scratch)  # before the planner reads the free memory
        mem_info = None if emulate else _free_memory()
        # weights, adapters, ...: inside a budget; and what the first step has yet to allocate for gradients
        in_use = 0 if emulate else torch.cuda.memory_allocated() + _pending_grad_bytes(self.params, arena)
        numel = max(x_example.numel(), min_numel)
        input_bytes = numel * x_example.element_size()  # an arena buffer's size
        # "auto": the layers it does not keep wait in host memory until their backward (instead of on the
        # GPU), when offloading is available here and the host has the room
        rest = offload_rest and policy == "auto" and _host_has_room(n * _pinned_bytes(input_bytes, emulate))
        self.keep = plan_keep(policy, n, self.layer_bytes, budget, mem_info, input_bytes, rest, in_use)
        self.offloaded = [(policy == "offload" or rest) and not kept for kept in self.keep]
        # the host copies still to take ("offload"), checked like the eager offload's pool: page-locked memory
        # cannot be swapped, and the kernel's out-of-memory killer would end the process without a word
        host_need = sum(_pinned_bytes(input_bytes, emulate) for i, off in enumerate(self.offloaded)
                        if off and not arena.holds(("h", i), numel, dt, "cpu"))
        if host_need and not _host_has_room(host_need):  # before any buffer is taken
            raise HostMemoryShort(host_need)
        if policy == "auto" and budget is not None and mem_info is not None and self.layer_bytes:
            none_kept = in_use + 2 * self.layer_bytes + _buffer_bytes([False] * n, input_bytes, rest)
            _say_if_short(budget, mem_info[1], none_kept)
        # layer inputs: a GPU buffer each for layers that are not offloaded (a kept layer's graph reads its
        # input in backward), a ring of _RING slots for the offloaded ones (and for the stack's output after one)
        ring = [arena.view(("xr", j), shape, dt, dev, min_numel) for j in range(_RING)] if any(self.offloaded) else []
        self.xs = [ring[i % _RING] if (self.offloaded[i] if i < n else self.offloaded[n - 1])
                   else arena.view(("x", i), shape, dt, dev, min_numel) for i in range(n + 1)]
        self.dbuf = [arena.view(("d", i), shape, dt, dev, min_numel) for i in range(2)]
        self.gbuf, k = [], 0
        for ps in self.params:
            self.gbuf.append([arena.view(("g", k + j), p.shape, p.dtype, p.device) for j, p in enumerate(ps)])
            k += len(ps)
        self.side = None
        if any(self.offloaded):
            self.host = [arena.view(("h", i), shape, dt, "cpu", min_numel, pin=not emulate) if off else None
                         for i, off in enumerate(self.offloaded)]
            self.side = None if emulate else torch.cuda.Stream()
            self.slot_free = [None] * _RING  # event: the slot's last offload copy has finished
            self.ready = [None] * n  # event: host[l] is back in its slot
        self.arena, self.arena_generation = arena, arena.generation
        # everything kept and memory left: hold the frozen weights dequantised (before capture: the graphs
        # then read them instead of dequantising); hold_weights(dtype, spare bytes) -> held or not
        self.resident = False
        if hold_weights is not None and all(self.keep) and (RESIDENT_ON_CPU if emulate else RESIDENT_ON_CUDA):
            dtype = autocast["dtype"] if autocast["enabled"] else x_example.dtype
            self.resident = hold_weights(dtype, plan_spare(policy, self.keep, self.layer_bytes, budget, mem_info,
                                                           input_bytes, any(self.offloaded), in_use))
        self.fwd = [_capture(lambda i=i: self._forward(i), pool, emulate, f"the forward of layer {i}", stream)
                    for i in range(n)]
        self.bwd = [_capture(lambda i=i: self._backward(i), pool, emulate, f"the backward of layer {i}", stream)
                    for i in reversed(range(n))]
        self.flat_grads = [b if used else None for i in range(n) for b, used in zip(self.gbuf[i], self.used[i])]
        self.dx = self.dbuf[n % 2]

    def set_inputs(self, inputs: dict) -> None:
        for k, v in inputs.items():
            self.inputs[k].copy_(v)

    def close(self) -> None:
        """Before the set is dropped: the main stream waits for pending host copies on the side stream."""
        if self.side is not None:
            torch.cuda.current_stream().wait_stream(self.side)

    def current_ptrs(self) -> tuple:
        """Where every tensor the graphs read lives: all parameters and buffers of the layers (frozen 4-bit
        storage included: moving the model re-allocates it) and whether each parameter trains. Read every
        step through cached slots (velotune.models.pointers: ~0.15 ms instead of ~6 ms at 8B)."""
        return self._slots.read(self.layers)

    def input_of(self, i: int) -> torch.Tensor:
        """The static GPU buffer that holds layer ``i``'s input (``i == len(layers)``: the output)."""
        return self.xs[i]

    def _run_with_grad(self, i: int, xr: torch.Tensor):
        """Layer ``i`` on ``xr`` with grad, for a recorded backward: (output, the tensors to differentiate for
        its parameter gradients). With param views (PARAM_VIEWS) those are views of the parameters made here
        (the layer reads them in place of its parameters): a gradient taken at a parameter itself goes through
        its AccumulateGrad node, whose stream is the one it was created on; when something keeps that node alive
        from an earlier step (DDP stashes every one at wrapping; a loss of an eager step still referenced), that
        is the default stream, and autograd's wait on it from the capturing stream invalidates the capture."""
        layer, params = self.layers[i], self.params[i]
        if not self.param_views:
            with torch.autocast(**self.autocast):
                return self.run_layer(layer, xr), params
        views = [p.view_as(p) for p in params]
        with _reading(self.param_slots[i], views), torch.autocast(**self.autocast):
            return self.run_layer(layer, xr), views

    def _forward(self, i: int):
        if self.keep[i]:  # record with grad: the layer's saved activations live in the graph's pool
            with torch.enable_grad():
                xr = self.input_of(i).detach().requires_grad_(True)
                out, targets = self._run_with_grad(i, xr)
            self.saved[i] = (xr, out, targets)
            self.input_of(i + 1).copy_(out.detach())
            return ()
        with torch.no_grad(), torch.autocast(**self.autocast):
            self.input_of(i + 1).copy_(self.run_layer(self.layers[i], self.input_of(i)))
        return ()

    def _backward(self, i: int):
        n = len(self.layers)
        src, dst = self.dbuf[(n - 1 - i) % 2], self.dbuf[(n - i) % 2]
        if self.keep[i]:  # no recompute: backward through the graph the forward recorded
            xr, out, targets = self.saved[i]
            grads = torch.autograd.grad(out, [xr] + targets, grad_outputs=src, allow_unused=True,
                                        retain_graph=not self.emulate)  # replayed every step on CUDA
            if self.emulate:
                self.saved[i] = None
            return self._store_grads(i, dst, grads)
        with torch.enable_grad():
            xr = self.input_of(i).detach().requires_grad_(True)
            with recompute.for_backward():  # the recomputed output only roots this backward
                out, targets = self._run_with_grad(i, xr)
            grads = torch.autograd.grad(out, [xr] + targets, grad_outputs=src, allow_unused=True)
        return self._store_grads(i, dst, grads)

    def _store_grads(self, i: int, dst, grads):
        dst.copy_(grads[0])
        for buf, g in zip(self.gbuf[i], grads[1:]):
            if g is not None:
                buf.copy_(g)
        self.used[i] = [g is not None for g in grads[1:]]
        return ()

    # -- one step ------------------------------------------------------------------------------
    def run_forward(self, x0: torch.Tensor) -> torch.Tensor:
        n = len(self.layers)
        self.input_of(0).copy_(x0)
        for i in range(n):
            if self.offloaded[i]:
                self._offload(i)  # x[i] to the host while layer i runs
            if self.offloaded[min(i + 1, n - 1)]:
                self._wait_slot_free(i + 1)  # layer i overwrites the ring slot of x[i - 2]
            self.fwd[i].replay()
        return self.input_of(n).clone()

    def run_backward(self, dy: torch.Tensor) -> None:
        n = len(self.layers)
        self.dbuf[0].copy_(dy)
        if self.offloaded[n - 1]:
            self._fetch(n - 1)
        for j, r in enumerate(self.bwd):
            i = n - 1 - j
            if self.offloaded[i]:
                if i > 0 and self.offloaded[i - 1]:
                    self._fetch(i - 1)  # one layer ahead, into a slot layer i does not read
                self._wait_ready(i)
            r.replay()

    def _offload(self, i: int) -> None:
        self.slot_free[i % _RING] = self._side_copy(self.host[i], self.input_of(i))

    def _fetch(self, i: int) -> None:
        # after the slot's previous reader (the backward graph of layer i + 3), queued on the main stream
        self.ready[i] = self._side_copy(self.input_of(i), self.host[i])

    def _side_copy(self, dst: torch.Tensor, src: torch.Tensor):
        """``dst <- src`` on the side stream after everything queued so far on the main stream; returns the
        event that marks its end (None in emulation, where the copy is done at once)."""
        if self.side is None:
            dst.copy_(src)
            return None
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.side)
        return ev

    def _wait_slot_free(self, i: int) -> None:
        _wait(self.slot_free, i % _RING)

    def _wait_ready(self, i: int) -> None:
        _wait(self.ready, i)

    def _warm_up(self, x0: torch.Tensor, pool=None, stream=None) -> tuple:
        """Run every piece eagerly once, exactly as it will be captured (the no-grad forward and the
        recompute + backward), so each kernel variant is compiled and each library plan built before
        capture: nothing may load a module or allocate a library workspace while capturing. Returns (the
        bytes one layer's activations hold when kept, (bytes of segments the warm-up cut, bytes of them still
        allocated at its end)); (None, None) in emulation.

        Where it runs: with ``pool`` (a sized pool, RESERVE_POOL) on the captures' ``stream``, allocating from
        that pool (WARM_UP_IN_POOL), whose free blocks the capture then reuses; otherwise on a new stream of its
        own, from the default pool."""
        if self.emulate:
            return None, None
        # the default pool's free cache goes first, so the warm-up's own segments do not come on top of it (the
        # peak reserved memory of a capturing step); they are new segments of a new stream, so what they add to
        # the reserved memory is the high-water mark of the warm-up's temporaries (the pool's need, reserve)
        torch.cuda.empty_cache()
        reserved, allocated = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
        routed = pool is not None and stream is not None and WARM_UP_IN_POOL and _can_route()
        side = stream if routed else torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        layer_bytes = None
        with torch.cuda.stream(side), (_allocating_in(pool) if routed else contextlib.nullcontext()):
            for _ in range(_WARMUP_STEPS):
                x = x0
                for i, layer in enumerate(self.layers):
                    with torch.no_grad(), torch.autocast(**self.autocast):
                        nxt = self.run_layer(layer, x)
                    with torch.enable_grad(), recompute.for_backward():  # as a recorded backward will run it
                        xr = x.detach().requires_grad_(True)
                        before = torch.cuda.memory_allocated()
                        out, targets = self._run_with_grad(i, xr)
                        if layer_bytes is None:  # what keeping this layer's activations costs
                            layer_bytes = torch.cuda.memory_allocated() - before
                        torch.autograd.grad(out, [xr] + targets, grad_outputs=torch.ones_like(out), allow_unused=True)
                    x = nxt  # the forward's output (a recompute's skips the MLP's down projection)
            del x, nxt, out, targets, xr
        torch.cuda.current_stream().wait_stream(side)
        # (bytes cut for the warm-up, bytes of them still held at its end: cuBLAS' workspaces of the stream)
        scratch = (torch.cuda.memory_reserved() - reserved, max(0, torch.cuda.memory_allocated() - allocated))
        return layer_bytes, scratch


def reservation_bytes(scratch: int, kept: int, tokens: int, expect: int) -> int:
    """Bytes to give the graphs' pool before its first capture, for batches of up to ``expect`` tokens, from a
    warm-up at ``tokens`` that cut ``scratch`` bytes of segments and still held ``kept`` of them at its end:
    the temporaries scale with the tokens, the held part (cuBLAS' workspaces, which the capture's stream takes
    in the pool too) does not. A batch already the longest expected (or none expected) gets what its own
    warm-up took, which the warm-ups of shorter batches then fit in as well."""
    if scratch <= kept:
        return 0
    return int((scratch - kept) * max(expect, tokens) / tokens) + kept


def _reserve_pool(pool, nbytes: int, stream=None):
    """One free segment of ``nbytes`` in the graphs' memory ``pool``: taken and freed inside a capture on
    ``stream`` (the way a graph's temporaries are), so the allocator keeps it in the pool for the captures (and
    warm-ups) on that stream that follow, which split their temporaries from it. Returns the (empty) graph,
    which keeps the pool alive while held."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=CAPTURE_ERROR_MODE):
        block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        block[:1].zero_()  # one node: an empty graph draws torch's warning
        del block
    return graph


_ROUTING = ("_cuda_beginAllocateToPool", "_cuda_endAllocateToPool", "_cuda_releasePool")


def _can_route() -> bool:
    """Whether this torch has the private bindings that route allocations into a graphs' pool outside a capture
    (those its CUDA-graph trees warm up with); without them the warm-up stays in the default pool."""
    return all(hasattr(torch._C, name) for name in _ROUTING)


@contextlib.contextmanager
def _allocating_in(pool):
    """Within: the process's CUDA allocations come from the graphs' memory ``pool`` (held alive by its graphs:
    what is freed here stays in it for the captures). Only around a warm-up, which nothing else runs beside."""
    begin, end, release = (getattr(torch._C, name) for name in _ROUTING)
    device = torch.cuda.current_device()
    begin(device, pool)
    try:
        yield
    finally:
        end(device, pool)
        release(device, pool)  # begin counted one more user of the pool


def loss_scratch(model):
    """A context factory for the training loss of ``model``'s step, or None: within the context, the current
    stream is the captures' stream (which first waits for the current one, and which the current one waits for
    after) and allocations come from the graphs' pool (LOSS_IN_POOL). Allocate what outlives the context before
    entering it; only temporaries may be allocated within, and nothing allocated within may be read after it:
    the next replay writes over those blocks. Only after a forward whose stack replayed graphs: its loss's
    temporaries (a few rows x hidden size, one chunk of logits) are then smaller than what the pool holds for its
    layers (rows x intermediate size); those of a batch that ran eagerly (longer than any recorded, e.g. past
    AUTO_MAX_TOKENS) would grow the pool for good."""
    st = model.__dict__.get("_velotune_graphs")
    if (not LOSS_IN_POOL or st is None or not st.replayed or st.pool is None or st.stream is None
            or not st.reserved or not st.reserved[2] or not _can_route()):
        return None
    return functools.partial(_scratch, st.pool, st.stream)


@contextlib.contextmanager
def _scratch(pool, stream):
    main = torch.cuda.current_stream()
    stream.wait_stream(main)
    try:
        with torch.cuda.stream(stream), _allocating_in(pool):
            yield
    finally:
        main.wait_stream(stream)


def _clear_cublas_workspaces() -> None:
    """Free the workspaces cuBLAS holds per (handle, stream) through torch's allocator (torch's own private
    call, as its CUDA-graph trees use it; absent from CPU builds and possibly renamed: then nothing is freed,
    which only costs the memory)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def _slots(layer) -> list:
    """(module, attribute name) of each trainable parameter of ``layer``, in ``layer.parameters()`` order."""
    out = []
    for name, p in layer.named_parameters():
        if p.requires_grad:
            prefix, _, attr = name.rpartition(".")
            out.append((layer.get_submodule(prefix) if prefix else layer, attr))
    return out


@contextlib.contextmanager
def _reading(slots: list, tensors: list):
    """Within: each module in ``slots`` reads the given tensor as that parameter (its ``_parameters`` entry
    swapped, as torch.func.functional_call does); the parameters are put back after, whatever happens."""
    saved = [m._parameters[a] for m, a in slots]
    try:
        for (m, a), t in zip(slots, tensors):
            m._parameters[a] = t
        yield
    finally:
        for (m, a), p in zip(slots, saved):
            m._parameters[a] = p


def _wait(events: list, k: int) -> None:
    """The main stream waits for ``events[k]`` (a side-stream copy), once."""
    if events[k] is not None:
        torch.cuda.current_stream().wait_event(events[k])
        events[k] = None


def _free_memory() -> tuple[int, int]:
    """(free, total) bytes of the current GPU, counting memory the caching allocator holds unused as free."""
    free, total = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated(), total


class _StackFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gs: GraphSet, x0, *params):
        out = gs.run_forward(x0)
        gs.arena.forwards += 1  # every set shares the arena's buffers: any later forward overwrites them
        ctx.gs, ctx.forward_id = gs, gs.arena.forwards
        return out

    @staticmethod
    def backward(ctx, dy):
        gs = ctx.gs
        if ctx.forward_id != gs.arena.forwards:
            raise RuntimeError(
                "velotune CUDA graphs: a second forward ran before this backward and overwrote the "
                "layers' saved inputs. Call backward() after each training forward, or turn graphs "
                "off for this model: velotune.set_cuda_graphs(model, False)")
        gs.run_backward(dy)
        dx = gs.dx.clone() if ctx.needs_input_grad[1] else None
        return (None, dx, *gs.flat_grads)


class _State:
    def __init__(self, mode):
        self.mode = mode
        self.sets: "collections.OrderedDict[tuple, GraphSet]" = collections.OrderedDict()
        self.captures = 0
        self.recorded: set = set()  # keys of every shape ever recorded ("auto" stops at _MAX_CAPTURES of them)
        self.broken: Optional[str] = None
        self.arena = _Arena()
        self.pool = None  # one CUDA graph memory pool for every set (temporaries only)
        # once the pool's first capture was considered for sizing (RESERVE_POOL): (the graph that keeps the
        # reservation or None, its bytes, whether later warm-ups run in the pool)
        self.reserved = None
        self.stream = None  # the stream every capture (and, in a sized pool, its warm-up) runs on
        # whether the latest forward's stack ran through graphs (loss_scratch): the decoder clears it before each
        # forward's stack, run_stack sets it when it replays
        self.replayed = False
        self.memory_budget = None  # the "auto" planner's budget (plan_keep)
        self.resident: list = []  # frozen weights held dequantised for the recorded steps (GraphSet.resident)
        self.no_room: set = set()  # keys of shapes whose host copies did not fit (HostMemoryShort): eager

    def __deepcopy__(self, memo):
        return _State(self.mode)  # a copied model records its own graphs (CUDA graphs cannot be copied)

    def __getstate__(self):
        return {"mode": self.mode}

    def __setstate__(self, state):
        self.__init__(state["mode"])


def _release(st: _State) -> None:
    """Give back what the graphs held (sets, shared buffers, the pool) once they will not run again: a
    failed capture otherwise keeps its buffers and pool reserved for the rest of the run (18 GiB on
    the 8B step)."""
    for gs in st.sets.values():
        gs.close()
    st.sets.clear()
    st.arena, st.pool, st.reserved, st.stream = _Arena(), None, None, None
    release_weights(st)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _hold(st: _State, bases: list, dtype: torch.dtype, spare: int) -> bool:
    """Hold ``bases`` dequantised to ``dtype`` if they fit in ``spare`` bytes (those already held count as
    fitting); the state remembers them for release. Said once per state."""
    held = {id(b) for b in st.resident}
    need = sum(math.prod(b.weight_shape) * dtype.itemsize for b in bases if id(b) not in held)
    if need > spare:
        return False
    for b in bases:
        b.hold(dtype)
    st.resident = list({id(b): b for b in st.resident + list(bases)}.values())
    if need:
        say(f"memory planner: every layer keeps its activations and {spare / 2**30:.1f} GiB is left: the frozen "
            f"4-bit weights stay dequantised ({need / 2**30:.1f} GiB), so steps skip their dequantisation")
    return True


def release_weights(st: _State) -> None:
    """Drop the dequantised copies the state's graphs held (GraphSet.resident)."""
    for base in st.resident:
        base.release()
    st.resident = []


def state_of(model) -> _State:
    """The model's graph state (mode, captured sets); created on first use."""
    st = model.__dict__.get("_velotune_graphs")
    if st is None:
        st = model.__dict__["_velotune_graphs"] = _State("auto")
    return st


def check_memory_budget(budget) -> None:
    """Raise a VelotuneError naming the fix unless ``budget`` is one set_memory_budget takes: None, GiB (a
    number > 1) or a fraction of the card (<= 1)."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise VelotuneError(f"memory budget {budget!r}: give GiB (a number > 1, e.g. 40) or a fraction of the card "
                            "(<= 1, e.g. 0.8), or None for most of the free memory")


def set_memory_budget(model, budget) -> None:
    """The GPU memory a ``use_gradient_checkpointing="auto"`` training step may use in all, weights and
    adapters included: GiB (a number > 1) or a fraction of the card (<= 1); the planner keeps as many
    layers' activations as fit beside what is already allocated. None: keep what fits in the free memory
    minus 10% of the card (at least 2 GiB). Applies to the next capture (graphs are recorded again)."""
    check_memory_budget(budget)
    if budget is not None:
        budget = int(budget * 2**30) if budget > 1 else float(budget)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    st = state_of(base)
    release_weights(st)
    new = _State(st.mode)
    new.memory_budget = budget
    base.__dict__["_velotune_graphs"] = new


def set_cuda_graphs(model, mode) -> None:
    """CUDA graphs for the decoder layers of training steps: ``"auto"`` (default), ``True`` or ``False``.

    ``"auto"`` records each new batch shape at first sight, up to 8 shapes per model, then runs new
    shapes eagerly (a fixed shape, e.g. from ``pad_to_multiple_of``, gets graphs from step 1);
    ``True`` records every new shape (the 8 most recent are kept); ``False`` never (the eager fast
    forward; same numerics). Changing the mode drops captured graphs and their memory.
    Conditions and limits: ``velotune/models/graphs.py``.
    """
    if mode not in MODES:
        raise ValueError(f"set_cuda_graphs(mode={mode!r}): use 'auto', True or False")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "_velotune_fast" not in base.__dict__:
        raise ValueError("set_cuda_graphs: this model has no velotune fast forward (load it with FastLanguageModel)")
    old = base.__dict__.get("_velotune_graphs")
    if old is not None:
        release_weights(old)
    base.__dict__["_velotune_graphs"] = _State(mode)


def _reserver(st: _State, tokens: int, expect: int, policy: str = "recompute"):
    """GraphSet's ``reserve(scratch, kept)`` for a capture of ``tokens``: sizes the pool once, before its
    first capture (RESERVE_POOL), for batches of ``expect`` tokens; None where there is nothing to size (a pool
    already used, no pool, or a policy whose pool holds activations per set: "keep" / "auto")."""
    if not RESERVE_POOL or st.reserved is not None or st.pool is None or policy not in ("recompute", "offload"):
        return None

    def reserve(scratch: int, kept: int) -> None:
        nbytes = reservation_bytes(scratch, kept, tokens, expect)
        if expect <= tokens and not SIZE_FIXED_SHAPE_POOL:
            nbytes = 0  # its capture cuts what it needs; later (shorter) warm-ups still run in the pool
        st.reserved = (_reserve_pool(st.pool, nbytes, st.stream) if nbytes else None, nbytes, True)

    return reserve


def autocast_state(device_type: str) -> dict:
    """The current autocast settings, to re-enter them where a layer is recorded or recomputed."""
    on = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)
    # cache off: a cached cast made during capture would be a tensor the graph reads but nobody owns
    return {"device_type": device_type, "dtype": dtype, "enabled": on, "cache_enabled": False}


def run_stack(model, layers, x: torch.Tensor, make_run_layer, key_extra=(), check=lambda: True,
              policy: str = "recompute", max_tokens: int = 0, inputs=None, frozen_weights=None,
              offload_rest: bool = False, expect_tokens: int = 0) -> Optional[torch.Tensor]:
    """The stack's output through CUDA graphs, or None when the eager path should run.

    ``make_run_layer(static_inputs)`` returns the eager layer ``run_layer(layer, x)`` reading the
    per-call attention inputs from ``static_inputs`` (the set's own buffers, refilled from ``inputs``
    before every replay) and otherwise only tensors that live as long as the model (e.g. the cached
    RoPE tables); ``key_extra`` is anything else that decides which kernels a layer runs (the adapters'
    state, the attention layout); ``check()`` says whether every layer can be recorded,
    asked once before a capture; ``policy`` says how activations reach the backward (POLICIES);
    ``max_tokens`` sizes the shared buffers for the longest batch expected (batch x max_seq_length);
    ``frozen_weights()`` lists the layers' frozen 4-bit weights (``hold(dtype)`` / ``release()`` /
    ``weight_shape``), which "auto" may hold dequantised when memory is left (RESIDENT_ON_CUDA);
    ``offload_rest``: offloading is available, so "auto" may have the layers it does not keep wait in host
    memory (AUTO_OFFLOAD_ON_CUDA); ``expect_tokens``: the longest batch (rows x length) a trainer expects,
    which the pool is sized for at its first capture (RESERVE_POOL; 0: not known, sized for the first batch).
    """
    st = state_of(model)
    if st.mode is False or st.broken is not None:
        return None
    emulate = x.device.type != "cuda"
    if emulate and not EMULATE_ON_CPU:
        return None
    if policy in ("keep", "auto") and not emulate and not KEEP_ON_CUDA:
        return None
    if inputs and not emulate and not STATIC_INPUTS_ON_CUDA:
        return None
    ac = autocast_state(x.device.type)
    key = (tuple(x.shape), x.dtype, str(x.device), ac["enabled"], ac["dtype"], len(layers), policy, key_extra)
    gs = st.sets.get(key)
    if gs is not None and gs.current_ptrs() != gs.ptrs:
        st.sets.pop(key).close()  # parameters were replaced or (un)frozen: record again
        gs = None
    if gs is None:
        if key in st.no_room:
            return None
        if st.mode == "auto" and x.shape[0] * x.shape[1] > AUTO_MAX_TOKENS:
            say_once(f"graphs-long-{id(st)}", f"CUDA graphs: batches of more than {AUTO_MAX_TOKENS} tokens run "
                     "without graphs (no speed to gain at that size, and their memory pool would cost context "
                     "length); velotune.set_cuda_graphs(model, True) records them anyway")
            return None
        # the limit counts distinct shapes: one recorded before and dropped since (the shared buffers grew for a
        # longer batch, its parameters moved) is recorded again, not left eager as if it were new
        if st.mode == "auto" and key not in st.recorded and len(st.recorded) >= _MAX_CAPTURES:
            say_once(f"graphs-shapes-{id(st)}", "CUDA graphs: batch shapes keep changing, so new shapes run without "
                     "graphs; pad batches to a fixed length (e.g. pad_to_multiple_of) to get them")
            return None
        if not check():
            return None
        while len(st.sets) >= _MAX_SETS:
            st.sets.popitem(last=False)[1].close()
        t = time.perf_counter()
        if st.pool is None and not emulate:
            st.pool, st.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        if st.mode == "auto":
            # batches over AUTO_MAX_TOKENS run eager: shared buffers sized for a longer one would only hold
            # memory while that long batch needs it most (at max_seq_length 409,600 on the 8B shape: 16 GiB of
            # GPU ring and gradient buffers, and 31 x 4 GiB page-locked host buffers, none ever read)
            max_tokens = min(max_tokens, AUTO_MAX_TOKENS)
            expect_tokens = min(expect_tokens, AUTO_MAX_TOKENS)
        sizing = st.reserved is None
        try:
            hold = None if frozen_weights is None else (lambda dtype, spare: _hold(st, frozen_weights(), dtype, spare))
            gs = GraphSet(make_run_layer, layers, x.detach(), ac, emulate, policy, st.arena, st.pool,
                          min_numel=max_tokens * x.shape[-1], budget=st.memory_budget, inputs=inputs,
                          hold_weights=hold, offload_rest=offload_rest and (emulate or AUTO_OFFLOAD_ON_CUDA),
                          reserve=_reserver(st, x.shape[0] * x.shape[1], expect_tokens, policy), stream=st.stream,
                          warm_in_pool=bool(st.reserved and st.reserved[2]))
        except HostMemoryShort as e:  # this shape only, said once; the eager offload keeps its own host reserve
            st.no_room.add(key)
            say_once(f"graphs-host-{id(st)}", f"CUDA graphs: recording batch {tuple(x.shape[:2])} would take {e} "
                     "for the offloaded layer inputs and leave the machine less than its reserve, so batches "
                     "of that shape run without graphs (same results, slower). More host memory, or a smaller "
                     "max_seq_length (the graphs' host buffers are sized for it, up to "
                     f"{AUTO_MAX_TOKENS} tokens), records them")
            return None
        except Exception as e:  # noqa: BLE001 - any capture failure: say why, stay eager (same numerics)
            st.broken = f"{type(e).__name__}: {e}"
            say(f"CUDA graphs could not be captured ({st.broken[:300]}); training continues without them "
                "(same numerics, slower). Please report this with `velotune env`.")
        if st.broken is not None:  # outside the except: its traceback held the failed set's buffers
            _release(st)
            return None
        st.captures += 1
        st.recorded.add(key)
        for k in [k for k, other in st.sets.items() if other.arena_generation != st.arena.generation]:
            st.sets.pop(k).close()  # recorded against buffers the arena has since replaced
        st.sets[key] = gs
        kept = sum(gs.keep)
        rest = "have their inputs wait in host memory" if any(gs.offloaded) else "recompute"
        how = {"offload": "layer inputs offloaded to host memory", "recompute": "recompute checkpointing",
               "keep": "activations kept"}.get(policy, f"{kept} of {len(layers)} layers keep their activations, "
                                               f"the rest {rest} (memory planner)")
        sized = ""
        if st.reserved is None:
            st.reserved = (None, 0, False)  # this pool holds a capture's segments now: too late to size it
        elif sizing and st.reserved[0] is not None and expect_tokens > x.shape[0] * x.shape[1]:
            sized = (f"; their memory pool sized at {st.reserved[1] / 2**20:.0f} MiB for the longest batch expected, "
                     f"{expect_tokens} tokens")
        say(f"CUDA graphs: captured {len(layers)} layers for batch {tuple(x.shape[:2])} in "
            f"{time.perf_counter() - t:.1f} s ({how}{sized})")
    else:
        st.sets.move_to_end(key)
        gs.set_inputs(inputs or {})
    st.replayed = True
    return _StackFunction.apply(gs, x, *gs.flat_params)
