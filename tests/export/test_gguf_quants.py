"""Our quantizers are byte-identical to ggml's reference quantizer (golden fixtures made by ggml)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from tests.export.make_golden import REAL_TENSORS, TYPES, adversarial_row_names, golden_inputs, sha256
from velotune.export.gguf import quants

GOLDEN = Path(__file__).parent / "golden"
MANIFEST = json.loads((GOLDEN / "quants.json").read_text())
ARRAYS = np.load(GOLDEN / "quants.npz")
INPUTS = golden_inputs()


def _diff_report(ours: np.ndarray, ref: np.ndarray, qtype: str, rows: list[str] | None = None) -> str:
    block, size = GGML_QUANT_SIZES[T[qtype]]
    a, b = ours.reshape(-1, size), ref.reshape(-1, size)
    bad = np.nonzero((a != b).any(axis=1))[0]
    per_row = ours.shape[-1] // size
    first = int(bad[0])
    where = f"row {first // per_row}" + (f" ({rows[first // per_row]})" if rows else "")
    return (f"{len(bad)}/{len(a)} {qtype} blocks differ; first: block {first % per_row} of {where}, "
            f"bytes {np.nonzero(a[first] != b[first])[0][:8].tolist()}")


@pytest.mark.parametrize("case", list(INPUTS))
def test_golden_inputs_are_the_recorded_ones(case):
    assert sha256(INPUTS[case]) == MANIFEST["cases"][case]["input_sha256"], (
        "numpy's generator changed the golden inputs; regenerate with `python -m tests.export.make_golden`")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("case", list(INPUTS))
def test_byte_identical_to_ggml(case, qtype, device):
    x = torch.from_numpy(INPUTS[case]).to(device)
    ours = quants.quantize(x, qtype).cpu().numpy()
    ref = ARRAYS[f"{case}/{qtype}"]
    assert ours.shape == ref.shape
    if not np.array_equal(ours, ref):
        pytest.fail(_diff_report(ours, ref, qtype, adversarial_row_names() if case == "adversarial" else None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q3_K", "Q8_0"])
def test_chunking_does_not_change_bytes(qtype, device):
    x = torch.from_numpy(INPUTS["normal_wide"]).to(device)
    whole = quants.quantize(x, qtype)
    assert torch.equal(quants.quantize(x, qtype, chunk=256), whole)
    assert torch.equal(quants.quantize(x, qtype, chunk=1000), whole)


def test_gpu_and_cpu_summation_layouts_round_alike():
    P = torch.randn(3, 32, 1000) * torch.logspace(-3, 3, 1000)
    assert torch.equal(quants._seqsum_rows(P, stacked=True), quants._seqsum_rows(P, stacked=False))


def test_input_dtypes_quantize_their_float32_values():
    x = torch.from_numpy(INPUTS["bf16_valued"])
    ref = ARRAYS["bf16_valued/Q4_K"]
    assert np.array_equal(quants.quantize(x.to(torch.bfloat16), "q4_k").numpy(), ref)
    assert np.array_equal(quants.quantize(x.to(torch.float64), "Q4_K").numpy(), ref)


@pytest.mark.parametrize("qtype,dtype", [("F16", np.float16), ("F32", np.float32)])
def test_float_passthrough(qtype, dtype):
    x = INPUTS["normal"]
    assert np.array_equal(quants.quantize(torch.from_numpy(x), qtype).numpy().reshape(-1),
                          x.astype(dtype).view(np.uint8).reshape(-1))


def test_bf16_passthrough_rounds_to_nearest_even():
    x = torch.tensor([1.00390625, 1.01171875, -2.0 ** -130, 3.0e38], dtype=torch.float32)  # ties + subnormal
    got = quants.quantize(x, "BF16").view(torch.int16).numpy().view(np.uint16)
    u = x.numpy().view(np.uint32).astype(np.uint64)
    want = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    assert np.array_equal(got, want)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of the Q4_K block"):
        quants.quantize(torch.zeros(2, 576), "q4_k")
    with pytest.raises(ValueError, match="unknown GGML tensor type 'q7_k'"):
        quants.quantize(torch.zeros(2, 256), "q7_k")
    with pytest.raises(TypeError, match="floating"):
        quants.quantize(torch.zeros(2, 256, dtype=torch.int32), "q8_0")


@pytest.mark.real_model
@pytest.mark.parametrize("name", REAL_TENSORS)
def test_real_smollm2_tensors_byte_identical(name):
    from safetensors import safe_open

    from velotune.fixtures import smollm2_path, smollm2_ready

    if not smollm2_ready():
        pytest.skip("SmolLM2 fixture not built (python -m velotune.fixtures)")
    with safe_open(next(smollm2_path().glob("*.safetensors")), "pt") as st:
        x = st.get_tensor(name)
    for qtype, digest in MANIFEST["real_smollm2"][name].items():
        got = hashlib.sha256(quants.quantize(x, qtype).numpy().tobytes()).hexdigest()
        assert got == digest, f"{name} {qtype}"
