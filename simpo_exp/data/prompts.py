"""Prompt conversations of a data mixture's TRAIN split, for sampling new responses (the generate stage).

Each source is read through ``load_source`` (the same train split, fraction and carve-out as training
uses), and each row's prompt becomes a message list: the prompt column as one user turn when it holds
a string, the column itself when it holds messages, else the chosen conversation without its last
(assistant) turn. Prompts are de-duplicated (the official recipe samples the unique prompts).
"""

from __future__ import annotations

import hashlib
import json

from simpo_exp.config import DatasetConfig
from simpo_exp.data.sources import DataSourceError, _has_string_responses, _is_messages, load_source


def prompt_id(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def _row_prompt(row: dict, prompt_column: str, chosen_column: str) -> list[dict] | None:
    value = row.get(prompt_column)
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if _is_messages(value) and value:
        return [{"role": m.get("role"), "content": m.get("content")} for m in value]
    chosen = row.get(chosen_column)
    if _is_messages(chosen) and len(chosen) > 1:
        return [{"role": m.get("role"), "content": m.get("content")} for m in chosen[:-1]]
    return None


def train_prompts(dcfg: DatasetConfig) -> tuple[list[dict], dict]:
    """Return ([{"prompt_id", "prompt": messages}], counts) for the unique prompts of every source's
    train split, in source order; ``dataset.max_train_samples`` caps the count."""
    out, seen, counts = [], set(), {"rows": 0, "duplicate prompt": 0, "no prompt": 0}
    for name, src in dcfg.sources.items():
        train, _ = load_source(name, src, dcfg)
        has_chosen_messages = src.chosen_column in train.column_names and not _has_string_responses(train, src)
        if src.prompt_column not in train.column_names and not has_chosen_messages:
            raise DataSourceError(
                f"dataset.sources.{name} ({src.path}): missing column {src.prompt_column!r} (and no "
                f"{src.chosen_column!r} conversation to take the prompt from); the data has {train.column_names}. "
                f"Map it with dataset.sources.{name}.prompt_column."
            )
        train = train.select_columns([c for c in (src.prompt_column, src.chosen_column) if c in train.column_names])
        for row in train:
            counts["rows"] += 1
            messages = _row_prompt(row, src.prompt_column, src.chosen_column)
            if messages is None:
                counts["no prompt"] += 1
                continue
            pid = prompt_id(messages)
            if pid in seen:
                counts["duplicate prompt"] += 1
                continue
            seen.add(pid)
            out.append({"prompt_id": pid, "prompt": messages})
    if dcfg.max_train_samples is not None:
        out = out[: dcfg.max_train_samples]
    if not out:
        raise DataSourceError(
            f"no prompt found in the train split of {list(dcfg.sources)} (rows: {counts}); check "
            "dataset.sources.<name>.prompt_column / chosen_column"
        )
    return out, counts
