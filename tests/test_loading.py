"""FastLanguageModel.from_pretrained: sources, dtype, quantisation, RoPE scaling, tokenizer fixes."""
from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_models import FAMILIES, make_tiny_model
from velotune import FastLanguageModel, VelotuneError, default_dtype
from velotune.loading import VELOTUNE_PAD, resolve_dtype, state_of


def _linear4bit_count(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_default_dtype_cpu():
    assert default_dtype("cpu") == torch.float32
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(VelotuneError, match="dtype='float8'"):
        resolve_dtype("float8", "cpu")
    with pytest.raises(VelotuneError, match="not supported"):
        resolve_dtype(torch.int8, "cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_4bit_and_trains(tiny_dir, family):
    model, tok = FastLanguageModel.from_pretrained(tiny_dir(family), max_seq_length=128, load_in_4bit=True)
    assert _linear4bit_count(model) == 2 * 7  # 2 layers x (q,k,v,o,gate,up,down)
    assert state_of(model).load_in_4bit and state_of(model).dtype == torch.float32
    quant = model.config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"] is True
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    x = tok(["The capital of France is Paris."], return_tensors="pt")
    out = model(**x, labels=x["input_ids"])
    out.loss.backward()
    # lora_B starts at zero, so at init only B receives a gradient (dA = scaling * B^T dy x = 0)
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_16bit_and_full_finetuning(tiny_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=False, dtype=torch.bfloat16)
    assert _linear4bit_count(model) == 0 and model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    model, _ = FastLanguageModel.from_pretrained(tiny_dir(), full_finetuning=True)  # load_in_4bit=True ignored
    assert _linear4bit_count(model) == 0
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(VelotuneError, match="full_finetuning=True"):
        FastLanguageModel.get_peft_model(model)


def test_load_in_8bit(tiny_dir):
    import bitsandbytes as bnb

    model, tok = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=False, load_in_8bit=True)
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 14
    model = FastLanguageModel.get_peft_model(model, r=8)  # 8-bit LoRA trains (projections unfused)
    x = tok(["The capital of France is Paris."], return_tensors="pt")["input_ids"]
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    with pytest.raises(VelotuneError, match="exclusive"):
        FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=True, load_in_8bit=True)


def test_prequantized_4bit_checkpoint(tiny_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=True)
    model.save_pretrained(tmp_path / "q4")
    tok.save_pretrained(tmp_path / "q4")
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    # load_in_4bit=False cannot undo a pre-quantized checkpoint: it loads as 4-bit, and says so.
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "q4"), load_in_4bit=False)
    assert _linear4bit_count(again) == 14 and state_of(again).load_in_4bit
    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)
    with pytest.raises(VelotuneError, match="pre-quantized"):
        FastLanguageModel.from_pretrained(str(tmp_path / "q4"), full_finetuning=True)


def test_bad_sources(tmp_path):
    with pytest.raises(VelotuneError, match="Hub is offline.*local"):
        FastLanguageModel.from_pretrained("velotune-test/not-a-model-xyz")
    with pytest.raises(VelotuneError, match="no such folder"):
        FastLanguageModel.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VelotuneError, match="no config.json"):
        FastLanguageModel.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(VelotuneError, match="is a file"):
        FastLanguageModel.from_pretrained(str(tmp_path / "w.bin"))
    with pytest.raises(VelotuneError, match="max_seq_length"):
        FastLanguageModel.from_pretrained(str(tmp_path / "empty"), max_seq_length=0)
    with pytest.raises(TypeError, match="not_an_arg"):
        FastLanguageModel.from_pretrained(str(tmp_path / "empty"), not_an_arg=1)


def test_rope_scaling(tiny_dir, tmp_path, capsys):
    model, _ = FastLanguageModel.from_pretrained(tiny_dir(), max_seq_length=5000, load_in_4bit=False)
    rp = model.config.rope_parameters
    assert rp["rope_type"] == "linear" and rp["factor"] == pytest.approx(2.45)  # 5000 / 2048 rounded up
    assert model.config.max_position_embeddings == 5017
    model, _ = FastLanguageModel.from_pretrained(tiny_dir(), max_seq_length=2000, load_in_4bit=False)
    assert model.config.rope_parameters["rope_type"] == "default"
    model, _ = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=False,
                                                 rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert model.config.rope_parameters["rope_type"] == "dynamic"
    with pytest.raises(VelotuneError, match="rope_type"):
        FastLanguageModel.from_pretrained(tiny_dir(), rope_scaling={"factor": 2.0})
    # A model that already scales its RoPE is not stacked silently.
    d = make_tiny_model("llama", tmp_path / "l3")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VelotuneError, match="already using llama3 RoPE scaling"):
        FastLanguageModel.from_pretrained(str(d), max_seq_length=4096)


def test_tokenizer_fixups(tiny_dir, tmp_path):
    _, tok = FastLanguageModel.from_pretrained(tiny_dir(), max_seq_length=333, load_in_4bit=False)
    assert tok.pad_token == "<pad>" and tok.pad_token != tok.eos_token
    assert tok.padding_side == "right" and tok.model_max_length == 333
    # No pad-like token and unk == eos: a new pad token is added and the embeddings grow with it.
    d = make_tiny_model("llama", tmp_path / "nopad")
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tcfg["unk_token"] = "</s>"
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    tj = json.loads((d / "tokenizer.json").read_text())
    for t in tj["added_tokens"]:
        if t["content"] == "<pad>":
            t["content"] = "<blank>"
    tj["model"]["vocab"]["<blank>"] = tj["model"]["vocab"].pop("<pad>")
    (d / "tokenizer.json").write_text(json.dumps(tj))
    model, tok = FastLanguageModel.from_pretrained(str(d), load_in_4bit=False)
    assert tok.pad_token == VELOTUNE_PAD
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
