"""Trainer callbacks and advice that keep a run from losing work: non-finite guard, OOM advice.

``NonFiniteGuard`` stops training the first time the gradients or the logged loss are NaN / inf, before
the optimizer applies them, and forbids any later checkpoint save, so the last checkpoint on disk is
the last good one. Under fp16 mixed precision an overflowing step is normal (the gradient scaler
skips it and lowers its scale), so only a non-finite *loss* stops an fp16 run.

``oom_advice`` turns an out-of-memory error into the concrete changes for this run, with numbers.
"""
from __future__ import annotations

import math
import time

import torch
from transformers import TrainerCallback

from .._notices import say


class NonFiniteError(RuntimeError):
    """Training produced a NaN / inf loss or gradient; the message names the step and likely causes."""


class NonFiniteGuard(TrainerCallback):
    """Stop at the first non-finite gradient (before the optimizer step) or logged loss.

    After a stop, ``self.message`` says what happened and ``self.step`` is the step it happened at; the
    caller decides how to fail (``velotune train`` exits 1). Gradients of the failing step are dropped
    (``grad = None``), so the optimizer leaves the weights as they were.
    """

    def __init__(self, learning_rate: float | None = None):
        self.learning_rate = learning_rate
        self.message: str | None = None
        self.step: int | None = None

    def _stop(self, args, state, control, what: str) -> None:
        if self.message is not None:
            return
        self.step = state.global_step + 1 if what.startswith("gradient") else state.global_step
        lr = self.learning_rate if self.learning_rate is not None else args.learning_rate
        fp16 = ("fp16 overflow: this run uses fp16 mixed precision; use bf16 on a GPU that has it "
                "(training.precision: bf16) or fp32" if args.fp16 else
                "an overflow in the model's dtype (this run is not fp16; a bf16 or fp32 overflow means the "
                "weights grew huge, usually the learning rate)")
        last = state.best_model_checkpoint or _last_checkpoint(args.output_dir)
        self.message = (
            f"training stopped at step {self.step}: the {what} is not finite (NaN or inf). Likely causes: "
            f"learning_rate={lr:g} too high (try {lr / 10:g}); {fp16}; a broken data row. "
            + (f"The last good checkpoint is kept: {last} (fix the config, then resume=true or start over)."
               if last else "No checkpoint had been written yet (training.save_steps).")
        )
        say(self.message)
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None or self.message is not None:
            return
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return
        # one reduction and one host sync per optimizer step: LoRA gradients are a few MB; full fine-tuning
        # of an 8B model reads its 16 GB of bf16 gradients once, ~5 ms at an H100's 3 TB/s
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
        if not torch.isfinite(norm):
            for p in model.parameters():
                p.grad = None  # the optimizer skips parameters without a gradient: weights stay as they were
            self._stop(args, state, control, "gradient")

    def on_step_end(self, args, state, control, **kwargs):
        if self.message is not None:
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False

    on_epoch_end = on_step_end

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self._stop(args, state, control, "loss")
        if self.message is not None:
            control.should_save = False


class RunStats(TrainerCallback):
    """This session's share of a (maybe resumed) run: steps and non-padding tokens since ``train()``
    began, and its wall time; ``tokens_per_second`` for the run report."""

    def __init__(self):
        self.start_step = self.start_tokens = self.steps = self.tokens = 0
        self.seconds = 0.0
        self._t0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step, self.start_tokens = state.global_step, state.num_input_tokens_seen  # after a resume
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps = state.global_step - self.start_step
        self.tokens = state.num_input_tokens_seen - self.start_tokens
        self.seconds = time.perf_counter() - self._t0

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


class ProgressPostfix(TrainerCallback):
    """Shows the latest loss, learning rate, tokens/s (when the Trainer counts input tokens:
    ``include_num_input_tokens_seen``) and peak GPU memory on the Trainer's own progress bar (tqdm
    already shows steps, speed and ETA). ``last`` holds what was shown last."""

    def __init__(self, progress_callback):
        self.progress = progress_callback
        self.last: dict = {}
        self._t0, self._tok0 = None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._tok0 = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = getattr(self.progress, "training_bar", None)
        if bar is None or not logs or "loss" not in logs:
            return
        post = {"loss": f"{logs['loss']:.4f}"}
        if "learning_rate" in logs:
            post["lr"] = f"{logs['learning_rate']:.2e}"
        tokens = state.num_input_tokens_seen - self._tok0
        if tokens > 0 and self._t0 is not None:
            post["tok/s"] = f"{tokens / max(time.perf_counter() - self._t0, 1e-9):,.0f}"
        if torch.cuda.is_available():
            post["mem"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}GiB"
        bar.set_postfix(post, refresh=False)
        self.last = post


def _last_checkpoint(output_dir: str) -> str | None:
    from .checkpoints import checkpoints

    found = checkpoints(output_dir)
    return str(found[-1]) if found else None


def oom_advice(*, load_in_4bit: bool, max_seq_length: int, batch_size: int, grad_accum: int,
               gradient_checkpointing, longest_tokens: int | None = None, device: str | None = None) -> str:
    """What to change after an out-of-memory error, most effective first, with this run's numbers.

    The keys are the ``velotune train`` config fields; the rows per optimizer step stay the same when
    the batch is halved and the accumulation doubled, so the run trains on the same data per step.
    """
    tips = []
    if not load_in_4bit:
        tips.append("model.load_in_4bit: true (QLoRA: the frozen weights take about 4x less memory than 16-bit)")
    from ..models import offload

    offloaded = gradient_checkpointing in ("unsloth", "offload")
    if gradient_checkpointing is False:
        tips.append("memory.gradient_checkpointing: true (now False; recompute checkpointing keeps each layer's "
                    "input instead of all its activations)")
    elif not offloaded and offload.ENABLED_ON_CUDA:
        tips.append(f"memory.gradient_checkpointing: unsloth (now {gradient_checkpointing!r}; offloaded "
                    "checkpointing keeps layer inputs in host memory instead of on the GPU)")
    if batch_size > 1:
        tips.append(f"training.per_device_train_batch_size: {max(1, batch_size // 2)} with "
                    f"training.gradient_accumulation_steps: {grad_accum * 2} (now {batch_size} x {grad_accum}: "
                    f"the same {batch_size * grad_accum} rows per step, half the activation memory)")
    seq = max_seq_length if not longest_tokens else min(max_seq_length, longest_tokens)
    if seq > 256:
        tips.append(f"model.max_seq_length: {seq // 2} (now {max_seq_length}; activations grow with it; rows "
                    "longer than that are truncated and counted)")
    if not tips:
        tips.append("nothing left to shrink in this config: a smaller model, or a GPU with more memory")
    where = f" on {device}" if device else ""
    return (f"out of memory{where}. For this run, change (most effective first):\n  - " + "\n  - ".join(tips)
            + "\nCheckpoints already written are kept: resume=true continues from the newest, in the same data "
              "order as long as the rows per step (batch x accumulation) stay the same.")
