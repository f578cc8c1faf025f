"""``velotune.config``: the run schema, safe YAML, key=value overrides, and every error naming the fix."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from velotune import VelotuneError
from velotune.config import SECTIONS, Config, apply_overrides, defaults_yaml, load_config, parse_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MINIMAL = "model:\n  name: some/model\ndata:\n  path: bundled:alpaca\n"


def write(tmp_path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error(tmp_path, text: str, overrides=()) -> str:
    with pytest.raises(VelotuneError) as e:
        load_config(write(tmp_path, text), overrides)
    return str(e.value)


def test_every_field_is_documented_and_defaulted():
    cfg = Config()
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{name}.{f.name} has no help"
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    # mutable defaults are per instance
    cfg.lora.target_modules.append("x")
    assert "x" not in Config().lora.target_modules


def test_defaults_yaml_is_the_defaults_and_reads_back():
    text = defaults_yaml()
    assert text.count("  # ") == sum(len(dataclasses.fields(c)) for c in SECTIONS.values())
    data = yaml.safe_load(text)
    assert data["training"]["learning_rate"] == 2e-4 and data["lora"]["r"] == 16
    data["model"]["name"], data["data"]["path"] = "m", "bundled:alpaca"
    cfg = parse_config(data)
    assert cfg.training == Config().training and cfg.lora == Config().lora


def test_minimal_file_and_typed_overrides(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "training:\n  learning_rate: 2e-4\n"), [
        "training.max_steps=20", "resume=true", "lora.target_modules=[q_proj, v_proj]", "model.name=123",
        "export.methods=gguf", "export.quantization_method=[q4_k_m, q8_0]", "model.revision=null",
        "training.warmup_steps=0"])
    assert cfg.training.max_steps == 20 and cfg.training.resume is True
    assert cfg.training.learning_rate == 2e-4  # YAML 1.1 reads 2e-4 as text; float fields take it
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.name == "123"  # a string field keeps the text as given
    assert cfg.export.methods == ["gguf"] and cfg.export.quantization_method == ["q4_k_m", "q8_0"]
    assert cfg.model.revision is None and cfg.training.warmup_steps == 0
    cfg = load_config(write(tmp_path, MINIMAL), ["resume=out/checkpoint-2", "lora.target_modules=all-linear",
                                                 "memory.gradient_checkpointing=false"])
    assert cfg.training.resume == "out/checkpoint-2" and cfg.lora.target_modules == "all-linear"
    assert cfg.memory.gradient_checkpointing is False


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_are_valid(name):
    cfg = load_config(EXAMPLES / name)
    assert cfg.model.name and cfg.data.path


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("text, expected", [
    # misspelled key: its line, the nearest valid key
    (MINIMAL + "training:\n  max_step: 3\n",
     "run.yaml line 6: training.max_step is not a valid key; did you mean training.max_steps?"),
    # a name from another tool
    (MINIMAL + "training:\n  lr: 0.001\n", "training.lr is not a valid key; did you mean training.learning_rate?"),
    (MINIMAL + "lora:\n  rank: 8\n", "lora.rank is not a valid key; did you mean lora.r?"),
    # a field outside its section
    (MINIMAL + "max_steps: 3\n", "'max_steps' is not a section; did you mean training.max_steps?"),
    # an unknown section
    ("modle:\n  name: x\ndata:\n  path: p\n", "run.yaml line 1: modle is not a valid key; did you mean model?"),
    # wrong types: field, value, expected type
    (MINIMAL + "training:\n  per_device_train_batch_size: '2'\n",
     "training.per_device_train_batch_size='2' (str) is not an integer"),
    (MINIMAL + "model:\n  name: m\n  load_in_4bit: maybe\n", "model.load_in_4bit='maybe' (str) is not true or false"),
    (MINIMAL + "training:\n  max_steps: 2.5\n", "training.max_steps=2.5 (float) is not an integer"),
    (MINIMAL + "lora:\n  target_modules: 3\n", "lora.target_modules=3 (int) is not a list of strings or one of all-linear"),
    (MINIMAL + "training:\n  learning_rate: fast\n", "training.learning_rate='fast' (str) is not a number"),
    # a choice: the nearest one
    (MINIMAL + "training:\n  precision: bf17\n",
     "training.precision='bf17' (str) is not one of auto, bf16, fp16, fp32; did you mean 'bf16'?"),
    (MINIMAL + "training:\n  lr_scheduler_type: cosin\n", "did you mean 'cosine'?"),
    (MINIMAL + "export:\n  methods: [lora, gguff]\n", "export.methods=['lora', 'gguff'] (list) is not a list drawn "
                                                       "from lora, merged_16bit, gguf; did you mean 'gguf' for 'gguff'?"),
    # shapes
    (MINIMAL + "lora: [1, 2]\n", "section lora must be a mapping of keys"),
    ("- model\n- data\n", "the config must be a mapping of sections (model, lora, data, training, memory, export), "
                          "got list"),
    ("", "run.yaml is empty; it needs at least model.name and data.path"),
    # values out of range
    (MINIMAL + "lora:\n  lora_dropout: 1.5\n", "lora.lora_dropout=1.5 must be in [0, 1)"),
    (MINIMAL + "model:\n  name: m\n  max_seq_length: 0\n", "model.max_seq_length=0 must be a positive number of tokens"),
    (MINIMAL + "training:\n  learning_rate: 3\n", "training.learning_rate=3 must be in (0, 1)"),
    (MINIMAL + "training:\n  max_steps: 0\n", "training.max_steps=0 must be a positive number of steps, or -1"),
    (MINIMAL + "data:\n  path: p\n  eval_fraction: 0.9\n", "data.eval_fraction=0.9 must be in [0, 0.5]"),
    # rules between fields
    ("data:\n  path: p\n", "model.name is required"),
    ("model:\n  name: m\n", "data.path is required"),
    (MINIMAL + "model:\n  name: m\n  load_in_8bit: true\n",
     "model.load_in_4bit and model.load_in_8bit are both true (load_in_4bit defaults to true); pick one: for "
     "8-bit also set model.load_in_4bit: false"),
    (MINIMAL + "model:\n  name: m\n  full_finetuning: true\n",
     "export.methods has lora but model.full_finetuning is true (no adapter to save)"),
    (MINIMAL + "data:\n  path: p\n  format: alpaca\n  train_on_responses_only: true\n",
     "data.train_on_responses_only needs a chat format (sharegpt or messages), not data.format=alpaca"),
    (MINIMAL + "export:\n  methods: gguf\n  quantization_method: q4km\n",
     "export.quantization_method: 'q4km' is not a GGUF method; did you mean 'q4_k_m'?"),
])
def test_bad_config_names_the_key_and_the_fix(tmp_path, text, expected):
    # later duplicate top-level keys override earlier ones in YAML, which the cases above rely on
    assert expected in error(tmp_path, text)


def test_all_problems_are_reported_at_once(tmp_path):
    msg = error(tmp_path, MINIMAL + "training:\n  max_step: 3\n  seed: x\nlora:\n  alpha: 3\n")
    assert "run.yaml: 3 problems:\n  - " in msg
    assert "training.max_steps?" in msg and "training.seed='x' (str) is not an integer" in msg
    assert "lora.alpha is not a valid key; did you mean lora.lora_alpha?" in msg


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    msg = error(tmp_path, "model:\n  name: [a, b\ndata:\n  path: p\n")
    assert "run.yaml line 3 column 5: not valid YAML (expected ',' or ']', but got ':'); fix the file" in msg


def test_python_tags_are_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    text = MINIMAL + f"training:\n  output_dir: !!python/object/apply:os.system ['touch {marker}']\n"
    msg = error(tmp_path, text)
    assert "run.yaml line 6 column 15" in msg and "python/object/apply:os.system" in msg
    assert "yaml.safe_load: plain values only" in msg
    assert not marker.exists()


def test_file_errors(tmp_path):
    with pytest.raises(VelotuneError, match="config file nope.yaml: no such file"):
        load_config("nope.yaml")
    with pytest.raises(VelotuneError, match=r"config file .* no such file \(it is a folder\)"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(VelotuneError, match=r"not UTF-8 text \(byte 60\); save it as UTF-8"):
        load_config(bad)


@pytest.mark.parametrize("override, expected", [
    ("training.max_steps", "override 'training.max_steps' must be key=value, e.g. training.max_steps=20"),
    ("max_stepz=3", "override max_stepz=...: no such key; did you mean training.max_steps?"),
    ("training=3", "override training=...: training is a section; set one of its keys"),
    ("trainig.max_steps=3", "override trainig.max_steps: trainig is not a section; did you mean training?"),
    ("training.max_steps=many", "override training.max_steps='many' (str) is not an integer"),
    ("training.max_step=3", "override training.max_step is not a valid key; did you mean training.max_steps?"),
    ("training.seed.x=3", "override training.seed.x: use section.key (one dot)"),
    ("lora.r=[8", "override 'lora.r=[8': not valid YAML (expected ',' or ']', but got '<stream end>')"),
])
def test_bad_overrides(tmp_path, override, expected):
    assert expected in error(tmp_path, MINIMAL, [override])


def test_overrides_alone_without_a_file():
    cfg = parse_config(apply_overrides({}, ["model.name=m", "data.path=d.jsonl", "lora.r=4"]))
    assert (cfg.model.name, cfg.data.path, cfg.lora.r) == ("m", "d.jsonl", 4)
