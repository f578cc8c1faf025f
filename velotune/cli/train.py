"""``velotune train CONFIG.yaml [key=value ...]``: a whole fine-tuning run from one config file.

Loads the model (``FastLanguageModel``), adds LoRA, reads and checks the data, trains with velotune's
``SFTTrainer`` (atomic checkpoints every ``training.save_steps``, a stop with a message at the first
NaN/inf), saves what ``export.methods`` asks, and writes ``run_report.json`` / ``run_report.md`` (and
``loss_curve.png`` with matplotlib) into ``training.output_dir``. The memory report is printed when
training starts and ends. ``--show-defaults`` prints every field with its default and meaning.

Overrides: ``training.max_steps=20``, ``resume=true`` (a field name unique across sections may go
without its section), ``lora.target_modules=[q_proj,v_proj]``.

Exit codes: 0 done; 2 bad input found before training (config, model folder, data), with a message
naming the fix; 1 the run failed (out of memory, NaN/inf, a checkpoint or export that could not be
written), with advice; 130 interrupted (Ctrl-C). The report and the last good checkpoint are kept.

Several GPUs: ``torchrun --nproc_per_node N -m velotune train CONFIG.yaml`` (or ``accelerate launch -m
velotune train ...``) trains with DDP, ``training.per_device_train_batch_size`` per rank. Every rank
reads the config and the data and trains; rank 0 alone cleans the output folder, writes the config
copy, the checkpoints (plus each rank's RNG state), the exports and the report, and prints. The other
ranks wait for it (a barrier) and all exit with rank 0's code.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .._notices import VelotuneError, say, say_once
from ..distributed import agree, world

CONFIG_COPY = "velotune_config.yaml"
# Changing these between a run and its resume changes the data order or the model: warned about.
_RESUME_SENSITIVE = ("model.name", "model.max_seq_length", "model.load_in_4bit", "lora", "data",
                     "training.per_device_train_batch_size", "training.gradient_accumulation_steps",
                     "training.learning_rate", "training.seed", "training.lr_scheduler_type", "training.optim")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="the run's YAML file (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override fields: training.max_steps=20 resume=true lora.r=32")
    p.add_argument("--show-defaults", action="store_true", help="print every field, its default and meaning")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (file + overrides), exit")
    p.set_defaults(func=run)


def _fail(message: str, code: int) -> int:
    """Print a bad-input error (rank 0 only: every rank reads the same files and fails the same way)."""
    if world().is_main:
        print(f"velotune train: error: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from ..config import defaults_yaml, load_config

    if args.show_defaults:
        print(defaults_yaml(), end="")
        return 0
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not Path(path).exists():
        path, overrides = None, [path] + overrides  # only overrides: `velotune train model.name=... data.path=...`
    if path is None and not overrides:
        return _fail("give a config file (see examples/) or key=value fields; --show-defaults lists them", 2)
    try:
        cfg = load_config(path, overrides)
    except VelotuneError as e:
        return _fail(str(e), 2)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    try:
        run_ = _Run(cfg)
        run_.prepare()
    except VelotuneError as e:
        return _fail(str(e), 2)
    return run_.execute()


def _quiet(*_args, **_kwargs) -> None:
    """print_fn of the ranks other than 0 (their memory report is not printed)."""


# ------------------------------------------------------------------------------ source checks
def _trainer_file(name: str) -> bool:
    """transformers' own checkpoint files (optimizer, scheduler, RNG, args): torch pickles that the
    Trainer reads with ``torch.load(weights_only=True)`` (tensors and plain containers only)."""
    return name in ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin") or name.startswith("rng_state")


def check_model_folder(folder: Path, allow_pickle: bool, trust_remote_code: bool, what: str = "model.name") -> None:
    """Refuse pickled weights (unless allowed) and remote code (unless trusted) in a local model folder."""
    safetensors = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for pat in _PICKLE_PATTERNS for p in folder.glob(pat) if not _trainer_file(p.name))
    if pickles and not safetensors:
        if not allow_pickle:
            raise VelotuneError(
                f"{what}={folder} holds only pickled weights ({', '.join(pickles[:3])}): unpickling can run "
                "arbitrary code. Convert them to safetensors where you trust the source, or set "
                "model.allow_pickle: true if you trust these files")
        say_once(f"pickle:{folder}", f"loading pickled weights from {folder} (model.allow_pickle: true)")
    config = folder / "config.json"
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
    except ValueError as e:
        raise VelotuneError(f"{config} is not valid JSON ({e})") from None
    if data.get("auto_map") and not trust_remote_code:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if data.get("model_type") not in CONFIG_MAPPING:
            raise VelotuneError(
                f"{what}={folder} needs its own Python code (config.json auto_map, model_type "
                f"{data.get('model_type')!r} unknown to transformers); velotune does not run it unless "
                "model.trust_remote_code: true. Read that code first")
        say_once(f"automap:{folder}", f"{folder}: config.json auto_map ignored, using transformers' own "
                 f"{data['model_type']} code (model.trust_remote_code is false)")


def _check_sources(cfg) -> None:
    p = Path(cfg.model.name).expanduser()
    if not p.is_dir():
        return  # a Hub id: transformers prefers safetensors and reads .bin with weights_only=True
    check_model_folder(p, cfg.model.allow_pickle, cfg.model.trust_remote_code)
    adapter = p / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base and Path(base).expanduser().is_dir():
            check_model_folder(Path(base).expanduser(), cfg.model.allow_pickle, cfg.model.trust_remote_code,
                               "the adapter's base")


# ------------------------------------------------------------------------------------- the run
class _Run:
    """One ``velotune train`` invocation: prepare (checks, may raise VelotuneError), then execute."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.out = Path(cfg.training.output_dir).expanduser()
        self.t0 = time.perf_counter()
        self.resume: str | None = None
        self.report: dict = {"status": "started", "config": cfg.to_dict()}

    # -- before anything heavy: fail in seconds on bad input
    def prepare(self) -> None:
        from ..data.sources import prepare_data
        from ..training.checkpoints import check_checkpoint, checkpoints, clean_interrupted_saves

        cfg = self.cfg
        if self.out.exists() and not self.out.is_dir():
            raise VelotuneError(f"training.output_dir={self.out} is a file; pass a folder")
        if world().is_main:  # the other ranks only read the folder
            clean_interrupted_saves(self.out)
        found = checkpoints(self.out)
        resume = cfg.training.resume
        if resume is True:
            if not found:
                raise VelotuneError(f"resume=true but {self.out} holds no complete checkpoint (checkpoint-N); "
                                    "start the run without resume first, or pass resume=PATH")
            self.resume = str(found[-1])
        elif isinstance(resume, str):
            self.resume = str(check_checkpoint(resume))
        elif found:
            raise VelotuneError(f"training.output_dir={self.out} already holds checkpoints of an earlier run "
                                f"({found[-1].name}); continue it with resume=true, or choose another "
                                "training.output_dir")
        if self.resume:
            check_model_folder(Path(self.resume), cfg.model.allow_pickle, False, "the checkpoint")
            self._compare_with_saved_config()
        _check_sources(cfg)
        self._precision()
        self.data = prepare_data(cfg.data)

    def _precision(self) -> None:
        import torch

        from ..device import is_bfloat16_supported

        p = self.cfg.training.precision
        if p == "auto":
            self.bf16 = is_bfloat16_supported()
            self.fp16 = torch.cuda.is_available() and not self.bf16
        else:
            if p == "bf16" and not is_bfloat16_supported():
                raise VelotuneError("training.precision=bf16 needs a CUDA GPU of compute capability >= 8.0; use "
                                    "auto (fp16 on older GPUs, fp32 on CPU)")
            self.bf16, self.fp16 = p == "bf16", p == "fp16"

    def _compare_with_saved_config(self) -> None:
        import yaml

        saved = self.out / CONFIG_COPY
        if not saved.is_file():
            return
        before, now = yaml.safe_load(saved.read_text()) or {}, self.cfg.to_dict()
        changed = []
        for key in _RESUME_SENSITIVE:
            section, _, name = key.partition(".")
            a, b = before.get(section, {}), now.get(section, {})
            if (a.get(name) != b.get(name)) if name else (a != b):
                changed.append(key)
        if changed:
            say(f"resume: {', '.join(changed)} changed since the run began ({saved}); the loss curve will not "
                "match an uninterrupted run")

    # -- the heavy part
    def execute(self) -> int:
        import torch

        from ..device import MemoryReport
        from ..training.callbacks import oom_advice

        cfg = self.cfg
        try:
            model, tok = self._load_model()
            from ..data.sources import to_datasets

            train, evaluation = to_datasets(self.data, tok, cfg.model.max_seq_length,
                                            chat_template=cfg.data.chat_template,
                                            eval_fraction=cfg.data.eval_fraction, seed=cfg.training.seed)
            trainer = self._trainer(model, tok, train, evaluation)
        except VelotuneError as e:
            return _fail(str(e), 2)
        main = world().is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                (self.out / CONFIG_COPY).write_text(cfg.to_yaml())
        memory = MemoryReport(print_fn=print if main else _quiet).start()  # on this rank's GPU
        result, code = None, 0
        try:
            result = trainer.train(resume_from_checkpoint=self.resume)
        except (torch.OutOfMemoryError, MemoryError) as e:
            self._status("out of memory", oom_advice(
                load_in_4bit=cfg.model.load_in_4bit, max_seq_length=cfg.model.max_seq_length,
                batch_size=cfg.training.per_device_train_batch_size,
                grad_accum=cfg.training.gradient_accumulation_steps,
                gradient_checkpointing=cfg.memory.gradient_checkpointing,
                longest_tokens=self.data.report.longest_tokens,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU") + f"\n({e})")
            code = 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except VelotuneError as e:  # bad input met during training (a batch, a row): said, not a traceback
            self._status("failed", str(e))
            code = 1
        except KeyboardInterrupt:
            self._status("interrupted", f"interrupted after step {trainer.state.global_step}; resume=true continues "
                         "from the newest checkpoint")
            code = 130
        except OSError as e:  # a checkpoint that could not be written: the previous ones are intact
            self._status("failed", f"writing to {self.out} failed after step {trainer.state.global_step} ({e}); "
                         "the earlier checkpoints are intact: free disk space, then resume=true")
            code = 1
        self.report["memory"] = memory.stop(result)
        # Ranks that finished training or stopped at a non-finite step (gradients and logged losses are
        # the same on every rank) are all here; a rank that failed alone (out of memory, ...) exits now,
        # and the launcher stops the others.
        together = code == 0 or self.guard.message is not None
        if self.guard.message:
            self._status(f"stopped: non-finite at step {self.guard.step}", self.guard.message, every_rank=False)
            code = 1
        elif code == 0:
            self.report["status"] = "completed"
            if self.cfg.memory.fsdp:
                code = self._export_sharded(trainer.model, tok)
            else:
                code = self._export(model, tok) if main else 0
        if main:
            self._finish(trainer)
        # the others wait for rank 0's exports and report (a barrier), then exit with its code
        return agree(code) if together else code

    def _status(self, status: str, error: str, every_rank: bool = True) -> None:
        """Record a failed status; print it (on every rank, named, unless ``every_rank`` is False: then
        only rank 0, for a stop that all ranks share)."""
        self.report["status"], self.report["error"] = status, error
        w = world()
        if w.is_main or every_rank:
            prefix = "" if w.is_main else f"(rank {w.rank}) "
            print(f"velotune train: error: {prefix}{error}", file=sys.stderr)

    def _load_model(self):
        from ..api import FastLanguageModel

        m, lora = self.cfg.model, self.cfg.lora
        gc = self.cfg.memory.gradient_checkpointing
        model, tok = FastLanguageModel.from_pretrained(
            m.name, max_seq_length=m.max_seq_length, dtype=None if m.dtype == "auto" else m.dtype,
            load_in_4bit=m.load_in_4bit, load_in_8bit=m.load_in_8bit, full_finetuning=m.full_finetuning,
            trust_remote_code=m.trust_remote_code, revision=m.revision, attn_implementation=m.attn_implementation,
            rope_scaling=m.rope_scaling, use_gradient_checkpointing=gc if m.full_finetuning else None)
        if m.full_finetuning:
            return model, tok
        if hasattr(model, "peft_config"):
            say(f"model.name={m.name} is a LoRA adapter: training it further (the lora section is not used)")
            return model, tok
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, target_modules=lora.target_modules, lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout, bias=lora.bias, use_gradient_checkpointing=gc,
            random_state=lora.random_state, use_rslora=lora.use_rslora, modules_to_save=lora.modules_to_save)
        from ..models.graphs import set_cuda_graphs, set_memory_budget

        set_cuda_graphs(model, self.cfg.memory.cuda_graphs)
        if self.cfg.memory.memory_budget is not None:
            set_memory_budget(model, self.cfg.memory.memory_budget)
        return model, tok

    def _trainer(self, model, tok, train, evaluation):
        import torch
        import trl

        from ..training import SFTTrainer, train_on_responses_only
        from ..training.callbacks import NonFiniteGuard, RunStats

        t, d = self.cfg.training, self.cfg.data
        evaluate = evaluation is not None
        args = trl.SFTConfig(
            output_dir=str(self.out), max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
            per_device_train_batch_size=t.per_device_train_batch_size, per_device_eval_batch_size=
            t.per_device_train_batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
            learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler_type,
            optim=t.optim, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed,
            bf16=self.bf16, fp16=self.fp16, logging_steps=t.logging_steps, save_strategy="steps",
            save_steps=t.save_steps, save_total_limit=t.save_total_limit,
            eval_strategy="steps" if evaluate else "no", eval_steps=(t.eval_steps or t.save_steps) if evaluate else None,
            report_to=t.report_to, dataset_text_field="text", max_length=self.cfg.model.max_seq_length,
            use_cpu=not torch.cuda.is_available(),  # on a CPU machine, DDP (torchrun) runs over gloo
            packing=d.packing, dataset_num_proc=d.num_proc,
            logging_nan_inf_filter=False,  # a NaN loss must reach the log (and NonFiniteGuard), not be averaged away
            include_num_input_tokens_seen="non_padding", **({"fsdp": "full_shard"} if self.cfg.memory.fsdp else {}))
        self.guard, self.stats = NonFiniteGuard(t.learning_rate), RunStats()
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=train, eval_dataset=evaluation,
                             args=args, callbacks=[self.guard, self.stats])
        if d.train_on_responses_only:
            trainer = train_on_responses_only(trainer)
        return trainer

    def _export(self, model, tok, skip=()) -> int:
        e = self.cfg.export
        where = Path(e.dir).expanduser() if e.dir else self.out
        outputs = {}
        try:
            for method in [m for m in e.methods if m not in skip]:  # in the order given; lora first is cheapest
                if method == "gguf":
                    paths = model.save_pretrained_gguf(where / "gguf", tok, quantization_method=e.quantization_method)
                    outputs["gguf"] = [str(p) for p in paths]
                else:
                    outputs[method] = str(model.save_pretrained_merged(where / method, tok, save_method=method))
        except (ValueError, OSError) as err:  # VelotuneError is a ValueError
            self.report["outputs"] = outputs
            self._status("export failed", f"export {method}: {err} (the trained weights are in the last checkpoint)")
            return 1
        self.report["outputs"] = outputs
        return 0

    def _export_sharded(self, model, tok) -> int:
        """memory.fsdp: every rank gathers the adapter (a collective; rank 0 writes it), then rank 0 makes the
        other exports from that folder in one process (the base loaded again, the adapter merged onto it)."""
        from ..distributed import fsdp_save_adapter

        e = self.cfg.export
        lora = (Path(e.dir).expanduser() if e.dir else self.out) / "lora"
        try:
            fsdp_save_adapter(model, lora)
            if world().is_main and tok is not None:
                tok.save_pretrained(lora)
        except (ValueError, OSError) as err:  # VelotuneError is a ValueError
            self._status("export failed", f"export lora: {err} (the trained weights are in the last checkpoint)")
            return 1
        if not world().is_main:
            return 0
        self.report["outputs"] = {"lora": str(lora)}
        if all(m == "lora" for m in e.methods):
            return 0
        from ..api import FastLanguageModel

        try:
            one, tok1 = FastLanguageModel.from_pretrained(str(lora), max_seq_length=self.cfg.model.max_seq_length,
                                                          load_in_4bit=self.cfg.model.load_in_4bit)
        except (ValueError, OSError) as err:
            self._status("export failed", f"loading the adapter {lora} for the other exports: {err}")
            return 1
        code = self._export(one, tok1, skip=("lora",))
        self.report["outputs"] = {"lora": str(lora), **self.report["outputs"]}
        return code

    def _finish(self, trainer) -> None:
        from ..training.checkpoints import checkpoints
        from ..training.report import card, history, loss_summary, versions, write_report

        hist = history(trainer.state.log_history)
        r = self.report
        r.update(versions=versions(), card=card(), processes=world().size, steps=trainer.state.global_step,
                 resumed_from=self.resume,
                 total_seconds=round(time.perf_counter() - self.t0, 2), train_seconds=round(self.stats.seconds, 2),
                 tokens={"seen": self.stats.tokens, "per_second": self.stats.tokens_per_second,
                         "session_steps": self.stats.steps},
                 loss=loss_summary(hist), history=hist, data=vars(self.data.report),
                 skipped_masked_batches=getattr(trainer, "skipped_masked_batches", 0),
                 checkpoints=[str(p) for p in checkpoints(self.out)])
        paths = write_report(r, self.out)
        loss = r["loss"]
        tps = r["tokens"]["per_second"]
        print(f"velotune train: {r['status']}: step {r['steps']} in {r['train_seconds']:.0f} s"
              + (f", {tps:,.0f} tokens/s" if tps else "")
              + (f"; loss {loss['train_final']:.4f} (best {loss['train_best']:.4f} at step {loss['train_best_step']})"
                 if "train_best" in loss else "")
              + f"; report: {paths['markdown']}")
        for k, v in r.get("outputs", {}).items():
            print(f"  {k}: {v}")
