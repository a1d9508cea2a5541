"""Compare finished, failed and running jobs from run and sweep directories: a ranked table and PNG plots.

    python -m simpo_exp.compare outputs/multirun/2025-01-01_12-00-00
    python -m simpo_exp.compare RUN_OR_SWEEP [...] --metric eval/loss --out /tmp/plots --no-plots

Each PATH may be one run directory, a sweep directory (one job per subdirectory) or any folder
holding them (``outputs`` compares everything). A job is *done* when it wrote ``summary.json``,
*failed* when it wrote ``error.json``, *stopped* when it left at a stop signal (``stopped.json``, its checkpoint
saved), *killed* when it ended without writing any of these (out of memory, ``kill -9``): its lock on the folder
is free and names this machine; and *running* otherwise (this includes a job of another machine killed so).
Jobs are told apart by their *swept values*: the overrides whose value differs between jobs (all overrides when
there is only one job).

The same functions serve the notebook ``notebooks/compare_runs.ipynb``:
``load_runs(paths)``, ``label_runs(runs)``, ``runs_table(runs, metric)``, ``format_table(...)``,
``figure(runs, family, metric)``, ``plot_runs(runs, out_dir, metric)``, ``seed_groups(runs, metric)`` and
``last_generations(runs, count)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import yaml

from simpo_exp.inference.results import (
    answer_decoding,
    headline_keys,
    is_bench_metric,
    is_lower_score,
    is_standard_error,
    read_results,
    uncertainty_keys,
)
from simpo_exp.methods import METHODS
from simpo_exp.rundir import (
    REFUSED_FILE,
    RESUMABLE_CHANGES,
    RUN_RECORDS,
    RUN_SEARCH_DEPTH,
    STOPPED_FILE,
    checkpoint_dirs,
    ended_unrecorded,
    failure_record,
    folder_to_name,
    jobs_asked,
    natural_order,
    other_stage_output,
    parse_overrides,
    read_json,
    read_jsonl,
    read_yaml,
    records_dir,
    shell_override,
    split_outside,
    step_of,
    stopped_words,
    sweep_dir_of,
)
from simpo_exp.tracking import (
    CONDITIONAL_METRICS,
    ERROR_SUMMARY,
    HEADLINE_METRICS,
    PAIR_METRICS,
    SAMPLES_KEY,
    STEP_KEY,
    STOPPED_SUMMARY,
    config_leaves,
    differing_keys,
    eval_keys,
    logged_value,
    train_keys,
)

DEFAULT_METRIC = "eval/rewards/accuracies"
# Columns of the table, in order (the same headline numbers train.py prints at the end of a run).
TABLE_METRICS = HEADLINE_METRICS


@dataclass(frozen=True)
class Family:
    """One figure: these per-pair metrics, a train panel and an eval panel."""

    slug: str  # file name
    title: str
    metrics: tuple[str, ...]  # names from tracking.PAIR_METRICS
    better: str | None = None  # "higher" / "lower": said in the title
    reference: float | None = None  # a dotted horizontal line (chance, zero margin)


FAMILIES = (
    Family("rewards_margins", "Reward margin (chosen - rejected)", ("rewards/margins",), "higher", 0.0),
    Family(
        "rewards_accuracies",
        "Reward accuracy (share of pairs with chosen reward > rejected)",
        ("rewards/accuracies",),
        "higher",
        0.5,
    ),
    Family(
        "logps",
        "Mean log-prob per token: chosen (solid) and rejected (dashed)",
        ("logps_mean/chosen", "logps_mean/rejected"),
    ),
    Family("loss", "Training objective (the method's loss + sft_weight x NLL)", ("loss",), "lower"),
)
# the loop's metrics, its counters, and the numbers summary.json adds: the run's wall time, the compile steps'
KNOWN_METRICS = (
    train_keys(METHODS)
    + eval_keys(METHODS)
    + [STEP_KEY, SAMPLES_KEY, "runtime_s", "train/compile_warmup_s", "train/compile_warmup_steps"]
    + ["train/compile_graphs"]
)
assert all(m in PAIR_METRICS for fam in FAMILIES for m in fam.metrics)
assert set(TABLE_METRICS) <= set(KNOWN_METRICS)

SKIP_DIRS = {"compare", "model", "wandb", ".hydra"}


# ----------------------------------------------------------------------------- one run
@dataclass
class Run:
    """What a job left behind. ``history`` is the list of metrics.jsonl records, each with "step"."""

    name: str
    status: str  # "done" | "failed" | "stopped" (left at a stop signal, resumable) | "killed" (no record) | "running"
    path: Path | None = None
    overrides: dict[str, str] = field(default_factory=dict)  # "key=value" from the command line
    config: dict = field(default_factory=dict)  # the composed config (nested)
    choices: dict[str, str] = field(default_factory=dict)  # config-group choices (model=tiny, ...)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    error: str | None = None
    bench: dict[str, float] = field(default_factory=dict)  # evaluate stage: "bench/<benchmark>/<metric>"
    swept: dict[str, str] = field(default_factory=dict)  # filled by label_runs
    label: str = ""  # filled by label_runs
    records: Path | None = None  # where the run wrote its records and results, where not ``path`` (output_dir=...)

    @property
    def wrote_in(self) -> Path | None:
        """The folder of the run's records (summary, generations, eval/): ``records``, else its Hydra folder."""
        return self.records or self.path

    def final(self, key: str) -> float | None:
        """The run's final value of a metric: summary.json, else the last one logged; NaN or infinite where that
        one was (a diverged run is not given an earlier, finite value)."""
        if key in self.summary and (_is_number(v := self.summary[key]) or isinstance(v, float)):
            return float(v)
        if key in self.bench:
            return self.bench[key]
        logged = [logged_value(r[key]) for r in self.history if key in r and "step" in r]
        return next((v for v in reversed(logged) if v is not None), None)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """The steps and finite values logged of ``key`` (a plot leaves the non-finite out)."""
        points = [(r["step"], v) for r in self.history if "step" in r and _is_number(v := logged_value(r.get(key)))]
        return [s for s, _ in points], [v for _, v in points]

    def value_of(self, key: str):
        """A hyperparameter's value for this run: its override, else its config (a null the run resolved, such as
        ``learning_rate`` from the model's size, as ``summary.json``'s ``resolved/<key>`` records it), else its
        group choice, else a value resolved at launch (``effective_batch_size``)."""
        if key in self.overrides:
            return self.overrides[key]
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:  # a group choice, or a value resolved at launch
                return self.choices[key] if key in self.choices else self.summary.get(f"resolved/{key}")
            node = node[part]
        if node is None:
            return self.summary.get(f"resolved/{key}")
        return self.choices.get(key) if isinstance(node, (dict, list)) else node  # `dataset`: its group choice

    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.history if "step" in r]
        return max(steps) if steps else None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def rerun_its_command(hydra_cfg: dict, folder: Path) -> str:
    """How to go on in a run's folder, from its hydra.yaml: "re-run its command" where the command named the folder
    (``hydra.run.dir``, a sweep's ``hydra.sweep.dir``), else with that folder added (``rundir.folder_to_name``, as
    ``rerun_command``: a default folder is named after the time its command started, so the same command alone
    starts afresh)."""
    hydra = hydra_cfg.get("hydra") if isinstance(hydra_cfg.get("hydra"), dict) else None
    if hydra is None:
        return "re-run its command"
    sweep = str(hydra.get("mode")) == "MULTIRUN"
    key = folder_to_name(sweep, (hydra.get("overrides") or {}).get("hydra") or [])
    where = (sweep_dir_of(folder, hydra) if sweep else folder).resolve()  # hydra.sweep.subdir below the sweep's
    ran_in = (hydra.get("runtime") or {}).get("output_dir")
    if key is None and not sweep and ran_in and Path(ran_in).resolve() != Path(folder).resolve():  # moved since:
        key = "hydra.run.dir"  # its command names the folder it ran in, not this one
    if key is None:
        return "re-run its command"
    return f"re-run its command with {shell_override(key, str(where))}"


def load_run(path: str | Path) -> Run:
    """A run from its folder: Hydra's records (``.hydra/``) there, the run's own where it wrote them (``output_dir``,
    when given, moves them). A job refused as another run's folder leaves ``refused.json`` in its own folder: where
    that folder holds no run of its own records (the job wrote elsewhere), the job is listed as failed, saying why."""
    path = hydra_dir = Path(path)
    config = read_yaml(path / ".hydra" / "config.yaml") or {}
    refused = path / REFUSED_FILE
    own = any((path / name).exists() for name in RUN_RECORDS)
    if refused.exists() and not own:  # refused, and nothing of its own here: why, as its error
        error = read_json(refused)
    else:
        path = records_dir(path)  # output_dir=...: its records are there
        error = failure_record(path)  # another process's failure too (its stop record was the launcher's SIGTERM)
    summary = read_json(path / "summary.json")
    started = read_json(path / "env.json")  # what its start resolved (a preset's learning rate from the model's
    resolved = started.get("resolved")  # size): a killed or running run has
    for key, value in (resolved if isinstance(resolved, dict) else {}).items():  # no summary of its own yet
        summary.setdefault(f"resolved/{key}", value)
    stopped = read_json(path / STOPPED_FILE) if (path / STOPPED_FILE).exists() else None
    status = (
        "failed"
        if error is not None
        else "done"
        if (path / "summary.json").exists()
        else "stopped"
        if stopped is not None
        else "killed"
        if ended_unrecorded(path)
        else "running"
    )
    overrides = read_yaml(hydra_dir / ".hydra" / "overrides.yaml") or (error or {}).get("overrides") or []
    hydra_cfg = read_yaml(hydra_dir / ".hydra" / "hydra.yaml") or {}
    choices = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    message = None
    if error is not None:
        first_line = (str(error.get("error") or "").strip().splitlines() or [""])[0]
        message = f"{error.get('type', 'Error')}: {first_line}"
    elif status == "stopped":
        message = f"stopped by {stopped_words(stopped)}; {rerun_its_command(hydra_cfg, hydra_dir)} to resume"
    elif status == "killed":
        saved = checkpoint_dirs(path)
        if not saved:
            then = "start it again (no checkpoint was saved)"
        elif config.get("resume", True):
            then = f"resume from step {step_of(saved[-1])}"
        else:
            then = "start it again (it ran with resume=false)"
        rerun = rerun_its_command(hydra_cfg, hydra_dir)
        message = f"ended without a record (killed: out of memory, kill -9?); {rerun} to {then}"
    return Run(
        name=hydra_dir.name,
        status=status,
        path=hydra_dir,
        overrides=_as_ran(parse_overrides(overrides), path),
        config=config,
        choices=dict(choices),
        summary=summary,
        history=read_jsonl(path / "metrics.jsonl"),
        error=message,
        bench=read_results(path),
        records=path if path != hydra_dir else None,
    )


def _as_ran(overrides: dict[str, str], path: Path) -> dict[str, str]:
    """``overrides`` with each interpolation (``beta=${oc.env:BETA}``) replaced by the value the run resolved it to,
    where its ``finished.json`` records it: the text alone would make runs of different values look alike."""
    ran = read_json(path / "finished.json").get("config")  # of another shape (a list): nothing resolved read
    out = dict(overrides)
    for key, value in overrides.items():
        node = ran
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if "${" in value and node is not None and not isinstance(node, (dict, list)):
            out[key] = str(node)
    return out


# W&B's run states as compare's statuses. "crashed": W&B stopped hearing from the run (out of memory, kill -9, a lost
# machine); "killed": stopped from outside, W&B's UI included. A run left at a stop signal exits with 128 + the
# signal's number, so W&B says "failed": its summary's ``stopped`` tells it apart (see ``wandb_status``).
WANDB_STATES = {
    "finished": "done",
    "running": "running",
    "pending": "running",
    "preempting": "running",
    "preempted": "killed",  # its scheduler took the machine back (after wandb.mark_preempting): resumable
    "crashed": "killed",
    "killed": "killed",
    "failed": "failed",
}  # a state W&B adds later reads as failed: said, not ranked among the finished


def wandb_status(state: str, summary: dict) -> str:
    """A W&B run's compare status from its ``state`` and ``summary``."""
    status = WANDB_STATES.get(state, "failed")
    if status in ("failed", "killed") and summary.get(STOPPED_SUMMARY):
        return "stopped"
    return status


def wandb_run(r) -> Run:
    """A run of W&B's public API (``wandb.Api().runs(...)``) as compare's ``Run``: its logged history on the
    ``train/global_step`` axis, config, summary, and the overrides its name carries (a sweep job is named by them,
    ``beta=5,seed=1``)."""
    summary = dict(r.summary)
    status = wandb_status(r.state, summary)
    # one row a step, the last logged: a resumed offline run's W&B folders repeat the steps past its checkpoint
    # (metrics.jsonl is trimmed; the synced history is not), and a curve then doubled back on itself
    rows: dict[int, dict] = {}
    for row in r.scan_history():
        if row.get(STEP_KEY) is not None:
            # a key not logged at that row may come back as None (a logged NaN comes back as NaN): not a value
            rows.setdefault(int(row[STEP_KEY]), {}).update({k: v for k, v in row.items() if "/" in k and v is not None})
    history = [{"step": step, **row} for step, row in sorted(rows.items())]
    message = {
        "stopped": f"stopped by {summary.get(STOPPED_SUMMARY)}; re-run its command to resume",
        "killed": (
            "preempted by its scheduler"
            if r.state == "preempted"
            else f"W&B lost it ({r.state}: out of memory, kill -9?)"
        )
        + "; re-run its command (it resumes from its last checkpoint, if one was saved)",
        # its error as the run recorded it ("NonFiniteError: ...": a diverged seed, _failed_seeds), where it did
        "failed": summary.get(ERROR_SUMMARY) or "failed (its run directory's error.json says why)",
    }.get(status)
    overrides = dict(kv.split("=", 1) for kv in name_parts(r.name or "") if "=" in kv)
    bench = {k: float(v) for k, v in summary.items() if is_bench_metric(k) and _is_number(v)}  # evaluate's numbers
    return Run(
        r.name, status, config=dict(r.config), overrides=overrides, summary=summary, history=history, error=message,
        bench=bench,
    )  # fmt: skip


def notes(runs: list[Run], metric: str) -> list[str]:
    """What the table alone does not say, as the command prints it below the table (the notebook too): jobs a
    sweep never started, runs of different methods ranked on one metric, answers a judge has not yet judged,
    benchmark numbers measured with different settings."""
    out = [n for n in [*unstarted_jobs(runs), mixed_methods_note(runs, metric), awaiting_judge_note(runs)] if n]
    out += [n for n in [skipped_steps_note(runs)] if n]
    for bench, differ in mixed_bench_settings(runs).items():
        starts = any(d.startswith("start_weights:") for d in differ)  # the rule benchmark's own baselines
        out.append(
            f"bench/{bench}/* was measured with different settings ({'; '.join(differ)}): "
            "these runs' numbers do not compare; evaluate them alike"
            + (f" (bench/{bench}/score is measured against no starting model)" if starts else "")
        )
    return out


def skipped_steps_note(runs: list[Run]) -> str | None:
    """The runs that skipped optimizer steps (a loss or gradient that was not finite): listed "done" like the
    others, they made fewer updates than their settings say."""
    hit = []
    for r in runs:
        skipped, steps = r.final("train/skipped_steps"), r.final("train/global_step")
        if skipped:
            hit.append(f"{r.label or r.name} ({int(skipped)}" + (f" of {int(steps)})" if steps else ")"))
    if not hit:
        return None
    return (
        f"{len(hit)} run(s) skipped steps whose loss or gradient was not finite, so made fewer updates than their "
        f"settings say (train/skipped_steps): {', '.join(hit)}"
    )


def name_parts(name: str) -> list[str]:
    """A run name's overrides (``runinfo.run_name`` joins them with commas), split at the commas outside brackets
    and quotes: ``dataset=[a,b],seed=1`` is two overrides, not three (a plain split made every mixture's dataset
    ``[a``, and runs on different data pooled as seeds of one setting)."""
    return split_outside(name)


def unstarted_jobs(runs: list[Run]) -> list[str]:
    """A note per sweep whose folder holds fewer jobs than it asked for: the sweep itself stopped (killed, out of
    memory) before the others started, and the table would look complete."""
    notes = []
    sweeps = {r.path: sweep_dir_of(r.path) for r in runs if r.path is not None}  # nested b${beta}/s${seed}: 2 up
    for sweep in dict.fromkeys(sweeps.values()):
        asked = jobs_asked(sweep)
        if asked is None:
            continue
        # the folders on disk, not the runs given: compare given some of a sweep's jobs (sweep/0_*) is not told the
        # others never started
        given = {path.resolve(): r for r in runs if (path := r.path) is not None and sweeps[path] == sweep}
        depth = max((len(path.relative_to(sweep).parts) for path in sweeps if sweeps[path] == sweep), default=1)
        jobs = [given.get(d.resolve()) or replace(load_run(d), name=d.name) for d in find_run_dirs(sweep, depth=depth)]
        found, running = len(jobs), [r.name for r in jobs if r.status == "running"]
        if found < asked and running:  # the sweep is still at work: its later jobs are to come
            notes.append(f"{sweep}: {found} of the sweep's {asked} jobs have a folder so far; {running[0]} is running")
        elif found < asked:
            notes.append(
                f"{sweep}: {found} of the sweep's {asked} jobs have a folder; the others never started (the sweep "
                f"stopped first): re-run its command with hydra.sweep.dir={sweep} (finished jobs return their "
                "results without training, unfinished ones resume)"
            )
    return notes


def wandb_runs(api_runs) -> list[Run]:
    """W&B runs (e.g. ``wandb.Api().runs("entity/project", filters={"group": group})``), labelled by what differs."""
    return label_runs([wandb_run(r) for r in api_runs])


# ----------------------------------------------------------------------------- finding runs
def is_run_dir(path: Path) -> bool:
    found = (path / ".hydra").is_dir() or (path / "metrics.jsonl").exists() or (path / "error.json").exists()
    return found and not other_stage_output(path)  # outputs/generate, outputs/evaluate: not training runs


def find_run_dirs(path: str | Path, depth: int = RUN_SEARCH_DEPTH) -> list[Path]:
    """Run directories at or below ``path`` (a run, a sweep, or a folder of either), jobs in number order."""
    path = Path(path)
    if is_run_dir(path):
        return [path]
    if depth == 0 or not path.is_dir():
        return []
    children = sorted((p for p in path.iterdir() if p.is_dir() and p.name not in SKIP_DIRS), key=natural_order)
    return [run for child in children for run in find_run_dirs(child, depth - 1)]


def load_runs(paths: list[str | Path] | str | Path) -> list[Run]:
    """Load every run under ``paths`` and label each one by its swept values."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    dirs: list[Path] = []
    for p in paths:
        for d in find_run_dirs(p):
            if d.resolve() not in {x.resolve() for x in dirs}:
                dirs.append(d)
    runs = [load_run(d) for d in dirs]
    _short_names(runs)
    return label_runs(runs)


def _short_names(runs: list[Run]) -> None:
    """Name each run by its path below the runs' common folder, a job dir by its number (``3``, ``sweepA/3``),
    or by its whole folder name where numbers repeat (two sweeps run into one folder: ``0_beta=2``, ``0_beta=4``)."""
    placed = [r for r in runs if r.path is not None]
    paths = [r.path.resolve() for r in placed]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else None
    rels = [p.relative_to(common).parts if common is not None else (p.name,) for p in paths]
    short = ["/".join(m.group(1) if (m := re.match(r"^(\d+)_", part)) else part for part in rel) for rel in rels]
    for r, rel, name in zip(placed, rels, short, strict=True):
        r.name = name if short.count(name) == 1 else "/".join(rel)


EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")  # a number Hydra reads and YAML 1.1 does not


def _parsed(v):
    """A value as Hydra's override grammar reads it: "2", 2 and 2.0 are one value, and so are "1e-6" and 1e-06
    (YAML 1.1, which reads the rest, takes an exponent without a dot for text)."""
    if not isinstance(v, str):
        return v
    try:
        v = yaml.safe_load(v)
    except yaml.YAMLError:
        return v
    if isinstance(v, str) and EXPONENT.match(v):
        return float(v)
    return v


def _same(a, b) -> bool:
    return _parsed(a) == _parsed(b)


# What a W&B run's config holds beside the run's settings (train.py's tracker config): the machine and versions it
# ran on, the values it resolved (shown through their keys), W&B's own
NOT_SETTINGS = ("env", "resolved", "_wandb")


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs, then the config values that differ though no override names
    them (a preset edited between runs, another ``--config-dir``, another version's default), so that such runs
    are shown apart and never pooled as seeds of one setting, then RESOLVED_APART (the pairs per step) where
    the runs' summaries differ in it; with a single run, all of its overrides. Config values that do not change
    what trains (``RESUMABLE_CHANGES``) and the values under a swept group are not listed unless an override names
    them: runs given another eval_steps on the command line are shown apart, not pooled as seeds."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    if len(runs) == 1:
        return keys
    swept = [k for k in keys if any(not _same(r.value_of(k), runs[0].value_of(k)) for r in runs[1:])]
    configs = [config_leaves(r.config) for r in runs if r.config]
    # under a swept group (model=a,b) its values differ by the sweep, shown as the group; under a group every run
    # was given alike (model=tiny), a value that differs is a preset edited between the runs: shown, never pooled
    skip = (*RESUMABLE_CHANGES, *NOT_SETTINGS, *swept)
    swept += differing_keys(configs, skip=skip) if len(configs) > 1 else []
    return swept + [k for k in RESOLVED_APART if k not in swept and _resolved_differ(runs, k)]


# Values a run resolves from its launch rather than its config, shown where they differ: runs of one config on 1 and
# 2 processes train on batches of 16 and 32 pairs (per_device_train_batch_size x processes x accumulation), and
# nothing in their configs says so.
RESOLVED_APART = ("effective_batch_size",)


def _resolved_differ(runs: list[Run], key: str) -> bool:
    """Whether the runs that recorded ``resolved/<key>`` in their summaries recorded more than one value."""
    values = [r.summary[f"resolved/{key}"] for r in runs if r.summary.get(f"resolved/{key}") is not None]
    return any(not _same(v, values[0]) for v in values[1:])


def label_runs(runs: list[Run]) -> list[Run]:
    """Set ``run.swept`` and ``run.label`` (``beta=2, gamma_beta_ratio=0.5``); duplicates get their name added."""
    keys = swept_keys(runs)
    for r in runs:
        r.swept = {k: _shown_as(r.value_of(k)) for k in keys}
        r.label = settings_label(r.swept) or r.name
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} [{r.name}]"
    return runs


def _shown_as(value) -> str:
    """A hyperparameter's value as text, written one way however it was given (an override's "5", a config's 2.0
    and 2 read "5", "2", "2"; True and "false" read "true", "false"), so equal values pool into one setting over
    seeds; "-" for a run without it."""
    if value is None:
        return "-"
    v = _parsed(value)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)
    return str(v) if isinstance(v, int) else str(value)


def common_overrides(runs: list[Run]) -> dict[str, str]:
    """Overrides every run shares with the same value (shown once above the table)."""
    if len(runs) < 2:
        return {}
    swept = swept_keys(runs)
    return {k: v for k, v in runs[0].overrides.items() if k not in swept and all(k in r.overrides for r in runs)}


# ----------------------------------------------------------------------------- seeds
def seed_groups(runs: list[Run], metric: str = DEFAULT_METRIC, ascending: bool | None = None) -> list[dict]:
    """Finished runs that differ only by ``seed``, pooled: mean, spread and count per setting, best first.

    Empty unless ``seed`` is one of the swept keys (``--multirun seed=1,2,3 beta=2,5``). A seed met twice for one
    setting (a run and its copy, one sweep given twice) is counted once, its first run's value, and the
    others are counted in ``same seed left out``. A seed that failed is counted in ``failed``; one that diverged
    (stopped by its non-finite steps) makes the setting's mean NaN, as a NaN seed does: left out, its setting's
    surviving seeds would look better than the setting is. A near-zero metric (``length/reward_corr``) is pooled by
    size (``|metric| mean``): seeds of +0.6 and -0.6 are a bias of 0.6 each, not none."""
    groups, repeats = _pooled(runs, metric)
    failed, diverged = _failed_seeds(runs)
    size = near_zero_is_better(metric)
    rows = []
    for setting in list(groups) + [s for s in failed if s not in groups]:
        values = [abs(v) if size else v for r in groups.get(setting, {}).values() if (v := r.final(metric)) is not None]
        if diverged.get(setting):
            values.append(math.nan)
        mean = sum(values) / len(values) if values else None
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        rows.append(
            {
                **dict(setting),
                "seeds": len(groups.get(setting, {})),
                mean_key(metric): mean,
                "std": std,
                # min and max over a NaN depend on where it sits: a diverged seed makes both NaN
                "min": math.nan if any(math.isnan(v) for v in values) else min(values, default=None),
                "max": math.nan if any(math.isnan(v) for v in values) else max(values, default=None),
                **({"failed": failed[setting]} if setting in failed else {}),
                **({"same seed left out": repeats[setting]} if setting in repeats else {}),
            }
        )
    ascending = lower_is_better(metric) if ascending is None else ascending

    def order(row):  # best first, as rank_runs orders runs; a NaN or infinite mean (a diverged seed) last
        v = row[mean_key(metric)]
        return (0, ranked_value(metric, v, ascending)) if _is_number(v) else (1, 0.0)

    return sorted(rows, key=order)


def mean_key(metric: str) -> str:
    """A ``seed_groups`` row's column of the mean: ``<metric> mean``, ``|<metric>| mean`` for a near-zero metric."""
    return f"|{metric}| mean" if near_zero_is_better(metric) else f"{metric} mean"


def _setting_key(run: Run) -> tuple:
    """The setting a run is one seed of: its swept values but the seed, in order."""
    return tuple((k, v) for k, v in run.swept.items() if k != "seed")


def _failed_seeds(runs: list[Run]) -> tuple[dict[tuple, int], dict[tuple, int]]:
    """Per setting (as ``_pooled`` keys them), its failed runs and, of those, the diverged ones (stopped by
    ``max_bad_steps`` non-finite steps in a row: ``NonFiniteError``). Empty unless seed is swept."""
    failed: dict[tuple, int] = {}
    diverged: dict[tuple, int] = {}
    if "seed" not in swept_keys(runs):
        return failed, diverged
    for r in runs:
        if r.status == "failed":
            setting = _setting_key(r)
            failed[setting] = failed.get(setting, 0) + 1
            if (r.error or "").startswith("NonFiniteError"):
                diverged[setting] = diverged.get(setting, 0) + 1
    return failed, diverged


def best_setting_caveat(groups: list[dict], metric: str) -> str:
    """What keeps the first of ``groups`` (``seed_groups`` rows with a number, best first) from being plainly the
    best: a tie of the means, a best or runner-up of one seed (no spread to tell them apart), or the next setting's
    seeds reaching into the best's range; "" where none does."""
    if len(groups) < 2:
        return ""
    best, key = groups[0], mean_key(metric)
    tied = [g for g in groups[1:] if math.isclose(g[key], best[key], rel_tol=1e-9, abs_tol=1e-12)]
    if tied:  # the means equal (to their summation's rounding): no setting is the best
        return f"tied with {len(tied)} other setting{'s' * (len(tied) > 1)} ({_setting_of(tied[0])})"
    if min(best["seeds"], groups[1]["seeds"]) < 2:
        return f"one seed, no spread to tell it from the next: {_setting_of(groups[1])}"
    if max(best["min"], groups[1]["min"]) <= min(best["max"], groups[1]["max"]):
        return f"within the spread of the next: {_setting_of(groups[1])}"
    return ""


def _pooled(runs: list[Run], metric: str) -> tuple[dict[tuple, dict[str, Run]], dict[tuple, int]]:
    """``seed_groups``' pooling: per setting (the swept values but the seed), its finished runs with ``metric`` by
    seed (a repeated seed's first run), and the count of repeats left out per setting. Empty unless seed is swept."""
    groups: dict[tuple, dict[str, Run]] = {}
    repeats: dict[tuple, int] = {}
    if "seed" not in swept_keys(runs):
        return groups, repeats
    for r in runs:
        if r.status == "done" and r.final(metric) is not None:
            setting = _setting_key(r)
            seeds = groups.setdefault(setting, {})
            seed = json.dumps(_parsed(r.value_of("seed")))
            if seed in seeds:
                repeats[setting] = repeats.get(setting, 0) + 1
            else:
                seeds[seed] = r
    return groups, repeats


def _mean_final(runs: list[Run], key: str) -> float | None:
    """The mean over ``runs`` of their final ``key``, over those that have one: NaN or infinite where a seed's is (a
    diverged seed is the setting's, as ``seed_groups`` counts it, not left out of a finer-looking mean)."""
    values = [v for r in runs if (v := r.final(key)) is not None]
    return sum(values) / len(values) if values else None


def seed_curve(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean, min and max over ``runs`` (one setting's seeds) of ``key``, at the steps every one of them
    logged a finite value (a step one seed lacks would move the mean by which seeds it averages)."""
    series = [dict(zip(*r.series(key))) for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    values = [[s[step] for s in series] for step in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def settings_label(values: dict) -> str:
    """``beta=2, gamma_beta_ratio=0.5``: swept values as a run's (or a setting's) label shows them."""
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _setting(group: dict) -> dict:
    """A ``seed_groups`` row's setting: its swept values, the keys before its counts."""
    keys = list(group)
    return {k: group[k] for k in keys[: keys.index("seeds")]}


def _setting_of(group: dict) -> str:
    """A ``seed_groups`` row's setting as a label."""
    return settings_label(_setting(group))


# ----------------------------------------------------------------------------- generations
def last_generations(runs: list[Run], count: int = 3) -> list[dict]:
    """For the first ``count`` sample prompts: the prompt, chosen and rejected answers, and each
    run's generation at its last eval (from ``generations.jsonl``), keyed by run label."""
    by_prompt: dict[str, dict] = {}
    for r in runs:
        rows = read_jsonl(r.wrote_in / "generations.jsonl") if r.wrote_in else []
        if not rows:
            continue
        last = max(row["step"] for row in rows)
        for row in rows:
            if row["step"] == last:
                entry = by_prompt.setdefault(
                    row["prompt"],
                    {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"], "runs": {}},
                )
                entry["runs"][f"{r.label} (step {last})"] = row["generation"]
    return list(by_prompt.values())[:count]


def format_generations(entries: list[dict]) -> str:
    if not entries:
        return "(no generations.jsonl in these runs)"
    lines = []
    for e in entries:
        lines += [f"prompt:   {e['prompt']!r}", f"chosen:   {e['chosen']!r}", f"rejected: {e['rejected']!r}"]
        width = max(len(k) for k in e["runs"])
        lines += [f"  {k:<{width}}  {v!r}" for k, v in e["runs"].items()]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ranking and table
# Metrics where a lower value is better besides losses: cost and failure counts.
LOWER_IS_BETTER = (
    "step_time_s",
    "max_rss_gb",
    "gpu_max_allocated_gb",
    "skipped_steps",
    "compile_warmup_s",
    "runtime_s",
    "unparseable_verdicts",  # the evaluate stage's failure counts (bench/<benchmark>/<name>)
    "unparseable_games",
    "unjudged",
    "unjudged_games",
    "cut_at_max_new_tokens",
)


# Metrics whose best value is none at all, of either sign: ranked by their size (the correlation of a response's
# reward with its length, over chosen and rejected responses together: a length bias whichever way it leans).
NEAR_ZERO_IS_BETTER = ("length/reward_corr",)


def lower_is_better(metric: str) -> bool:
    """Losses, costs, the benchmarks' standard errors, lm-eval's perplexities (``is_lower_score``), the rejected
    side's reward and log-probs (what the objective
    pushes down: ranked highest first, the run that raised them most was "best"), and the near-zero metrics (by
    their size)."""
    parts = metric.split("/")
    name = parts[-1]
    rejected_side = name == "rejected" and len(parts) > 1 and parts[-2].startswith(("rewards", "logps"))
    low = name.endswith("loss") or name in LOWER_IS_BETTER or rejected_side or is_standard_error(metric)
    return low or is_lower_score(metric) or near_zero_is_better(metric)


def near_zero_is_better(metric: str) -> bool:
    return metric.split("/", 1)[-1] in NEAR_ZERO_IS_BETTER


def ranked_value(metric: str, value: float, ascending: bool) -> float:
    """What ranking sorts on, smallest first: the value (its size for the near-zero metrics), negated for a
    descending order."""
    value = abs(value) if near_zero_is_better(metric) else value
    return value if ascending else -value


def rank_runs(runs: list[Run], metric: str = DEFAULT_METRIC, ascending: bool | None = None) -> list[Run]:
    """Best first by ``metric`` (ascending for losses unless told); then running, then killed and failed jobs."""
    ascending = lower_is_better(metric) if ascending is None else ascending

    def key(r: Run):
        v = r.final(metric)
        group = {"done": 0, "running": 1, "stopped": 1, "killed": 2, "failed": 2}[r.status]
        if not _is_number(v):  # none, or NaN/inf (a diverged run): after the runs with a number
            return (group, 1, 0.0)
        return (group, 0, ranked_value(metric, v, ascending))

    return sorted(runs, key=key)


# What makes a benchmark's numbers comparable between runs (results.json): who judged, against which baseline,
# on which prompts, with which decoding of the runs' models.
# (the rule benchmark's baseline is each run's own starting model: start_weights names it)
BENCH_SETTINGS = ("judge", "baseline", "start_weights", "reference", "prompts_path", "reference_path", "decoding")
BENCH_SETTINGS += ("lm_eval",)  # tasks, shots, limit, chat template, dtype (its batch size and device left out)


def mixed_methods_note(runs: list[Run], metric: str) -> str | None:
    """A note where runs of different methods are ranked by a metric each method defines its own way: a loss,
    TRL's rewards/*, which order a pair by the method's own reward (SimPO's mean log-prob, CPO's summed one, the
    DPO family's log-ratio to the reference): on one batch, SimPO's accuracy 0.625 beside DPO's 0.375; or logps/*,
    the summed log-prob for the DPO family and CPO and the per-token mean for the others (a DPO run ranked last at
    -79 beside SimPO's -4)."""
    from simpo_exp.methods import TABLE

    name = metric.split("/", 1)[-1]
    methods = sorted({str(m) for r in runs if (m := r.value_of("method")) in TABLE})
    if name.startswith("logps/") and len({TABLE[m].on for m in methods}) > 1:  # sums beside per-token means
        by = "; ".join(f"{m}: {'summed' if TABLE[m].on == 'sum' else 'per-token mean'}" for m in methods)
        return (
            f"these runs train different methods, and {metric} is the log-prob each method's loss takes ({by}): a "
            f"sum over a response's tokens beside a mean is not like for like; --metric "
            f"{metric.replace('logps/', 'logps_mean/', 1)} (the per-token mean for every method) is"
        )
    if len(methods) < 2 or not (name == "loss" or name.startswith("rewards/")):
        return None

    def reward(m) -> str:
        return "log-ratio to the reference" if m.reference else f"{m.on} log-prob"

    by = "; ".join(f"{m}: {reward(TABLE[m])}" for m in methods)
    return (
        f"these runs train different methods, and {metric} is each method's own (rewards order a pair by the "
        f"method's reward: {by}): the ranking is not like for like across methods; --metric "
        "eval/logps_mean/accuracies (pairs whose chosen response has the higher mean log-prob) and evaluation "
        "numbers (bench/*) are"
    )


def awaiting_judge_note(runs: list[Run]) -> str | None:
    """A note naming the runs whose benchmark results leave requests the judge endpoint refused or failed: their
    win rates are of the judged part alone, until the evaluate command is run again."""
    from simpo_exp.evaluate.judge import awaiting_judge
    from simpo_exp.inference.results import load_results

    waiting = [
        f"{r.name} {bench}"
        for r in runs
        if r.wrote_in is not None
        for bench, record in load_results(r.wrote_in).items()
        if isinstance(record.get("metrics"), dict) and awaiting_judge(record["metrics"])
    ]
    if not waiting:
        return None
    return (
        f"the judge endpoint refused or failed some requests of {', '.join(waiting)}: those win rates are of the "
        "prompts judged so far and do not rank yet; re-run their evaluate command to ask the rest again"
    )


def mixed_bench_settings(runs: list[Run]) -> dict[str, list[str]]:
    """``{benchmark: ["judge: {...} / {...}", ...]}`` for each benchmark the runs were evaluated on with settings
    that differ (another judge model, baseline, starting model, prompt file or number of prompts, decoding, lm-eval's
    tasks, shots, limit or chat template). A key
    a record does not hold (written before it was recorded) is not held against it."""
    from simpo_exp.inference.results import load_results

    seen: dict[str, dict[str, list[str]]] = {}
    records = [
        (bench, record) for r in runs if r.wrote_in is not None for bench, record in load_results(r.wrote_in).items()
    ]
    # a sampled answer's batch size, recorded since it was known to change the sample: not held against a record of
    # a benchmark made before (which lacks it), nor held by one where any lacks it
    unbatched = {
        bench
        for bench, record in records
        if isinstance(record.get("decoding"), dict) and "batch_size" not in answer_decoding(record["decoding"])
    }
    for bench, record in records:
        settings = {key: record[key] for key in BENCH_SETTINGS if key in record}
        if isinstance(record.get("metrics"), dict) and "n" in record["metrics"]:
            settings["prompts"] = record["metrics"]["n"]  # 64 prompts beside a max_prompts=8 smoke test
        for key, value in settings.items():
            if key == "judge" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "base_url"}  # the same judge on another host
            if key == "decoding" and isinstance(value, dict):  # a smaller batch after an out-of-memory, say
                value = answer_decoding(value)
                if bench in unbatched:
                    value = {k: v for k, v in value.items() if k != "batch_size"}
            if key == "start_weights" and isinstance(value, dict):  # a random init's seed is the run's own:
                value = {k: v for k, v in value.items() if k != "seed"}  # seed sweeps pool those, as they should
            if key == "lm_eval" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in ("batch_size", "device")}
            shown = json.dumps(value, sort_keys=True)
            values = seen.setdefault(bench, {}).setdefault(key, [])
            if shown not in values:
                values.append(shown)
    return {
        bench: [f"{key}: {' / '.join(values)}" for key, values in keys.items() if len(values) > 1]
        for bench, keys in seen.items()
        if any(len(values) > 1 for values in keys.values())
    }


def misnamed_bench_metric(runs: list[Run], metric: str) -> str | None:
    """Why ``bench/<benchmark>/<name>``, held by no run, is a typo (refused, exit 2), or None: a benchmark that is
    neither one of the evaluate stage's presets nor one any run was evaluated on, or a name that none of the runs'
    results of that benchmark reports."""
    from simpo_exp.inference.results import load_results
    from simpo_exp.rundir import CONF_DIR

    bench, name = metric.split("/")[1], metric.split("/", 2)[2]
    results = [load_results(r.wrote_in) for r in runs if r.wrote_in is not None]
    held = sorted({b for res in results for b in res})
    presets = sorted(p.stem for p in (Path(CONF_DIR) / "benchmark").glob("*.yaml"))
    if bench not in held and bench not in presets:
        evaluated = f"; these runs were evaluated on {', '.join(held)}" if held else ""
        return (
            f"--metric {metric}: no benchmark {bench!r}; the evaluate stage's are {', '.join(presets)}{evaluated} "
            "(one of your own --config-dir is known here once a run was evaluated on it)"
        )
    reported = sorted({m for res in results for m in (res.get(bench) or {}).get("metrics") or {}})
    if reported and name not in reported:
        return f"--metric {metric}: {bench} reports no {name!r}; it reports {', '.join(reported)}"
    return None


def missing_bench_metric(runs: list[Run], metric: str, where: str) -> str:
    """Why no run has the benchmark ``metric``: not evaluated on that benchmark (how to), evaluated without measuring
    it (the results' notes say why), or a name the benchmark does not report (the names it does)."""
    from simpo_exp.inference.results import load_results

    bench, name = metric.split("/")[1], metric.split("/", 2)[2]
    records = [rec for r in runs if r.wrote_in for b, rec in load_results(r.wrote_in).items() if b == bench]
    if not records:
        return f"no run has {metric}; evaluate them first: python -m simpo_exp.evaluate {where} benchmark={bench}"
    reported = sorted({m for rec in records for m in rec.get("metrics") or {}})
    if name not in reported:
        return f"{bench} reports no {name!r}; it reports {', '.join(reported)}"
    notes = sorted({n for rec in records for n in rec.get("notes") or []})
    return f"{metric} was not measured for any run: " + (" ".join(notes) or "see their results.json")


def bench_columns(runs: list[Run]) -> list[str]:
    """The evaluate stage's headline numbers present in any run: each benchmark's win rates."""
    return headline_keys(k for r in runs for k in r.bench)


def runs_table(runs: list[Run], metric: str = DEFAULT_METRIC, ascending: bool | None = None) -> list[dict]:
    """One dict per run, best first: run, status, the swept values, ``metric``, TABLE_METRICS, the
    benchmarks' win rates (from the evaluate stage), note."""
    metrics = TABLE_METRICS if metric in TABLE_METRICS else [metric, *TABLE_METRICS]
    metrics = [*metrics, *(k for k in bench_columns(runs) if k not in metrics)]
    # each evaluation number followed by its standard error or interval, where any run has one
    held = {k for r in runs for k in r.bench}
    metrics = list(dict.fromkeys(m for k in metrics for m in [k, *(u for u in uncertainty_keys(k) if u in held)]))
    rows = []
    for r in rank_runs(runs, metric, ascending):
        note = r.error or ""
        if r.status == "running":
            step, total = r.last_step(), r.value_of("max_steps")
            total = yaml.safe_load(total) if isinstance(total, str) else total  # an override is text
            note = (
                "no metrics yet"
                if step is None
                else f"at step {step}" + (f" of {total}" if _is_number(total) and total > 0 else "")
            )
        rows.append({"run": r.name, "status": r.status, **r.swept, **{m: r.final(m) for m in metrics}, "note": note})
    return rows


def format_table(rows: list[dict]) -> str:
    """Fixed-width text for ``runs_table`` rows (numbers to 4 significant digits)."""
    if not rows:
        return "(no runs)"
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def figure(runs: list[Run], family: Family | str, metric: str = DEFAULT_METRIC, ascending: bool | None = None):
    """A train panel and an eval panel of ``family`` against step, legend best first: one line per run, or, where
    seeds are swept, one line per setting, the mean over its seeds with the band from their lowest to their highest
    value (``seed_curve``); runs pooled in no setting (unfinished, or without ``metric``) keep a line each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fam = family if isinstance(family, Family) else next(f for f in FAMILIES if f.slug == family)
    ranked = [r for r in rank_runs(runs, metric, ascending) if r.history]
    left_out = [r for r in runs if not r.history]
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    styles = ("-", "--", ":", "-.")

    def finals(value_of) -> str:  # the family's final eval values, as the legend gives them
        return ", ".join(
            (f"{m.rsplit('/', 1)[-1]} " if len(fam.metrics) > 1 else "") + _fmt(value_of(f"eval/{m}"))
            for m in fam.metrics
        )

    by_setting, _ = _pooled(runs, metric)
    pooled = any(len(seeds) > 1 for seeds in by_setting.values())
    seed_rows = seed_groups(runs, metric, ascending)  # the legend's settings and the title's best, best first
    entries = []  # (label, curve: key -> (steps, values, low, high), leads), best first
    if pooled:
        for row in seed_rows:
            members = list(by_setting.get(tuple(_setting(row).items()), {}).values())
            if not members:  # a setting whose every seed failed: nothing to draw
                continue
            n = len(members)
            label = f"{_setting_of(row)}  ({n} seed{'s' * (n > 1)}, mean eval {finals(partial(_mean_final, members))})"
            entries.append((label, partial(seed_curve, members), _is_number(row[mean_key(metric)])))
        members = {id(r) for seeds in by_setting.values() for r in seeds.values()}
        ranked = [r for r in ranked if id(r) not in members]
    for r in ranked:
        label = f"{r.label}  (eval {finals(r.final)})" + ("" if r.status == "done" else f" [{r.status}]")
        entries.append((label, lambda key, r=r: (*r.series(key), None, None), r.final(metric) is not None))
    for color, (rank, (label, curve, leads)) in zip(_colors(len(entries)), enumerate(entries, 1)):
        label = textwrap.fill(f"{rank}. {label}", 50, subsequent_indent="    ")  # long labels (a run's overrides)
        for ax, split in zip(axes, ("train", "eval")):
            for m, style in zip(fam.metrics, styles):
                steps, values, low, high = curve(f"{split}/{m}")
                ax.plot(
                    steps,
                    values,
                    style,
                    color=color,
                    lw=2.6 if rank == 1 and leads else 1.5,
                    marker="o" if split == "eval" or len(steps) == 1 else None,  # one point: no line to draw
                    ms=4,
                    label=label if (ax is axes[0] and m == fam.metrics[0]) else None,
                )
                if low is not None and len(steps) > 0:  # the seeds' spread around their mean
                    ax.fill_between(steps, low, high, color=color, alpha=0.18 / len(fam.metrics), lw=0)
    for ax, split in zip(axes, ("train", "eval")):
        ax.set_title(f"{split} ({'logging window' if split == 'train' else 'test split'})")
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(" / ".join(f"{split}/{m}" for m in fam.metrics))
        ax.grid(alpha=0.3)
        if fam.reference is not None:
            ax.axhline(fam.reference, color="grey", ls=":", lw=1)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(fam.metrics) > 1:
        handles += [Line2D([], [], color="black", ls=s, label=m) for m, s in zip(fam.metrics, styles)]
        labels += list(fam.metrics)
    if handles:
        heading = f"settings (mean over seeds),\nbest first by {metric}" if pooled else f"runs, best first by {metric}"
        fig.legend(handles, labels, loc="outside right upper", title=heading, fontsize=9)
    title = fam.title + (f"  -  {fam.better} is better" if fam.better else "")
    groups = [g for g in seed_rows if _is_number(g[mean_key(metric)])]
    if groups and (len(groups) > 1 or groups[0]["seeds"] > 1):  # a setting, not one seed's run, is the best
        best = groups[0]
        title += "\n" + textwrap.shorten(f"best setting by {metric} over seeds: {_setting_of(best)}", 80)
        title += f" (mean {_fmt(best[mean_key(metric)])}, {best['seeds']} seed{'s' * (best['seeds'] != 1)}, "
        title += f"{_fmt(best['min'])} to {_fmt(best['max'])})"
        caveat = best_setting_caveat(groups, metric)
        title += f", {caveat}" if caveat else ""
    elif len(ranked) > 1 and ranked[0].status == "done" and _is_number(ranked[0].final(metric)):
        best = ranked[0]
        ties = sum(r.status == "done" and r.final(metric) == best.final(metric) for r in ranked[1:])
        title += "\n" + textwrap.shorten(f"best by {metric}: {best.label}", 80) + f" ({_fmt(best.final(metric))})"
        title += f", tied with {ties} other run{'s' * (ties > 1)}" if ties else ""
    # from the left edge and wrapped, so that it ends over the panels: centred on the figure, its end ran under the
    # legend beside them
    lines = [textwrap.fill(line, 100, subsequent_indent="  ") for line in title.split("\n")]
    fig.suptitle("\n".join(lines), fontsize=12, x=0.01, ha="left")
    if left_out:  # a figure-level label, so the layout makes room for it below the axes
        fig.supxlabel(
            textwrap.fill("not plotted (no metrics): " + "; ".join(f"{r.label} [{r.status}]" for r in left_out), 160),
            x=0.01,
            ha="left",
            fontsize=9,
            color="firebrick",
        )
    return fig


def plot_runs(
    runs: list[Run], out_dir: str | Path, metric: str = DEFAULT_METRIC, ascending: bool | None = None
) -> list[Path]:
    """Write one PNG per metric family into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fam in FAMILIES:
        path = out_dir / f"{fam.slug}.png"
        figure(runs, fam, metric, ascending).savefig(path, dpi=110)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simpo_exp.compare", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="run directories, sweep directories, or folders of them")
    p.add_argument(
        "--metric",
        "--rank-by",
        default=DEFAULT_METRIC,
        help=f"rank by this final metric (default {DEFAULT_METRIC}), or an evaluation number "
        "bench/<benchmark>/<name> written by python -m simpo_exp.evaluate (bench/rule/win_rate)",
    )
    order = p.add_mutually_exclusive_group()
    order.add_argument(
        "--ascending",
        action="store_true",
        help="lower is better (the default for losses, step times, memory and skipped steps)",
    )
    order.add_argument("--descending", action="store_true", help="higher is better (the default for the others)")
    p.add_argument("--out", type=Path, help="where the PNGs go (default: PATH/compare/ of the first PATH)")
    p.add_argument("--no-plots", action="store_true", help="print the table only")
    p.add_argument(
        "--generations",
        type=int,
        default=0,
        metavar="N",
        help="also show each run's last generations for the first N sample prompts, side by side",
    )
    args = p.parse_args(argv)

    if args.metric not in KNOWN_METRICS and not is_bench_metric(args.metric):
        p.error(f"unknown metric {args.metric!r}; known: {', '.join(KNOWN_METRICS)}, or bench/<benchmark>/<name>")
    missing = [x for x in args.paths if not Path(x).exists()]
    if missing:
        p.error(f"no such path: {', '.join(missing)}")
    runs = load_runs(args.paths)
    if not runs:
        print(f"error: no run directories under {', '.join(args.paths)}", file=sys.stderr)
        return 2

    unheld = is_bench_metric(args.metric) and not any(args.metric in r.bench for r in runs)
    if unheld and (typo := misnamed_bench_metric(runs, args.metric)):
        print(f"error: {typo}", file=sys.stderr)
        return 2
    ascending = True if args.ascending else False if args.descending else None
    order = "ascending" if (lower_is_better(args.metric) if ascending is None else ascending) else "descending"
    order += " by size" if near_zero_is_better(args.metric) else ""
    statuses = ("done", "running", "stopped", "killed", "failed")
    counts = ", ".join(
        f"{sum(r.status == s for r in runs)} {s}"
        for s in statuses
        if s not in ("stopped", "killed") or any(r.status == s for r in runs)
    )
    print(f"{len(runs)} runs ({counts}) from {', '.join(args.paths)}; ranked by {args.metric} ({order}), best first")
    common = common_overrides(runs)
    if common:
        print("common overrides: " + " ".join(f"{k}={v}" for k, v in common.items()))
    print()
    print(format_table(runs_table(runs, args.metric, ascending)))
    if unheld:
        print(f"\nnote: {missing_bench_metric(runs, args.metric, args.paths[0])}")
    elif all(r.final(args.metric) is None for r in runs):
        why = (
            "every run failed before it had one: the table says why"
            if all(r.status == "failed" for r in runs)
            else "logged only where it can be known: MFU with a known GPU's peak or hardware.peak_tflops, GPU "
            "memory on a GPU"
            if args.metric in CONDITIONAL_METRICS
            else "a metric of another method, or of runs not yet evaluated"
        )
        print(f"\nnote: no run has {args.metric} ({why})")
    for note in notes(runs, args.metric):
        print(f"\nnote: {note}")
    for metric in dict.fromkeys([args.metric, *bench_columns(runs)]):  # evaluation numbers pooled too
        seeds = seed_groups(runs, metric, ascending if metric == args.metric else None)
        if seeds:
            print(f"\nover seeds (runs that differ only by seed), by {metric}:")
            print(format_table(seeds))
            caveat = best_setting_caveat([g for g in seeds if _is_number(g[mean_key(metric)])], metric)
            if caveat:
                print(f"note: the first setting, {_setting_of(seeds[0])}, is no clear best: {caveat}")
    if args.generations:
        print("\nlast generations:")
        print(format_generations(last_generations(runs, args.generations)))
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        print("\nplots: not drawn, matplotlib is not installed (pip install -e '.[plots]'; --no-plots skips them)")
    elif not args.no_plots:
        out = args.out or Path(args.paths[0]) / "compare"
        try:
            written = plot_runs(runs, out, args.metric, ascending)
        except OSError as e:  # a file of that name, a read-only folder
            print(f"error: cannot write the plots in {out} ({type(e).__name__}: {e.strerror or e}); --out names "
                  "another folder, --no-plots skips them", file=sys.stderr)  # fmt: skip
            return 2
        print(f"\nplots: {', '.join(str(w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
