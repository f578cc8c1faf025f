"""Progress bars: the training bar's postfix (loss, lr, tokens/s), merging and GGUF writing."""
from __future__ import annotations

import re

from transformers import TrainingArguments
from transformers.utils import logging as hf_logging

from velotune import FastLanguageModel, SFTTrainer, get_alpaca_formatter
from velotune.data.bundled import load_alpaca_dataset
from velotune.export.merge import merged_tensor_shapes
from velotune.training.callbacks import ProgressPostfix


def _model(tiny_dir):
    model, tok = FastLanguageModel.from_pretrained(tiny_dir(), max_seq_length=128, load_in_4bit=False)
    return FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3), tok


def test_training_bar_shows_loss_lr_and_tokens_per_second(tiny_dir, tmp_path):
    model, tok = _model(tiny_dir)
    ds = load_alpaca_dataset().select(range(8)).map(get_alpaca_formatter(tok), batched=True)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, logging_steps=1,
                             learning_rate=1e-3, report_to="none", save_strategy="no", disable_tqdm=False,
                             include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=ds, dataset_text_field="text",
                         max_seq_length=128, args=args)
    post = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressPostfix))
    trainer.train()
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert post.last["loss"] == f"{last['loss']:.4f}" and post.last["lr"] == f"{last['learning_rate']:.2e}"
    assert float(post.last["tok/s"].replace(",", "")) > 0


def _bar_total(err: str, desc: str) -> tuple[int, int]:
    m = re.findall(re.escape(desc) + r".*?(\d+)/(\d+)", err)
    assert m, err[-2000:]
    return int(m[-1][0]), int(m[-1][1])


def test_merge_and_gguf_show_progress(tiny_dir, tmp_path, capsys):
    from tests.export.test_save_gguf import llama_vocab_tokenizer

    model, tok = _model(tiny_dir)
    n = len(merged_tensor_shapes(model))
    model.save_pretrained_merged(str(tmp_path / "merged"), tok)
    done, total = _bar_total(capsys.readouterr().err, "merging LoRA + saving")
    assert done == total == n
    # a tokenizer llama.cpp can read (the tiny models' own pre-tokenizer is unknown to it)
    model.save_pretrained_gguf(str(tmp_path / "gguf"), llama_vocab_tokenizer(), quantization_method=["f16", "q8_0"])
    err = capsys.readouterr().err
    for method in ("f16", "q8_0"):
        done, total = _bar_total(err, f"GGUF {method}")
        assert done == total > 0


def test_bars_follow_transformers_switch(tiny_dir, tmp_path, capsys):
    model, tok = _model(tiny_dir)
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained_merged(str(tmp_path / "merged"), tok)
    finally:
        hf_logging.enable_progress_bar()
    assert "merging LoRA + saving" not in capsys.readouterr().err
