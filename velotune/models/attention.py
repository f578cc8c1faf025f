"""Attention for the fast forward: causal, padded, sliding-window and packed (padding-free) batches.

Which path runs (decided once per forward call, :func:`plan_attention`):

- plain causal SDPA (``is_causal=True``; on CUDA torch's cuDNN backend first, see ``PREFER_CUDNN``): no
  padding, or right padding while training (exact for every labelled token);
- packed rows (position_ids restart inside a row: TRL's ``padding_free`` / ``packing`` collators) on
  CUDA: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention over cumulative sequence lengths;
  no [T, T] mask, attention never crosses an example boundary) when the installed torch has it and
  ``USE_VARLEN`` is on (the default; see below);
- everything else (left padding, eval with padding, sliding windows shorter than the sequence, packed
  rows on CPU or without varlen): SDPA with an explicit [B, 1, T, T] bool mask (exact; T^2 bytes).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from .._notices import say_once


def base_mask(attention_mask, t: int, device, training: bool):
    """None when plain causal attention is exact (no padding, or right padding while training);
    else a [B, 1, T, T] bool mask (True = may attend)."""
    if attention_mask is None:
        return None
    am = attention_mask.bool()
    if bool(am.all()):
        return None
    # Right padding in training: every query at a real position sees only earlier (real) keys under
    # causal masking, and padded positions carry no label, so causal attention is exact for the loss.
    # In eval the logits at padded positions are returned too, so they get HF's mask.
    if training and bool((am.int().diff(dim=1) <= 0).all()):
        return None
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return (causal[None] & am[:, None, :])[:, None]


def restarts(position_ids):
    """[B, T] bool, True where a new example starts inside a row (position != previous + 1); None if
    no row restarts (a plain, unpacked batch). One host sync."""
    if position_ids is None or position_ids.shape[1] < 2:
        return None
    r = torch.zeros_like(position_ids, dtype=torch.bool)
    r[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return r if bool(r.any()) else None


def packed_mask(restart, base, t: int, device):
    """Block-diagonal causal [B, 1, T, T] mask for packed rows (AND the padding mask, if any)."""
    seg = restart.long().cumsum(-1)  # example index of each token within its row
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    mask = (same & causal[None])[:, None]
    return mask if base is None else mask & base


def window_mask(mask, window: int, t: int, device):
    """AND a sliding-window band (key j visible to query i iff i - window < j <= i), as HF does."""
    i = torch.arange(t, device=device)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return band[None, None] if mask is None else (mask & band)


@functools.lru_cache(maxsize=1)
def _varlen():
    """(varlen_attn, kwargs asking it for causal attention, whether it takes ``enable_gqa``) or None.

    torch's varlen API changed between releases (2.11: ``is_causal``, no GQA flag; 2.13: ``window_size``
    and ``enable_gqa``); read the installed signature instead of guessing from the version.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    gqa = "enable_gqa" in params
    if "window_size" in params:
        return varlen_attn, {"window_size": (-1, 0)}, gqa
    if "is_causal" in params:
        return varlen_attn, {"is_causal": True}, gqa
    return None


class Segments:
    """Cumulative sequence lengths of a packed batch, flattened over rows (built once per forward)."""

    @classmethod
    def of(cls, cu, max_len: int) -> "Segments":
        """Offsets given directly (the CUDA-graph path: a static buffer padded with empty sequences, and
        an upper bound of the lengths)."""
        seg = cls.__new__(cls)
        seg.cu, seg.max_len = cu, int(max_len)
        return seg

    def __init__(self, restart):
        b, t = restart.shape
        starts = restart.clone()
        starts[:, 0] = True  # every row starts an example
        idx = starts.reshape(-1).nonzero().squeeze(1)
        self.cu = torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)
        self.max_len = int((self.cu[1:] - self.cu[:-1]).max())


# Packed rows on CUDA take varlen_attn when torch has it. Verified on the device (H200, torch 2.11,
# whose varlen_attn has no enable_gqa: the key/value heads are repeated):
# tests/test_fast_forward_gpu.py::test_packed_varlen_matches_padded, both paths. Tests flip this to
# compare the two paths; set it False to force the block-mask SDPA path.
USE_VARLEN = True


def varlen_available(device) -> bool:
    return USE_VARLEN and device.type == "cuda" and _varlen() is not None


def varlen_attention(q, k, v, segments: Segments, scale: float):
    """Causal attention within each packed example. q [B, Hq, T, D], k/v [B, Hk, T, D] -> [B, Hq, T, D]."""
    fn, causal, takes_gqa = _varlen()
    b, hq, t, d = q.shape
    extra = dict(causal)
    if hq != k.shape[1]:
        if takes_gqa:
            extra["enable_gqa"] = True
        else:  # older torch: give every query head its own copy of its key/value head
            k, v = (x.repeat_interleave(hq // x.shape[1], dim=1) for x in (k, v))
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]
    out = fn(*flat, segments.cu, segments.cu, segments.max_len, segments.max_len, scale=scale, **extra)
    return out.view(b, t, hq, d).transpose(1, 2)


# Causal SDPA on CUDA asks torch to try its cuDNN backend first (then flash, memory-efficient, math: the
# first whose constraints the call meets runs, as in torch's own dispatch). Measured on an H200 (torch 2.11,
# bench/kernels/attention.py, 8B attention shape, forward + backward): cuDNN 0.69 ms vs flash 1.35 ms at
# 2 x 2048, 908 vs 1510 ms at 1 x 131072, with less memory; its bf16 error against fp32 is the same size as
# flash's (GPU test test_sdpa_prefers_cudnn). torch's default order puts flash first. False: torch's order.
PREFER_CUDNN = True
# cuDNN indexes its tensors with 32-bit offsets: above this many elements per tensor, torch's order runs
_CUDNN_MAX_ELEMENTS = 2**31 - 1
# cuDNN builds an execution plan for each new shape (forward and backward: tens to hundreds of ms each,
# reported by other projects), cached for the process. Training batches padded to a few lengths (velotune's
# SFTTrainer does so whenever CUDA graphs train: 8 lengths, times the batch sizes an epoch's last batch and
# evaluation add) meet few shapes; a run of arbitrary lengths would pay a build per length, so past this many
# distinct shapes new ones take torch's order (said once).
CUDNN_MAX_SHAPES = 32
_cudnn_shapes: set = set()


@functools.lru_cache(maxsize=1)
def _cudnn_first():
    """The backend list for ``sdpa_kernel(..., set_priority=True)``, or None where torch's ``sdpa_kernel``
    has no priority order (before 2.6) or no cuDNN backend."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters or not hasattr(SDPBackend, "CUDNN_ATTENTION"):
        return None
    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefers_cudnn(q, k, mask) -> bool:
    """Whether :func:`sdpa` puts cuDNN first for this call: CUDA, causal (no explicit mask), every tensor
    under cuDNN's 32-bit indexing, a torch that takes a priority order, and a shape cuDNN has seen or one
    of the first ``CUDNN_MAX_SHAPES``."""
    if not (PREFER_CUDNN and q.device.type == "cuda" and mask is None
            and max(q.numel(), k.numel()) <= _CUDNN_MAX_ELEMENTS and _cudnn_first() is not None):
        return False
    key = (tuple(q.shape), tuple(k.shape), q.dtype)
    if key in _cudnn_shapes:
        return True
    if len(_cudnn_shapes) >= CUDNN_MAX_SHAPES:
        say_once("cudnn-shapes", f"attention: more than {CUDNN_MAX_SHAPES} distinct batch shapes; further shapes run "
                 "torch's default SDPA backend (FlashAttention) rather than cuDNN, which builds a plan per shape. "
                 "Pad batches to a few lengths to keep cuDNN for all (velotune's SFTTrainer does so when CUDA "
                 "graphs train)")
        return False
    _cudnn_shapes.add(key)
    return True


def sdpa(q, k, v, mask, scale: float, dropout: float):
    """SDPA: causal when ``mask`` is None, else with the bool mask (True = may attend)."""
    kwargs = dict(attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scale,
                  enable_gqa=q.shape[1] != k.shape[1])
    if prefers_cudnn(q, k, mask):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_cudnn_first(), set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def softcap_attention(q, k, v, mask, scale: float, softcap: float, dropout: float):
    """Attention with soft-capped logits (Gemma-2), computed explicitly as HF's eager path does:
    ``softmax(cap * tanh(q k^T * scale / cap))`` in fp32, then ``@ v``. q [B, Hq, T, D], k/v [B, Hk, T, D];
    ``mask`` a bool [B or 1, 1, T, T] (True = may attend) or None for causal. Memory O(T^2) per head."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    t = q.shape[2]
    if mask is None:
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v)


def note_packed_path(device) -> None:
    if varlen_available(device):
        say_once("packed-varlen", "packed batch: attention via torch varlen_attn (FlashAttention, per example)")
    else:
        say_once("packed-mask", "packed batch: attention via SDPA with a block-diagonal mask "
                 f"({'no torch varlen_attn on this install' if device.type == 'cuda' else 'CPU'})")
