"""``SFTTrainer`` that accepts both the seed's (older TRL) call and TRL's current one.

The seed passes ``dataset_text_field``, ``max_seq_length``, ``packing`` ... to the trainer and a plain
``transformers.TrainingArguments`` as ``args``; TRL >= 0.20 moved those keywords into ``SFTConfig``
(``max_seq_length`` became ``max_length``) and renamed ``tokenizer`` to ``processing_class``.
velotune maps the old form onto the new one, so both run unchanged. Everything else is TRL's.

Loss normalisation: TRL + transformers count the label tokens of the whole accumulated batch
(``num_items_in_batch``) and each micro-batch's loss is ``sum(token losses) / num_items_in_batch``,
so gradient accumulation equals the big batch exactly (tests/test_training.py checks it).

Several processes (DDP, ``torchrun`` / ``accelerate launch``): with ``average_tokens_across_devices``
(transformers' default) ``num_items_in_batch`` counts the label tokens of every rank's micro-batches,
and each rank's loss is multiplied by the world size W, because DDP averages the gradients over ranks:
mean_r(W * sum_r / N) = sum / N, the one-process loss of the same global batch (and the logged loss,
averaged over ranks by the Trainer, is that loss too). tests/test_distributed.py checks it on 2 ranks.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import weakref
from pathlib import Path
from typing import Optional

import torch
import trl
from transformers import TrainingArguments

from .._notices import VelotuneError, say, say_once
from ..distributed import destroy_at_exit, world
from .buckets import wrap_trainer_collator
from .callbacks import ProgressPostfix
from .checkpoints import AtomicCheckpointMixin
from .optim import without_host_syncs

# Old-TRL trainer keywords -> SFTConfig field.
_LEGACY_KEYS = {
    "dataset_text_field": "dataset_text_field",
    "max_seq_length": "max_length",
    "packing": "packing",
    "dataset_num_proc": "dataset_num_proc",
    "dataset_kwargs": "dataset_kwargs",
    "eval_packing": "eval_packing",
    "neftune_noise_alpha": "neftune_noise_alpha",
    "model_init_kwargs": "model_init_kwargs",
}


def _velotune_state(model):
    """velotune's state of a model FastLanguageModel loaded; None for anything else (None, a hub name, ...)."""
    from ..loading import state_of

    if model is None or isinstance(model, str):
        return None
    try:
        return state_of(model)
    except (VelotuneError, AttributeError):
        return None


def to_sft_config(args, legacy: dict, model=None) -> trl.SFTConfig:
    """Build the ``SFTConfig`` TRL needs from ``args`` (None, TrainingArguments or SFTConfig) + legacy kwargs."""
    st = _velotune_state(model)
    if args is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        fields = dict(output_dir="outputs", bf16=bf16, fp16=torch.cuda.is_available() and not bf16, report_to="none")
    elif not isinstance(args, TrainingArguments):
        raise VelotuneError(f"args must be a transformers.TrainingArguments or trl.SFTConfig, got {type(args).__name__}")
    elif not isinstance(args, trl.SFTConfig):
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments)
                  if f.init and hasattr(args, f.name)}
    else:
        fields = None
    # built once: each SFTConfig sets up accelerate's process state again
    if fields is None:
        args = dataclasses.replace(args, **_distributed_changes(lambda k: getattr(args, k), st is not None))
    else:
        args = trl.SFTConfig(**{**fields, **_distributed_changes(lambda k: fields.get(k), st is not None)})
    for old, new in _LEGACY_KEYS.items():
        if old not in legacy or legacy[old] is None:
            continue
        value = legacy[old]
        current = getattr(args, new)
        default = next(f.default for f in dataclasses.fields(trl.SFTConfig) if f.name == new)
        if current != default and current != value:
            raise VelotuneError(
                f"{old}={value!r} given to SFTTrainer conflicts with args.{new}={current!r}; set it in one place"
            )
        setattr(args, new, value)
    if st is not None and "max_seq_length" not in legacy and args.max_length == 1024:
        args.max_length = st.max_seq_length  # TRL's default 1024 -> the max_seq_length the model was loaded with
    return args


def _distributed_changes(get, velotune_model: bool) -> dict:
    """Argument changes a multi-process (DDP) run needs; ``get(name)`` reads the user's value (None if unset)."""
    w = world()
    if not w.distributed:
        return {}
    changes = {}
    if not torch.cuda.is_available() and not get("use_cpu"):
        # Without use_cpu, accelerate on a GPU-less machine sets up no DDP at all: every rank would train
        # alone on the whole data set (no gradient all-reduce), silently.
        changes["use_cpu"] = True
        say_once("ddp-cpu", f"{w.size} processes on a machine without CUDA GPUs: DDP over the gloo backend "
                 "(use_cpu=True)")
    if velotune_model and get("fsdp"):
        # velotune shards the model itself (SFTTrainer, distributed.fsdp_shard); accelerate must not
        changes.update(fsdp="", fsdp_config=None)
    if velotune_model and get("ddp_find_unused_parameters") is None:
        # Every trainable tensor (LoRA A/B, modules_to_save) takes part in every forward, so DDP need not
        # walk the autograd graph each step to find unused ones (transformers turns that on for any model that
        # is not a PreTrainedModel, a PeftModel included).
        changes["ddp_find_unused_parameters"] = False
    if get("average_tokens_across_devices") is False:
        say_once("ddp-avg-tokens", "average_tokens_across_devices=False: each rank divides its loss by its own "
                 "label tokens and DDP averages the ranks, which weighs the tokens of short micro-batches more "
                 "than one process would; leave it True for the one-process loss")
    return changes


def _cpu_mixed_precision(args) -> None:
    """fp16 autocast has no fast CPU kernels; the seed's ``fp16=not is_bf16_supported()`` means "GPU"."""
    if torch.cuda.is_available() or not args.fp16:
        return
    say_once("cpu-fp16", "fp16=True on a machine without a CUDA GPU: training in the model's own dtype "
             "(float32 on CPU) instead of fp16 mixed precision")
    args.fp16 = False


def _shifted_labels(inputs):
    """The labels each position predicts ([B, T-1], or the collator's shift_labels), or None."""
    labels = inputs.get("shift_labels")
    if labels is None:
        labels = inputs.get("labels")
        labels = labels[..., 1:] if labels is not None else None
    return labels


def _fsdp_request(args) -> Optional[dict]:
    """The FSDP settings asked for by ``fsdp=`` / ``fsdp_config=`` or an accelerate FSDP config (accelerate
    launch sets ACCELERATE_USE_FSDP and FSDP_* variables), or None."""
    env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    fsdp = getattr(args, "fsdp", None) if args is not None else None
    if not fsdp and not env:
        return None
    cfg = {k.removeprefix("fsdp_"): v for k, v in dict(getattr(args, "fsdp_config", None) or {}).items()}

    def flag(name: str, default: bool) -> bool:
        value = cfg.get(name, os.environ.get(f"FSDP_{name.upper()}", default))
        return str(value).lower() in ("true", "1", "yes")

    listed = fsdp if isinstance(fsdp, (list, tuple)) else str(fsdp or "").split()  # ["full_shard", "offload"]
    options = {str(getattr(o, "value", o)) for o in listed}
    return {"reshard_after_forward": flag("reshard_after_forward", True),
            "cpu_offload": flag("cpu_offload", False) or "offload" in options,
            "activation_checkpointing": flag("activation_checkpointing", False),
            "version": str(cfg.get("version", os.environ.get("FSDP_VERSION", "2")))}


def _check_fsdp(request: dict) -> None:
    """FSDP options velotune's sharding does not take: an error naming the fix, before any work."""
    if not world().distributed:
        raise VelotuneError("FSDP shards the model over several processes: launch the script with torchrun "
                            "--nproc_per_node N (or accelerate launch), or drop fsdp= to train in one process")
    if request["cpu_offload"]:
        raise VelotuneError("FSDP cpu_offload is not supported by velotune's sharding yet: drop it (4-bit base "
                            "weights, load_in_4bit=True, are the way to fit a large model)")
    if request["activation_checkpointing"]:
        raise VelotuneError("FSDP activation_checkpointing: velotune checkpoints the layers itself; drop it from the "
                            "FSDP config and pass use_gradient_checkpointing= to get_peft_model")
    if request["version"] != "2":
        say_once("fsdp-version", f"FSDP version {request['version']} asked: velotune shards with FSDP2 "
                 "(torch.distributed.fsdp.fully_shard), the same sharded data parallelism")


def _keep_sharded(trainer, model) -> None:
    """Accelerate must neither wrap the FSDP2-sharded model in DDP nor shard it again: its prepare_model
    hands the model back as it is (registered, as accelerate does with the models it prepares)."""
    acc = trainer.accelerator
    real = acc.prepare_model

    def prepare_model(m, device_placement=None, evaluation_mode=False):
        if m is model:
            if m not in acc._models:
                acc._models.append(m)
            return m
        return real(m, device_placement=device_placement, evaluation_mode=evaluation_mode)

    acc.prepare_model = prepare_model


# TRL warns that packing without FlashAttention "may lead to cross-contamination between samples": true for
# HF's SDPA forward, which ignores where packed examples start; velotune's forward keeps them apart (varlen
# FlashAttention or a block-diagonal mask from position_ids; tests/test_packing.py). For velotune's known
# families the warning is replaced by what does happen.
_TRL_PACKING_WARNING = "cross-contamination between samples"


class _DropTrlPackingWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _TRL_PACKING_WARNING not in record.getMessage()


@contextlib.contextmanager
def _packing_told_right(model, args):
    """While TRL sets up: its packing warning left out for a model on velotune's fast forward, said right."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fast = getattr(base, "__dict__", {}).get("_velotune_fast") or {}
    if not (getattr(args, "packing", False) and fast.get("spec") is not None):
        yield
        return
    log, drop = logging.getLogger("trl.trainer.sft_trainer"), _DropTrlPackingWarning()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)
    say_once("packing-apart", "packing: velotune's forward keeps packed examples apart (attention restarts at each "
             "example's position 0), so TRL's cross-contamination warning for non-FlashAttention models does not "
             "apply here")


@contextlib.contextmanager
def _accelerate_without_fsdp(active: bool):
    """While the Trainer builds its Accelerator: an accelerate FSDP config (ACCELERATE_USE_FSDP) must not make
    accelerate shard the model again (velotune sharded it)."""
    old = os.environ.get("ACCELERATE_USE_FSDP")
    if active and old is not None:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if active and old is not None:
            os.environ["ACCELERATE_USE_FSDP"] = old


def _one_process_one_gpu(args) -> None:
    """One process that sees several GPUs: train on the current one (where velotune put the model).

    transformers would otherwise wrap a 16-bit model in ``torch.nn.DataParallel`` (one process driving
    every GPU, which velotune's loss normalisation and fast forward do not support) and multiply the
    batch size by the GPU count. DDP is the way to use them all."""
    if world().distributed or args.n_gpu <= 1:
        return
    n = args.n_gpu
    args._n_gpu = 1  # transformers does the same for a model split over GPUs (Trainer.is_model_parallel)
    say_once("one-process-gpus", f"this process sees {n} CUDA GPUs; training on one (cuda:"
             f"{torch.cuda.current_device()}). To train on all {n}: torchrun --nproc_per_node {n} your_script.py "
             "(DDP), or CUDA_VISIBLE_DEVICES to pick one")


def _fast_zero_grad(model) -> None:
    """``model.zero_grad()`` (what the Trainer calls after every optimizer step) over a cached parameter list
    (pointers.parameters_of) instead of a walk of the module tree: the same gradients set to None.
    ``set_to_none=False`` takes torch's own path."""
    from ..models.pointers import parameters_of

    ref = weakref.ref(model)
    plain = type(model).zero_grad

    def zero_grad(set_to_none: bool = True) -> None:
        m = ref()
        if not set_to_none:
            return plain(m, set_to_none)
        for p in parameters_of(m):
            if p.grad is not None:
                p.grad = None

    zero_grad.__doc__ = plain.__doc__
    model.zero_grad = zero_grad


class SFTTrainer(AtomicCheckpointMixin, trl.SFTTrainer):
    """TRL's ``SFTTrainer``, accepting the seed's keywords too; checkpoints are saved atomically.

    Accepts everything ``trl.SFTTrainer`` does, plus: ``tokenizer=`` (alias of ``processing_class``),
    ``dataset_text_field``, ``max_seq_length``, ``packing``, ``dataset_num_proc``, ``dataset_kwargs``,
    ``eval_packing``, ``neftune_noise_alpha``, ``model_init_kwargs``, and ``args`` as a plain
    ``TrainingArguments``. Without a tokenizer, the one ``FastLanguageModel.from_pretrained`` loaded
    is used; without ``max_seq_length``, the one the model was loaded with.

    Under ``torchrun`` / ``accelerate launch`` (DDP) the same call trains on every rank: the loss is
    normalised over all ranks' label tokens (the one-process loss of the global batch), rank 0 alone
    saves; on a GPU-less machine the ranks run over gloo (``use_cpu=True``). With ``fsdp=`` (or an
    accelerate FSDP config) velotune shards the model itself (FSDP2, every decoder layer one unit: the fused
    kernels run on the sharded layers) and accelerate only runs the loop: saves and checkpoints gather the
    adapter and optimizer state (safetensors) on rank 0, and resume puts them back into the shards.

    transformers' ``logging_nan_inf_filter`` (a NaN / Inf micro-batch loss is logged as the running mean) is
    applied on the device (:meth:`_filtered_loss`) instead of after a host read of every micro-batch's loss;
    the trainer's own copy of the arguments has it off, the caller's object is left unchanged.
    """

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, tokenizer=None, **kwargs):
        legacy = {k: kwargs.pop(k) for k in list(kwargs) if k in _LEGACY_KEYS}
        if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
            raise VelotuneError("pass the tokenizer once: tokenizer= and processing_class= name different objects")
        processing_class = processing_class if processing_class is not None else tokenizer
        st = _velotune_state(model)
        if processing_class is None and st is not None:
            processing_class = st.tokenizer
        fsdp = _fsdp_request(args) if st is not None else None
        if fsdp is not None:
            _check_fsdp(fsdp)
        elif st is not None and world().distributed and torch.cuda.is_available() \
                and next(model.parameters()).device.type == "cpu":
            raise VelotuneError(
                "the model is in host memory (loaded with device_map=\"cpu\") but this DDP run has GPUs: DDP trains "
                "each rank's whole copy where it is. Load it without device_map (each rank's copy goes to "
                "cuda:LOCAL_RANK), or, for a model bigger than one GPU, shard it: TrainingArguments(fsdp=\"full_shard\")")
        args = to_sft_config(args, legacy, model)
        _cpu_mixed_precision(args)
        if st is not None:
            # velotune set gradient checkpointing on the model (get_peft_model's use_gradient_checkpointing);
            # the Trainer must not re-enable it with other settings.
            args.gradient_checkpointing = False
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise VelotuneError("train_dataset is empty; check the file / split / filter that produced it")
        text_field = args.dataset_text_field
        cols = getattr(train_dataset, "column_names", None)
        if cols is not None and kwargs.get("formatting_func") is None and text_field not in cols \
                and not {"messages", "conversations", "prompt", "completion", "input_ids"} & set(cols):
            raise VelotuneError(
                f"train_dataset has no {text_field!r} column (columns: {cols}); format it first (e.g. "
                "dataset.map(get_alpaca_formatter(tokenizer), batched=True)) or pass dataset_text_field="
            )
        self._velotune_fsdp = fsdp
        if st is not None:
            _one_process_one_gpu(args)
        if world().distributed:
            destroy_at_exit()
        with _accelerate_without_fsdp(fsdp is not None), _packing_told_right(model, args):
            super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if fsdp is not None:
            # after TRL's __init__, which may still change parameter dtypes (QLoRA adapters to bf16): FSDP2
            # records them when it shards
            from ..distributed import fsdp_shard

            fsdp_shard(self.model, reshard_after_forward=fsdp["reshard_after_forward"])
            _keep_sharded(self, self.model)
            say_once("fsdp-trainer", f"FSDP: every decoder layer sharded over the {world().size} ranks (FSDP2); "
                     "saves gather the adapter and optimizer state on rank 0")
        # Our compute_loss divides by num_items_in_batch itself: the Trainer must not also divide by the
        # number of accumulation steps.
        self.model_accepts_loss_kwargs = True
        wrap_trainer_collator(self, model, st)
        if st is not None and fsdp is None:
            _fast_zero_grad(self.model)
        # transformers' NaN/Inf filter of the logged loss reads each micro-batch's loss on the host (a sync after
        # every backward: the host could not queue the optimizer step, or the next batch, while the GPU works).
        # velotune applies the same filter on the GPU (training_step) and switches the host check off in the
        # trainer's own copy of the arguments (the caller's object is left as it was).
        self._velotune_nan_filter = bool(self.args.logging_nan_inf_filter)
        if self._velotune_nan_filter:
            self.args = copy.copy(self.args)
            self.args.logging_nan_inf_filter = False
        from transformers.trainer_callback import ProgressCallback

        bar = next((c for c in self.callback_handler.callbacks if isinstance(c, ProgressCallback)), None)
        if bar is not None:
            self.add_callback(ProgressPostfix(bar))

    def training_step(self, model, inputs, num_items_in_batch=None):
        """transformers' / TRL's training step; the loss it returns goes through :meth:`_filtered_loss`."""
        return self._filtered_loss(super().training_step(model, inputs, num_items_in_batch))

    def _filtered_loss(self, loss):
        """transformers' ``logging_nan_inf_filter`` without a host sync. transformers adds each micro-batch's
        loss to its running total, or, for a NaN / Inf loss, the running total's mean over the steps since the
        last log (``tr += tr / (1 + global_step - last_logged)``). Here the loss returned is already that
        mean where it is not finite (``torch.where`` on the GPU), and the trainer adds it as it is: the same
        totals, the same logs. Only the logged loss is affected, as in transformers: the gradients are the
        step's own. A transformers that keeps its running total elsewhere gets its own check back."""
        if not self._velotune_nan_filter:
            return loss
        total = getattr(self, "_tr_loss", None)
        if not isinstance(total, torch.Tensor) or total.device != loss.device:
            self._nan_check_on_host()  # transformers' check from this micro-batch on
            return loss
        since = 1 + self.state.global_step - self._globalstep_last_logged
        return torch.where(torch.isfinite(loss), loss, total / since)

    def _nan_check_on_host(self) -> None:
        """Hand ``logging_nan_inf_filter`` back to transformers' own host check, as the caller set it (the
        fallback above; benchmarks and tests use it as the control)."""
        self.args.logging_nan_inf_filter = self.args.logging_nan_inf_filter or self._velotune_nan_filter
        self._velotune_nan_filter = False

    def create_optimizer(self, *args, **kwargs):
        """The optimizer ``args.optim`` names; bitsandbytes' non-paged ones step without a host sync per
        parameter (training/optim.py: the same kernels and results, without the GPU idling between them)."""
        super().create_optimizer(*args, **kwargs)
        if self._velotune_fsdp is not None and type(self.optimizer).__module__.startswith("bitsandbytes"):
            raise VelotuneError(f"optim={self.args.optim!r} (bitsandbytes) does not take FSDP's sharded parameters; "
                                "use optim=\"adamw_torch\" with FSDP (the LoRA optimizer state is small and sharded "
                                "over the ranks)")
        self.optimizer = without_host_syncs(self.optimizer)
        return self.optimizer

    # ------------------------------------------------------------------ FSDP: saving what the ranks hold
    def save_model(self, output_dir=None, _internal_call=False):
        """Under FSDP the adapter is gathered from every rank (a collective: the Trainer calls this on all
        ranks) and rank 0 writes what one process would; otherwise transformers' save_model."""
        if self._velotune_fsdp is None:
            return super().save_model(output_dir, _internal_call=_internal_call)
        from ..distributed import fsdp_save_adapter

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        fsdp_save_adapter(self.model, output_dir)
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir):
        if self._velotune_fsdp is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        from ..distributed import gather_training_state, write_training_state

        weights, optim = gather_training_state(self.model, self.optimizer)  # every rank: a collective
        if self.args.should_save:
            write_training_state(Path(output_dir), weights, optim)
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._velotune_fsdp is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        # the weights come back with the optimizer state (_load_optimizer_and_scheduler), in one collective

    def _load_best_model(self):
        if self._velotune_fsdp is None:
            return super()._load_best_model()
        from ..distributed import load_training_state

        load_training_state(self.model, None, self.state.best_model_checkpoint)  # weights only, into the shards

    def _load_optimizer_and_scheduler(self, checkpoint):
        if self._velotune_fsdp is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from ..distributed import load_training_state

        load_training_state(self.model, self.optimizer, checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Loss = sum of label-token losses / label tokens in the whole accumulated batch (all ranks' under
        DDP, the loss then times the world size: DDP averages gradients and the Trainer averages losses).

        The model computes it from ``labels`` and ``num_items_in_batch`` (HF's causal-LM loss: fp32
        logits, shifted labels, ignore_index -100). A batch whose labels are all masked counts as one
        item, so its loss is 0 instead of 0/0. TRL's own fused LM-head path is not used: it needs a
        CUDA Triton driver and would bypass velotune's fast forward.
        """
        if self._all_labels_masked(inputs):
            # Nothing to learn from: skip the forward; a leaf zero gives no gradient, and the optimizer
            # leaves parameters without one untouched (never a 0/0 loss).
            loss = torch.zeros((), device=self.args.device, requires_grad=True)
            return (loss, None) if return_outputs else loss
        inputs = {**inputs, "use_cache": False}
        if num_items_in_batch is None and not model.training and self.args.average_tokens_across_devices \
                and self.accelerator.num_processes > 1:
            # TRL's prediction_step passes no count: count this evaluation step's label tokens on every rank
            # (each rank evaluates the same number of batches), so the eval loss is one process's too.
            labels = _shifted_labels(inputs)
            if labels is not None:
                num_items_in_batch = self.accelerator.gather((labels != -100).sum().reshape(1)).sum()
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = torch.clamp(torch.as_tensor(num_items_in_batch), min=1)
        if "labels" not in inputs and "shift_labels" not in inputs:
            raise VelotuneError("the batch has no labels; use a causal-LM collator (SFTTrainer's default does this)")
        outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens; DDP averages gradients across ranks, and the
            # Trainer averages the logged (and evaluation) losses across ranks: times W gives sum / N.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _clip_grad_norm(self, model):
        """transformers' gradient clipping (accelerate's ``clip_grad_norm_``, the same norm and scaling) over
        the model's parameters from a cached list (pointers.parameters_of) instead of a walk of the module
        tree each step; FSDP, DeepSpeed and other engines keep transformers' own path."""
        from accelerate.utils import DistributedType

        from ..models.pointers import parameters_of

        plain = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
        if self.accelerator.distributed_type not in plain or self._velotune_fsdp is not None \
                or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(parameters_of(model), self.args.max_grad_norm)

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's FLOP estimate for the logs' ``total_flos`` (6 x input tokens x non-embedding
        parameters, as transformers computes it), with the parameter count cached until a parameter or
        module is registered anywhere: transformers walks every module and parameter for it at each
        micro-batch (~12 ms of host time for an 8B LoRA model on a slow CPU)."""
        from ..models.pointers import registrations

        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        key = (registrations(), id(self.model))
        if getattr(self, "_flos_key", None) != key:
            self._flos_params = self.model.num_parameters(exclude_embeddings=True)
            self._flos_key = key
        return 6 * inputs[main].numel() * self._flos_params

    def _all_labels_masked(self, inputs) -> bool:
        """True (and counted, said) for a micro-batch whose every label is -100; one process only (with
        several, every rank must run the same forward/backward for DDP's gradient sync)."""
        labels = _shifted_labels(inputs)
        # one host sync per micro-batch (tens of microseconds on a GPU; a step is 100s of ms)
        if labels is None or self.accelerator.num_processes > 1 or bool((labels != -100).any()):
            return False
        n = self.skipped_masked_batches = getattr(self, "skipped_masked_batches", 0) + 1
        if n & (n - 1) == 0:  # said at the 1st, 2nd, 4th, 8th, ... such batch: counted, never spammed
            say(f"step {self.state.global_step + 1}: skipped a batch whose every label is masked (no token to learn "
                f"from; {n} so far). Usual causes: responses-only markers that never match, or rows truncated "
                "before the answer (raise max_seq_length)")
        return True


# ------------------------------------------------------------------ the seed's `from trl import SFTTrainer`
# The seed imports the trainer from TRL (`from trl import SFTTrainer`), with the older keywords, after importing
# the model class from the incumbent, which rewrites TRL's trainers on import to accept them. With velotune the
# same script changes one import line: TRL's own SFTTrainer, called with a model that FastLanguageModel loaded,
# builds this module's SFTTrainer instead (the seed's keywords, velotune's loss and optimizer). Any other model,
# and any subclass of TRL's SFTTrainer, runs TRL's own, unchanged. False: TRL's own always.
ROUTE_TRL_SFTTRAINER = True
_TRL_SFTTRAINER = trl.SFTTrainer  # TRL's class, as imported


def _route_trl_sft_trainer(cls, *args, **kwargs):
    """``__new__`` of TRL's SFTTrainer: an instance of velotune's SFTTrainer when TRL's own class (not a
    subclass) is called with a velotune model; Python then runs that instance's ``__init__`` with the call's
    arguments, once."""
    if cls is _TRL_SFTTRAINER and ROUTE_TRL_SFTTRAINER \
            and _velotune_state(kwargs.get("model", args[0] if args else None)) is not None:
        say_once("trl-sft-route", "trl.SFTTrainer was given a velotune model: it runs as velotune.SFTTrainer (the "
                 "seed's keywords accepted, velotune's loss and optimizer; "
                 "velotune.training.trainer.ROUTE_TRL_SFTTRAINER = False turns this off)")
        cls = SFTTrainer
    return object.__new__(cls)


if "__new__" not in _TRL_SFTTRAINER.__dict__:  # once per process; TRL's class defines no __new__ of its own
    _TRL_SFTTRAINER.__new__ = _route_trl_sft_trainer
