"""Prompt conversations of a data mixture's train split (or its test split), for sampling new responses (the generate
stage).

Each source is read through ``load_source`` (the same train split, fraction and carve-out as training uses: the test
split is the source's own, or the share training carves out of train), and each row's prompt becomes the message
list training renders for it (``prompt_messages``: the
chosen conversation without its last turn when it has earlier turns, else the prompt column, a string as
one user turn or a message list as it is). Prompts are de-duplicated (the official recipe samples the unique prompts).

A prompt's ``prompt_id`` is the source row's own where it has one (the hub's UltraFeedback sets do), else the hub's
rule for one: the SHA-256 of the prompt text (of the message list as JSON where the prompt has more than one turn),
so that generated pairs join back to the data they came from by id.
"""

from __future__ import annotations

import hashlib
import json

from simpo_exp.config import DatasetConfig
from simpo_exp.data.sources import (
    DataSourceError,
    _has_string_responses,
    load_source,
    not_utf8,
    prompt_messages,
    unknown_role,
)


def prompt_key(messages: list[dict]) -> str:
    """What tells two prompts apart: their whole message list (roles included)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def prompt_id(messages: list[dict], given=None) -> str:
    """The id a prompt goes by: ``given`` (the source row's ``prompt_id``) where it is a non-blank string, else the
    hub's UltraFeedback rule, the SHA-256 hex digest of the prompt string (one user turn), else ``prompt_key``."""
    if isinstance(given, str) and given.strip():
        return given
    if len(messages) == 1 and messages[0].get("role") == "user":
        return hashlib.sha256(messages[0]["content"].encode()).hexdigest()
    return prompt_key(messages)


def _row_prompt(row: dict, prompt_column: str, chosen_column: str) -> list[dict] | None:
    """The prompt training reads from the row (``prompt_messages``). None when there is none, or when a turn is
    not text or every turn is blank (rows training drops)."""
    messages = prompt_messages(row.get(prompt_column), row.get(chosen_column))
    texts = [m["content"] for m in messages or []]
    if not texts or not all(isinstance(t, str) for t in texts) or not any(t.strip() for t in texts):
        return None
    return messages


def train_prompts(dcfg: DatasetConfig) -> tuple[list[dict], dict]:
    """Return ([{"prompt_id", "prompt": messages}], counts) for the unique prompts of every source's
    train split, in source order (``dataset.max_train_samples`` is the caller's to apply: after its own
    filters, so that the cap is the number of prompts used)."""
    return split_prompts(dcfg, "train")


def split_prompts(dcfg: DatasetConfig, split: str) -> tuple[list[dict], dict]:
    """``train_prompts`` of the ``split`` training reads as train or as test."""
    out, seen, ids, counts = [], set(), set(), {"rows": 0, "duplicate prompt": 0, "no prompt": 0}
    for name, src in dcfg.sources.items():
        data = load_source(name, src, dcfg)[("train", "test").index(split)]
        has_chosen_messages = src.chosen_column in data.column_names and not _has_string_responses(data, src)
        if src.prompt_column not in data.column_names and not has_chosen_messages:
            raise DataSourceError(
                f"dataset.sources.{name} ({src.path}): missing column {src.prompt_column!r} (and no "
                f"{src.chosen_column!r} conversation to take the prompt from); the data has {data.column_names}. "
                f"Map it with dataset.sources.{name}.prompt_column."
            )
        wanted = (src.prompt_column, src.chosen_column, "prompt_id")
        data = data.select_columns([c for c in dict.fromkeys(wanted) if c in data.column_names])
        try:
            _add_prompts(data, src, out, seen, ids, counts)
        except UnicodeDecodeError as e:  # pyarrow reads bytes as they are: a non-UTF-8 one fails read back as text
            raise not_utf8(name, src, e) from None
    if not out:
        raise DataSourceError(
            f"no prompt found in the {split} split of {list(dcfg.sources)} (rows: {counts}); check "
            "dataset.sources.<name>.prompt_column / chosen_column"
        )
    return out, counts


def _add_prompts(data, src, out: list[dict], seen: set, ids: set, counts: dict) -> None:
    """Append the unique prompts of one source's split to ``out``, counting what is left out."""
    for row in data:
        counts["rows"] += 1
        messages = _row_prompt(row, src.prompt_column, src.chosen_column)
        if messages is None:
            counts["no prompt"] += 1
            continue
        if (role := unknown_role(messages)) is not None:
            reason = f"unknown role {role!r}"
            counts[reason] = counts.get(reason, 0) + 1
            continue
        key = prompt_key(messages)
        if key in seen:
            counts["duplicate prompt"] += 1
            continue
        seen.add(key)
        pid = prompt_id(messages, row.get("prompt_id"))
        if pid in ids:  # a source's id another prompt already goes by (two sources each numbering from 1)
            pid = key
        ids.add(pid)
        out.append({"prompt_id": pid, "prompt": messages})
