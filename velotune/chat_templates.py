"""The incumbent's ``chat_templates`` module path, so ``from unsloth.chat_templates import ...`` becomes
``from velotune.chat_templates import ...`` by changing the package name alone. The same functions as the
top-level ``from velotune import get_chat_template, standardize_sharegpt, train_on_responses_only``."""
from .data.chat_templates import get_chat_template
from .data.sharegpt import standardize_sharegpt
from .training.responses_only import train_on_responses_only

__all__ = ["get_chat_template", "standardize_sharegpt", "train_on_responses_only"]
