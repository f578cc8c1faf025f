"""``velotune export``: adapter / model folder -> GGUF, merged 16-bit, LoRA; argument errors exit 2."""
from __future__ import annotations

import json
import re

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.export.test_save_gguf import lora_model, make_llama_vocab_model
from velotune.cli import main

IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base model folder, adapter folder, logits of the 4-bit base + adapter on ``IDS``)."""
    root = tmp_path_factory.mktemp("cli-export")
    base = make_llama_vocab_model(root / "base")
    model, tok = lora_model(base, load_in_4bit=True)
    model.save_pretrained_merged(root / "adapter", tok, save_method="lora")
    with torch.no_grad():
        want = model(input_ids=IDS).logits.float()
    return base, root / "adapter", want



def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_adapter_to_gguf_q8_0_loads_in_transformers(folders, tmp_path, capsys):
    base, adapter, want = folders
    assert main(["export", str(adapter), "--to", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "d")]) == 0
    path = tmp_path / "d" / "model.Q8_0.gguf"
    assert f"wrote {path}" in capsys.readouterr().out
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", "model.Q8_0.gguf"]
    got = _logits(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32))
    without = _logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    # measured: q8_0 moves these logits by 1.4% of their largest (0.0094 of 0.68; f16: 0.0003);
    # dropping the adapter moves them 60x more
    err = (got - want).abs().max()
    assert err <= 3e-2 * want.abs().max() and (without - want).abs().max() > 10 * err


def test_adapter_onto_16bit_base_matches_plain_peft(folders, tmp_path):
    from peft import PeftModel

    base, adapter, _ = folders
    out = tmp_path / "d"
    assert main(["export", str(adapter), "--to", "gguf", "--quant", "f16", "--no-load-in-4bit", "--out", str(out)]) == 0
    got = _logits(AutoModelForCausalLM.from_pretrained(out, gguf_file="model.F16.gguf", dtype=torch.float32))
    # oracle: plain transformers + PEFT on the unquantised base (velotune not involved)
    want = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter))
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()  # f16 weights: measured 6e-4 of the largest


def test_adapter_to_merged_16bit_and_lora(folders, tmp_path):
    base, adapter, want = folders
    assert main(["export", str(adapter), "--to", "merged_16bit", "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert json.loads((tmp_path / "m" / "config.json").read_text()).get("quantization_config") is None
    torch.testing.assert_close(_logits(merged), want, rtol=0.05, atol=0.05)  # bf16 weights (CPU default)
    assert main(["export", str(adapter), "--to", "lora", "--out", str(tmp_path / "l")]) == 0
    cfg = json.loads((tmp_path / "l" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and (tmp_path / "l" / "adapter_model.safetensors").is_file()


def test_model_folder_to_gguf_straight_from_its_weights(folders, tmp_path):
    base, _, _ = folders
    out = tmp_path / "g"
    assert main(["export", str(base), "--to", "gguf", "--quant", "f16", "quantized", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.F16.gguf", "model.Q4_K_M.gguf"]
    assert gguf.GGUFReader(out / "model.Q4_K_M.gguf").fields["general.file_type"].contents() == 15


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/nope", "--to", "gguf"], r"SOURCE .*/nope: no such folder; pass a PEFT adapter folder"),
    (["{tmp}", "--to", "gguf"], r"holds neither adapter_config.json .* nor config.json"),
    (["{adapter}", "--to", "ggml"],  # quoting of the choices varies by Python version
     r"argument --to: invalid choice: 'ggml' \(choose from '?merged_16bit'?, '?lora'?, '?gguf'?\)"),
    (["{adapter}", "--to", "gguf", "--quant", "q8_0", "q4_k_xl"],
     r"--quant q4_k_xl: unknown quantization_method 'q4_k_xl'; valid: .*q4_k_m"),
    (["{adapter}", "--to", "lora", "--quant", "q8_0"], r"--quant applies to --to gguf only"),
    (["{base}", "--to", "lora"], r"is a model folder, not a PEFT adapter: --to lora needs an adapter folder"),
    (["{base}", "--to", "gguf", "--load-in-4bit"], r"--load-in-4bit applies to adapter folders"),
    (["{adapter}", "--to", "gguf", "--max-seq-length", "0"], r"--max-seq-length 0 must be a positive number"),
    (["{adapter}", "--to", "gguf", "--no-out"], r"unrecognized arguments: --no-out"),
])
def test_bad_arguments_exit_2_with_the_fix(argv, message, folders, tmp_path, capsys):
    base, adapter, _ = folders
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path, base=base, adapter=adapter) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["export", *argv, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: velotune") and len(re.findall(message, err)) == 1
    assert not out.exists()


def test_out_is_required(folders, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(folders[1]), "--to", "gguf"])
    assert e.value.code == 2 and "the following arguments are required: --out" in capsys.readouterr().err


def test_failure_during_export_exits_1_with_its_message(tiny_dir, tmp_path, capsys):
    source = tiny_dir("llama")  # the tiny models' own byte-level BPE: a pre-tokenizer llama.cpp cannot identify
    capsys.readouterr()
    assert main(["export", source, "--to", "gguf", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("velotune export: error: unknown BPE pre-tokenizer") and "Known: " in err
    assert not (tmp_path / "out").exists()
