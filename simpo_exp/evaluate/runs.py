"""Find the runs under a path and rebuild what evaluating one needs from its saved config.

A run directory holds ``.hydra/config.yaml`` (the composed config it trained with, saved by Hydra before its
interpolations were resolved) and, when
it finished, ``model/`` (``save_pretrained``: weights, tokenizer and its chat template). The trained
policy is ``model.path=<run>/model`` with the saved tokenizer's own template; the starting policy is
the run's model config unchanged: the same ``model.path``, or for a random init the same shape and
``seed`` (``simpo_exp.model.load_model`` seeds torch with ``cfg.seed`` before building it).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from simpo_exp.config import Config, ConfigError
from simpo_exp.finished import FINISHED
from simpo_exp.model import saved_dtype
from simpo_exp.rundir import RUN_SEARCH_DEPTH, natural_order, other_stage_output, parse_yaml, read_yaml

HYDRA_RESOLVER = re.compile(r"\$\{hydra:([^}]+)\}")
SKIP = {"eval", "model", "wandb", "checkpoints", ".hydra", "compare"}
SECTIONS = ("model", "dataset", "hardware", "logger")


def find_runs(path: Path, depth: int = RUN_SEARCH_DEPTH) -> list[Path]:
    """Directories at or below ``path`` with a saved config (a run, a sweep, a folder of sweeps)."""
    path = Path(path)
    if (path / ".hydra" / "config.yaml").is_file():
        return [] if other_stage_output(path) else [path]  # a generate or evaluate output is not a training run
    if depth == 0 or not path.is_dir():
        return []
    # not hidden folders (submitit's .submitit/ in a sweep launched with +launcher=slurm or local)
    children = sorted(
        (p for p in path.iterdir() if p.is_dir() and p.name not in SKIP and not p.name.startswith(".")),
        key=natural_order,
    )
    return [run for child in children for run in find_runs(child, depth - 1)]


def has_model(run_dir: Path) -> bool:
    """A trained model of this run: its model/ beside a record training writes after it (``finished.json``, or
    ``summary.json`` for runs trained before finished.json was: both come once the model is written, and a fresh
    start removes them with an earlier model/). A model/ alone is a run's that failed while writing it."""
    m, run_dir = Path(run_dir) / "model", Path(run_dir)
    weights = (m / "config.json").is_file() or (m / "adapter_config.json").is_file()
    return weights and ((run_dir / FINISHED).is_file() or (run_dir / "summary.json").is_file())


def _known(section: str, node: dict) -> dict:
    """The keys of a saved section that the current schema declares (a newer or older run may hold others)."""
    node = dict(node or {})
    if section == "model" and "tiny" in node and "random_init" not in node:
        node["random_init"] = node.pop("tiny")  # runs saved before model.tiny was renamed
    fields = {f.name for f in dataclasses.fields(typing.get_type_hints(Config)[section])}
    return {k: v for k, v in node.items() if k in fields}


def as_trained(saved: dict, run_dir: Path) -> dict:
    """A run's saved config as training read it. Hydra saves the config unresolved, so ``${hydra:...}`` values
    (``${hydra:runtime.cwd}/models/x``) come from the run's own ``.hydra/hydra.yaml``, not from this command's
    Hydra, and a relative local path (``model.path=models/x``) is taken from the folder training ran in."""
    run_hydra = (read_yaml(Path(run_dir) / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}

    def hydra_value(match: re.Match) -> str:
        node = run_hydra
        for part in match.group(1).strip().split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return match.group(0) if node is None else str(node)

    def resolve(node):
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return HYDRA_RESOLVER.sub(hydra_value, node) if isinstance(node, str) else node

    saved = resolve(saved)
    cwd = (run_hydra.get("runtime") or {}).get("cwd")
    model = saved.get("model") or {}
    places = [(model, "path"), (model, "tokenizer_path")]
    places += [(source, "path") for source in ((saved.get("dataset") or {}).get("sources") or {}).values()]
    for place, key in places if cwd else []:
        path = place.get(key) if isinstance(place, dict) else None
        if isinstance(path, str) and path and not Path(path).is_absolute() and (Path(cwd) / path).exists():
            place[key] = str(Path(cwd) / path)
    return saved


def saved_config(run_dir: Path) -> dict:
    """The run's ``.hydra/config.yaml`` as training read it (``as_trained``)."""
    return as_trained(parse_yaml((Path(run_dir) / ".hydra" / "config.yaml").read_text()) or {}, run_dir)


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / ".hydra" / "config.yaml"
    try:
        saved = saved_config(run_dir)
        picked = {s: _known(s, saved.get(s)) for s in SECTIONS}
        picked["seed"] = saved.get("seed", 42)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), picked))
    except (OSError, yaml.YAMLError, ValueError, KeyError, TypeError, AttributeError) as e:  # the last two: a file
        # of another shape (a list where a mapping belongs, at the top or as a section)
        raise ConfigError(f"evaluate.path: cannot read the run's config {path} ({type(e).__name__}: {e})") from e


def for_inference(run_cfg: Config, device: str) -> Config:
    """The run's config for generating: no gradient checkpointing, no new LoRA adapters, transformers' own layer
    kernels, the chosen device."""
    cfg = copy.deepcopy(run_cfg)
    cfg.hardware.gradient_checkpointing = False
    cfg.hardware.checkpoint_every_n_layers, cfg.hardware.checkpoint_offload = 1, False  # valid without it
    cfg.hardware.lora = False
    cfg.hardware.fused_layers = "none"  # training kernels; the generating device may be a CPU
    cfg.hardware.device = device
    return cfg


def trained_policy(run_cfg: Config, run_dir: Path, device: str) -> Config:
    """The trained model (``<run>/model``) as the policy, loaded in the dtype it was saved in: a run trains float32
    master weights (a LoRA merge is stored in float32 too), and loading them in the run's ``model.dtype``
    (bfloat16 for the hub presets) would round most of a SimPO-size update away before any computation."""
    cfg = for_inference(run_cfg, device)
    model_dir = (Path(run_dir) / "model").resolve()
    cfg.model.path = str(model_dir)
    cfg.model.tokenizer_path, cfg.model.revision, cfg.model.chat_template = "", None, "auto"
    cfg.model.dtype = saved_dtype(model_dir) or cfg.model.dtype
    return cfg


def starting_policy(run_cfg: Config, device: str, run_dir: Path | None = None, what: str = "benchmark") -> Config:
    """The model the run started from, as it trained from it (``run_dir``'s ``env.json``, its first start): a hub
    model at the commit it read (an unpinned preset follows main, which may have moved since); a local folder only
    if its files are still those it read (an on-policy round's ``model.path`` is an earlier run's ``model/``, which
    a resumed or extended run rewrites): refused otherwise, as the comparison would be with other weights."""
    from simpo_exp.environment import first_start, local_model_files
    from simpo_exp.rundir import read_json

    cfg = for_inference(run_cfg, device)
    env = first_start(read_json(Path(run_dir) / "env.json")) if run_dir is not None else {}
    path = cfg.model.path
    if path and env.get("model_commit") and not Path(path).expanduser().is_dir():
        cfg.model.revision = env["model_commit"]
    recorded, now = env.get("model_files"), local_model_files(path) if path else None
    if isinstance(recorded, dict) and now is not None and recorded != now:
        changed = sorted(f for f in recorded.keys() | now.keys() if recorded.get(f) != now.get(f))
        raise ConfigError(
            f"{what}: the run trained from model.path={path}, whose files changed since it started "
            f"({', '.join(changed)} written, added or removed): the starting model to compare with is not there any "
            "more; put the model it started from back in that folder, or leave this benchmark out for this run"
        )
    return cfg


def run_name(run_cfg: Config, run_dir: Path) -> str:
    """The name training gave the run (its model card's and W&B run's): the one set in its config, else the one made
    from its overrides (Hydra saved the config before that name was filled in); the folder's as a last resort."""
    from simpo_exp.runinfo import run_name as name_from
    from simpo_exp.runinfo import swept_keys

    saved = read_yaml(Path(run_dir) / ".hydra" / "config.yaml")
    overrides = read_yaml(Path(run_dir) / ".hydra" / "overrides.yaml")
    if run_cfg.logger.run_name or not isinstance(overrides, list) or not isinstance(saved, dict):
        return run_cfg.logger.run_name or Path(run_dir).name
    swept = swept_keys(Path(run_dir).parent)  # a sweep's job: its folder is in the sweep's (multirun.yaml there)
    return name_from([str(o) for o in overrides], float(saved.get("sft_weight") or 0.0), swept)
