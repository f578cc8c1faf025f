"""``FastLanguageModel``: the drop-in facade users already type (from_pretrained, get_peft_model, ...)."""
from __future__ import annotations

import types

import torch

from . import adapters, loading
from .models import install as install_fast_forward
from ._notices import VelotuneError, say, say_once
from .distributed import rank_device_map, world

# Arguments the incumbent's from_pretrained accepts that do nothing here; accepted so scripts run.
_IGNORED_LOAD_ARGS = ("fast_inference", "use_exact_model_name", "random_state", "max_lora_rank",
                      "gpu_memory_utilization", "disable_log_stats", "float8_kv_cache", "resize_model_vocab")


def _attach_methods(model) -> None:
    """Give a model velotune's save methods (as bound methods on this instance)."""
    from .export.merge import save_pretrained_merged

    model.save_pretrained_merged = types.MethodType(save_pretrained_merged, model)
    model.save_pretrained_gguf = types.MethodType(_save_pretrained_gguf, model)
    model.push_to_hub_merged = types.MethodType(_push_to_hub("save_pretrained_merged"), model)
    model.push_to_hub_gguf = types.MethodType(_push_to_hub("save_pretrained_gguf"), model)


def _push_to_hub(save: str):
    """The incumbent's ``push_to_hub_*`` methods: velotune writes locally, so each raises, naming the
    local save and the upload call that together do the same."""
    def push(self, repo_id=None, *args, **kwargs):
        raise VelotuneError(
            f"velotune does not upload: model.{save}(folder, tokenizer, ...) writes the files, then "
            f"huggingface_hub.upload_folder(repo_id={repo_id!r}, folder_path=folder) uploads them")

    push.__name__ = push.__qualname__ = f"push_to_hub_{save.rsplit('_', 1)[1]}"
    push.__doc__ = f"Raises: velotune saves locally (model.{save}); upload the folder with huggingface_hub."
    return push


def _save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method="fast_quantized", **kwargs):
    """Export to GGUF (llama.cpp / Ollama) without llama.cpp; returns the list of file paths.

    LoRA is merged in fp32 onto the dequantised base (4-bit / 8-bit / 16-bit) and streamed into the
    writer tensor by tensor; a plain or full-finetuned model is written as it is. One file per method,
    ``save_directory/model.{METHOD}.gguf``, plus an Ollama ``Modelfile`` (chat template, stop tokens).

    Args:
        save_directory: output folder (created). Each file is written atomically.
        tokenizer: default the tokenizer velotune loaded with the model.
        quantization_method: a name or a list of names (one file each):
            "f32" / "f16" / "bf16": not quantized (1-D tensors and norms stay f32 in every method).
            "q8_0": almost indistinguishable from float16. High resource use.
            "q6_k": Q6_K for all tensors.
            "q5_k_m": Q6_K for half of attention.wv and feed_forward.w2, else Q5_K.
            "q5_k_s": Q5_K for all tensors.
            "q4_k_m": Q6_K for half of attention.wv and feed_forward.w2, else Q4_K.
            "q4_k_s": Q5_K for the first attention.wv / feed_forward.w2 layers, else Q4_K.
            "q3_k_l": Q5_K for attention.wv, attention.wo and feed_forward.w2, else Q3_K.
            "q3_k_m": Q4_K for attention.wv, attention.wo and feed_forward.w2 (Q5_K for the first few), else Q3_K.
            "q3_k_s": Q3_K for all tensors.
            "q2_k": Q4_K (GQA >= 4, else Q3_K) for attention.wv, Q3_K for attention.wo and
                feed_forward.w2, Q2_K for others.
            "q4_0" / "q4_1" / "q5_0" / "q5_1": llama.cpp's legacy 32-value blocks.
            Quantized methods but q8_0 put the output layer in Q6_K, as llama.cpp does; K-quant rows
            not a multiple of 256 fall back to Q4_0 / Q5_0 / Q5_1 / Q8_0 by llama.cpp's rules.
            Aliases: "fast_quantized" = q8_0, "quantized" = q4_k_m, "not_quantized" = f16,
            "q3_k" / "q4_k" / "q5_k" = the "_m" methods.
        **kwargs: ``stem`` (file name stem, "model"), ``device`` (where to quantize; CUDA when
            available), ``round_to`` / ``first_conversion`` ("f16" or "bf16": round as llama.cpp's
            two-step convert-then-quantize does, byte for byte), ``modelfile`` (True).

    Bad method, architecture, tokenizer (a BPE pre-tokenizer llama.cpp does not know) or too little
    free disk raise before any tensor is merged. See ``velotune.export.gguf``.
    """
    from .export.gguf import save_model_gguf

    return save_model_gguf(self, save_directory, tokenizer=tokenizer, quantization_method=quantization_method, **kwargs)


def _device_map(device_map, device_type: str):
    w = world()
    if w.distributed:
        return _rank_device_map(device_map, device_type, w)
    if device_map not in ("auto", None):
        return device_map
    if device_type == "cuda":
        # The whole model on the current GPU: "auto" in accelerate may spill layers to the CPU,
        # which is slow and breaks 4-bit training.
        return {"": torch.cuda.current_device()}
    return {"": "cpu"}


def _rank_device_map(device_map, device_type: str, w):
    """DDP (torchrun / accelerate launch): this rank's whole copy on its own GPU, made the current
    device so kernels and bitsandbytes run there too (accelerate would do the same later, in the Trainer)."""
    n_gpus = torch.cuda.device_count() if device_type == "cuda" else 0
    placed = rank_device_map(device_map, device_type, w, n_gpus)
    if device_type == "cuda":
        torch.cuda.set_device(w.local_rank)
        how, mine = "its own GPU (cuda:LOCAL_RANK)", f"cuda:{w.local_rank}"
    else:
        how, mine = "the CPU (gloo backend)", "cpu"
    say_once("ddp-placement", f"{w.size} processes: each rank loads a whole copy of the model on {how} (DDP; "
             f"SFTTrainer with fsdp= then shards it); rank {w.rank}, on {mine}, logs, saves and exports")
    return placed


def _attention_implementation(requested, config) -> str:
    """The user's choice, else "sdpa"; "eager" (said) for soft-capped attention, which SDPA skips."""
    capped = getattr(config, "attn_logit_softcapping", None)
    if requested is not None:
        if capped and requested == "sdpa":
            say_once("softcap-sdpa", f"attn_implementation='sdpa' with {config.model_type}: HF's SDPA attention "
                     "ignores its attention logit softcapping (generation and evaluation then differ from the "
                     "model's math); velotune's training forward applies it either way. attn_implementation="
                     "'eager' is exact")
        return requested
    if capped:
        say_once("softcap-eager", f"{config.model_type} soft-caps its attention logits, which HF's SDPA attention "
                 "skips: loading with attn_implementation='eager' (exact; velotune's training forward applies the "
                 "cap itself)")
        return "eager"
    return "sdpa"


def _load_tokenizer(names: list[str], token, revision, trust_remote_code):
    from transformers import AutoTokenizer

    last = None
    for name in names:
        try:
            return AutoTokenizer.from_pretrained(name, token=token, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as e:
            last = e
    raise VelotuneError(f"could not load a tokenizer from {names} ({last}); save one next to the model")


class FastLanguageModel:
    """Load, adapt, train-or-infer and save a causal LM; mirrors the incumbent's API."""

    @staticmethod
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = True,
                        load_in_8bit: bool = False, full_finetuning: bool = False, token=None, device_map="auto",
                        rope_scaling: dict | None = None, trust_remote_code: bool = False, revision=None,
                        attn_implementation: str | None = None, fix_tokenizer: bool = True,
                        use_gradient_checkpointing=None, **kwargs):
        """Load a model and its tokenizer for fine-tuning. Returns ``(model, tokenizer)``.

        Args:
            model_name: a local Hugging Face folder, a PEFT adapter folder (base + adapter are restored,
                adapter trainable), a Hub id (needs the Hub or its local cache; offline it fails at once
                and says how to pass a local folder), or a pre-quantized bitsandbytes 4-bit checkpoint.
            max_seq_length: longest sequence you will train on. Beyond the model's context, linear RoPE
                scaling is applied (and said); pass ``rope_scaling`` to choose another.
            dtype: None picks bfloat16 on GPUs of compute capability >= 8.0, float16 on older GPUs,
                float32 on CPU (see ``velotune.device.default_dtype``).
            load_in_4bit: NF4 with double quantisation (bitsandbytes), compute dtype = ``dtype`` (QLoRA).
            load_in_8bit: LLM.int8 weights. ``full_finetuning``: 16-bit weights, all trainable.
            token, revision, trust_remote_code (off unless you turn it on), attn_implementation (None: "sdpa",
                or "eager" for models with soft-capped attention logits (Gemma-2), which HF's SDPA path
                would silently leave uncapped in generation and evaluation).
            device_map: "auto" puts the whole model on the current GPU (or the CPU). Under torchrun /
                accelerate launch (several processes, DDP) each rank's copy goes to cuda:LOCAL_RANK; a
                map that splits the model over devices is refused there (VelotuneError).
            fix_tokenizer: give the tokenizer a pad token (not EOS where possible) and right padding.
        """
        unknown = [k for k in kwargs if k not in _IGNORED_LOAD_ARGS]
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected argument(s) {unknown}; see "
                            "help(FastLanguageModel.from_pretrained) for what velotune accepts")
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise VelotuneError(f"max_seq_length={max_seq_length!r} must be a positive integer (tokens), e.g. 2048")
        from transformers import AutoConfig, AutoModelForCausalLM

        src = loading.resolve_source(model_name, token, revision, trust_remote_code)
        base_name = src.name
        if src.kind == "adapter":
            base_src = loading.resolve_source(base_name, token, revision, trust_remote_code)
            if base_src.kind == "adapter":
                raise VelotuneError(f"the adapter's base {base_name!r} is itself an adapter folder; point it at a model")
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = loading.resolve_dtype(dtype, device_type)
        config = AutoConfig.from_pretrained(base_name, token=token, revision=revision,
                                            trust_remote_code=trust_remote_code)
        attn_implementation = _attention_implementation(attn_implementation, config)
        pre = loading.prequantized(config)
        load_in_4bit, load_in_8bit = loading.check_quant_flags(load_in_4bit, load_in_8bit, full_finetuning, pre)
        rope_note = loading.apply_rope_scaling(config, max_seq_length, rope_scaling)
        if rope_note:
            say(rope_note)
        qconf = loading.quantization_config(load_in_4bit, load_in_8bit, dtype) if pre is None else None
        loading.announce(base_name, dtype, load_in_4bit, load_in_8bit, device_type)
        model = AutoModelForCausalLM.from_pretrained(
            base_name, config=config, dtype=dtype, quantization_config=qconf,
            device_map=_device_map(device_map, device_type), token=token, revision=revision,
            trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
        )
        loading.disable_cpu_bf16_repack(model)
        install_fast_forward(model)
        tok_sources = ([src.adapter_dir] if src.kind == "adapter" else []) + [base_name]
        tokenizer = _load_tokenizer(tok_sources, token, revision, trust_remote_code)
        if fix_tokenizer:
            loading.fix_tokenizer(tokenizer, model, max_seq_length)
        if full_finetuning:
            for p in model.parameters():
                p.requires_grad_(p.is_floating_point())
        model._velotune = loading.VelotuneState(
            tokenizer=tokenizer, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit, full_finetuning=full_finetuning, source=str(model_name),
        )
        model.max_seq_length = max_seq_length
        _attach_methods(model)
        if use_gradient_checkpointing is not None:
            model._velotune.gradient_checkpointing = use_gradient_checkpointing
            if full_finetuning:
                adapters.set_gradient_checkpointing(model, adapters.gradient_checkpointing_mode(use_gradient_checkpointing))
        if src.kind == "adapter":
            model = _load_adapter(model, src.adapter_dir)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", layers_to_transform=None, layers_pattern=None,
                       use_gradient_checkpointing="unsloth", random_state: int = 3407, use_rslora: bool = False,
                       modules_to_save=None, init_lora_weights=True, loftq_config=None, use_dora: bool = False,
                       memory_budget=None, **kwargs):
        """Add LoRA adapters; returns a ``peft.PeftModel`` (``print_trainable_parameters()`` works).

        Args:
            r: LoRA rank (> 0). lora_alpha: scale numerator (scaling = alpha / r, or alpha / sqrt(r)
                with ``use_rslora``). lora_dropout: in [0, 1). bias: "none" | "all" | "lora_only".
            target_modules: linear layer names (default the 7 attention + MLP projections) or "all-linear".
            use_gradient_checkpointing: True (recompute), False (keep every activation), "unsloth" /
                "offload" (each layer's input waits in pinned host memory until its backward; on the
                CPU plain recompute), "auto" (the memory planner: as many layers keep their activations
                as ``memory_budget`` allows, the rest as "unsloth"; it prints its plan at capture).
            memory_budget: with "auto", the GPU memory the training step may use in all, weights
                included: GiB (> 1) or a fraction of the card (<= 1); None: most of the free memory.
                The same as ``velotune.set_memory_budget(model, memory_budget)``.
            random_state: seed for the adapter init. layers_to_transform / layers_pattern: restrict
                LoRA to some layers. modules_to_save: extra modules trained fully (e.g. ["lm_head"]).
        """
        peft_model = adapters.get_peft_model(
            model, r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
            layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
            use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state, use_rslora=use_rslora,
            modules_to_save=modules_to_save, init_lora_weights=init_lora_weights, loftq_config=loftq_config,
            use_dora=use_dora, memory_budget=memory_budget, **kwargs,
        )
        _attach_methods(peft_model)
        return peft_model

    @staticmethod
    def for_inference(model):
        """Switch to generation: eval mode, KV cache on, left padding for batched prompts. Returns model."""
        st = loading.state_of(model)
        model.eval()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.use_cache = True
        if st.tokenizer is not None:
            st.tokenizer.padding_side = "left"
        _record_decode_steps(base)
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=None):
        """Switch back to training: train mode, KV cache off, right padding. Returns model."""
        st = loading.state_of(model)
        model.train()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.use_cache = False
        if use_gradient_checkpointing is not None:
            adapters.set_gradient_checkpointing(model, adapters.gradient_checkpointing_mode(use_gradient_checkpointing))
            st.gradient_checkpointing = use_gradient_checkpointing
        if st.tokenizer is not None:
            st.tokenizer.padding_side = "right"
        return model


def _record_decode_steps(base) -> None:
    """Where velotune's generation path records decode steps as CUDA graphs (models/decode_graphs.py), make
    ``generate`` use a static KV cache by default (what the graphs replay over) and not torch.compile the
    forward itself (HF does for static caches on GPUs; the graphs already remove the launch overhead).
    Only defaults the user left unset change; said once."""
    from .models import decode_graphs, generation

    gen = getattr(base, "generation_config", None)
    device = next(base.parameters()).device
    on = decode_graphs.ENABLED and (generation.DECODE_ON_CUDA if device.type == "cuda" else decode_graphs.EMULATE_ON_CPU)
    if gen is None or not on or base.__dict__.get("_velotune_fast", {}).get("spec") is None:
        return
    changed = []
    if gen.cache_implementation is None:
        gen.cache_implementation = "static"
        changed.append('cache_implementation="static"')
    if gen.disable_compile is None:
        gen.disable_compile = True
        changed.append("disable_compile=True")
    if changed:
        say_once("inference-static", f"for_inference: generate defaults to {', '.join(changed)} (decode steps replay "
                 "a recorded CUDA graph over the static KV cache); pass cache_implementation=\"dynamic\" to generate "
                 "to turn this off")


def _load_adapter(model, adapter_dir: str):
    from peft import PeftModel

    say_once("adapter:" + adapter_dir, f"restoring LoRA adapter from {adapter_dir} (trainable)")
    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    _attach_methods(peft_model)
    return peft_model
