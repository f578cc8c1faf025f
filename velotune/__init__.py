"""velotune: fast, memory-lean LoRA / QLoRA fine-tuning with offline exports.

Drop-in names for the incumbent's API::

    from velotune import FastLanguageModel, SFTTrainer, is_bfloat16_supported, alpaca_prompt
    from velotune import get_chat_template, standardize_sharegpt, train_on_responses_only
    from velotune import unsloth_save_model
"""
from ._notices import VelotuneError
from .api import FastLanguageModel
from .data.alpaca import alpaca_prompt, alpaca_prompt_no_input, format_alpaca, get_alpaca_formatter
from .data.chat_templates import get_chat_template
from .data.sharegpt import standardize_sharegpt
from .models.graphs import set_cuda_graphs, set_memory_budget
from .device import MemoryReport, default_dtype, is_bfloat16_supported, memory_report
from .export.merge import unsloth_save_model
from .training.responses_only import train_on_responses_only
from .training.trainer import SFTTrainer

__version__ = "0.1.0"

__all__ = [
    "FastLanguageModel",
    "SFTTrainer",
    "VelotuneError",
    "is_bfloat16_supported",
    "default_dtype",
    "memory_report",
    "MemoryReport",
    "set_cuda_graphs",
    "set_memory_budget",
    "alpaca_prompt",
    "alpaca_prompt_no_input",
    "format_alpaca",
    "get_alpaca_formatter",
    "get_chat_template",
    "standardize_sharegpt",
    "train_on_responses_only",
    "unsloth_save_model",
]
