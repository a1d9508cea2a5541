"""The evaluation results file: one format, written by the evaluate stage, read by compare and the model card.

Layout in a run directory::

    eval/<benchmark>/results.json     {"benchmark", "kind", "metrics": {name: number or null}, ...}
    eval/<benchmark>/...              generations, judgements (the benchmark's own files)

``metrics`` holds plain numbers: win rates in percent (as AlpacaEval and Arena-Hard report them),
scores and lengths as measured; a metric that could not be computed is null and ``notes`` says why.
``read_results(run_dir)`` flattens every benchmark's metrics to ``bench/<benchmark>/<name>`` so they
sit beside the reward metrics of ``summary.json`` (``python -m simpo_exp.compare --metric
bench/rule/win_rate``).
"""

from __future__ import annotations

import math
from pathlib import Path

from simpo_exp.rundir import read_json_value

PREFIX = "bench/"
EVAL_DIR = "eval"
# The numbers the runs of a sweep are ranked by (compare's and the dashboard's table columns): win rates.
HEADLINE = ("lc_win_rate", "win_rate")  # AlpacaEval 2's length-controlled one first: its headline, and the paper's


# decoding settings the answers do not depend on: left out of the answers' manifest (a run killed for memory resumes
# with a smaller batch) and of the decoding a results file records, so that compare does not tell such runs apart
FREE_DECODING = ("batch_size", "vllm_gpu_memory_utilization")


def answer_decoding(decoding: dict) -> dict:
    """``decoding`` without the settings the answers do not depend on (``FREE_DECODING``). But for the batch size of
    answers sampled by the ``hf`` backend: one random stream per shard, drawn batch after batch, so other batches
    draw other answers (greedy ones are the same, and vLLM seeds each request; its logits, and so rarely an answer,
    may still move with the batch outside vLLM's batch-invariant mode)."""
    sampled = (decoding.get("temperature") or 0) > 0 and decoding.get("backend", "hf") == "hf"
    return {k: v for k, v in decoding.items() if k not in FREE_DECODING or (sampled and k == "batch_size")}


def results_path(run_dir: Path, benchmark: str) -> Path:
    return Path(run_dir) / EVAL_DIR / benchmark / "results.json"


def set_aside(run_dir: Path, benchmark: str) -> None:
    """Move a benchmark's ``results.json`` to ``results.previous.json`` while it is evaluated again: an evaluation
    that fails (a judge down, a crash) then leaves no result of other settings or weights that compare and the
    model card would show beside the new answers; one that succeeds writes its own."""
    path = results_path(run_dir, benchmark)
    if path.is_file():
        path.replace(path.with_name("results.previous.json"))


def load_results(run_dir: Path) -> dict[str, dict]:
    """``{benchmark: results.json contents}`` for every benchmark evaluated in ``run_dir``."""
    out = {}
    for path in sorted((Path(run_dir) / EVAL_DIR).glob("*/results.json")):
        record = read_json_value(path)  # a half-written file is never left (atomic writes)
        if isinstance(record, dict):  # an unreadable one, or one of another shape (a list), is skipped
            out[path.parent.name] = record
    return out


def read_results(run_dir: Path) -> dict[str, float]:
    """Every finite metric of every benchmark as ``{"bench/<benchmark>/<name>": value}``."""
    flat = {}
    for bench, record in load_results(run_dir).items():
        for name, value in (record.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                flat[f"{PREFIX}{bench}/{name}"] = float(value)
    return flat


def uncertainty_keys(metric: str) -> list[str]:
    """The keys of the same results that say how far ``metric`` is to be trusted: AlpacaEval's standard errors
    (``standard_error`` of ``win_rate``, ``lc_standard_error`` of ``lc_win_rate``, in percent as alpaca-eval reports
    them), Arena-Hard's 95% bootstrap interval (``win_rate_ci_low``, ``win_rate_ci_high``), lm-eval's
    ``<metric>_stderr:<filter>`` of ``<metric>:<filter>``."""
    head, _, name = metric.rpartition("/")
    at = f"{head}/" if head else ""
    if name == "lc_win_rate":
        return [f"{at}lc_standard_error"]
    if name == "win_rate":
        return [f"{at}standard_error", f"{at}win_rate_ci_low", f"{at}win_rate_ci_high"]
    score, colon, lm_filter = name.partition(":")
    return [f"{at}{score}_stderr:{lm_filter}"] if colon and not score.endswith("_stderr") else []


def is_standard_error(metric: str) -> bool:
    """AlpacaEval's ``standard_error``/``lc_standard_error``, lm-eval's ``<metric>_stderr:<filter>``."""
    name = metric.rpartition("/")[2]
    return name in ("standard_error", "lc_standard_error") or name.partition(":")[0].endswith("_stderr")


def is_uncertainty(metric: str) -> bool:
    """Whether ``metric`` is a standard error or an interval bound of another (``uncertainty_keys``), not a result."""
    return is_standard_error(metric) or metric.rpartition("/")[2] in ("win_rate_ci_low", "win_rate_ci_high")


# lm-eval's scores where lower is better (higher_is_better false in its tasks): lambada's and wikitext's
# perplexities, bits per byte, the translation tasks' TER
LOWER_IS_BETTER_SCORES = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter")


def is_lower_score(metric: str) -> bool:
    """Whether ``metric`` (``.../<task>/<metric>:<filter>``) is one of lm-eval's lower-is-better scores."""
    return metric.rpartition("/")[2].partition(":")[0] in LOWER_IS_BETTER_SCORES


def is_bench_metric(name: str) -> bool:
    return name.startswith(PREFIX) and name.count("/") >= 2


def headline_keys(keys) -> list[str]:
    """The ``bench/<benchmark>/<metric>`` keys among ``keys`` that are win rates, no repeats: benchmarks in
    first-seen order, each one's in ``HEADLINE`` order (a length-controlled win rate before the raw one, which
    favours long answers), so that the first key is the one to rank by."""
    found = [k for k in dict.fromkeys(keys) if is_bench_metric(k) and k.rsplit("/", 1)[-1] in HEADLINE]
    first = {}
    for k in found:
        first.setdefault(k.rsplit("/", 1)[0], len(first))
    return sorted(found, key=lambda k: (first[k.rsplit("/", 1)[0]], HEADLINE.index(k.rsplit("/", 1)[-1])))
