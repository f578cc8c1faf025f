"""Bucket padding of training batches (velotune/training/buckets.py): few shapes, the same loss."""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import randomize_lora_b, record_eager_stacks
from velotune import FastLanguageModel
from velotune.training.buckets import BucketPadding, bucket_step


def _collate(features):
    t = max(len(f) for f in features)
    ids = torch.tensor([f + [0] * (t - len(f)) for f in features])
    mask = torch.tensor([[1] * len(f) + [0] * (t - len(f)) for f in features])
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _same_loss_and_grads(model, plain, bucketed):
    """The bucketed batch trains exactly like the plain one: same loss, same LoRA gradients."""
    l0, g0 = _loss_and_grads(model, plain)
    l1, g1 = _loss_and_grads(model, bucketed)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lengths_fall_in_at_most_eight_buckets():
    assert bucket_step(2048) == 256 and bucket_step(300) == 64 and bucket_step(100_000) == 12544
    pad = BucketPadding(_collate, pad_token_id=3, max_length=2048)
    lengths = {pad.length_for(t) for t in range(1, 2049)}
    assert lengths == {256 * k for k in range(1, 9)}
    assert pad.length_for(2100) == 2100  # longer than max_length (no truncation here): left as is


def test_bucket_count_is_read_when_the_collator_is_built(monkeypatch):
    """``buckets.N_BUCKETS`` set before the trainer is built applies (fewer recorded shapes, more padding)."""
    from velotune.training import buckets

    monkeypatch.setattr(buckets, "N_BUCKETS", 4)
    pad = BucketPadding(_collate, pad_token_id=3, max_length=2048)
    assert pad.n_buckets == 4 and {pad.length_for(t) for t in range(1, 2049)} == {512, 1024, 1536, 2048}
    assert BucketPadding(_collate, pad_token_id=3, max_length=2048, n_buckets=2).step == 1024


def test_padded_batch_keeps_loss_and_grads(tiny_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=False, max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.1)
    model.train()
    g = torch.Generator().manual_seed(0)
    features = [torch.randint(4, 500, (n,), generator=g).tolist() for n in (37, 21)]
    plain = _collate(features)
    bucketed = BucketPadding(_collate, pad_token_id=3, max_length=128)(features)
    assert bucketed["input_ids"].shape == (2, 64) and plain["input_ids"].shape == (2, 37)
    assert (bucketed["labels"][:, 37:] == -100).all() and (bucketed["attention_mask"][:, 37:] == 0).all()
    assert (bucketed["input_ids"][:, 37:] == 3).all()

    _same_loss_and_grads(model, plain, bucketed)


def _packed(features):
    """TRL's padding-free layout: one row, positions restarting per example, no attention mask."""
    ids = torch.tensor([sum(features, [])])
    pos = torch.cat([torch.arange(len(f)) for f in features]).unsqueeze(0)
    return {"input_ids": ids, "position_ids": pos, "labels": ids.masked_fill(pos == 0, -100)}


def test_packed_row_padding_is_an_example_of_its_own(tiny_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=False, max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=12, std=0.1)
    model.train()
    g = torch.Generator().manual_seed(1)
    features = [torch.randint(4, 500, (n,), generator=g).tolist() for n in (29, 11, 30)]
    plain = _packed(features)
    bucketed = BucketPadding(_packed, pad_token_id=3, max_length=128)(features)
    assert bucketed["input_ids"].shape == (1, 128) and plain["input_ids"].shape == (1, 70)
    assert "attention_mask" not in bucketed
    assert torch.equal(bucketed["position_ids"][0, 70:], torch.arange(58))  # one more example, not 58
    assert (bucketed["labels"][0, 70:] == -100).all() and (bucketed["input_ids"][0, 70:] == 3).all()

    _same_loss_and_grads(model, plain, bucketed)


def test_packed_rows_and_unknown_fields_pass_through():
    pad = BucketPadding(_collate, pad_token_id=3, max_length=128)
    packed = lambda f: {**_collate(f), "position_ids": torch.zeros(len(f), max(map(len, f)), dtype=torch.long)}  # noqa: E731
    assert BucketPadding(packed, 3, 128)([[5, 6, 7]])["input_ids"].shape == (1, 3)
    odd = lambda f: {**_collate(f), "token_type_ids": torch.zeros(len(f), max(map(len, f)), dtype=torch.long)}  # noqa: E731
    assert BucketPadding(odd, 3, 128)([[5, 6, 7]])["input_ids"].shape == (1, 3)
    assert pad([[5, 6, 7]])["input_ids"].shape == (1, 64)


def test_longest_example_reads_the_arrow_column():
    """The longest tokenized example, from the dataset's Arrow column: a selection answers for the table under
    it (an upper bound); no input_ids column, or not a datasets.Dataset (a list, a streamed dataset): None."""
    from datasets import Dataset

    from velotune.training.buckets import longest_example

    ds = Dataset.from_dict({"input_ids": [[1] * 5, [1] * 40, [], [1] * 17], "text": ["a", "b", "c", "d"]})
    assert longest_example(ds) == 40
    assert longest_example(ds.select([0, 3])) == 40
    assert longest_example(ds.remove_columns("input_ids")) is None
    assert longest_example([{"input_ids": [1, 2]}]) is None
    assert longest_example(ds.to_iterable_dataset()) is None
    assert longest_example(None) is None


@pytest.mark.parametrize("layout", ["padded", "packed", "padfree"])
def test_sft_trainer_buckets_batches_when_graphs_will_run(tiny_dir, tmp_path, monkeypatch, layout):
    """SFTTrainer wraps its collator when the graph path trains the model (emulated here): the run's losses
    equal an unbucketed run's, the graphs see at most the bucket lengths, and every step runs through them:
    no recorded shape is dropped by a later, longer batch (padding-free rows, one row of a batch's examples,
    grew the shared buffers step after step, dropping every shape, until the capture limit sent the
    rest of the run to the eager path)."""
    import trl
    from transformers import TrainingArguments

    from velotune import SFTTrainer, get_alpaca_formatter, set_cuda_graphs
    from velotune.data.bundled import load_alpaca_dataset
    from velotune.loading import state_of
    from velotune.models import graphs
    from velotune.training.buckets import BucketPadding

    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    eager = record_eager_stacks(monkeypatch)
    packed = layout != "padded"
    runs = {}
    for mode in ("auto", False):
        model, tok = FastLanguageModel.from_pretrained(tiny_dir(), max_seq_length=256, load_in_4bit=False)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
        set_cuda_graphs(model, mode)
        ds = load_alpaca_dataset().select(range(16)).map(get_alpaca_formatter(tok), batched=True)
        common = dict(output_dir=str(tmp_path / str(mode)), per_device_train_batch_size=2, max_steps=6,
                      learning_rate=1e-2, logging_steps=1, optim="sgd", seed=3, report_to="none", save_strategy="no")
        if layout == "padfree":  # TRL's padding_free without packing: SFTConfig's own field
            args = trl.SFTConfig(**common, padding_free=True, max_length=None, dataset_text_field="text",
                                 bf16=False)
            trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=args)
        else:
            trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=ds, dataset_text_field="text",
                                 max_seq_length=256, packing=packed, args=TrainingArguments(**common))
        assert isinstance(trainer.data_collator, BucketPadding) == (mode == "auto")
        if mode == "auto":  # packed / padding-free: the two rows of a batch become one row of up to 2 x 256 tokens
            assert trainer.data_collator.max_length == (512 if packed else 256)
            # the longest batch the dataset gives, which the graphs' pool is sized for: from the longest tokenized
            # example where rows are padded (or padding-free), a full batch where TRL packs
            longest = max(len(ids) for ids in trainer.train_dataset["input_ids"])
            hint = state_of(model).longest_batch_tokens
            pad = trainer.data_collator.length_for
            assert hint == {"padded": 2 * pad(longest), "padfree": pad(2 * longest), "packed": 512}[layout]
            assert layout == "packed" or hint < 512  # the tiny examples are shorter than max_length
        eager.clear()
        trainer.train()
        st = graphs.state_of(model.get_base_model())
        runs[mode] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if mode == "auto":
            assert 0 < st.captures and all(key[0][1] % 64 == 0 for key in st.sets)  # bucket lengths only
            assert max(key[0][0] * key[0][1] for key in st.sets) <= hint  # no batch longer than expected
            assert all(key[0][0] == 1 for key in st.sets) == packed
            assert len(eager) == 6 and not any(eager), eager  # every step through the graphs
            assert st.arena.generation == 0 and st.captures == len(st.sets)  # no recorded shape dropped
    torch.testing.assert_close(torch.tensor(runs["auto"]), torch.tensor(runs[False]), rtol=1e-5, atol=1e-6)
