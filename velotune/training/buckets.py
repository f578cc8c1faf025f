"""Right-pad every training batch to one of a few lengths, so the CUDA-graph path sees few shapes.

TRL pads each batch to its longest row, so the batch length changes almost every step, and CUDA graphs
(velotune/models/graphs.py) are recorded per batch shape. Padding further on the right, to the next
multiple of ``max_length / 8`` (rounded up to 64 tokens), leaves at most 8 shapes. The loss is
unchanged: the extra positions carry label -100 and attention mask 0, and with causal attention a real
token never attends to a later position, so right padding changes no real token's result (the fast
forward runs right-padded training batches with plain causal attention, models/attention.py). The
cost is the padded positions' compute, under one bucket step per row.

Packed (padding-free) batches, one row of concatenated examples with ``position_ids`` restarting at 0
per example, are padded the same way: the extra tokens form one more example of their own (positions
0, 1, ...; labels -100), which attention keeps apart from the real ones, so again no real token's
result changes. Other batches with ``position_ids``, or with fields this module does not know how to
pad, are passed through untouched.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# value each known [batch, length] field is padded with; input_ids use the tokenizer's pad id
_FILL = {"attention_mask": 0, "labels": -100, "completion_mask": 0, "assistant_masks": 0}
N_BUCKETS = 8
MULTIPLE = 64


def bucket_step(max_length: int, n_buckets: int | None = None, multiple: int = MULTIPLE) -> int:
    """Bucket width in tokens: ``max_length / n_buckets`` (default ``N_BUCKETS``) rounded up to ``multiple``."""
    return max(multiple, math.ceil(max_length / (n_buckets or N_BUCKETS) / multiple) * multiple)


class BucketPadding:
    """Wraps a collator; pads its batches on the right to ``ceil(T / step) * step`` (at most ``max_length``)."""

    def __init__(self, collator, pad_token_id: int, max_length: int, n_buckets: int | None = None):
        self.collator, self.pad_token_id, self.max_length = collator, int(pad_token_id), int(max_length)
        self.n_buckets = n_buckets or N_BUCKETS  # read at construction: the module constant can be changed
        self.step = bucket_step(self.max_length, self.n_buckets)

    def length_for(self, t: int) -> int:
        return max(t, min(self.max_length, math.ceil(t / self.step) * self.step))

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch.get("input_ids") if hasattr(batch, "get") else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return batch
        packed = "position_ids" in batch
        if packed and (ids.shape[0] != 1 or "attention_mask" in batch):
            return batch  # only TRL's padding-free layout (one row, no mask) is padded as an extra example
        t = ids.shape[1]
        target = self.length_for(t)
        if target == t:
            return batch
        fills = {"input_ids": self.pad_token_id, **_FILL}
        padded = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == t:
                if key == "position_ids" and packed:
                    tail = torch.arange(target - t, dtype=value.dtype, device=value.device)
                    value = torch.cat([value, tail.unsqueeze(0)], dim=1)  # one more example: the padding
                elif key not in fills:
                    return batch  # a [B, T] field we do not know how to pad: leave the batch as it is
                else:
                    value = F.pad(value, (0, target - t), value=fills[key])
            padded[key] = value
        if not packed and "attention_mask" not in padded:
            return batch  # without a mask the extra tokens would look real
        batch.update(padded)  # a dict or transformers' BatchEncoding: keep its type
        return batch


def longest_example(dataset) -> int | None:
    """Tokens in the longest ``input_ids`` row of a tokenized ``datasets.Dataset`` (read from its Arrow column,
    without decoding rows; a selected or shuffled dataset answers for the table under it, an upper bound), or
    None where that is not known (no such column, an iterable dataset, another kind of dataset)."""
    table = getattr(dataset, "data", None)
    names = getattr(table, "column_names", None)
    if names is None or "input_ids" not in names:
        return None
    try:
        import pyarrow.compute as pc

        longest = pc.max(pc.list_value_length(table.column("input_ids"))).as_py()
    except Exception:  # noqa: BLE001 - not a list column: unknown, which only costs the pool's sizing
        return None
    return int(longest) if longest is not None else None


def wrap_trainer_collator(trainer, model, state) -> bool:
    """Give ``trainer`` bucket padding when the CUDA-graph path will train this model: a velotune model
    with gradient checkpointing, graphs not turned off, on CUDA. Packed / padding-free batches (one row
    of up to ``per_device_train_batch_size x max_length`` tokens) get buckets of that length. The model's
    state learns that token count (``batch_tokens``: the graphs size their shared buffers for it, so a
    longer row later does not drop the shapes recorded so far), and the longest batch the dataset will give
    (``longest_batch_tokens``: the graphs' pool is sized for it at the first capture). Says so once. Returns
    whether the collator was wrapped."""
    from .._notices import say_once
    from ..models import graphs

    args = trainer.args
    if state is None or not state.gradient_checkpointing or isinstance(trainer.data_collator, BucketPadding):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "_velotune_fast" not in base.__dict__ or graphs.state_of(base).mode is False:
        return False
    if args.device.type != "cuda" and not graphs.EMULATE_ON_CPU:
        return False
    tok = trainer.processing_class
    pad = getattr(tok, "pad_token_id", None)
    if pad is None or trainer.data_collator is None:
        return False
    cut = getattr(args, "max_length", None)  # where TRL truncates the examples (None: it does not)
    max_length = cut or state.max_seq_length
    rows = args.per_device_train_batch_size
    state.batch_tokens = max(state.batch_tokens, rows * max_length)
    packing = getattr(args, "packing", False)
    # the longest example: TRL packs rows up to max_length; otherwise the dataset's (None: not known, e.g. a
    # streamed dataset, where no longest batch is told rather than one sized for max_length)
    found = max_length if packing else longest_example(trainer.train_dataset)
    longest = None if found is None else min(found, cut or found)
    one_row = packing or getattr(args, "padding_free", False)
    if one_row:
        max_length *= rows  # the rows of a batch become one row
    trainer.data_collator = BucketPadding(trainer.data_collator, pad, max_length)
    if longest is not None:
        bucket = trainer.data_collator.length_for
        longest_batch = bucket(rows * longest) if one_row else rows * bucket(longest)
        state.longest_batch_tokens = max(state.longest_batch_tokens, longest_batch)
    say_once("bucket-padding", f"training batches are right-padded to multiples of {trainer.data_collator.step} "
             f"tokens (at most {trainer.data_collator.n_buckets} lengths) so CUDA graphs can be reused; the loss is "
             "unchanged (velotune.set_cuda_graphs(model, False) turns both off)")
    return True
