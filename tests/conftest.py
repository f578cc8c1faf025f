"""Test-wide setup: CPU thread behaviour, Triton interpreter on GPU-less machines, markers, fixtures."""
from __future__ import annotations

import os

# Before torch/triton are imported anywhere: see ARCHITECTURE.md "Known traps".
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton needs this before its import to run kernels on the CPU (interpreter, ~1 ms/program).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cudnn_shapes_per_test(monkeypatch):
    """Each test starts with no attention shape counted against cuDNN's limit (models/attention.py), so
    a test's paths run the same backend whatever ran before it in the process."""
    from velotune.models import attention

    monkeypatch.setattr(attention, "_cudnn_shapes", set())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: tiny_dir(family) -> folder of a tiny random-init checkpoint (built once per session)."""
    from tests.tiny_models import make_tiny_model

    cache = {}

    def get(family: str = "llama", **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"), **kw)
        return str(cache[key])

    return get


@pytest.fixture(scope="session")
def real_model_dir():
    """The SmolLM2-135M-Instruct fixture folder; skipped (or failed in CI) when it is not built."""
    from velotune.fixtures import smollm2_path, smollm2_ready

    if not smollm2_ready():
        msg = "the real small-model fixture is not built: run `python -m velotune.fixtures` (scripts/setup.sh does)"
        if os.environ.get("VELOTUNE_REQUIRE_FIXTURES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return str(smollm2_path())


@pytest.fixture
def notices():
    """Messages velotune says (its logger does not propagate to the root logger that caplog watches)."""
    import logging

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("velotune")
    logger.addHandler(handler)
    yield said
    logger.removeHandler(handler)
