"""Which dtype the trained weights, the optimizer state and the compute use: chosen here, in one place.

SimPO's learning rates (3e-7 to 1e-6) give Adam updates of about ``lr`` per element, some 1e-5 of a
typical weight's magnitude, while bfloat16 resolves only 2^-8 (about 4e-3) of it: an optimizer that
steps bf16 weights rounds almost every update away. So full fine-tuning keeps float32 weights by
default (``hardware.master_weights=fp32``): weights loaded in ``model.dtype`` are upcast, the forward
runs under the ``hardware.mixed_precision`` autocast, and AdamW's moments follow the weights (float32).
This is what the official SimPO recipes do (``torch_dtype: null`` with ``bf16: true``).

- ``master_weights=model`` keeps the weights in ``model.dtype`` (pure bf16 for the hub presets): half
  the memory, and a warning when the learning rate is below what bf16 can resolve for most weights.
- LoRA: the frozen base stays in ``model.dtype``; the adapters are float32 (peft upcasts them).
- DeepSpeed: the engine holds bf16 weights and keeps its own float32 master copy and optimizer state; the final
  model is saved from that master copy (``engine_state_dict``), in float32 as a full fine-tune's is.
- FSDP: float32 shards are the master weights (under mixed precision whatever ``master_weights`` says:
  ``upcast_as_fsdp_does``); under bf16 the forward runs on bf16 copies of the gathered
  weights and gradients are reduced in bf16 (accelerate's policy), recorded as ``fsdp_param_dtype`` and
  ``fsdp_reduce_dtype``. The policy's cast of every output to bf16 is dropped (``engine.keep_fsdp_outputs``):
  the log-prob sums stay float32. FSDP1's cast of the buffers to bf16 is too (``engine.keep_fsdp1_buffers``):
  RoPE's frequencies stay float32 (``fsdp_buffer_dtype``).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
SAMPLE_PER_TENSOR = 4096  # elements per weight tensor looked at by the rounding check


def trainable_dtype(model) -> torch.dtype:
    """The dtype of the first parameter that trains."""
    for p in model.parameters():
        if p.requires_grad:
            return p.dtype
    return next(model.parameters()).dtype


def engine_keeps_master_copy(accelerator) -> bool:
    """DeepSpeed under bf16/fp16: the engine trains the weights in that dtype and keeps its own float32 master
    copy and optimizer state, so the weights are handed to it as loaded. Upcast, its ZeRO-3 takes float32 for its
    working dtype where the model was built partitioned (``zero3_init_flag``, the offload launcher): the whole
    run would compute and gather in float32."""
    return accelerator.distributed_type.value == "DEEPSPEED" and accelerator.mixed_precision in ("bf16", "fp16")


def engine_state_dict(accelerator, model) -> dict[str, torch.Tensor] | None:
    """Under DeepSpeed with its own float32 master copy (``engine_keeps_master_copy``), ``model``'s whole state
    dict in float32 on the CPU of the main process (None on the others): each trained parameter's master, each
    frozen one (a LoRA base) and each buffer as the engine holds it, gathered one weight at a time where ZeRO-3
    partitioned it. Every process must call it (the gathers are collectives). ``accelerator.get_state_dict``
    hands over the engine's bf16 working weights, which round a SimPO-size update away (at lr 1e-6 most of it),
    and gathering them as well as the masters held a second whole copy in host memory (16 GB for an 8B model; on
    every process under ZeRO-2)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = accelerator.unwrap_model(model)
    main, out, done = accelerator.is_main_process, {}, {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in done:  # a tied weight's second key is the same tensor: gathered once
            full = safe_get_full_fp32_param(tensor) if getattr(tensor, "requires_grad", False) else None
            if full is None:  # frozen, a buffer, or a weight the engine keeps no master of: as it holds it
                with deepspeed.zero.GatheredParameters([tensor] if hasattr(tensor, "ds_id") else []):
                    full = tensor.detach().to("cpu", copy=True) if main else None
            done[id(tensor)] = (
                full.detach().to("cpu", torch.float32 if full.is_floating_point() else full.dtype) if main else None
            )
        if main:
            out[key] = done[id(tensor)]
    return out if main else None


def warn_if_the_engine_rounds_the_base(accelerator, model) -> bool:
    """DeepSpeed under bf16/fp16 casts the whole module to that dtype, and keeps float32 masters of the trained
    weights only: a LoRA base loaded in float32 trains and is saved as its bf16 rounding (``model/`` is
    bf16(base) + adapter, and ``model/adapter`` on the float32 base is another model). Said before ``prepare``."""
    if not engine_keeps_master_copy(accelerator):
        return False
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32]
    if not frozen:
        return False
    log.warning(
        "DeepSpeed under %s casts the frozen LoRA base (%d float32 tensors) to %s: it trains and is saved as its "
        "rounding, and model/adapter on the float32 base is not the model trained; load the base in that dtype "
        "(model.dtype=bfloat16) or train LoRA under FSDP, which keeps the base as loaded",
        accelerator.mixed_precision, len(frozen), accelerator.mixed_precision,
    )  # fmt: skip
    return True


def prepare_weights(model, master_weights: str, lora: bool, engine_master_copy: bool = False):
    """Upcast a fully fine-tuned model's low-precision weights to float32 when ``master_weights`` is fp32, unless
    the engine keeps a float32 master copy itself (``engine_keeps_master_copy``)."""
    if engine_master_copy:
        if master_weights == "model" and not lora:  # as FSDP's case (upcast_as_fsdp_does): said, not silently unread
            log.warning(
                "hardware.master_weights=model under DeepSpeed with mixed precision: DeepSpeed keeps a float32 master "
                "copy of the trained weights whatever it is asked, so the updates are kept as under fp32 (and so is "
                "the memory of a float32 state)"
            )
        return model
    if master_weights == "fp32" and not lora and trainable_dtype(model) != torch.float32:
        log.info(
            "master weights: %s weights upcast to float32 for training (hardware.master_weights=fp32)",
            trainable_dtype(model),
        )
        model.float()
    return model


def upcast_as_fsdp_does(model, accelerator) -> int:
    """FSDP under mixed precision keeps float32 master shards of every trained weight whatever it is handed
    (accelerate upcasts them before sharding; its policy computes in bf16): ``hardware.master_weights=model``
    changes nothing there. Said, and done before the memory check and the update-size warning, which would
    otherwise count half the memory a float32 state takes and warn of rounding that never happens. Returns the
    number of tensors upcast."""
    if accelerator.distributed_type.value != "FSDP" or accelerator.mixed_precision == "no":
        return 0
    low = [p for p in model.parameters() if p.requires_grad and p.dtype != torch.float32]
    if low:
        log.warning(
            "hardware.master_weights=model under FSDP with mixed_precision=%s: accelerate keeps float32 master shards "
            "of the trained weights whatever it is given, so the %d trained %s tensors train in float32 (the memory of "
            "a float32 state; the forward computes in FSDP's param_dtype)",
            accelerator.mixed_precision, len(low), low[0].dtype,
        )  # fmt: skip
        for p in low:
            p.data = p.data.float()
    return len(low)


def vanishing_fraction(model, lr: float) -> float:
    """Share of trainable weight elements (sampled) whose half-ULP in their own dtype exceeds ``lr``:
    for those, an Adam step of about ``lr`` rounds back to the same weight."""
    below, seen = 0, 0
    for p in model.parameters():
        if not p.requires_grad or p.dtype == torch.float32 or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLE_PER_TENSOR)].float().abs()
        half_ulp = torch.finfo(p.dtype).eps * torch.exp2(torch.floor(torch.log2(sample.clamp(min=1e-30)))) / 2
        below += int((half_ulp > lr).sum())
        seen += sample.numel()
    return below / seen if seen else 0.0


def warn_if_updates_vanish(model, lr: float, threshold: float = 0.5) -> float:
    """Warn once when most low-precision trainable weights cannot take a step of size ``lr``."""
    share = vanishing_fraction(model, lr)
    if share > threshold:
        log.warning(
            "pure %s training at learning rate %.3g: for %.0f%% of the trainable weights an update of that size "
            "is below half a unit in the last place and rounds away. Use hardware.master_weights=fp32 (the default) "
            "to keep float32 weights.",
            trainable_dtype(model),
            lr,
            100 * share,
        )
    return share


def precision_record(model, accelerator) -> dict:
    """The dtypes actually used: trained weights, their master copy, the optimizer state, the autocast."""
    weights = str(trainable_dtype(model)).removeprefix("torch.")
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    autocast = AUTOCAST_DTYPES.get(accelerator.mixed_precision)
    record = {
        # DeepSpeed under bf16/fp16 casts the whole module to that dtype (its float32 copy is the master)
        "weights_dtype": autocast if deepspeed and autocast else weights,
        # torch's AdamW keeps its moments in the dtype of the weights it steps; DeepSpeed in float32
        "master_weights_dtype": "float32" if deepspeed else weights,
        "optimizer_state_dtype": "float32" if deepspeed else weights,
        # accelerate runs no autocast under DeepSpeed: the engine's cast weights make the compute 16-bit
        "autocast_dtype": None if deepspeed else autocast,
    }
    if accelerator.distributed_type.value == "FSDP":
        # FSDP casts each layer's gathered weights to param_dtype for its forward and backward (so the whole
        # forward, residual stream included, runs in it, as under DeepSpeed's bf16) and reduces the gradients in
        # reduce_dtype (param_dtype when unset); the float32 shards stay the master weights
        policy = getattr(accelerator.state.fsdp_plugin, "mixed_precision_policy", None)
        compute = getattr(policy, "param_dtype", None) or trainable_dtype(model)
        reduce = getattr(policy, "reduce_dtype", None) or compute
        record["fsdp_param_dtype"] = str(compute).removeprefix("torch.")
        record["fsdp_reduce_dtype"] = str(reduce).removeprefix("torch.")
        if getattr(policy, "buffer_dtype", None) is not None:  # FSDP1 casts the buffers (RoPE's) to it
            record["fsdp_buffer_dtype"] = str(policy.buffer_dtype).removeprefix("torch.")
    return record
