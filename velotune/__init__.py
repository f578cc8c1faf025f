"""velotune: fast LoRA/QLoRA fine-tuning."""
