"""Fused linear cross-entropy: loss(softcap(hidden @ W.T), labels) without ever holding [N, V] logits.

Math, per token i with label y_i != ignore_index (labels are already shifted by the caller):
    z_i    = softcap * tanh((h_i @ W.T) / softcap)        (no softcap: z_i = h_i @ W.T)
    loss   = sum_i (logsumexp(z_i) - z_i[y_i]) / denom
    denom  = num_items_in_batch if given (the count over all micro-batches of a gradient-accumulation
             step, as HF's Trainer passes it), else the number of non-ignored tokens in this call;
             a zero denominator counts as 1, so an all-ignored batch gives loss 0 and zero grads.

How: the non-ignored rows are gathered first (responses-only SFT masks 30-70% of tokens: they cost no
matmul at all), then processed in chunks of rows. Per chunk, torch computes logits = h_c @ W.T in the
input dtype, one Triton program per row computes the fp32 logsumexp (online, in BLOCK_V slices), the
loss term, and overwrites the logits with d loss / d logits; then dh_c = dlogits @ W and, if W is
trainable, dW += dlogits.T @ h_c. All of this happens in FORWARD, so the backward only scales the
stored dh/dW by grad_output. Peak extra memory: one chunk of logits (budget below) + dh [N, H] (+ dW).

Numerics vs HF (`lm_head` in the model dtype, softcap in that dtype, then `.float()` and
F.cross_entropy): the logits and their gradient are rounded to the input dtype exactly where HF's
autograd rounds them; the kernel applies softcap in fp32 (HF: in bf16, three roundings). With a
trainable bf16 W, each chunk's dW product is rounded to bf16 once and the chunks are summed in fp32,
then rounded once (HF: one GEMM, one rounding). Syncs: two short host syncs per call (nonzero of the
label mask, label range; `valid_rows`, which a caller may run early: the decoder runs it before the layers).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from velotune.kernels._utils import next_power_of_2, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None

# One chunk's logits, counted at fp32 width (4 B) plus its rows of dh: 256 MiB. At V=128256, H=4096
# that is 384 rows (a bf16 buffer of 94 MiB), enough rows for the chunk matmuls to run at full speed.
CHUNK_BYTES = 256 * 2**20
# With a trainable W, dW's GEMM reduces over the chunk's tokens and rewrites the [V, H] accumulator
# each chunk: at 384 tokens it would move as many bytes as it computes (0.4 TFLOP = 0.6 ms on an H100
# vs 2-4 GiB of accumulator traffic = 0.6-1.3 ms), so chunks get 1 GiB: 1920 rows at V=128256.
CHUNK_BYTES_TRAINABLE_W = 1024 * 2**20
# 8192 vocab entries per slice: 16 KiB of bf16 per load, 16 warps each holding 16 fp32 values.
_MAX_BLOCK_V = 8192


def _softcap_torch(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return logits
    return torch.tanh(logits / softcap) * softcap  # HF Gemma-2's order: divide, tanh, multiply


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """F.cross_entropy(softcap(hidden @ weight.T).float(), labels, reduction="sum") / denom.

    Args:
        hidden: [N, H] (fp16/bf16/fp32; fp64 for an oracle). weight: [V, H], same dtype.
        labels: [N] int64, ignore_index marks tokens without a target.
        softcap: Gemma-2 final_logit_softcapping, applied in the input dtype as HF does.
        num_items_in_batch: denominator (int or 0-dim tensor); None means the count of labels != ignore_index.
    Returns:
        0-dim loss in fp32 (fp64 for fp64 inputs); 0 (not NaN) when every label is ignored.
    """
    logits = _softcap_torch(F.linear(hidden, weight), softcap)
    return _loss_from_logits(logits, labels, ignore_index, num_items_in_batch)


def _loss_from_logits(logits, labels, ignore_index, num_items) -> torch.Tensor:
    """HF's ForCausalLMLoss on shifted labels: upcast, summed cross-entropy, divided by the denominator."""
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / _denominator(num_items, (labels != ignore_index).sum(), total.dtype, total.device)


def _denominator(num_items, n_valid, dtype, device) -> torch.Tensor:
    """num_items_in_batch (or the valid count) as a tensor, with 0 replaced by 1."""
    d = torch.as_tensor(n_valid if num_items is None else num_items, device=device).to(dtype)
    return torch.where(d == 0, torch.ones_like(d), d)


if triton is not None:

    @triton.jit
    def _softcap_and_slope(x, softcap):
        """(z, dz/dx) for z = softcap * tanh(x / softcap).

        tanh(y) = s - sn and 1 - tanh(y)^2 = 4 s sn with s, sn = sigmoid(+-2y), each from one exp of a
        non-positive number: no overflow, and no cancellation in 1 - t^2 where tanh saturates (triton
        3.6 has no tl.tanh)."""
        y2 = (2.0 / softcap) * x
        e = tl.exp(-tl.abs(y2))
        big = 1.0 / (1.0 + e)
        small = e * big
        s = tl.where(y2 >= 0, big, small)
        sn = tl.where(y2 >= 0, small, big)
        return softcap * (s - sn), 4.0 * s * sn

    @triton.jit
    def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
        # one return statement: compiled Triton type-checks every return even under a constexpr if
        if HAS_SOFTCAP:
            x = _softcap_and_slope(x, softcap)[0]
        return x

    @triton.jit
    def _ce_rows_kernel(
        LOGITS, LABELS, LOSS, SCALE, stride_row, n_vocab, softcap,
        HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One row per program: LOSS[row] = lse - z[label]; with COMPUTE_GRAD the row of logits is
        overwritten by SCALE * d(lse - z[label]) / d logits. Labels are valid (gathered on the host)."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_row
        label = tl.load(LABELS + row).to(tl.int64)
        z_label = _capped(tl.load(base + label).to(tl.float32), softcap, HAS_SOFTCAP)
        # online logsumexp; any real logit is a valid start for the running max (z_label is one)
        m = z_label
        s = z_label * 0.0
        for v0 in range(0, n_vocab, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < n_vocab
            z = _capped(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(LOSS + row, lse - z_label)
        if COMPUTE_GRAD:
            scale = tl.load(SCALE)
            for v0 in range(0, n_vocab, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                mask = cols < n_vocab
                x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z, dz = _softcap_and_slope(x, softcap)
                    grad = (tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)) * dz
                else:
                    grad = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
                tl.store(base + cols, (grad * scale).to(LOGITS.dtype.element_ty), mask=mask)


def chunk_rows_for(n_vocab: int, hidden: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that rows * (V + H) * 4 B <= budget (fp32-width logits and dh of the chunk),
    rounded down to a multiple of 128 rows (the tensor-core tile) when that many fit."""
    rows = max(1, budget_bytes // (4 * (n_vocab + hidden)))
    return rows - rows % 128 if rows >= 128 else rows


def _launch_ce_rows(logits, labels, losses, scale, softcap, compute_grad):
    n_rows, n_vocab = logits.shape
    block_v = min(next_power_of_2(n_vocab), _MAX_BLOCK_V)
    _ce_rows_kernel[(n_rows,)](
        logits, labels, losses, scale, logits.stride(0), n_vocab, float(softcap or 0.0),
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v,
        num_warps=16 if block_v >= 8192 else (8 if block_v >= 2048 else 4),
    )


def valid_rows(labels, ignore_index, n_vocab):
    """(indices of non-ignored rows, their labels) of flat ``labels`` [N]; raises on a label outside
    [0, V). Two host syncs: nonzero sizes its output, and the range check reads min/max (an
    out-of-range label would otherwise read outside the logits row on the GPU). A caller may compute
    this early (before the GPU queue fills) and pass it to ``linear_cross_entropy(valid=)``."""
    idx = (labels != ignore_index).nonzero().squeeze(1)
    lab = labels.index_select(0, idx) if idx.numel() < labels.numel() else labels
    if idx.numel():
        lo, hi = torch.stack(torch.aminmax(lab)).tolist()
        if lo < 0 or hi >= n_vocab:
            raise ValueError(
                f"linear_cross_entropy: labels must be in [0, {n_vocab}) or ignore_index={ignore_index}; "
                f"got min {lo}, max {hi}"
            )
    return idx, lab.contiguous()


class _WeightGrad:
    """Accumulates dW = sum over chunks of dlogits_c^T @ h_c ([V, H]) for one forward.

    fp32/fp64 weights accumulate in place (addmm_). For 16-bit weights, each chunk's product (fp32
    accumulation inside the GEMM, one rounding) is added into an fp32 buffer, which is rounded once at
    the end: a bf16 running sum would be rounded once per chunk (CPU interpreter, 300 tokens in 38
    chunks: dW error 1.6x torch's with a bf16 running sum, 1.2x with fp32). One chunk skips the buffer.
    Memory for a 16-bit W over several chunks: fp32 [V, H] + one 16-bit [V, H] product (3 GiB at 8B).
    """

    def __init__(self, weight: torch.Tensor):
        self.dtype = weight.dtype
        self.acc: torch.Tensor | None = None
        self.tmp: torch.Tensor | None = None
        self.chunks = 0

    def add(self, dlogits: torch.Tensor, h_c: torch.Tensor) -> None:
        self.chunks += 1
        if self.acc is None:
            self.acc = torch.mm(dlogits.t(), h_c)
        elif self.dtype.itemsize >= 4:
            self.acc.addmm_(dlogits.t(), h_c)
        else:
            if self.acc.dtype != torch.float32:  # second chunk: move the running sum to fp32
                self.tmp, self.acc = self.acc, self.acc.float()
            self.acc.add_(torch.mm(dlogits.t(), h_c, out=self.tmp))

    def result(self) -> torch.Tensor:
        self.tmp = None
        return self.acc.to(self.dtype)


def _fused_forward(hidden, weight, labels, ignore_index, softcap, num_items, chunk_rows, need_dh, need_dw,
                   valid=None, scratch=None):
    """(loss fp32 0-dim, dh [N, H] or None, dW [V, H] or None); dh/dW are d loss / d input.

    ``scratch``: a context factory (graphs.loss_scratch) within which the chunks run and their temporaries are
    allocated; the outputs are allocated before it. Not used when the weight trains (its fp32 gradient buffers
    outlive the chunks)."""
    n, n_vocab = hidden.shape[0], weight.shape[0]
    idx, lab = valid if valid is not None else valid_rows(labels, ignore_index, n_vocab)
    n_valid = idx.numel()
    scale = 1.0 / _denominator(num_items, n_valid, torch.float32, hidden.device)
    if n_valid == 0:
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        return loss, (torch.zeros_like(hidden) if need_dh else None), (torch.zeros_like(weight) if need_dw else None)
    loss = torch.empty((), dtype=torch.float32, device=hidden.device)
    dh = None
    if need_dh:  # rows without a target get no gradient: zeros, unless every row has one
        full = n_valid == n
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if full else torch.zeros_like(hidden)
    dw = _WeightGrad(weight) if need_dw else None
    rows = min(chunk_rows or chunk_rows_for(n_vocab, hidden.shape[1],
                                            CHUNK_BYTES_TRAINABLE_W if need_dw else CHUNK_BYTES), n_valid)
    with (scratch() if scratch is not None and not need_dw else contextlib.nullcontext()):
        _chunks(hidden, weight, idx, lab, softcap, scale, rows, loss, dh, dw)
    return loss, dh, (dw.result() if need_dw else None)


def _chunks(hidden, weight, idx, lab, softcap, scale, rows, loss, dh, dw) -> None:
    """The chunked loop of _fused_forward: writes ``loss`` and ``dh`` (given), adds into ``dw``; every tensor it
    allocates is freed when it returns."""
    n, n_valid, n_vocab = hidden.shape[0], idx.numel(), weight.shape[0]
    h_sel = hidden.index_select(0, idx) if n_valid < n else hidden
    losses = torch.empty(n_valid, dtype=torch.float32, device=hidden.device)
    dh_sel = None
    if dh is not None:
        dh_sel = dh if n_valid == n else torch.empty(h_sel.shape, dtype=hidden.dtype, device=hidden.device)
    buf = torch.empty((rows, n_vocab), dtype=hidden.dtype, device=hidden.device)
    for s in range(0, n_valid, rows):
        e = min(s + rows, n_valid)
        h_c = h_sel[s:e]
        logits = torch.mm(h_c, weight.t(), out=buf[: e - s])
        _launch_ce_rows(logits, lab[s:e], losses[s:e], scale, softcap, compute_grad=dh is not None or dw is not None)
        if dh is not None:
            torch.mm(logits, weight, out=dh_sel[s:e])
        if dw is not None:
            dw.add(logits, h_c)
    loss.copy_(losses.sum() * scale)
    if dh is not None and n_valid < n:
        dh.index_copy_(0, idx, dh_sel)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """apply(hidden [N, H], weight [V, H], labels [N], ignore_index, softcap, num_items_in_batch,
    chunk_rows, valid, scratch) -> 0-dim fp32 loss (valid: ``valid_rows(labels, ...)`` computed earlier, or None;
    scratch: see linear_cross_entropy).
    Gradients are computed in forward; backward scales them in place,
    so it runs once per forward (no retain_graph re-run)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, num_items_in_batch, chunk_rows, valid=None,
                scratch=None):
        _check_args(hidden, weight, labels, softcap)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly
            loss, dh, dw = _fused_forward(
                hidden, weight, labels, ignore_index, softcap, num_items_in_batch, chunk_rows, need_dh, need_dw,
                valid, scratch,
            )
        ctx.save_for_backward(dh, dw)
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError(
                "linear_cross_entropy: backward ran twice on one forward; its gradients are precomputed "
                "and scaled in place. Recompute the loss instead of retain_graph=True."
            )
        ctx.backward_done = True
        dh, dw = ctx.saved_tensors
        if dh is not None:
            dh.mul_(grad_loss.to(dh.dtype))
        if dw is not None:
            dw.mul_(grad_loss.to(dw.dtype))
        return dh, dw, None, None, None, None, None, None, None


def _check_args(hidden, weight, labels, softcap):
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap={softcap!r} must be > 0, or None for no softcap")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if labels.shape != (hidden.shape[0],) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"linear_cross_entropy: labels must be int64 [{hidden.shape[0]}], "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.device != hidden.device or weight.device != hidden.device:
        raise ValueError(
            f"linear_cross_entropy: hidden ({hidden.device}), weight ({weight.device}) and labels "
            f"({labels.device}) must be on one device"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them "
            "(under autocast the public function does this for you)"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    return_logits: bool = False,
    chunk_rows: int | None = None,
    valid=None,
    scratch=None,
):
    """Causal-LM loss of `hidden @ weight.T` without materialising the logits.

    Args:
        hidden: [..., H] final-norm output; weight: [V, H] lm_head (frozen or trainable; its grad is
            formed only if it requires grad). labels: [...] matching hidden's leading dims, already
            shifted, ignore_index for no target.
        softcap: Gemma-2 final_logit_softcapping, or None.
        num_items_in_batch: divide the summed loss by this (HF Trainer's gradient-accumulation count);
            None divides by this call's non-ignored tokens.
        return_logits: the caller wants the logits: they are computed normally ([..., V], input dtype,
            softcapped) and the loss from them, unfused; returns (loss, logits).
        chunk_rows: rows per chunk; None sizes chunks from V and H to CHUNK_BYTES.
        valid: ``valid_rows(labels.reshape(-1), ignore_index, V)`` computed by the caller beforehand (its
            host syncs then happen where they cost nothing); None computes it here.
        scratch: where the chunks' temporaries go: a context factory, e.g. ``graphs.loss_scratch(model)`` (the
            CUDA graphs' memory pool between the forward's and the backward's replays); None: where the caller
            is. Ignored when the weight trains.
    Returns:
        0-dim fp32 loss, or (loss, logits) with return_logits. CUDA runs the fused kernel; elsewhere
        `linear_cross_entropy_reference`.
    """
    if torch.is_autocast_enabled(hidden.device.type):  # what autocast would do to lm_head's matmul
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    h2, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if return_logits:
        logits = _softcap_torch(F.linear(hidden, weight), softcap)
        return _loss_from_logits(logits, lab, ignore_index, num_items_in_batch), logits
    if use_triton(h2):
        return LinearCrossEntropyFunction.apply(
            h2, weight, lab, ignore_index, softcap, num_items_in_batch, chunk_rows, valid, scratch
        )
    return linear_cross_entropy_reference(h2, weight, lab, ignore_index, softcap, num_items_in_batch)
