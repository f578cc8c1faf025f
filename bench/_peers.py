"""How each benchmark loads a peer's QLoRA model, shared by the bench scripts so every peer is built the
same way everywhere: LoRA r16 alpha 16 on the 7 projections, no dropout, no bias, 4-bit NF4 with double
quantisation and bf16 compute on CUDA (fp32, unquantised, on CPU smoke runs)."""
from __future__ import annotations

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fast_model(peer: str, ckpt: str, max_len: int, cuda: bool, gc="unsloth"):
    """(model, tokenizer) through ``FastLanguageModel`` of velotune or (peer "unsloth") Unsloth, whose import
    comes first: it patches transformers and TRL."""
    import torch

    if peer == "unsloth":
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel
    else:
        from velotune import FastLanguageModel
    model, tok = FastLanguageModel.from_pretrained(ckpt, max_seq_length=max_len, load_in_4bit=cuda,
                                                   dtype=torch.bfloat16 if cuda else torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing=gc, random_state=3407)
    return model, tok


def hf_model(ckpt: str, cuda: bool):
    """The standard transformers + PEFT + bitsandbytes QLoRA recipe (what users of that stack run): SDPA,
    ``prepare_model_for_kbit_training`` with non-reentrant gradient checkpointing, PEFT's LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = dict(quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": 0}) if cuda else {}
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa", **quant)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3407)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))
