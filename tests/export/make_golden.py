"""Make the golden GGUF quantization fixtures with ggml itself (run once; CI only reads them).

Needs llama-cpp-python, which vendors ggml and llama.cpp. There is no wheel; build it (~10 min on
2 cores). The default build crashes on quantized models on CPUs that advertise AMX, so use:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_BMI2=ON -DLLAVA_BUILD=OFF" pip install --no-deps --no-cache-dir llama-cpp-python==0.3.36

(ggml-quants.c lives in libggml-base, which gets no -m flags: the reference quantizer is plain
x86-64 float32, no FMA contraction, whatever the CPU backend is built with.)

    python -m tests.export.make_golden            # writes tests/export/golden/quants.npz + .json

Inputs are not stored: ``golden_inputs()`` regenerates them from seeds (numpy PCG64) and the
manifest keeps each input's sha256 so a generator change is reported as such, not as a quantizer
bug. Each output is ggml_quantize_chunk(type, rows, no imatrix), i.e. quantize_row_*_ref.
``--real`` also records sha256 digests of ggml's quantization of a few SmolLM2-135M tensors.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).parent / "golden"
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
REAL_TENSORS = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.7.mlp.down_proj.weight",
    "model.layers.29.mlp.gate_proj.weight",
]


def _bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bfloat16 value, kept as float32."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def _adversarial(rng: np.random.Generator) -> np.ndarray:
    """Rows of 256 that break sloppy ports: blank, tiny, huge, constant and lopsided groups."""
    n = 256
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    rows = {
        "zeros": np.zeros(n),
        "signed_zeros": np.where(rng.random(n) < 0.5, -0.0, 0.0),
        "const_pos": np.full(n, 0.5),
        "const_neg": np.full(n, -3.0),
        "tiny": sign * 1e-30,
        "tiny_gauss": g * 1e-30,
        "huge": sign * 6e4,
        "huge_gauss": np.clip(g * 3e4, -6e4, 6e4),
        "one_spike": np.where(np.arange(n) == 77, 1.0, 0.0),
        "spike_in_tiny": np.where(np.arange(n) == 200, -2.5, g * 1e-30),
        "ramp": np.linspace(-1, 1, n),
        "alternating": np.where(np.arange(n) % 2 == 0, 1.0, -1.0),
        # one loud 32-group among quiet ones: most group scales quantize to 0 (d*ls == 0 path)
        "lopsided32": g * np.where(np.arange(n) // 32 == 3, 100.0, 1e-3),
        # loudness falling group by group (16-groups), both signs
        "decades16": g * 10.0 ** -(np.arange(n) // 16 % 8),
        "positive_only": np.abs(g) + 0.25,
        "negative_only": -np.abs(g) - 0.25,
        "half_blank": np.where(np.arange(n) < 128, g, 0.0),
        "ties": np.round(g * 4) / 4,
    }
    return np.stack([np.asarray(r, dtype=np.float32) for r in rows.values()]), list(rows)


def golden_inputs() -> dict[str, np.ndarray]:
    """Input matrices [rows, n_per_row] float32 of every golden case, rebuilt from fixed seeds."""
    cases: dict[str, np.ndarray] = {}
    cases["normal"] = np.random.default_rng(101).standard_normal((16, 256)).astype(np.float32)
    cases["normal_wide"] = (np.random.default_rng(102).standard_normal((3, 4096)) * 0.02).astype(np.float32)
    cases["student_t3"] = np.random.default_rng(103).standard_t(3, (16, 256)).astype(np.float32)
    cases["student_t1_wide"] = (np.random.default_rng(104).standard_t(1, (2, 3072)) * 0.01).astype(np.float32)
    cases["bf16_valued"] = _bf16_round(np.random.default_rng(105).standard_normal((8, 1024)) * 0.05)
    rng = np.random.default_rng(106)
    outl = rng.standard_normal((8, 512)).astype(np.float32)
    outl[np.arange(8), rng.integers(0, 512, 8)] *= 40.0
    cases["outliers"] = outl
    cases["adversarial"], _ = _adversarial(np.random.default_rng(107))
    return cases


def adversarial_row_names() -> list[str]:
    return _adversarial(np.random.default_rng(107))[1]


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _ggml():
    """ctypes handle on libggml-base from the installed llama-cpp-python."""
    import llama_cpp  # noqa: F401  (loads the shared libraries)

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(next(lib_dir.glob("libggml-base.so*"))))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_void_p]
    return f


def ggml_quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """ggml_quantize_chunk(type, x) -> uint8 [rows, row_bytes] (reference path, no imatrix)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    if n % block:  # ggml would quantize across rows and overrun the buffer
        raise ValueError(f"{type_name} needs rows that are a multiple of {block}, got {n}")
    out = np.zeros((rows, n // block * size), dtype=np.uint8)
    written = _ggml()(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert written == out.nbytes, (type_name, written, out.nbytes)
    return out


def _real_digests() -> dict[str, dict[str, str]]:
    import gguf
    import torch
    from safetensors import safe_open

    from velotune.fixtures import smollm2_path

    digests: dict[str, dict[str, str]] = {}
    files = sorted(smollm2_path().glob("*.safetensors"))
    for name in REAL_TENSORS:
        for f in files:
            with safe_open(f, "pt") as st:
                if name in st.keys():
                    x = st.get_tensor(name).to(torch.float32).numpy()
        blocks = {t: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] for t in TYPES}
        digests[name] = {t: sha256(ggml_quantize(x, t)) for t in TYPES if x.shape[1] % blocks[t] == 0}
    return digests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="also record digests of real SmolLM2 tensors")
    args = ap.parse_args()
    import llama_cpp

    GOLDEN_DIR.mkdir(exist_ok=True)
    arrays, manifest = {}, {"ggml_source": f"llama-cpp-python=={llama_cpp.__version__}", "cases": {}}
    for case, x in golden_inputs().items():
        manifest["cases"][case] = {"shape": list(x.shape), "input_sha256": sha256(x)}
        for t in TYPES:
            arrays[f"{case}/{t}"] = ggml_quantize(x, t)
    np.savez_compressed(GOLDEN_DIR / "quants.npz", **arrays)
    if args.real:
        manifest["real_smollm2"] = _real_digests()
    (GOLDEN_DIR / "quants.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(arrays)} arrays to {GOLDEN_DIR}")


if __name__ == "__main__":
    main()
