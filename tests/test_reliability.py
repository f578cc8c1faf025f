"""Runs that never lose work and never fail silently: bad data, NaN/inf, out of memory, killed saves,
pickles and remote code. Every case asserts the message the user sees."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, TrainerControl

from tests.test_cli_train import _losses, report_of, train, write_config
from velotune import VelotuneError
from velotune.config import DataConfig
from velotune.data.sources import load_training_data, prepare_data
from velotune.training.callbacks import NonFiniteGuard, oom_advice

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir())


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def data(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


ROW = {"instruction": "Say hi.", "input": "", "output": "Hi."}


# ------------------------------------------------------------------------------------ bad data
def test_bad_rows_are_dropped_counted_and_located(tmp_path, tok, notices):
    f = jsonl(tmp_path / "d.jsonl", [
        ROW,
        '{"instruction": "x", "output": ',                         # line 2: invalid JSON
        {"instruction": "Add.", "input": "1+1", "output": 2},     # line 3: non-string field
        {"instruction": "No answer."},                            # line 4: missing field
        {"instruction": "Empty.", "output": "   "},               # line 5: empty text
        [1, 2],                                                   # line 6: not an object
        {"instruction": "Long " * 300, "output": "ok"},           # line 7: longer than max_seq_length
        ROW,
    ])
    train_ds, eval_ds, report = load_training_data(data(f), tok, max_seq_length=256)
    assert len(train_ds) == 3 and eval_ds is None
    assert report.rows_read == 8 and report.rows_used == 3
    assert report.dropped == {"invalid JSON": 1, "non-string field": 1, "missing field": 1, "empty text": 1,
                              "not an object": 1}
    assert report.first_bad["invalid JSON"].startswith(f"{f} line 2: invalid JSON (Expecting value at column")
    assert report.first_bad["non-string field"] == f"{f} line 3: 'output' is int, not a string: 2"
    assert report.first_bad["missing field"] == f"{f} line 4: missing 'output'"
    assert report.first_bad["empty text"] == f"{f} line 5: 'output' is empty"
    assert report.first_bad["not an object"] == f"{f} line 6: a row must be a JSON object {{...}}, got list [1, 2]"
    assert report.truncated == 1 and report.longest_tokens > 300
    summary = notices[-1]
    assert summary.startswith(f"data: 8 rows read from {f} (format alpaca), 3 used. 5 dropped: 1 invalid JSON (first: ")
    assert "1 rows longer than max_seq_length=256 tokens (longest " in summary and "are truncated to 256" in summary


@pytest.mark.parametrize("rows, expected", [
    (['{"instruction": "x", "output": '], "d.jsonl line 2: invalid JSON (Expecting value at column 32)"),
    ([{"instruction": "x", "output": ["a"]}], "d.jsonl line 2: 'output' is list, not a string: [\"a\"]"),
    ([{"instruction": "x"}], "d.jsonl line 2: missing 'output'"),
])
def test_on_bad_row_error_stops_at_the_row(tmp_path, tok, rows, expected):
    f = jsonl(tmp_path / "d.jsonl", [ROW] + rows)
    with pytest.raises(VelotuneError) as e:
        prepare_data(data(f, on_bad_row="error"))
    assert str(e.value).endswith(expected + " (data.on_bad_row=error; set it to drop to skip such rows)")


def test_whole_source_problems(tmp_path, tok):
    cases = []
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    cases.append((data(empty), f"data.path {empty} holds no usable rows; check the file, the split, or data.max_rows"))
    arr = tmp_path / "arr.json"
    arr.write_text("[]")
    cases.append((data(arr), f"data.path {arr} holds no usable rows"))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]')
    cases.append((data(broken), f"{broken} line 3 column 23: invalid JSON (Expecting ',' delimiter)"))
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"hello"')
    cases.append((data(scalar), f"{scalar}: holds a JSON str; velotune reads a list of objects"))
    no_out = jsonl(tmp_path / "no_out.jsonl", [{"instruction": "a", "response": "b"}])
    cases.append((data(no_out, format="alpaca"), f"data.path {no_out}: no row has the column 'output' that "
                                                 "data.format=alpaca needs (columns: ['instruction', 'response'])"))
    cases.append((data(no_out), "cannot tell the data format from the columns ['instruction', 'response']: set "
                                "data.format to alpaca"))
    all_bad = jsonl(tmp_path / "all_bad.jsonl", [{"instruction": "a", "output": 1}, {"instruction": "b", "output": 2}])
    cases.append((data(all_bad), f"every row of {all_bad} was dropped: data: 2 rows read from {all_bad} (format "
                                 "alpaca), 0 used. 2 dropped: 2 non-string field"))
    xlsx = tmp_path / "d.xlsx"
    xlsx.write_bytes(b"PK")
    cases.append((data(xlsx), f"data.path {xlsx}: unsupported file type '.xlsx'; use .json, .jsonl"))
    cases.append((data(tmp_path / "nope"), f"data.path {tmp_path / 'nope'}: no such file or folder"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    cases.append((data(folder), f"data.path {folder}: the folder holds no .json, .jsonl, .ndjson, .csv, .parquet files"))
    cases.append((data("bundled:dolly"), "data.path bundled:dolly: no bundled data set 'dolly'; bundled: bundled:alpaca"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    cases.append((data(latin), f"{latin}: not UTF-8 text (byte 13); re-save it as UTF-8"))
    parquet = tmp_path / "fake.parquet"
    parquet.write_text("not parquet")
    cases.append((data(parquet), f"{parquet}: not a readable Parquet file"))
    for cfg, expected in cases:
        with pytest.raises(VelotuneError) as e:
            prepare_data(cfg)
        assert expected in str(e.value), (expected, str(e.value))
    with pytest.raises(VelotuneError, match=r"data.eval_fraction=0.1 leaves no training rows of 1; lower it or add rows"):
        load_training_data(data(jsonl(tmp_path / "one.jsonl", [ROW]), eval_fraction=0.1), tok, 64)


def test_csv_parquet_folder_and_saved_dataset(tmp_path, tok):
    from datasets import Dataset, DatasetDict

    csv_file = tmp_path / "d.csv"
    csv_file.write_text('instruction,input,output\nSay hi.,,Hi.\n"Two, fields",x\nAdd.,1+1,2\n')
    prepared = prepare_data(data(csv_file))
    assert prepared.format == "alpaca" and prepared.items == [("Say hi.", "", "Hi."), ("Add.", "1+1", "2")]
    assert prepared.report.first_bad == {"wrong field count": f"{csv_file} line 3: 2 fields, the header has 3"}
    Dataset.from_list([{"text": "hello world"}, {"text": "bye"}]).to_parquet(tmp_path / "p" / "a.parquet")
    jsonl(tmp_path / "p" / "b.jsonl", [{"text": "third"}])
    prepared = prepare_data(data(tmp_path / "p"))
    assert prepared.format == "text" and prepared.items == ["hello world", "bye", "third"]
    assert prepared.where == [f"{tmp_path / 'p' / 'a.parquet'} row 0", f"{tmp_path / 'p' / 'a.parquet'} row 1",
                              f"{tmp_path / 'p' / 'b.jsonl'} line 1"]
    DatasetDict({"validation": Dataset.from_list([ROW])}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(VelotuneError, match=r"has no split 'train' \(splits: \['validation'\]\); set data.split"):
        prepare_data(data(tmp_path / "saved"))
    assert prepare_data(data(tmp_path / "saved", split="validation")).items == [("Say hi.", "", "Hi.")]


def test_chat_rows(tmp_path, tok):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    f = jsonl(tmp_path / "chat.jsonl", [
        good,
        {"conversations": [{"from": "wizard", "value": "Hi"}]},                 # unknown role
        {"conversations": "Hi"},                                                # not a list
        {"conversations": [{"from": "human", "value": 5}]},                     # non-string content
    ])
    train_ds, _, report = load_training_data(data(f), tok, 128)
    assert report.format == "sharegpt" and train_ds["text"] == ["<s>user\nHi</s>\n<s>assistant\nHello</s>\n"]
    assert report.dropped == {"malformed conversation": 3}
    assert report.first_bad["malformed conversation"].startswith(f"{f} line 2: message 0: unknown role 'wizard'")
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(VelotuneError, match="data.format=sharegpt needs a chat template, and this tokenizer "
                                                "has none: set data.chat_template"):
            load_training_data(data(f), tok, 128)
    finally:
        tok.chat_template = saved


# ------------------------------------------------------------------------ batches, NaN, OOM
def test_all_masked_batches_are_skipped_and_said(tiny_dir, tmp_path, notices):
    from trl import SFTConfig

    from velotune import FastLanguageModel, SFTTrainer
    from velotune.data.bundled import load_alpaca_dataset

    model, tk = FastLanguageModel.from_pretrained(tiny_dir(), max_seq_length=64, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    ds = load_alpaca_dataset().select(range(8)).map(lambda r: {"text": r["instruction"] + " " + r["output"]})

    def masked(rows):
        batch = tk.pad({"input_ids": [r["input_ids"] for r in rows]}, return_tensors="pt")
        batch["labels"] = torch.full_like(batch["input_ids"], -100)
        return batch

    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=1e-2, weight_decay=0.1, optim="adamw_8bit", report_to="none", save_strategy="no",
                     logging_steps=1, bf16=False, dataset_text_field="text", max_length=64)
    trainer = SFTTrainer(model=model, processing_class=tk, train_dataset=ds, data_collator=masked, args=args)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = trainer.train()
    assert trainer.skipped_masked_batches == 4 and out.training_loss == 0.0  # never 0/0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)  # no update
    said = [m for m in notices if "every label is masked" in m]
    assert len(said) == 3  # the 1st, 2nd and 4th: counted, not spammed
    assert said[0].startswith("step 1: skipped a batch whose every label is masked (no token to learn from; 1 so far)")


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_dir, tmp_path, capsys, monkeypatch):
    from velotune.training.trainer import SFTTrainer

    real = SFTTrainer.compute_loss

    def nan_from_step_3(self, model, inputs, *a, **k):
        loss = real(self, model, inputs, *a, **k)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_from_step_3)
    out = tmp_path / "out"
    code, _, stderr = train(write_config(tmp_path, tiny_dir(), export={"methods": ["lora"]}), capsys=capsys)
    assert code == 1
    assert ("velotune train: error: training stopped at step 3: the gradient is not finite (NaN or inf). Likely "
            "causes: learning_rate=0.001 too high (try 0.0001); an overflow in the model's dtype (this run is not "
            "fp16") in stderr
    assert f"The last good checkpoint is kept: {out / 'checkpoint-2'}" in stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and not (out / "lora").exists()
    r = report_of(out)
    assert r["status"] == "stopped: non-finite at step 3" and "training stopped at step 3" in r["error"]
    assert math.isnan(r["history"][-1]["loss"]) and math.isfinite(r["loss"]["train_best"])


def test_guard_messages_for_loss_and_fp16(tmp_path):
    args = SimpleNamespace(fp16=True, learning_rate=2e-4, output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=7, best_model_checkpoint=None)
    guard, control = NonFiniteGuard(), TrainerControl()
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([float("inf"), 0.0])
    guard.on_pre_optimizer_step(args, state, control, model=torch.nn.ParameterList([p]))
    assert guard.message is None  # fp16: the gradient scaler skips overflowing steps itself
    guard.on_log(args, state, control, logs={"loss": float("inf")})
    assert guard.message.startswith("training stopped at step 7: the loss is not finite (NaN or inf). Likely causes: "
                                    "learning_rate=0.0002 too high (try 2e-05); fp16 overflow: this run uses fp16")
    assert "No checkpoint had been written yet (training.save_steps)." in guard.message
    assert control.should_training_stop and not control.should_save


def test_out_of_memory_gives_this_runs_numbers(tiny_dir, tmp_path, capsys, monkeypatch):
    from velotune.training.trainer import SFTTrainer

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SFTTrainer, "training_step", oom)
    code, _, stderr = train(write_config(tmp_path, tiny_dir()), capsys=capsys)
    assert code == 1
    assert "velotune train: error: out of memory on CPU. For this run, change (most effective first):" in stderr
    assert "  - model.load_in_4bit: true (QLoRA" in stderr
    assert "  - memory.gradient_checkpointing: true (now False;" in stderr
    assert ("  - training.per_device_train_batch_size: 1 with training.gradient_accumulation_steps: 4 (now 2 x 2: "
            "the same 4 rows per step") in stderr
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in stderr
    assert report_of(tmp_path / "out")["status"] == "out of memory"
    advice = oom_advice(load_in_4bit=True, max_seq_length=4096, batch_size=8, grad_accum=2,
                        gradient_checkpointing="unsloth", longest_tokens=1500, device="NVIDIA H100")
    assert advice.startswith("out of memory on NVIDIA H100.") and "load_in_4bit" not in advice
    assert "per_device_train_batch_size: 4 with training.gradient_accumulation_steps: 4 (now 8 x 2" in advice
    assert "model.max_seq_length: 750 (now 4096;" in advice  # half the longest row: longer rows truncated, counted
    assert "nothing left to shrink" in oom_advice(load_in_4bit=True, max_seq_length=256, batch_size=1, grad_accum=8,
                                                  gradient_checkpointing="unsloth")


# ------------------------------------------------------------------------------- checkpoints
KILL_AT_STEP_4 = """
import os, signal, sys
from transformers import Trainer
from velotune.cli import main

real = Trainer._save_rng_state

def killed(self, output_dir):
    if self.state.global_step == 4:  # adapter, optimizer, scheduler written; RNG and trainer state not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, output_dir)

Trainer._save_rng_state = killed
sys.exit(main(["train", sys.argv[1]]))
"""


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resume_matches(tiny_dir, tmp_path, capsys, notices):
    """A real SIGKILL, sent by the training process to itself in the middle of writing checkpoint-4."""
    cfg = write_config(tmp_path, tiny_dir())
    out = tmp_path / "out"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP_4, str(cfg)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    staged = list(out.glob(".tmp-checkpoint-4-*/checkpoint-4"))
    assert len(staged) == 1 and (staged[0] / "optimizer.pt").is_file()  # killed mid-save, for real
    assert not (staged[0] / "trainer_state.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")  # plain transformers picks it too
    code, _, stderr = train(cfg, "resume=true", capsys=capsys)
    assert code == 0, stderr
    assert any(m.startswith(f"removed 1 unfinished checkpoint save(s) left by an interrupted run in {out}") for m in notices)
    assert not list(out.glob(".tmp-*"))
    resumed = report_of(out)
    # the reference: the same config, never interrupted
    code, _, _ = train(cfg, f"training.output_dir={tmp_path / 'ref'}", capsys=capsys)
    assert code == 0
    reference = _losses(report_of(tmp_path / "ref"))
    assert [s for s, _ in _losses(resumed)] == [1, 2, 3, 4]
    # steps 1-2 come from the killed process, 3-4 from this one: same numbers up to thread scheduling
    assert [x for _, x in _losses(resumed)] == pytest.approx([x for _, x in reference], rel=1e-6)


def test_a_failed_write_leaves_the_previous_checkpoint(tiny_dir, tmp_path, capsys, monkeypatch):
    """An injected ENOSPC half-way through writing checkpoint-4 (after the adapter and optimizer)."""
    import errno

    from transformers import Trainer

    real = Trainer._save_rng_state

    def disk_full(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full)
    out = tmp_path / "out"
    code, _, stderr = train(write_config(tmp_path, tiny_dir()), capsys=capsys)
    assert code == 1
    assert (f"writing to {out} failed after step 4 ([Errno 28] No space left on device); the earlier checkpoints are "
            "intact: free disk space, then resume=true") in stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".tmp", "checkpoint"))) == ["checkpoint-2"]
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(out / "checkpoint-2").r == 8  # loadable


# ----------------------------------------------------------------------- pickles, remote code
def test_pickled_weights_are_refused_unless_allowed(tiny_dir, tmp_path, capsys, notices):
    import shutil

    from safetensors.torch import load_file

    from velotune.cli.train import check_model_folder

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir(), folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    code, _, stderr = train(write_config(tmp_path, str(folder)), capsys=capsys)
    assert code == 2
    assert (f"model.name={folder} holds only pickled weights (pytorch_model.bin): unpickling can run arbitrary code. "
            "Convert them to safetensors where you trust the source, or set model.allow_pickle: true") in stderr
    check_model_folder(folder, allow_pickle=True, trust_remote_code=False)
    assert f"loading pickled weights from {folder} (model.allow_pickle: true)" in notices
    ck = tmp_path / "checkpoint-3"
    ck.mkdir()
    for name in ("adapter_model.bin", "optimizer.pt", "trainer_state.json"):
        (ck / name).write_text("{}")
    code, _, stderr = train(write_config(tmp_path, tiny_dir(), training={"resume": str(ck)}), capsys=capsys)
    assert code == 2 and f"the checkpoint={ck} holds only pickled weights (adapter_model.bin)" in stderr


def test_remote_code_needs_trust(tmp_path, notices):
    from velotune.cli.train import check_model_folder

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.json").write_text(json.dumps({"model_type": "my_custom_lm",
                                                    "auto_map": {"AutoModelForCausalLM": "modeling.MyLM"}}))
    with pytest.raises(VelotuneError) as e:
        check_model_folder(folder, allow_pickle=False, trust_remote_code=False)
    assert str(e.value) == (f"model.name={folder} needs its own Python code (config.json auto_map, model_type "
                            "'my_custom_lm' unknown to transformers); velotune does not run it unless "
                            "model.trust_remote_code: true. Read that code first")
    check_model_folder(folder, allow_pickle=False, trust_remote_code=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}}))
    check_model_folder(folder, allow_pickle=False, trust_remote_code=False)
    assert any("auto_map ignored, using transformers' own llama code" in m for m in notices)
