"""What a run ran on (``env.json``): packages, devices, precision, attention, code version, data.

Results that do not reproduce are most often package drift or a different set-up; this record
lets two runs be compared on more than their configs.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from simpo_exp.hub import hub_commit
from simpo_exp.model import checkpointed_layers
from simpo_exp.precision import precision_record

PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "tokenizers",
    "hydra-core",
    "omegaconf",
    "wandb",
    "peft",
    "deepspeed",
    "flash-attn",
    "liger-kernel",
    "trl",
    "simpo-exp",
)


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    # the build that runs, with its local tag: PyPI's CUDA wheels say "2.11.0" in their metadata, "2.11.0+cu130" here
    out["torch"] = torch.__version__
    return out


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes); None for an installed wheel, whose folder
    (site-packages) may sit inside another repository (a virtual environment in a project's checkout)."""
    from simpo_exp.rundir import PROJECT_DIR

    root = PROJECT_DIR
    if not (root / "pyproject.toml").is_file():
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment_record(cfg, accelerator, model, data_report, layout=None) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch_cuda": torch.version.cuda,
        "device": str(accelerator.device),
        "device_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [platform.processor() or platform.machine()],
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "mixed_precision": accelerator.mixed_precision,
        # as the model runs it: packed layouts wrap the kernel ("simpo_segments:<model>:sdpa")
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "batch_layout": layout.as_dict() if layout is not None else None,
        "gradient_checkpointing": cfg.hardware.gradient_checkpointing,
        "checkpointed_layers": checkpointed_layers(model),
        "checkpoint_offload": cfg.hardware.checkpoint_offload,
        "fused_layers": cfg.hardware.fused_layers,
        "model_dtype": str(next(model.parameters()).dtype),
        "precision": precision_record(model, accelerator),
        "git_commit": git_commit(),
        # the hub commit the model's files were read from (an unpinned preset follows main; None: not a hub model)
        "model_commit": hub_commit(cfg.model.path, cfg.model.revision) if cfg.model.path else None,
        # a local model folder's files as they were (name: [bytes, modified]): the starting model the evaluate
        # stage compares with must be these (a resume checks its reference's weights themselves: check_same_start)
        "model_files": local_model_files(cfg.model.path) if cfg.model.path else None,
        "data": {"sources": data_report.sources, "pairs_after_filtering": data_report.kept},
    }


# what can make a resumed run's later steps differ from what its first start would have done
DRIFT_KEYS = (
    "packages",
    "torch_cuda",
    "device_names",
    "num_processes",
    "distributed_type",
    "git_commit",
    "model_commit",
)

# what a saved model's weights and shape are read from (not its tokenizer, chat template or generation settings)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def local_model_files(path: str) -> dict[str, list[int]] | None:
    """A local model folder's weight files, their index and ``config.json`` as ``{name: [bytes, modified (ns)]}``:
    read from the folder's listing, not its contents, so it costs nothing for a 70B model; a file written again
    shows a new time. None for a hub id, or a folder that cannot be listed."""
    folder = Path(path).expanduser()
    try:
        if not folder.is_dir():
            return None
        return {
            f.name: [f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(folder.iterdir())
            if f.is_file()
            and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json" or f.name.endswith(".index.json"))
        }
    except OSError:  # unreadable, or a file gone while listed: no record (nothing is held to it later)
        return None


def first_start(env: dict) -> dict:
    """A run's first start as its ``env.json`` records it (a resumed run keeps it first in ``earlier_starts``)."""
    earlier = env.get("earlier_starts") or []
    return earlier[0] if earlier and isinstance(earlier[0], dict) else env


def with_earlier_starts(env: dict, earlier: dict, step: int) -> tuple[dict, list[str]]:
    """A resumed run's ``env.json``: this start's record (``started_at_step``: the checkpoint it resumed from),
    the earlier starts' records in ``earlier_starts``, oldest first, and the ``DRIFT_KEYS`` on which this start
    differs from the last one (named for a warning). ``earlier``: the file as the last start left it ({} if none)."""
    env = env | {"started_at_step": step}
    if not isinstance(earlier, dict) or not earlier or step == 0:  # a fresh start, or one before any checkpoint
        return env, []
    starts = [*earlier.get("earlier_starts", []), {k: v for k, v in earlier.items() if k != "earlier_starts"}]
    env["earlier_starts"] = starts
    changed = []
    for key in DRIFT_KEYS:
        before, now = earlier.get(key), env.get(key)
        if key == "packages" and isinstance(before, dict) and isinstance(now, dict):
            changed += [f"{p} {before.get(p)} -> {now.get(p)}" for p in now if before.get(p) != now.get(p)]
        elif before != now:
            changed.append(f"{key} {before} -> {now}")
    return env, changed
