"""Chat templates as data: every row round-trips (render -> tokenize -> the label-visible spans are the
replies), generation prompts, mapping, system messages, EOS mapping, errors, and the Ollama side."""
from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from tests.test_responses_only import CONV, duck_trainer, render_ids, templated_tokenizer, visible_spans
from tests.tiny_models import make_tokenizer
from velotune import VelotuneError, get_chat_template, train_on_responses_only
from velotune.data.chat_templates import (TEMPLATES, default_system_of, detect_chat_template, get_template,
                                          template_names)
from velotune.export.gguf.modelfile import modelfile_text


# What a reply's label span decodes to, given the reply and the end-of-turn text. Vicuna's reply follows
# "ASSISTANT:" after a space, which BPE keeps on the reply's first word.
_REPLY = {"vicuna": " {}{}"}


@pytest.mark.parametrize("name", template_names())
def test_round_trip_labels_are_the_replies_and_nothing_else(name):
    tok = templated_tokenizer(name)
    row = get_template(name)
    eot = row.end_of_turn or tok.eos_token
    ids = render_ids(tok, CONV)
    masked = train_on_responses_only(duck_trainer(tok, [ids])).train_dataset[0]
    fmt = _REPLY.get(name, "{}{}")
    assert visible_spans(tok, masked["input_ids"], masked["labels"]) == [
        fmt.format("Paris is the capital.", eot), fmt.format("Rome.", eot)]
    text = tok.decode(ids)
    for m in CONV:  # everything is rendered, once
        assert text.count(m["content"]) == 1


@pytest.mark.parametrize("name", template_names())
def test_generation_prompt_is_where_the_reply_starts(name):
    tok = templated_tokenizer(name)
    for upto in (2, 4):  # before the first and the second reply
        prompt = tok.apply_chat_template(CONV[:upto], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(CONV[:upto + 1], tokenize=False)
        assert full.startswith(prompt)
        assert full[len(prompt):].lstrip(" ").startswith(CONV[upto]["content"])


def test_table_rows_are_complete():
    names = [r.name for r in TEMPLATES]
    assert names == ["chatml", "qwen-2.5", "llama-3", "gemma", "mistral", "alpaca", "zephyr", "phi-3", "vicuna"]
    for row in TEMPLATES:
        assert row.instruction_part and row.response_part and row.stops and row.markers
        # Go template actions balance: every if/range has its end.
        opens = len(re.findall(r"\{\{-?\s*(?:if|range)\b", row.ollama))
        assert opens == len(re.findall(r"\{\{-?\s*end\s*-?\}\}", row.ollama)), row.name


def test_aliases_and_unknown_name():
    assert get_template("llama-3.1") is get_template("llama-3") is get_template("LLAMA3")
    assert get_template("gemma-2") is get_template("gemma_3") is get_template("gemma")
    assert get_template("qwen2.5").name == "qwen-2.5" and get_template("phi-3.5").name == "phi-3"
    with pytest.raises(VelotuneError, match=r"unknown chat_template 'llama-9'; known: chatml, qwen-2.5, llama-3, "
                                            r"gemma, mistral, alpaca, zephyr, phi-3, vicuna \(aliases: gemma-2, "):
        get_chat_template(make_tokenizer(), "llama-9")
    with pytest.raises(VelotuneError, match="chat_template must be a template name"):
        get_chat_template(make_tokenizer(), 3)


def test_missing_special_tokens_error_names_the_fix_and_changes_nothing():
    tok = make_tokenizer()
    before, n = tok.chat_template, len(tok)
    with pytest.raises(VelotuneError, match=re.escape(
            "chat_template='llama-3' needs the special tokens ['<|start_header_id|>', '<|end_header_id|>', "
            "'<|eot_id|>'], which are not single tokens of this tokenizer's vocabulary (size 512). Pick the "
            "template of the model's family, or pass add_missing_tokens=True and then call "
            "model.resize_token_embeddings(len(tokenizer)) before get_peft_model with "
            "modules_to_save=['embed_tokens', 'lm_head'] (new tokens start untrained).")):
        get_chat_template(tok, "llama-3")
    assert tok.chat_template == before and len(tok) == n and tok.eos_token == "</s>"


def test_missing_tokens_error_suggests_the_tokenizers_own_family():
    tok = templated_tokenizer("chatml")  # has <|im_start|>/<|im_end|>, and a ChatML template
    with pytest.raises(VelotuneError, match="This tokenizer's own template looks like 'chatml'"):
        get_chat_template(tok, "gemma")


def test_add_missing_tokens_and_eos_mapping_are_said(notices):
    tok = make_tokenizer()
    get_chat_template(tok, "chatml", add_missing_tokens=True)
    assert len(tok) == 514 and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 513
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 512
    assert notices == [
        "get_chat_template: added 2 special tokens ['<|im_start|>', '<|im_end|>'] (vocabulary now 514); call "
        "model.resize_token_embeddings(len(tokenizer)) and train the embeddings (modules_to_save=['embed_tokens', "
        "'lm_head']): new tokens start untrained",
        "get_chat_template: eos_token is now '<|im_end|>' (id 513; was '</s>') so each chatml assistant turn ends "
        "in it; for generation set model.generation_config.eos_token_id = tokenizer.eos_token_id"]


def test_map_eos_token_false_keeps_eos_and_says_how_to_stop(notices):
    tok = make_tokenizer()
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    get_chat_template(tok, "gemma", map_eos_token=False)
    assert tok.eos_token == "</s>"
    assert notices == ["get_chat_template: 'gemma' turns end with '<end_of_turn>' but eos_token stays '</s>' "
                       "(map_eos_token=False); pass eos_token_id=tokenizer.convert_tokens_to_ids('<end_of_turn>') "
                       "to generate() so replies stop at the end of the turn"]


def test_eos_formats_leave_eos_alone_and_need_one(notices):
    tok = get_chat_template(make_tokenizer(), "alpaca")
    assert tok.eos_token == "</s>" and notices == []
    no_eos = make_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(VelotuneError, match="chat_template='mistral' ends turns with the EOS token, but the tokenizer "
                                            "has no eos_token; set one"):
        get_chat_template(no_eos, "mistral")


def test_system_message_default_override_and_none():
    conv = CONV[1:3]
    qwen = templated_tokenizer("qwen-2.5")
    assert qwen.apply_chat_template(conv, tokenize=False).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    assert qwen.apply_chat_template(CONV, tokenize=False).count("<|im_start|>system") == 1  # its own wins
    odd = "Sé 'brève' \\ \"ok\" 😀\nline two"
    for name in ("chatml", "llama-3", "gemma", "mistral", "alpaca", "zephyr", "phi-3", "vicuna"):
        tok = templated_tokenizer(name, system_message=odd)
        assert odd.strip() in tok.apply_chat_template(conv, tokenize=False), name
        assert default_system_of(tok.chat_template) == odd
    plain = templated_tokenizer("qwen-2.5", system_message="")
    assert plain.apply_chat_template(conv, tokenize=False).startswith("<|im_start|>user\n")
    with pytest.raises(VelotuneError, match="system_message must be a string or None, got int"):
        templated_tokenizer("chatml", system_message=3)


def test_mapping_reads_sharegpt_messages_directly():
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    mapped = templated_tokenizer("llama-3", mapping=mapping)
    plain = templated_tokenizer("llama-3")
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in CONV]
    expected = plain.apply_chat_template(CONV, tokenize=False)
    assert mapped.apply_chat_template(sharegpt, tokenize=False) == expected
    assert mapped.apply_chat_template(CONV, tokenize=False) == expected  # role/content still work
    with pytest.raises(VelotuneError, match=r"mapping has unknown keys \['speaker'\]; allowed: \['role', "):
        templated_tokenizer("chatml", mapping={"speaker": "from"})
    with pytest.raises(VelotuneError, match=r"mapping\['user'\] must be a non-empty string, got None"):
        templated_tokenizer("chatml", mapping={"user": None})
    with pytest.raises(VelotuneError, match="mapping must be a dict like"):
        templated_tokenizer("chatml", mapping=[("role", "from")])


def test_template_survives_save_and_load(tmp_path):
    tok = templated_tokenizer("vicuna", system_message="Custom system.")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert detect_chat_template(loaded.chat_template).name == "vicuna"
    assert default_system_of(loaded.chat_template) == "Custom system."
    assert loaded.apply_chat_template(CONV, tokenize=False) == tok.apply_chat_template(CONV, tokenize=False)


def test_detect_foreign_templates_by_markers():
    assert detect_chat_template("{{ '<|im_start|>' + m }}").name == "chatml"
    assert detect_chat_template("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.").name == "qwen-2.5"
    assert detect_chat_template("'<|assistant|>\n' + c + '<|end|>'").name == "phi-3"
    assert detect_chat_template("'<|assistant|>\n' + c + eos_token").name == "zephyr"
    assert detect_chat_template("{{ 'ASSISTANT: ' }}").name == "vicuna"
    assert detect_chat_template("{{ messages }}") is None and detect_chat_template(None) is None
    assert detect_chat_template({"default": "<|im_start|>"}) is None  # named templates: not guessed


@pytest.mark.parametrize("name", template_names())
def test_modelfile_uses_the_table(name):
    tok = templated_tokenizer(name)
    row = get_template(name)
    text = modelfile_text("m.gguf", tok)
    assert f"# Chat format: {name} (translated" in text
    assert f'TEMPLATE """{row.ollama_template(tok.eos_token)}"""' in text and "{eos_token}" not in text
    if row.default_system:
        assert f'SYSTEM """{row.default_system}"""' in text
    else:
        assert "SYSTEM" not in text
    for stop in (*row.stops, tok.eos_token):
        assert text.count(f"PARAMETER stop {stop!r}".replace("'", '"')) == 1


def test_modelfile_carries_a_custom_system_message():
    tok = templated_tokenizer("chatml", system_message='Say "hi" first.')
    assert 'SYSTEM """Say "hi" first."""' in modelfile_text("m.gguf", tok)
    tok = templated_tokenizer("chatml", system_message='Has """ inside')
    assert 'SYSTEM "Has \\"\\"\\" inside"' in modelfile_text("m.gguf", tok)


def test_the_incumbents_module_path_names_the_same_functions():
    """`from unsloth.chat_templates import ...` scripts switch by the package name alone."""
    import velotune
    from velotune import chat_templates

    for name in ("get_chat_template", "standardize_sharegpt", "train_on_responses_only"):
        assert getattr(chat_templates, name) is getattr(velotune, name)
    assert sorted(chat_templates.__all__) == ["get_chat_template", "standardize_sharegpt", "train_on_responses_only"]
