"""Capability retention through lm-evaluation-harness (``pip install lm-eval``), offline only.

The run's model is evaluated with lm-eval's ``hf`` model on the configured tasks (GSM8K etc.) with
the hub switched off: a task whose data set is not already in the local Hugging Face cache is refused
before any run is evaluated (lm-eval builds the tasks once at the start), and nothing downloads.
huggingface_hub and datasets read HF_HUB_OFFLINE only when they are imported (long before this stage runs), so
their offline flags are set directly for the call, beside the environment variables, and put back after it.

The model goes to lm-eval as ``model_args={"pretrained": path, "dtype": ...}``, a dict (lm-eval 0.4 takes one):
its string form ``"pretrained=<path>"`` is split at commas, and sweep job directories hold commas
(``0_beta=2,gamma_beta_ratio=0.3``). The dtype is the one the evaluate stage's own sampler generates in (the
autocast training used, on a GPU; the saved weights' dtype elsewhere): lm-eval's "auto" would take the saved
float32 master weights as they are on a GPU, at twice the memory and time of the bf16 the run trained in.
"""

from __future__ import annotations

import contextlib
import os

from simpo_exp.config import ConfigError
from simpo_exp.data.sources import DataSourceError


def _flat_metrics(results: dict, asked: list | tuple = (), n_samples: dict | None = None) -> dict:
    """``{"<task>/<metric>:<filter>": value}`` for lm-eval's scores (its ``metric,filter`` keys), then their standard
    errors (``<task>/<metric>_stderr:<filter>``, where lm-eval gives a number, not "N/A"), and ``<task>/n`` for the
    number of samples scored: the ``effective`` count of lm-eval's ``n-samples`` (``n_samples``), else a count in
    the task's results (0.4.13's ``sample_len``, not a score; 0.4.8 takes its ``samples`` out of the results it
    returns, leaving ``n-samples`` alone). The tasks ``asked`` come first: lm-eval lists a group's
    subtasks before the group (``mmlu_abstract_algebra`` before ``mmlu``), and runs are ranked by the first score."""
    out, errors, counts = {}, {}, {}
    first = [t for t in asked if t in results]
    for task in [*first, *(t for t in results if t not in first)]:
        metrics = results[task]
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key in ("samples", "sample_len"):  # lm-eval's count of the samples scored (named either way)
                counts[f"{task}/n"] = float(value)
            elif "," in key:
                into = errors if key.partition(",")[0].endswith("_stderr") else out
                into[f"{task}/{key.replace(',', ':')}"] = float(value)
    for task, n in (n_samples or {}).items():  # {"original": the task's size, "effective": scored (under a limit)}
        if task in results and isinstance(n, dict) and isinstance(n.get("effective"), int):
            counts[f"{task}/n"] = float(n["effective"])
    return out | errors | counts  # the scores first: the first one is what runs are ranked by


def check_tasks(b):
    """Refuse, before the model loads, a task lm-eval does not know (lm-eval ends with a KeyError deep in its
    task registry otherwise); return lm-eval's task manager (None where it has none)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:  # an lm-eval without its task manager: lm-eval itself says so later
        return None
    manager = TaskManager()  # it reads every task's YAML (seconds): handed on to check_task_data
    known = set(manager.all_tasks)
    unknown = [t for t in b.tasks if t not in known]
    if unknown:
        raise ConfigError(
            f"invalid config value benchmarks.{b.name}.tasks={list(b.tasks)}: lm-eval has no task {unknown}; "
            "`lm_eval --tasks list` lists them"
        )
    return manager


def check_task_data(b, manager) -> None:
    """Refuse, before any run is evaluated, a task whose data set is not in the local Hugging Face cache: lm-eval
    builds its tasks with ``manager`` (``check_tasks``'s; each task loads its data set) with the hub off, as the
    evaluation itself will. It was found at the lm-eval benchmark's turn, after every run had generated and been
    judged for the benchmarks before it."""
    try:
        from lm_eval.tasks import get_task_dict
    except ImportError:  # an lm-eval without it: its own evaluation says so later
        return
    if manager is None:
        return
    try:
        with offline():
            get_task_dict(list(b.tasks), manager)
    except Exception as e:
        raise_if_not_cached(b, e)
        raise


def raise_if_not_cached(b, e: Exception) -> None:
    """A :class:`DataSourceError` naming the benchmark's tasks when ``e`` is the hub's or datasets' way of saying a
    data set is not on this machine; nothing otherwise."""
    text = f"{type(e).__name__}: {e}"
    if any(
        w in text for w in ("offline", "Offline", "ConnectionError", "not found", "Couldn't find", "LocalEntryNotFound")
    ):
        raise DataSourceError(
            f"benchmarks.{b.name}.tasks={list(b.tasks)}: a task's data set is not on this machine "
            f"({text[:300]}); download it once where there is a network (it lands in the "
            "Hugging Face cache) and copy the cache here"
        ) from e


def settings(b, policy_cfg) -> dict:
    """What lm-eval is run with, for results.json (its own generation settings are the task's, not ``decoding``)."""
    return {
        "tasks": list(b.tasks),
        "num_fewshot": b.num_fewshot,
        "limit": b.limit,
        "apply_chat_template": b.apply_chat_template,
        # the few-shot examples as turns of the conversation where the chat template applies, given rather than left
        # to lm-eval's default (False in 0.4.3's simple_evaluate and CLI, where the option came in; later releases
        # differ): one user turn instead is a format that moves the score
        "fewshot_as_multiturn": bool(b.apply_chat_template),
        "batch_size": b.decoding.batch_size,
        "device": lm_eval_device(policy_cfg),
        "dtype": lm_eval_dtype(policy_cfg),
    }


def takes(function, name: str) -> bool:
    """Whether ``function`` accepts the keyword argument ``name``."""
    import inspect

    params = inspect.signature(function).parameters
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def lm_eval_device(policy_cfg) -> str:
    return "cuda" if policy_cfg.hardware.device != "cpu" and _cuda() else "cpu"


def lm_eval_dtype(policy_cfg) -> str:
    """The dtype the model is loaded in: the one the evaluate stage's sampler generates in (``sampling_dtype``: a
    bf16 model trained under hardware.master_weights=fp32 is sampled in float32 where nothing autocasts, and was
    given to lm-eval in bf16)."""
    import torch

    from simpo_exp.inference.sampling import sampling_dtype

    if policy_cfg.model.dtype == "auto":
        return "auto"
    return str(sampling_dtype(policy_cfg, torch.device(lm_eval_device(policy_cfg)))).removeprefix("torch.")


def check_installed(b) -> None:
    """Refuse a ``kind=lm_eval`` benchmark where lm-evaluation-harness is not installed (before any run is
    evaluated: it was found only at this benchmark's turn, after the others had run)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"benchmarks.{b.name}: kind=lm_eval needs lm-evaluation-harness: pip install lm-eval "
            "(its task data sets must be in the local Hugging Face cache: nothing is downloaded)"
        ) from e


def run_lm_eval(b, policy_cfg, out_dir) -> dict:
    check_installed(b)
    import lm_eval

    ran_with = settings(b, policy_cfg)
    check_tasks(b)
    multiturn = ran_with["fewshot_as_multiturn"]
    if multiturn and not takes(lm_eval.simple_evaluate, "fewshot_as_multiturn"):
        raise ConfigError(
            f"benchmarks.{b.name}.apply_chat_template=true needs lm-eval >= 0.4.3 (the few-shot examples as turns "
            "of the conversation, fixed here so that the score does not move with lm-eval's default): "
            "pip install -U lm-eval"
        )
    extra = {"fewshot_as_multiturn": multiturn} if multiturn else {}
    try:
        with offline():
            res = lm_eval.simple_evaluate(
                model="hf",
                model_args={
                    "pretrained": policy_cfg.model.path,
                    "dtype": ran_with["dtype"],
                    # a model of its own code, as the answer samplers load it (lm-eval's HFLM refuses it by default)
                    **({"trust_remote_code": True} if policy_cfg.model.trust_remote_code else {}),
                },
                tasks=list(b.tasks),
                num_fewshot=b.num_fewshot,
                limit=b.limit,
                device=ran_with["device"],
                batch_size=b.decoding.batch_size,
                apply_chat_template=b.apply_chat_template,
                **extra,
            )
    except Exception as e:  # lm-eval raises from datasets/hub code when a data set is not cached
        raise_if_not_cached(b, e)
        raise
    from simpo_exp.inference.files import write_json

    kept = ("results", "versions", "n-shot", "n-samples")
    write_json(out_dir / "lm_eval_results.json", {k: res[k] for k in kept if k in res})
    notes = [f"limit={b.limit}: {b.limit} samples per task, not the whole task"] if b.limit else []
    return {
        "metrics": _flat_metrics(res.get("results", {}), list(b.tasks), res.get("n-samples")),
        "notes": notes,
        "baseline": None,
        "lm_eval": ran_with,
    }


@contextlib.contextmanager
def offline():
    """The Hugging Face hub switched off inside the block: the environment variables and the flags that
    huggingface_hub and datasets read them into at import; all put back afterwards."""
    from simpo_exp.hub import OFFLINE_ENV, offline_flags

    flags = offline_flags()
    saved_flags = [getattr(module, name) for module, name in flags]
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(dict.fromkeys(saved_env, "1"))
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags):
            setattr(module, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
