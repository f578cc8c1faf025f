"""velotune's own decoder forward over the HF module tree, for training.

Per layer (FamilySpec flags for the family differences):

    h = rms_norm(x)                       kernels/rms_norm.py
    q, k, v = fused LoRA qkv(h)           kernels/lora.py (+ kernels/nf4.py for 4-bit bases)
    [q, k = per-head rms_norm]            Qwen3
    q, k = rope(q, k) in place            kernels/rope.py, positions from position_ids
    a = SDPA(q, k, v, causal)             torch (flash / efficient backends on GPU)
    x = x + fused LoRA o(a)
    x = x + fused LoRA mlp(rms_norm(x))   gate/up -> act -> down in one autograd node (row chunks at
                                          long context: models/chunked.py)
    loss = linear cross-entropy(norm(x), lm_head, labels)   kernels/cross_entropy.py, no [T, V] logits

Installed per model instance by :func:`install` (the CausalLM's ``forward`` attribute; no source
rewriting). It runs when the call is a training-style call: no KV cache, no past, ``input_ids`` given.
generate's calls (a KV cache) take the generation path of models/generation.py (the same layers), where
it is on; everything else (``output_attentions``, ``inputs_embeds``, ...) goes to the original HF forward,
unchanged.
A projection the fused functions cannot take (LoRA dropout > 0, bias="all"/"lora_only" on a
quantised layer, DoRA, several adapters, 8-bit weights, trainable base weights) is called as its
own module: same math, unfused. Unknown families keep the HF backbone and get the fused loss only.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from .._layers import is_4bit, is_8bit, is_lora_layer, is_modules_to_save, saved_module
from .._notices import say_once
from ..kernels.cross_entropy import linear_cross_entropy, valid_rows
from ..kernels.lora import lora_linear, lora_mlp, lora_qkv
from ..kernels.rms_norm import rms_norm
from ..kernels.rope import rope, rope_cos_sin
from . import attention as A
from . import chunked, graphs
from . import offload as offload_mod
from . import recompute
from .registry import FamilySpec, activation_of, family_of

_STATIC_ROPE = {"default", "linear", "llama3", "yarn", "longrope"}


# ----------------------------------------------------------------------------------- projections
def _nf4(base):
    """NF4Weight view of a bnb Linear4bit, cached on the module (rebuilt if the storage moved)."""
    from ..quant.nf4 import NF4Weight

    w = base.weight
    key = (w.data_ptr(), w.device)
    cached = getattr(base, "_velotune_nf4", None)
    if cached is None or cached[0] != key:
        cached = (key, NF4Weight.from_bnb(base))
        base._velotune_nf4 = cached
    return cached[1]


def _frozen_base(lin):
    """The frozen weight of a plain or 4-bit linear layer as a fused-function base, or None."""
    w = getattr(lin, "weight", None)
    if w is None or w.requires_grad:
        return None
    # FSDP2 gathers a 4-bit weight as a plain uint8 tensor without its quant_state; bitsandbytes keeps a
    # copy of that state on the module, which NF4Weight.from_bnb reads
    if is_4bit(w) or (type(lin).__name__ == "Linear4bit" and getattr(lin, "quant_state", None) is not None):
        return _nf4(lin)
    if is_8bit(w) or not w.is_floating_point():
        return None
    return w


def projection(mod):
    """(base, A, B, scaling, bias) for a fusable projection module, else None (call the module)."""
    if is_lora_layer(mod):
        if getattr(mod, "merged", False) or getattr(mod, "disable_adapters", False):
            return None
        active = [a for a in mod.active_adapters if a in mod.lora_A]
        if len(active) != 1 or any(getattr(mod, "use_dora", {}).get(a, False) for a in active):
            return None
        a = active[0]
        if not isinstance(mod.lora_dropout[a], torch.nn.Identity) or getattr(mod, "lora_bias", {}).get(a, False):
            return None
        base = _frozen_base(mod.base_layer)
        bias = getattr(mod.base_layer, "bias", None)
        if base is None or (bias is not None and bias.requires_grad):
            return None
        return base, mod.lora_A[a].weight, mod.lora_B[a].weight, float(mod.scaling[a]), bias
    if type(mod).__name__ in ("Linear", "Linear4bit") and hasattr(mod, "weight"):
        base = _frozen_base(mod)
        bias = getattr(mod, "bias", None)
        if base is None or (bias is not None and bias.requires_grad):
            return None
        return base, None, None, 0.0, bias
    return None


def _apply(mod, proj, x):
    if proj is None:
        return mod(x)
    base, a, b, s, bias = proj
    return lora_linear(x, base, a, b, s, bias)


# ------------------------------------------------------------------------------------- the layer
class _Plan:
    """Per-call constants shared by every layer (owned by one forward call).

    mask: padding mask or None; restart: [B, T] example starts of packed rows or None; segments:
    varlen cumulative lengths when packed rows run through varlen attention, else None; cache: see
    models/generation.py (cached_forward).
    """

    def __init__(self, spec, config, cos, sin, position_ids, mask, restart, segments, activation, cache=None):
        self.spec, self.config = spec, config
        self.cos, self.sin, self.position_ids = cos, sin, position_ids
        self.mask, self.restart, self.segments, self.activation = mask, restart, segments, activation
        self.cache = cache  # (KV cache, masks by layer type) on the generation path, else None
        self.eps = config.rms_norm_eps


def _norm(x, module, plan):
    return rms_norm(x, module.weight, plan.eps, plan.spec.norm_offset, plan.spec.norm_cast_before_weight)


def _attention(layer, h, plan, attn_plan):
    attn = layer.self_attn
    bsz, t = h.shape[:2]
    head_dim = attn.head_dim
    projs = [projection(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    if all(p is not None for p in projs) and all(p[4] is None for p in projs):
        q, k, v = lora_qkv(h, *[p[:4] for p in projs])
    else:
        q, k, v = (_apply(m, p, h) for m, p in zip((attn.q_proj, attn.k_proj, attn.v_proj), projs))
    q = q.view(bsz, t, -1, head_dim)
    k = k.view(bsz, t, -1, head_dim)
    if plan.spec.qk_norm:
        q, k = _norm(q, attn.q_norm, plan), _norm(k, attn.k_norm, plan)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.view(bsz, t, -1, head_dim).transpose(1, 2)
    q, k = rope(q, k, plan.cos, plan.sin, plan.position_ids, layout="bhtd")
    if plan.cache is not None:  # generate's calls: models/generation.py
        from .generation import cached_attention

        out = cached_attention(layer, q, k, v, plan)
        return _apply(attn.o_proj, projection(attn.o_proj), out.reshape(bsz, t, -1))
    dropout = float(getattr(attn, "attention_dropout", 0.0) or 0.0) if layer.training else 0.0
    mask, segments = attn_plan
    softcap = getattr(attn, "attn_logit_softcapping", None) if plan.spec.attn_softcap else None
    if softcap:
        if segments is not None:  # packed rows: the explicit path takes the block mask
            mask = A.packed_mask(plan.restart, None, q.shape[2], q.device)
        out = A.softcap_attention(q, k, v, mask, attn.scaling, softcap, dropout)
    elif segments is not None and dropout == 0.0:
        out = A.varlen_attention(q, k, v, segments, attn.scaling)
    else:
        if segments is not None:  # attention dropout: varlen has none, take the block mask
            mask = A.packed_mask(plan.restart, None, q.shape[2], q.device)
        out = A.sdpa(q, k, v, mask, attn.scaling, dropout)
    out = out.transpose(1, 2).reshape(bsz, t, -1)
    return _apply(attn.o_proj, projection(attn.o_proj), out)


def _mlp(layer, h, plan, need_output: bool = True):
    """The layer's MLP on ``h``; ``need_output`` False: only its backward is wanted (models/recompute.py)."""
    mlp = layer.mlp
    projs = [projection(getattr(mlp, n, None)) if hasattr(mlp, n) else None for n in ("gate_proj", "up_proj", "down_proj")]
    if plan.activation is not None and all(p is not None and p[4] is None for p in projs):
        fused = [p[:4] for p in projs]
        if chunked.wants_chunks(h):  # long context: the MLP's [tokens, intermediate] buffers a chunk at a time
            params = [t for p in fused for t in (p[1], p[2]) if t is not None and t.requires_grad]
            return chunked.row_chunked(lambda rows: lora_mlp(rows, *fused, activation=plan.activation), h, params,
                                       need_output=need_output)
        return lora_mlp(h, *fused, activation=plan.activation, need_output=need_output)
    return mlp(h)


def _layer(layer, x, plan, attn_plan):
    h = _norm(x, layer.input_layernorm, plan)
    a = _attention(layer, h, plan, attn_plan)
    if plan.spec.sandwich_norms:  # Gemma-2: outputs normed before their residual add
        x = x + _norm(a, layer.post_attention_layernorm, plan)
        h = _norm(x, layer.pre_feedforward_layernorm, plan)
        return x + _norm(_mlp(layer, h, plan), layer.post_feedforward_layernorm, plan)
    x = x + a
    h = _norm(x, layer.post_attention_layernorm, plan)
    # the MLP output only meets the residual add: in a recompute for backward its values go unread
    return x + _mlp(layer, h, plan, need_output=not recompute.output_unused())


# ----------------------------------------------------------------------------------------- masks
def _layer_window(layer, config, spec: FamilySpec):
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(config, spec.sliding_window_attr, None) if spec.sliding_window_attr else None


def _layer_attention(layer, config, spec, plan, t: int, device):
    """(mask, segments) for one layer: segments -> varlen attention; else SDPA with mask (None = causal)."""
    window = _layer_window(layer, config, spec)
    windowed = bool(window) and t > window
    if plan.segments is not None and not windowed:
        return None, plan.segments
    mask = plan.mask  # block-diagonal for packed rows already, unless varlen was planned
    if plan.segments is not None:  # varlen planned, but this layer's window needs a mask
        mask = A.packed_mask(plan.restart, mask, t, device)
    if windowed:
        mask = A.window_mask(mask, window, t, device)
    return mask, None


# ------------------------------------------------------------------------------------------ rope
def _rope_tables(model, config, n_pos: int, device):
    """cos/sin fp32 tables for positions < n_pos, cached on the model per (device, n_pos bucket)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        return rope_cos_sin(config, n_pos, device=device, seq_len=n_pos)
    rows = max(1 << (n_pos - 1).bit_length(), 256)  # power-of-two buckets: few rebuilds
    cache = model.__dict__.setdefault("_velotune_rope", {})
    key = (str(device), rows)
    if key not in cache:
        cache.clear()
        cache[key] = rope_cos_sin(config, rows, device=device)
    return cache[key]


# --------------------------------------------------------------------------------------- forward
def _lm_head_weight(model):
    head = model.get_output_embeddings()
    if is_modules_to_save(head):
        head = saved_module(head)
    if is_lora_layer(head) or getattr(head, "bias", None) is not None:
        return None
    return head.weight


def _shifted(labels, shift_labels, device):
    """The next-token targets: ``shift_labels`` as given, else ``labels`` shifted left (last = -100)."""
    if shift_labels is None:
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    return shift_labels.to(device)


def _early_rows(model, shift_labels):
    """The fused loss's non-ignored rows, found BEFORE the decoder runs: finding them costs a host sync
    (kernels/cross_entropy.valid_rows), which here waits for an almost empty GPU queue instead of for
    the whole forward (after which the GPU would idle while the host launches the loss and backward)."""
    weight = _lm_head_weight(model)
    if not model.training or weight is None or not weight.is_cuda:
        return None
    return valid_rows(shift_labels.reshape(-1), -100, weight.shape[0])


def _loss_or_logits(model, hidden, shift_labels, num_items_in_batch, logits_to_keep, softcap, rows=None):
    weight = _lm_head_weight(model)
    if shift_labels is None:
        sl = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = model.lm_head(hidden[:, sl])
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return None, logits
    shift_labels = shift_labels.to(hidden.device)
    if weight is None:  # a LoRA'd or biased head: plain logits, HF-style loss
        logits = model.lm_head(hidden)
        flat = logits.float().reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(flat, shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else (shift_labels != -100).sum().clamp(min=1)
        return loss / denom, logits
    if model.training:  # between the graphs' forward and backward replays: temporaries in their pool
        return linear_cross_entropy(hidden, weight, shift_labels, softcap=softcap,
                                    num_items_in_batch=num_items_in_batch, valid=rows,
                                    scratch=graphs.loss_scratch(model)), None
    return linear_cross_entropy(hidden, weight, shift_labels, softcap=softcap,
                                num_items_in_batch=num_items_in_batch, return_logits=True)


def _ids_call(model, call) -> bool:
    """Fast forward on, ``input_ids`` given (no ``inputs_embeds``), no attentions / hidden states asked."""
    state = model.__dict__.get("_velotune_fast")
    if state is None or not state["enabled"]:
        return False
    if call.get("input_ids") is None or call.get("inputs_embeds") is not None:
        return False
    return not (call.get("output_attentions") or call.get("output_hidden_states"))


def _fast_call(model, call) -> bool:
    """A training-style call: no KV cache given or wanted."""
    return _ids_call(model, call) and call.get("past_key_values") is None and not call.get("use_cache")


def fast_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, num_items_in_batch=None,
                 shift_labels=None, **kwargs):
    """Training forward of a causal LM (bound to the model by :func:`install`); HF's otherwise."""
    call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    state = self.__dict__["_velotune_fast"]
    if not _fast_call(self, call):
        from . import generation  # (imports this module)

        if labels is None and shift_labels is None and generation.decode_call(self, call):
            return generation.cached_forward(self, state["spec"], input_ids, attention_mask, position_ids,
                                             past_key_values, use_cache, logits_to_keep)
        extra = {k: v for k, v in (("labels", labels), ("num_items_in_batch", num_items_in_batch),
                                   ("shift_labels", shift_labels)) if v is not None}
        return state["original"](**call, **extra, logits_to_keep=logits_to_keep)
    config = self.config
    spec = state["spec"]
    softcap = getattr(config, "final_logit_softcapping", None)
    targets = rows = None
    if labels is not None or shift_labels is not None:
        targets = _shifted(labels, shift_labels, input_ids.device)
        rows = _early_rows(self, targets)
    if spec is None:  # unknown family: HF backbone, fused loss
        out = self.model(**{k: v for k, v in call.items() if k != "use_cache"}, use_cache=False)
        hidden = out.last_hidden_state
    else:
        hidden = _backbone(self, spec, input_ids, attention_mask, position_ids)
    loss, logits = _loss_or_logits(self, hidden, targets, num_items_in_batch, logits_to_keep, softcap, rows)
    return CausalLMOutputWithPast(loss=loss, logits=logits)


def _backbone(self, spec, input_ids, attention_mask, position_ids):
    backbone = self.model
    config = self.config
    x = backbone.embed_tokens(input_ids)
    bsz, t = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(t, device=x.device).unsqueeze(0)
        n_pos = t
    else:
        n_pos = int(position_ids.max()) + 1
    cos, sin = _rope_tables(self, config, n_pos, x.device)
    mask = A.base_mask(attention_mask, t, x.device, self.training)
    restart = A.restarts(position_ids)
    segments = None
    if restart is not None:
        A.note_packed_path(x.device)
        if mask is None and A.varlen_available(x.device):
            segments = A.Segments(restart)
        else:
            mask = A.packed_mask(restart, mask, t, x.device)
    plan = _Plan(spec, config, cos, sin, position_ids, mask, restart, segments, activation_of(config, spec))
    gc = getattr(backbone, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled()
    layers = list(backbone.layers)[: config.num_hidden_layers]  # a ModuleList slice registers its modules
    attn_plans = [_layer_attention(layer, config, spec, plan, t, x.device) for layer in layers]
    fsdp = [_is_fsdp(layer) for layer in layers]
    sharded = any(fsdp)
    offload = gc and _offload_requested(self) and offload_mod.available(x) and not sharded
    graphs.state_of(self).replayed = False  # until run_stack replays this forward's stack (graphs.loss_scratch)
    if self.training and torch.is_grad_enabled() and not sharded:
        out = _graphed_stack(self, layers, x, plan, attn_plans, position_ids, _policy(self, gc, offload),
                             offload_mod.available(x))
        if out is not None:
            return _norm(out, backbone.norm, plan)
    if sharded:
        say_once("fsdp-layers", "FSDP2-sharded decoder layers: the fast forward runs each inside the layer's own "
                 "call (FSDP gathers its parameters); CUDA graphs and offloaded checkpointing are off")
    offloaded = [offload and _graph_fusable(layer, plan) for layer in layers]
    for i, (layer, attn_plan, in_fsdp) in enumerate(zip(layers, attn_plans, fsdp)):
        step = _sharded_layer if in_fsdp else _layer
        if offloaded[i]:
            x = offload_mod.offloaded_layer(lambda m, h, ap=attn_plan: _layer(m, h, plan, ap), layer, x,
                                            ahead=any(offloaded[i + 1:]))
        elif gc:
            x = checkpoint(_recomputed(step), layer, x, plan, attn_plan, use_reentrant=False)
        else:
            x = step(layer, x, plan, attn_plan)
    return _norm(x, backbone.norm, plan)


def _recomputed(step):
    """``step`` for torch's checkpoint: its first call is the forward, any later one the recompute in
    backward, run as such (models/recompute.py: the MLP's down projection skipped; what the recompute saves
    for backward, which torch's checkpoint compares with the forward's, is the same)."""
    calls = []

    def run(*args):
        with recompute.for_backward() if calls else contextlib.nullcontext():
            calls.append(1)
            return step(*args)

    return run


# ------------------------------------------------------------------------------------------ FSDP2
def _is_fsdp(module) -> bool:
    """Whether ``module`` was sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def _sharded_layer(layer, x, plan, attn_plan):
    """``_layer`` for an FSDP2-sharded decoder layer. Outside its own call the layer's parameters are
    shards (DTensors); FSDP's hooks on the call gather them before, free them after, and reduce-scatter
    their gradients in backward. So the fused layer runs as the module's forward for this one call
    (through ``nn.Module.__call__``: HF's GradientCheckpointingLayer would checkpoint it a second time)."""
    layer.forward = lambda h: _layer(layer, h, plan, attn_plan)
    try:
        return torch.nn.Module.__call__(layer, x)
    finally:
        del layer.forward


# ---------------------------------------------------------------------------------- CUDA graphs
def _graph_fusable(layer, plan) -> bool:
    """Every projection of the layer on the fused path and no attention dropout: nothing in the layer
    syncs with the host or draws random numbers, so its kernels can be recorded once and replayed."""
    attn, mlp = layer.self_attn, layer.mlp
    if float(getattr(attn, "attention_dropout", 0.0) or 0.0) != 0.0 or plan.activation is None:
        return False
    if any(projection(m) is None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
        return False
    mods = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(m is not None and (p := projection(m)) is not None and p[4] is None for m in mods)


def _adapter_signature(model, layers) -> tuple:
    """What decides which kernels each projection runs and which tensors they read, per LoRA module
    (merged / disabled / active adapters, and the identity of their weights); checked every call."""
    mods = model.__dict__.get("_velotune_lora_modules")
    if mods is None or mods[0] != [id(layer) for layer in layers]:
        mods = ([id(layer) for layer in layers], [m for layer in layers for m in layer.modules() if is_lora_layer(m)])
        model.__dict__["_velotune_lora_modules"] = mods
    return tuple(_lora_state(m) for m in mods[1])


def _lora_state(m) -> tuple:
    """(merged, disabled, active adapters, ids of their A/B weights) of one PEFT LoRA module, read from its
    instance dict: every forward and decode step checks all of them (224 modules on an 8B model; through PEFT's
    properties and nn.Module.__getattr__ that took ~1.4 ms of host time per call, ~0.2 ms this way). Falls back
    to PEFT's public attributes when its layout differs (:func:`_lora_state_public`, the same tuple)."""
    try:
        d = m.__dict__
        act = d["_active_adapter"]
        active = (act,) if isinstance(act, str) else tuple(act)
        la, lb = d["_modules"]["lora_A"]._modules, d["_modules"]["lora_B"]._modules
        weights = tuple((id(la[a]._parameters["weight"]), id(lb[a]._parameters["weight"])) for a in active if a in la)
        return bool(d["merged_adapters"]), d["_disable_adapters"], active, weights
    except (KeyError, AttributeError, TypeError):
        return _lora_state_public(m)


def _lora_state_public(m) -> tuple:
    active = tuple(m.active_adapters)
    weights = tuple((id(m.lora_A[a].weight), id(m.lora_B[a].weight)) for a in active if a in m.lora_A)
    return m.merged, m.disable_adapters, active, weights


def _policy(model, gc: bool, offload: bool) -> str:
    """How the graph path gets each layer's activations to the backward (graphs.POLICIES)."""
    if not gc:
        return "keep"
    if offload:
        return "offload"
    st = getattr(model, "_velotune", None)
    return "auto" if getattr(st, "gradient_checkpointing", None) == "auto" else "recompute"


def _offload_requested(model) -> bool:
    """use_gradient_checkpointing="unsloth" / "offload": layer inputs go to pinned host memory."""
    st = getattr(model, "_velotune", None)
    return getattr(st, "gradient_checkpointing", None) in ("unsloth", "offload")


def _graphed_stack(model, layers, x, plan, attn_plans, position_ids, policy="recompute", can_offload=False):
    """The decoder stack through CUDA graphs (models/graphs.py), or None for the eager loop.

    The per-call attention inputs (positions, packed-row starts and sequence offsets, masks) become
    static inputs of the graphs: the layers read the set's own copies, refilled every call. ``can_offload``:
    layer inputs may wait in host memory here ("auto" then offloads the layers it does not keep)."""
    st = graphs.state_of(model)
    if st.mode is False or st.broken is not None or (x.device.type != "cuda" and not graphs.EMULATE_ON_CPU):
        return None
    inputs, layout = _static_inputs(plan, attn_plans, position_ids, x)
    if inputs is None:
        return None

    def make_run_layer(static):
        # offsets padded with empty sequences; the row length bounds every example's
        seg = A.Segments.of(static["cu"], x.shape[1]) if "cu" in static else None
        mask = static.get("mask0") if plan.mask is not None else None
        static_plan = _Plan(plan.spec, plan.config, plan.cos, plan.sin, static.get("pos"), mask,
                            static.get("restart"), seg, plan.activation)
        per_layer = [(static.get(f"mask{m}") if m >= 0 else None, seg if uses_seg else None)
                     for m, uses_seg in layout]
        by_layer = {id(layer): ap for layer, ap in zip(layers, per_layer)}

        def run_layer(layer, h):
            return _layer(layer, h, static_plan, by_layer[id(layer)])

        return run_layer

    vs = getattr(model, "_velotune", None)
    max_len = getattr(vs, "max_seq_length", 0) or 0
    # the shared buffers' size: the longest batch expected (a trainer may have said: padding-free rows)
    max_tokens = max(x.shape[0] * max(max_len, x.shape[1]), getattr(vs, "batch_tokens", 0) or 0)
    key = (_adapter_signature(model, layers), tuple(layout),
           tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items())))
    return graphs.run_stack(model, layers, x, make_run_layer, key_extra=key,
                            check=lambda: all(_graph_fusable(layer, plan) for layer in layers), policy=policy,
                            max_tokens=max_tokens, inputs=inputs,
                            frozen_weights=lambda: _frozen_4bit(layers), offload_rest=can_offload,
                            expect_tokens=getattr(vs, "longest_batch_tokens", 0) or 0)


def _frozen_4bit(layers) -> list:
    """The NF4Weight of every 4-bit linear layer in ``layers`` (what the fused kernels dequantise)."""
    return [_nf4(m) for layer in layers for m in layer.modules()
            if type(m).__name__ == "Linear4bit" and is_4bit(getattr(m, "weight", None))]


def _static_inputs(plan, attn_plans, position_ids, x):
    """(inputs, layout) for the graphs: the tensors this call's attention reads, by name, and per layer
    (index of its mask in the inputs or -1, whether it takes the varlen offsets); (None, None) when a
    batch cannot be recorded (more packed examples than the offsets buffer holds)."""
    inputs = {}
    if position_ids is not None and (plan.restart is not None or not bool((position_ids[:, 0] == 0).all())):
        inputs["pos"] = position_ids  # else rope uses 0..T-1 itself
    if plan.restart is not None:
        inputs["restart"] = plan.restart
    if plan.segments is not None:
        b, t = x.shape[:2]
        cap = max(64, b * t // 32)  # examples per batch the offsets buffer holds (mean length >= 32 tokens)
        cu = plan.segments.cu
        if cu.numel() > cap + 1:
            return None, None
        padded = torch.full((cap + 1,), b * t, dtype=cu.dtype, device=cu.device)
        padded[: cu.numel()] = cu  # empty sequences after the last example
        inputs["cu"] = padded
    masks = []  # distinct mask tensors, in first-use order
    if plan.mask is not None:
        masks.append(plan.mask)
    layout = []
    for mask, seg in attn_plans:
        m = -1
        if mask is not None:
            m = next((j for j, known in enumerate(masks) if known is mask), None)
            if m is None:
                masks.append(mask)
                m = len(masks) - 1
        layout.append((m, seg is not None))
    inputs.update({f"mask{j}": m for j, m in enumerate(masks)})
    return inputs, layout


def install(model) -> bool:
    """Give a velotune-loaded CausalLM the fast forward. Returns True for a known family.

    Idempotent. The original forward is kept for generation and for anything the fast path skips.
    """
    if "_velotune_fast" in model.__dict__:
        return model.__dict__["_velotune_fast"]["spec"] is not None
    spec = family_of(model.config)
    if spec is not None and not hasattr(model, "model"):
        spec = None
    if spec is None:
        say_once(f"fast-family-{model.config.model_type}",
                 f"model_type={model.config.model_type!r} has no velotune fast forward yet: using the HF forward "
                 "with velotune's fused cross-entropy loss")
    model.__dict__["_velotune_fast"] = {"enabled": True, "spec": spec, "original": model.forward}
    model.forward = types.MethodType(fast_forward, model)
    return spec is not None


def set_fast_forward(model, enabled: bool) -> None:
    """Turn the fast forward on or off for a model (PEFT-wrapped or not); off = HF's forward exactly."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = base.__dict__.get("_velotune_fast")
    if state is None:
        raise ValueError("this model has no velotune fast forward installed (load it with FastLanguageModel)")
    state["enabled"] = bool(enabled)
