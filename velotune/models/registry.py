"""Model families as data: one ``FamilySpec`` row per HF ``model_type`` the fast forward supports.

The fast forward (decoder.py) reads only module attribute names that have been stable across
transformers releases (``model.layers[i].self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``,
``model.norm``, ``lm_head``) and config fields; everything family-specific is a flag here.
A family is supported once its parity test against the unpatched HF forward passes
(tests/test_fast_forward.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    """How one decoder family differs from Llama.

    norm_offset / norm_cast_before_weight: RMSNorm form (Llama: ``w * x̂`` with x̂ cast to the input
        dtype first; Gemma: ``(1 + w) * x̂`` computed in fp32, then cast).
    activation_attr: config field naming the MLP activation (HF ACT2FN name).
    qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3: ``self_attn.q_norm`` / ``k_norm``).
    sliding_window_attr: config field of a sliding attention window (None: full causal attention).
    sandwich_norms: Gemma-2: the attention and MLP outputs are normed before their residual add
        (``post_attention_layernorm``, ``post_feedforward_layernorm``) and the MLP input by
        ``pre_feedforward_layernorm``.
    attn_softcap: attention logits are soft-capped, ``cap * tanh(s / cap)``, by the attention module's
        ``attn_logit_softcapping`` (Gemma-2); SDPA cannot do that, so those layers compute attention
        explicitly (models/attention.py).
    """

    name: str
    norm_offset: float = 0.0
    norm_cast_before_weight: bool = True
    activation_attr: str = "hidden_act"
    qk_norm: bool = False
    sliding_window_attr: str | None = None
    sandwich_norms: bool = False
    attn_softcap: bool = False


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("llama"),
    "mistral": FamilySpec("mistral", sliding_window_attr="sliding_window"),
    "qwen2": FamilySpec("qwen2", sliding_window_attr="sliding_window"),
    "qwen3": FamilySpec("qwen3", qk_norm=True, sliding_window_attr="sliding_window"),
    "gemma": FamilySpec("gemma", norm_offset=1.0, norm_cast_before_weight=False, activation_attr="hidden_activation"),
    # per-layer sliding windows come from each attention module's `sliding_window` (None on full layers)
    "gemma2": FamilySpec("gemma2", norm_offset=1.0, norm_cast_before_weight=False, activation_attr="hidden_activation",
                         sandwich_norms=True, attn_softcap=True),
}

# HF activation names -> the fused MLP's names (kernels/lora.py); others keep the HF MLP module.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def family_of(config) -> FamilySpec | None:
    """The FamilySpec for a transformers config, or None for families the fast forward does not know."""
    return FAMILIES.get(getattr(config, "model_type", None))


def activation_of(config, spec: FamilySpec) -> str | None:
    """The fused-MLP activation name for this config, or None when the fused MLP cannot run it."""
    act = getattr(config, spec.activation_attr, None) or getattr(config, "hidden_act", None)
    return ACTIVATIONS.get(act)
