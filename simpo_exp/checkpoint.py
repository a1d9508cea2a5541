"""Atomic checkpoints and resuming from the newest complete one.

A checkpoint is a directory ``checkpoints/step-000050/`` holding

    model.safetensors       the policy's weights
    optimizer.safetensors   every tensor of the optimizer state (AdamW moments, steps)
    rng.safetensors         torch (and CUDA) generator states
    state.json              step, data position, scheduler state, the rest of the optimizer state,
                            python/numpy RNG states, the open logging window, and the run's config

Only safetensors and JSON are written (nothing is unpickled on resume). The directory is written
under a temporary name and renamed into place after a final ``COMPLETE`` marker, so a kill during
a save never leaves a checkpoint that looks complete. The newest ``save_total_limit`` are kept.

Sharded engines (FSDP, DeepSpeed ZeRO) hold no process's full weights or optimizer state, so their
checkpoints (``hardware.checkpoint_format=accelerate``) put ``model`` and ``optimizer`` in an
``engine/`` folder written by every process through ``accelerator.save_state`` (the engine's own
format, which pickles); ``rng.safetensors`` and ``state.json`` are as above. The same staging
directory, marker and rename make these atomic too. ``load`` reads either kind.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

MARKER = "COMPLETE"
ENGINE_DIR = "engine"  # accelerator.save_state's folder inside a sharded-engine checkpoint
# Keys that may change between a run and its resumption (cadence, logging, where it runs).
RESUMABLE_CHANGES = {
    "output_dir", "logger", "progress_bar", "resume", "logging_steps", "eval_steps", "save_steps",
    "save_total_limit", "save_model", "eval_on_start", "hardware", "max_bad_steps",
}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (incompatible config, unreadable files)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # micro-batches consumed (data position = this modulo batches per epoch)
    skipped_steps: int = 0
    window: dict = field(default_factory=dict)  # sums of the open logging window
    window_seconds: float = 0.0  # time spent in its steps so far (for tokens/s after a resume)
    window_steps: int = 0


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])]}
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))


def _split_optimizer_state(sd: dict) -> tuple[dict, dict]:
    """Optimizer state_dict -> (flat tensors, JSON-able rest)."""
    tensors, rest = {}, {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                rest.setdefault(str(pid), {})[name] = value
    return tensors, {"scalars": rest, "param_groups": sd["param_groups"]}


def _join_optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, scalars in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / MARKER).exists() and not p.name.endswith(".tmp")]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete (the same on every process)."""
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}.tmp"


def start(run_dir: Path, step: int) -> Path:
    """An empty staging directory for the checkpoint of ``step`` (main process only)."""
    tmp = staging_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish(run_dir: Path, tmp: Path, model, optimizer, scheduler, state: TrainState, config: dict, keep: int) -> Path:
    """Write the rest of the checkpoint into ``tmp``, mark it complete and move it into place (main
    process only). ``model`` and ``optimizer`` are None when the engine saved them in ``engine/``."""
    opt_meta = None
    if model is not None:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({
        "train_state": state.__dict__,
        "scheduler": scheduler.state_dict(),
        "optimizer": opt_meta,
        "rng": rng_meta,
        "config": config,
    }))
    (tmp / MARKER).write_text("")
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save(run_dir: Path, model, optimizer, scheduler, state: TrainState, config: dict, keep: int) -> Path:
    """A complete checkpoint of an unsharded model, written by one process."""
    return finish(run_dir, start(run_dir, state.step), model, optimizer, scheduler, state, config, keep)


def incompatible_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Config keys whose values differ, ignoring those a resumed run may change."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += incompatible_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


def load(path: Path, model, optimizer, scheduler, config: dict, load_engine_state=None) -> TrainState:
    """Restore everything from a checkpoint directory; refuse one written by a different config.
    ``load_engine_state``: ``accelerator.load_state``, called on every process, for a checkpoint with an
    ``engine/`` folder (then ``model`` and ``optimizer`` are not used)."""
    meta = json.loads((path / "state.json").read_text())
    diffs = incompatible_keys(meta["config"], config)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by a different config ({'; '.join(diffs)}). "
            "Run with resume=false to start fresh in this directory, or use another hydra.run.dir."
        )
    if (path / ENGINE_DIR).is_dir():
        if load_engine_state is None:
            raise CheckpointError(f"checkpoint {path} was saved by a sharded engine (its {ENGINE_DIR}/ folder); "
                                  "resume it with hardware.checkpoint_format=accelerate")
        load_engine_state(str(path / ENGINE_DIR))
    else:
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(_join_optimizer_state(load_file(path / "optimizer.safetensors"), meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(load_file(path / "rng.safetensors"), meta["rng"])
    return TrainState(**meta["train_state"])


def trim_metrics(metrics_path: Path, last_step: int) -> None:
    """Drop logged records after the checkpoint's step, so a resumed run logs each step once."""
    if not metrics_path.exists():
        return
    keep = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(metrics_path)
