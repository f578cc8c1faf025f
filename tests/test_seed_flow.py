"""The seed's workflow, start to finish, with only the import line changed (tiny model, CPU).

Mirrors ../shared/seed (a Chinese-language Unsloth guide): load 4-bit, LoRA on q/k/v/o, Alpaca
formatting, SFTTrainer with the seed's exact TrainingArguments, the memory report, then saving the
adapter (also through the seed's ``unsloth_save_model`` call) and the merged 16-bit model. The GPU version is tests/test_gpu_e2e.py.
"""
from __future__ import annotations

import torch


def test_seed_script_runs_unchanged(tiny_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, TrainingArguments

    from velotune import FastLanguageModel, alpaca_prompt, memory_report, unsloth_save_model
    from trl import SFTTrainer  # as the seed imports it: TRL's class, given a velotune model, is velotune's trainer
    from velotune.data.bundled import load_alpaca_dataset

    max_seq_length = 2048
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=tiny_dir(), max_seq_length=max_seq_length, dtype=None, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_alpha=16, lora_dropout=0,
        bias="none", use_gradient_checkpointing=True)
    EOS_TOKEN = tokenizer.eos_token  # noqa: N806 (the seed's name)

    def formatting_prompts_func(examples):
        texts = [alpaca_prompt.format(i, x, o) + EOS_TOKEN
                 for i, x, o in zip(examples["instruction"], examples["input"], examples["output"])]
        return {"text": texts}

    dataset = load_alpaca_dataset().select(range(40)).map(formatting_prompts_func, batched=True)
    trainer = SFTTrainer(
        model=model, train_dataset=dataset, dataset_text_field="text", max_seq_length=max_seq_length,
        args=TrainingArguments(per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5,
                               max_steps=6, learning_rate=2e-4, fp16=not torch.cuda.is_bf16_supported(),
                               bf16=torch.cuda.is_bf16_supported(), logging_steps=1, optim="adamw_8bit",
                               weight_decay=0.01, lr_scheduler_type="linear", seed=3407,
                               output_dir=str(tmp_path / "outputs"), report_to="none"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    with memory_report() as report:
        trainer_stats = trainer.train()
    assert type(trainer).__module__ == "velotune.training.trainer"
    assert trainer_stats.global_step == 6 and report.stats["seconds"] > 0
    assert "seconds used for training" in capsys.readouterr().out
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)

    FastLanguageModel.for_inference(model)
    inputs = tokenizer([alpaca_prompt.format("Add the two numbers.", "2 and 3", "")], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, use_cache=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    model.save_pretrained(tmp_path / "lora_model")
    tokenizer.save_pretrained(tmp_path / "lora_model")
    model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")
    unsloth_save_model(model, tokenizer, tmp_path / "output_model", push_to_hub=False)  # the seed's own save call
    base = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32)
    assert isinstance(PeftModel.from_pretrained(base, tmp_path / "lora_model"), PeftModel)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32)
    assert isinstance(PeftModel.from_pretrained(base, tmp_path / "output_model"), PeftModel)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        a = model(input_ids=inputs["input_ids"]).logits
        b = merged(input_ids=inputs["input_ids"]).logits.float()
    # merged in fp32 then rounded once to bf16 (the CPU model's dtype is fp32, the save dtype bf16)
    assert ((a - b).norm() / a.norm()).item() < 2e-2
