"""FastLanguageModel.get_peft_model: argument checks with their messages, init, scaling, layers."""
from __future__ import annotations

import logging

import pytest
import torch

from velotune import FastLanguageModel, VelotuneError


@pytest.fixture()
def model(tiny_dir):
    m, _ = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=True, max_seq_length=128)
    return m


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r=0 must be a positive integer"),
    (dict(r=-4), "r=-4 must be a positive integer"),
    (dict(r=2.5), "r=2.5 must be a positive integer"),
    (dict(lora_alpha=0), "lora_alpha=0 must be a positive number"),
    (dict(lora_dropout=1.0), r"lora_dropout=1.0 must be in \[0, 1\)"),
    (dict(bias="some"), "bias='some' is not one of"),
    (dict(target_modules=["q_porj"]), "target module 'q_porj' is not a linear layer of this model; did you mean 'q_proj'"),
    (dict(target_modules=[]), "target_modules is empty"),
    (dict(target_modules="q_proj"), "pass a list of module names"),
    (dict(use_gradient_checkpointing="yes"), "use_gradient_checkpointing='yes' is not one of"),
    (dict(use_gradient_checkpointing=1), "use_gradient_checkpointing=1 is not one of"),
    (dict(layers_to_transform=[5]), r"layer indices must be integers in \[0, 2\)"),
    (dict(modules_to_save=["lm_haed"]), "modules_to_save entry 'lm_haed' is not a module of this model; did you mean 'lm_head'"),
    (dict(use_dora=True), "use_dora=True is not supported"),
])
def test_bad_arguments(model, kwargs, message):
    with pytest.raises(VelotuneError, match=message):
        FastLanguageModel.get_peft_model(model, **kwargs)


def test_unknown_keyword_and_double_wrap(model):
    with pytest.raises(TypeError, match="lora_rank"):
        FastLanguageModel.get_peft_model(model, lora_rank=8)
    peft_model = FastLanguageModel.get_peft_model(model, max_seq_length=128)  # incumbent's no-op argument
    with pytest.raises(VelotuneError, match="already has LoRA adapters"):
        FastLanguageModel.get_peft_model(peft_model)


def test_print_trainable_parameters_and_counts(model, capsys):
    pm = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"])
    pm.print_trainable_parameters()
    out = capsys.readouterr().out
    # 2 layers x (q: 4*(64+64), v: 4*(64+32)) = 2 * (512 + 384) = 1792
    assert "trainable params: 1,792" in out
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_random_state_and_rslora(tiny_dir):
    def a_weights(seed, **kw):
        m, _ = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=False)
        pm = FastLanguageModel.get_peft_model(m, r=16, lora_alpha=32, random_state=seed, **kw)
        return pm, torch.cat([p.flatten() for n, p in pm.named_parameters() if "lora_A" in n])

    _, a1 = a_weights(1)
    _, a2 = a_weights(1)
    _, a3 = a_weights(2)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    pm, _ = a_weights(1, use_rslora=True)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(32 / 16**0.5)


def test_layers_to_transform_and_modules_to_save(model):
    pm = FastLanguageModel.get_peft_model(model, layers_to_transform=[1], modules_to_save=["lm_head"])
    names = [n for n, _ in pm.named_parameters() if "lora_A" in n]
    assert names and all(".layers.1." in n for n in names)
    assert any("modules_to_save" in n and p.requires_grad for n, p in pm.named_parameters())


def test_gradient_checkpointing_modes(tiny_dir, caplog):
    m, _ = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=False)
    with caplog.at_level(logging.INFO, logger="velotune"):
        pm = FastLanguageModel.get_peft_model(m, use_gradient_checkpointing="unsloth")
    assert pm.get_base_model().is_gradient_checkpointing
    m2, _ = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=False)
    pm2 = FastLanguageModel.get_peft_model(m2, use_gradient_checkpointing=False)
    assert not pm2.get_base_model().is_gradient_checkpointing
    # Checkpointing changes memory, not numbers: same loss and LoRA grads either way.
    x = torch.randint(0, 500, (2, 24))
    for p in (pm, pm2):
        p.train()
    pm2.load_state_dict(pm.state_dict())
    losses, grads = [], []
    for p in (pm, pm2):
        out = p(input_ids=x, labels=x)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([q.grad.flatten() for n, q in p.named_parameters() if "lora_B" in n]))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
