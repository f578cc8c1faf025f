"""Ollama Modelfile for an exported GGUF: FROM, TEMPLATE (Go template), SYSTEM and stop tokens.

Ollama does not run the tokenizer's Jinja chat template; it needs a Go template. The chat-template
table (velotune.data.chat_templates) holds each format's Go counterpart: a template velotune wrote is
recognised by its tag, any other by its turn markers. An unrecognised template gets a plain prompt
template and a comment saying so.
"""
from __future__ import annotations

import os
from pathlib import Path

from ...data.chat_templates import ChatTemplate, default_system_of, detect_chat_template

_PLAIN = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"


def detect_format(chat_template: str | None) -> ChatTemplate | None:
    """The chat-template row of a Jinja chat template, or None when unrecognised (or absent)."""
    return detect_chat_template(chat_template)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, tokenizer) -> str:
    """Modelfile text for ``FROM ./{gguf_name}`` with the tokenizer's chat format and stop tokens."""
    chat = getattr(tokenizer, "chat_template", None)
    fmt = detect_format(chat if isinstance(chat, str) else None)
    lines = [f"FROM ./{gguf_name}", ""]
    if fmt is None:
        why = "has no chat template" if not chat else "has a chat template of an unrecognised family"
        lines.append(f"# The tokenizer {why}; using a plain prompt template. Edit TEMPLATE for chat use.")
        template, stops = _PLAIN, ()
    else:
        lines.append(f"# Chat format: {fmt.name} (translated from the tokenizer's Jinja chat template).")
        template, stops = fmt.ollama_template(getattr(tokenizer, "eos_token", None)), fmt.stops
    lines.append(f'TEMPLATE """{template}"""')
    system = default_system_of(chat if isinstance(chat, str) else None)
    if system:
        lines.append(f'SYSTEM """{system}"""' if '"""' not in system else f"SYSTEM {_quote(system)}")
    eos = getattr(tokenizer, "eos_token", None)
    seen = []
    for s in (*stops, eos):
        if s and s not in seen:
            seen.append(s)
            lines.append(f"PARAMETER stop {_quote(s)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | os.PathLike, tokenizer, path: str | os.PathLike | None = None) -> Path:
    """Write ``Modelfile`` (default: beside ``gguf_path``) for Ollama; returns its path."""
    gguf_path = Path(gguf_path)
    out = Path(path) if path is not None else gguf_path.parent / "Modelfile"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(modelfile_text(gguf_path.name, tokenizer), encoding="utf-8")
    os.replace(tmp, out)
    return out
