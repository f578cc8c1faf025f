"""The generation path of velotune's decoder: HF generate's prefill and decode calls (a KV cache) through
the fused kernels, with HF's cache objects, masks and attention function.

:func:`decode_call` says whether a call takes this path; :func:`cached_forward` runs it: the layers of
decoder.py with ``_Plan.cache`` set, so attention appends to the cache and attends through HF's own
attention function (:func:`cached_attention`). With a static cache, decode steps replay a recorded CUDA
graph (models/decode_graphs.py). Greedy outputs equal HF's forward token for token (tests/test_decode.py).
"""
from __future__ import annotations

import contextlib

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .._notices import say_once
from . import decode_graphs
from .decoder import _adapter_signature, _ids_call, _layer, _loss_or_logits, _norm, _Plan, _rope_tables
from .registry import activation_of

# The generation path (a KV cache: HF generate's calls): greedy outputs equal HF's (tests/test_decode.py
# on CPU; tests/test_fast_forward_gpu.py::test_generation_matches_hf and ::test_recorded_decode_matches_hf
# passed on an H200, 2026-11-28).
# On CUDA it runs where its decode steps are recorded as CUDA graphs (a static cache every layer of which
# counts on the device; for_inference makes that generate's default): bench/decode.py, 8B shape 4-bit + r16
# adapter, H200, 2026-11-28, one run: 34.9 tok/s at batch 1 and 230 at batch 8, vs Unsloth's for_inference
# 20.0 / 166, HF generate 8.5 / 54.1, HF static cache + torch.compile 11.7 / 79.3.
# Eagerly (a dynamic cache, sliding-window static layers, graphs off) it is slower than HF's forward there
# (6.9 / 62.7 tok/s in that run: host-bound per-token launches, and batch 1 dequantises whole weights where
# bitsandbytes runs a 4-bit GEMV), so those calls take HF's forward unless EAGER_DECODE_ON_CUDA is set.
DECODE_ON_CUDA = True
EAGER_DECODE_ON_CUDA = False


def decode_call(model, call) -> bool:
    """A call the cached generation path takes: known family, input ids, a KV cache wanted or given (on CUDA:
    a cache whose decode steps are recorded, see DECODE_ON_CUDA)."""
    if not _ids_call(model, call) or model.__dict__["_velotune_fast"]["spec"] is None:
        return False
    if call.get("past_key_values") is None and not call.get("use_cache"):
        return False
    if call["input_ids"].is_cuda and not (EAGER_DECODE_ON_CUDA or (
            DECODE_ON_CUDA and decode_graphs.ENABLED and decode_graphs.replayable_cache(call.get("past_key_values")))):
        return False
    extra = set(call) - {"input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds",
                         "use_cache", "return_dict", "output_attentions", "output_hidden_states", "cache_position"}
    return not extra  # anything else (e.g. token_type_ids): HF's forward


def _layer_type(config, layer_idx: int) -> str:
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer_idx]
    if getattr(config, "model_type", None) == "mistral" and getattr(config, "sliding_window", None):
        return "sliding_attention"
    return "full_attention"


def cached_attention(layer, q, k, v, plan):
    """Append k/v to the cache and attend through HF's own attention function for this model
    (``config._attn_implementation``: sdpa / eager, with its masks, windows and softcaps)."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = layer.self_attn
    cache, masks = plan.cache
    k, v = cache.update(k, v, attn.layer_idx)
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(plan.config._attn_implementation, eager)
    extra = {}
    if hasattr(attn, "sliding_window"):
        extra["sliding_window"] = attn.sliding_window
    elif getattr(plan.config, "model_type", None) == "mistral":
        extra["sliding_window"] = getattr(plan.config, "sliding_window", None)
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        extra["softcap"] = attn.attn_logit_softcapping
    out, _ = fn(attn, q, k, v, masks[_layer_type(plan.config, attn.layer_idx)], dropout=0.0,
                scaling=attn.scaling, **extra)
    return out  # [B, T, H, D]


def cached_forward(self, spec, input_ids, attention_mask, position_ids, past_key_values, use_cache,
                    logits_to_keep):
    """Forward with a KV cache (HF generate's prefill and decode steps): the fused LoRA projections,
    RMSNorm, RoPE and MLP kernels, HF's cache object and masks, HF's attention function."""
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    backbone, config = self.model, self.config
    x = backbone.embed_tokens(input_ids)
    if past_key_values is None and use_cache is not False:
        past_key_values = DynamicCache(config=config)
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    if position_ids is None:
        position_ids = (torch.arange(input_ids.shape[1], device=x.device) + past).unsqueeze(0)
    if isinstance(attention_mask, dict):  # already built by generate
        masks = attention_mask
    else:
        kw = dict(config=config, inputs_embeds=x, attention_mask=attention_mask, past_key_values=past_key_values,
                  position_ids=position_ids)
        masks = {"full_attention": create_causal_mask(**kw)}
        types = {_layer_type(config, i) for i in range(config.num_hidden_layers)}
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    # positions never exceed past + new tokens (left padding only lowers them): no host sync needed
    n_pos = past + input_ids.shape[1]
    if isinstance(past, torch.Tensor):  # a static cache counts on the device: size the tables by its length
        longest = past_key_values.get_max_length()
        sliding = any(_layer_type(config, i) == "sliding_attention" for i in range(config.num_hidden_layers))
        n_pos = longest if longest > 0 and not sliding else int(n_pos)  # sliding layers: positions pass it
    cos, sin = _rope_tables(self, config, n_pos, x.device)
    layers = list(backbone.layers)[: config.num_hidden_layers]  # a ModuleList slice registers its modules
    activation, softcap = activation_of(config, spec), getattr(config, "final_logit_softcapping", None)

    def run(h, pos, step_masks):  # reads only its arguments and what outlives the call (see decode_graphs.py)
        plan = _Plan(spec, config, cos, sin, pos, None, None, None, activation, cache=(past_key_values, step_masks))
        for layer in layers:
            h = _layer(layer, h, plan, (None, None))
        return _loss_or_logits(self, _norm(h, backbone.norm, plan), None, None, logits_to_keep, softcap)[1]

    if input_ids.shape[1] == 1 and decode_graphs.usable(x) and not torch.is_grad_enabled() \
            and self.__dict__.get("_velotune_decode_broken") is None and decode_graphs.replayable_cache(past_key_values):
        logits = _graphed_decode(self, run, layers, x, position_ids, masks, past_key_values, cos, logits_to_keep)
    else:
        logits = run(x, position_ids, masks)
    return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)


def _graphed_decode(model, run, layers, x, position_ids, masks, cache, cos, logits_to_keep):
    """A decode step through a recorded graph (models/decode_graphs.py): replayed when one was recorded for
    this key, else run eagerly and recorded for the next step."""
    # where everything the recorded step reads or writes lives: generate makes a new cache per call, often at
    # the addresses of the last one (then the recording is reused); moved or re-loaded weights record again
    memory = (decode_graphs.cache_pointers(cache), decode_graphs.weight_pointers(model, layers), cos.data_ptr(),
              tuple(cos.shape))
    key = (tuple(x.shape), x.dtype, str(x.device), tuple(position_ids.shape), memory, decode_graphs.mask_layout(masks),
           logits_to_keep, torch.is_autocast_enabled(x.device.type), _adapter_signature(model, layers))
    entry = model.__dict__.get("_velotune_decode_graph")
    if entry is not None and entry[0] == key:
        return entry[1](x, position_ids, masks)
    model.__dict__.pop("_velotune_decode_graph", None)
    stream = None
    if x.is_cuda:  # this step runs on the stream the recording will use: its warm-up (lazy inits per stream)
        if "_velotune_decode_pool" not in model.__dict__:
            model.__dict__["_velotune_decode_pool"] = torch.cuda.graph_pool_handle()
            model.__dict__["_velotune_decode_stream"] = torch.cuda.Stream(device=x.device)
        stream = model.__dict__["_velotune_decode_stream"]
        stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        logits = run(x, position_ids, masks)  # this step, eagerly; then recorded (recording runs nothing)
    if stream is not None:
        torch.cuda.current_stream(x.device).wait_stream(stream)
        logits.record_stream(torch.cuda.current_stream(x.device))
    try:
        graph = decode_graphs.DecodeGraph(run, x, position_ids, masks, model.__dict__.get("_velotune_decode_pool"),
                                          stream)
    except Exception as e:  # noqa: BLE001 - any recording failure: say why, decode eagerly (same numerics)
        model.__dict__["_velotune_decode_broken"] = f"{type(e).__name__}: {e}"
        say_once("decode-graph-failed", f"generation: the decode step could not be recorded as a CUDA graph "
                 f"({str(e)[:300]}); decoding continues without it (same tokens, slower). Please report this "
                 "with `velotune env`.")
        return logits
    model.__dict__["_velotune_decode_graph"] = (key, graph)
    say_once("decode-graph", "generation: decode steps replay a recorded CUDA graph (static KV cache)")
    return logits
