"""Atomic checkpoints and resuming from the newest complete one.

A checkpoint is a directory ``checkpoints/step-000050/`` holding

    model.safetensors       the policy's weights (under LoRA the trained adapters alone; the frozen base is
                            recorded in state.json by a hash of its values and must be the same on resume)
    optimizer.safetensors   every tensor of the optimizer state (AdamW moments, steps)
    rng.safetensors         torch (and CUDA) generator states of every process
    state.json              step, data position, scheduler state, the rest of the optimizer state,
                            python/numpy RNG states and the open logging window (of every process),
                            and the run's config

Only safetensors and JSON are written (nothing is unpickled on resume). The directory is written
under a temporary name and renamed into place after a final ``COMPLETE`` marker, so a kill during
a save never leaves a checkpoint that looks complete. The newest ``save_total_limit`` are kept.

Sharded engines (FSDP, DeepSpeed ZeRO) hold no process's full weights or optimizer state, so their
checkpoints (``hardware.checkpoint_format=accelerate``) put ``model`` and ``optimizer`` in an
``engine/`` folder written by every process through ``accelerator.save_state`` (the engine's own
format, which pickles); ``rng.safetensors`` and ``state.json`` are as above. The same staging
directory, marker and rename make these atomic too. ``load`` reads either kind.

The marker lists every file written into the checkpoint with its size and checksum (xxHash's
XXH3-128, ``"algorithm": "xxh3_128"``; markers that name no algorithm hold SHA-256 and are checked
with it), so a file damaged later (a truncated copy, a disk error) is noticed on resume:
``load_newest`` skips such a checkpoint with a warning and falls back to the newest intact one. A
save that fails (disk full, no permission) removes its staging directory, leaves the earlier
checkpoints as they were and raises ``CheckpointSaveError`` with the bytes needed and free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xxhash
from omegaconf import MISSING
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from simpo_exp.config import schema_default
from simpo_exp.errors import OtherRunsDirectory, UserError
from simpo_exp.flops import full_numel
from simpo_exp.inference.files import readable_as_umask, write_atomic
from simpo_exp.memory import Engine, state_bytes
from simpo_exp.rundir import (
    CHECKPOINT_MARKER,
    RESUMABLE_CHANGES,
    checkpoint_dirs,
    read_jsonl,
    rerun_command,
    step_of,
)

log = logging.getLogger(__name__)

MARKER = CHECKPOINT_MARKER
# Checksums a marker may name. Saves write xxh3_128: 5.1 GB/s from the page cache on one core here, against
# SHA-256's 1.1 (benchmarks/bench_hash.py, benchmarks/RESULTS.md). "sha256": markers written before it.
HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
HASH = "xxh3_128"
LEGACY_HASH = "sha256"  # a marker without "algorithm"
ENGINE_DIR = "engine"  # accelerator.save_state's folder inside a sharded-engine checkpoint
PLAIN = "plain"  # a checkpoint's engine when this module wrote its weights and optimizer (safetensors)
# What a failed checkpoint write raises: the OS's error, or safetensors' own for one it met while writing (a full
# disk under safetensors is a SafetensorError, not an OSError)
WRITE_ERRORS = (OSError, SafetensorError)
# The hardware keys that change what is trained (the batch, its order, the weights' precision, the adapters);
# the others say how and where it runs (device, kernels, layouts, checkpointing, engine), which a resumed run
# may change: on another machine, with another attention kernel.
TRAINING_HARDWARE_KEYS = {
    "master_weights",
    "effective_batch_size",
    "group_by_length",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used (incompatible config, unreadable files) or written."""


class DifferentConfigCheckpoint(CheckpointError, OtherRunsDirectory):
    """A checkpoint written by another config: the run in the directory is not this command's."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint's files do not match its marker, or cannot be read."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, permissions, I/O); the earlier ones are untouched."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # micro-batches consumed (data position = this modulo batches per epoch)
    skipped_steps: int = 0
    window: list = field(default_factory=list)  # each process's sums of the open logging window (metrics.Window)
    window_seconds: float = 0.0  # time spent in its steps so far (for tokens/s after a resume)
    window_steps: int = 0
    num_tokens: float = 0.0  # input tokens of the logged training steps (TRL's num_tokens)
    epoch_batches: int = 0  # micro-batches trained per epoch (train.epoch_batches); 0: written before it was kept
    runtime_s: float = 0.0  # the run's seconds up to this checkpoint, over all its starts (summary's runtime_s)
    eval_owed: int = 0  # a step whose eval a stop signal put off (saved first): the resumed run evaluates it first
    bad_in_a_row: int = 0  # non-finite steps up to this one in a row (max_bad_steps counts on across a resume)
    compile_warmup_s: float = 0.0  # the compile warm-up of the run's starts up to this checkpoint (summary's)
    compile_warmup_steps: int = 0
    # fp16's loss scale and the steps it has grown over (accelerate's GradScaler.state_dict; {}: no scaler): a
    # resumed run went back to 65536, skipping steps to overflow again where the scale had settled lower
    grad_scaler: dict = field(default_factory=dict)


def rng_state() -> tuple[dict, dict]:
    """This process's generator states: (tensors, JSON-able rest). A checkpoint keeps every process's."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's own device's (accelerate sets it current), which it draws from:
        tensors["cuda"] = torch.cuda.get_rng_state()  # every visible device's did not go back where fewer were seen
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
    }
    return tensors, meta


def _set_rng_state(tensors: dict, meta: list | dict, process: tuple[int, int]) -> None:
    """Restore process ``process`` = (index, count)'s generators: its own states, saved under "<index>." (``load``
    refuses a checkpoint of another number of processes). A dict ``meta`` (a checkpoint written before every
    process's states were kept) holds one process's, under unprefixed names."""
    if isinstance(meta, list):  # every process's states: take this one's
        rank = process[0]
        tensors = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(rank)}
        meta = meta[rank]
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        # onto this process's device; a checkpoint written before holds every visible device's ("cuda.<i>"): its own
        # device's state, where that device is this one's number
        own = tensors.get("cuda")
        own = tensors.get(f"cuda.{torch.cuda.current_device()}") if own is None else own
        if own is not None:
            torch.cuda.set_rng_state(own)
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


def regrouped(saved: dict, optimizer, model) -> dict:
    """An optimizer state_dict ``saved`` for ``optimizer``'s parameter groups where it holds all of ``model``'s
    parameters in one group, as checkpoints written before weight decay left biases and norms out
    (``engine.adamw``) do: each parameter's moments go to the group it is in now. Else ``saved`` as it is."""
    groups, order = optimizer.param_groups, {id(p): i for i, p in enumerate(model.parameters())}
    if len(saved["param_groups"]) != 1 or len(groups) == 1 or len(saved["param_groups"][0]["params"]) != len(order):
        return saved  # nothing to do, or not that case: torch's load names what differs
    old = saved["param_groups"][0]
    if sum(len(g["params"]) for g in groups) != len(order) or any(
        id(p) not in order for g in groups for p in g["params"]
    ):
        return saved
    state, new_groups, ids = {}, [], iter(range(len(order)))
    for group in groups:
        numbers = [next(ids) for _ in group["params"]]
        for n, p in zip(numbers, group["params"]):
            if (was := old["params"][order[id(p)]]) in saved["state"]:
                state[n] = saved["state"][was]
        new_groups.append({**old, "weight_decay": group["weight_decay"], "params": numbers})
    return {"state": state, "param_groups": new_groups}


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete (the same on every process)."""
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}.tmp"


def final_dir(staging: Path) -> Path:
    """Where the checkpoint written in ``staging`` (a ``staging_dir``) lands once it is complete."""
    return staging.with_name(staging.name.removesuffix(".tmp"))


def start(run_dir: Path, step: int, estimate: int | None = None) -> Path:
    """An empty staging directory for the checkpoint of ``step`` (main process only); ``CheckpointSaveError``
    if it cannot be made (``estimate``: bytes a checkpoint takes, for its message)."""
    tmp = staging_dir(run_dir, step)
    try:
        # this one's, and those a save cut short left (a kill in the grace period after a stop signal): one save
        # runs at a time, so any staging folder is stale, and each may hold a model's worth of bytes
        for stale in tmp.parent.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise save_failed(run_dir, tmp, e, estimate) from e
    return tmp


def finish(
    run_dir: Path,
    tmp: Path,
    model,
    optimizer,
    scheduler,
    state: TrainState,
    config: dict,
    keep: int,
    estimate: int | None = None,
    rng: list | None = None,
    engine: str = PLAIN,
) -> Path:
    """Write the rest of the checkpoint into ``tmp``, mark it complete (listing each file's size and
    checksum) and move it into place (main process only). ``model`` and ``optimizer`` are None when
    the engine saved them in ``engine/``. A write that fails removes ``tmp`` and raises
    ``CheckpointSaveError``; ``estimate``: bytes a checkpoint takes, for its message. ``rng``: every
    process's ``rng_state()``, in rank order (None: this process is the only one). ``engine``: what wrote the
    weights and optimizer (``PLAIN``: this module's safetensors; else the accelerate engine whose ``engine/``)."""
    final = final_dir(tmp)
    try:
        _write(tmp, model, optimizer, scheduler, state, config, rng or [rng_state()], engine)
        readable_as_umask(tmp)  # the engine's files too
        # every file on the disk before the marker says the checkpoint is whole, and the marker before the rename
        # (write_atomic flushes it): a machine going down in the page cache's write-back left a marker over files
        # never written (their checksums fail, and the older checkpoint to fall back to is pruned just below), or an
        # empty marker, which reads as a checkpoint from before checksums, its files taken unchecked
        _sync_tree(tmp)
        write_atomic(tmp / MARKER, json.dumps({"algorithm": HASH, "files": manifest(tmp)}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _sync_folder(final.parent)
    except WRITE_ERRORS as e:
        raise save_failed(run_dir, final, e, estimate) from e
    # the older ones past ``keep`` go; the new one stays, and so does any of a later step (one the resume passed
    # over as damaged, replaced when the run saves that step again): keeping the highest steps would delete the
    # checkpoint just written and leave the damaged one alone
    older = [d for d in checkpoint_dirs(run_dir) if step_of(d) < step_of(final)]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(
    tmp: Path, model, optimizer, scheduler, state: TrainState, config: dict, rng: list, engine: str = PLAIN
) -> None:
    opt_meta = frozen = None
    if model is not None:
        frozen = frozen_weights(model)
        if frozen:  # LoRA: the adapters alone (an 8B base is 16 GB a checkpoint), the frozen base by its hash
            save_file(
                {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                tmp / "model.safetensors",
            )
        else:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
    every_process = {f"{rank}.{k}": v for rank, (tensors, _) in enumerate(rng) for k, v in tensors.items()}
    save_file(every_process, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(
        json.dumps(
            {
                "train_state": state.__dict__,
                "scheduler": scheduler.state_dict(),
                "optimizer": opt_meta,
                "rng": [meta for _, meta in rng],
                "config": config,
                "engine": engine,
                **({"frozen_weights": frozen} if frozen else {}),
            }
        )
    )


def save(
    run_dir: Path, model, optimizer, scheduler, state: TrainState, config: dict, keep: int, rng: list | None = None
) -> Path:
    """A complete checkpoint of an unsharded model, written by one process (``rng``: see ``finish``)."""
    estimate = estimated_bytes(model)
    tmp = start(run_dir, state.step, estimate)
    return finish(run_dir, tmp, model, optimizer, scheduler, state, config, keep, estimate, rng)


def _sync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` (an engine's shards included) and the folders holding them to the disk."""
    below = sorted(folder.rglob("*"))
    for path in (p for p in below if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    for sub in [folder, *(p for p in below if p.is_dir())]:
        _sync_folder(sub)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to the disk, where the system lets a folder be opened for it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that does not sync folders
        pass
    finally:
        os.close(fd)


def save_failed(
    run_dir: Path, path: Path, error: Exception, estimate: int | None, remove: bool = True
) -> CheckpointSaveError:
    """Remove the half-written staging directory of checkpoint ``path`` (unless not ``remove``: other processes
    may still be writing there); the error that stops the run, with the bytes a checkpoint takes (the newest
    complete one's size, else ``estimate``) and the bytes free."""
    path = final_dir(path)
    if remove:
        shutil.rmtree(path.with_name(path.name + ".tmp"), ignore_errors=True)
    done = checkpoint_dirs(run_dir)
    needed = dir_bytes(done[-1]) if done else estimate
    free = shutil.disk_usage(path.parent if path.parent.exists() else run_dir).free
    filename, reason = getattr(error, "filename", None), getattr(error, "strerror", None) or error
    where = f" ({filename})" if filename else ""
    return CheckpointSaveError(
        f"could not write checkpoint {path}{where}: {reason}. A checkpoint needs about "
        f"{_size(needed)} and {_size(free)} are free there. The earlier checkpoints are untouched "
        f"(newest: {done[-1] if done else 'none yet'}); free space or fix the directory, then "
        f"{rerun_command()} to resume from it."
    )


def _size(n: int | None) -> str:
    return "an unknown number of bytes" if n is None else f"{n:,} bytes ({n / 2**30:.2f} GiB)"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def estimated_bytes(model, whole: bool = False, master_copy: bool = False) -> int:
    """About what one checkpoint of ``model`` takes: every weight, plus AdamW's two moments (in the
    weight's dtype) for each trainable one (simpo_exp/memory.py's one-device state, less the gradients). A LoRA
    run's keeps its trained weights alone (``_write``): an 8B base counted in made 16 GB of a 0.2 GB checkpoint.
    ``whole``: the checkpoint goes through the engine's ``save_state`` (FSDP, ZeRO, ``checkpoint_format=accelerate``),
    which writes the module whole, a LoRA run's frozen base included (left out, an 8B LoRA run under FSDP was told
    its checkpoints need 0.5 GB each, not 15.4). ``master_copy``: DeepSpeed under bf16/fp16 trains the model (in 16
    bits here) from a float32 master copy, which it saves with float32 moments beside the module (12 bytes a
    trained parameter more, not 4: ZeRO-2 wrote 14 bytes a parameter where 6 were counted)."""
    if master_copy:  # memory.py's DeepSpeed rule, on one process: 16-bit weights, float32 master copy and moments
        state = state_bytes(model, Engine("deepspeed"))
        return state["weights"] + state["optimizer"]
    state = state_bytes(model, Engine())
    if not whole and any(not p.requires_grad for p in model.parameters()):
        trained = sum(full_numel(p) * p.element_size() for p in model.parameters() if p.requires_grad)
        return trained + state["optimizer"]
    return state["weights"] + state["optimizer"]


def model_bytes(model, master_copy: bool = False, save_dtype: str | None = None) -> int:
    """About what the trained model (``model/``) takes: its weights as they are; a LoRA model's merged in float32
    (``save_trained``), and its adapters beside them; DeepSpeed's float32 master copy where it keeps one
    (``master_copy``); every floating weight in ``save_dtype`` where it is given (bfloat16: half of float32's)."""
    if save_dtype is not None:
        size = torch.empty(0, dtype=getattr(torch, save_dtype)).element_size()
        return sum(full_numel(p) * (size if p.is_floating_point() else p.element_size()) for p in model.parameters())
    if master_copy or any(not p.requires_grad for p in model.parameters()):
        return sum(full_numel(p) * (4 if p.is_floating_point() else p.element_size()) for p in model.parameters())
    return state_bytes(model, Engine())["weights"]


def check_space(
    run_dir: Path,
    model,
    keep: int,
    save_model: bool,
    warn: bool = True,
    whole: bool = False,
    master_copy: bool = False,
    save_dtype: str | None = None,
) -> int:
    """The estimated bytes of one checkpoint (``whole``, ``master_copy``: see ``estimated_bytes``); with a warning
    when the output directory's disk cannot hold the checkpoints the run keeps (one more while the next is written,
    before the oldest is pruned) and the final model."""
    per_checkpoint = estimated_bytes(model, whole, master_copy)
    needed = per_checkpoint * (keep + 1) + (model_bytes(model, master_copy, save_dtype) if save_model else 0)
    free = shutil.disk_usage(run_dir).free
    if warn and free < needed:
        log.warning(
            "output directory %s has %s free, but %d checkpoints of about %s each%s need %s: the run "
            "will stop when a save fails (it stays resumable from the last good one)",
            run_dir,
            _size(free),
            keep + 1,
            _size(per_checkpoint),
            " and the final model" if save_model else "",
            _size(needed),
        )
    return per_checkpoint


# ----------------------------------------------------------------------------- verifying
def file_hash(path: Path, algorithm: str = HASH, chunk: int = 1 << 23) -> str:
    """The hex digest of a file's bytes, read in ``chunk``-byte blocks into one reused buffer."""
    digest, buffer = HASHES[algorithm](), bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def manifest(folder: Path, algorithm: str = HASH) -> dict[str, dict]:
    """Size and checksum (keyed by ``algorithm``) of every file under ``folder`` (the marker aside), by
    relative path."""
    files = sorted(f for f in Path(folder).rglob("*") if f.is_file() and f.name != MARKER)
    return {
        f.relative_to(folder).as_posix(): {"size": f.stat().st_size, algorithm: file_hash(f, algorithm)} for f in files
    }


def verify(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (a file missing, of the wrong size or not
    matching its checksum), or None. A checkpoint from before markers listed files is not checked."""
    try:
        text = (path / MARKER).read_text()
        if not text.strip():
            log.info("checkpoint %s predates checksums: its files are not verified", path)
            return None
        marker = json.loads(text)
        algorithm = marker.get("algorithm", LEGACY_HASH)
        if algorithm not in HASHES:
            return f"its {MARKER} marker names an unknown checksum {algorithm!r} (known: {', '.join(HASHES)})"
        for name, want in marker["files"].items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != want["size"]:
                return f"{name} has {f.stat().st_size} bytes, {want['size']} were written"
            if file_hash(f, algorithm) != want[algorithm]:
                return f"{name} does not match its checksum"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its {MARKER} marker is not a list of files"
    return None


def load_newest(
    run_dir: Path,
    model,
    optimizer,
    scheduler,
    config: dict,
    load_engine_state=None,
    on_main=None,
    on_every=None,
    process: tuple[int, int] = (0, 1),
    engine: str | None = None,
) -> tuple[Path, TrainState] | None:
    """Restore the newest intact checkpoint of ``run_dir``; None when it has none. A damaged one (a
    file not matching the marker, or unreadable) is skipped with a warning naming it and why; when
    none is intact, CheckpointError names them all. ``on_main(fn)``: fn's result on the main process,
    given to every process, so that one process reads the files to check them and all pick the same.
    ``on_every(fn)``: fn run on every process, the list of their results given to all, so that a load
    failing on one process only (a file its node cannot read) makes every process fall back together.
    ``process``: this process's (index, count), for its own generator states. ``engine``: the engine this run
    checkpoints with (``PLAIN``, or the accelerate engine's name); one written by another is refused by name."""
    on_main = on_main or (lambda fn: fn())
    on_every = on_every or (lambda fn: [fn()])
    found = checkpoint_dirs(run_dir)
    problems = []
    for path in reversed(found):
        why = on_main(lambda: verify(path))
        if why is None:
            loaded = []

            def attempt() -> str | None:  # why this process could not load it, or None
                try:
                    loaded.append(load(path, model, optimizer, scheduler, config, load_engine_state, process, engine))
                except DamagedCheckpoint as e:
                    return str(e)
                return None

            whys = on_every(attempt)
            failed = [(rank, w) for rank, w in enumerate(whys) if w is not None]
            if not failed:
                return path, loaded[0]
            why = "; ".join(w if len(whys) == 1 else f"on process {rank}: {w}" for rank, w in failed)
        log.warning("checkpoint %s is damaged and skipped: %s", path, why)
        problems.append(f"{path.name}: {why}")
    if problems:
        raise CheckpointError(
            f"no intact checkpoint in {Path(run_dir) / 'checkpoints'} ({'; '.join(problems)}). Remove the damaged "
            "ones and re-run, or run with resume=false to start fresh."
        )
    return None


UNORDERED_KEYS = {"lora_target_modules"}  # lists whose order means nothing
# keys outside hardware that say how the run runs, not what it trains: the processes that tokenise, the model
# preset's attention kernel (as hardware.attn_implementation may change, so may the preset's)
HOW_IT_RUNS = {"dataset.num_proc", "model.attn_implementation"}
# defaults that have changed: a run saved with the former one meant what the new one means
FORMER_DEFAULTS = {"model.params_b": 0.0}  # "no size given" (None since 0f6cc95)


def _local(path) -> bool:
    """A data source's path that names local files (not a hub id, not ``synthetic``)."""
    from simpo_exp.hub import looks_like_local_path

    return isinstance(path, str) and (looks_like_local_path(path) or Path(path).expanduser().exists())


def fingerprinted_sources(run_dir: Path) -> frozenset[str]:
    """The data sources whose files a run recorded by their contents (data_report.json's ``files``): the resume's
    data check compares those, so another local path to them is no other config. A run from before the record keeps
    its paths compared."""
    from simpo_exp.rundir import recorded_sources

    return frozenset(
        name for name, rec in recorded_sources(run_dir).items() if isinstance(rec, dict) and rec.get("files")
    )


def incompatible_keys(
    saved: dict, current: dict, prefix: str = "", what: str = "checkpoint", fingerprinted: frozenset = frozenset()
) -> list[str]:
    """Config keys whose values differ, ignoring those a resumed run may change (``key: <what> a, now b``);
    ``fingerprinted``: the sources whose local path may change (``fingerprinted_sources``)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in RESUMABLE_CHANGES:
            continue
        if (prefix == "hardware." and key not in TRAINING_HARDWARE_KEYS) or f"{prefix}{key}" in HOW_IT_RUNS:
            continue
        a, b = saved.get(key), current.get(key)
        source = prefix.removeprefix("dataset.sources.").rstrip(".")
        if (
            prefix.startswith("dataset.sources.")
            and key == "path"
            and source in fingerprinted
            and _local(a)
            and _local(b)
        ):
            continue  # the same files elsewhere are the same data: check_same_data compares them by content
        if key not in saved and isinstance(b, dict):  # a section added since: each of its keys as below
            diffs += incompatible_keys({}, b, f"{prefix}{key}.", what, fingerprinted)
            continue
        if key not in saved and b == schema_default(f"{prefix}{key}"):
            continue  # a key added since the run was saved, at its default: what the older version did
        if a == FORMER_DEFAULTS.get(f"{prefix}{key}", MISSING) and b == schema_default(f"{prefix}{key}"):
            continue  # saved at a default that has changed since, now at the new one: the same meaning
        if key in UNORDERED_KEYS and isinstance(a, list) and isinstance(b, list):  # the same set in another order
            a, b = sorted(map(str, a)), sorted(map(str, b))
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += incompatible_keys(a, b, f"{prefix}{key}.", what, fingerprinted)
        elif a != b:
            diffs.append(f"{prefix}{key}: {what} {a!r}, now {b!r}")
    return diffs


def refuse_another_config(run_dir: Path, config: dict) -> None:
    """Before the set-up: the newest complete checkpoint's config against this run's, the check ``load`` makes, so
    that a mistyped override is refused in seconds rather than after the model, the data and a reference pass. A
    checkpoint whose record cannot be read is left to ``load_newest`` (which skips a damaged one)."""
    fingerprinted = fingerprinted_sources(run_dir)
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            saved = json.loads((path / "state.json").read_text())["config"]
            diffs = incompatible_keys(saved, config, fingerprinted=fingerprinted)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if diffs:
            raise other_config(path, diffs)
        return


def other_config(path: Path, diffs: list[str]) -> DifferentConfigCheckpoint:
    """The refusal of a checkpoint another config wrote (``diffs``: ``incompatible_keys``)."""
    return DifferentConfigCheckpoint(
        f"checkpoint {path} was written by a different config ({'; '.join(diffs)}). "
        "Run with resume=false to start fresh in this directory, or use another hydra.run.dir."
    )


def load(
    path: Path,
    model,
    optimizer,
    scheduler,
    config: dict,
    load_engine_state=None,
    process: tuple[int, int] = (0, 1),
    engine: str | None = None,
) -> TrainState:
    """Restore everything from a checkpoint directory; refuse one written by a different config.
    ``load_engine_state``: ``accelerator.load_state``, called on every process, for a checkpoint with an
    ``engine/`` folder (then ``model`` and ``optimizer`` are not used). ``process``: this process's
    (index, count), for its own generator states."""
    try:
        meta = json.loads((path / "state.json").read_text())
        diffs = incompatible_keys(meta["config"], config, fingerprinted=fingerprinted_sources(path.parent.parent))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpoint(f"{path / 'state.json'} cannot be read ({type(e).__name__}: {e})") from e
    if diffs:
        raise other_config(path, diffs)
    written_by = len(meta["rng"]) if isinstance(meta.get("rng"), list) else None  # one generator state a process
    if written_by is not None and written_by != process[1]:
        raise CheckpointError(
            f"checkpoint {path} was written by {written_by} process(es), this run has {process[1]}: the data "
            "position it holds is each process's own (batches are dealt to the processes in turn), so on another "
            f"number of processes some pairs would be trained twice and others never. Resume on {written_by} "
            "process(es), or run with resume=false to start fresh."
        )
    by_engine = (path / ENGINE_DIR).is_dir()
    written = meta.get("engine") or (None if by_engine else PLAIN)  # checkpoints before the record: by the folder
    engine = engine or (PLAIN if load_engine_state is None else None)
    if (written and engine and not same_engine(written, engine)) or by_engine != (load_engine_state is not None):
        raise CheckpointError(
            f"checkpoint {path} holds its weights and optimizer state as {describe_engine(written, by_engine)} "
            f"writes them; this run is set up to read {describe_engine(engine, load_engine_state is not None)}. "
            "Resume with the engine it was written by (its hardware preset and launcher"
            + (": the launcher's fsdp_version and fsdp_state_dict_type" if "FSDP" in f"{written}{engine}" else "")
            + (", and hardware.checkpoint_format=accelerate" if by_engine and load_engine_state is None else "")
            + "), or run with resume=false to start fresh."
        )
    try:
        if by_engine:
            load_engine_state(str(path / ENGINE_DIR))
        elif meta.get("frozen_weights"):  # the trained weights alone: the frozen ones must be the checkpoint's
            if frozen_weights(model) != meta["frozen_weights"]:
                raise CheckpointError(
                    f"checkpoint {path} holds the trained (LoRA) weights of a run whose frozen base weights differ "
                    "from this run's (another model at model.path, or another model.dtype): resume on the same "
                    "base, or run with resume=false to start fresh"
                )
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            if unexpected or trained & set(missing):
                raise DamagedCheckpoint(f"{path / 'model.safetensors'} does not hold this run's trained weights")
            saved = _join_optimizer_state(load_file(path / "optimizer.safetensors"), meta["optimizer"])
            optimizer.load_state_dict(regrouped(saved, optimizer, model))
        else:
            load_model(model, str(path / "model.safetensors"))
            saved = _join_optimizer_state(load_file(path / "optimizer.safetensors"), meta["optimizer"])
            optimizer.load_state_dict(regrouped(saved, optimizer, model))
        scheduler.load_state_dict(meta["scheduler"])
        _set_rng_state(load_file(path / "rng.safetensors"), meta["rng"], process)
        return TrainState(**meta["train_state"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise DamagedCheckpoint(f"{path} cannot be read ({type(e).__name__}: {str(e)[:300]})") from e


def frozen_weights(model) -> dict | None:
    """The frozen weights (a LoRA base) by their count, dtypes and a hash of values sampled from each, or None
    where every weight trains: a checkpoint keeps the trained weights alone and resumes on the same base."""
    from simpo_exp.reference import sampled  # the values the reference cache's model fingerprint samples

    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return None
    h = hashlib.sha256()
    for name, p in frozen:
        h.update(name.encode() + sampled(p).numpy().tobytes())
    return {
        "tensors": len(frozen),
        "dtypes": sorted({str(p.dtype) for _, p in frozen}),
        "sampled_sha256": h.hexdigest(),
    }


def same_engine(written: str, engine: str) -> bool:
    """Whether a checkpoint ``written`` by one engine is read by ``engine`` as it was written. A checkpoint of FSDP
    recorded before its version and state-dict type were (``"FSDP"``) is taken as any FSDP's."""
    return written == engine or (written == "FSDP" and engine.startswith("FSDP"))


def describe_engine(engine: str | None, by_engine: bool) -> str:
    if engine == PLAIN or (engine is None and not by_engine):
        return "one process's safetensors (one process, DDP)"
    return f"{engine or 'a sharded engine'}'s accelerate checkpoint (engine/)"


def trim_metrics(metrics_path: Path, last_step: int, eval_owed: int = 0) -> int | None:
    """Drop logged records (metrics.jsonl, generations.jsonl) after the checkpoint's step, so a resumed run
    logs each step once. ``eval_owed``: the step whose eval the checkpoint owes (``TrainState.eval_owed``): its
    eval's records (all but the train/* record: the eval metrics, the samples) go too, as the resumed run logs
    them again (an earlier resume may have logged them and stopped before its next checkpoint). Returns the last
    step dropped (None: none), which W&B, whose history cannot be cut, holds already."""
    if not metrics_path.exists():
        return None

    def owed(r: dict) -> bool:
        return bool(eval_owed) and r.get("step") == eval_owed and not any(k.startswith("train/") for k in r)

    # a half-written last line (the process was killed while writing it) is dropped with the later records
    keep, dropped = [], []
    for r in read_jsonl(metrics_path):
        (keep if r.get("step", last_step + 1) <= last_step and not owed(r) else dropped).append(r)
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(metrics_path)
    return max((r["step"] for r in dropped if isinstance(r.get("step"), int)), default=None)
