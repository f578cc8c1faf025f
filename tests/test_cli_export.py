"""``velotune export``: run / adapter / model folder -> GGUF, merged 16-bit, LoRA; argument errors exit 2."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.export.test_save_gguf import lora_model, make_llama_vocab_model
from velotune.cli import main

IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base model folder, adapter folder, logits of the 4-bit base + adapter on ``IDS``)."""
    root = tmp_path_factory.mktemp("cli-export")
    base = make_llama_vocab_model(root / "base")
    model, tok = lora_model(base, load_in_4bit=True)
    model.save_pretrained_merged(root / "adapter", tok, save_method="lora")
    with torch.no_grad():
        want = model(input_ids=IDS).logits.float()
    return base, root / "adapter", want



def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_adapter_to_gguf_q8_0_loads_in_transformers(folders, tmp_path, capsys):
    base, adapter, want = folders
    assert main(["export", str(adapter), "--to", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "d")]) == 0
    path = tmp_path / "d" / "model.Q8_0.gguf"
    assert f"wrote {path}" in capsys.readouterr().out
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", "model.Q8_0.gguf"]
    got = _logits(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32))
    without = _logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    # measured: q8_0 moves these logits by 1.4% of their largest (0.0094 of 0.68; f16: 0.0003);
    # dropping the adapter moves them 60x more
    err = (got - want).abs().max()
    assert err <= 3e-2 * want.abs().max() and (without - want).abs().max() > 10 * err


def test_adapter_onto_16bit_base_matches_plain_peft(folders, tmp_path):
    from peft import PeftModel

    base, adapter, _ = folders
    out = tmp_path / "d"
    assert main(["export", str(adapter), "--to", "gguf", "--quant", "f16", "--no-load-in-4bit", "--out", str(out)]) == 0
    got = _logits(AutoModelForCausalLM.from_pretrained(out, gguf_file="model.F16.gguf", dtype=torch.float32))
    # oracle: plain transformers + PEFT on the unquantised base (velotune not involved)
    want = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter))
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()  # f16 weights: measured 6e-4 of the largest


def test_adapter_to_merged_16bit_and_lora(folders, tmp_path):
    base, adapter, want = folders
    assert main(["export", str(adapter), "--to", "merged_16bit", "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert json.loads((tmp_path / "m" / "config.json").read_text()).get("quantization_config") is None
    torch.testing.assert_close(_logits(merged), want, rtol=0.05, atol=0.05)  # bf16 weights (CPU default)
    assert main(["export", str(adapter), "--to", "lora", "--out", str(tmp_path / "l")]) == 0
    cfg = json.loads((tmp_path / "l" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and (tmp_path / "l" / "adapter_model.safetensors").is_file()


def test_model_folder_to_gguf_straight_from_its_weights(folders, tmp_path):
    base, _, _ = folders
    out = tmp_path / "g"
    assert main(["export", str(base), "--to", "gguf", "--quant", "f16", "quantized", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.F16.gguf", "model.Q4_K_M.gguf"]
    assert gguf.GGUFReader(out / "model.Q4_K_M.gguf").fields["general.file_type"].contents() == 15


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/nope", "--to", "gguf"], r"SOURCE .*/nope: no such folder; pass a PEFT adapter folder"),
    (["{tmp}", "--to", "gguf"], r"holds neither adapter_config.json .* nor config.json"),
    (["{adapter}", "--to", "ggml"],  # quoting of the choices varies by Python version
     r"argument --to: invalid choice: 'ggml' \(choose from '?merged_16bit'?, '?lora'?, '?gguf'?\)"),
    (["{adapter}", "--to", "gguf", "--quant", "q8_0", "q4_k_xl"],
     r"--quant q4_k_xl: unknown quantization_method 'q4_k_xl'; valid: .*q4_k_m"),
    (["{adapter}", "--to", "lora", "--quant", "q8_0"], r"--quant applies to --to gguf only"),
    (["{base}", "--to", "lora"], r"is a model folder, not a PEFT adapter: --to lora needs an adapter folder"),
    (["{base}", "--to", "gguf", "--load-in-4bit"], r"--load-in-4bit applies to adapter folders"),
    (["{adapter}", "--to", "gguf", "--max-seq-length", "0"], r"--max-seq-length 0 must be a positive number"),
    (["{adapter}", "--to", "gguf", "--no-out"], r"unrecognized arguments: --no-out"),
])
def test_bad_arguments_exit_2_with_the_fix(argv, message, folders, tmp_path, capsys):
    base, adapter, _ = folders
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path, base=base, adapter=adapter) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["export", *argv, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: velotune") and len(re.findall(message, err)) == 1
    assert not out.exists()


def test_out_is_required(folders, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(folders[1]), "--to", "gguf"])
    assert e.value.code == 2 and "the following arguments are required: --out" in capsys.readouterr().err


def test_failure_during_export_exits_1_with_its_message(tiny_dir, tmp_path, capsys):
    source = tiny_dir("llama")  # the tiny models' own byte-level BPE: a pre-tokenizer llama.cpp cannot identify
    capsys.readouterr()
    assert main(["export", source, "--to", "gguf", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("velotune export: error: unknown BPE pre-tokenizer") and "Known: " in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ velotune train run folders
@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    """A finished ``velotune train`` run of the tiny llama: fp32 LoRA (model.load_in_4bit: false), 2 steps,
    checkpoints 1 and 2, the final lora export, the run report."""
    from tests.test_cli_train import write_config

    root = tmp_path_factory.mktemp("cli-export-run")
    cfg = write_config(root, tiny_dir(), data={"max_rows": 8},
                       training={"max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 1,
                                 "gradient_accumulation_steps": 1})
    assert main(["train", str(cfg)]) == 0
    return root / "out"


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_exports_its_final_adapter_onto_the_base_it_trained_on(run_dir, tmp_path, capsys, monkeypatch):
    from velotune.api import FastLanguageModel

    calls = []
    real = FastLanguageModel.from_pretrained

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", spy)
    capsys.readouterr()
    assert main(["export", str(run_dir), "--to", "lora", "--out", str(tmp_path / "l")]) == 0
    err = capsys.readouterr().err
    assert (f"velotune export: {run_dir} is a run folder: using {run_dir / 'lora'} (the run's final lora export "
            "(named by run_report.json))") in err
    assert "the run trained on a 16-bit base (model.load_in_4bit: false): merging onto the same" in err
    # the run's own settings, not export's defaults (4-bit, 2048)
    assert [(c["load_in_4bit"], c["max_seq_length"]) for c in calls] == [(False, 128)]
    got = _tensors(tmp_path / "l")
    assert _same(got, _tensors(run_dir / "lora")) and _same(got, _tensors(run_dir / "checkpoint-2"))
    assert not _same(got, _tensors(run_dir / "checkpoint-1"))  # training moved the adapter between saves


def test_killed_run_exports_its_newest_complete_checkpoint(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for name in ("lora", "run_report.json", "run_report.md"):  # killed before exporting and reporting
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-3")  # a save without its trainer state
    (run / "checkpoint-3" / "trainer_state.json").unlink()
    shutil.copytree(run / "checkpoint-1", run / ".tmp-checkpoint-4-ab12")  # an interrupted staged save
    capsys.readouterr()
    assert main(["export", str(run), "--to", "lora", "--out", str(tmp_path / "l")]) == 0
    assert (f"using {run / 'checkpoint-2'} (the newest complete checkpoint of 2; the run has no final lora "
            "export)") in capsys.readouterr().err
    assert _same(_tensors(tmp_path / "l"), _tensors(run / "checkpoint-2"))


def _fake_run(root: Path, *, report=None, config=None, exports=(), checkpoints=(), incomplete=()) -> Path:
    """A run folder of empty-weight stand-ins (only the file names matter to the choice)."""
    root.mkdir(parents=True)
    for name in exports:
        (root / name).mkdir(parents=True)
        (root / name / ("config.json" if name.endswith("merged_16bit") else "adapter_config.json")).write_text("{}")
    for step in (*checkpoints, *incomplete):
        (root / f"checkpoint-{step}").mkdir()
        (root / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
        if step in checkpoints:
            (root / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    if report is not None:
        (root / "run_report.json").write_text(json.dumps(report))
    if config is not None:
        (root / "velotune_config.yaml").write_text(config)
    return root


@pytest.mark.parametrize("layout,order,picked,why", [
    (dict(report={"status": "completed", "outputs": {"lora": "{root}/lora", "merged_16bit": "{root}/merged_16bit"}},
          exports=["lora", "merged_16bit"], checkpoints=[5, 10]),
     "export", "lora", "the run's final lora export (named by run_report.json)"),
    # a resumed run that failed: its exports predate the newest checkpoint
    (dict(report={"status": "stopped: non-finite at step 12"}, exports=["lora"], checkpoints=[5, 10]),
     "export", "checkpoint-10", "the newest complete checkpoint of 2; the run report says 'stopped: non-finite"),
    (dict(exports=["merged_16bit"], checkpoints=[5, 10], incomplete=[15]),
     "export", "checkpoint-10", "the newest complete checkpoint of 2; the run has no final lora export"),
    (dict(exports=["merged_16bit"], checkpoints=[5, 10]),
     "chat", "merged_16bit", "the run's final merged_16bit export"),
    (dict(exports=["merged_16bit"]), "export", "merged_16bit", "the run's final merged_16bit export"),
    (dict(config="export:\n  dir: {root}/exports\n", exports=["exports/lora"], checkpoints=[5]),
     "export", "exports/lora", "the run's final lora export"),
    # a report written with a relative output_dir, read from another working directory
    (dict(report={"status": "completed", "outputs": {"lora": "elsewhere/outputs/lora"}}, exports=["lora"]),
     "chat", "lora", "the run's final lora export (named by run_report.json)"),
])
def test_run_folder_choice(layout, order, picked, why, tmp_path):
    from velotune.cli import chat, export
    from velotune.cli._runs import pick_from_run

    root = tmp_path / "run"
    if "config" in layout:
        layout = {**layout, "config": layout["config"].format(root=root)}
    outputs = layout.get("report", {}).get("outputs", {})
    if outputs:
        outputs = {k: v.replace("{root}", str(root)) for k, v in outputs.items()}
        layout = {**layout, "report": {**layout["report"], "outputs": outputs}}
    run = _fake_run(root, **layout)
    pick = pick_from_run(run, export.RUN_ORDER if order == "export" else chat.RUN_ORDER)
    assert pick.path == run / picked and pick.why.startswith(why), pick


def test_run_folder_errors_exit_2(tmp_path, capsys):
    half = _fake_run(tmp_path / "half", incomplete=[3])
    merged_only = _fake_run(tmp_path / "merged", report={"status": "completed"}, exports=["merged_16bit"])
    cases = [
        ([str(half), "--to", "gguf"], f"SOURCE {half} is a velotune train run folder but holds no final export "
                                      "(lora/, merged_16bit/) and no complete checkpoint-N (checkpoint-3 incomplete"),
        ([str(merged_only), "--to", "lora"], f"SOURCE {merged_only / 'merged_16bit'} is a model folder, not a PEFT "
                                             "adapter: --to lora needs an adapter folder"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            main(["export", *argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and expected in err, err
    assert not (tmp_path / "out").exists()
