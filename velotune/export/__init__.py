"""Exports: merged 16-bit safetensors, PEFT adapters, GGUF."""
