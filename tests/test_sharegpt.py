"""standardize_sharegpt: ShareGPT from/value -> role/content, on Datasets and lists, with clear errors."""
from __future__ import annotations

import pytest
from datasets import Dataset

from velotune import VelotuneError, standardize_sharegpt

SHAREGPT = [
    {"id": "a", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello!"}]},
    {"id": "b", "conversations": [{"from": "Human", "value": "2+2?"}, {"from": "GPT", "value": "4"},
                                  {"from": "user", "value": "Sure?"}, {"from": "assistant", "value": "Yes."}]},
]
EXPECTED = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Sure?"},
     {"role": "assistant", "content": "Yes."}],
]


def test_dataset_in_place_like_the_incumbent():
    out = standardize_sharegpt(Dataset.from_list(SHAREGPT))
    assert out.column_names == ["id", "conversations"]
    assert out["conversations"] == EXPECTED and out["id"] == ["a", "b"]


def test_dataset_to_messages_column():
    out = standardize_sharegpt(Dataset.from_list(SHAREGPT), output_column="messages")
    assert out.column_names == ["id", "messages"] and out["messages"] == EXPECTED


def test_lists_of_rows_and_of_conversations():
    rows = standardize_sharegpt(SHAREGPT)
    assert [r["conversations"] for r in rows] == EXPECTED and [r["id"] for r in rows] == ["a", "b"]
    assert SHAREGPT[0]["conversations"][0] == {"from": "system", "value": "Be brief."}  # input untouched
    assert standardize_sharegpt([r["conversations"] for r in SHAREGPT]) == EXPECTED


def test_role_variants_role_content_input_and_aliases():
    conv = [{"from": "prompter", "value": "q"}, {"from": "bot", "value": "a"}, {"from": "input", "value": "q2"},
            {"from": "output", "value": "a2"}, {"from": "model", "value": "a3"}, {"role": "human", "content": "q3"},
            {"from": "function_call", "value": "{}"}]
    out = standardize_sharegpt([conv], aliases={"function_call": "assistant"})[0]
    assert [m["role"] for m in out] == ["user", "assistant", "user", "assistant", "assistant", "user", "assistant"]
    with pytest.raises(VelotuneError, match="aliases maps role names to 'system', 'user', 'assistant' or 'tool'; "
                                            "got 'x': 'robot'"):
        standardize_sharegpt([conv], aliases={"x": "robot"})


def test_unknown_role_names_row_and_fix():
    rows = [SHAREGPT[0], {"conversations": [{"from": "human", "value": "q"}, {"from": "narrator", "value": "..."}]}]
    msg = (r"row 1, message 1: unknown role 'narrator'; known: \['assistant', 'bot', .*\]\. Map it with "
           r"aliases=\{'narrator': 'user'\} \(or 'assistant', 'system', 'tool'\)")
    with pytest.raises(VelotuneError, match=msg):
        standardize_sharegpt(Dataset.from_list(rows))
    with pytest.raises(VelotuneError, match=msg):
        standardize_sharegpt(rows)


@pytest.mark.parametrize("conversation,error", [
    ("hello", r"row 0: 'conversations' must be a list of messages, got str: 'hello'"),
    ([], r"row 0: 'conversations' is an empty conversation; filter such rows out first"),
    (["hi"], r"row 0, message 0: a message must be a dict with from/value \(or role/content\), got str: 'hi'"),
    ([{"value": "hi"}], r"row 0, message 0: a message needs exactly one role key of \['from', 'role'\], got "
                        r"\{'value': 'hi'\}"),
    ([{"from": "human", "role": "user", "value": "hi"}], r"needs exactly one role key of \['from', 'role'\]"),
    ([{"from": "human"}], r"row 0, message 0: a message needs exactly one content key of \['value', 'content'\]"),
    ([{"from": "human", "value": 3}], r"row 0, message 0: content must be a string, got int: 3"),
    ([{"from": 7, "value": "x"}], r"row 0, message 0: unknown role 7"),
])
def test_malformed_rows(conversation, error):
    with pytest.raises(VelotuneError, match=error):
        standardize_sharegpt([{"conversations": conversation}])


def test_dataset_level_errors():
    with pytest.raises(VelotuneError, match=r"the dataset has no 'conversations' column \(columns: \['messages'\]\); "
                                            "pass column= to name the one holding the conversations"):
        standardize_sharegpt(Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]]}))
    with pytest.raises(VelotuneError, match="row 1: expected a dict with a 'conversations' key"):
        standardize_sharegpt([SHAREGPT[0], {"text": "x"}])
    with pytest.raises(VelotuneError, match="standardize_sharegpt takes a datasets.Dataset or a list, got dict"):
        standardize_sharegpt({"conversations": []})


def test_mixed_key_styles_in_one_arrow_column():
    """Arrow fills the keys a message lacks with None: from/value and role/content rows can share a column."""
    rows = [{"c": [{"from": "human", "value": "q"}]}, {"c": [{"role": "assistant", "content": "a"}]}]
    out = standardize_sharegpt(Dataset.from_list(rows), column="c")
    assert out["c"] == [[{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}]]
