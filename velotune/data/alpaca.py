"""Alpaca prompt format and a formatter that never forgets the EOS token.

Usage with ``datasets`` (batched map)::

    fmt = get_alpaca_formatter(tokenizer)
    dataset = dataset.map(fmt, batched=True)      # adds a "text" column

Forgetting EOS at the end of each training text is the classic cause of endless generation: the
model never sees where an answer stops. The formatter always appends ``tokenizer.eos_token``.
"""
from __future__ import annotations

from .._notices import VelotuneError

alpaca_prompt = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""

alpaca_prompt_no_input = """Below is an instruction that describes a task. Write a response that appropriately completes the request.

### Instruction:
{}

### Response:
{}"""


def _eos_of(tokenizer_or_eos) -> str:
    eos = tokenizer_or_eos if isinstance(tokenizer_or_eos, str) else getattr(tokenizer_or_eos, "eos_token", None)
    if not eos:
        raise VelotuneError(
            "the tokenizer has no eos_token; set one (tokenizer.eos_token = '...') so training texts end "
            "where answers end, otherwise the model learns to generate forever"
        )
    return eos


def format_alpaca(instruction: str, input: str = "", output: str = "", eos_token: str = "") -> str:
    """One Alpaca text, ending in ``eos_token``. An empty ``input`` uses the no-input template.

    For a generation prompt pass ``output=""`` and no ``eos_token``.
    """
    if input and input.strip():
        return alpaca_prompt.format(instruction, input, output) + eos_token
    return alpaca_prompt_no_input.format(instruction, output) + eos_token


def get_alpaca_formatter(tokenizer_or_eos, instruction_field="instruction", input_field="input",
                         output_field="output", text_field="text"):
    """A ``batched=True`` map function: columns instruction/input/output -> ``text`` ending in EOS."""
    eos = _eos_of(tokenizer_or_eos)

    def formatting_prompts_func(examples):
        for f in (instruction_field, output_field):
            if f not in examples:
                raise VelotuneError(
                    f"the dataset has no {f!r} column (columns: {sorted(examples)}); pass "
                    f"{'instruction' if f == instruction_field else 'output'}_field= to name yours"
                )
        n = len(examples[instruction_field])
        inputs = examples.get(input_field) or [""] * n
        texts = []
        for i, (ins, inp, out) in enumerate(zip(examples[instruction_field], inputs, examples[output_field])):
            for what, v in (("instruction", ins), ("input", inp), ("output", out)):
                if v is not None and not isinstance(v, str):
                    raise VelotuneError(f"row {i}: {what} must be a string, got {type(v).__name__}: {v!r}")
            texts.append(format_alpaca(ins or "", inp or "", out or "", eos))
        return {text_field: texts}

    return formatting_prompts_func
