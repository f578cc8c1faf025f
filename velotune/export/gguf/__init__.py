"""GGUF export without llama.cpp: quantizers byte-identical to ggml, llama.cpp's mixes, converter.

Entry points::

    from velotune.export.gguf import export_gguf, save_model_gguf
    paths = export_gguf("hf_dir_or_plain_model", "out", ["q4_k_m", "q8_0"], tokenizer=tok)
    # -> [out/model.Q4_K_M.gguf, out/model.Q8_0.gguf], plus out/Modelfile (Ollama)
    paths = save_model_gguf(lora_model, "out", quantization_method="q4_k_m")  # = model.save_pretrained_gguf
    # LoRA merged in fp32 onto the dequantised (4-bit / 8-bit / 16-bit) base, streamed into the writer

- Methods: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s
  q5_k_m q6_k; aliases "not_quantized" (f16), "fast_quantized" (q8_0), "quantized" (q4_k_m).
- Architectures: llama, mistral, qwen2, qwen3, gemma. Tokenizers: BPE with a pre-tokenizer
  llama.cpp knows (llama-bpe, qwen2, smollm, tekken, ...) and SentencePiece.
- Bad method / architecture / tokenizer / not enough disk: ValueError / OSError before any tensor is
  quantized. Files are written under a temporary name and renamed when complete.
- Quantizes on CUDA when available (``device=`` overrides). ``round_to="f16"`` reproduces llama.cpp's
  convert-to-f16-then-llama-quantize output byte for byte; the default quantizes the weights' own
  values (one rounding less).
- Streaming: ``write_gguf(path, config, tokenizer, iterable_of_(hf_name, tensor), method)`` takes
  tensors in any order, one at a time (e.g. from a merge that yields them).
"""
from .convert import export_gguf, write_gguf
from .mixes import ALIASES, METHODS, resolve_method
from .model import save_model_gguf
from .modelfile import modelfile_text, write_modelfile
from .quants import quantize

__all__ = ["export_gguf", "save_model_gguf", "write_gguf", "METHODS", "ALIASES", "resolve_method", "quantize",
           "modelfile_text", "write_modelfile"]
