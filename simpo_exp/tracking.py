"""Where metrics go: ``metrics.jsonl`` always, W&B when the logger asks for it, ``summary.json`` at the end.

This module holds the one list of metric names the loop logs (TRL's names where TRL defines them the
same way for the run's method, names of our own otherwise). W&B is never
allowed to kill a run: any error from it becomes a warning and W&B is switched off for the
rest of the run, while ``metrics.jsonl`` keeps recording.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

from omegaconf import OmegaConf

from simpo_exp.inference.files import write_atomic
from simpo_exp.methods import METHODS, TABLE
from simpo_exp.rundir import STOPPED_FILE, read_json, read_jsonl, stopped_words

log = logging.getLogger(__name__)

# Per-pair statistics, averaged over a logging window (train/) or over the whole test split (eval/).
# A name TRL uses keeps the definition TRL's trainer gives it for the run's method (README, "Baselines"):
# ``logps/*`` is the summed response log-prob or the per-token mean as the method's entry in the table of
# methods says (simpo_exp/methods.py: summed for the DPO family and CPO); ``rewards/*`` is the implicit
# reward as TRL reports it. ``logps_mean/*``, the per-token mean log-prob, means the same for every
# method: compare methods on it.
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logps_mean/chosen",
    "logps_mean/rejected",
    "logps_mean/accuracies",  # share of pairs whose chosen response has the higher mean log-prob (every method)
    "length/chosen",  # mean response length in tokens
    "length/rejected",
)
# Per-token statistics of the response tokens (float32, detached), averaged over tokens, not pairs:
# name -> the length sums whose total divides the metric's sum. TRL's DPO defines entropy (chosen and
# rejected completion tokens) and mean_token_accuracy (chosen tokens whose label is the argmax) so, per micro-batch;
# its log then averages the micro-batches' means with equal weight, where these divide the window's (or the test
# split's) sums: the same where micro-batches hold as many response tokens each (README, "Metrics").
TOKEN_METRICS = {
    "logits_response/chosen": ("length/chosen",),  # the logit averaged over the vocabulary and the tokens
    "logits_response/rejected": ("length/rejected",),
    "entropy": ("length/chosen", "length/rejected"),
    "mean_token_accuracy": ("length/chosen",),
    "sft_loss": ("length/chosen",),  # the chosen tokens' mean NLL
}
# Logged only for the methods whose TRL trainer defines them the same way. logits/*: TRL's DPO averages
# the logit over completion tokens (our logits_response/*); TRL's CPO and ORPO and the official SimPO
# trainer average every position of the padded batch, prompt and padding included, which the policy
# (output head on response positions only) does not compute, so those methods do not log logits/*.
# ORPO: log_odds_ratio = mean log sigmoid(log odds ratio), log_odds_chosen = mean log odds ratio.
# TRL's nll_loss is our sft_loss for CPO (the chosen response's token-mean NLL); for ORPO TRL counts
# the prompt too, ours does not: neither logs it under TRL's name.
# Which methods log which of these is the table of methods' (simpo_exp/methods.py: ``logits``, ``extra_metrics``).
METHOD_METRICS = {
    "logits/chosen": tuple(name for name, m in TABLE.items() if m.logits),
    "logits/rejected": tuple(name for name, m in TABLE.items() if m.logits),
} | {
    metric: tuple(name for name, m in TABLE.items() if metric in m.extra_metrics)
    for metric in dict.fromkeys(x for m in TABLE.values() for x in m.extra_metrics)
}
TOKEN_METRICS_OF_METHODS = {"logits/chosen": ("length/chosen",), "logits/rejected": ("length/rejected",)}
# Eval only: Pearson correlation between a response's reward and its length in tokens.
EVAL_ONLY_METRICS = ("length/reward_corr",)
# Optimisation and throughput, train only.
# step_time_s, tokens_per_s and samples_per_s time the steps alone (not eval or checkpoints); mfu is
# model FLOPs utilisation (simpo_exp/flops.py), logged when the device's peak is known; max_rss_gb
# is the process's peak resident memory, gpu_max_allocated_gb torch's peak allocation on a GPU.
# num_tokens (TRL's): input tokens of the training steps so far (skipped ones too: they were computed), prompt +
# response of chosen and of rejected each (the prompt twice, whatever the layout computed), padding not counted.
TRAIN_ONLY_METRICS = (
    "grad_norm",
    "learning_rate",
    "epoch",
    "step_time_s",
    "tokens_per_s",
    "samples_per_s",
    "mfu",
    "max_rss_gb",
    "gpu_max_allocated_gb",
    "skipped_steps",
    "num_tokens",
)
# Logged only where they can be known: mfu with a device peak (a known GPU or hardware.peak_tflops),
# gpu_max_allocated_gb on a GPU.
CONDITIONAL_METRICS = ("train/mfu", "train/gpu_max_allocated_gb")
# Measurements of the machine, not of the run: they differ between two identical runs.
# And, in summary.json under hardware.compile, the steps that compiled, their seconds and the graphs built (a resumed
# process compiles again: its own count too).
MEASURED_METRICS = tuple(
    f"train/{m}" for m in ("step_time_s", "tokens_per_s", "samples_per_s", "mfu", "max_rss_gb", "gpu_max_allocated_gb")
) + ("train/compile_warmup_s", "train/compile_warmup_steps", "train/compile_graphs")
# The few numbers that judge a run: the end-of-run table and the compare command's columns.
HEADLINE_METRICS = [
    f"eval/{m}" for m in ("rewards/accuracies", "rewards/margins", "loss", "logps_mean/chosen", "logps_mean/rejected")
] + ["train/loss"]
STEP_KEY = "train/global_step"
SAMPLES_KEY = "train/samples_seen"
SECRET_NAMES = ("api_key", "token", "secret", "password")
# The W&B run a training run logged to (id, project, entity, group, job type, name, mode), written in the
# run directory when W&B starts: the evaluate stage resumes that run by its id to add the benchmark numbers.
WANDB_RECORD = "wandb_run.json"
HELD_KEY = "logged_through"  # in WANDB_RECORD: the last step W&B holds from a start that ended past its checkpoint


def wandb_holds_through(run_dir: Path, step: int | None) -> None:
    """Record, for the next start's tracker, that W&B holds this run's steps up to ``step`` (the records a resume
    cut from metrics.jsonl: logged by a start that ended after its last checkpoint). W&B's history cannot be cut: sent
    again, those steps drew twice on its charts, the line doubling back. A later cut keeps the higher of the two."""
    record = read_json(Path(run_dir) / WANDB_RECORD)
    if step is None or not record.get("id"):
        return
    earlier = record.get(HELD_KEY)
    record[HELD_KEY] = max(step, earlier) if isinstance(earlier, int) else step
    write_atomic(Path(run_dir) / WANDB_RECORD, json.dumps(record, indent=2))


METRICS_FILE = "metrics.jsonl"
# The metric whose W&B summary is its best and its last value (the dashboard's headline)
BEST_AND_LAST = "eval/rewards/accuracies"
GENERATIONS_FILE = "generations.jsonl"
# The W&B summary key of a run left at a stop signal (its words: "SIGTERM after step 40, checkpoint saved"). W&B
# shows such a run as failed (it exits with 128 + the signal's number); this key tells it from one that failed.
STOPPED_SUMMARY = "stopped"
# The W&B summary key of a run that ended with an error: its type and first line, as compare reads error.json
# ("NonFiniteError: ..."), so that compare's W&B path tells a diverged seed from another failure
ERROR_SUMMARY = "error"


def error_words(error: BaseException) -> str:
    """An error as compare names a failed run: its type and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def batch_metrics(methods=("simpo",)) -> tuple[str, ...]:
    """Names of the per-pair and per-token metrics a run of any of ``methods`` logs (train and eval)."""
    only = tuple(m for m, where in METHOD_METRICS.items() if set(where) & set(methods))
    return PAIR_METRICS + tuple(TOKEN_METRICS) + only


def all_batch_metrics() -> tuple[str, ...]:
    return batch_metrics(METHODS)


def divisor_keys(metric: str) -> tuple[str, ...] | None:
    """The length sums a per-token metric is divided by; None for a per-pair metric."""
    return TOKEN_METRICS.get(metric) or TOKEN_METRICS_OF_METHODS.get(metric)


def train_keys(methods=("simpo",)) -> list[str]:
    return [f"train/{m}" for m in batch_metrics(methods) + TRAIN_ONLY_METRICS]


def eval_keys(methods=("simpo",)) -> list[str]:
    return [f"eval/{m}" for m in batch_metrics(methods) + EVAL_ONLY_METRICS]


def default_wandb_url() -> str:
    """The server W&B logs to where ``WANDB_BASE_URL`` names none, as the installed wandb has it (``wandb login``
    stores its key under that host: wandb 0.31's is api.forge.coreweave.com, and a key looked for under
    api.wandb.ai was never found, so every run of a logged-in user went offline)."""
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL

        return str(DEFAULT_BASE_URL)
    except Exception:  # wandb not installed, or a version without the module: its long-standing default
        return "https://api.wandb.ai"


def wandb_key_given() -> bool:
    """Whether W&B has an API key to go online with: ``WANDB_API_KEY``, or the one ``wandb login`` stored in the
    netrc file (``NETRC``, else ``~/.netrc`` or ``~/_netrc``) for the W&B host (``WANDB_BASE_URL``, else
    ``default_wandb_url``; for a CoreWeave Forge host, as wandb does, also the W&B server behind it). With the
    variable alone counted, a user who had run ``wandb login`` logged every run offline."""
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):  # a key, or a federated identity
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    if not os.environ.get("NETRC") and not path.exists():
        path = Path("~/_netrc").expanduser()
    url = os.environ.get("WANDB_BASE_URL") or default_wandb_url()
    hosts = [urlsplit(url).netloc]
    try:  # wandb 0.31 on reads the key of the W&B server behind a CoreWeave Forge host too (api.wandb.ai's)
        from wandb.sdk.lib.urls import forge_upstream_url

        hosts.append(urlsplit(forge_upstream_url(url)).netloc)
    except Exception:  # an older wandb: one host
        pass
    try:
        entries = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError):  # no file, or one W&B would not read either
        return False
    return any((found := entries.authenticators(host)) and found[2] for host in hosts if host)


def keyed_mode(mode: str) -> str:
    """``mode``, except that "online" without an API key (``wandb_key_given``) is "offline", with a warning: wandb
    would ask for a key at an interactive terminal and wait there for ever (``init_timeout`` does not bound its
    prompt), and fail anywhere else."""
    if mode != "online" or wandb_key_given():
        return mode
    _warn(
        "W&B: online asked for but no API key found (WANDB_API_KEY, `wandb login`); logging offline instead: "
        "after `wandb login`, send it with `wandb sync <run>/wandb/offline-run-*`"
    )
    return "offline"


def scrub(obj):
    """Drop any key that names a credential (``token``, ``hf_token``, ``wandb_api_key``, ...) from nested data."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if not _is_secret(str(k), v)}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def _is_secret(key: str, value) -> bool:
    """Whether ``key: value`` is a credential. A ``*_token`` key is one only when its value is text: the data report's
    counts (``responses_without_end_token``) are numbers, and were dropped from data_report.json by the name alone."""
    key = key.lower().rsplit("/", 1)[-1]
    named = [name for name in SECRET_NAMES if key == name or key.endswith("_" + name)]
    return bool(named) and (key == "token" or named != ["token"] or isinstance(value, str))


# metrics.jsonl's stand-in for an infinity (JSON has none); NaN is written as null. compare reads them back.
JSON_INFINITY = 1e308


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else math.copysign(JSON_INFINITY, v)
    return v


def logged_value(v) -> float | None:
    """A metrics.jsonl value as logged (``_jsonable`` read back): NaN for null, an infinity for +-``JSON_INFINITY``;
    None where the value is no number."""
    if v is None:
        return math.nan
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    return math.copysign(math.inf, v) if abs(v) >= JSON_INFINITY else float(v)


TAG_LIMIT = 64  # W&B's longest tag
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")  # wandb.Settings' modes


def open_wandb(run_dir: Path, mode: str, init_timeout: float, **run):
    """``wandb.init`` as every stage calls it: files under ``run_dir``, no console capture or system stats,
    a new run object per call (a multirun starts several in one process), ``init_timeout`` seconds to
    reach the server. ``run``: the run's identity (id/resume, project, entity, group, job_type, name...)."""
    import wandb

    if os.environ.get("WANDB_MODE") == "":  # set but empty (WANDB_MODE= in a job script): wandb.Settings refused
        del os.environ["WANDB_MODE"]  # it, and the run went on without W&B; ``mode`` says what this run is
    elif os.environ.get("WANDB_MODE", "online") not in WANDB_MODES:  # a typo: wandb.Settings' refusal, a pydantic
        _warn(f"WANDB_MODE={os.environ.pop('WANDB_MODE')!r} is not a W&B mode ({', '.join(WANDB_MODES)}): set aside")
    if run.get("tags"):  # W&B refuses a tag longer than 64 characters (or empty), and with it the whole run
        kept = [tag[:TAG_LIMIT] for tag in run["tags"] if tag]
        for tag in run["tags"]:
            if len(tag) > TAG_LIMIT:
                log.warning("W&B tag %r cut to its first %d characters (W&B's limit)", tag, TAG_LIMIT)
        run["tags"] = list(dict.fromkeys(kept))
    return wandb.init(
        **run,
        dir=str(run_dir),
        mode=mode,
        reinit="create_new",
        # x_disable_meta: no command line (sys.argv holds whatever was typed, past scrub), host or git record of
        # wandb's own; the run's config and env.json carry what the run needs
        settings=wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, init_timeout=init_timeout),
    )


def _warn(message: str) -> None:
    """A W&B problem, in the run's log and as a Python warning (which tests and notebooks catch)."""
    log.warning(message)
    warnings.warn(message, stacklevel=3)


class Tracker:
    """Log metrics to ``metrics.jsonl`` and, if enabled, W&B. Only the main process should build one."""

    def __init__(self, run_dir: str | Path, logger_cfg, config_dict: dict, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.wandb_run = None
        self.logged: set[str] = set()  # the metric keys this process logged (finish adds the others to the summary)
        self.wandb_through = -1  # steps W&B holds from an earlier start, not sent again (``wandb_holds_through``)
        self.tables_failed = False  # a generations table W&B could not take: the tables stop, the metrics go on
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        if logger_cfg.wandb:
            self._start_wandb(logger_cfg, scrub(config_dict))

    # ----------------------------------------------------------------- W&B
    def _start_wandb(self, lc, config_dict: dict) -> None:
        mode = lc.mode
        if mode == "auto":
            # WANDB_MODE, when set, is the user's word; otherwise online only with an API key.
            given = os.environ.get("WANDB_MODE")
            mode = given if given in WANDB_MODES else ("online" if wandb_key_given() else "offline")
        mode = keyed_mode(mode)
        # A resumed run continues the W&B run its first start recorded, so its history stays one run.
        previous = read_json(self.run_dir / WANDB_RECORD)  # {} when there is none or it is unreadable
        resume = {"id": previous["id"], "resume": "allow"} if previous.get("id") else {}
        held = previous.get(HELD_KEY) if resume else None
        if isinstance(held, int):  # steps an earlier start sent past the checkpoint this start resumes from
            self.wandb_through = held
            log.info(
                "W&B holds this run's steps up to %d from its last start (past the checkpoint resumed from): they are "
                "written to %s again but not sent again, so W&B's curves do not double back",
                held,
                METRICS_FILE,
            )

        def start(mode: str) -> None:
            self.wandb_run = open_wandb(
                self.run_dir,
                mode,
                lc.init_timeout,
                **resume,
                project=wandb_project(lc.project),
                entity=lc.entity,
                group=lc.group,
                job_type=lc.job_type,
                name=lc.run_name,
                tags=list(lc.tags),
                config=config_dict,
            )
            self.wandb_run.define_metric(STEP_KEY)
            self.wandb_run.define_metric(SAMPLES_KEY)
            self.wandb_run.define_metric("*", step_metric=STEP_KEY)
            # The best and the final held-out accuracy; every other metric's summary is its last value.
            self.wandb_run.define_metric(BEST_AND_LAST, step_metric=STEP_KEY, summary="max,last")
            log.info("W&B run %s (%s)", self.wandb_run.name, mode)

        try:
            start(mode)
        except Exception as e:  # no network, bad key, bad entity...: keep training
            if mode != "online":
                self._wandb_failed("start", e)
            else:  # an offline record of the same run, which `wandb sync` sends once the server can be reached
                self.wandb_run = None
                _warn(
                    f"W&B online start failed ({type(e).__name__}: {e}); logging offline instead: send it later "
                    f"with `wandb sync {self.run_dir / 'wandb'}/offline-run-*`"
                )
                mode = "offline"
                try:
                    start(mode)
                except Exception as e2:
                    self._wandb_failed("start", e2)
        disabled = "disabled" in (mode, os.environ.get("WANDB_MODE"))  # a stand-in run (entity "dummy"): no record
        if self.wandb_run is not None and not disabled:  # (an evaluation logged its results to that entity)
            r = self.wandb_run
            identity = {"id": r.id, "project": r.project, "entity": r.entity or lc.entity, "group": r.group}
            kept = {HELD_KEY: self.wandb_through} if self.wandb_through >= 0 else {}
            self.write_json(WANDB_RECORD, identity | {"job_type": lc.job_type, "name": r.name, "mode": mode} | kept)
            if resume:  # the run goes on: a stop or an error recorded by its last start no longer holds
                for key in (STOPPED_SUMMARY, ERROR_SUMMARY):
                    try:
                        del r.summary[key]
                    except Exception as e:
                        log.warning("W&B: could not clear the summary's %r (%s: %s)", key, type(e).__name__, e)

    def _wandb_failed(self, what: str, e: Exception) -> None:
        _warn(f"W&B {what} failed ({type(e).__name__}: {e}); continuing with metrics.jsonl only")
        self.wandb_run = None

    # ----------------------------------------------------------------- logging
    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.logged.update(metrics)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None and step > self.wandb_through:
            try:
                self.wandb_run.log({STEP_KEY: step, **metrics})
            except Exception as e:
                self._wandb_failed("log", e)

    def log_generations(self, rows: list[dict], step: int) -> None:
        """Append sample generations to generations.jsonl and log them as a W&B table."""
        if not self.enabled or not rows:
            return
        with open(self.run_dir / GENERATIONS_FILE, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None and not self.tables_failed and step > self.wandb_through:
            try:
                import wandb

                table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
                self.wandb_run.log({STEP_KEY: step, "eval/generations": table})
            except Exception as e:  # a table is staged as a file (an unwritable WANDB_DATA_DIR, say): the metrics go
                # on to W&B, the tables stop (dropping the run for it kept only step 0's evaluation there, and left
                # the W&B run to be closed at exit as finished, whatever the run did)
                self.tables_failed = True
                _warn(f"W&B generations table failed ({type(e).__name__}: {e}); the samples stay in {GENERATIONS_FILE}")

    def write_json(self, name: str, obj: dict) -> Path:
        path = self.run_dir / name
        if self.enabled:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(scrub(obj), indent=2, default=str))
            tmp.replace(path)
        return path

    def mark_stopped(self, record: dict) -> None:
        """A run left at a stop signal (``record``: ``rundir.stopped_record``): ``stopped.json``, and on W&B the
        summary's ``stopped`` in words, which the next start of the run removes."""
        self.write_json(STOPPED_FILE, record)
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary[STOPPED_SUMMARY] = stopped_words(record)
            except Exception as e:
                self._wandb_failed("summary", e)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, tb) -> None:
        """A run that ends with an error (or a stop signal) closes its W&B run with that exit status, so the
        W&B run shows it failed (or was stopped), instead of being closed at exit as if it had finished."""
        if error is None or self.wandb_run is None:
            return
        code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else 1
        if not isinstance(error, (SystemExit, KeyboardInterrupt)):  # a stop has its own record (mark_stopped)
            try:
                self.wandb_run.summary[ERROR_SUMMARY] = error_words(error)
            except Exception as e:
                log.warning("W&B: could not record the error in the summary (%s: %s)", type(e).__name__, e)
        try:
            self.wandb_run.finish(exit_code=code or 1)
        except Exception as e:
            self._wandb_failed("finish", e)

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        self.write_json("summary.json", summary)
        if self.wandb_run is not None:
            try:
                # Logged metrics keep the summaries define_metric gave them; add only the rest (the run's figures
                # that no step logs: runtime, the compile warm-up's train/compile_*, the resolved settings)
                for k, v in summary.items():
                    if isinstance(v, (int, float)) and k not in self.logged:
                        self.wandb_run.summary[k] = v
                # W&B works out max and last from what this start logged (and online, after a resume, no longer
                # updates them: wandb/wandb#9684): a resumed run's are set from the whole run's metrics.jsonl
                # (the best of the finite values; the last as logged, NaN included)
                logged = [logged_value(r[BEST_AND_LAST]) for r in read_jsonl(self.metrics_path) if BEST_AND_LAST in r]
                logged = [v for v in logged if v is not None]
                finite = [v for v in logged if math.isfinite(v)]
                if finite:
                    self.wandb_run.summary[BEST_AND_LAST] = {"max": max(finite), "last": logged[-1]}
                self.wandb_run.finish()
            except Exception as e:
                self._wandb_failed("finish", e)


def config_to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_leaves(cfg: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as {dotted key: value}; an empty group is a value of its own."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= config_leaves(v, key + ".")
        else:
            out[key] = v
    return out


def differing_keys(leaves: list[dict], skip: tuple[str, ...] = ()) -> list[str]:
    """The keys, in first-seen order, whose values differ between configs' ``config_leaves`` (compared as JSON, so
    a NaN equals itself), less those under ``skip`` (dotted keys or groups)."""
    keys = dict.fromkeys(k for lv in leaves for k in lv)
    return [
        k
        for k in keys
        if not any(k == p or k.startswith(p + ".") for p in skip)
        and len({json.dumps(lv.get(k), sort_keys=True, default=str) for lv in leaves}) > 1
    ]


def final_table(summary: dict, keys: list[str]) -> str:
    width = max(len(k) for k in keys)
    rows = []
    for k in keys:
        v = summary.get(k)
        shown = f"{v:.4g}" if isinstance(v, float) else str(v)
        rows.append(f"  {k:<{width}}  {shown}")
    return "\n".join(rows)


def wandb_project(configured: str | None) -> str:
    """The W&B project a run logs to: ``logger.project`` where given, else ``WANDB_PROJECT`` (W&B's own variable, which
    the dashboard and the notebook read too), else ``simpo-exp``."""
    import os

    return configured or os.environ.get("WANDB_PROJECT") or "simpo-exp"
