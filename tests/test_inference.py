"""for_inference / for_training, and the CPU AVX512-BF16 trap: LoRA grads must survive a generate."""
from __future__ import annotations

import pytest
import torch

from velotune import FastLanguageModel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_grads_after_generate(tiny_dir, dtype):
    import bitsandbytes as bnb

    def grads(generate_first: bool):
        model, tok = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=True, dtype=dtype, max_seq_length=128)
        assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
        model = FastLanguageModel.get_peft_model(model, r=8, random_state=5)
        if generate_first:
            FastLanguageModel.for_inference(model)
            assert tok.padding_side == "left" and model.get_base_model().config.use_cache
            enc = tok(["Add the two numbers.", "hi"], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=6, do_sample=False)
            assert out.shape[1] > enc["input_ids"].shape[1]
            FastLanguageModel.for_training(model)
            assert tok.padding_side == "right" and model.training
        x = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=x, labels=x).loss.backward()
        return torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if "lora_B" in n])

    g_plain, g_after = grads(False), grads(True)
    assert g_after.abs().sum() > 0, "LoRA gradients are zero after generate (bitsandbytes CPU repack trap)"
    torch.testing.assert_close(g_after, g_plain, rtol=0, atol=0)
