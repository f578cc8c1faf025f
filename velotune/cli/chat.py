"""``velotune chat MODEL``: talk to a model in the terminal, tokens streamed as they are generated.

MODEL is a Hugging Face model folder, a PEFT adapter folder (its base + the adapter, restored as
``FastLanguageModel.from_pretrained(adapter_dir)`` does), or a ``velotune train`` output folder: its
final export (``lora/``, then ``merged_16bit/``) when the run finished, else its newest complete
``checkpoint-N`` (said on stderr).

The conversation is rendered with the tokenizer's chat template (or ``--chat-template NAME``, one of
``velotune.get_chat_template``'s) and kept between turns; when it no longer fits ``--max-seq-length``
minus ``--max-new-tokens``, the oldest exchanges are dropped (said). ``--temperature 0`` decodes
greedily. Commands: ``/reset`` starts over (the ``--system`` message stays), ``/exit`` or Ctrl-D ends
(exit code 0), Ctrl-C stops the reply being generated (it is not kept; at the prompt it exits with 130). ``--prompt TEXT`` answers once and exits:
the reply alone goes to stdout, notices to stderr.

Bad input (a missing folder, a folder with no model, no chat template and no ``--chat-template``, an
unknown template name, a template that refuses ``--system``) exits with code 2 and a message naming
the fix, before the model is loaded (the tokenizer alone is read to check the template).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._notices import VelotuneError, say
from ._runs import folder_kind, resolve_run, run_config

COMMANDS = {"/reset": "forget the conversation (the --system message stays)", "/exit": "end the chat",
            "/quit": "end the chat", "/help": "list these commands"}
PROMPT = ">>> "
# A run folder's weights for chatting: the final exports first (the merged model needs no base), then
# the newest checkpoint.
RUN_ORDER = ("lora", "merged_16bit", "checkpoint")
DEFAULT_MAX_SEQ = 4096  # history cap when the model's own context is longer (or unknown: 2048)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``velotune chat`` options."""
    p.add_argument("model", metavar="MODEL",
                   help="a model folder, a PEFT adapter folder, or a velotune train output folder")
    p.add_argument("--prompt", metavar="TEXT", help="answer this one message and exit (for scripts)")
    p.add_argument("--system", metavar="TEXT", help="system message at the start of the conversation")
    p.add_argument("--chat-template", metavar="NAME",
                   help="use this template instead of the tokenizer's own: chatml, qwen-2.5, llama-3, gemma, "
                        "mistral, alpaca, zephyr, phi-3, vicuna (velotune.get_chat_template)")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="longest reply in tokens (512)")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature; 0 decodes greedily (default 0.7)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible replies)")
    p.add_argument("--max-seq-length", type=int, default=None, metavar="N",
                   help=f"conversation budget in tokens, reply included (default: a run folder's "
                        f"model.max_seq_length, else the model's context, at most {DEFAULT_MAX_SEQ})")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="load the weights in 4-bit NF4 (default on a CUDA GPU) or 16/32-bit (default on a CPU)")
    p.set_defaults(func=run, _parser=p)


# ------------------------------------------------------------------------------- checks (no model)
def _resolve(args: argparse.Namespace) -> tuple[Path, str, int | None]:
    """The folder to load, its kind ("adapter" / "model") and, for a run folder, the run's
    model.max_seq_length (None otherwise); a run folder becomes the folder it picks (said on stderr).
    Exits 2 (argparse) on a bad MODEL."""
    err = args._parser.error
    folder = Path(args.model).expanduser()
    if not folder.exists():
        hub = args.model.count("/") == 1 and not args.model.startswith((".", "/", "~"))
        err(f"MODEL {args.model}: no such folder; pass a model folder (config.json), a PEFT adapter folder "
            "(adapter_config.json) or a velotune train output folder"
            + ("; for a Hub model, download it first: huggingface-cli download ID --local-dir DIR" if hub else ""))
    if not folder.is_dir():
        err(f"MODEL {args.model} is a file; pass the folder that holds config.json or adapter_config.json")
    kind = folder_kind(folder)
    if kind is None:
        err(f"MODEL {args.model} holds no config.json (model), adapter_config.json (PEFT adapter) or velotune train "
            "run (run_report.json, checkpoint-N); point it at the folder that holds one")
    if kind == "run":
        path, kind = resolve_run("chat", "MODEL", args.model, folder, RUN_ORDER, err)
        trained = (run_config(folder).get("model") or {}).get("max_seq_length")
        return path, kind, trained if isinstance(trained, int) and trained > 0 else None
    return folder, kind, None


def _read_json(path: Path, err) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        err(f"{path} is not valid JSON ({e}); restore it from where the model came from")
    return data if isinstance(data, dict) else {}


def _base_of(adapter: Path, err) -> str:
    base = _read_json(adapter / "adapter_config.json", err).get("base_model_name_or_path")
    if not base:
        err(f"{adapter / 'adapter_config.json'} names no base_model_name_or_path; add the base model's folder there")
    looks_local = base.startswith((".", "/", "~")) or base.count("/") > 1
    if looks_local and not Path(base).expanduser().is_dir():
        err(f"the adapter {adapter} was trained on {base}, which is not a folder here; put the base model there or "
            "edit base_model_name_or_path in its adapter_config.json")
    return base


def _tokenizer_for_check(folder: Path, kind: str, err):
    """The tokenizer the model will use (the adapter's own when saved, else its base's): small to read."""
    from transformers import AutoTokenizer

    sources = [str(folder)] + ([_base_of(folder, err)] if kind == "adapter" else [])
    problems = []
    for src in sources:
        try:
            return AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError, TypeError) as e:
            problems.append(f"{src}: {e}")
    err(f"no tokenizer could be read ({'; '.join(problems)}); save the tokenizer next to the model "
        "(tokenizer.save_pretrained(folder))")


def _context_of(folder: Path, kind: str, err) -> int:
    """The model's context length from its config.json (the base's for an adapter), or 2048."""
    config = folder / "config.json"
    if kind == "adapter":
        config = Path(_base_of(folder, err)).expanduser() / "config.json"
    if config.is_file():
        data = _read_json(config, err)
        n = data.get("max_position_embeddings") or (data.get("text_config") or {}).get("max_position_embeddings")
        if isinstance(n, int) and n > 0:
            return n
    return 2048


def _check_template(args: argparse.Namespace, tok) -> None:
    """Apply ``--chat-template`` (or check the tokenizer has one) and render a probe conversation, so a
    template that cannot work fails now. Exits 2."""
    import jinja2

    err = args._parser.error
    if args.chat_template:
        from ..data.chat_templates import get_chat_template

        try:
            get_chat_template(tok, args.chat_template)
        except VelotuneError as e:
            err(f"--chat-template {args.chat_template}: {e}")
    elif not getattr(tok, "chat_template", None):
        from ..data.chat_templates import template_names

        err(f"MODEL {args.model}: the tokenizer has no chat template; pass --chat-template NAME with the template "
            f"the model was trained on ({', '.join(template_names())})")
    try:
        tok.apply_chat_template(_messages(args.system, [{"role": "user", "content": "hi"}]), tokenize=False,
                                add_generation_prompt=True)
    except jinja2.TemplateError as e:
        what = "refuses a system message" if args.system else "fails on a one-message conversation"
        fix = "drop --system" if args.system else "pass --chat-template NAME"
        err(f"the chat template {what} ({e}); {fix}")


def _check_numbers(args: argparse.Namespace) -> None:
    err = args._parser.error
    if args.max_new_tokens <= 0:
        err(f"--max-new-tokens {args.max_new_tokens} must be a positive number of tokens, e.g. 512")
    if args.temperature < 0:
        err(f"--temperature {args.temperature} must be >= 0 (0 decodes greedily)")
    if args.max_seq_length is not None and args.max_seq_length <= args.max_new_tokens:
        err(f"--max-seq-length {args.max_seq_length} must exceed --max-new-tokens {args.max_new_tokens}: it holds "
            "the conversation and the reply")
    if args.prompt is not None and not args.prompt.strip():
        err("--prompt is empty; pass the message to answer")


def _messages(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


# ---------------------------------------------------------------------------------------- the chat
class Chat:
    """One conversation with a loaded model: history, rendering with the chat template, streamed replies.

    ``model`` / ``tokenizer`` as ``FastLanguageModel.from_pretrained`` returns them (put in inference
    mode here). ``max_seq_length`` bounds prompt + reply in tokens.
    """

    def __init__(self, model, tokenizer, system: str | None, max_new_tokens: int, temperature: float,
                 max_seq_length: int):
        from ..api import FastLanguageModel

        self.model = FastLanguageModel.for_inference(model)
        self.tok = tokenizer
        self.system, self.max_new_tokens, self.temperature = system, max_new_tokens, temperature
        self.max_seq_length = max_seq_length
        self.turns: list[dict] = []
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        """EOS ids of the generation config and the tokenizer, and the template's end-of-turn token."""
        from ..data.chat_templates import detect_chat_template

        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        if self.tok.eos_token_id is not None:
            ids.add(self.tok.eos_token_id)
        row = detect_chat_template(self.tok.chat_template)
        if row is not None and row.end_of_turn:
            eot = self.tok.encode(row.end_of_turn, add_special_tokens=False)
            if len(eot) == 1:
                ids.add(eot[0])
        return sorted(ids)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.turns = []

    def _prompt_ids(self):
        """Token ids [1, T] of the conversation + generation prompt. The oldest exchanges are dropped
        (said) until T + max_new_tokens fits max_seq_length; a last message too long alone raises
        VelotuneError and leaves the history as it was."""
        budget = self.max_seq_length - self.max_new_tokens
        turns = self.turns
        while True:
            text = self.tok.apply_chat_template(_messages(self.system, turns), tokenize=False,
                                                add_generation_prompt=True)
            ids = self.tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if ids.shape[1] <= budget:
                break
            if len(turns) <= 1:
                raise VelotuneError(f"the message makes a prompt of {ids.shape[1]} tokens, more than --max-seq-length "
                                    f"{self.max_seq_length} minus --max-new-tokens {self.max_new_tokens}; shorten it "
                                    "or raise --max-seq-length")
            turns = turns[2:]  # one user message + its reply
        if len(turns) < len(self.turns):
            say(f"dropped the {len(self.turns) - len(turns)} oldest messages to fit --max-seq-length "
                f"{self.max_seq_length}")
            self.turns = turns
        return ids

    def ask(self, message: str) -> str:
        """Add ``message``, stream the reply to stdout (ending in a newline), keep it; returns its text.

        On KeyboardInterrupt the message and the partial reply are dropped and the interrupt re-raised.
        """
        import torch
        from transformers import TextStreamer

        self.turns.append({"role": "user", "content": message})
        try:
            ids = self._prompt_ids().to(self.model.device)
            streamer = TextStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
            sampling = dict(do_sample=True, temperature=self.temperature) if self.temperature > 0 else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                          max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                                          pad_token_id=self.tok.pad_token_id, **sampling)
        except BaseException:
            if self.turns and self.turns[-1]["role"] == "user":
                self.turns.pop()
            raise
        reply = self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        self.turns.append({"role": "assistant", "content": reply})
        return reply


def _load(args: argparse.Namespace, folder: Path, tok_checked, max_seq_length: int):
    import torch

    from ..api import FastLanguageModel

    load_in_4bit = torch.cuda.is_available() if args.load_in_4bit is None else args.load_in_4bit
    model, tok = FastLanguageModel.from_pretrained(str(folder), max_seq_length=max_seq_length,
                                                   load_in_4bit=load_in_4bit)
    if args.chat_template:
        from ..data.chat_templates import get_chat_template

        get_chat_template(tok, args.chat_template)
    elif not tok.chat_template:  # the checked tokenizer had one (e.g. the adapter's own): keep it
        tok.chat_template = tok_checked.chat_template
    return model, tok


def _interactive(chat: Chat, name: str) -> int:
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    print(f"velotune chat: {name}. Type a message; /reset forgets the conversation, /exit or Ctrl-D ends, "
          "Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            return 0
        if message == "/reset":
            chat.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if message == "/help":
            print("\n".join(f"{c}  {what}" for c, what in COMMANDS.items()), file=sys.stderr)
            continue
        try:
            chat.ask(message)
        except KeyboardInterrupt:
            print("\n(reply stopped; not kept in the conversation)", file=sys.stderr)
        except VelotuneError as e:
            print(f"velotune chat: {e}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """``velotune chat``: check (exit 2), load, then answer ``--prompt`` once or chat until /exit or EOF."""
    _check_numbers(args)
    folder, kind, trained = _resolve(args)
    err = args._parser.error
    tok_checked = _tokenizer_for_check(folder, kind, err)
    _check_template(args, tok_checked)
    # a run trained beyond the model's context keeps the RoPE scaling it trained with (its max_seq_length)
    max_seq_length = args.max_seq_length or max(trained or 0, min(_context_of(folder, kind, err), DEFAULT_MAX_SEQ))
    if max_seq_length <= args.max_new_tokens:
        err(f"--max-new-tokens {args.max_new_tokens} leaves no room for the conversation in the model's context "
            f"of {max_seq_length} tokens; lower it")
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    try:
        model, tok = _load(args, folder, tok_checked, max_seq_length)
    except VelotuneError as e:
        print(f"velotune chat: error: {e}", file=sys.stderr)
        return 2
    chat = Chat(model, tok, args.system, args.max_new_tokens, args.temperature, max_seq_length)
    if args.prompt is not None:
        try:
            chat.ask(args.prompt)
        except VelotuneError as e:
            print(f"velotune chat: error: {e}", file=sys.stderr)
            return 2
        return 0
    return _interactive(chat, str(folder))
