"""Device memory the trained state takes before any activation, and a check at set-up that it fits.

A full fine-tune keeps, per trained parameter, its weight, its gradient and AdamW's two moments. Under the
default float32 master weights (simpo_exp/precision.py) that is 4 + 4 + 8 = 16 bytes, so an 8B model needs
about 120 GiB for its state alone: more than one 80 GB GPU has, whatever the batch. Such a run would load
the model, start, and fail at its first step with an out-of-memory error whose usual remedies (a smaller
batch, shorter sequences) cannot help. ``check_fits`` says so at set-up instead, with the presets that fit.

Per device, with P parameters (bytes as loaded), T of them trained (element size s), N processes:

- one device or DDP: the weights as loaded, gradients T s, AdamW moments 2 T s (torch keeps them in the
  weights' dtype);
- FSDP: the same divided by the processes it shards over: N (full sharding), those of a node (FSDP1's hybrid
  strategies), none (NO_SHARD); with parameter offload the state lives in CPU RAM. Where the weights stay gathered
  from the forward to the backward (FSDP1's SHARD_GRAD_OP, FSDP2's ``reshard_after_forward=False``) the whole model
  in its compute dtype is on each device in every step as well;
- DeepSpeed under bf16 or fp16: half-precision weights (2 P) and gradients (2 T), a float32 master copy
  with the moments (12 T), and, in the optimizer step, a float32 copy of the gradients for the master copy (4 T;
  the "4_grads_32bit" of DeepSpeed's ``estimate_zero2_model_states_mem_needs``, counted with the gradients):
  of the process's whole partition under ZeRO-1/2, of one sub-group at a time under ZeRO-3
  (``zero_optimization.sub_group_size``, 1e9 parameters unless set). Without bf16/fp16, float32 weights (4 P),
  gradients (4 T) and moments (8 T) (DeepSpeed keeps a float32 master copy besides, left out: a lower bound).
  ZeRO-1 shards the optimizer part, ZeRO-2 also the gradients, ZeRO-3 everything; optimizer offload moves the
  optimizer part and the gradient partitions to CPU RAM (DeepSpeed's ZeRO-Offload; its
  ``estimate_zero*_model_states_mem_needs`` count no gradients on the GPU then), parameter offload the weights.

A live reference model (``reference_mode=live``) adds a frozen copy of the weights as they train: whole on each
device, or 1/N of it under FSDP2 (simpo_exp/reference.py shards it as the policy is sharded); under FSDP1 whole in
its mixed precision's ``param_dtype`` (the copy is cast to it before it goes to the device).

These are lower bounds: activations, the logits, temporary buffers and the allocator's fragmentation come
on top, so a run refused here could not have fit, while one let through can still run out of memory in a
step (and then stops with ``errors.out_of_memory``'s message).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from simpo_exp.engine import fsdp2
from simpo_exp.errors import OutOfMemoryError
from simpo_exp.flops import full_numel

GIB = 2**30
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    """How the trained state is laid out over the processes."""

    kind: str = "single"  # single (one device, DDP) | fsdp | deepspeed
    processes: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    half_precision: bool = True  # DeepSpeed: bf16/fp16 weights with a float32 master copy (else all float32)
    fsdp_version: int = 2
    sub_group_size: int = 10**9  # ZeRO-3: parameters its optimizer steps at a time (DeepSpeed's default)
    shard_over: int = 0  # FSDP: the processes a parameter is sharded over (0: all of them)
    gathered_bytes: int = 0  # FSDP: bytes a parameter of the whole weights kept gathered in each step (0: none)
    reference_bytes: int = 0  # FSDP1: bytes a parameter of a live reference in its param_dtype (0: as loaded)

    @classmethod
    def of(cls, accelerator) -> "Engine":
        state = accelerator.state
        n = accelerator.num_processes
        kind = accelerator.distributed_type.value
        if kind == "DEEPSPEED":
            plugin = state.deepspeed_plugin
            zero = (plugin.deepspeed_config or {}).get("zero_optimization", {})

            def offloaded(key: str) -> bool:
                return (zero.get(key) or {}).get("device", "none") not in ("none", None)

            stage = int(plugin.zero_stage or 0)
            half = accelerator.mixed_precision in ("bf16", "fp16")  # the launchers' bf16 "auto" follows it
            group = zero.get("sub_group_size")
            group = int(group) if isinstance(group, (int, float)) and group > 0 else cls.sub_group_size
            offloads = offloaded("offload_optimizer"), offloaded("offload_param")
            return cls("deepspeed", n, stage, *offloads, half_precision=half, sub_group_size=group)
        if kind == "FSDP":
            plugin = state.fsdp_plugin
            offload = fsdp_offloads(plugin)
            version = 2 if fsdp2(accelerator) else 1
            mesh = getattr(getattr(accelerator, "parallelism_config", None), "dp_shard_size", None)
            shard_over, gathered = fsdp_sharding(plugin, version, n, mesh)
            mixed = getattr(plugin, "mixed_precision_policy", None)
            param_dtype = getattr(mixed, "param_dtype", None) if version == 1 else None
            compute = param_dtype or (torch.bfloat16 if accelerator.mixed_precision in ("bf16", "fp16") else None)
            width = lambda dtype: torch.tensor([], dtype=dtype).element_size() if dtype else 4  # noqa: E731
            return cls(
                "fsdp", n, offload_optimizer=offload, offload_params=offload, fsdp_version=version,
                shard_over=0 if shard_over == n else shard_over, gathered_bytes=width(compute) if gathered else 0,
                reference_bytes=width(param_dtype) if param_dtype else 0,
            )  # fmt: skip
        return cls("single", n)


def fsdp_sharding(plugin, version: int, n: int, mesh_shard: int | None = None) -> tuple[int, bool]:
    """(processes a parameter is sharded over, whether the whole weights stay gathered from each forward to its
    backward) of an FSDP plugin. FSDP1's strategy (accelerate keeps it in ``reshard_after_forward``, earlier in
    ``sharding_strategy``): FULL_SHARD over all N, SHARD_GRAD_OP over N with the weights kept gathered, NO_SHARD
    over none (DDP's memory), HYBRID_SHARD and _HYBRID_SHARD_ZERO2 over a node's processes (LOCAL_WORLD_SIZE).
    FSDP2: over N, or ``mesh_shard`` (accelerate's ``parallelism_config.dp_shard_size``: HSDP's shard dimension),
    gathered where ``reshard_after_forward`` is False."""
    import os

    if version >= 2:
        gathered = getattr(plugin, "reshard_after_forward", True) is False
        return (mesh_shard if isinstance(mesh_shard, int) and mesh_shard > 1 else n), gathered
    strategy = getattr(plugin, "reshard_after_forward", None)
    if not hasattr(strategy, "name"):
        strategy = getattr(plugin, "sharding_strategy", None)
    name = getattr(strategy, "name", "FULL_SHARD")
    node = int(os.environ.get("LOCAL_WORLD_SIZE", n))
    shard = 1 if name == "NO_SHARD" else min(node, n) if "HYBRID" in name else n
    return shard, name in ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2")


def fsdp_offloads(plugin) -> bool:
    """Whether FSDP keeps the parameters (and so their gradients and optimizer state) in CPU RAM: FSDP1's
    ``CPUOffload(offload_params=True)``, FSDP2's ``CPUOffloadPolicy``."""
    offload = plugin.cpu_offload
    if hasattr(offload, "offload_params"):
        return bool(offload.offload_params)
    return type(offload).__name__ == "CPUOffloadPolicy"


def state_bytes(
    model: torch.nn.Module, engine: Engine, live_reference: bool = False, upcast: bool = False
) -> dict[str, int]:
    """Bytes per device of the weights, gradients and optimizer state (master copy and moments) of ``model``
    trained under ``engine``, and with ``live_reference`` its frozen copy's (``reference``); ``total`` is their
    sum. ``upcast``: the trained weights counted in float32 whatever their dtype now, as FSDP trains them
    (``precision.upcast_as_fsdp_does``) where the model is still in 16 bits (loaded for DeepSpeed's master copy, or
    under ``master_weights=model``)."""

    def size(p) -> int:
        return max(p.element_size(), 4) if upcast and p.requires_grad and p.is_floating_point() else p.element_size()

    loaded = sum(full_numel(p) * size(p) for p in model.parameters())
    params = sum(full_numel(p) for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    t = sum(full_numel(p) for p in trained)
    t_bytes = sum(full_numel(p) * size(p) for p in trained)  # in each weight's own dtype
    n = max(engine.processes, 1)
    sharded_over = min(engine.shard_over or n, n)  # FSDP: the processes a parameter is split over
    if engine.kind == "deepspeed":
        weights, grads, optimizer = (2 * params, 2 * t, 12 * t) if engine.half_precision else (4 * params, 4 * t, 8 * t)
        stage = engine.zero_stage
        optimizer = 0 if engine.offload_optimizer else optimizer // n if stage >= 1 else optimizer
        grads = 0 if engine.offload_optimizer else grads // n if stage >= 2 else grads  # offloaded: on the CPU
        if engine.half_precision and not engine.offload_optimizer:  # the step's float32 gradients, as the master's
            partition = t // n if stage >= 1 else t
            grads += 4 * (min(partition, engine.sub_group_size) if stage == 3 else partition)
        weights = 0 if engine.offload_params and stage == 3 else weights // n if stage == 3 else weights
    else:
        weights, grads, optimizer = loaded, t_bytes, 2 * t_bytes
        if engine.kind == "fsdp":
            shard = 0 if engine.offload_params else sharded_over
            weights, grads, optimizer = (x // shard if shard else 0 for x in (weights, grads, optimizer))
    need = {"weights": weights, "gradients": grads, "optimizer": optimizer}
    if engine.kind == "fsdp" and engine.gathered_bytes and sharded_over > 1:
        need["gathered weights"] = engine.gathered_bytes * params  # kept from each forward to its backward
    if live_reference:
        if engine.kind == "fsdp" and engine.fsdp_version >= 2:
            need["reference"] = loaded // sharded_over
        elif engine.kind == "fsdp" and engine.reference_bytes:
            need["reference"] = engine.reference_bytes * params
        else:
            need["reference"] = loaded
    return need | {"total": sum(need.values())}


def gib(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def sharded_fit(model: torch.nn.Module, capacity: int, most: int = 64, live_reference: bool = False) -> int | None:
    """The fewest processes over which FSDP2's full sharding brings the state under ``capacity``: the trained
    weights in float32 (FSDP upcasts them, ZeRO-3 keeps a float32 master copy: 16 bytes a parameter either way),
    whatever their dtype in a run under DeepSpeed or ``master_weights=model`` (counted in 16 bits, half the GPUs
    were named, and that advice followed was refused again)."""
    for n in range(2, most + 1):
        if state_bytes(model, Engine("fsdp", n), live_reference, upcast=True)["total"] <= capacity:
            return n
    return None


def check_fits(
    model: torch.nn.Module, engine: Engine, capacity: int, what: str, live_reference: bool = False
) -> dict[str, int]:
    """Raise ``OutOfMemoryError`` when the trained state alone (with a live reference's copy) exceeds ``capacity``
    bytes (one device's memory); ``what`` names the run's hardware preset and device for the message. Returns
    ``state_bytes``."""
    need = state_bytes(model, engine, live_reference)
    if need["total"] <= capacity:
        return need
    params = sum(full_numel(p) for p in model.parameters()) / 1e9
    parts = ", ".join(f"{k} {gib(v)}" for k, v in need.items() if k != "total")
    options = []
    if live_reference:
        options.append("reference_mode=cached (the reference log-probs computed once, no copy of the model kept)")
    if engine.kind == "single" and all(p.requires_grad for p in model.parameters()):  # a full fine-tune
        lora = "ddp-lora" if engine.processes > 1 else "gpu-lora"
        options.append(f"hardware={lora} (LoRA: the base stays frozen in model.dtype, only adapters train)")
    if not engine.offload_optimizer:
        # DeepSpeed's estimate_zero3_model_states_mem_needs with both offloads and zero_init: 18 bytes a parameter
        # of CPU RAM a node, times its additional_buffer_factor of 1.5
        options.append(
            "hardware=zero3-offload (the optimizer state and weights in CPU RAM: about "
            f"{gib(27 * sum(full_numel(p) for p in model.parameters()))} of it a node, by DeepSpeed's estimate)"
        )
    shards = sharded_fit(model, int(0.8 * capacity), live_reference=live_reference)
    fully_sharded = engine.kind == "fsdp" or (engine.kind == "deepspeed" and engine.zero_stage >= 3)
    if shards and engine.processes < shards:
        options.append(
            f"hardware=fsdp or zero3 over at least {shards} such GPUs (accelerate launch --config_file "
            "launchers/fsdp.yaml or zero3.yaml)"
        )
    elif shards and not fully_sharded:  # DDP or ZeRO-1/2 on enough GPUs already: full sharding there fits
        options.append(
            f"hardware=fsdp or zero3 on these {engine.processes} GPUs (accelerate launch --config_file "
            f"launchers/fsdp.yaml or zero3.yaml: it needs {shards} or more)"
        )
    raise OutOfMemoryError(
        f"the {params:.2f}B-parameter model cannot be trained under {what}: its weights, gradients and optimizer "
        f"state{' and live reference' if live_reference else ''} alone take"
        f" {gib(need['total'])} per device ({parts}), before any activation, and the device has "
        f"{gib(capacity)}. A smaller batch or shorter sequences cannot help. Options: {'; '.join(options)}. "
        "hardware.check_memory=false skips this check."
    )


def check_device_memory(model: torch.nn.Module, accelerator, hardware, live_reference: bool = False) -> dict[str, int]:
    """The trained state's ``state_bytes`` (logged), checked with ``check_fits`` against the run's CUDA device
    (not on other devices, nor with ``hardware.check_memory=false``); the model as it will train (weights
    upcast, LoRA applied), before ``accelerator.prepare``; ``live_reference``: the run keeps a frozen copy."""
    device, engine = accelerator.device, Engine.of(accelerator)
    capacity = device_capacity(device)
    if capacity is None or not hardware.check_memory:
        need = state_bytes(model, engine, live_reference)
    else:
        need = check_fits(model, engine, capacity, f"hardware={hardware.name} on {device}", live_reference)
    log.info("trained state per device: %s", ", ".join(f"{k} {gib(v)}" for k, v in need.items()))
    return need


def device_capacity(device: torch.device) -> int | None:
    """Bytes of memory of a CUDA device; None elsewhere (CPU RAM is not checked)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
