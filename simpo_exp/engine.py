"""Engine set-up: the Accelerator (one device, DDP, FSDP or DeepSpeed), its accumulation, and what the
sharded engines need (their own checkpoint format, a process group without a launcher)."""

from __future__ import annotations

import functools
import logging
import math
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

from simpo_exp.config import Config, ConfigError
from simpo_exp.errors import UserError
from simpo_exp.rundir import PROJECT_DIR

log = logging.getLogger(__name__)
SHARDED_ENGINES = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def fsdp2(accelerator) -> bool:
    """Whether the run is sharded by FSDP2 (``fully_shard``), as launchers/fsdp.yaml asks."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    return int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) or 1) == 2


def adamw_fused(accelerator) -> bool | None:
    """``fused=True`` for torch's AdamW on a GPU: one kernel per step over all parameters, where the default
    (foreach) makes several passes over the weights, gradients and moments. It is transformers' default
    optimizer (``adamw_torch_fused``), so TRL steps that way; the official SimPO configs name ``adamw_torch``
    (foreach), the same update up to rounding. FSDP's DTensor
    weights take it; DeepSpeed steps the optimizer over its own partitions and keeps torch's default (None)."""
    if accelerator.device.type == "cuda" and accelerator.distributed_type != DistributedType.DEEPSPEED:
        return True
    return None


def adamw(model, cfg: Config, lr: float, fused: bool | None) -> torch.optim.AdamW:
    """torch's AdamW over ``model`` with transformers' Trainer's (so TRL's) parameter groups: weight decay on the
    weights, none on biases and normalisation weights (``Trainer.get_decay_parameter_names``; a decayed RMSNorm gain
    is pulled towards 0). Without weight decay one group, as checkpoints written before the split hold. ``fused``:
    ``adamw_fused``'s answer for the run's engine."""
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named], "weight_decay": 0.0}]
    if cfg.weight_decay:
        from transformers import Trainer

        decayed = set(Trainer.get_decay_parameter_names(None, model))  # reads nothing of the Trainer itself
        groups = [
            {"params": [p for n, p in named if n in decayed], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=fused,
    )


def _warmup_then(step: int, *, warmup: int, total: int, decay: str) -> float:
    """The learning rate's factor at optimizer step ``step`` (0 before the first):

        step < warmup:  step / max(1, warmup)                       (from 0 up to the full rate)
        after, with p = (step - warmup) / max(1, total - warmup):
          cosine:                max(0, (1 + cos(pi * p)) / 2)
          linear:                max(0, (total - step) / max(1, total - warmup))
          constant_with_warmup:  1
        constant: 1 at every step, warm-up or not

    transformers' schedules of these names (``get_scheduler``), which TRL and the official SimPO trainer step by."""
    if decay == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if decay == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if decay == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((step - warmup) / max(1, total - warmup)))))
    return 1.0  # constant_with_warmup


def lr_schedule(optimizer, kind: str, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_scheduler_type`` (config.SCHEDULERS) as a ``LambdaLR`` that steps as transformers' ``get_scheduler``
    does, step for step (tests/test_engine_schedule.py holds them together). Not transformers' own: importing it
    imports transformers.trainer_utils, and with it peft where installed, 2 of a run's 7 seconds of imports on a CPU
    for every run, sweep job and process. Its state_dict loads either's checkpoints (a partial, as theirs)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(_warmup_then, warmup=warmup_steps, total=total_steps, decay=kind)
    )


# Settings that may differ between the processes of one run: each process's own Hydra directory (the run uses the
# main one's) and the W&B names made from it (only the main process logs).
PER_PROCESS_SETTINGS = ("output_dir", "logger")


def check_same_config(cfg: Config, accelerator) -> None:
    """Every process of a run must train with one config. A sweeper that draws values on each process (Optuna
    without a sampler seed), or an override given to one process only, would otherwise train one model on a mix
    of them, with no error. Raises ``ConfigError`` on every process, naming the settings that differ."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    from simpo_exp.tracking import config_leaves, config_to_dict, differing_keys

    every = gather_object([config_leaves(config_to_dict(cfg))])
    differ = [
        f"{key}: " + ", ".join(f"process {i} {leaves.get(key)!r}" for i, leaves in enumerate(every))
        for key in differing_keys(every, skip=PER_PROCESS_SETTINGS)
    ]
    if differ:
        raise ConfigError(
            f"the {accelerator.num_processes} processes of this run were given different settings: "
            f"{'; '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}. Give every process the same command line "
            "(a Hydra sweeper under a multi-process launch must draw the same values on each: seed its sampler)"
        )


def engine_checkpoints(cfg: Config, accelerator) -> bool:
    """Whether checkpoints go through accelerator.save_state (see simpo_exp/checkpoint.py)."""
    sharded = accelerator.distributed_type in SHARDED_ENGINES
    fmt = cfg.hardware.checkpoint_format
    if fmt == "safetensors" and sharded:
        raise ConfigError(
            f"hardware.checkpoint_format='safetensors' cannot hold {accelerator.distributed_type.value}'s "
            "sharded weights and optimizer; use 'accelerate' or 'auto'"
        )
    return fmt == "accelerate" or (fmt == "auto" and sharded)


def on_main(accelerator, fn):
    """``fn()`` computed on the main process and given to every process. If it raises there, every
    process raises (the main process its own error, the others ``ProcessFailed`` quoting it), rather than
    the others waiting for a value that never comes."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    value, error, failure = None, None, None
    if accelerator.is_main_process:
        try:
            value = fn()
        except Exception as e:
            error, failure = e, (isinstance(e, UserError), f"{type(e).__name__}: {e}")
    value, failure = broadcast_object_list([value, failure], from_process=0)
    if error is not None:
        raise error
    if failure is not None:
        user_error, message = failure
        kind = UserProcessFailed if user_error else ProcessFailed
        raise kind(f"the main process failed, so this one stops: {message}")
    return value


class ProcessFailed(RuntimeError):
    """Another process failed at a step every process takes part in; this one stops with it."""


class UserProcessFailed(ProcessFailed, UserError):
    """``ProcessFailed`` where the failure was a user error (its message says what to change)."""


def together(accelerator, fn, failed_elsewhere):
    """Run ``fn()`` on every process (it decides what each does), then agree on whether it worked everywhere:
    a failure on any process raises on all of them, its own error where it happened and, on the others,
    ``failed_elsewhere(ranks)`` (an exception; ``ranks``: the processes that failed), or ``ProcessFailed``
    when ``failed_elsewhere`` is a string saying what was being done. Without this, the processes that
    succeeded would wait forever at the next collective for one that has left. Also a barrier.
    Returns ``fn()``'s result."""
    if accelerator.num_processes == 1:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as e:
        error = e
    flags = accelerator.gather(torch.tensor([float(error is not None)], device=accelerator.device))
    if error is not None:
        raise error
    ranks = [i for i, f in enumerate(flags.tolist()) if f]
    if ranks and isinstance(failed_elsewhere, str):
        failed = ", ".join(map(str, ranks))
        raise ProcessFailed(f"process {failed} failed while {failed_elsewhere} (its own error says why)")
    if ranks:
        raise failed_elsewhere(ranks)
    return result


def on_every(accelerator, fn, doing: str) -> list:
    """``fn()`` run on every process; every process's result, in rank order, given to all of them, so that
    they can act on the same outcome. A failure on any process raises on all (see ``together``; ``doing``
    says what was being done)."""
    if accelerator.num_processes == 1:
        return [fn()]
    from accelerate.utils import gather_object

    return gather_object([together(accelerator, fn, doing)])


def release_process_group(more_jobs: bool = False) -> None:
    """After a run that every process finished: free what still holds the process group (the DDP wrapper and
    its reducer, once the run's objects are gone), then tear the group down together. Left to the
    interpreter's exit, gloo's worker threads can abort a process whose run has succeeded (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch#190489). Freeing the group while the
    DDP reducer still holds it is worse: the reducer's later release can wait forever on a peer that left.

    ``more_jobs``: a Hydra multirun whose later jobs run in these same processes (``torchrun`` or ``accelerate
    launch`` with ``--multirun``, the jobs one after another): they reuse the group, which accelerate set up
    once for the processes; it is destroyed at exit instead, after the last job's barrier."""
    import atexit
    import gc

    # a one-process group (DeepSpeed without a launcher) stays: a multirun's next job in this process reuses it
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    gc.collect()
    torch.distributed.barrier()
    if more_jobs:
        atexit.unregister(_destroy_at_exit)  # once, however many jobs
        atexit.register(_destroy_at_exit)
        return
    torch.distributed.destroy_process_group()


def _destroy_at_exit() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def process_group_kwargs(seconds: float) -> InitProcessGroupKwargs:
    """accelerate's handler for the process group: the backend left to accelerate (nccl or gloo, as without the
    handler), the timeout ``seconds``. accelerate passes on only the fields that differ from the handler's
    defaults, whose timeout is NCCL's 600 s: a timeout of exactly 600 was dropped, and gloo then waited its own
    1800. One microsecond more keeps it."""
    timeout = timedelta(seconds=seconds)
    if timeout == InitProcessGroupKwargs().timeout:
        timeout += timedelta(microseconds=1)
    return InitProcessGroupKwargs(backend=None, timeout=timeout)


# DDP's gradients as views into its all-reduce buckets: by default the reducer keeps buckets beside the gradients,
# a second copy of every gradient on each GPU (13.5 GiB for a 7B model's bf16 gradients, 27 GiB for float32 ones)
# and a copy between them each step. FSDP and DeepSpeed ignore the handler.
DDP_KWARGS = DistributedDataParallelKwargs(gradient_as_bucket_view=True)


def accumulation_steps(cfg: Config, num_processes: int) -> int:
    """Micro-batches per optimizer step: fixed, or derived so that per-device batch x processes x
    accumulation stays at ``hardware.effective_batch_size`` whatever the device count."""
    target = cfg.hardware.effective_batch_size
    if not target:
        return cfg.gradient_accumulation_steps
    per_step = cfg.per_device_train_batch_size * num_processes
    if target % per_step:
        raise ConfigError(
            f"hardware.effective_batch_size={target} is not a multiple of per_device_train_batch_size "
            f"({cfg.per_device_train_batch_size}) x processes ({num_processes})"
        )
    return target // per_step


def zero_layout(ds_config: dict) -> dict:
    """What a DeepSpeed config shards and where it offloads: its ZeRO stage and offload devices."""
    z = ds_config.get("zero_optimization") or {}
    device = lambda key: (z.get(key) or {}).get("device", "none")  # noqa: E731
    return {
        "stage": z.get("stage", 0),
        "offload_optimizer": device("offload_optimizer"),
        "offload_param": device("offload_param"),
    }


def set_keys(config: dict, prefix: str = "") -> dict:
    """A DeepSpeed config's settings as dotted keys, leaving out those left to accelerate ("auto")."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= set_keys(value, f"{prefix}{key}.")
        elif value != "auto":
            out[f"{prefix}{key}"] = value
    return out


def deepspeed_config_path(name: str) -> Path:
    """A preset's ``hardware.deepspeed_config``: as given, else relative to the project (as the presets name them)."""
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists():
        path = PROJECT_DIR / path
    if not path.exists():
        raise ConfigError(f"hardware.deepspeed_config={name!r}: no such file")
    return path


def launcher_ds_config_beside_the_project() -> None:
    """The DeepSpeed JSON an accelerate config names (``deepspeed_config_file: launchers/ds_zero3.json``, which
    ``accelerate launch`` passes on as it is written): a relative path that is not there from the directory the
    run was launched in is taken from the project, as ``deepspeed_config_path`` takes a preset's. Launched from
    anywhere but the repository root, accelerate refused it ("Expected a string path to an existing deepspeed
    config")."""
    given = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if given and given != "none" and not Path(given).expanduser().exists():
        beside = PROJECT_DIR / given
        if beside.exists():
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(beside)


FSDP_ON_CPU_TORCH = (2, 9)  # the first torch whose gloo reduce-scatter averages as FSDP2 asks (check_fsdp_reduction)


def torch_release() -> tuple[int, int]:
    """torch's (major, minor): a pre-release or vendor build counts as its release (2.9.0a0+nv, NGC's 2.9: 2.9)."""
    return tuple(int(part) for part in torch.__version__.split(".")[:2])


def check_fsdp_reduction(accelerator) -> None:
    """FSDP2 averages the gradients over the processes by asking the reduce-scatter for the mean; on CPU processes
    (gloo) torch before 2.9 returns their sum instead, with no error: every gradient would be the number of
    processes times too large (found at the project's dependency floors: 2.7 and 2.8 summed, 2.9 averaged)."""
    if fsdp2(accelerator) and accelerator.device.type == "cpu" and torch_release() < FSDP_ON_CPU_TORCH:
        raise ConfigError(
            f"FSDP on CPU processes needs torch 2.9 or newer: with torch {torch.__version__} gloo's reduce-scatter "
            "sums the gradients where FSDP asks for their mean, so each would be "
            f"{accelerator.num_processes}x too large. pip install 'torch>=2.9', or use hardware=ddp on the CPU"
        )


def resolved_precision(h) -> str:
    """``hardware.mixed_precision`` as a run trains with it: "auto" is bf16 on a GPU that has it, "no" elsewhere."""
    if h.mixed_precision != "auto":
        return h.mixed_precision
    from simpo_exp.inference.sampling import pick_device

    return "bf16" if pick_device(h.device).type != "cpu" and torch.cuda.is_bf16_supported() else "no"


def keep_fsdp_outputs(accelerator) -> None:
    """Under FSDP2, let each module return what it computed. Where accelerate's mixed-precision policy casts every
    output to the compute dtype (``output_dtype=bf16``: earlier releases did; 1.16 leaves it unset), the root module
    it wraps is ``ResponseLogps``: its
    float32 log-prob sums came back in bfloat16, steps of 2 nats at |x| = 400, for the policy and the live
    reference alike, so losses, rewards and margins were quantised. The weights' and gradients' dtypes stay."""
    if fsdp2(accelerator):
        _fsdp_policy_keeps(accelerator, "output_dtype", None)


def keep_fsdp1_buffers(accelerator) -> None:
    """Under FSDP1, buffers stay float32. accelerate's FSDP1 policy under bf16 sets ``buffer_dtype=bf16`` (unless
    its ``buffer_autocast``), and FSDP1 casts every buffer to it: RoPE's ``inv_freq`` rounded to bf16 turned
    positions by up to 1.9 rad at 2048 (Llama-3's theta of 5e5), for the whole run. The live reference follows the
    policy (``reference.in_fsdp1s_precision``). The weights' and gradients' dtypes stay."""
    if accelerator.distributed_type == DistributedType.FSDP and not fsdp2(accelerator):
        _fsdp_policy_keeps(accelerator, "buffer_dtype", torch.float32)


def _fsdp_policy_keeps(accelerator, field: str, kept) -> None:
    """The FSDP plugin's mixed-precision policy with ``field`` set to ``kept`` where it casts to a 16-bit dtype."""
    import dataclasses

    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    if policy is not None and getattr(policy, field, None) not in (None, torch.float32):
        plugin.mixed_precision_policy = dataclasses.replace(policy, **{field: kept})


def check_engine(h, got, running_ds_config: dict | None = None) -> None:
    """A sharding preset that would run as something else is refused: ``hardware=fsdp`` started without the FSDP
    launcher config, or a DeepSpeed preset on the CPU (accelerate sets DeepSpeed aside there), trains each
    process's whole model, unsharded, under the preset's name; a DeepSpeed preset started with another preset's
    launcher (``hardware=zero2`` under ``launchers/zero3.yaml``) would run that launcher's ZeRO stage and offload."""
    wanted = "FSDP" if h.name.startswith("fsdp") else "DEEPSPEED" if h.deepspeed_config else None
    if wanted == "DEEPSPEED" and got == DistributedType.DEEPSPEED and running_ds_config is not None:
        import json

        whole = json.loads(deepspeed_config_path(h.deepspeed_config).read_text())
        asked, running = zero_layout(whole), zero_layout(running_ds_config)
        if asked != running:
            raise ConfigError(
                f"hardware={h.name} asks for DeepSpeed {asked} ({h.deepspeed_config}), but the launcher's DeepSpeed "
                f"config runs {running}: start it with accelerate launch --config_file launchers/{h.name}.yaml, or "
                "name the preset that matches the launcher"
            )
        theirs = set_keys(running_ds_config)
        unused = [
            f"{k}={v!r} (runs {theirs.get(k, 'unset')!r})" for k, v in set_keys(whole).items() if theirs.get(k) != v
        ]
        if unused:
            log.warning(
                "hardware.deepspeed_config=%s is not the DeepSpeed config that runs: under accelerate launch the "
                "launcher's deepspeed_config_file does, and these of its settings are not used: %s; point the "
                "launcher's deepspeed_config_file at %s to use them",
                h.deepspeed_config, "; ".join(unused), h.deepspeed_config,
            )  # fmt: skip
    if wanted is None or got == getattr(DistributedType, wanted):
        return
    how = (
        "start it with accelerate launch --config_file launchers/fsdp.yaml -m simpo_exp hardware=fsdp ..."
        if wanted == "FSDP"
        else f"it runs on GPUs (python -m simpo_exp hardware={h.name} on one, or accelerate launch --config_file "
        f"launchers/{h.name}.yaml)"
    )
    raise ConfigError(
        f"hardware={h.name} asks for {wanted}, but accelerate set up {getattr(got, 'value', got)}: the model would "
        f"train unsharded under the preset's name; {how}, or use hardware=cpu or ddp for plain data parallel"
    )


def single_process_env() -> None:
    """DeepSpeed without a launcher still builds a process group (of one): give it the variables a
    launcher would set, on a free port. Variables already set (by a launcher or the user) win."""
    if "LOCAL_RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        os.environ.setdefault(key, value)


def warn_if_the_launchers_precision_is_not_used(h, precision: str) -> None:
    """``accelerate launch --mixed_precision`` (or its config file's ``mixed_precision``) reaches the run as
    ACCELERATE_MIXED_PRECISION, which accelerate reads only where the script passes none; the run passes
    ``hardware.mixed_precision`` as resolved, so a launcher's fp16 or bf16 that differs from it is not used, said
    here. "no" is the launcher's default when nothing is given: not taken as a request."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if asked not in ("no", precision):
        log.warning(
            "accelerate launch's mixed_precision=%s (its --mixed_precision or config file) is not used: this run "
            "computes in %s (hardware.mixed_precision=%s); set hardware.mixed_precision=%s to train in %s",
            asked,
            "the weights' dtype, no autocast" if precision == "no" else precision,
            h.mixed_precision,
            asked,
            asked,
        )


def check_cpu_settings(cfg: Config) -> None:
    """Settings a CPU run would not honour: refused by name, before anything loads (they used to run silently
    as something else, or fail at the first backward)."""
    if cfg.hardware.mixed_precision == "fp16":
        raise ConfigError(
            "hardware.mixed_precision=fp16 on the CPU: accelerate has no float16 autocast there and would train in "
            "float32 (while the run recorded float16); use bf16 or no"
        )
    key = "model.attn_implementation" if cfg.model.attn_implementation else "hardware.attn_implementation"
    if (cfg.model.attn_implementation or cfg.hardware.attn_implementation) == "flex_attention":
        raise ConfigError(
            f"{key}=flex_attention trains on a GPU only (torch has no FlexAttention backward on the CPU); "
            "use sdpa or eager here"
        )


def check_extras(cfg: Config) -> None:
    """Import the optional packages the run's settings need (PEFT for LoRA, Liger's chunked losses for
    ``hardware.fused_head=liger``) before the data and the model load: a missing one stopped the run after both,
    Liger's with a traceback."""
    from simpo_exp.fused import liger_losses
    from simpo_exp.model import require_peft

    h = cfg.hardware
    if h.lora:
        require_peft()
    if h.fused_head == "liger":
        liger_losses()


def make_accelerator(cfg: Config):
    """The Accelerator for this run and its accumulation steps. Multi-process engines (DDP, FSDP,
    DeepSpeed) come from ``accelerate launch --config_file launchers/...``; a hardware preset may
    name a DeepSpeed config to use without a launcher (one process)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    from simpo_exp.inference.sampling import pick_device

    h = cfg.hardware
    use_cpu = pick_device(h.device).type == "cpu"  # cuda with none visible is refused there, for every stage
    precision = resolved_precision(h)
    warn_if_the_launchers_precision_is_not_used(h, precision)
    if use_cpu:
        check_cpu_settings(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's count of all processes (every node's)
    accum = accumulation_steps(cfg, world)
    launcher_ds_config_beside_the_project()
    deepspeed_plugin = None
    if h.deepspeed_config and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true":
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"hardware={h.name} needs DeepSpeed: pip install -e '.[gpu]'") from e
        from accelerate.utils import DeepSpeedPlugin

        path = deepspeed_config_path(h.deepspeed_config)
        deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=str(path), gradient_clipping=cfg.max_grad_norm)
        single_process_env()
    # A sweep's jobs may run in one process (Hydra's basic launcher; torchrun's --multirun), where accelerate keeps
    # the first job's precision, device and DeepSpeed plugin and refuses (or quietly keeps) another job's: each
    # job sets them afresh. An initialised process group stays with its PartialState: the next job reuses it.
    from accelerate.state import AcceleratorState

    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not group)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        deepspeed_plugin=deepspeed_plugin,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accum, sync_with_dataloader=False),
        # a batch in pinned memory (train.train_data_loader) goes to the GPU without the host waiting for it
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=not use_cpu),
        kwargs_handlers=[process_group_kwargs(h.collective_timeout), DDP_KWARGS],
    )
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if h.effective_batch_size and accelerator.num_processes != world:
        raise ConfigError(
            f"hardware.effective_batch_size={h.effective_batch_size}: the accumulation was set for WORLD_SIZE={world} "
            f"processes, but accelerate runs {accelerator.num_processes}: each step would train on "
            f"{cfg.per_device_train_batch_size * accum * accelerator.num_processes} pairs; launch with torchrun or "
            "accelerate launch, which set WORLD_SIZE"
        )
    check_engine(h, accelerator.distributed_type, plugin.deepspeed_config if plugin is not None else None)
    check_fsdp_reduction(accelerator)
    keep_fsdp_outputs(accelerator)
    keep_fsdp1_buffers(accelerator)
    if plugin is not None:
        check_deepspeed_steps(plugin.deepspeed_config, accum, cfg.max_grad_norm)
        # DeepSpeed's engine clips (accelerator.clip_grad_norm_ is a no-op there): give it max_grad_norm
        # where the config left it to accelerate ("auto" would become accelerate's own 1.0).
        if plugin.is_auto("gradient_clipping"):
            plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm
    return accelerator, accum


def check_deepspeed_steps(ds_config: dict, accum: int, max_grad_norm: float) -> None:
    """A DeepSpeed config that fixes its own accumulation or clipping (a number in the JSON, or accelerate launch's
    --gradient_accumulation_steps / --gradient_clipping, which fill its "auto") is refused where it differs from the
    run's: accelerate hands the engine DeepSpeed's value, so the engine updated on its own count while the loop
    logged, scheduled and counted steps by the run's (steps off the engine's boundary, with no gradient, were
    counted as skipped), and clipped at its own norm while the records said ``max_grad_norm``."""
    where = (
        "the DeepSpeed config (hardware.deepspeed_config, or the launcher's deepspeed_config_file) or accelerate "
        "launch's --{flag}"
    )
    steps, clip = ds_config.get("gradient_accumulation_steps", "auto"), ds_config.get("gradient_clipping", "auto")
    if steps != "auto" and int(steps) != accum:
        raise ConfigError(
            f"{where.format(flag='gradient_accumulation_steps')} sets gradient_accumulation_steps={steps}, but this "
            f"run accumulates {accum} micro-batches a step (gradient_accumulation_steps, or "
            "hardware.effective_batch_size over per_device_train_batch_size and the processes): set it to "
            '"auto" there, or drop the flag'
        )
    if clip != "auto" and float(clip) != float(max_grad_norm):
        raise ConfigError(
            f"{where.format(flag='gradient_clipping')} sets gradient_clipping={clip}, but this run's "
            f'max_grad_norm={max_grad_norm}: set it to "auto" there (max_grad_norm then clips), or drop the flag'
        )
