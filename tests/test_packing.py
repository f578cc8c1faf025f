"""Padding-free packing: a packed row computes exactly what the same examples padded compute.

Packed rows come from TRL's own padding-free collator (position_ids restart per example, labels
masked at boundaries); velotune's fast forward must keep attention inside each example.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tests.tiny_models import randomize_lora_b
from velotune import FastLanguageModel
from velotune.models import set_fast_forward

TEXTS = ["The capital of France is Paris.", "Add the two numbers: 12 and 30. The sum is 42, of course.",
         "Sort: 5, 3, 9.", "Rewrite the date in ISO 8601 format: March 5, 2021 becomes 2021-03-05 exactly."]


def _model(tiny_dir, family="llama"):
    model, tok = FastLanguageModel.from_pretrained(tiny_dir(family), load_in_4bit=True, max_seq_length=256)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.1)
    return model, tok


def _batches(tok):
    examples = [{"input_ids": tok(t)["input_ids"]} for t in TEXTS]
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert (packed["position_ids"][0] == 0).sum() == len(TEXTS)
    return packed, padded, [len(e["input_ids"]) for e in examples]


def _loss_and_grads(model, batch, n_items):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, num_items_in_batch=torch.tensor(n_items)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_packed_equals_padded(tiny_dir, family):
    model, tok = _model(tiny_dir, family)
    model.train()
    packed, padded, lengths = _batches(tok)
    n_items = sum(L - 1 for L in lengths)  # targets: every token but each example's first
    assert int((packed["labels"][0, 1:] != -100).sum()) == n_items
    loss_pk, g_pk = _loss_and_grads(model, packed, n_items)
    loss_pd, g_pd = _loss_and_grads(model, padded, n_items)
    torch.testing.assert_close(loss_pk, loss_pd, rtol=1e-5, atol=1e-6)
    for n in g_pd:
        torch.testing.assert_close(g_pk[n], g_pd[n], rtol=1e-4, atol=1e-6, msg=n)
    # ... and both equal HF's own forward on the padded batch
    set_fast_forward(model, False)
    loss_hf, g_hf = _loss_and_grads(model, padded, n_items)
    set_fast_forward(model, True)
    torch.testing.assert_close(loss_pk, loss_hf, rtol=1e-5, atol=1e-6)
    for n in g_hf:
        torch.testing.assert_close(g_pk[n], g_hf[n], rtol=1e-4, atol=1e-6, msg=n)


def test_packed_per_token_losses(tiny_dir):
    """Per-token losses of each example inside the packed row == those of the example alone."""
    model, tok = _model(tiny_dir)
    model.eval()
    packed, _, lengths = _batches(tok)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for L in lengths:
            ids = packed["input_ids"][0, start:start + L]
            alone = model(input_ids=ids[None]).logits[0]
            tok_pk = F.cross_entropy(logits[start:start + L - 1].float(), ids[1:], reduction="none")
            tok_alone = F.cross_entropy(alone[:-1].float(), ids[1:], reduction="none")
            torch.testing.assert_close(tok_pk, tok_alone, rtol=1e-5, atol=1e-5)
            start += L


def test_packing_leak_is_detected(tiny_dir):
    """Guard for the test above: with attention allowed across examples the losses differ."""
    model, tok = _model(tiny_dir)
    model.eval()
    packed, _, lengths = _batches(tok)
    ids = packed["input_ids"]
    with torch.no_grad():
        leaky = model(input_ids=ids).logits[0]  # positions 0..T-1, one long sequence: attends across
        good = model(input_ids=ids, position_ids=packed["position_ids"]).logits[0]
    second = slice(lengths[0], lengths[0] + lengths[1])
    assert not torch.allclose(leaky[second], good[second], rtol=1e-3, atol=1e-3)


def test_sft_trainer_packing_reaches_fast_forward(tiny_dir, tmp_path):
    """SFTTrainer(packing=True) (TRL's bfd packing + padding-free collator) trains through the fast
    forward: one packed row per batch with its position_ids (whose attention test_packed_* check)."""
    from trl import SFTConfig

    from velotune import SFTTrainer, get_alpaca_formatter
    from velotune.data.bundled import load_alpaca_dataset

    model, tok = _model(tiny_dir)
    ds = load_alpaca_dataset().select(range(48)).map(get_alpaca_formatter(tok), batched=True)
    seen = []
    base = model.get_base_model()
    fast = base.forward

    def spy(*a, **k):
        seen.append((tuple(k["input_ids"].shape), k.get("position_ids") is not None))
        return fast(*a, **k)

    base.forward = spy
    trl_said = []
    handler = logging.Handler()
    handler.emit = lambda record: trl_said.append(record.getMessage())
    logging.getLogger("trl.trainer.sft_trainer").addHandler(handler)
    try:
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds,
                             args=SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                            packing=True, max_length=256, bf16=False, report_to="none",
                                            logging_steps=1))
    finally:
        logging.getLogger("trl.trainer.sft_trainer").removeHandler(handler)
    # TRL's cross-contamination warning is wrong for velotune's forward (examples stay apart): left out
    assert not any("cross-contamination" in m for m in trl_said)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert seen and all(shape[0] == 1 and has_pos for shape, has_pos in seen)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
