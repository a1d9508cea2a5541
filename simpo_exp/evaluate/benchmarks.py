"""Each benchmark's prompts (read from local files, never downloaded) and its output file format.

A prompt is ``{"id", "messages", "instruction", "reference"}``: ``messages`` is what the policy's chat
template renders, ``reference`` the baseline answer a pairwise judge compares against (None where
there is none).

- rule: the run's own held-out synthetic prompts ("sort: 3 1 2"), the same ones its eval split held;
- alpacaeval: alpaca_eval's evaluation set saved as JSON (a list of ``{instruction, output, generator,
  dataset}``, 805 rows for AlpacaEval 2); ``output`` is the reference answer of ``generator``;
- arena_hard: arena-hard-auto v0.1's ``question.jsonl`` (``question_id``, ``turns: [{content}]``, ...),
  and the baseline's answers in its ``model_answer`` format (``question_id``,
  ``choices: [{turns: [{content}]}]``) for the judge. v2's files (``uid``, ``prompt``, ``messages``) are
  refused with a message: this benchmark is judged as v0.1 judges.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from simpo_exp.config import ConfigError
from simpo_exp.data.sources import DataSourceError
from simpo_exp.inference.files import jsonl_lines
from simpo_exp.rundir import recorded_sources

ALPACA_COLUMNS = ("instruction", "output", "generator", "dataset")
ARENA_QUESTION = "arena-hard-auto v0.1's question.jsonl: question_id and turns[0].content, a string"
ARENA_ANSWER = "arena-hard-auto v0.1's model_answer format: question_id and choices[0].turns[0].content, a string"


def _read_json_file(path: str, key: str):
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataSourceError(
            f"{key}={path!r}: no such file. The evaluate stage downloads nothing: save the "
            "benchmark's data on this machine and give its path"
        )
    if p.suffix == ".jsonl":
        return _json_lines(p, path, key)
    text = _read_text(p, path, key)
    try:
        return json.loads(text)
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError) and e.msg == "Extra data":  # JSON lines under a .json name, as
            with contextlib.suppress(DataSourceError):  # datasets' to_json writes them by default
                return _json_lines(p, path, key)
        raise DataSourceError(f"{key}={path!r}: not valid JSON ({e})") from e


def _read_text(p: Path, path: str, key: str) -> str:
    """The file's text, or an error naming the line of its first byte that is not UTF-8."""
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataSourceError(
            f"{key}={path!r}: line {line} holds text that is not UTF-8 ({e}); re-encode the file"
        ) from None


def _json_lines(p: Path, path: str, key: str) -> list:
    rows = []  # each line parsed alone: the decoder's own position is always "line 1"
    for n, line in enumerate(jsonl_lines(_read_text(p, path, key)), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise DataSourceError(f"{key}={path!r}: line {n} is not valid JSON ({e})") from e
    return rows


def rule_prompts(run_cfg, limit: int | None, run_dir: str | Path | None = None) -> list[dict]:
    """The held-out prompts of the synthetic task the run's data came from: its own synthetic test split, or
    the task's test split where it trained on generate-stage pairs sampled from the task's prompts (read from the
    data's provenance.json, or from the copy the run kept in its data_report.json when the data has moved)."""
    from simpo_exp.data.sources import recorded_task, synthetic_task
    from simpo_exp.data.synthetic import generate

    task = synthetic_task(run_cfg.dataset)
    if task is None and run_dir is not None:
        task = recorded_task(list(recorded_sources(run_dir).values()))
    if task is None:
        sources = run_cfg.dataset.sources
        raise ConfigError(
            f"benchmark=rule scores the synthetic sort-digits task, but this run trained on "
            f"dataset={run_cfg.dataset.name!r} ({', '.join(sources)}), neither the task nor generate-stage data "
            "sampled from its prompts (no synthetic_task in a provenance.json); use benchmark=alpacaeval2, "
            "arena-hard or gsm8k for real data. Data from a generate stage older than the record of the task: run "
            "the same generate command again, into the same folder (it gives the same pairs and records the task)"
        )
    rows = generate(task)["test_prefs"][:limit]
    return [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": r["prompt"]}],
            "instruction": r["prompt"],
            "reference": None,
        }
        for i, r in enumerate(rows)
    ]


def alpaca_reference_rows(path: str, key: str) -> list:
    """The rows of an alpaca_eval evaluation set as read here (a JSON array, or JSON lines)."""
    return _read_json_file(path, key)


def alpaca_prompts(path: str, key: str, limit: int | None) -> tuple[list[dict], dict]:
    """Rows of an alpaca_eval evaluation set; returns (prompts, {"rows", "reference_generator", "dataset"})."""
    rows = _read_json_file(path, key)
    if not isinstance(rows, list) or not rows:
        raise DataSourceError(f"{key}={path!r}: expected a JSON list of rows with {list(ALPACA_COLUMNS)}")
    for i, row in enumerate(rows):
        bad = [c for c in ("instruction", "output") if not isinstance(row, dict) or not isinstance(row.get(c), str)]
        if bad:
            missing = isinstance(row, dict) and any(c not in row for c in bad)  # another schema's fields: named
            got = (
                f"keys {sorted(row)[:8]}"
                if missing
                else ", ".join(f"{c}={row.get(c)!r:.60}" for c in bad)
                if isinstance(row, dict)
                else f"{row!r:.60}"
            )
            raise DataSourceError(
                f"{key}={path!r}: row {i} ({got}): instruction and output must be strings "
                f"(alpaca_eval's schema: {list(ALPACA_COLUMNS)})"
            )
    info = {
        "rows": len(rows),
        "reference_generator": rows[0].get("generator", "reference"),
        "dataset": rows[0].get("dataset"),
    }
    prompts = [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": r["instruction"]}],
            "instruction": r["instruction"],
            "reference": r["output"],
            "dataset": r.get("dataset"),
        }
        for i, r in enumerate(rows[:limit])
    ]
    return prompts, info


def arena_prompts(path: str, reference_path: str, key: str, limit: int | None) -> tuple[list[dict], dict]:
    """arena-hard-auto questions (first turn), with the baseline's answer where one is given."""
    refs, baseline = {}, None
    if reference_path:
        answers = _arena_rows(
            reference_path, f"{key}.reference_path", ("choices", 0, "turns", 0, "content"), ARENA_ANSWER
        )
        refs = {str(qid): text for qid, text, _ in answers}  # 0 in one file, "0" in the other: the same question
        baseline = next((ans.get("model_id") for _, _, ans in reversed(answers) if ans.get("model_id")), None)
    rows = _arena_rows(path, f"{key}.prompts_path", ("turns", 0, "content"), ARENA_QUESTION)
    prompts = []
    for qid, text, q in rows[:limit]:
        if reference_path and str(qid) not in refs:
            raise DataSourceError(f"{key}.reference_path={reference_path!r}: no answer for question_id {qid!r}")
        prompts.append(
            {
                "id": str(qid),
                "messages": [{"role": "user", "content": text}],
                "instruction": text,
                "reference": refs.get(str(qid)),
                "category": q.get("category"),
            }
        )
    return prompts, {"rows": len(rows), "reference_generator": baseline or "baseline"}


def _arena_rows(path: str, key: str, text_at: tuple, schema: str) -> list[tuple]:
    """``(question_id, text, row)`` of an arena-hard-auto v0.1 file, the text at ``text_at`` in each row; a row
    without them is an error naming the file, the row and the ``schema``."""
    rows = _read_json_file(path, key)
    if not isinstance(rows, list) or not rows:  # an empty file: a benchmark of no question "finished" with n=0
        raise DataSourceError(f"{key}={path!r}: expected JSON lines, one row per question ({schema})")
    out, first_row = [], {}
    for i, row in enumerate(rows):
        qid, text = _dig(row, ("question_id",)), _dig(row, text_at)
        if not isinstance(qid, (str, int)) or not isinstance(text, str):
            fields = sorted(row) if isinstance(row, dict) else []
            v2 = (
                " (arena-hard-auto v2's uid/prompt/messages files are not read)"
                if {"uid", "prompt", "messages"} & set(fields)
                else ""
            )
            raise DataSourceError(f"{key}={path!r}: row {i} (keys {fields}) is not {schema}{v2}")
        # ids key the answers, the judgments and the resume: a repeated one (two files joined) would be judged once
        # and counted twice
        if str(qid) in first_row:
            raise DataSourceError(
                f"{key}={path!r}: row {i} repeats question_id {qid!r} of row {first_row[str(qid)]}; each question "
                "must have an id of its own"
            )
        first_row[str(qid)] = i
        out.append((qid, text, row))
    return out


def _dig(row, keys: tuple):
    """``row[k0][k1]...``, or None where a part is missing or of another type."""
    for k in keys:
        try:
            row = row[k]
        except (KeyError, IndexError, TypeError):
            return None
    return row


def alpaca_model_outputs(prompts: list[dict], outputs: list[str], generator: str) -> list[dict]:
    """alpaca-eval's ``model_outputs.json`` rows: instruction, output, generator, dataset."""
    return [
        {
            "instruction": p["instruction"],
            "output": o,
            "generator": generator,
            **({"dataset": p["dataset"]} if p.get("dataset") else {}),
        }
        for p, o in zip(prompts, outputs)
    ]


def arena_answers(prompts: list[dict], generations: list[dict], model_id: str) -> list[dict]:
    """arena-hard-auto's ``model_answer/<model>.jsonl`` rows."""
    now = time.time()
    return [
        {
            "question_id": p["id"],
            "answer_id": f"{model_id}-{p['id']}",
            "model_id": model_id,
            "choices": [{"index": 0, "turns": [{"content": g["text"], "token_len": g["n_tokens"]}]}],
            "tstamp": now,
        }
        for p, g in zip(prompts, generations)
    ]
