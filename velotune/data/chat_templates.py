"""Chat templates as data: one row per template family, shared by training, masking and export.

Each :class:`ChatTemplate` row holds everything the rest of velotune needs to know about a format:

- ``jinja``: the Hugging Face ``apply_chat_template`` template (``add_generation_prompt`` supported),
  written against ``messages`` of ``role``/``content``; ``bos_token``/``eos_token`` are the tokenizer's;
- ``end_of_turn``: the token that closes every assistant turn (None: the tokenizer's ``eos_token``);
- ``special_tokens``: markers that must be single tokens of the vocabulary for the template to mean
  what it says (``get_chat_template`` checks them);
- ``instruction_part`` / ``response_part``: the text that opens a user / assistant turn, which
  ``train_on_responses_only`` looks for to mask labels;
- ``ollama``: the Go ``TEMPLATE`` for an Ollama Modelfile rendering the same text (the placeholder
  ``{eos_token}`` is replaced by the tokenizer's EOS), and ``stops``: Ollama stop strings;
- ``markers``: substrings that identify the family inside a template we did not write (a model's own).

Usage (the incumbent's call)::

    tokenizer = get_chat_template(tokenizer, chat_template="llama-3")
    text = tokenizer.apply_chat_template(messages, tokenize=False)

Templates velotune writes start with the comment ``{#- velotune chat_template: NAME -#}`` so the row
can be found again after ``save_pretrained`` (``detect_chat_template``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .._notices import VelotuneError, say

EOS_PLACEHOLDER = "{eos_token}"  # in `ollama` templates; literal text in Go templates, so no clash
_TAG = "{#- velotune chat_template: %s -#}"
_TAG_RE = re.compile(r"\{#- velotune chat_template: ([\w.\-]+) -#\}")
_SYSTEM_RE = re.compile(r"\{%- set default_system = ('(?:[^'\\]|\\.)*') -%\}")


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format. See the module docstring for the fields."""

    name: str
    jinja: str
    instruction_part: str
    response_part: str
    ollama: str
    stops: tuple[str, ...]
    markers: tuple[str, ...]
    end_of_turn: str | None = None
    special_tokens: tuple[str, ...] = ()
    default_system: str = ""
    aliases: tuple[str, ...] = ()

    def ollama_template(self, eos_token: str | None) -> str:
        """The Go template with the tokenizer's EOS filled in (left out when there is none)."""
        return self.ollama.replace(EOS_PLACEHOLDER, eos_token or "")

    def render_jinja(self, system_message: str | None = None, mapping: dict | None = None) -> str:
        """The full Jinja text: tag, default system message, optional key/role mapping, body."""
        system = self.default_system if system_message is None else system_message
        if not isinstance(system, str):
            raise VelotuneError(f"system_message must be a string or None, got {type(system).__name__}")
        head = _TAG % self.name + "{%- set default_system = " + _jinja_literal(system) + " -%}"
        return head + (_mapping_preamble(mapping) if mapping else "") + self.jinja


def _jinja_literal(s: str) -> str:
    """A single-quoted Jinja string literal whose value is ``s`` exactly (newlines, quotes, emoji)."""
    # Jinja decodes string literals with Python's unicode_escape, so encoding with it round-trips.
    return "'" + s.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


# The system message: the conversation's own (first message, role "system"), else `default_system`.
_SPLIT_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = default_system -%}{%- set loop_messages = messages -%}{%- endif -%}"
)
# Formats that write the system turn like any other turn: emit the default one only when absent.
_DEFAULT_SYSTEM_TURN = "{%%- if default_system and not (messages and messages[0]['role'] == 'system') -%%}" \
                       "{{- %s -}}{%%- endif -%%}"
_GEN = "{%%- if add_generation_prompt -%%}{{- %s -}}{%%- endif -%%}"


def _only(roles: str, name: str) -> str:
    return ("{%- else -%}{{- raise_exception('" + name + " chat template: roles must be " + roles
            + ", got ' + message['role']) -}}")


_CHATML_JINJA = (
    _DEFAULT_SYSTEM_TURN % "'<|im_start|>system\\n' + default_system + '<|im_end|>\\n'"
    + "{%- for message in messages -%}"
      "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
      "{%- endfor -%}"
    + _GEN % "'<|im_start|>assistant\\n'"
)
_CHATML_OLLAMA = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}{{ end }}<|im_start|>assistant\n"
)
_CHATML_COMMON = dict(
    jinja=_CHATML_JINJA, instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n",
    ollama=_CHATML_OLLAMA, stops=("<|im_start|>", "<|im_end|>"), end_of_turn="<|im_end|>",
    special_tokens=("<|im_start|>", "<|im_end|>"),
)

TEMPLATES: tuple[ChatTemplate, ...] = (
    ChatTemplate(name="chatml", markers=("<|im_start|>",), **_CHATML_COMMON),
    ChatTemplate(
        name="qwen-2.5", markers=("<|im_start|>", "You are Qwen"), aliases=("qwen2.5", "qwen-25", "qwen25"),
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", **_CHATML_COMMON,
    ),
    ChatTemplate(
        name="llama-3", aliases=("llama3", "llama-3.1", "llama3.1", "llama-31"),
        jinja="{{- bos_token or '' -}}"
              + _DEFAULT_SYSTEM_TURN % "'<|start_header_id|>system<|end_header_id|>\\n\\n' + default_system | trim"
                                       " + '<|eot_id|>'"
              + "{%- for message in messages -%}"
                "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
                " + message['content'] | trim + '<|eot_id|>' -}}"
                "{%- endfor -%}"
              + _GEN % "'<|start_header_id|>assistant<|end_header_id|>\\n\\n'",
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
        ollama="{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
               "{{- range .Messages }}{{- if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>"
               "\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        stops=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), markers=("<|start_header_id|>",),
        end_of_turn="<|eot_id|>", special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    ChatTemplate(
        # Gemma has no system turn: the system text opens the first user turn (Gemma-3's rule; Gemma 1/2
        # templates refuse a system message instead). Contents are trimmed, as the originals do.
        name="gemma", aliases=("gemma-2", "gemma2", "gemma-3", "gemma3"),
        jinja="{{- bos_token or '' -}}" + _SPLIT_SYSTEM
              + "{%- for message in loop_messages -%}"
                "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
                "{{- '<start_of_turn>' + role + '\\n' -}}"
                "{%- if loop.first and system -%}{{- system | trim + '\\n\\n' -}}{%- endif -%}"
                "{{- message['content'] | trim + '<end_of_turn>\\n' -}}"
                "{%- endfor -%}"
              + _GEN % "'<start_of_turn>model\\n'",
        instruction_part="<start_of_turn>user\n", response_part="<start_of_turn>model\n",
        ollama="{{- $first := true }}{{- range .Messages }}{{- if ne .Role \"system\" }}<start_of_turn>"
               "{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
               "{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}{{ $first = false }}{{ .Content }}"
               "<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n",
        stops=("<start_of_turn>", "<end_of_turn>"), markers=("<start_of_turn>",), end_of_turn="<end_of_turn>",
        special_tokens=("<start_of_turn>", "<end_of_turn>"),
    ),
    ChatTemplate(
        # Mistral-Instruct v0.1/v0.2 layout: no system turn, the system text opens the first [INST].
        name="mistral",
        jinja="{{- bos_token or '' -}}" + _SPLIT_SYSTEM
              + "{%- for message in loop_messages -%}"
                "{%- if message['role'] == 'user' -%}"
                "{{- '[INST] ' + (system + '\\n\\n' if loop.first and system else '') + message['content']"
                " + ' [/INST]' -}}"
                "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}"
              + _only("user/assistant (a system message may come first)", "mistral")
              + "{%- endif -%}{%- endfor -%}",
        instruction_part="[INST]", response_part="[/INST]",
        ollama="{{- $first := true }}{{- range .Messages }}{{- if eq .Role \"user\" }}[INST] "
               "{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}{{ $first = false }}{{ .Content }} [/INST]"
               "{{- else if eq .Role \"assistant\" }}{{ .Content }}" + EOS_PLACEHOLDER + "{{ end }}{{ end }}",
        stops=("[INST]", "[/INST]"), markers=("[INST]",),
    ),
    ChatTemplate(
        # Alpaca's headings made multi-turn; the default system text is velotune's alpaca_prompt preamble.
        name="alpaca",
        jinja="{{- bos_token or '' -}}" + _SPLIT_SYSTEM
              + "{%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}"
                "{%- for message in loop_messages -%}"
                "{%- if message['role'] == 'user' -%}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
                "{%- elif message['role'] == 'assistant' -%}"
                "{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' -}}"
              + _only("user/assistant (a system message may come first)", "alpaca")
              + "{%- endif -%}{%- endfor -%}"
              + _GEN % "'### Response:\\n'",
        instruction_part="### Instruction:\n", response_part="### Response:\n",
        ollama="{{- if .System }}{{ .System }}\n\n{{ end }}{{- range .Messages }}{{- if eq .Role \"user\" }}"
               "### Instruction:\n{{ .Content }}\n\n{{ else if eq .Role \"assistant\" }}### Response:\n{{ .Content }}"
               + EOS_PLACEHOLDER + "\n\n{{ end }}{{ end }}### Response:\n",
        stops=("### Instruction:",), markers=("### Response:",),
        default_system="Below is an instruction that describes a task. Write a response that appropriately "
                       "completes the request.",
    ),
    ChatTemplate(
        name="zephyr",
        jinja=_DEFAULT_SYSTEM_TURN % "'<|system|>\\n' + default_system + eos_token + '\\n'"
              + "{%- for message in messages -%}"
                "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
                "{%- endfor -%}"
              + _GEN % "'<|assistant|>\\n'",
        instruction_part="<|user|>\n", response_part="<|assistant|>\n",
        ollama="{{- if .System }}<|system|>\n{{ .System }}" + EOS_PLACEHOLDER + "\n{{ end }}"
               "{{- range .Messages }}{{- if ne .Role \"system\" }}<|{{ .Role }}|>\n{{ .Content }}"
               + EOS_PLACEHOLDER + "\n{{ end }}{{ end }}<|assistant|>\n",
        stops=("<|user|>", "<|assistant|>", "<|system|>"), markers=("<|assistant|>",),
    ),
    ChatTemplate(
        name="phi-3", aliases=("phi3", "phi-3.5", "phi-35"),
        jinja=_DEFAULT_SYSTEM_TURN % "'<|system|>\\n' + default_system + '<|end|>\\n'"
              + "{%- for message in messages -%}"
                "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
                "{%- endfor -%}"
              + _GEN % "'<|assistant|>\\n'",
        instruction_part="<|user|>\n", response_part="<|assistant|>\n",
        ollama="{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
               "{{- range .Messages }}{{- if ne .Role \"system\" }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n"
               "{{ end }}{{ end }}<|assistant|>\n",
        stops=("<|end|>", "<|user|>", "<|assistant|>"), markers=("<|assistant|>", "<|end|>"),
        end_of_turn="<|end|>", special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    ChatTemplate(
        # Vicuna v1.1 (FastChat): "SYSTEM USER: ... ASSISTANT: ...</s>USER: ...".
        name="vicuna",
        jinja="{{- bos_token or '' -}}" + _SPLIT_SYSTEM
              + "{%- if system -%}{{- system + ' ' -}}{%- endif -%}"
                "{%- for message in loop_messages -%}"
                "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}"
                "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + message['content'] + eos_token -}}"
              + _only("user/assistant (a system message may come first)", "vicuna")
              + "{%- endif -%}{%- endfor -%}"
              + _GEN % "'ASSISTANT:'",
        instruction_part="USER:", response_part="ASSISTANT:",
        ollama="{{- if .System }}{{ .System }} {{ end }}{{- range .Messages }}{{- if eq .Role \"user\" }}"
               "USER: {{ .Content }} {{ else if eq .Role \"assistant\" }}ASSISTANT: {{ .Content }}"
               + EOS_PLACEHOLDER + "{{ end }}{{ end }}ASSISTANT:",
        stops=("USER:",), markers=("ASSISTANT:",),
        default_system="A chat between a curious user and an artificial intelligence assistant. The assistant "
                       "gives helpful, detailed, and polite answers to the user's questions.",
    ),
)

_BY_NAME = {key: row for row in TEMPLATES for key in (row.name, *row.aliases)}


def template_names() -> list[str]:
    """The template names ``get_chat_template`` accepts (aliases not included)."""
    return [row.name for row in TEMPLATES]


def get_template(name: str) -> ChatTemplate:
    """The row called ``name`` (or one of its aliases; case-insensitive)."""
    if not isinstance(name, str):
        raise VelotuneError(f"chat_template must be a template name (str), got {type(name).__name__}")
    row = _BY_NAME.get(name.strip().lower().replace("_", "-"))
    if row is None:
        aliases = sorted(a for r in TEMPLATES for a in r.aliases)
        raise VelotuneError(f"unknown chat_template {name!r}; known: {', '.join(template_names())} "
                            f"(aliases: {', '.join(aliases)})")
    return row


def detect_chat_template(jinja_text: str | None) -> ChatTemplate | None:
    """The row a Jinja chat template belongs to, or None when unrecognised (or absent).

    A template written by velotune names its row in a leading comment. Any other template is matched
    by its turn markers: the row whose markers all occur, with the most markers, wins (so Qwen's
    ChatML with its default system text is "qwen-2.5", other ChatML is "chatml").
    """
    if not jinja_text or not isinstance(jinja_text, str):  # absent, or a dict of named templates
        return None
    tag = _TAG_RE.search(jinja_text)
    if tag and tag.group(1) in _BY_NAME:
        return _BY_NAME[tag.group(1)]
    best = None
    for row in TEMPLATES:
        if all(m in jinja_text for m in row.markers) and (best is None or len(row.markers) > len(best.markers)):
            best = row
    return best


def default_system_of(jinja_text: str | None) -> str | None:
    """The default system message of a template velotune wrote (None when absent or not ours)."""
    if not isinstance(jinja_text, str) or not _TAG_RE.search(jinja_text):
        return None
    m = _SYSTEM_RE.search(jinja_text)
    if m is None:
        return None
    import jinja2

    return jinja2.Environment().from_string("{{ " + m.group(1) + " }}").render() or None


_MAPPING_KEYS = ("role", "content", "user", "assistant", "system")


def _mapping_preamble(mapping: dict) -> str:
    """Jinja that rewrites ``messages`` of the mapped keys/role names into role/content/user/assistant."""
    if not isinstance(mapping, dict):
        raise VelotuneError(f"mapping must be a dict like {{'role': 'from', 'content': 'value', 'user': 'human', "
                            f"'assistant': 'gpt'}}, got {type(mapping).__name__}")
    bad = sorted(set(mapping) - set(_MAPPING_KEYS))
    if bad:
        raise VelotuneError(f"mapping has unknown keys {bad}; allowed: {list(_MAPPING_KEYS)}")
    for k, v in mapping.items():
        if not isinstance(v, str) or not v:
            raise VelotuneError(f"mapping[{k!r}] must be a non-empty string, got {v!r}")
    role_key, content_key = mapping.get("role", "role"), mapping.get("content", "content")
    roles = ", ".join(f"{_jinja_literal(mapping.get(r, r))}: '{r}'" for r in ("user", "assistant", "system"))
    rk, ck = _jinja_literal(role_key), _jinja_literal(content_key)
    # Messages already in role/content form pass through, so TRL's own ShareGPT conversion still works.
    return ("{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}"
            "{%- set r = m[" + rk + "] if " + rk + " in m else m['role'] -%}"
            "{%- set c = m[" + ck + "] if " + ck + " in m else m['content'] -%}"
            "{%- set ns.msgs = ns.msgs + [{'role': {" + roles + "}.get(r, r), 'content': c}] -%}"
            "{%- endfor -%}{%- set messages = ns.msgs -%}")


def _single_token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` when the tokenizer reads it as exactly one token, else None."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _missing_tokens(tokenizer, row: ChatTemplate) -> list[str]:
    return [t for t in row.special_tokens if _single_token_id(tokenizer, t) is None]


def get_chat_template(tokenizer, chat_template: str = "chatml", mapping: dict | None = None,
                      map_eos_token: bool = True, system_message: str | None = None, *,
                      add_missing_tokens: bool = False):
    """Set ``tokenizer.chat_template`` to one of velotune's templates; returns the same tokenizer.

    Args:
        chat_template: a name from ``template_names()`` (chatml, qwen-2.5, llama-3, gemma, mistral, alpaca,
            zephyr, phi-3, vicuna) or an alias (llama-3.1, gemma-2, gemma-3, qwen2.5, phi-3.5, ...).
        mapping: the keys and role names your messages use, e.g. ShareGPT's
            ``{"role": "from", "content": "value", "user": "human", "assistant": "gpt"}``; the template
            then reads those directly (role/content messages still work). None: role/content, user/assistant.
        map_eos_token: make the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``,
            ``<end_of_turn>``, ``<|end|>``) the tokenizer's ``eos_token``, so training texts end in it and
            generation stops there. Said when done. Formats whose turns end in the EOS already are unchanged.
        system_message: the system text used when a conversation has none (None: the template's own
            default, e.g. Qwen's; "": none).
        add_missing_tokens: the template's special tokens (e.g. ``<|im_start|>``) are normally required to be
            in the vocabulary already, and a clear error says so otherwise. True adds them instead; their
            embeddings must then be created and trained: ``model.resize_token_embeddings(len(tokenizer))``
            before ``get_peft_model``, with ``modules_to_save=["embed_tokens", "lm_head"]``.

    The tokenizer is modified in place (the one ``FastLanguageModel.from_pretrained`` returned stays the
    one the trainer uses). Raises ``VelotuneError`` for an unknown name, missing tokens, or a template
    that needs an EOS token the tokenizer does not have.
    """
    row = get_template(chat_template)
    missing = _missing_tokens(tokenizer, row)
    if missing and not add_missing_tokens:
        own = detect_chat_template(getattr(tokenizer, "chat_template", None))
        hint = f" This tokenizer's own template looks like {own.name!r}." if own else ""
        raise VelotuneError(
            f"chat_template={row.name!r} needs the special tokens {missing}, which are not single tokens of this "
            f"tokenizer's vocabulary (size {len(tokenizer)}).{hint} Pick the template of the model's family, or "
            "pass add_missing_tokens=True and then call model.resize_token_embeddings(len(tokenizer)) before "
            "get_peft_model with modules_to_save=['embed_tokens', 'lm_head'] (new tokens start untrained)."
        )
    if row.end_of_turn is None and not getattr(tokenizer, "eos_token", None):
        raise VelotuneError(f"chat_template={row.name!r} ends turns with the EOS token, but the tokenizer has no "
                            "eos_token; set one (tokenizer.eos_token = '...') first")
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        say(f"get_chat_template: added {len(missing)} special tokens {missing} (vocabulary now {len(tokenizer)}); "
            "call model.resize_token_embeddings(len(tokenizer)) and train the embeddings "
            "(modules_to_save=['embed_tokens', 'lm_head']): new tokens start untrained")
    tokenizer.chat_template = row.render_jinja(system_message, mapping)
    _map_eos(tokenizer, row, map_eos_token)
    return tokenizer


def _map_eos(tokenizer, row: ChatTemplate, map_eos_token: bool) -> None:
    eot = row.end_of_turn
    if eot is None or tokenizer.eos_token == eot:
        return
    if not map_eos_token:
        say(f"get_chat_template: {row.name!r} turns end with {eot!r} but eos_token stays {tokenizer.eos_token!r} "
            "(map_eos_token=False); pass eos_token_id=tokenizer.convert_tokens_to_ids("
            f"{eot!r}) to generate() so replies stop at the end of the turn")
        return
    old = tokenizer.eos_token
    tokenizer.eos_token = eot
    say(f"get_chat_template: eos_token is now {eot!r} (id {tokenizer.eos_token_id}; was {old!r}) so each "
        f"{row.name} assistant turn ends in it; for generation set model.generation_config.eos_token_id = "
        "tokenizer.eos_token_id")

