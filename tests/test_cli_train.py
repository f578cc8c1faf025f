"""``velotune train``: a tiny-model run end to end (files and numbers), resume, and input errors (exit 2)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from velotune import _notices, is_bfloat16_supported
from velotune.cli import main


def write_config(tmp_path: Path, model_dir: str, name: str = "run.yaml", **sections) -> Path:
    """A run of 4 steps of 2 x 2 rows on the tiny model (fp32 LoRA, checkpoints at 2 and 4); ``sections``
    update the defaults section by section."""
    cfg = {
        "model": {"name": model_dir, "max_seq_length": 128, "load_in_4bit": False},
        "lora": {"r": 8, "lora_alpha": 16},
        "data": {"path": "bundled:alpaca", "max_rows": 64},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "save_steps": 2,
                     "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
                     "warmup_steps": 0, "logging_steps": 1},
        "memory": {"gradient_checkpointing": False},
        "export": {"methods": ["lora"]},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config, *overrides, capsys=None):
    """``velotune train config overrides...`` in this process: (exit code, stdout, stderr)."""
    code = main(["train", str(config), *overrides])
    out = capsys.readouterr() if capsys is not None else None
    return code, (out.out if out else ""), (out.err if out else "")


def report_of(out_dir: Path) -> dict:
    return json.loads((out_dir / "run_report.json").read_text())


def _losses(report: dict) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in report["history"]]


def _tokens_longer_than(tok_dir: str, n_rows: int, limit: int) -> tuple[int, int]:
    from transformers import AutoTokenizer

    from velotune import format_alpaca
    from velotune.data.bundled import load_alpaca_rows

    tok = AutoTokenizer.from_pretrained(tok_dir)
    texts = [format_alpaca(r["instruction"], r["input"], r["output"], tok.eos_token) for r in load_alpaca_rows()[:n_rows]]
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    return sum(n > limit for n in lengths), max(lengths)


def test_train_exports_reports_and_resumes_to_the_same_curve(tiny_dir, tmp_path, capsys, notices):
    cfg = write_config(tmp_path, tiny_dir())
    out = tmp_path / "out"
    code, stdout, stderr = train(cfg, "export.methods=[lora, merged_16bit]", capsys=capsys)
    assert code == 0, stderr
    # files: checkpoints (complete), exports, report, the config as run; nothing half-written
    assert sorted(p.name for p in out.iterdir() if p.name != "README.md") == [
        "checkpoint-2", "checkpoint-4", "lora", "merged_16bit", "run_report.json", "run_report.md",
        "velotune_config.yaml"]
    for ck in ("checkpoint-2", "checkpoint-4"):
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= {p.name for p in (out / ck).iterdir()}
    assert yaml.safe_load((out / "velotune_config.yaml").read_text())["export"]["methods"] == ["lora", "merged_16bit"]
    # the printed memory report, at the start and the end of training
    assert "No CUDA GPU: training on the CPU. Process peak memory so far =" in stdout
    assert "Process peak memory = " in stdout and "velotune train: completed: step 4" in stdout

    r = report_of(out)
    assert r["status"] == "completed" and r["steps"] == 4 and r["resumed_from"] is None
    assert r["config"]["training"]["learning_rate"] == 1e-3 and r["versions"]["torch"] == torch.__version__
    assert r["card"].startswith("CPU")
    # the loss curve: one row per step, finite, going down; linear schedule from 1e-3 without warmup
    steps, losses = zip(*_losses(r))
    assert steps == (1, 2, 3, 4) and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert [h["learning_rate"] for h in r["history"]] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert r["loss"]["train_final"] == losses[-1] and r["loss"]["train_best"] == min(losses)
    # tokens: what the trainer state counted; 4 steps x 4 rows of at most 128 tokens
    state4 = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert r["tokens"]["seen"] == state4["num_input_tokens_seen"] and 0 < r["tokens"]["seen"] <= 16 * 128
    assert r["tokens"]["per_second"] > 0 and r["train_seconds"] > 0
    assert r["memory"]["card"] == "CPU" and r["memory"]["peak_reserved"] > 0
    # data counts, checked against an independent count
    truncated, longest = _tokens_longer_than(tiny_dir(), 64, 128)
    assert r["data"]["rows_read"] == r["data"]["rows_used"] == 64 and r["data"]["dropped"] == {}
    assert (r["data"]["truncated"], r["data"]["longest_tokens"]) == (truncated, longest) and truncated > 0
    try:
        import matplotlib  # noqa: F401
        assert (out / "loss_curve.png").stat().st_size > 1000
    except ImportError:  # optional: said once per process, how to get it
        assert "no-matplotlib" in _notices._said and not (out / "loss_curve.png").exists()
    md = (out / "run_report.md").read_text()
    assert "# velotune run report: completed" in md and f"| 4 | {losses[-1]:.4f} |" in md
    # exports: the adapter is the last checkpoint's, trained (B != 0); the merged folder loads in transformers
    final = load_file(out / "lora" / "adapter_model.safetensors")
    ck4 = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    assert final.keys() == ck4.keys() and all(torch.equal(final[k], ck4[k]) for k in final)
    assert all(v.abs().max() > 0 for k, v in final.items() if "lora_B" in k)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged_16bit")
    assert merged.config.num_hidden_layers == 2

    # the same output folder again without resume: refused, nothing overwritten
    code, _, stderr = train(cfg, capsys=capsys)
    assert code == 2 and "already holds checkpoints of an earlier run (checkpoint-4); continue it with resume=true" in stderr

    # interrupted after step 2: the newest checkpoint and the outputs gone; resume gives the same curve
    import shutil

    for p in ("checkpoint-4", "lora", "merged_16bit", "run_report.json"):
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    code, stdout, stderr = train(cfg, "resume=true", capsys=capsys)
    assert code == 0, stderr
    r2 = report_of(out)
    assert r2["resumed_from"] == str(out / "checkpoint-2") and r2["steps"] == 4
    assert _losses(r2) == _losses(r)  # bit for bit: same seed, same data order, restored RNG and optimizer
    state2 = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert r2["tokens"]["seen"] == r["tokens"]["seen"] - state2["num_input_tokens_seen"]
    assert r2["tokens"]["session_steps"] == 2
    resumed = load_file(out / "lora" / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], final[k]) for k in final)

    # extending the finished run by one step; a changed learning rate is said (the curve will differ)
    code, _, stderr = train(cfg, "resume=true", "training.max_steps=5", "training.learning_rate=2e-3", capsys=capsys)
    assert code == 0, stderr
    assert report_of(out)["steps"] == 5 and _losses(report_of(out))[:4] == _losses(r)
    assert any(m.startswith("resume: training.learning_rate changed since the run began") for m in notices)
    assert not any("training.max_steps" in m for m in notices if m.startswith("resume:"))


def test_eval_fraction_reports_eval_loss(tiny_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_dir(), data={"eval_fraction": 0.125}, training={"eval_steps": 2})
    code, _, stderr = train(cfg, capsys=capsys)
    assert code == 0, stderr
    r = report_of(tmp_path / "out")
    evals = [(h["step"], h["eval_loss"]) for h in r["history"] if "eval_loss" in h]
    assert [s for s, _ in evals] == [2, 4] and all(math.isfinite(v) for _, v in evals)
    assert r["data"]["eval_rows"] == 8 and r["data"]["rows_used"] == 56
    assert r["loss"]["eval_final"] == evals[-1][1]


def test_print_config_and_show_defaults(tmp_path, capsys):
    cfg = write_config(tmp_path, "some/model")
    assert main(["train", str(cfg), "training.max_steps=7", "resume=true", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["max_steps"] == 7 and printed["training"]["resume"] is True
    assert printed["model"]["name"] == "some/model" and printed["lora"]["r"] == 8
    assert main(["train", "--show-defaults"]) == 0
    text = capsys.readouterr().out
    assert "  # optimizer steps; -1 trains num_train_epochs instead\n  max_steps: 60\n" in text
    # only overrides, no file
    assert main(["train", "model.name=m", "data.path=d.jsonl", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["path"] == "d.jsonl"


def test_input_errors_exit_2_before_the_model_loads(tiny_dir, tmp_path, capsys, monkeypatch):
    from velotune.api import FastLanguageModel

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded when the input is bad")

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", no_load)
    cases = [
        ({"training": {"max_step": 3}},
         "training.max_step is not a valid key; did you mean training.max_steps?"),
        ({"data": {"path": str(tmp_path / "missing.jsonl")}},
         f"data.path {tmp_path / 'missing.jsonl'}: no such file or folder"),
        ({"training": {"resume": True, "output_dir": str(tmp_path / "empty")}},
         f"resume=true but {tmp_path / 'empty'} holds no complete checkpoint (checkpoint-N)"),
        ({"training": {"resume": str(tmp_path)}},
         f"resume: {tmp_path} is not a complete checkpoint (no trainer_state.json)"),
    ]
    if not is_bfloat16_supported():
        cases.append(({"training": {"precision": "bf16"}},
                      "training.precision=bf16 needs a CUDA GPU of compute capability >= 8.0"))
    model_dir = tiny_dir()
    capsys.readouterr()  # building the tiny model (first use in this process) writes progress bars
    for i, (sections, expected) in enumerate(cases):
        code, _, stderr = train(write_config(tmp_path, model_dir, f"c{i}.yaml", **sections), capsys=capsys)
        assert code == 2 and stderr.startswith("velotune train: error: ") and expected in stderr, stderr
    assert main(["train"]) == 2
    assert "give a config file (see examples/) or key=value fields" in capsys.readouterr().err


@pytest.mark.real_model
def test_small_model_example_runs(real_model_dir, tmp_path, capsys):
    """examples/smollm2_alpaca.yaml as written, shortened to 2 steps of 2 rows (fp32 LoRA on the CPU)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "smollm2_alpaca.yaml"
    out = tmp_path / "out"
    code, _, stderr = train(example, f"model.name={real_model_dir}", f"model.load_in_4bit={torch.cuda.is_available()}",
                            "training.max_steps=2", "training.per_device_train_batch_size=2",
                            "training.gradient_accumulation_steps=1", "data.max_rows=40", "export.methods=lora",
                            f"training.output_dir={out}", capsys=capsys)
    assert code == 0, stderr
    r = report_of(out)
    assert r["status"] == "completed" and r["steps"] == 2
    assert r["data"]["rows_used"] == 38 and r["data"]["eval_rows"] == 2 and r["data"]["truncated"] == 0
    # SmolLM2-Instruct already answers Alpaca-style prompts: a loss near 2, not ln(49152) = 10.8 of a random model
    assert all(1.0 < h["loss"] < 4.0 for h in r["history"] if "loss" in h)
    assert math.isfinite(r["loss"]["eval_final"])
    adapter = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and sorted(adapter["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_memory_section_reaches_the_model(tiny_dir, tmp_path, capsys, monkeypatch):
    """memory.cuda_graphs and memory.memory_budget are applied to the model the run trains."""
    from velotune.models import graphs

    states = []
    real = graphs.set_memory_budget

    def spy(model, budget):
        real(model, budget)
        states.append(graphs.state_of(model.get_base_model()))

    monkeypatch.setattr(graphs, "set_memory_budget", spy)
    code, _, _ = train(write_config(tmp_path, tiny_dir(), training={"max_steps": 1, "save_steps": 1},
                                    memory={"gradient_checkpointing": "auto", "cuda_graphs": False,
                                            "memory_budget": 0.5}), capsys=capsys)
    assert code == 0 and len(states) == 1
    assert states[0].mode is False and states[0].memory_budget == 0.5
    from velotune.config import parse_config

    with pytest.raises(Exception, match="cuda_graphs"):
        parse_config({"memory": {"cuda_graphs": "sometimes"}})
