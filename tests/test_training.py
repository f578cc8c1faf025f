"""SFTTrainer: the seed's call and TRL's current call; exact loss normalisation under accumulation."""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments
from trl import SFTConfig

from velotune import FastLanguageModel, SFTTrainer, VelotuneError, get_alpaca_formatter, is_bfloat16_supported
from velotune.data.bundled import load_alpaca_dataset
from velotune.training.optim import _StepWithoutHostSyncs


def _peft(tiny_dir, load_in_4bit=True, **kw):
    model, tok = FastLanguageModel.from_pretrained(tiny_dir(), max_seq_length=256, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=True, **kw)
    return model, tok


def _dataset(tok, n=16):
    return load_alpaca_dataset().select(range(n)).map(get_alpaca_formatter(tok), batched=True)


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_seed_call_equals_current_trl_call(tiny_dir, tmp_path):
    """The seed's exact SFTTrainer call (TrainingArguments + legacy keywords) == TRL's SFTConfig call."""
    runs = []
    for form in ("seed", "trl"):
        model, tokenizer = _peft(tiny_dir)
        ds = _dataset(tokenizer)
        common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5, max_steps=3,
                      learning_rate=2e-4, fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported(),
                      logging_steps=1, optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear",
                      seed=3407, output_dir=str(tmp_path / form), report_to="none")
        if form == "seed":
            trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=ds, dataset_text_field="text",
                                 max_seq_length=256, args=TrainingArguments(**common))
        else:
            trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=ds,
                                 args=SFTConfig(dataset_text_field="text", max_length=256, **common))
        assert trainer.args.max_length == 256 and trainer.args.optim.value == "adamw_8bit"
        assert trainer.args.fp16 is False  # CPU: fp16 autocast is turned off (and said)
        before = _lora_state(model)
        stats = trainer.train()
        after = _lora_state(model)
        assert torch.isfinite(torch.tensor(stats.training_loss))
        assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change LoRA weights"
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        assert isinstance(inner, _StepWithoutHostSyncs)  # bitsandbytes' step without its per-parameter sync
        runs.append((stats.training_loss, after))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for k in runs[0][1]:
        torch.testing.assert_close(runs[0][1][k], runs[1][1][k], rtol=1e-5, atol=1e-7)


def test_trl_sft_trainer_with_a_velotune_model_is_velotune_s(tiny_dir, tmp_path, notices, monkeypatch):
    """The seed imports the trainer from TRL (`from trl import SFTTrainer`) and calls it with the older keywords:
    given a model FastLanguageModel loaded, TRL's class builds velotune's SFTTrainer, which trains exactly as
    the same call to velotune.SFTTrainer does. TRL's own class runs for other models (its keywords: the old ones
    raise as before), for its subclasses, and with the switch off."""
    import trl
    from transformers import AutoModelForCausalLM

    from velotune import _notices
    from velotune.training import trainer as vt

    monkeypatch.setattr(_notices, "_said", set())  # said once per process: earlier tests may have said it
    runs = []
    for cls in (trl.SFTTrainer, SFTTrainer):
        model, tokenizer = _peft(tiny_dir)
        t = cls(model=model, train_dataset=_dataset(tokenizer), dataset_text_field="text", max_seq_length=256,
                args=TrainingArguments(per_device_train_batch_size=2, max_steps=2, learning_rate=2e-4, seed=3407,
                                       output_dir=str(tmp_path / cls.__module__), report_to="none", logging_steps=1))
        assert type(t) is SFTTrainer and isinstance(t, trl.SFTTrainer)
        t.train()
        runs.append(([h["loss"] for h in t.state.log_history if "loss" in h], _lora_state(model)))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 2
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k])
    assert sum("trl.SFTTrainer was given a velotune model" in m for m in notices) == 1

    model, tokenizer = _peft(tiny_dir)
    config = SFTConfig(output_dir=str(tmp_path / "own"), max_steps=1, report_to="none", bf16=False)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32)
    assert type(trl.SFTTrainer(model=plain, processing_class=tokenizer, train_dataset=_dataset(tokenizer),
                               args=config)) is trl.SFTTrainer
    with pytest.raises(TypeError, match="dataset_text_field"):
        trl.SFTTrainer(model=plain, processing_class=tokenizer, train_dataset=_dataset(tokenizer), args=config,
                       dataset_text_field="text")

    class Mine(trl.SFTTrainer):
        pass

    assert type(Mine(model=model, processing_class=tokenizer, train_dataset=_dataset(tokenizer), args=config)) is Mine
    vt.ROUTE_TRL_SFTTRAINER = False
    try:
        assert type(trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=_dataset(tokenizer),
                                   args=config)) is trl.SFTTrainer
    finally:
        vt.ROUTE_TRL_SFTTRAINER = True


def test_tokenizer_defaults_from_model(tiny_dir, tmp_path):
    model, tok = _peft(tiny_dir)
    trainer = SFTTrainer(model=model, train_dataset=_dataset(tok), dataset_text_field="text",
                         args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none"))
    assert trainer.processing_class is tok
    assert trainer.args.max_length == 256  # the max_seq_length the model was loaded with


def test_trainer_bad_inputs(tiny_dir, tmp_path):
    model, tok = _peft(tiny_dir)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none")
    with pytest.raises(VelotuneError, match="conflicts with args.max_length=64"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_dataset(tok), max_seq_length=128,
                   args=SFTConfig(output_dir=str(tmp_path), max_length=64, bf16=False))
    with pytest.raises(VelotuneError, match="train_dataset is empty"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=Dataset.from_dict({"text": []}), args=args)
    with pytest.raises(VelotuneError, match="has no 'text' column"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=load_alpaca_dataset().select(range(4)), args=args)
    with pytest.raises(VelotuneError, match="pass the tokenizer once"):
        SFTTrainer(model=model, tokenizer=tok, processing_class=object(), train_dataset=_dataset(tok), args=args)
    with pytest.raises(VelotuneError, match="must be a transformers.TrainingArguments"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_dataset(tok), args={"lr": 1})


def _one_sgd_step(tiny_dir, tmp_path, ds, bs, ga):
    model, tok = _peft(tiny_dir, load_in_4bit=False)
    args = TrainingArguments(output_dir=str(tmp_path / f"bs{bs}"), per_device_train_batch_size=bs,
                             gradient_accumulation_steps=ga, max_steps=1, learning_rate=1.0, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, seed=7,
                             report_to="none", logging_steps=1, dataloader_drop_last=True)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=ds, dataset_text_field="text",
                         max_seq_length=256, args=args)
    before = _lora_state(model)
    trainer.train()
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][0]
    return {k: v - before[k] for k, v in _lora_state(model).items()}, loss


def test_gradient_accumulation_equals_big_batch(tiny_dir, tmp_path):
    """bs 2 x GA 4 takes the same step as bs 8 x GA 1: loss = sum of token losses / tokens in all 8 rows."""
    _, tok = _peft(tiny_dir, load_in_4bit=False)
    # Very different lengths, so averaging per micro-batch (the classic bug) would give a different step.
    texts = [("word " * n).strip() + tok.eos_token for n in (3, 60, 5, 90, 2, 40, 7, 120)]
    ds = Dataset.from_dict({"text": texts})
    big, loss_big = _one_sgd_step(tiny_dir, tmp_path, ds, bs=8, ga=1)
    acc, loss_acc = _one_sgd_step(tiny_dir, tmp_path, ds, bs=2, ga=4)
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)  # the logged loss is the big batch's loss too
    moved = [k for k in big if big[k].abs().max() > 0]
    assert moved, "the SGD step changed nothing"
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-7)


def test_flos_estimate_is_transformers_and_cached(tiny_dir, tmp_path, monkeypatch):
    """floating_point_ops (the logs' total_flos) equals transformers' own estimate, counts the parameters once
    (transformers walks every module and parameter per micro-batch), and counts again after a module is
    registered."""
    import transformers

    model, tok = _peft(tiny_dir)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_dataset(tok),
                         args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none"))
    inputs = {"input_ids": torch.ones(2, 37, dtype=torch.long)}
    want = transformers.Trainer.floating_point_ops(trainer, inputs)
    assert want > 0
    calls = []
    cls = type(model.get_base_model())  # PEFT forwards num_parameters to the base model
    real = cls.num_parameters
    monkeypatch.setattr(cls, "num_parameters", lambda self, **k: calls.append(1) or real(self, **k))
    assert [trainer.floating_point_ops(inputs) for _ in range(3)] == [want] * 3
    assert len(calls) <= 1
    base = model.get_base_model()
    base.model.extra = torch.nn.Linear(5, 7)  # a registration: 42 more parameters
    assert trainer.floating_point_ops(inputs) == want + 6 * 2 * 37 * 42


def test_step_housekeeping_from_cached_parameters_trains_like_transformers(tiny_dir, tmp_path, monkeypatch):
    """Gradient clipping and zero_grad read the parameters from a cached list (pointers.parameters_of)
    instead of walking the module tree each step: the same logged losses and gradient norms and the same
    LoRA weights, bit for bit, as transformers' own calls (a gradient left uncleared or a parameter missed
    by the clip would change them: max_grad_norm is small enough to clip every step)."""
    import transformers

    from velotune.training import trainer as trainer_mod

    runs = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(trainer_mod.SFTTrainer, "_clip_grad_norm", transformers.Trainer._clip_grad_norm)
            monkeypatch.setattr(trainer_mod, "_fast_zero_grad", lambda model: None)
        model, tok = _peft(tiny_dir)
        args = TrainingArguments(output_dir=str(tmp_path / str(fast)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=3, logging_steps=1, max_grad_norm=0.05,
                                 learning_rate=1e-3, report_to="none", seed=3, save_strategy="no")
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_dataset(tok), args=args)
        assert ("zero_grad" in model.__dict__) == fast
        trainer.train()
        logged = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
        assert len(logged) == 3 and all(g > 0.05 for _, g in logged)
        assert all(p.grad is None for p in model.parameters())
        runs.append((logged, _lora_state(model)))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k


def _nan_runs(tiny_dir, tmp_path, monkeypatch, user_filter: bool):
    """Logged losses of two identical runs whose 2nd and 3rd micro-batches (of 6) report a NaN loss: velotune's
    GPU-side filter, and transformers' own host check (the control). The NaN is the loss's value only (a
    ``torch.where`` over it), so the gradients and the training stay finite."""
    from velotune.training import trainer as trainer_mod

    seen = {"n": 0}
    real = trainer_mod.SFTTrainer.compute_loss

    def nan_some(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = real(self, model, inputs, return_outputs, num_items_in_batch)
        seen["n"] += 1
        return torch.where(torch.tensor(seen["n"] in (2, 3)), torch.tensor(float("nan")), loss)

    monkeypatch.setattr(trainer_mod.SFTTrainer, "compute_loss", nan_some)
    runs = []
    for ours in (True, False):
        seen["n"] = 0
        model, tok = _peft(tiny_dir)
        args = TrainingArguments(output_dir=str(tmp_path / str(ours)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=3, logging_steps=1, learning_rate=1e-3,
                                 report_to="none", seed=3, save_strategy="no", logging_nan_inf_filter=user_filter)
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_dataset(tok), args=args)
        assert args.logging_nan_inf_filter is user_filter  # the caller's arguments are left as they were
        assert trainer.args.logging_nan_inf_filter is False  # the host check is off in the trainer's copy
        if not ours:  # the control: transformers' own check
            trainer._nan_check_on_host()
            assert trainer.args.logging_nan_inf_filter is user_filter
        trainer.train()
        runs.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    return runs


def test_nan_loss_filter_runs_on_the_gpu_and_logs_what_transformers_logs(tiny_dir, tmp_path, monkeypatch):
    """logging_nan_inf_filter (transformers' default, on): a NaN micro-batch loss is replaced by the running
    mean, computed on the device instead of after a host read of every micro-batch's loss; the logged losses
    equal transformers' own, and are finite."""
    ours, theirs = _nan_runs(tiny_dir, tmp_path, monkeypatch, user_filter=True)
    assert len(ours) == 3 and all(v == v for v in ours)
    assert ours == theirs


def test_nan_loss_filter_off_logs_the_nan(tiny_dir, tmp_path, monkeypatch):
    """logging_nan_inf_filter=False: nothing is filtered, as in transformers (the NaN reaches the log)."""
    ours, theirs = _nan_runs(tiny_dir, tmp_path, monkeypatch, user_filter=False)
    assert any(v != v for v in ours) and any(v != v for v in theirs)
    assert [v for v in ours if v == v] == [v for v in theirs if v == v]


def test_nan_filter_falls_back_to_transformers_check_without_a_running_total(tiny_dir, tmp_path):
    """A transformers whose loop keeps no ``_tr_loss`` tensor: the device-side filter hands the check back."""
    model, tok = _peft(tiny_dir)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_dataset(tok),
                         args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none"))
    trainer.__dict__.pop("_tr_loss", None)
    loss = torch.tensor(float("nan"))
    assert trainer._filtered_loss(loss) is loss
    assert trainer.args.logging_nan_inf_filter is True and trainer._velotune_nan_filter is False


def test_training_loop_reads_no_loss_on_the_host(tiny_dir, tmp_path):
    """With the NaN filter on the device, transformers' loop reads no micro-batch loss on the host (each such
    read is a GPU sync); with its own check (the control) it reads two per micro-batch. Counted as scalar reads
    (aten::_local_scalar_dense) made by transformers' training loop itself, logging out of the way."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                caller = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename][-1]
                Reads.n += caller.name == "_run_epoch" and caller.filename.endswith("trainer.py")
            return func(*args, **(kwargs or {}))

    counts = []
    for ours in (True, False):
        model, tok = _peft(tiny_dir)
        args = TrainingArguments(output_dir=str(tmp_path / str(ours)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, logging_steps=100, report_to="none",
                                 save_strategy="no")
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_dataset(tok), args=args)
        if not ours:
            trainer._nan_check_on_host()
        Reads.n = 0
        with Reads():
            trainer.train()
        counts.append(Reads.n)
    assert counts == [0, 8], counts  # 2 steps x 2 micro-batches x (isnan, isinf)
