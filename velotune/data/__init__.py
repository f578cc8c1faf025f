"""Data helpers: prompt formats, chat templates, ShareGPT normalising, bundled datasets, the date task."""
from .alpaca import alpaca_prompt, alpaca_prompt_no_input, format_alpaca, get_alpaca_formatter
from .chat_templates import ChatTemplate, detect_chat_template, get_chat_template, template_names
from .sharegpt import standardize_sharegpt

__all__ = ["alpaca_prompt", "alpaca_prompt_no_input", "format_alpaca", "get_alpaca_formatter", "ChatTemplate",
           "detect_chat_template", "get_chat_template", "template_names", "standardize_sharegpt"]
