"""Ollama Modelfile for an exported GGUF: FROM, TEMPLATE (Go template) and stop tokens.

Ollama does not run the tokenizer's Jinja chat template; it needs a Go template. We recognise the
common families from the Jinja text by their turn markers and emit the equivalent Go template; an
unrecognised template gets a plain prompt template and a comment saying so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatFormat:
    name: str
    marker: str  # substring of the Jinja chat template that identifies the family
    template: str  # Ollama Go template
    stops: tuple[str, ...]


FORMATS: tuple[ChatFormat, ...] = (
    ChatFormat(
        "chatml", "<|im_start|>",
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
    ChatFormat(
        "llama-3", "<|start_header_id|>",
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    ChatFormat(
        "gemma", "<start_of_turn>",
        "{{- range $i, $m := .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
        "{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ end }}"
        "<start_of_turn>model\n",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    ChatFormat(
        "mistral", "[INST]",
        "{{- range $i, $m := .Messages }}{{- if eq .Role \"user\" }}[INST] "
        "{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
        "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>{{ end }}{{ end }}",
        ("[INST]", "[/INST]"),
    ),
)
_PLAIN = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"


def detect_format(chat_template: str | None) -> ChatFormat | None:
    """The family of a Jinja chat template, or None when unrecognised (or absent)."""
    if not chat_template:
        return None
    for f in FORMATS:
        if f.marker in chat_template:
            return f
    return None


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
        template, stops = fmt.template, fmt.stops
    lines.append(f'TEMPLATE """{template}"""')
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
