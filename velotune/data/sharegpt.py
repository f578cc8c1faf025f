"""ShareGPT conversations -> the role/content messages chat templates read.

ShareGPT rows hold ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}``;
``apply_chat_template`` wants ``[{"role": "user", "content": "..."}, {"role": "assistant", ...}]``.
``standardize_sharegpt`` rewrites the column in place, as the incumbent's does, so the usual next
step runs unchanged::

    dataset = standardize_sharegpt(dataset)
    dataset = dataset.map(lambda b: {"text": [tokenizer.apply_chat_template(c, tokenize=False)
                                              for c in b["conversations"]]}, batched=True)

(or ``standardize_sharegpt(dataset, output_column="messages")`` and give the dataset to SFTTrainer as
it is: TRL applies the chat template to a ``messages`` column itself).
"""
from __future__ import annotations

from datasets import Value

from .._notices import VelotuneError

# Role names seen in ShareGPT-style datasets, lower-cased -> the standard role.
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "user", "user": "user", "input": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "output": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
}
_ROLE_KEYS = ("from", "role")
_CONTENT_KEYS = ("value", "content")


def _role_table(aliases: dict | None) -> dict[str, str]:
    table = dict(ROLE_ALIASES)
    for k, v in (aliases or {}).items():
        if not isinstance(k, str) or v not in ("system", "user", "assistant", "tool"):
            raise VelotuneError(f"aliases maps role names to 'system', 'user', 'assistant' or 'tool'; got {k!r}: {v!r}")
        table[k.lower()] = v
    return table


def _pick(message: dict, keys: tuple[str, str], what: str, where: str):
    # Arrow stores a list of structs with the union of the keys, None where a message lacks one.
    found = [k for k in keys if message.get(k) is not None]
    if len(found) != 1:
        given = {k: v for k, v in message.items() if v is not None}
        raise VelotuneError(f"{where}: a message needs exactly one {what} key of {list(keys)}, got "
                            f"{given!r:.120}")
    return message[found[0]]


def _convert(conversation, index: int, column: str, roles: dict[str, str]) -> list[dict]:
    where = f"row {index}"
    if not isinstance(conversation, (list, tuple)):
        raise VelotuneError(f"{where}: {column!r} must be a list of messages, got {type(conversation).__name__}: "
                            f"{conversation!r:.80}")
    if not conversation:
        raise VelotuneError(f"{where}: {column!r} is an empty conversation; filter such rows out first")
    out = []
    for j, message in enumerate(conversation):
        at = f"{where}, message {j}"
        if not isinstance(message, dict):
            raise VelotuneError(f"{at}: a message must be a dict with from/value (or role/content), got "
                                f"{type(message).__name__}: {message!r:.80}")
        role = _pick(message, _ROLE_KEYS, "role", at)
        content = _pick(message, _CONTENT_KEYS, "content", at)
        if not isinstance(role, str) or role.lower() not in roles:
            raise VelotuneError(f"{at}: unknown role {role!r}; known: {sorted(roles)}. Map it with "
                                f"aliases={{{role!r}: 'user'}} (or 'assistant', 'system', 'tool')")
        if not isinstance(content, str):
            raise VelotuneError(f"{at}: content must be a string, got {type(content).__name__}: {content!r:.80}")
        out.append({"role": roles[role.lower()], "content": content})
    return out


def standardize_sharegpt(dataset, *, column: str = "conversations", output_column: str | None = None,
                         aliases: dict[str, str] | None = None, num_proc: int | None = None):
    """ShareGPT ``from``/``value`` messages -> ``role``/``content`` with roles system/user/assistant.

    Args:
        dataset: a ``datasets.Dataset`` / ``IterableDataset`` (converted with a batched ``map``), a list of
            rows (dicts holding ``column``), or a list of conversations (lists of messages).
        column: the column holding the conversations.
        output_column: where to write the result (default: ``column``, replaced in place, as the incumbent
            does). A different name removes ``column``.
        aliases: extra role names, e.g. ``{"function_call": "assistant"}``. Built in (case-insensitive):
            human/user/input/prompter -> user, gpt/assistant/output/model/bot/chatgpt -> assistant,
            system, tool. Messages already in role/content form are accepted (and their roles normalised).
        num_proc: processes for ``Dataset.map``.

    Each message keeps only its role and content. A row that is not a list of messages, a message without
    exactly one role key (from/role) and one content key (value/content), a non-string content, or an unknown
    role raises ``VelotuneError`` naming the row (0-based) and the message.
    """
    roles = _role_table(aliases)
    out_col = output_column or column
    if isinstance(dataset, (list, tuple)):
        return _standardize_list(dataset, column, out_col, roles)
    names = getattr(dataset, "column_names", None)
    if names is None or not hasattr(dataset, "map"):
        raise VelotuneError(f"standardize_sharegpt takes a datasets.Dataset or a list, got {type(dataset).__name__}")
    if column not in names:
        raise VelotuneError(f"the dataset has no {column!r} column (columns: {names}); pass column= to name the "
                            "one holding the conversations")

    def convert_batch(batch, indices):
        return {out_col: [_convert(c, i, column, roles) for c, i in zip(batch[column], indices)]}

    kwargs = dict(batched=True, with_indices=True, remove_columns=[column])
    features = getattr(dataset, "features", None)
    if features is not None:
        # Spelled out: written in place, the column would otherwise keep the old message type's keys
        # (from/value) as None-filled fields.
        features = features.copy()
        del features[column]
        features[out_col] = [{"role": Value("string"), "content": Value("string")}]
        kwargs["features"] = features
    if num_proc is not None:
        kwargs["num_proc"] = num_proc
    return dataset.map(convert_batch, **kwargs)


def _standardize_list(rows, column: str, out_col: str, roles: dict[str, str]) -> list:
    if rows and isinstance(rows[0], (list, tuple)):  # a list of conversations
        return [_convert(c, i, column, roles) for i, c in enumerate(rows)]
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or column not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise VelotuneError(f"row {i}: expected a dict with a {column!r} key (or a list of messages), got {keys}")
        new = {k: v for k, v in row.items() if k != column}
        new[out_col] = _convert(row[column], i, column, roles)
        out.append(new)
    return out
