"""Train on the assistant's turns only: labels are -100 everywhere else.

``train_on_responses_only(trainer)`` runs after ``SFTTrainer(...)`` has tokenized (and maybe packed)
its datasets. In each conversation a label span starts right after every ``response_part`` (the text
that opens an assistant turn) and ends after the turn's end-of-turn token, or at the next
``instruction_part`` / ``response_part``, or at the end of the conversation. Everything the assistant
did not say (system, user, tool turns, the markers themselves) gets label -100.

Markers are matched as token-id sequences. A marker can tokenize differently inside a text than on its
own (byte-level BPE glues the space before ``ASSISTANT:`` to the word; a trailing newline merges with
a newline that opens the reply), so each marker is tokenized inside a set of surrounding texts and
every distinct token sequence that covers its non-blank characters is searched, longest first. When
the marker's trailing blank merged into the reply's first token, that token is trained on (it is the
token the model must produce there).

A conversation whose response was cut away entirely (by truncation to ``max_length``), or that has no
assistant turn at all, would contribute no label: it is dropped, and one message per dataset says how
many and why. Packed rows (TRL's ``packing=True``, strategy ``bfd``) are masked conversation by
conversation using their ``seq_lengths``, and an empty conversation is cut out of its row.
"""
from __future__ import annotations

import functools

import numpy as np

from .._notices import VelotuneError, say, say_once
from ..data.chat_templates import detect_chat_template

# Text around a marker when finding its in-context tokenizations: nothing, blanks, a word, punctuation.
_LEFT = ("", " ", "\n", "\n\n", "a", "a ", "a\n", "a\n\n", "a.", "1 ")
_RIGHT = ("", "a", " a", "A", "1", ".", "\na", "\n\na", " ", "\n")
_STATS = ("_vt_keep", "_vt_cut", "_vt_none", "_vt_convs")


def marker_token_ids(tokenizer, marker: str) -> list[tuple[int, ...]]:
    """The token-id sequences ``marker`` takes inside longer texts, longest first.

    Each sequence covers every non-blank character of the marker plus the trailing blanks that stay
    separate tokens. Needs a fast tokenizer (offset mappings).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise VelotuneError("train_on_responses_only needs a fast (Rust) tokenizer for offset mappings; load it "
                            "with use_fast=True")
    lefts = list(_LEFT) + [t for t in (tokenizer.bos_token, tokenizer.eos_token) if t]
    found = {tuple(tokenizer.encode(marker, add_special_tokens=False))}
    for left in lefts:
        for right in _RIGHT:
            seq = _in_context(tokenizer, left, marker, right)
            if seq:
                found.add(seq)
    found.discard(())
    return sorted(found, key=lambda s: (-len(s), s))


def _in_context(tokenizer, left: str, marker: str, right: str) -> tuple[int, ...] | None:
    text = left + marker + right
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    a = len(left) + (len(marker) - len(marker.lstrip()))      # non-blank core of the marker: [a, b)
    b = len(left) + len(marker.rstrip())
    core = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
    if not core:
        return None
    i0, i1 = core[0], core[-1]
    s0, e1 = offsets[i0][0], offsets[i1][1]
    if (s0 < a and not text[s0:a].isspace()) or (e1 > b and not text[b:e1].isspace()):
        return None  # merged with a neighbour's non-blank characters: this context says nothing
    seq = list(ids[i0:i1 + 1])
    # Trailing blanks of the marker that are tokens of their own belong to it.
    tail = marker[len(marker.rstrip()):][max(0, e1 - b):]
    for tid in ids[i1 + 1:]:
        piece = tokenizer.decode([tid])
        if not piece or not tail.startswith(piece):
            break
        seq.append(tid)
        tail = tail[len(piece):]
    return tuple(seq)


@functools.lru_cache(maxsize=None)
def _first_index(cands: tuple[tuple[int, ...], ...]) -> dict[int, list[tuple[int, ...]]]:
    index: dict[int, list[tuple[int, ...]]] = {}
    for c in cands:  # already longest first
        index.setdefault(c[0], []).append(c)
    return index


def _find(ids: np.ndarray, cands: tuple[tuple[int, ...], ...]) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) matches of any candidate in ``ids``; the longest wins at a start."""
    hits = []
    n = len(ids)
    for first, group in _first_index(cands).items():
        for p in np.flatnonzero(ids == first).tolist():
            for c in group:
                if p + len(c) <= n and tuple(ids[p:p + len(c)].tolist()) == c:
                    hits.append((p, p + len(c)))
                    break
    hits.sort(key=lambda h: (h[0], -h[1]))
    out, end = [], -1
    for s, e in hits:
        if s >= end:
            out.append((s, e))
            end = e
    return out


def assistant_spans(ids: np.ndarray, response: tuple, instruction: tuple, end_of_turn: tuple) -> list[tuple]:
    """[start, end) token spans of the assistant's turns in one conversation ``ids`` (int array)."""
    events = [(s, e, "R") for s, e in _find(ids, response)] + [(s, e, "I") for s, e in _find(ids, instruction)]
    eot = dict(_find(ids, end_of_turn)) if end_of_turn else {}
    events.sort()
    spans, start, consumed = [], None, 0
    for s, e, kind in events:
        if s < consumed:
            continue  # inside a marker already read
        if start is not None:
            cut = [q for p, q in eot.items() if start <= p <= s]  # an end-of-turn opening the next marker counts
            spans.append((start, min(cut) if cut else s))
            start = None
        if kind == "R":
            start = e
        consumed = e
    if start is not None:
        cut = [q for p, q in eot.items() if p >= start]
        spans.append((start, min(cut) if cut else len(ids)))
    return [(a, b) for a, b in spans if b > a]


def _mask_batch(batch, *, response, instruction, end_of_turn, max_length):
    """Batched ``map`` function: new labels, packed rows without empty conversations, per-row stats."""
    packed = "seq_lengths" in batch
    out = {k: [] for k in ("input_ids", "labels", *_STATS)}
    if packed:
        out["seq_lengths"] = []
    labels_in = batch.get("labels") or batch["input_ids"]
    for r, row_ids in enumerate(batch["input_ids"]):
        ids = np.asarray(row_ids, dtype=np.int64)
        old = np.asarray(labels_in[r], dtype=np.int64)
        lengths = list(batch["seq_lengths"][r]) if packed else [len(ids)]
        keep_ids, keep_labels, keep_lengths, cut, none = [], [], [], 0, 0
        offset = 0
        for length in lengths:
            seg = ids[offset:offset + length]
            new = np.full(length, -100, dtype=np.int64)
            for a, b in assistant_spans(seg, response, instruction, end_of_turn):
                new[a:b] = old[offset + a:offset + b]
            offset += length
            if (new != -100).any():
                keep_ids.append(seg)
                keep_labels.append(new)
                keep_lengths.append(length)
            elif max_length is not None and length >= max_length:
                cut += 1
            else:
                none += 1
        keep = bool(keep_lengths)
        out["input_ids"].append(np.concatenate(keep_ids).tolist() if keep else [])
        out["labels"].append(np.concatenate(keep_labels).tolist() if keep else [])
        if packed:
            out["seq_lengths"].append(keep_lengths)
        for key, v in zip(_STATS, (keep, cut, none, len(lengths))):
            out[key].append(v)
    return out


def _tokenizer_of(trainer):
    tok = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    tok = getattr(tok, "tokenizer", tok)  # a multimodal processor wraps the tokenizer
    if tok is None:
        raise VelotuneError("the trainer has no tokenizer (processing_class); pass tokenizer= to SFTTrainer")
    return tok


def _resolve_parts(tokenizer, instruction_part, response_part, end_of_turn):
    row = detect_chat_template(getattr(tokenizer, "chat_template", None))
    if instruction_part is None or response_part is None:
        if row is None:
            raise VelotuneError(
                "train_on_responses_only cannot tell the turn markers of this tokenizer's chat template; pass "
                "instruction_part= and response_part= (for ChatML: instruction_part='<|im_start|>user\\n', "
                "response_part='<|im_start|>assistant\\n'), or set a known template first with "
                "get_chat_template(tokenizer, 'chatml')")
        instruction_part = row.instruction_part if instruction_part is None else instruction_part
        response_part = row.response_part if response_part is None else response_part
    for name, value in (("instruction_part", instruction_part), ("response_part", response_part),
                        ("end_of_turn", end_of_turn)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise VelotuneError(f"{name} must be non-blank text, got {value!r}")
    if instruction_part == response_part:
        raise VelotuneError(f"instruction_part and response_part are the same text {response_part!r}; they must "
                            "tell a user turn from an assistant turn")
    if end_of_turn is None:
        end_of_turn = row.end_of_turn if row is not None and row.end_of_turn else tokenizer.eos_token
    return instruction_part, response_part, end_of_turn


def _check_collator(trainer) -> None:
    from transformers import DataCollatorForLanguageModeling

    if isinstance(getattr(trainer, "data_collator", None), DataCollatorForLanguageModeling):
        raise VelotuneError(
            "the trainer's data_collator is transformers.DataCollatorForLanguageModeling, which rebuilds labels "
            "from input_ids and would undo the masking; leave data_collator unset (TRL's collator keeps the "
            "labels) or use transformers.DataCollatorForSeq2Seq")


def _apply(dataset, name: str, mask_fn, max_length, num_proc, tokenizer, parts):
    """Mask one dataset; drop what has no label left; one message with the counts."""
    if dataset is None:
        return None
    cols = getattr(dataset, "column_names", None)
    if cols is None or not hasattr(dataset, "filter") or not hasattr(dataset, "__len__"):
        raise VelotuneError(f"train_on_responses_only needs {name} to be a datasets.Dataset, got "
                            f"{type(dataset).__name__} (a streaming dataset cannot be counted: load it without "
                            "streaming=True)")
    if "input_ids" not in cols:
        raise VelotuneError(f"{name} is not tokenized (columns: {cols}); call train_on_responses_only on an "
                            "SFTTrainer, which tokenizes in its constructor, or add input_ids yourself")
    if len(dataset) == 0:
        return dataset
    kwargs = {"num_proc": num_proc} if num_proc else {}
    masked = dataset.map(mask_fn, batched=True, desc=f"Masking {name} to assistant turns", **kwargs)
    stats = {k: int(np.asarray(masked[k]).sum()) for k in _STATS}
    kept = masked.filter(lambda keep: keep, input_columns="_vt_keep", **kwargs).remove_columns(list(_STATS))
    convs, cut, none = stats["_vt_convs"], stats["_vt_cut"], stats["_vt_none"]
    if len(kept) == 0:
        first = tokenizer.decode(dataset[0]["input_ids"][:200])
        raise VelotuneError(
            f"train_on_responses_only: no conversation of {name} has an assistant token left (response_part="
            f"{parts[1]!r} found nowhere{'; ' + str(cut) + ' cut by truncation' if cut else ''}), so every label "
            f"would be -100. Check that the parts match the chat template the data was formatted with; the first "
            f"row starts: {first!r}")
    if cut or none:
        why = []
        if cut:
            why.append(f"{cut} had their response cut away by truncation to max_length={max_length} (raise "
                       "max_seq_length to keep them)")
        if none:
            why.append(f"{none} had no assistant reply (no response_part={parts[1]!r} followed by text)")
        say(f"train_on_responses_only: {name}: dropped {cut + none} of {convs} conversations with no label left: "
            + "; ".join(why))
    return kept


def train_on_responses_only(trainer, instruction_part: str | None = None, response_part: str | None = None, *,
                            end_of_turn: str | None = None, num_proc: int | None = None):
    """Mask the labels of ``trainer``'s datasets to the assistant's turns; returns the trainer.

    Args:
        trainer: an ``SFTTrainer`` (velotune's or TRL's) after construction: its ``train_dataset`` (and
            ``eval_dataset``, a dataset or a dict of them) already tokenized, packed or not.
        instruction_part: text opening a user turn, e.g. ``"<|im_start|>user\\n"``.
        response_part: text opening an assistant turn, e.g. ``"<|im_start|>assistant\\n"``. Both default to
            those of the tokenizer's chat template when it is one of ``get_chat_template``'s (by its tag or
            its turn markers).
        end_of_turn: text closing an assistant turn, included in the labels; default: the template's
            (``<|im_end|>``, ``<|eot_id|>``, ...) or the tokenizer's ``eos_token``.
        num_proc: processes for ``Dataset.map``.

    Labels already -100 stay -100. Conversations left without any label (response truncated away, or no
    assistant turn) are dropped and counted in one message per dataset; if none is left, ``VelotuneError``.
    """
    tokenizer = _tokenizer_of(trainer)
    parts = _resolve_parts(tokenizer, instruction_part, response_part, end_of_turn)
    _check_collator(trainer)
    args = getattr(trainer, "args", None)
    max_length = getattr(args, "max_length", None)
    if getattr(args, "packing", False) and getattr(args, "packing_strategy", "bfd") != "bfd":
        say_once("responses-only-split-packing",
                 f"train_on_responses_only: packing_strategy={args.packing_strategy!r} splits conversations; a piece "
                 "that starts inside a reply has no response_part and is masked. packing_strategy='bfd' keeps "
                 "conversations whole")
    instruction, response, eot = (tuple(marker_token_ids(tokenizer, p)) if p else () for p in parts)
    mask_fn = functools.partial(_mask_batch, response=response, instruction=instruction, end_of_turn=eot,
                                max_length=max_length)
    run = functools.partial(_apply, mask_fn=mask_fn, max_length=max_length, num_proc=num_proc,
                            tokenizer=tokenizer, parts=parts)
    trainer.train_dataset = run(getattr(trainer, "train_dataset", None), "train_dataset")
    evals = getattr(trainer, "eval_dataset", None)
    if isinstance(evals, dict):
        trainer.eval_dataset = {k: run(v, f"eval_dataset[{k!r}]") for k, v in evals.items()}
    elif evals is not None:
        trainer.eval_dataset = run(evals, "eval_dataset")
    return trainer
