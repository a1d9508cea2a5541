"""W&B dashboards as code: one saved workspace view per sweep, built from the project's metric list.

    python -m simpo_exp.dashboard outputs/multirun/2025-01-01_12-00-00
    python -m simpo_exp.dashboard sweep-2025-01-01_12-00-00-3f2a1c --entity my-team --project simpo-exp
    python -m simpo_exp.dashboard SWEEP --out view.json --swept beta,gamma_beta_ratio

The argument is a sweep directory (what ``--multirun`` wrote: one job per subdirectory) or, when
no such directory exists, a W&B group name. The view (``wandb_workspaces.workspaces.Workspace``):

- shows only the runs of that sweep: runs filtered to its W&B group, ``sweep-<sweep dir name>-<path hash>``
  as :func:`simpo_exp.runinfo.sweep_group` names it (or the jobs' ``logger.group`` if one was given; a job's
  ``wandb_run.json`` records the group it logged to), and grouped by the *swept keys*: the overrides
  (``.hydra/overrides.yaml``) whose value differs between jobs, each mapped to the W&B config key that holds it;
- has one line plot against ``train/global_step`` for every metric in :mod:`simpo_exp.tracking`'s
  lists (train and eval), arranged in sections: preference, log-probs, optimisation, lengths, and
  the rest (a metric added to tracking.py lands in a panel without touching this file);
- has a parallel-coordinates panel from the swept hyper-parameters to ``eval/rewards/accuracies``
  and a runs table with the swept config columns and the headline summaries;
- when the jobs were evaluated (``python -m simpo_exp.evaluate``: ``eval/<benchmark>/results.json``,
  sent to each job's W&B run summary as ``bench/<benchmark>/<metric>``), an "Evaluation" section with a
  bar chart per such metric, grouped like the runs (mean and standard deviation over seeds), and the
  win rates as table columns (the table sorted by the first), each followed by its standard error or
  interval where the benchmark gives one, and as parallel-coordinates axes.

With a W&B key (``WANDB_API_KEY``, or ``wandb login``'s) and ``WANDB_MODE`` not offline/disabled, the view is
saved to W&B and its URL printed. Either way its full spec (the ``model_dump`` of the view exactly as W&B stores it)
is written as JSON, by default to ``<sweep dir>/wandb_workspace.json``; without a key that is all
that happens, and the command that pushes it later is printed. Nothing here needs a network unless
a key is set, and a failed push exits 1 (the spec file is kept), never a lost spec.

Needs ``wandb-workspaces`` (``pip install wandb-workspaces``).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from simpo_exp.inference.results import headline_keys, is_uncertainty, read_results, uncertainty_keys
from simpo_exp.methods import METHODS
from simpo_exp.rundir import (
    jobs_asked,
    parse_overrides,
    parse_yaml,
    read_json,
    records_dir,
    select,
    subdir_depth,
    sweep_dir_of,
    swept_in_request,
)
from simpo_exp.runinfo import sweep_group, sweep_jobs
from simpo_exp.tracking import (
    BEST_AND_LAST,
    EVAL_ONLY_METRICS,
    SAMPLES_KEY,
    STEP_KEY,
    TRAIN_ONLY_METRICS,
    WANDB_RECORD,
    batch_metrics,
    config_leaves,
    differing_keys,
    wandb_key_given,
    wandb_project,
)

# The headline number (the Hydra task's return value) and the W&B summary key that holds it.
# tracking.Tracker asks W&B for its best and its last value (define_metric(..., summary="max,last"))
# and sets both from the whole run's metrics.jsonl at the end (W&B's cover one start of a resumed run), so
# the run summary holds {"max": v, "last": v}, addressed as "<key>.max" and "<key>.last".
# tests/test_wandb_offline.py checks this against W&B's own record.
TARGET = BEST_AND_LAST
TARGET_SUMMARY = f"{TARGET}.last"
# Summary columns of the runs table, after the swept config columns.
TABLE_SUMMARIES = (TARGET_SUMMARY, "eval/rewards/margins", "eval/loss", "train/loss")
MAX_RUNS_UNCOUNTED = 200  # runs per panel for a W&B group given by name, whose jobs cannot be counted here
EVAL_SECTION = "Evaluation"  # bench/<benchmark>/<metric> panels, when the jobs hold evaluate results
# Without a sweep directory the swept keys are unknown: the knobs SimPO's authors tune (and the
# Optuna preset searches), for the parallel-coordinates panel and the table, as the values the run
# used (train.py logs them under "resolved" in the W&B config: learning_rate may come from the model).
DEFAULT_KNOBS = ("resolved.learning_rate", "resolved.gamma_beta_ratio", "beta")
# Config keys that differ between jobs by construction.
PER_JOB_CONFIG = ("output_dir", "logger.run_name", "logger.group", "logger.tags")


# ----------------------------------------------------------------------------- sections and panels
@dataclass(frozen=True)
class MetricSection:
    name: str
    panels: list[tuple[str, list[str]]]  # (title, y keys); x is always tracking.STEP_KEY
    is_open: bool = True


def _section_of(metric: str) -> str:
    """Where a metric name from tracking.py's lists goes; anything unknown goes to the last section. A method's own
    statistics (the table of methods' ``extra_metrics``, computed from the log-probs) go with the log-probs."""
    from simpo_exp.methods import TABLE

    family = metric.split("/", 1)[0]
    if family == "rewards":
        return "Preference"
    own = {name for method in TABLE.values() for name in method.extra_metrics}
    if (
        family in ("logps", "logps_mean", "logits", "logits_response", "entropy", "mean_token_accuracy")
        or family in own
    ):
        return "Log-probs"
    if family in ("loss", "sft_loss", "grad_norm", "learning_rate", "skipped_steps"):
        return "Optimisation"
    if family == "length":
        return "Lengths"
    return "Progress and throughput"


SECTION_ORDER = ("Preference", "Log-probs", "Optimisation", "Lengths", "Progress and throughput")


def metric_sections(methods=METHODS) -> list[MetricSection]:
    """Every metric tracking.py logs for runs of ``methods``, in one line plot or another, in sections.

    A ``<family>/chosen`` metric shares its panel with ``<family>/rejected``; each split (train,
    eval) gets its own panels. Built from tracking's lists only: nothing here names a metric that
    tracking.py does not define.
    """
    per_split = {
        "train": list(batch_metrics(methods) + TRAIN_ONLY_METRICS),
        "eval": list(batch_metrics(methods) + EVAL_ONLY_METRICS),
    }
    panels: dict[str, list[tuple[str, list[str]]]] = {name: [] for name in SECTION_ORDER}
    for split, metrics in per_split.items():
        for m in metrics:
            if m.endswith("/rejected") and m.replace("/rejected", "/chosen") in metrics:
                continue  # drawn with its chosen partner
            keys = [f"{split}/{m}"]
            title = f"{split}/{m}"
            partner = m.replace("/chosen", "/rejected") if m.endswith("/chosen") else None
            if partner in metrics:
                keys.append(f"{split}/{partner}")
                title = f"{split}/{m.rsplit('/', 1)[0]}: chosen vs rejected"
            panels[_section_of(m)].append((title, keys))
    panels["Progress and throughput"].append((SAMPLES_KEY, [SAMPLES_KEY]))
    return [MetricSection(name, p, is_open=name != "Progress and throughput") for name, p in panels.items() if p]


# ----------------------------------------------------------------------------- what a sweep directory says
@dataclass
class Sweep:
    group: str
    swept: dict[str, list[str]] = field(default_factory=dict)  # override key -> W&B config keys
    project: str | None = None
    entity: str | None = None
    path: Path | None = None
    jobs: list[Path] = field(default_factory=list)
    methods: tuple[str, ...] = METHODS  # the jobs' methods: which method-specific metrics get panels
    bench: list[str] = field(default_factory=list)  # bench/<benchmark>/<metric> in the jobs' eval results
    logged: bool = True  # whether any job logged to W&B (logger.wandb)
    configs: list[dict] = field(default_factory=list)  # the jobs' configs and group choices, to check --swept keys
    choices: list[dict] = field(default_factory=list)
    asked: int | None = None  # the jobs the sweep asked for (multirun.yaml), where it says: some may not have started

    @property
    def runs(self) -> int:
        """The runs the view is to draw: the sweep's whole request, where it says, not only the jobs started so far."""
        return max(len(self.jobs), self.asked or 0)

    @property
    def config_keys(self) -> list[str]:
        keys = [k for ks in self.swept.values() for k in ks]
        return list(dict.fromkeys(keys))

    @property
    def groupby(self) -> list[str]:
        """Group runs by the swept keys but ``seed``: the runs of one setting over several seeds make one group
        (plots show their mean and spread). A one-job sweep has nothing to group (its overrides are columns)."""
        return [] if self.runs == 1 else [k for k in self.config_keys if k != "seed"]


def find_jobs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep directory, in job-number order, as compare finds them: nested too
    (``hydra.sweep.subdir=beta${beta}/seed${seed}``), where only the sweep directory's children were read."""
    return [job for job in sweep_jobs(sweep_dir) if (job / ".hydra" / "overrides.yaml").is_file()]


def read_overrides(job: Path) -> dict[str, str]:
    """A job's command-line overrides as key -> value (``+``/``~`` stripped; Hydra's own left out)."""
    return parse_overrides(parse_yaml((job / ".hydra" / "overrides.yaml").read_text()) or [])


def swept_overrides(jobs: list[Path], sweep_dir: Path | None = None) -> list[str]:
    """Override keys whose value differs between jobs (all of them when there is only one job), and those the
    sweep in ``sweep_dir`` asked several values of (a view made while the sweep runs: the jobs started so far may
    all share a swept value)."""
    per_job = [read_overrides(j) for j in jobs]
    keys = list(dict.fromkeys(k for o in per_job for k in o))
    asked = swept_in_request(sweep_dir) if sweep_dir is not None else []
    if len(per_job) == 1 and not asked:
        return keys
    return [k for k in keys if len({o.get(k) for o in per_job}) > 1 or k in asked]


def _load_yaml(path: Path) -> dict:
    return (parse_yaml(path.read_text()) or {}) if path.is_file() else {}


_MISSING = object()


def config_keys_for(key: str, configs: list[dict], choices: list[dict]) -> list[str]:
    """The W&B config key(s) that hold an override's value.

    A config path (``beta``, ``dataset.synthetic.num_train``) is its own key. A config-group choice
    (``model=...``) is ``<group>.name`` where the group has one; otherwise (``hparams=...``, which
    writes to the top level) it is every config value that differs between the jobs.
    """
    values = [select(c, key, _MISSING) for c in configs]
    if any(v is not _MISSING and not isinstance(v, dict) for v in values):
        return [key]
    if any(key in c for c in choices):
        if all(select(c, f"{key}.name", _MISSING) is not _MISSING for c in configs):
            return [f"{key}.name"]
        return differing_keys([config_leaves(c) for c in configs], skip=PER_JOB_CONFIG)
    return []


def _sweep_group(job: Path, hydra: dict) -> str:
    """The W&B group ``runinfo.sweep_group`` gave a job: what its start recorded (``wandb_run.json``), else worked out
    from the sweep directory it ran in, as recorded in its hydra.yaml (even if the sweep was moved since): where that
    was Hydra's dated default, the folder ``hydra.sweep.subdir`` levels above the job's (``b${beta}/s${seed}`` nests
    it two deep: its parent was taken, and a job that failed before W&B started made a sweep of its own)."""
    recorded = read_json(records_dir(job) / WANDB_RECORD)  # where the run wrote its records (output_dir=...)
    if recorded.get("group"):
        return recorded["group"]
    runtime = hydra.get("runtime") or {}
    configured = str((hydra.get("sweep") or {}).get("dir") or "")
    if configured and "${" not in configured:  # unresolved in hydra.yaml when left at its default
        return sweep_group(configured, runtime.get("cwd"))
    ran_in = runtime.get("output_dir")
    # the job's folder is hydra.sweep.subdir below the sweep's: as many levels as the pattern's separators outside
    # its interpolations say (b${beta}/s${seed}: two)
    if ran_in and len(Path(ran_in).parents) >= subdir_depth(hydra):
        return sweep_group(str(sweep_dir_of(Path(ran_in), hydra)))
    return sweep_group(str(sweep_dir_of(job, hydra).resolve()))


def read_sweep(sweep_dir: Path) -> Sweep:
    """Jobs, W&B group, swept keys, project and entity of one ``--multirun`` directory."""
    sweep_dir = Path(sweep_dir)
    jobs, hydras = [], []
    for job in find_jobs(sweep_dir):
        hydra = _load_yaml(job / ".hydra" / "hydra.yaml").get("hydra") or {}
        if hydra.get("mode") in (None, "MULTIRUN"):  # a single run (mode RUN) has no sweep group
            jobs.append(job)
            hydras.append(hydra)
    if not jobs:
        own = _load_yaml(Path(sweep_dir) / ".hydra" / "hydra.yaml").get("hydra") or {}
        if own.get("mode") == "MULTIRUN":  # a job's folder given for its sweep's
            sweep = sweep_dir_of(Path(sweep_dir), own)
            raise SystemExit(f"error: {sweep_dir} is one job of a --multirun sweep; give the sweep's folder, {sweep}")
        raise SystemExit(f"error: {sweep_dir} holds no --multirun jobs (subdirectories with .hydra/)")
    configs = [_load_yaml(j / ".hydra" / "config.yaml") for j in jobs]
    loggers = [c.get("logger") or {} for c in configs]
    # The group as runinfo.fill_run_identity set it: the jobs' logger.group if given, else runinfo.sweep_group's
    groups = sorted({lg.get("group") or _sweep_group(j, h) for j, h, lg in zip(jobs, hydras, loggers)})
    if len(groups) > 1:
        raise SystemExit(
            f"error: {sweep_dir} holds jobs of {len(groups)} sweeps ({', '.join(groups)}); give one sweep directory"
        )
    group = groups[0]
    choices = [(h.get("runtime") or {}).get("choices") or {} for h in hydras]

    swept = {}
    for key in swept_overrides(jobs, sweep_dir):
        found = config_keys_for(key, configs, choices)
        if found:
            swept[key] = found
        else:
            print(f"note: swept key {key!r} is in no job's config; left out of the view", file=sys.stderr)
    # where the runs logged, as their starts recorded it (an entity from WANDB_ENTITY, not in the config), else
    # as configured
    recorded = [read_json(records_dir(j) / WANDB_RECORD) for j in jobs]
    unset = {None, ""}  # an offline run's entity is empty
    projects = {r.get("project") for r in recorded} - unset or {lg.get("project") for lg in loggers} - unset
    entities = {r.get("entity") for r in recorded} - unset or {lg.get("entity") for lg in loggers} - unset
    return Sweep(
        group=group,
        swept=swept,
        project=projects.pop() if len(projects) == 1 else None,
        entity=entities.pop() if len(entities) == 1 else None,
        path=sweep_dir,
        jobs=jobs,
        methods=tuple(sorted({c.get("method", "simpo") for c in configs})),
        bench=list(dict.fromkeys(k for j in jobs for k in read_results(records_dir(j)))),  # as compare reads them
        logged=any(lg.get("wandb", True) for lg in loggers),
        configs=configs,
        choices=choices,
        asked=jobs_asked(sweep_dir),
    )


# ----------------------------------------------------------------------------- the workspace
def config_column(key: str) -> str:
    """Runs-table accessor of a (possibly nested) config key: ``config:<top>.value[.<rest>]``."""
    top, _, rest = key.partition(".")
    return f"config:{top}.value" + (f".{rest}" if rest else "")


def _stable_id(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:11]


def build_workspace(sweep: Sweep, entity: str | None, project: str, name: str | None = None):
    """The ``wandb_workspaces.workspaces.Workspace`` for a sweep (built offline; nothing is sent)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    knobs = sweep.config_keys or list(DEFAULT_KNOBS)
    ranked_by = headline_keys(sweep.bench)  # win rates and scores: parallel-coordinates axes, the table's sort

    def stable(panel, *parts):
        # Panel ids are random by default; derived from the content instead, the spec of the same
        # sweep is the same file every time (diffable, and a re-save updates panels in place).
        object.__setattr__(panel, "_id", _stable_id(sweep.group, *parts))
        return panel

    sections = [
        ws.Section(
            name="Sweep",
            is_open=True,
            panels=[
                stable(
                    wr.ParallelCoordinatesPlot(
                        title=f"swept hyper-parameters -> {TARGET} (final)",
                        columns=[wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in knobs]
                        + [
                            wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(k), display_name=k)
                            for k in ranked_by
                        ]
                        + [
                            wr.ParallelCoordinatesPlotColumn(
                                metric=wr.SummaryMetric(TARGET_SUMMARY), display_name=TARGET
                            )
                        ],
                        layout=wr.Layout(w=24, h=8),
                    ),
                    "Sweep",
                    "parallel coordinates",
                ),
            ],
        )
    ]
    if sweep.bench:
        sections.append(evaluation_section(sweep, stable))
    for sec in metric_sections(sweep.methods):
        sections.append(
            ws.Section(
                name=sec.name,
                is_open=sec.is_open,
                panel_settings=ws.SectionPanelSettings(x_axis=STEP_KEY),
                panels=[
                    stable(wr.LinePlot(title=title, x=STEP_KEY, y=keys), sec.name, title) for title, keys in sec.panels
                ],
            )
        )
    # the runs table sorted by the first win rate, else by the held-out reward accuracy (compare's default), best
    # first: W&B's own order is the newest run first
    order = {"order": [ws.Ordering(ws.Summary(ranked_by[0] if ranked_by else TARGET_SUMMARY), ascending=False)]}
    workspace = ws.Workspace(
        entity=entity or "",
        project=project,
        name=name or view_title(f"SimPO {sweep.group}"),
        sections=sections,
        # every job of the sweep in each panel: W&B draws the first 10 runs of the set by default; a group given by
        # name (no folder to count its jobs in) gets MAX_RUNS_UNCOUNTED, not 10
        settings=ws.WorkspaceSettings(
            x_axis=STEP_KEY, max_runs=max(10, sweep.runs) if sweep.jobs else MAX_RUNS_UNCOUNTED
        ),
        runset_settings=ws.RunsetSettings(
            filters=[ws.Metric("Group") == sweep.group],
            groupby=[ws.Config(k) for k in sweep.groupby],
            pinned_columns=[
                "run:displayName",
                *(config_column(k) for k in knobs),
                *(f"summary:{k}" for k in with_uncertainty(ranked_by, sweep.bench)),
                *(f"summary:{k}" for k in TABLE_SUMMARIES),
            ],
            **order,
        ),
    )
    return exact_group_filter(workspace, sweep.group)


def refused_in_names(text: str) -> list[str]:
    """The characters of ``text`` W&B refuses in a view's name (wandb-workspaces: symbols, ``=``, ``+``, ``<``,
    ``^``, currency signs and emoji, which raised a pydantic ValidationError at the view's build)."""
    import unicodedata

    return sorted({c for c in text if unicodedata.category(c) in ("So", "Sk", "Sm", "Sc", "Cs")})


def view_title(text: str) -> str:
    """``text`` as a view's name: each character W&B refuses there (``refused_in_names``) as ``_``; a group
    named ``lr=1e-6`` gets the view "SimPO lr_1e-6" (its filter keeps the group's own name)."""
    refused = refused_in_names(text)
    return "".join("_" if c in refused else c for c in text)


def exact_group_filter(workspace, group: str):
    """``workspace`` keeping the runs of W&B group ``group``, the name as it is. wandb-workspaces writes a filter
    into a Python-like expression and parses it back when it builds the view: a quote in the name (``alice's``)
    raised SyntaxError, a backslash was read as an escape and ``=``, ``<``, ``>`` were rewritten (``a=b`` filtered
    on ``a==b``), each a view of no runs. The filter is given in the form W&B stores (filterV2), which the library
    sends as given while the expression is left unchanged."""
    import wandb_workspaces.expr as expr
    import wandb_workspaces.workspaces as ws

    stored = expr.filters_tree_to_v2((ws.Metric("Group") == group).to_model())
    object.__setattr__(workspace, "_stashed_filters_v2", stored)
    object.__setattr__(workspace, "_stashed_filter_string", workspace.runset_settings.filters)
    return workspace


def with_uncertainty(keys: list[str], present: list[str]) -> list[str]:
    """``keys``, each followed by those of its uncertainty keys (standard error, interval bounds) that a job has."""
    return [shown for k in keys for shown in (k, *(u for u in uncertainty_keys(k) if u in present))]


def evaluation_section(sweep: Sweep, stable):
    """One bar chart per ``bench/<benchmark>/<metric>`` of the jobs' evaluate results (W&B run summaries:
    simpo_exp/evaluate/wandb_log.py). Runs are grouped as the runs table groups them (the swept keys but
    seed), each bar the mean of its group with the standard deviation across the group's seeds as range.
    A benchmark's own uncertainty of a number (AlpacaEval's standard error, Arena-Hard's interval) gets no bars
    of its own: a bar plot cannot hang it on the number's bar, so it sits beside the number in the runs table."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    by = sweep.groupby
    grouping = {"groupby": wr.Config(by[0])} if len(by) == 1 else {"aggregate": bool(by)}
    panels = [
        stable(
            wr.BarPlot(
                title=key,
                metrics=[key],
                orientation="v",
                groupby_aggfunc="mean",
                groupby_rangefunc="stddev",
                layout=wr.Layout(w=8, h=6),
                **grouping,
            ),
            EVAL_SECTION,
            key,
        )
        for key in sweep.bench
        if not is_uncertainty(key)
    ]
    return ws.Section(name=EVAL_SECTION, is_open=True, panels=panels)


def view_spec(workspace) -> dict:
    """The view exactly as W&B stores it (``View``: entity, project, names and the viewspec)."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def spec_keys(spec: dict) -> dict[str, set[str]]:
    """What a written spec asks W&B for: history keys (plots), summary and config keys, the group filter."""
    section = spec["spec"]["section"]
    history, summary, config = set(), set(), set()
    for sec in section["panelBankConfig"]["sections"]:
        for panel in sec["panels"]:
            cfg = panel.get("config", {})
            if panel.get("viewType") == "Run History Line Plot":
                history |= set(cfg.get("metrics", [])) | {cfg.get("xAxis")}
            elif panel.get("viewType") in ("Bar Chart", "Scalar Chart"):  # a run's summary value each
                summary |= set(cfg.get("metrics", []))
            for col in cfg.get("columns", []):
                kind, _, key = col["accessor"].partition(":")
                (summary if kind == "summary" else config).add(key)
    runset = section["runSets"][0]
    for col in runset["runFeed"]["columnOrder"]:
        kind, _, key = col.partition(":")
        if kind == "summary":
            summary.add(key)
        elif kind == "config":
            config.add(key)
    groups = {
        f["value"]
        for f in _filter_leaves(runset["filters"])
        if f.get("key", {}).get("name") == "group" and f.get("op") == "="
    }
    grouping = {f"{k['section']}:{k['name']}" for k in runset.get("grouping", [])}
    return {"history": history, "summary": summary, "config": config, "groups": groups, "grouping": grouping}


def _filter_leaves(node):
    if isinstance(node, dict):
        if "key" in node and "op" in node:
            yield node
        for v in node.values():
            yield from _filter_leaves(v)
    elif isinstance(node, list):
        for v in node:
            yield from _filter_leaves(v)


# ----------------------------------------------------------------------------- the command
def _online() -> bool:
    """Save to W&B only with a key (``wandb_key_given``) and when W&B is not told to stay offline."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    return wandb_key_given() and mode not in ("offline", "disabled", "dryrun")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m simpo_exp.dashboard",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("target", help="a sweep directory (outputs/multirun/<time>) or a W&B group name")
    ap.add_argument(
        "--entity",
        help="W&B entity (default: the one the jobs logged to, else their logger.entity, WANDB_ENTITY, your default)",
    )
    ap.add_argument(
        "--project",
        help="W&B project (default: the one the jobs logged to, else their logger.project, WANDB_PROJECT, simpo-exp)",
    )
    ap.add_argument("--swept", help="comma-separated config keys to group by (default: read from the sweep)")
    ap.add_argument("--name", help="the view's name (default: 'SimPO <group>')")
    ap.add_argument("--out", type=Path, help="where to write the spec (default: <sweep dir>/wandb_workspace.json)")
    args = ap.parse_args(argv)

    target = Path(args.target)
    if target.is_dir():
        sweep = read_sweep(target)
        default_out = target / "wandb_workspace.json"
    elif os.sep in args.target or target.exists():
        ap.error(f"{args.target} is not a sweep directory")
    else:
        sweep = Sweep(group=args.target)
        default_out = Path(f"wandb_workspace_{args.target}.json")
        if not re.fullmatch(r"sweep-.+-[0-9a-f]{6}", args.target):  # a mistyped folder reads as a group name too
            near = difflib.get_close_matches(args.target, [p.name for p in Path.cwd().iterdir() if p.is_dir()], n=1)
            print(
                f"note: {args.target!r} is no folder here, so it is read as a W&B group name (a sweep's is "
                "sweep-<its folder's name>-<6 hex>; logger.group names others)"
                + (f"; did you mean the folder {near[0]!r}?" if near else ""),
                file=sys.stderr,
            )
    if not sweep.logged:
        print(
            f"note: the jobs in {target} did not log to W&B (logger.wandb=false, e.g. logger=none): the view will show "
            "nothing of them (`wandb sync` has nothing to send); compare them locally with python -m simpo_exp.compare",
            file=sys.stderr,
        )
    if args.swept:
        # each key as the config keys it stands for, as read_sweep maps the swept overrides: a group choice
        # (hparams, model) is no config key of its own, and grouping by it put every run in one null group
        wanted = [k for k in args.swept.split(",") if k]
        found = {k: config_keys_for(k, sweep.configs, sweep.choices) for k in wanted} if sweep.configs else {}
        unknown = [k for k in wanted if sweep.configs and not found[k]]
        if unknown:
            ap.error(f"--swept {','.join(unknown)}: in no job's config under {target}")
        sweep.swept = {k: found.get(k) or [k] for k in wanted}
    entity = args.entity or sweep.entity or os.environ.get("WANDB_ENTITY") or None
    project = args.project or sweep.project or wandb_project(None)  # where an unnamed project's runs log

    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        print(
            "error: the dashboard needs wandb-workspaces: pip install -e '.[dashboard]' (wandb-workspaces >= 0.4.13)",
            file=sys.stderr,
        )
        return 2
    if args.name and (refused := refused_in_names(args.name)):
        ap.error(f"--name {args.name!r}: W&B refuses {' '.join(refused)} in a view's name (symbols and emoji)")
    workspace = build_workspace(sweep, entity, project, args.name)
    out = args.out or default_out
    saved = read_json(out) if out.is_file() else {}  # the view a save of this spec made, if one did
    if (
        saved.get("name")
        and saved.get("id")
        and saved.get("project") == project
        and entity in (None, saved.get("entity"))
    ):
        # updated by the next push, and kept in the spec (a failed push, an offline re-run): a workspace built afresh
        # has no W&B name, and save() made up a new one each time, so every push (the README's, again after evaluate)
        # added another view of one title
        workspace._internal_name, workspace._internal_id = saved["name"], saved["id"]
        entity = entity or saved.get("entity") or None
        workspace.entity = entity or ""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(view_spec(workspace), indent=2) + "\n")
    except OSError as e:  # a file where a folder should be, a read-only folder
        raise SystemExit(f"error: cannot write the view spec {out} ({type(e).__name__}: {e.strerror or e}); --out "
                         "names another file")  # fmt: skip

    grouped = ", ".join(sweep.groupby) or "nothing"
    count = f"{len(sweep.jobs)} of the sweep's {sweep.runs}" if sweep.runs > len(sweep.jobs) else len(sweep.jobs)
    print(f"W&B group {sweep.group!r}: {count or 'unknown number of'} runs, grouped by {grouped}")
    print(f"view spec: {out}")
    push = ["python", "-m", "simpo_exp.dashboard", args.target, "--project", project]
    push += ["--entity", entity] if entity else []
    push += ["--swept", args.swept] if args.swept else []
    push += ["--name", args.name] if args.name else []
    # --out: where the view keeps its W&B name (pushed without it, a later --out run made a second view)
    push += ["--out", str(out)] if args.out else []
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
    push_cmd = ("WANDB_MODE=online " if offline else "") + "WANDB_API_KEY=... " + shlex.join(push)
    if not _online():
        print(
            "not saved to W&B (no WANDB_API_KEY nor `wandb login` key, or WANDB_MODE is offline); once the runs are "
            f"on W&B (`wandb sync` for offline runs), save it with:\n  {push_cmd}"
        )
        return 0
    try:
        import wandb

        if not entity:
            entity = wandb.Api().default_entity
            workspace.entity = entity
        workspace.save()
        out.write_text(json.dumps(view_spec(workspace), indent=2) + "\n")  # now with its W&B name and id
        print(f"saved: {workspace.url}")
    except Exception as e:  # no network, bad key, unknown entity or project: the spec is on disk
        print(
            f"error: saving the view to W&B failed ({type(e).__name__}: {e}); the spec is in {out}; "
            f"retry with:\n  {push_cmd}",
            file=sys.stderr,
        )
        return 1  # a script that pushes views learns that this one was not saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
