"""Data helpers: prompt formats, bundled datasets, the procedural evaluation task."""
from .alpaca import alpaca_prompt, alpaca_prompt_no_input, format_alpaca, get_alpaca_formatter

__all__ = ["alpaca_prompt", "alpaca_prompt_no_input", "format_alpaca", "get_alpaca_formatter"]
