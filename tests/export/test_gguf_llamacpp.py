"""Against llama.cpp itself (llama-cpp-python; slow, skipped when it is not installed):

- whole files: our q-files equal, byte for byte, llama-quantize run on our f16 file of the same model
  (a tiny Llama whose rows are multiples of 256, every quantized method; the real SmolLM2, whose
  576-wide rows exercise the fallbacks, for q8_0 / q4_k_m / q3_k_m);
- llama.cpp loads our f16 file of each family and its logits match the HF model's.

Build llama-cpp-python as tests/export/make_golden.py says.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.export.test_gguf_convert import FAMILIES, TEXT, _kl, tiny_model
from velotune.export.gguf import export_gguf, mixes
from velotune.fixtures import smollm2_path, smollm2_ready

try:
    import llama_cpp
except ImportError:  # not installed, or installed without its runtime deps
    llama_cpp = None

pytestmark = [pytest.mark.slow, pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python not installed")]
QUANTIZED = [m for m, spec in mixes.METHODS.items() if spec.quantized]


@pytest.fixture(scope="module")
def tokenizer():
    if not smollm2_ready():
        pytest.skip("SmolLM2 fixture not built (python -m velotune.fixtures)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path())


def llama_quantize(src: Path, dst: Path, method: str) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(mixes.METHODS[method].ftype)
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def _first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"sizes differ: {len(a)} vs {len(b)}"
    diff = np.nonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))[0]
    return f"{len(diff)} bytes differ, first at offset {diff[0]}"


def _assert_same_file(ours: Path, ref: Path):
    a, b = ours.read_bytes(), ref.read_bytes()
    assert a == b, f"{ours.name}: {_first_difference(a, b)}"


@pytest.fixture(scope="module")
def tiny_llama_256(tokenizer, tmp_path_factory):
    """8-layer Llama, hidden 256, ffn 768, GQA 8/2 (n_gqa 4), untied: every row a multiple of 256."""
    d = tmp_path_factory.mktemp("tiny256")
    model = tiny_model("llama", hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    model.save_pretrained(d / "hf")
    [f16] = export_gguf(d / "hf", d, "f16", tokenizer=tokenizer)
    return d, f16


@pytest.mark.parametrize("method", QUANTIZED)
def test_whole_file_identical_tiny_llama(method, tiny_llama_256, tokenizer):
    d, f16 = tiny_llama_256
    ref = llama_quantize(f16, d / f"ref.{method}.gguf", method)
    [ours] = export_gguf(d / "hf", d, method, tokenizer=tokenizer, round_to="f16")
    _assert_same_file(ours, ref)


@pytest.fixture(scope="module")
def smollm2_f16(tmp_path_factory):
    if not smollm2_ready():
        pytest.skip("SmolLM2 fixture not built (python -m velotune.fixtures)")
    d = tmp_path_factory.mktemp("smollm2")
    [f16] = export_gguf(smollm2_path(), d, "f16")
    return d, f16


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["q8_0", "q4_k_m", "q3_k_m"])
def test_whole_file_identical_smollm2(method, smollm2_f16):
    d, f16 = smollm2_f16
    ref = llama_quantize(f16, d / f"ref.{method}.gguf", method)
    [ours] = export_gguf(smollm2_path(), d, method, round_to="f16")
    _assert_same_file(ours, ref)


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False,
                          n_gpu_layers=0)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()


# llama.cpp multiplies f16 weights by f16-rounded activations: measured KL <= 2e-6 on these models.
VARIANTS = [(f, {}) for f in FAMILIES] + [("llama", {"attention_bias": True, "mlp_bias": True})]


@pytest.mark.parametrize("family,extra", VARIANTS, ids=[f + ("+bias" if e else "") for f, e in VARIANTS])
def test_llama_cpp_runs_our_f16_of_each_family(family, extra, tokenizer, tmp_path):
    model = tiny_model(family, **extra)
    [path] = export_gguf(model, tmp_path, "f16", tokenizer=tokenizer)
    ids = tokenizer(TEXT).input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    kl = _kl(ref, llama_cpp_logits(path, ids))
    assert kl < 1e-4, f"{family}: KL {kl:.2e}"


@pytest.mark.real_model
def test_llama_cpp_runs_our_smollm2_exports(smollm2_f16, tokenizer):
    from transformers import AutoModelForCausalLM

    d, f16 = smollm2_f16
    ids = tokenizer(TEXT * 3).input_ids
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    assert _kl(ref, llama_cpp_logits(f16, ids)) < 1e-4
    [q4] = export_gguf(smollm2_path(), d, "q4_k_m")
    assert _kl(ref, llama_cpp_logits(q4, ids)) < 0.15
