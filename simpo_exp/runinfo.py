"""What only Hydra knows about a run: its directory, its name, its sweep. Filled into the config."""

from __future__ import annotations

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
