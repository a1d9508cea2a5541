"""Engine set-up: the Accelerator (one device, DDP, FSDP or DeepSpeed), its accumulation, and what the
sharded engines need (their own checkpoint format, a process group without a launcher)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from simpo_exp.config import Config, ConfigError

SHARDED_ENGINES = (DistributedType.FSDP, DistributedType.DEEPSPEED)


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
    """``fn()`` computed on the main process and given to every process."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([fn() if accelerator.is_main_process else None], from_process=0)[0]


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


def make_accelerator(cfg: Config):
    """The Accelerator for this run and its accumulation steps. Multi-process engines (DDP, FSDP,
    DeepSpeed) come from ``accelerate launch --config_file launchers/...``; a hardware preset may
    name a DeepSpeed config to use without a launcher (one process)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    h = cfg.hardware
    has_cuda = torch.cuda.is_available()
    if h.device == "cuda" and not has_cuda:
        raise ConfigError("hardware.device=cuda but no CUDA device is visible; use hardware=cpu or hardware=auto")
    use_cpu = h.device == "cpu" or (h.device == "auto" and not has_cuda)
    precision = h.mixed_precision
    if precision == "auto":
        precision = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "no"
    accum = accumulation_steps(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    deepspeed_plugin = None
    if h.deepspeed_config and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true":
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"hardware={h.name} needs DeepSpeed: pip install -e '.[gpu]'") from e
        from accelerate.utils import DeepSpeedPlugin

        path = Path(h.deepspeed_config).expanduser()
        if not path.is_absolute() and not path.exists():
            path = Path(__file__).resolve().parents[1] / path  # relative to the project, like the presets
        if not path.exists():
            raise ConfigError(f"hardware.deepspeed_config={h.deepspeed_config!r}: no such file")
        deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=str(path), gradient_clipping=cfg.max_grad_norm)
        single_process_env()
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        deepspeed_plugin=deepspeed_plugin,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accum, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's engine clips (accelerator.clip_grad_norm_ is a no-op there): give it max_grad_norm
        # where the config left it to accelerate ("auto" would become accelerate's own 1.0).
        plugin = accelerator.state.deepspeed_plugin
        if plugin.is_auto("gradient_clipping"):
            plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm
    return accelerator, accum
