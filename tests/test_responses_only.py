"""train_on_responses_only: labels only on assistant turns, in-context marker tokenization, truncated
conversations counted and dropped, packing, errors, and an end-to-end run through SFTTrainer."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, IterableDataset

from tests.tiny_models import make_tokenizer
from velotune import VelotuneError, get_chat_template, standardize_sharegpt, train_on_responses_only
from velotune.training.responses_only import marker_token_ids

CONV = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def templated_tokenizer(name: str = "chatml", **kw):
    """The tiny byte-level BPE tokenizer with ``name``'s special tokens added and its template set."""
    return get_chat_template(make_tokenizer(), name, add_missing_tokens=True, **kw)


def duck_trainer(tokenizer, rows: list[list[int]], labels=None, max_length=None, packing=False, **extra):
    """What train_on_responses_only reads from an SFTTrainer: tokenizer, datasets, args, collator."""
    data = {"input_ids": rows, **({"labels": labels} if labels is not None else {}), **extra}
    return SimpleNamespace(processing_class=tokenizer, train_dataset=Dataset.from_dict(data), eval_dataset=None,
                           args=SimpleNamespace(max_length=max_length, packing=packing), data_collator=None)


def visible_spans(tokenizer, input_ids, labels) -> list[str]:
    """Decoded runs of consecutive label-visible tokens (labels != -100)."""
    ids, labels = torch.as_tensor(input_ids), torch.as_tensor(labels)
    spans, run = [], []
    for tid, lab in zip(ids.tolist(), labels.tolist()):
        if lab != -100:
            assert lab == tid, "a visible label must be the token itself"
            run.append(tid)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def render_ids(tokenizer, conv) -> list[int]:
    return tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]


def test_multi_turn_labels_are_exactly_the_replies():
    tok = templated_tokenizer("chatml")
    trainer = train_on_responses_only(duck_trainer(tok, [render_ids(tok, CONV)]))
    row = trainer.train_dataset[0]
    assert visible_spans(tok, row["input_ids"], row["labels"]) == ["Paris is the capital.<|im_end|>", "Rome.<|im_end|>"]


def test_marker_tokenized_differently_in_context_is_still_found():
    """Byte-level BPE glues the space before 'ASSISTANT:' to the word: the isolated ids never occur."""
    tok = templated_tokenizer("vicuna")
    ids = render_ids(tok, CONV)
    alone = tok.encode("ASSISTANT:", add_special_tokens=False)
    assert not any(ids[i:i + len(alone)] == alone for i in range(len(ids)))
    assert len(marker_token_ids(tok, "ASSISTANT:")) >= 2  # the isolated and the in-context forms
    row = train_on_responses_only(duck_trainer(tok, [ids])).train_dataset[0]
    assert visible_spans(tok, row["input_ids"], row["labels"]) == [" Paris is the capital.</s>", " Rome.</s>"]


def test_trailing_blank_of_a_marker_is_part_of_it():
    """response_part with a trailing space: the space is a token of its own here, and not trained on."""
    tok = make_tokenizer()
    ids = tok.encode("USER: hi ASSISTANT: Hello there</s>", add_special_tokens=False)
    trainer = train_on_responses_only(duck_trainer(tok, [ids]), instruction_part="USER: ", response_part="ASSISTANT: ")
    row = trainer.train_dataset[0]
    assert visible_spans(tok, row["input_ids"], row["labels"]) == ["Hello there</s>"]


def test_existing_masked_labels_stay_masked():
    tok = templated_tokenizer("chatml")
    ids = render_ids(tok, CONV)
    labels = list(ids)
    last = len(ids) - 2  # the final <|im_end|> (the text ends "<|im_end|>\n")
    labels[last] = -100
    row = train_on_responses_only(duck_trainer(tok, [ids], labels=[labels])).train_dataset[0]
    assert visible_spans(tok, row["input_ids"], row["labels"]) == ["Paris is the capital.<|im_end|>", "Rome."]


def test_truncated_responses_are_counted_reported_and_dropped(notices):
    tok = templated_tokenizer("chatml")
    full = render_ids(tok, CONV[:3])
    # Truncation keeps the prompt and the reply's marker ("<|im_start|>assistant\n"), not one reply token.
    max_length = len(tok.apply_chat_template(CONV[:2], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])
    assert full[:max_length] != full
    rows = [full, full[:max_length], full[:max_length], render_ids(tok, CONV[:2])]
    trainer = duck_trainer(tok, rows, max_length=max_length)
    trainer = train_on_responses_only(trainer)
    assert len(trainer.train_dataset) == 1 and trainer.train_dataset[0]["input_ids"] == full
    assert notices[-1] == (
        f"train_on_responses_only: train_dataset: dropped 3 of 4 conversations with no label left: 2 had their "
        f"response cut away by truncation to max_length={max_length} (raise max_seq_length to keep them); 1 had no "
        "assistant reply (no response_part='<|im_start|>assistant\\n' followed by text)")


def test_every_response_cut_away_raises():
    tok = templated_tokenizer("chatml")
    prompt = render_ids(tok, CONV[:2])
    with pytest.raises(VelotuneError, match=r"no conversation of train_dataset has an assistant token left "
                                            r"\(response_part='<\|im_start\|>assistant\\n' found nowhere; 1 cut by "
                                            r"truncation\), so every label would be -100.*first row starts: "):
        train_on_responses_only(duck_trainer(tok, [prompt], max_length=len(prompt)))


def test_packed_rows_are_masked_per_conversation_and_empty_ones_cut_out(notices):
    tok = templated_tokenizer("chatml")
    a, b = render_ids(tok, CONV[:3]), render_ids(tok, CONV)
    no_reply = render_ids(tok, CONV[:2])
    # A conversation that ends right after an assistant marker: the reply itself is in the next segment.
    # Masking must not run across the boundary into it.
    dangling = no_reply + tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    rows = [a + dangling + b, no_reply]
    seq_lengths = [[len(a), len(dangling), len(b)], [len(no_reply)]]
    trainer = duck_trainer(tok, rows, max_length=4096, packing=True, seq_lengths=seq_lengths)
    out = train_on_responses_only(trainer).train_dataset
    assert len(out) == 1
    row = out[0]
    assert row["seq_lengths"] == [len(a), len(b)] and row["input_ids"] == a + b
    assert visible_spans(tok, row["input_ids"], row["labels"]) == [
        "Paris is the capital.<|im_end|>", "Paris is the capital.<|im_end|>", "Rome.<|im_end|>"]
    assert "dropped 2 of 4 conversations" in notices[-1] and "2 had no assistant reply" in notices[-1]


def test_eval_datasets_dict_and_explicit_parts():
    """A template velotune cannot recognise: parts given by hand; end of turn = the tokenizer's EOS."""
    tok = make_tokenizer()  # its own template: "<s>{role}\n{content}</s>\n"
    ids = render_ids(tok, CONV)
    with pytest.raises(VelotuneError, match="cannot tell the turn markers of this tokenizer's chat template; pass "
                                            "instruction_part= and response_part="):
        train_on_responses_only(duck_trainer(tok, [ids]))
    trainer = duck_trainer(tok, [ids])
    trainer.eval_dataset = {"a": Dataset.from_dict({"input_ids": [ids]}), "b": Dataset.from_dict({"input_ids": [ids]})}
    train_on_responses_only(trainer, instruction_part="<s>user\n", response_part="<s>assistant\n")
    for ds in (trainer.train_dataset, trainer.eval_dataset["a"], trainer.eval_dataset["b"]):
        assert visible_spans(tok, ds[0]["input_ids"], ds[0]["labels"]) == ["Paris is the capital.</s>", "Rome.</s>"]


def test_bad_arguments_and_datasets():
    from transformers import DataCollatorForLanguageModeling

    tok = templated_tokenizer("chatml")
    ids = render_ids(tok, CONV)
    with pytest.raises(VelotuneError, match=r"response_part must be non-blank text, got ' \\n'"):
        train_on_responses_only(duck_trainer(tok, [ids]), response_part=" \n")
    with pytest.raises(VelotuneError, match="instruction_part and response_part are the same text 'X'"):
        train_on_responses_only(duck_trainer(tok, [ids]), instruction_part="X", response_part="X")
    trainer = duck_trainer(tok, [ids])
    trainer.train_dataset = Dataset.from_dict({"text": ["hi"]})
    with pytest.raises(VelotuneError, match=r"train_dataset is not tokenized \(columns: \['text'\]\); call "
                                            "train_on_responses_only on an SFTTrainer"):
        train_on_responses_only(trainer)
    trainer.train_dataset = IterableDataset.from_generator(lambda: iter([{"input_ids": ids}]))
    with pytest.raises(VelotuneError, match="needs train_dataset to be a datasets.Dataset, got IterableDataset "
                                            r"\(a streaming dataset cannot be counted"):
        train_on_responses_only(trainer)
    trainer = duck_trainer(tok, [ids])
    trainer.data_collator = DataCollatorForLanguageModeling(tok, mlm=False)
    with pytest.raises(VelotuneError, match="rebuilds labels from input_ids and would undo the masking"):
        train_on_responses_only(trainer)
    trainer = duck_trainer(tok, [ids])
    trainer.processing_class = None
    with pytest.raises(VelotuneError, match="the trainer has no tokenizer"):
        train_on_responses_only(trainer)


def test_slow_tokenizer_is_refused():
    slow = SimpleNamespace(is_fast=False, chat_template=None)
    with pytest.raises(VelotuneError, match="needs a fast \\(Rust\\) tokenizer"):
        marker_token_ids(slow, "ASSISTANT:")


@pytest.mark.real_model
def test_real_smollm2_tokenizer_own_template(real_model_dir):
    """SmolLM2's own ChatML template (with its default system text) is recognised; a reply that starts with
    newlines merges the marker's newline into one token, which is trained on; the user turn never is."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_model_dir)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nIndented reply"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Plain reply"}]
    ids = render_ids(tok, conv)
    merged = tok.encode("<|im_start|>assistant\n\n\nIndented", add_special_tokens=False)
    assert tok.decode(merged[3:4]) == "\n\n"  # the marker's "\n" and the reply's first "\n" are one token
    row = train_on_responses_only(duck_trainer(tok, [ids])).train_dataset[0]
    assert visible_spans(tok, row["input_ids"], row["labels"]) == ["\n\n\nIndented reply<|im_end|>",
                                                                   "Plain reply<|im_end|>"]
    # get_chat_template("chatml") on this tokenizer adds nothing and keeps its EOS (already <|im_end|>).
    n = len(tok)
    get_chat_template(tok, "chatml")
    assert len(tok) == n and tok.eos_token == "<|im_end|>"
    with_system = [{"role": "system", "content": "Be kind."}] + conv
    own = AutoTokenizer.from_pretrained(real_model_dir).apply_chat_template(with_system, tokenize=False)
    assert tok.apply_chat_template(with_system, tokenize=False) == own


def _sharegpt_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"conversations": [
            {"from": "system", "value": "You answer briefly."},
            {"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": f"It is {2 * i}."},
            {"from": "human", "value": "Thanks!"}, {"from": "gpt", "value": "You are welcome."}]})
    # One conversation far longer than max_length: its replies are cut away by truncation.
    rows.append({"conversations": [{"from": "human", "value": "tell me everything " * 40},
                                   {"from": "gpt", "value": "No."}]})
    return rows


@pytest.mark.parametrize("path", ["text", "messages_packed"])
def test_end_to_end_tiny_model(tiny_dir, tmp_path, notices, path):
    """tiny model + get_chat_template + standardize_sharegpt + SFTTrainer + train_on_responses_only: the
    batches the trainer's own collator builds carry labels on the replies only; 2 steps, finite loss."""
    from trl import SFTConfig

    from velotune import FastLanguageModel, SFTTrainer

    model, tok = FastLanguageModel.from_pretrained(tiny_dir(), max_seq_length=96, load_in_4bit=False)
    tok = get_chat_template(tok, "chatml", add_missing_tokens=True)
    model.resize_token_embeddings(len(tok))
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    data = Dataset.from_list(_sharegpt_rows(8))
    if path == "text":  # the incumbent's notebooks: standardize in place, format to text
        data = standardize_sharegpt(data).map(lambda b: {"text": [
            tok.apply_chat_template(c, tokenize=False) for c in b["conversations"]]}, batched=True)
    else:  # TRL applies the template to a messages column itself
        data = standardize_sharegpt(data, output_column="messages")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, max_length=96,
                     packing=path.endswith("packed"), learning_rate=1e-3, report_to="none", bf16=False,
                     dataset_num_proc=None)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data, args=args)
    train_on_responses_only(trainer)
    assert "dropped 1 of 9 conversations" in notices[-1] and "truncation to max_length=96" in notices[-1]
    seen = 0
    for batch in trainer.get_train_dataloader():
        if args.packing:  # padding-free: one row of concatenated conversations, positions restart per conversation
            assert batch["input_ids"].shape[0] == 1 and (batch["position_ids"] == 0).sum() > 1
        spans = visible_spans(tok, batch["input_ids"].flatten(), batch["labels"].flatten())
        answers = spans[0::2]
        assert all(a.startswith("It is ") and a.endswith(".<|im_end|>") for a in answers), spans
        assert spans[1::2] == ["You are welcome.<|im_end|>"] * len(answers)
        seen += len(answers)
    assert seen == 8
    stats = trainer.train()
    assert math.isfinite(stats.training_loss) and stats.global_step == 2
