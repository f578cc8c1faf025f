"""``velotune chat``: greedy replies equal plain transformers' ``generate`` on the same rendered prompt,
history and /reset through stdin, run folders resolved to their newest complete checkpoint, and
bad input exiting 2 before the model loads."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import randomize_lora_b
from velotune.cli import main
from velotune.cli.chat import PROMPT

N = 24  # new tokens per reply: enough for the tiny random model to say something distinct


def oracle(model_dir, messages, adapter=None, n=N) -> str:
    """The greedy reply of plain transformers (+ PEFT): velotune not involved."""
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(adapter or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def chat(*argv, stdin: str | None = None, monkeypatch=None, capsys=None):
    """``velotune chat argv...`` in this process: (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = main(["chat", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    """Three LoRA adapter folders of the tiny llama (B drawn with seeds 1, 2, 3): distinct replies."""
    from velotune import FastLanguageModel

    root = tmp_path_factory.mktemp("chat-adapters")
    folders = []
    for seed in (1, 2, 3):
        model, tok = FastLanguageModel.from_pretrained(tiny_dir(), load_in_4bit=False, max_seq_length=256)
        model = FastLanguageModel.get_peft_model(model, r=8, random_state=seed)
        randomize_lora_b(model, seed, std=0.5)
        folders.append(Path(model.save_pretrained_merged(root / f"a{seed}", tok, save_method="lora")))
    return folders


def test_prompt_greedy_prints_what_generate_gives(tiny_dir, capsys):
    system, prompt = "You answer briefly.", "Add the two numbers."
    code, out, err = chat(tiny_dir(), "--prompt", prompt, "--system", system, "--temperature", 0,
                          "--max-new-tokens", N, capsys=capsys)
    assert code == 0, err
    want = oracle(tiny_dir(), [{"role": "system", "content": system}, {"role": "user", "content": prompt}])
    assert len(want.strip()) > 5  # the tiny model says something, so equality means something
    assert out == want + "\n"  # streamed token by token, then the newline: nothing else on stdout
    # the system message is part of the rendered prompt: without it the greedy reply differs
    assert oracle(tiny_dir(), [{"role": "user", "content": prompt}]) != want


def test_scripted_session_keeps_history_and_resets(tiny_dir, capsys, monkeypatch):
    first, second = "Name a color.", "Add the two numbers."
    script = f"{first}\n\n{second}\n/reset\n{first}\n"  # the empty line is ignored; EOF ends the chat
    code, out, err = chat(tiny_dir(), "--temperature", 0, "--max-new-tokens", N, stdin=script,
                          monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    # stdout: a prompt before each input line read (5 lines + the EOF), each reply after its prompt
    parts = out.split(PROMPT)
    assert len(parts) == 7 and parts[0] == parts[2] == parts[4] == parts[6] == "", parts
    r1, r2, r3 = parts[1], parts[3], parts[5]
    assert r1 == oracle(tiny_dir(), [{"role": "user", "content": first}]) + "\n"
    with_history = [{"role": "user", "content": first}, {"role": "assistant", "content": r1.strip()},
                    {"role": "user", "content": second}]
    assert r2 == oracle(tiny_dir(), with_history) + "\n"
    assert r2 != oracle(tiny_dir(), [{"role": "user", "content": second}]) + "\n"  # the history mattered
    assert r3 == r1  # after /reset the same first message gets the same first reply
    assert "(conversation reset)" in err and "/exit or Ctrl-D ends" in err


def test_exit_command_and_help(tiny_dir, capsys, monkeypatch):
    code, out, err = chat(tiny_dir(), "--temperature", 0, "--max-new-tokens", 4, stdin="/help\n/exit\nNever read.\n",
                          monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and out == PROMPT * 2  # /exit ends before the third line is read
    assert "/reset  forget the conversation" in err


def _prompt_tokens(model_dir, messages) -> int:
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_oldest_exchange_dropped_to_fit_max_seq_length(tiny_dir, capsys, monkeypatch, notices):
    u = {"role": "user", "content": "Rewrite the date in ISO 8601 format, please."}
    new, budget = 8, 60  # measured: [u] is 24 tokens, [u, a, u] about 58, [u, a, u, a, u] about 92
    code, out, err = chat(tiny_dir(), "--temperature", 0, "--max-new-tokens", new, "--max-seq-length", budget + new,
                          stdin=f"{u['content']}\n" * 3, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    replies = out.split(PROMPT)[1:4]
    a1 = {"role": "assistant", "content": replies[0].strip()}
    a2 = {"role": "assistant", "content": replies[1].strip()}
    # the test's premise: turn 2 fits whole, turn 3 only without the first exchange
    assert _prompt_tokens(tiny_dir(), [u, a1, u]) <= budget < _prompt_tokens(tiny_dir(), [u, a1, u, a2, u])
    assert _prompt_tokens(tiny_dir(), [u, a2, u]) <= budget
    assert replies[0] == oracle(tiny_dir(), [u], n=new) + "\n"
    assert replies[1] == oracle(tiny_dir(), [u, a1, u], n=new) + "\n"
    assert replies[2] == oracle(tiny_dir(), [u, a2, u], n=new) + "\n" != replies[1]
    dropped = [m for m in notices if m.startswith("dropped")]
    assert dropped == ["dropped the 2 oldest messages to fit --max-seq-length 68"]  # at turn 3 only


def _make_run(root: Path, adapters: list[Path]) -> Path:
    """A velotune train output folder as an interrupted run leaves it: checkpoints 2 and 4 complete,
    checkpoint-6 without its trainer state (killed mid-save in an old layout), a staging folder, no exports."""
    run = root / "run"
    for step, adapter, complete in ((2, adapters[0], True), (4, adapters[1], True), (6, adapters[2], False)):
        shutil.copytree(adapter, run / f"checkpoint-{step}")
        if complete:
            (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    shutil.copytree(adapters[2], run / ".tmp-checkpoint-8-x1y2")
    (run / "velotune_config.yaml").write_text("model:\n  max_seq_length: 128\n")
    return run


def test_run_folder_uses_its_newest_complete_checkpoint(tiny_dir, adapters, tmp_path, capsys):
    run = _make_run(tmp_path, adapters)
    prompt = "Add the two numbers."
    code, out, err = chat(run, "--prompt", prompt, "--temperature", 0, "--max-new-tokens", N, capsys=capsys)
    assert code == 0, err
    assert f"is a run folder: using {run / 'checkpoint-4'} (the newest complete checkpoint of 2;" in err
    msgs = [{"role": "user", "content": prompt}]
    want = oracle(tiny_dir(), msgs, adapter=run / "checkpoint-4")
    assert out == want + "\n"
    others = {oracle(tiny_dir(), msgs, adapter=a) for a in (adapters[0], adapters[2])}
    assert want not in others  # checkpoint-2 or the incomplete checkpoint-6 would have said something else

    # a finished run's final lora export wins over its checkpoints
    shutil.copytree(adapters[0], run / "lora")
    (run / "run_report.json").write_text(json.dumps({"status": "completed", "outputs": {"lora": str(run / "lora")}}))
    code, out, err = chat(run, "--prompt", prompt, "--temperature", 0, "--max-new-tokens", N, capsys=capsys)
    assert code == 0 and f"using {run / 'lora'} (the run's final lora export (named by run_report.json))" in err
    assert out == oracle(tiny_dir(), msgs, adapter=adapters[0]) + "\n"


def _no_template_copy(src: str, dst: Path, template: str | None = None) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink()
    if template is not None:
        (dst / "chat_template.jinja").write_text(template)
    return dst


def test_bad_input_exits_2_before_the_model_loads(tiny_dir, adapters, tmp_path, capsys, monkeypatch):
    from velotune.api import FastLanguageModel

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded when the input is bad")

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", no_load)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_text("x")
    bare = _no_template_copy(tiny_dir(), tmp_path / "bare")
    nosys = _no_template_copy(tiny_dir(), tmp_path / "nosys", "{% for m in messages %}{% if m['role'] == 'system' %}"
                              "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
                              "{% endfor %}")
    orphan = tmp_path / "orphan"
    shutil.copytree(adapters[0], orphan)
    cfg = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    half_run = tmp_path / "half_run"
    shutil.copytree(adapters[0], half_run / "checkpoint-3")  # no trainer_state.json: killed mid-save
    cases = [
        ([tmp_path / "nope"], f"MODEL {tmp_path / 'nope'}: no such folder; pass a model folder (config.json)"),
        ([tmp_path / "a.txt"], "is a file; pass the folder that holds config.json or adapter_config.json"),
        ([tmp_path / "empty"],
         "holds no config.json (model), adapter_config.json (PEFT adapter) or velotune train run"),
        ([bare], "the tokenizer has no chat template; pass --chat-template NAME with the template the model was "
                 "trained on (chatml, qwen-2.5, llama-3"),
        ([bare, "--chat-template", "chatml-x"], "--chat-template chatml-x: unknown chat_template 'chatml-x'; known: "),
        ([bare, "--chat-template", "chatml"],
         "--chat-template chatml: chat_template='chatml' needs the special tokens ['<|im_start|>', '<|im_end|>']"),
        ([nosys, "--system", "Be brief."], "the chat template refuses a system message (System role not supported); "
                                           "drop --system"),
        ([orphan], f"the adapter {orphan} was trained on {tmp_path / 'gone'}, which is not a folder here"),
        ([half_run], f"MODEL {half_run} is a velotune train run folder but holds no final export (lora/, "
                     "merged_16bit/) and no complete checkpoint-N (checkpoint-3 incomplete"),
        ([tiny_dir(), "--temperature", "-1"], "--temperature -1.0 must be >= 0 (0 decodes greedily)"),
        ([tiny_dir(), "--max-new-tokens", "0"], "--max-new-tokens 0 must be a positive number of tokens"),
        ([tiny_dir(), "--max-seq-length", "64", "--max-new-tokens", "64"], "--max-seq-length 64 must exceed "
                                                                            "--max-new-tokens 64"),
        ([tiny_dir(), "--prompt", " "], "--prompt is empty; pass the message to answer"),
    ]
    capsys.readouterr()  # what building the fixtures printed
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            main(["chat", *map(str, argv)])  # a case that passed the checks would hit no_load
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("usage: velotune chat") and expected in err, (argv, err)


def test_ctrl_c_stops_a_reply_and_forgets_it(tiny_dir, capsys, monkeypatch):
    from transformers import TextStreamer

    put, calls = TextStreamer.put, []

    def interrupted_once(self, value):
        calls.append(1)
        if len(calls) == 3:  # the prompt, then two tokens of the first reply
            raise KeyboardInterrupt
        return put(self, value)

    monkeypatch.setattr(TextStreamer, "put", interrupted_once)
    first, second = "Name a color.", "Add the two numbers."
    code, out, err = chat(tiny_dir(), "--temperature", 0, "--max-new-tokens", N, stdin=f"{first}\n{second}\n",
                          monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "(reply stopped; not kept in the conversation)" in err
    # the second message is answered as the first of a fresh conversation
    assert out.split(PROMPT)[2] == oracle(tiny_dir(), [{"role": "user", "content": second}]) + "\n"


def test_finished_train_run_chats_with_its_final_adapter(tiny_dir, tmp_path, capsys):
    from tests.test_cli_train import write_config

    cfg = write_config(tmp_path, tiny_dir(), data={"max_rows": 8},
                       training={"max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 1,
                                 "gradient_accumulation_steps": 1, "learning_rate": 5e-2})
    assert main(["train", str(cfg)]) == 0
    run, prompt = tmp_path / "out", "Add the two numbers."
    code, out, err = chat(run, "--prompt", prompt, "--temperature", 0, "--max-new-tokens", N, capsys=capsys)
    assert code == 0 and f"using {run / 'lora'} (the run's final lora export (named by run_report.json))" in err
    msgs = [{"role": "user", "content": prompt}]
    assert out == oracle(tiny_dir(), msgs, adapter=run / "checkpoint-2") + "\n"
    assert out != oracle(tiny_dir(), msgs) + "\n"  # the trained adapter changed the reply
