"""The run configuration of ``velotune train``: one validated schema, read from YAML + ``key=value`` overrides.

Six sections, each a dataclass whose fields carry their default and a one-line ``help``::

    model:    what to load (folder / Hub id, max_seq_length, 4-bit, dtype, trust_remote_code, allow_pickle)
    lora:     the adapters (r, lora_alpha, target_modules, ...)
    data:     where the rows come from and their format (alpaca, sharegpt, messages, text)
    training: the loop (steps, batch, lr, checkpoints, resume, precision)
    memory:   gradient checkpointing
    export:   what to save at the end (lora, merged_16bit, gguf)

Safety and errors: the file is parsed with ``yaml.safe_load`` only (a ``!!python/...`` tag is an error,
never an object); an unknown or misspelled key is an error naming the key, its line and the nearest
valid one; a wrong type names the field, the value and the type expected. Every problem of a file
is reported at once. Overrides use dotted paths (``training.max_steps=20``; a field name that is
unique across sections may be used alone: ``resume=true``), and their values are typed by the schema.

YAML 1.1 reads ``2e-4`` as text (it needs ``2.0e-4``); float fields accept such numeric text.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ._notices import VelotuneError

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _f(default, help: str):
    """A field with a default (copied per instance when mutable) and its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = _f("", "local Hugging Face folder, PEFT adapter folder (base + adapter restored) or Hub id; required")
    max_seq_length: int = _f(2048, "longest training sequence in tokens; longer rows are truncated (and counted); "
                                   "beyond the model's context, linear RoPE scaling is applied")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "compute dtype; auto = bfloat16 on GPUs of compute capability >= 8.0, float16 on older GPUs, "
                "float32 on CPU")
    load_in_4bit: bool = _f(True, "store the frozen weights in 4-bit NF4 (QLoRA): about 4x less weight memory "
                                  "than 16-bit")
    load_in_8bit: bool = _f(False, "store the frozen weights in 8-bit (LLM.int8); exclusive with load_in_4bit")
    full_finetuning: bool = _f(False, "train every weight (16-bit, no LoRA); the lora section is then unused")
    trust_remote_code: bool = _f(False, "run Python code shipped with the model (config.json auto_map); off "
                                        "unless you have read that code")
    allow_pickle: bool = _f(False, "accept pickled weights (pytorch_model.bin, adapter_model.bin); loading a "
                                   "pickle can run code, so safetensors is required unless this is true")
    revision: str | None = _f(None, "Hub branch, tag or commit (Hub ids only)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _f("sdpa", "attention kernel")
    rope_scaling: dict | None = _f(None, "explicit RoPE scaling, e.g. {rope_type: linear, factor: 2.0}; "
                                         "default: automatic when max_seq_length exceeds the model's context")


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank: trainable parameters per adapted layer grow linearly with it (8-64 typical)")
    lora_alpha: float = _f(16, "scale numerator: the update is scaled by lora_alpha / r")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input, in [0, 1); 0 is fastest")
    target_modules: list[str] | Literal["all-linear"] = _f(
        SEVEN_PROJECTIONS, "linear layers that get adapters (module names), or all-linear")
    bias: Literal["none", "all", "lora_only"] = _f("none", "which biases are trained")
    use_rslora: bool = _f(False, "rank-stabilised scaling lora_alpha / sqrt(r)")
    random_state: int = _f(3407, "seed of the adapter initialisation")
    modules_to_save: list[str] | None = _f(None, "extra modules trained fully and saved, e.g. [lm_head, embed_tokens]")


@dataclass
class DataConfig:
    path: str = _f("", "a .json / .jsonl / .csv / .parquet file, a folder of them, a datasets folder saved "
                       "with save_to_disk, or bundled:alpaca (velotune's own rows); required")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = _f(
        "auto", "alpaca: instruction/input/output; sharegpt: conversations of from/value; messages: lists of "
                "role/content; text: one string per row; auto: picked from the columns")
    split: str = _f("train", "split to use when data.path is a saved DatasetDict")
    text_field: str = _f("text", "column of the text format")
    instruction_field: str = _f("instruction", "alpaca: column of the instruction")
    input_field: str = _f("input", "alpaca: column of the optional input (may be absent)")
    output_field: str = _f("output", "alpaca: column of the answer")
    conversations_field: str | None = _f(None, "sharegpt / messages: column of the conversations (default "
                                               "conversations / messages)")
    chat_template: str | None = _f(None, "sharegpt / messages: a velotune template name (chatml, llama-3, ...) "
                                         "set with get_chat_template; default the tokenizer's own")
    train_on_responses_only: bool = _f(False, "sharegpt / messages: loss on the assistant's replies only")
    max_rows: int | None = _f(None, "use only the first N rows (after reading, before shuffling)")
    on_bad_row: Literal["drop", "error"] = _f(
        "drop", "a malformed row (bad JSON line, missing or non-string field, empty text): drop it and count "
                "it in the report, or stop with its file and line")
    eval_fraction: float = _f(0.0, "fraction of rows held out for an eval loss, in [0, 0.5]; 0 = no eval")
    packing: bool = _f(False, "pack several rows into one sequence (padding-free; faster on short rows)")
    num_proc: int | None = _f(None, "processes for tokenising")


@dataclass
class TrainingConfig:
    output_dir: str = _f("outputs", "folder for checkpoints, exports, the run report and the loss curve")
    max_steps: int = _f(60, "optimizer steps; -1 trains num_train_epochs instead")
    num_train_epochs: float = _f(1.0, "passes over the data when max_steps is -1")
    per_device_train_batch_size: int = _f(2, "rows per micro-batch")
    gradient_accumulation_steps: int = _f(4, "micro-batches per optimizer step (rows per step = this x batch)")
    learning_rate: float = _f(2e-4, "peak learning rate")
    warmup_steps: int = _f(5, "steps of linear warmup from 0 to learning_rate")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                               "polynomial", "inverse_sqrt"] = _f("linear", "learning-rate schedule after warmup")
    optim: Literal["adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "paged_adamw_32bit",
                   "adafactor", "sgd", "lion_8bit"] = _f("adamw_8bit", "optimizer (adamw_8bit: bitsandbytes "
                                                                      "8-bit AdamW, 4x less optimizer memory)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 disables clipping")
    seed: int = _f(3407, "seed of data order, dropout and everything random; same seed = same run")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "mixed precision; auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU")
    logging_steps: int = _f(1, "log loss, lr, grad norm and tokens every N steps")
    save_steps: int = _f(50, "write a checkpoint every N steps (atomically: an interrupted save never "
                             "replaces the previous one); the last step is always saved")
    save_total_limit: int | None = _f(2, "keep at most N checkpoints (oldest deleted first); null keeps all")
    eval_steps: int | None = _f(None, "evaluate every N steps when data.eval_fraction > 0 (default save_steps)")
    resume: bool | str = _f(False, "true: continue from the latest checkpoint in output_dir; or a checkpoint "
                                   "folder. Same seed and data give the same loss curve as an uninterrupted run")
    report_to: str = _f("none", "transformers' report_to: none, tensorboard, wandb, ...")


@dataclass
class MemoryConfig:
    gradient_checkpointing: bool | Literal["unsloth", "offload", "auto"] = _f(
        "unsloth", "true: recompute activations in backward; false: keep them (fastest, most memory); "
                   "unsloth / offload: offloaded checkpointing (least memory); auto: keep what memory_budget "
                   "allows, recompute the rest (GPU, CUDA graphs)")
    memory_budget: float | None = _f(
        None, "gradient_checkpointing auto: GiB (> 1) or fraction of the card (<= 1) the training step may use "
              "in all, weights included; kept activations fill what is left; default the free memory minus "
              "10% of the card")
    cuda_graphs: bool | Literal["auto"] = _f(
        "auto", "record each layer's kernels once and replay them (GPU): auto (the first 8 batch shapes), "
                "true (every shape), false (never; same numerics, slower)")
    fsdp: bool = _f(False, "under torchrun: shard the model over the ranks (FSDP2, every decoder layer) instead of "
                           "a whole copy per rank (DDP); needs training.optim adamw_torch or adamw_torch_fused")


@dataclass
class ExportConfig:
    methods: list[Literal["lora", "merged_16bit", "gguf"]] = _f(
        ["lora"], "what to save after training: lora (PEFT adapter), merged_16bit (plain transformers folder), "
                  "gguf (llama.cpp / Ollama)")
    quantization_method: list[str] = _f(["q8_0"], "gguf: one file per method (q8_0, q4_k_m, f16, ...)")
    dir: str | None = _f(None, "where exports go (one subfolder per method); default training.output_dir")


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig,
                             "training": TrainingConfig, "memory": MemoryConfig, "export": ExportConfig}
# Names users bring from other tools -> the field they mean (tried before difflib's guess).
_SYNONYMS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "lr": "learning_rate",
             "batch_size": "per_device_train_batch_size", "micro_batch_size": "per_device_train_batch_size",
             "epochs": "num_train_epochs", "num_epochs": "num_train_epochs", "steps": "max_steps",
             "sequence_len": "max_seq_length", "max_length": "max_seq_length", "model_name": "name",
             "grad_accum": "gradient_accumulation_steps", "gradient_accumulation": "gradient_accumulation_steps",
             "dataset": "path", "output": "output_dir", "quant": "quantization_method", "quantization": "quantization_method",
             "use_gradient_checkpointing": "gradient_checkpointing", "resume_from_checkpoint": "resume"}


@dataclass
class Config:
    """The whole run. Build it with :func:`load_config` (or ``Config()`` for the defaults)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------- types
class _Bad(Exception):
    """A value that does not fit a type; the message says what was expected."""


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        inner = args[0] if args else None
        if typing.get_origin(inner) is Literal:
            return "a list drawn from " + ", ".join(str(a) for a in typing.get_args(inner))
        return {str: "a list of strings", int: "a list of integers"}.get(inner, "a list")
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce_scalar(value, tp):
    if tp is type(None):
        if value is None:
            return None
        raise _Bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as text
            try:
                return float(value)
            except ValueError:
                raise _Bad from None
        raise _Bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise _Bad
    raise TypeError(f"config schema uses an unsupported type {tp!r}")


def _try_order(tp) -> int:
    # Scalars and choices before lists (`all-linear` is the choice, not [all-linear]); str last (`true` stays
    # a bool in bool | str).
    return 2 if tp is str else 1 if typing.get_origin(tp) is list else 0


def coerce(value, tp):
    """``value`` checked against the annotation ``tp`` (Literal, unions, list[...]); raises ``_Bad``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, (str, int)) and not isinstance(value, bool) and value in args:
            return value
        raise _Bad
    if origin in (typing.Union, types.UnionType):
        for a in sorted(args, key=_try_order):
            try:
                return coerce(value, a)
            except _Bad:
                continue
        raise _Bad
    if origin is list:
        items = value if isinstance(value, list) else [value]  # `methods: lora` means [lora]
        if isinstance(value, dict):
            raise _Bad
        return [coerce(v, args[0]) for v in items]
    return _coerce_scalar(value, tp)


def _choices(tp) -> list[str]:
    """String choices of a Literal inside ``tp`` (for "did you mean")."""
    out = []
    for a in (tp, *typing.get_args(tp)):
        if typing.get_origin(a) is Literal:
            out += [str(x) for x in typing.get_args(a)]
        elif typing.get_origin(a) is list:
            out += _choices(typing.get_args(a)[0])
    return out


# ------------------------------------------------------------------------------------ checks
def _positive(v):
    return v is None or v > 0


# Value rules beyond the type: path -> (ok(value), what is required). Checked after typing.
_RULES: dict[str, tuple] = {
    "model.max_seq_length": (_positive, "a positive number of tokens, e.g. 2048"),
    "lora.r": (_positive, "a positive rank, e.g. 16"),
    "lora.lora_alpha": (_positive, "positive, e.g. 16"),
    "lora.lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0 or 0.05"),
    "data.max_rows": (_positive, "a positive number of rows, or null for all"),
    "data.eval_fraction": (lambda v: 0 <= v <= 0.5, "in [0, 0.5], e.g. 0.05"),
    "data.num_proc": (_positive, "a positive number of processes, or null"),
    "training.max_steps": (lambda v: v > 0 or v == -1, "a positive number of steps, or -1 to train by epochs"),
    "training.num_train_epochs": (_positive, "positive, e.g. 1"),
    "training.per_device_train_batch_size": (_positive, "a positive number of rows, e.g. 2"),
    "training.gradient_accumulation_steps": (_positive, "a positive number of micro-batches, e.g. 4"),
    "training.learning_rate": (lambda v: 0 < v < 1, "in (0, 1), e.g. 2e-4"),
    "training.warmup_steps": (lambda v: v >= 0, "0 or more steps"),
    "training.weight_decay": (lambda v: v >= 0, "0 or more, e.g. 0.01"),
    "training.max_grad_norm": (lambda v: v >= 0, "0 (no clipping) or more, e.g. 1.0"),
    "training.logging_steps": (_positive, "a positive number of steps"),
    "training.save_steps": (_positive, "a positive number of steps"),
    "training.save_total_limit": (_positive, "a positive number of checkpoints, or null to keep all"),
    "training.eval_steps": (_positive, "a positive number of steps, or null"),
    "training.seed": (lambda v: v >= 0, "0 or more"),
    "export.methods": (lambda v: len(v) > 0, "at least one of lora, merged_16bit, gguf"),
}


def _cross_checks(cfg: Config) -> list[str]:
    """Rules between fields; each message names the fields and the fix."""
    errs = []
    if not cfg.model.name.strip():
        errs.append("model.name is required: a model folder or Hub id, e.g. model: {name: path/to/model}")
    if not cfg.data.path.strip():
        errs.append("data.path is required: a data file or folder, or bundled:alpaca")
    if cfg.model.load_in_4bit and cfg.model.load_in_8bit:
        errs.append("model.load_in_4bit and model.load_in_8bit are both true (load_in_4bit defaults to true); "
                    "pick one: for 8-bit also set model.load_in_4bit: false")
    if cfg.model.full_finetuning and "lora" in cfg.export.methods:
        errs.append("export.methods has lora but model.full_finetuning is true (no adapter to save); "
                    "use merged_16bit or gguf")
    if cfg.data.train_on_responses_only and cfg.data.format in ("alpaca", "text"):
        errs.append(f"data.train_on_responses_only needs a chat format (sharegpt or messages), not "
                    f"data.format={cfg.data.format}")
    if "gguf" in cfg.export.methods:
        errs += _check_quant(cfg.export.quantization_method)
    if cfg.memory.fsdp and not cfg.training.optim.startswith("adamw_torch"):
        errs.append(f"memory.fsdp needs a torch optimizer (bitsandbytes' do not take sharded parameters): set "
                    f"training.optim: adamw_torch (now {cfg.training.optim})")
    if cfg.memory.fsdp and cfg.model.full_finetuning:
        errs.append("memory.fsdp shards LoRA training; model.full_finetuning is true: drop one of them")
    return errs


def _check_quant(methods: list[str]) -> list[str]:
    from .export.gguf.mixes import ALIASES, METHODS, resolve_method

    errs = []
    for m in methods:
        try:
            resolve_method(m)
        except ValueError:
            near = difflib.get_close_matches(str(m).lower(), list(METHODS) + list(ALIASES), n=1, cutoff=0)
            errs.append(f"export.quantization_method: {m!r} is not a GGUF method; did you mean {near[0]!r}? "
                        f"(valid: {', '.join(sorted(METHODS))})")
    return errs


# ----------------------------------------------------------------------------------- parsing
def _nearest(name: str, options: list[str]) -> str:
    if name in _SYNONYMS and _SYNONYMS[name] in options:
        return _SYNONYMS[name]
    return (difflib.get_close_matches(name, options, n=1, cutoff=0) or options)[0]


def _field_types(section: str) -> dict[str, object]:
    return typing.get_type_hints(SECTIONS[section])


def _all_fields() -> dict[str, list[str]]:
    """field name -> the sections that have it."""
    out: dict[str, list[str]] = {}
    for s in SECTIONS:
        for f in _field_types(s):
            out.setdefault(f, []).append(s)
    return out


def _unknown_key(path: str, key: str, options: list[str], where: str) -> str:
    if not options:
        return f"{where}{path}: unknown key"
    owners = _all_fields().get(_SYNONYMS.get(key, key), [])
    if path.count(".") == 0 and owners:  # a field written at the top level
        return (f"{where}{key!r} is not a section; did you mean {owners[0]}.{_SYNONYMS.get(key, key)}? "
                f"(sections: {', '.join(SECTIONS)})")
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    return f"{where}{path} is not a valid key; did you mean {parent}{_nearest(key, options)}? " \
           f"(valid: {', '.join(options)})"


def _bad_value(path: str, value, tp, where: str) -> str:
    msg = f"{where}{path}={value!r} ({type(value).__name__}) is not {_describe(tp)}"
    choices = _choices(tp)
    bad = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v not in choices]
    if choices and bad:
        msg += f"; did you mean {_nearest(bad[0], choices)!r}" + (f" for {bad[0]!r}?" if bad[0] != value else "?")
    return msg


def _build_section(name: str, raw, lines: dict, errs: list[str], label: str):
    cls = SECTIONS[name]
    where = _where(label, lines, name)
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        errs.append(f"{where}section {name} must be a mapping of keys (e.g. {name}:\\n  key: value), "
                    f"got {type(raw).__name__} {raw!r:.60}")
        return cls()
    types = _field_types(name)
    values = {}
    for key, value in raw.items():
        path = f"{name}.{key}"
        w = _where(label, lines, path)
        if key not in types:
            errs.append(_unknown_key(path, str(key), list(types), w))
            continue
        try:
            values[key] = coerce(value, types[key])
        except _Bad:
            errs.append(_bad_value(path, value, types[key], w))
            continue
        rule = _RULES.get(path)
        if rule and not rule[0](values[key]):
            errs.append(f"{w}{path}={value!r} must be {rule[1]}")
            del values[key]
    return cls(**values)


def _where(label: str, lines: dict, path: str) -> str:
    line = lines.get(path)
    if line is None:
        return f"{label}: " if label else ""
    return f"{label} line {line}: " if label else f"line {line}: "


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key path -> 1-based line of the key in ``text`` (for messages); {} if unparseable."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    out = {}

    def walk(node, prefix):
        if not isinstance(node, yaml.MappingNode):
            return
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                path = f"{prefix}{k.value}"
                out[path] = k.start_mark.line + 1
                walk(v, path + ".")

    walk(root, "")
    return out


def _yaml_error(label: str, e: yaml.YAMLError, position: bool = True) -> VelotuneError:
    mark = getattr(e, "problem_mark", None)
    at = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None and position else ""
    problem = getattr(e, "problem", None) or str(e)
    if isinstance(e, yaml.constructor.ConstructorError) and "tag" in problem:
        return VelotuneError(f"{label}{at}: {problem}. Config files are read with yaml.safe_load: plain values "
                             "only, no !!python tags or objects; remove the tag")
    return VelotuneError(f"{label}{at}: not valid YAML ({problem}); fix the file")


def parse_config(data, label: str = "", lines: dict | None = None) -> Config:
    """A ``Config`` from a plain dict (as ``yaml.safe_load`` returns it). Raises ``VelotuneError`` listing
    every problem: unknown keys (with the nearest valid one), wrong types, values out of range."""
    lines = lines or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VelotuneError(f"{label + ': ' if label else ''}the config must be a mapping of sections "
                            f"({', '.join(SECTIONS)}), got {type(data).__name__} {data!r:.60}")
    errs: list[str] = []
    sections = {}
    for key, raw in data.items():
        if key not in SECTIONS:
            errs.append(_unknown_key(str(key), str(key), list(SECTIONS), _where(label, lines, str(key))))
            continue
        sections[key] = _build_section(key, raw, lines, errs, label)
    cfg = Config(**sections)
    if not errs:
        errs = _cross_checks(cfg)
    if errs:
        head = f"{label}: " if label and len(errs) > 1 else ""
        if len(errs) == 1:
            raise VelotuneError(errs[0])
        raise VelotuneError(f"{head}{len(errs)} problems:\n  - " + "\n  - ".join(errs))
    return cfg


def _override_path(key: str) -> list[str]:
    parts = key.split(".")
    if len(parts) == 1:
        owners = _all_fields().get(key, [])
        if len(owners) == 1:
            return [owners[0], key]
        if len(owners) > 1:
            raise VelotuneError(f"override {key}=...: {key} is in several sections; write "
                                + " or ".join(f"{s}.{key}" for s in owners))
        if key in SECTIONS:
            raise VelotuneError(f"override {key}=...: {key} is a section; set one of its keys, e.g. "
                                f"{key}.{next(iter(_field_types(key)))}=...")
        fields = _all_fields()
        near = _nearest(key, list(fields))
        raise VelotuneError(f"override {key}=...: no such key; did you mean {fields[near][0]}.{near}? "
                            "(write section.key, e.g. training.max_steps=20)")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        section = parts[0]
        if section not in SECTIONS:
            raise VelotuneError(f"override {key}: {section} is not a section; did you mean "
                                f"{_nearest(section, list(SECTIONS))}? (sections: {', '.join(SECTIONS)})")
        raise VelotuneError(f"override {key}: use section.key (one dot), e.g. training.max_steps=20")
    return parts


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["training.max_steps=20", "resume=true"]`` applied onto the raw mapping ``data`` (a copy).

    Values are read as YAML scalars/lists (``true``, ``20``, ``[q_proj, v_proj]``, ``null``) and then typed
    by the schema; a string field keeps the text exactly as given (``model.name=123`` is the folder "123").
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise VelotuneError(f"override {item!r} must be key=value, e.g. training.max_steps=20")
        section, name = _override_path(key.strip())
        types = _field_types(section)
        if name not in types:
            raise VelotuneError(_unknown_key(f"{section}.{name}", name, list(types), "override "))
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise _yaml_error(f"override {item!r}", e, position=False) from None
        try:
            coerce(value, types[name])
        except _Bad:
            try:
                value = coerce(text, types[name])  # a string field: the text as given
            except _Bad:
                raise VelotuneError(_bad_value(f"{section}.{name}", value, types[name], "override ")) from None
        sec = data.get(section)
        data[section] = {**(sec if isinstance(sec, dict) else {}), name: value}
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (safely) and apply ``key=value`` overrides; returns a validated ``Config``."""
    data, lines, label = {}, {}, "overrides"
    if path is not None:
        p = Path(path).expanduser()
        label = str(path)
        if not p.is_file():
            raise VelotuneError(f"config file {path}: no such file" + (" (it is a folder)" if p.is_dir() else ""))
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise VelotuneError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise _yaml_error(label, e) from None
        lines = _key_lines(text)
        if data is None:
            raise VelotuneError(f"{path} is empty; it needs at least model.name and data.path "
                                "(see examples/ or `velotune train --show-defaults`)")
        if not isinstance(data, dict):
            raise VelotuneError(f"{path}: the config must be a mapping of sections ({', '.join(SECTIONS)}), "
                                f"got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    return parse_config(data, label, lines)


def defaults_yaml() -> str:
    """Every field with its default and help, as a commented YAML file (``velotune train --show-defaults``)."""
    out = []
    cfg = Config()
    for name, cls in SECTIONS.items():
        out.append(f"{name}:")
        for f in dataclasses.fields(cls):
            value = yaml.safe_dump({f.name: getattr(getattr(cfg, name), f.name)}, default_flow_style=True,
                                   width=1000).strip()[1:-1]
            out.append(f"  # {f.metadata['help']}")
            out.append(f"  {value}")
    return "\n".join(out) + "\n"
