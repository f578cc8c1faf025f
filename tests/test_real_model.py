"""The real small model (SmolLM2-135M-Instruct): training moves the loss; adapters and merges are exact."""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments

from velotune import FastLanguageModel, SFTTrainer, get_alpaca_formatter
from velotune.data.bundled import load_alpaca_rows

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def trained(real_model_dir, tmp_path_factory):
    """20 LoRA steps on one fixed batch of 4 bundled rows (fp32, CPU); returns (model, tokenizer, losses)."""
    out = tmp_path_factory.mktemp("real")
    model, tok = FastLanguageModel.from_pretrained(real_model_dir, max_seq_length=256, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=False)
    rows = [r for r in load_alpaca_rows() if r["input"]][:4]
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in ("instruction", "input", "output")})
    ds = ds.map(get_alpaca_formatter(tok), batched=True)
    args = TrainingArguments(output_dir=str(out / "run"), per_device_train_batch_size=4, max_steps=20,
                             learning_rate=2e-3, lr_scheduler_type="constant", logging_steps=1, optim="adamw_torch",
                             weight_decay=0.0, seed=3407, report_to="none", disable_tqdm=True)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=ds, dataset_text_field="text", args=args)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model.eval(), tok, losses, out


def _ids(tok):
    texts = ["Rewrite the date in ISO 8601 format (YYYY-MM-DD).\nMarch 5, 2021", "The capital of Norway is"]
    return tok(texts, return_tensors="pt", padding=True)


def test_twenty_steps_reduce_loss(trained):
    _, _, losses, _ = trained
    assert len(losses) == 20
    assert losses[-1] < 0.6 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_adapter_reload_identical_logits(trained, real_model_dir):
    model, tok, _, out = trained
    enc = _ids(tok)
    with torch.no_grad():
        want = model(**enc).logits
    model.save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    back, _ = FastLanguageModel.from_pretrained(str(out / "adapter"), max_seq_length=256, load_in_4bit=False)
    with torch.no_grad():
        got = back.eval()(**enc).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_merged_matches_adapter_model(trained):
    model, tok, _, out = trained
    enc = _ids(tok)
    model.save_pretrained_merged(out / "merged", tok, save_method="merged_16bit", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    with torch.no_grad():
        want = model(**enc).logits
        got = merged(**enc).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
