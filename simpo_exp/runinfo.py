"""What only Hydra knows about a run: its directory, its name, its sweep. Filled into the config."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf


def run_name(overrides: list[str], sft_weight: float) -> str:
    """A readable name from the command-line overrides, e.g. ``beta=5,gamma_beta_ratio=0.3``."""
    parts = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(("hydra.", "output_dir="))]
    if sft_weight > 0 and not any(p.startswith("sft_weight=") for p in parts):
        parts.append(f"sft={sft_weight:g}")
    return ",".join(parts) or "default"


def fill_run_identity(cfg: DictConfig) -> DictConfig:
    """Resolve the config and set ``logger.run_name``/``logger.group`` from Hydra's state."""
    hc = HydraConfig.get()
    given = {o.lstrip("+~").split("=", 1)[0] for o in hc.overrides.task}
    if {"gamma", "gamma_beta_ratio"} <= given:
        from simpo_exp.config import ConfigError

        raise ConfigError("give gamma (absolute margin) or gamma_beta_ratio (gamma = beta * ratio), not both")
    OmegaConf.resolve(cfg)
    lc = cfg.logger
    if lc.get("run_name") is None:
        lc.run_name = run_name(list(hc.overrides.task), float(cfg.sft_weight))
    if lc.get("group") is None and hc.mode == RunMode.MULTIRUN:
        lc.group = "sweep-" + Path(hc.sweep.dir).name
    if hc.runtime.choices:
        picked = [f"{g}:{c}" for g, c in hc.runtime.choices.items() if not g.startswith("hydra") and c]
        lc.tags = list(lc.get("tags") or []) + picked
    return cfg


@contextlib.contextmanager
def user_errors(cfg: DictConfig):
    """Turn a failed job into a clear message and an ``error.json`` in its directory.

    A bad config value, a missing model or data file is the user's to fix: show the message,
    not a traceback. In a single run the process exits with status 2; in a sweep the error is
    recorded and raised again (a sweep callback decides what the rest of the sweep does).
    """
    try:
        yield
    except Exception as e:
        out = Path(HydraConfig.get().runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"error": str(e), "type": type(e).__name__, "overrides": list(HydraConfig.get().overrides.task)}
        (out / "error.json").write_text(json.dumps(record, indent=2))
        if HydraConfig.get().mode == RunMode.RUN and _is_user_error(e):
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        raise


def _is_user_error(e: Exception) -> bool:
    from simpo_exp.checkpoint import CheckpointError
    from simpo_exp.config import ConfigError
    from simpo_exp.data import DataSourceError
    from simpo_exp.model import ModelNotFoundError
    from simpo_exp.train import NonFiniteError

    return isinstance(e, (ConfigError, DataSourceError, ModelNotFoundError, CheckpointError, NonFiniteError))
