"""Each benchmark's prompts (read from local files, never downloaded) and its output file format.

A prompt is ``{"id", "messages", "instruction", "reference"}``: ``messages`` is what the policy's chat
template renders, ``reference`` the baseline answer a pairwise judge compares against (None where
there is none).

- rule: the run's own held-out synthetic prompts ("sort: 3 1 2"), the same ones its eval split held;
- alpacaeval: alpaca_eval's evaluation set saved as JSON (a list of ``{instruction, output, generator,
  dataset}``, 805 rows for AlpacaEval 2); ``output`` is the reference answer of ``generator``;
- arena_hard: arena-hard-auto's ``question.jsonl`` (``question_id``, ``turns: [{content}]``, ...), and
  the baseline's answers in its ``model_answer`` format for the judge.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from simpo_exp.config import ConfigError
from simpo_exp.data.sources import DataSourceError
from simpo_exp.inference.files import jsonl_lines

ALPACA_COLUMNS = ("instruction", "output", "generator", "dataset")


def _read_json_file(path: str, key: str):
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataSourceError(
            f"{key}={path!r}: no such file. The evaluate stage downloads nothing: save the "
            "benchmark's data on this machine and give its path"
        )
    try:
        if p.suffix == ".jsonl":
            return [json.loads(line) for line in jsonl_lines(p.read_text()) if line.strip()]
        return json.loads(p.read_text())
    except ValueError as e:
        raise DataSourceError(f"{key}={path!r}: not valid JSON{'L' if p.suffix == '.jsonl' else ''} ({e})") from e


def rule_prompts(run_cfg, limit: int | None) -> list[dict]:
    """The run's synthetic test split; a run trained on other data has no rule to judge by."""
    from simpo_exp.data.synthetic import generate

    sources = run_cfg.dataset.sources
    if not any(s.format == "synthetic" or s.path == "synthetic" for s in sources.values()):
        raise ConfigError(
            f"benchmark=rule scores the synthetic sort-digits task, but this run trained on "
            f"dataset={run_cfg.dataset.name!r} ({', '.join(sources)}); use benchmark=alpacaeval2, "
            "arena-hard or gsm8k for real data"
        )
    rows = generate(run_cfg.dataset.synthetic)["test_prefs"][:limit]
    return [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": r["prompt"]}],
            "instruction": r["prompt"],
            "reference": None,
        }
        for i, r in enumerate(rows)
    ]


def alpaca_prompts(path: str, key: str, limit: int | None) -> tuple[list[dict], dict]:
    """Rows of an alpaca_eval evaluation set; returns (prompts, {"rows", "reference_generator", "dataset"})."""
    rows = _read_json_file(path, key)
    if not isinstance(rows, list) or not rows:
        raise DataSourceError(f"{key}={path!r}: expected a JSON list of rows with {list(ALPACA_COLUMNS)}")
    for i, row in enumerate(rows):
        missing = [c for c in ("instruction", "output") if not isinstance(row, dict) or c not in row]
        if missing:
            raise DataSourceError(
                f"{key}={path!r}: row {i} has no {missing} (alpaca_eval's schema: {list(ALPACA_COLUMNS)})"
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
    rows = _read_json_file(path, f"{key}.prompts_path")
    refs, baseline = {}, None
    if reference_path:
        for ans in _read_json_file(reference_path, f"{key}.reference_path"):
            refs[ans["question_id"]] = ans["choices"][0]["turns"][0]["content"]
            baseline = ans.get("model_id", baseline)
    prompts = []
    for i, q in enumerate(rows[:limit]):
        if "question_id" not in q or not q.get("turns"):
            raise DataSourceError(
                f"{key}.prompts_path={path!r}: row {i} lacks question_id or turns "
                "(arena-hard-auto's question.jsonl schema)"
            )
        if reference_path and q["question_id"] not in refs:
            raise DataSourceError(
                f"{key}.reference_path={reference_path!r}: no answer for question_id {q['question_id']!r}"
            )
        text = q["turns"][0]["content"]
        prompts.append(
            {
                "id": str(q["question_id"]),
                "messages": [{"role": "user", "content": text}],
                "instruction": text,
                "reference": refs.get(q["question_id"]),
                "category": q.get("category"),
            }
        )
    return prompts, {"rows": len(rows), "reference_generator": baseline or "baseline"}


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
