"""Send a run's evaluation results to the W&B run its training logged to (same id, so the same sweep group).

Training records its W&B run in ``<run>/wandb_run.json`` (``simpo_exp.tracking.WANDB_RECORD``: id,
project, entity, group, job type, name, mode). Here that run is opened again with ``wandb.init(id=...,
resume="allow")``; every benchmark's numbers go into its summary as ``bench/<benchmark>/<metric>`` (the
names compare and the dashboard use), and a few judged rows of each benchmark evaluated now (its answers
alone where it was not judged) as a ``wandb.Table`` (``bench/<benchmark>/samples``). The mode:
``WANDB_MODE`` when set (the user's word); else the run's own, except that an online run without
a W&B key (``tracking.wandb_key_given``) now goes offline. An offline
evaluation leaves a second ``offline-run-*-<id>`` folder under ``<run>/wandb/``; ``wandb sync`` uploads
the folders of one id to that one run, oldest first; a re-evaluation with nothing new to send (the same
results, benchmarks, run and mode as ``eval/wandb_sent.json`` records) opens no W&B run and adds no folder.
Runs with W&B off are left alone. As in
``Tracker``, a W&B failure is a warning: the results files are already written and stay the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

from simpo_exp.inference.files import write_json
from simpo_exp.inference.results import EVAL_DIR, PREFIX, load_results, read_results
from simpo_exp.rundir import read_json, read_json_value, read_jsonl
from simpo_exp.tracking import WANDB_RECORD, keyed_mode, open_wandb

log = logging.getLogger(__name__)
SAMPLE_ROWS = 8  # judged rows per benchmark in the table
SENT = f"{EVAL_DIR}/wandb_sent.json"  # what the last evaluation sent to W&B (``sent_record``)


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, stacklevel=3)


def wandb_mode(recorded: str) -> str:
    """The mode to reopen a run in: WANDB_MODE if set, else the run's; online only with a key."""
    return keyed_mode(os.environ.get("WANDB_MODE") or recorded)


def sample_rows(run_dir: Path, benchmark: str) -> tuple[list[str], list[list]]:
    """Columns and the first few rows of a benchmark's judged answers: generations.jsonl (the rule), the
    annotations alpaca-eval's own judge wrote (results.json's annotations_path), the pairwise judge's
    annotations.json, or Arena-Hard's judgments beside its answers; where nothing was judged, the answers alone."""
    out = Path(run_dir) / EVAL_DIR / benchmark
    results = read_json(out / "results.json")  # {} when missing
    package = results.get("annotations_path")
    rows = (
        read_jsonl(out / "generations.jsonl")
        or (_listed(Path(package)) if isinstance(package, str) else [])
        or _listed(out / "annotations.json")
        or arena_rows(out)
        or _listed(out / "model_outputs.json")
    )
    rows = [r for r in rows[:SAMPLE_ROWS] if isinstance(r, dict)]
    if not rows:
        return [], []
    columns = [k for k, v in rows[0].items() if isinstance(v, (str, int, float))]
    return columns, [[r.get(k) for k in columns] for r in rows]


def _listed(path: Path) -> list:
    """A JSON file's rows; [] when it is missing or holds no list."""
    found = read_json_value(path)  # None when missing
    return found if isinstance(found, list) else []


def arena_rows(out: Path) -> list[dict]:
    """Arena-Hard's answers with the judge's two verdict labels (game 1 shows the baseline's answer first, game 2 the
    model's), from ``model_answer/`` and the judgments ``results.json`` names; the answers alone where it was not
    judged."""
    results = read_json(out / "results.json")  # {} when missing
    judged = results.get("judgments_path")
    answers = {}
    for path in sorted((out / "model_answer").glob("*.jsonl")):
        for a in read_jsonl(path):
            if isinstance(a, dict):
                answers[a.get("question_id")] = a["choices"][0]["turns"][0]["content"]
    if not judged:
        return [{"question_id": q, "answer": a} for q, a in answers.items()]
    rows = []
    for j in read_jsonl(Path(judged)):
        if isinstance(j, dict) and isinstance(j.get("games"), list) and len(j["games"]) == 2:
            labels = [g.get("score") for g in j["games"]]
            rows.append({"question_id": j.get("question_id"), "answer": answers.get(j.get("question_id"), "")})
            rows[-1] |= {"verdict_baseline_first": labels[0] or "none", "verdict_model_first": labels[1] or "none"}
    return rows


def log_results(run_dir: Path, benchmarks: list[str], init_timeout: float = 30.0, trained_with_wandb=False) -> bool:
    """Add the run's ``bench/*`` numbers (and sample tables of ``benchmarks``) to its W&B run; True if sent."""
    record_path = Path(run_dir) / WANDB_RECORD
    if not record_path.is_file():
        if trained_with_wandb:
            _warn(
                f"{run_dir}: the run was set to log to W&B but recorded no run id ({WANDB_RECORD}: its W&B start "
                "failed or was disabled, or it was trained before the record was written); its evaluation results "
                "stay in eval/*/results.json, not on W&B"
            )
        return False
    try:
        rec = json.loads(record_path.read_text())
        mode = wandb_mode(rec.get("mode", "offline"))
        if mode == "disabled":
            return False
        samples = {b: sample_rows(run_dir, b) for b in sorted(benchmarks)}  # (columns, rows): hashed, then sent
        sent = sent_record(Path(run_dir), rec, mode, samples)
        if read_json(Path(run_dir) / SENT) == sent:
            log.info("%s: its evaluation is on W&B run %s (%s) as it is now; nothing sent", run_dir, rec["id"], mode)
            return True
        try:
            _send(Path(run_dir), rec, mode, samples, init_timeout)
        except Exception as e:  # no route to the server: an offline record of the run, sent later as training's is
            if mode != "online":
                raise
            _warn(
                f"{run_dir}: W&B online start failed ({type(e).__name__}: {e}); logging the evaluation offline "
                f"instead: send it later with `wandb sync {Path(run_dir) / 'wandb'}/offline-run-*`"
            )
            mode = sent["mode"] = "offline"
            _send(Path(run_dir), rec, mode, samples, init_timeout)
        write_json(Path(run_dir) / SENT, sent)
        return True
    except Exception as e:  # a W&B problem never fails the evaluation: its files are written
        _warn(f"{run_dir}: W&B logging of the evaluation failed ({type(e).__name__}: {e}); results kept on disk")
        return False


def sent_record(run_dir: Path, rec: dict, mode: str, samples: dict[str, tuple[list, list]]) -> dict:
    """What an evaluation sends to W&B, as ``SENT`` records it: the run id and mode, the benchmarks whose sample
    tables go (``samples``: each one's columns and rows, from ``sample_rows``), and a hash of every results.json
    (the summary's ``bench/*`` numbers come from them) and of those tables. The same record means nothing new to
    send. A results.json is hashed without the time it was written (``created``): each evaluation writes it again,
    one whose answers and verdicts were all kept as well, and its new time made every re-evaluation send the same
    numbers again (a W&B run reopened, an offline folder more)."""
    digest = hashlib.sha256()
    for path in sorted((Path(run_dir) / EVAL_DIR).glob("*/results.json")):
        results = read_json(path)
        results.pop("created", None)
        digest.update(path.parent.name.encode() + b"\0" + json.dumps(results, sort_keys=True).encode() + b"\0")
    for benchmark in sorted(samples):
        digest.update(json.dumps(samples[benchmark], sort_keys=True, default=str).encode() + b"\0")
    return {"id": rec.get("id"), "mode": mode, "benchmarks": sorted(samples), "results": digest.hexdigest()}


def bench_summary(run_dir: Path, benchmarks: list[str], held) -> dict:
    """The run's ``bench/*`` numbers for its W&B summary, and null for each key ``held`` there (the summary of the
    run it resumes) or named in results.json of a benchmark evaluated now that has no number now: a re-evaluation
    whose LC win rate was withheld left the earlier one on W&B (and on the dashboard, which ranks by it). A
    summary update only sets the keys it is given."""
    numbers = read_results(run_dir)
    records = load_results(run_dir)
    named = [f"{PREFIX}{b}/{name}" for b, record in records.items() for name in record.get("metrics") or {}]
    now = tuple(f"{PREFIX}{b}/" for b in benchmarks)
    gone = {k: None for k in [*named, *held] if k.startswith(now) and k not in numbers and not k.endswith("/samples")}
    return gone | numbers


def _send(run_dir: Path, rec: dict, mode: str, samples: dict[str, tuple[list, list]], init_timeout: float) -> None:
    import wandb

    run = open_wandb(
        run_dir,
        mode,
        init_timeout,
        id=rec["id"],
        resume="allow",
        project=rec.get("project"),
        entity=rec.get("entity"),
        group=rec.get("group"),
        job_type=rec.get("job_type"),
        name=rec.get("name"),
    )
    try:
        run.summary.update(bench_summary(run_dir, list(samples), run.summary.keys()))
        tables = {}
        for b, (columns, rows) in samples.items():
            if rows:
                tables[f"bench/{b}/samples"] = wandb.Table(columns=columns, data=rows)
        if tables:
            run.log(tables)
        log.info("evaluation of %s sent to W&B run %s (%s)", run_dir.name, rec["id"], mode)
    finally:
        run.finish()
