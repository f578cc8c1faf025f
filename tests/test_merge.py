"""Saving: PEFT adapter, merged 16-bit model (exact fp32 merge, sharded, atomic), adapter reload."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_models import randomize_lora_b
from velotune import FastLanguageModel, VelotuneError
from velotune.export import merge as merge_mod
from velotune.export.atomic import _umask
from velotune.export.merge import dequantized_weight


def _trained_like(tiny_dir, family="llama", load_in_4bit=True, seed=0, **kw):
    """A LoRA model whose B matrices are non-zero (as after training), deterministic."""
    model, tok = FastLanguageModel.from_pretrained(tiny_dir(family), load_in_4bit=load_in_4bit, max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False, **kw)
    randomize_lora_b(model, seed=seed, std=0.05)
    return model.eval(), tok


def _ids(n=20, batch=2, vocab=500):
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("family", ["llama", "gemma"])  # gemma: tied embeddings, (1 + w) norms
def test_merged_fp32_equals_adapter_model(tiny_dir, tmp_path, family):
    model, tok = _trained_like(tiny_dir, family, load_in_4bit=False)
    model.save_pretrained_merged(tmp_path / "m", tok, save_method="merged_16bit", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg
    ids = _ids()
    torch.testing.assert_close(_logits(merged, ids), _logits(model, ids), rtol=1e-4, atol=1e-5)


def test_merged_from_4bit_equals_dequantised_base_plus_lora(tiny_dir, tmp_path):
    model, tok = _trained_like(tiny_dir, load_in_4bit=True)
    model.save_pretrained_merged(tmp_path / "m", tok, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    # Reference: the fp32 model with every quantised weight replaced by its dequantised value, + LoRA.
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32)
    base = model.get_base_model()
    with torch.no_grad():
        for name, mod in base.named_modules():
            if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
                w = dequantized_weight(mod.base_layer)
                delta = mod.lora_B["default"].weight @ mod.lora_A["default"].weight * mod.scaling["default"]
                ref.get_submodule(name).weight.copy_(w + delta)
    ids = _ids()
    torch.testing.assert_close(_logits(merged, ids), _logits(ref, ids), rtol=1e-4, atol=1e-5)
    # and the 4-bit adapter model itself computes the same function
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_default_16bit_dtype_and_sharding(tiny_dir, tmp_path):
    from safetensors import safe_open

    model, tok = _trained_like(tiny_dir, load_in_4bit=True)
    one = model.save_pretrained_merged(tmp_path / "one", tok)
    sharded = model.save_pretrained_merged(tmp_path / "sh", tok, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with safe_open(str(one / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # CPU fp32 model -> bf16 default
    a = AutoModelForCausalLM.from_pretrained(one, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    ids = _ids()
    torch.testing.assert_close(_logits(a, ids), _logits(b, ids), rtol=0, atol=0)
    # bf16 rounding of the weights only: close to the fp32 adapter model at bf16 precision
    torch.testing.assert_close(_logits(a, ids), _logits(model, ids), rtol=0.05, atol=0.05)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert (one.stat().st_mode & 0o777) == 0o777 & ~_umask()  # not mkdtemp's 0700


def test_save_is_atomic(tiny_dir, tmp_path, monkeypatch):
    model, tok = _trained_like(tiny_dir)
    target = tmp_path / "out"
    model.save_pretrained_merged(target, tok, max_shard_size="100KB")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    (target / "my_notes.txt").write_text("keep me")

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated Ctrl-C half-way through writing shards")

    monkeypatch.setattr(merge_mod, "write_sharded", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained_merged(target, tok)
    after = {p.name: p.read_bytes() for p in target.iterdir() if p.name != "my_notes.txt"}
    assert after == before and (target / "my_notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind
    monkeypatch.undo()
    # A new save with fewer shards replaces the old shards (no stale files a loader could mix in).
    model.save_pretrained_merged(target, tok)
    names = {p.name for p in target.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("model-0") for n in names)
    assert "model.safetensors.index.json" not in names and "my_notes.txt" in names


def test_save_errors(tiny_dir, tmp_path):
    model, tok = _trained_like(tiny_dir)
    with pytest.raises(VelotuneError, match="save_method='merged_8bit' is not one of"):
        model.save_pretrained_merged(tmp_path / "x", tok, save_method="merged_8bit")
    with pytest.raises(VelotuneError, match="merged_4bit.*not supported"):
        model.save_pretrained_merged(tmp_path / "x", tok, save_method="merged_4bit")
    with pytest.raises(VelotuneError, match="upload_folder"):
        model.save_pretrained_merged(tmp_path / "x", tok, push_to_hub=True)
    with pytest.raises(VelotuneError, match="max_shard_size='big'"):
        model.save_pretrained_merged(tmp_path / "x", tok, max_shard_size="big")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        model.save_pretrained_merged(tmp_path / "afile", tok)


def test_adapter_roundtrip(tiny_dir, tmp_path):
    from peft import PeftModel

    model, tok = _trained_like(tiny_dir, load_in_4bit=True)
    ids = _ids()
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # plain PEFT on plain transformers loads it (fp32 base: the 4-bit quantisation error is not in it)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32),
                                      tmp_path / "adapter")
    assert plain.peft_config["default"].r == 8
    # velotune restores base (4-bit, as it was loaded) + adapter: identical logits, adapter trainable
    model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    assert (tmp_path / "lora" / "tokenizer.json").is_file()
    back, tok2 = FastLanguageModel.from_pretrained(str(tmp_path / "lora"), max_seq_length=128, load_in_4bit=True)
    torch.testing.assert_close(_logits(back.eval(), ids), want, rtol=0, atol=0)
    assert any(p.requires_grad for n, p in back.named_parameters() if "lora_" in n)
    assert tok2.pad_token == tok.pad_token
    assert hasattr(back, "save_pretrained_merged")


def test_unsloth_save_model_as_the_seed_calls_it(tiny_dir, tmp_path):
    """The seed's ``unsloth_save_model(model, tokenizer, "output_model", push_to_hub=False)`` with only the
    import changed: Unsloth's default save_method "lora" (adapter + tokenizer, which velotune loads back with
    identical logits), "merged_16bit" (the same folder as save_pretrained_merged), and its other keywords."""
    from safetensors.torch import load_file

    from velotune import unsloth_save_model

    model, tok = _trained_like(tiny_dir)
    ids = _ids()
    out = unsloth_save_model(model, tok, tmp_path / "output_model", push_to_hub=False)
    assert out == tmp_path / "output_model"
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "config.json").exists()  # an adapter, not a merged model
    back, _ = FastLanguageModel.from_pretrained(str(out), max_seq_length=128, load_in_4bit=True)
    torch.testing.assert_close(_logits(back.eval(), ids), _logits(model, ids), rtol=0, atol=0)

    unsloth_save_model(model, tok, tmp_path / "merged", save_method="merged_16bit", token=None,
                       maximum_memory_usage=0.75, safe_serialization=None, commit_message="x", save_function=torch.save)
    model.save_pretrained_merged(tmp_path / "direct", tok, save_method="merged_16bit")
    a, b = load_file(tmp_path / "merged" / "model.safetensors"), load_file(tmp_path / "direct" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert unsloth_save_model(model, tok, tmp_path / "other_rank", is_main_process=False) == tmp_path / "other_rank"
    assert not (tmp_path / "other_rank").exists()
    with pytest.raises(VelotuneError, match="safetensors only"):
        unsloth_save_model(model, tok, tmp_path / "x", safe_serialization=False)
    with pytest.raises(VelotuneError, match="save_peft_format=False"):
        unsloth_save_model(model, tok, tmp_path / "x", save_peft_format=False)
    with pytest.raises(VelotuneError, match="not a state_dict"):
        unsloth_save_model(model, tok, tmp_path / "x", state_dict={})
    with pytest.raises(VelotuneError, match="upload_folder"):
        unsloth_save_model(model, tok, tmp_path / "x", push_to_hub=True, token="hf_x")
    with pytest.raises(TypeError, match="save_pretrained_gguf_please"):
        unsloth_save_model(model, tok, tmp_path / "x", save_pretrained_gguf_please=True)
    assert not (tmp_path / "x").exists()


def test_push_to_hub_methods_name_the_local_save_and_the_upload(tiny_dir):
    """The incumbent's push_to_hub_merged / push_to_hub_gguf exist on velotune's models and refuse with the fix
    (velotune writes locally), instead of an AttributeError."""
    model, tok = _trained_like(tiny_dir)
    with pytest.raises(VelotuneError, match=r"save_pretrained_merged\(folder.*upload_folder\(repo_id='me/m'"):
        model.push_to_hub_merged("me/m", tok, save_method="merged_16bit", token="hf_x")
    with pytest.raises(VelotuneError, match=r"save_pretrained_gguf\(folder.*upload_folder"):
        model.push_to_hub_gguf("me/m", tok, quantization_method="q4_k_m")
    assert model.push_to_hub_gguf.__name__ == "push_to_hub_gguf"
