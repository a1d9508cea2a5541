"""Capability retention through lm-evaluation-harness (``pip install lm-eval``), offline only.

The run's model is evaluated with lm-eval's ``hf`` model on the configured tasks (GSM8K etc.) with
the hub switched off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE): a task whose data set is not already in
the local Hugging Face cache fails with a message naming that data set, and nothing downloads.
"""

from __future__ import annotations

import os

from simpo_exp.config import ConfigError
from simpo_exp.data.sources import DataSourceError


def _flat_metrics(results: dict) -> dict:
    """``{"<task>/<metric>": value}`` for lm-eval's numeric results (its ``metric,filter`` keys kept whole)."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key:
                out[f"{task}/{key.replace(',', ':')}"] = float(value)
    return out


def run_lm_eval(b, policy_cfg, out_dir) -> dict:
    try:
        import lm_eval
    except ImportError as e:
        raise ConfigError(
            f"benchmarks.{b.name}: kind=lm_eval needs lm-evaluation-harness: pip install lm-eval "
            "(its task data sets must be in the local Hugging Face cache: nothing is downloaded)"
        ) from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    device = "cuda" if policy_cfg.hardware.device != "cpu" and _cuda() else "cpu"
    try:
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={policy_cfg.model.path}",
            tasks=list(b.tasks),
            num_fewshot=b.num_fewshot,
            limit=b.limit,
            device=device,
            apply_chat_template=b.apply_chat_template,
        )
    except Exception as e:  # lm-eval raises from datasets/hub code when a data set is not cached
        text = f"{type(e).__name__}: {e}"
        if any(
            w in text
            for w in ("offline", "Offline", "ConnectionError", "not found", "Couldn't find", "LocalEntryNotFound")
        ):
            raise DataSourceError(
                f"benchmarks.{b.name}.tasks={list(b.tasks)}: a task's data set is not on this machine "
                f"({text[:300]}); download it once where there is a network (it lands in the "
                "Hugging Face cache) and copy the cache here"
            ) from e
        raise
    from simpo_exp.inference.files import write_json

    write_json(out_dir / "lm_eval_results.json", {k: res[k] for k in ("results", "versions", "n-shot") if k in res})
    return {"metrics": _flat_metrics(res.get("results", {})), "notes": [], "baseline": None}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
