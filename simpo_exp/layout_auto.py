"""``packing=auto`` by measurement: the run's first batch, timed in each layout the device can run.

Where ``hardware.measure_layouts`` asks (``null``, the default: on CUDA devices; ``true``: on any device;
``false``: never), set-up collates the first training batch for each candidate layout and times one
forward and backward of the model on it (one warm-up pass, then two timed ones, the device synchronized
around each; no optimizer step, the gradients dropped afterwards), and the run keeps the fastest.

    candidates  CUDA: padded (none); prefix_shared and packed with FlexAttention; packed with flash-attn
                where it is installed. Elsewhere: padded; prefix_shared and packed with segment attention
                (not for models that softcap their attention logits, which segment attention lacks).
    failures    a candidate that runs out of memory or that the model cannot run (its attention does not
                take the project's hook, a sliding window shorter than the batch) is skipped, its reason
                recorded; if every candidate fails, the padded layout (which the model runs itself).
    record      ``env.json`` ``layout_choice``: how the layout was chosen, each candidate's seconds per
                pass and first-batch loss (the mean response-token negative log-likelihood, the same in
                every layout up to rounding), the measured batch's size.
    resume      a resumed run keeps the layout its first start recorded in ``env.json`` (no new
                measurement, so a resumed run never changes layout).
    fused head  under ``hardware.fused_head`` each candidate is timed with the fused head and its loss, as
                the run will train.

The measurement runs under ``torch.random.fork_rng`` (the run's dropout stream is untouched) on a batch
drawn from a separate copy of the train loader (the run's data order is untouched); on CUDA the peak-memory
statistic is reset afterwards, so the run's reported peak is its own. ``hardware.packing_attention`` is not
consulted (each candidate names its attention), so one other than the default is refused here. Sharded
engines (FSDP, DeepSpeed) are not measured: their weights are not whole on one device before ``prepare``.

Where the layout is not measured (a fixed rule, or named on the command line; also on the main process of FSDP,
not under ZeRO-3, whose weights are partitioned as they load), one forward of a four-token pair (``plan_unused``)
checks that the model's attention takes the segment plan, for FlexAttention and flash-attn as for segment
attention: decoder layers that drop attention's keyword arguments (StableLM's, Falcon's, Nemotron's), or an
attention dropout kept on (``disable_dropout=false``) that FlexAttention cannot apply, get the padded layout under
``packing=auto`` (env.json ``layout_choice.fell_back`` says why) and a named packing is refused by key, before the
run starts.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import time
from pathlib import Path

import torch

from simpo_exp.data import MODEL_COLUMNS
from simpo_exp.layout import (
    BatchLayout,
    attention_sinks,
    check_attention,
    choose_layout,
    padded_only,
    softcaps_attention,
)
from simpo_exp.rundir import read_json

log = logging.getLogger(__name__)

TIMED_PASSES = 2  # after one warm-up pass


def measuring(hardware, device_type: str) -> bool:
    """Whether ``packing=auto`` is decided by measurement on this device."""
    if hardware.packing != "auto":
        return False
    if hardware.measure_layouts is None:
        return device_type == "cuda"
    return bool(hardware.measure_layouts)


def candidates(device_type: str, model_config, chunk_size: int = 0, max_length: int | None = None) -> list:
    """The layouts worth timing on this device for this model, the padded one first."""
    out = [BatchLayout("none", "segments", chunk_size)]
    if padded_only(model_config, max_length) or attention_sinks(model_config):  # no packed attention of these
        return out  # scores it as it scores a sequence alone (the mask attention does sinks, but is not timed here)
    if device_type == "cuda":
        out += [BatchLayout("prefix_shared", "flex", chunk_size), BatchLayout("packed", "flex", chunk_size)]
        if importlib.util.find_spec("flash_attn") is not None:
            out.append(BatchLayout("packed", "flash", chunk_size))
    elif not softcaps_attention(model_config):
        out += [BatchLayout("prefix_shared", "segments", chunk_size), BatchLayout("packed", "segments", chunk_size)]
    return out


def time_layout(model, layout: BatchLayout, pairs: list[dict], pad_token_id: int, device, autocast, fused=None) -> dict:
    """Seconds of each timed forward + backward of ``pairs`` in ``layout``, and the first pass's loss (the mean
    response-token NLL). With a ``fused`` head (simpo_exp/fused.py) the backward pass is of its loss."""
    from accelerate.utils import send_to_device

    from simpo_exp.data.collate import PairCollator
    from simpo_exp.logps import ResponseLogps

    policy = ResponseLogps.for_layout(model, layout, fused=fused)
    batch = send_to_device(PairCollator(pad_token_id, layout.packing, layout.attention)(pairs), device)
    seconds, loss = [], None
    try:
        for _ in range(1 + TIMED_PASSES):
            synchronize(device)
            started = time.perf_counter()
            with autocast():
                out = policy(**batch)
                sums = out.logp_sums if fused is None else out.logp_means * out.num_tokens
                nll = -sums.sum() / out.num_tokens.sum().clamp(min=1)
            (nll if fused is None else out.loss).backward()
            synchronize(device)
            seconds.append(time.perf_counter() - started)
            loss = float(nll.detach()) if loss is None else loss
    finally:
        model.zero_grad(set_to_none=True)
    timed = seconds[1:]
    return {"seconds": timed, "mean_seconds": sum(timed) / len(timed), "loss": loss}


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, layouts: list, pairs: list[dict], pad_token_id: int, device, autocast, fused=None) -> list[dict]:
    """One row per layout: packing, attention, and either the timings or the reason it was skipped."""
    rows = []
    for layout in layouts:
        row = {"packing": layout.packing, "attention": layout.attention}
        try:
            row |= time_layout(model, layout, pairs, pad_token_id, device, autocast, fused)
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except (ValueError, RuntimeError, NotImplementedError, ImportError, TypeError) as e:  # TypeError: a kernel
            # package of another version than its call expects
            if layout.packing == "none" or device_broken(e):
                # the model's own attention failed, or the device did (an illegal memory access leaves the CUDA
                # context unusable): a real error, not a layout it cannot run
                raise
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if "error" in row:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def device_broken(error: Exception) -> bool:
    """Whether an error is the device's own (torch.AcceleratorError from torch 2.8; "CUDA error: ..." before), after
    which nothing more runs on it: a later layout, or the run, would fail somewhere that does not say why."""
    if "out of memory" in str(error):  # "CUDA error: out of memory", a cuBLAS allocation: that layout's, not the GPU's
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(error, accelerator_error)) or str(error).startswith(
        "CUDA error"
    )


def fastest(rows: list[dict]) -> dict | None:
    timed = [r for r in rows if "error" not in r]
    return min(timed, key=lambda r: r["mean_seconds"]) if timed else None


def table(rows: list[dict]) -> str:
    lines = [f"{'packing':<14} {'attention':<9} {'s/pass':>9} {'loss':>10}"]  # s/pass: mean of the timed passes
    for r in rows:
        if "error" in r:
            lines.append(f"{r['packing']:<14} {r['attention']:<9} skipped: {r['error']}")
        else:
            lines.append(f"{r['packing']:<14} {r['attention']:<9} {r['mean_seconds']:9.4f} {r['loss']:10.6f}")
    return "\n".join(lines)


def recorded_layout(run_dir: Path) -> dict | None:
    """The ``batch_layout`` and ``layout_choice`` that an earlier start of this run wrote to env.json."""
    from simpo_exp.checkpoint import checkpoint_dirs

    if not checkpoint_dirs(run_dir):
        return None
    env = read_json(Path(run_dir) / "env.json")  # {} when missing or unreadable
    if not isinstance(env.get("batch_layout"), dict):
        return None
    return {"batch_layout": env["batch_layout"], "layout_choice": env.get("layout_choice")}


def layout_for_run(cfg, accelerator, model, run_dir: Path, first_pairs, pad_token_id: int, fused=None) -> tuple:
    """The run's ``BatchLayout`` and how it was chosen (env.json's ``layout_choice``). ``first_pairs()``
    gives the run's first training batch as a list of pairs; it is called only when measuring. ``fused``: the
    run's fused head, if any, with which the candidates are timed."""
    from simpo_exp.engine import SHARDED_ENGINES, on_main

    hw, device_type = cfg.hardware, accelerator.device.type

    def fixed() -> BatchLayout:
        return choose_layout(hw, device_type, model.config, cfg.max_length)

    if hw.packing != "auto":
        layout = fixed()
        if why := on_main(accelerator, lambda: plan_unused(model, layout, pad_token_id)):
            from simpo_exp.config import ConfigError

            raise ConfigError(
                f"hardware.packing={hw.packing!r} with hardware.packing_attention={hw.packing_attention!r}: {why}; "
                "use hardware.packing_attention=mask, hardware.packing=none, or hardware.packing=auto (which falls "
                "back to the padded layout for this model)" + ("; or disable_dropout=true" if "dropout" in why else "")
            )
        return layout, {"rule": "configured"}
    check_auto_attention(hw, device_type)
    if cfg.resume:
        earlier = on_main(accelerator, lambda: recorded_layout(run_dir))
        layout = earlier and keep_recorded(earlier["batch_layout"], hw.logps_chunk_size, device_type)
        if layout:
            log.info("packing=auto: resuming with the layout recorded at the first start: %s", layout)
            return layout, {"rule": "recorded at the first start", "first_start": earlier["layout_choice"]}
    sharded = accelerator.distributed_type in SHARDED_ENGINES
    if sharded or not measuring(hw, device_type):
        layout = fixed()
        if sharded:
            log.info("packing=auto: not measured under %s; fixed rule: %s", accelerator.distributed_type.value, layout)
        rule = {"rule": "fixed", "why": "sharded engine"} if sharded else {"rule": "fixed"}
        if why := on_main(accelerator, lambda: plan_unused(model, layout, pad_token_id)):
            log.warning("packing=auto: the padded layout, not %s: %s", layout, why)
            return BatchLayout("none", "segments", hw.logps_chunk_size), rule | {"fell_back": why}
        return layout, rule

    def run():
        pairs = first_pairs()
        rows = measure_on_device(cfg, accelerator, model, pairs, pad_token_id, fused)
        size = {"pairs": len(pairs), "tokens": sum(len(p[k]) for p in pairs for k in MODEL_COLUMNS)}
        return rows, size

    rows, size = on_main(accelerator, run)
    best = fastest(rows)  # None when every candidate failed: then the padded layout, which the model runs itself
    layout = (
        BatchLayout(best["packing"], best["attention"], hw.logps_chunk_size)
        if best
        else BatchLayout("none", "segments", hw.logps_chunk_size)
    )
    log.info("packing=auto measured on %s (%d pairs); chose %s\n%s", device_type, size["pairs"], layout, table(rows))
    return layout, {"rule": "measured", "device": device_type, "batch": size, "candidates": rows}


PROBE_PAIR = {"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4]}


def plan_unused(model, layout: BatchLayout, pad_token_id: int) -> str | None:
    """Why ``layout``'s packed attention cannot run this model, or None. One forward of a four-token pair, without
    gradients, in training mode (the random streams restored), on the device the model is on, with the segment
    plan in probe mode (each layer's attention only counts itself: no kernel runs, so FlexAttention compiles
    nothing here) finds decoder layers that drop the keyword arguments that carry the plan to attention
    (``logps.SegmentPlanUnused``'s words, or that the model has no attention function to wrap: Falcon under
    ``eager``), and, for FlexAttention, an attention dropout it cannot apply (``disable_dropout=false`` on a
    model that has one). Either would fail at the first step. Not for ``packing_attention=mask``, which runs the
    model's own attention with a mask."""
    from accelerate.utils import send_to_device

    from simpo_exp.config import ConfigError
    from simpo_exp.data.collate import PairCollator
    from simpo_exp.logps import ResponseLogps, SegmentPlanUnused

    if layout.packing == "none" or layout.attention == "mask" or not whole_on_this_process(model):
        return None
    device = next(model.parameters()).device
    batch = send_to_device(PairCollator(pad_token_id, layout.packing, "segments")([PROBE_PAIR]), device)
    original, was_training = model.config._attn_implementation, model.training
    devices = rng_devices(device)
    try:
        logps = ResponseLogps.for_layout(model, BatchLayout(layout.packing, "segments", layout.chunk_size))
        logps.probe = True
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model.train()
            logps(**batch)
    except (SegmentPlanUnused, ConfigError) as e:  # the plan dropped, or no attention of the model's to wrap
        return str(e).split(";")[0]
    finally:
        model.train(was_training)
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)
    if layout.attention == "flex" and logps.probed_dropout:
        return (
            f"FlexAttention has no attention dropout, and this model's attention trains with {logps.probed_dropout:g} "
            "(disable_dropout=false)"
        )
    return None


def whole_on_this_process(model) -> bool:
    """Whether the model's weights are all here before the engine takes it: not under ZeRO-3, which partitions
    them as they load (its forward runs only inside the engine), nor on the meta device. FSDP's main process, and
    its others where they hold placeholders until ``prepare`` broadcasts the main one's, can run the probe."""
    return not any(p.device.type == "meta" or hasattr(p, "ds_id") for p in model.parameters())


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose random stream ``torch.random.fork_rng`` keeps for work on ``device``."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def check_auto_attention(hardware, device_type: str) -> None:
    """``packing=auto`` picks each layout's attention itself on a CUDA device and wherever it measures; there a
    ``packing_attention`` other than the default would be dropped without a word, so it is refused by name."""
    if hardware.packing != "auto" or hardware.packing_attention == "segments":
        return
    measured = measuring(hardware, device_type)
    if not (device_type == "cuda" or measured):
        return
    from simpo_exp.config import ConfigError

    raise ConfigError(
        f"hardware.packing_attention={hardware.packing_attention!r} has no effect with hardware.packing=auto on "
        f"{device_type}{' where layouts are measured' if measured else ''}: each candidate "
        "layout brings its own attention; set hardware.packing=packed or prefix_shared to choose the attention, "
        "or leave hardware.packing_attention at its default"
    )


def keep_recorded(recorded: dict, chunk_size: int, device_type: str) -> BatchLayout | None:
    """The recorded layout with this run's chunk size, or None (with a warning) if it cannot run here."""
    from simpo_exp.config import ConfigError

    try:
        check_attention(recorded["packing"], recorded["attention"], device_type)
        return BatchLayout(recorded["packing"], recorded["attention"], chunk_size)
    except (ConfigError, ValueError, KeyError) as e:
        log.warning("packing=auto: the recorded layout %s cannot run here (%s); choosing again", recorded, e)
        return None


def measure_on_device(cfg, accelerator, model, pairs: list[dict], pad_token_id: int, fused=None) -> list[dict]:
    """``measure`` with the model on the run's device in training mode, the random streams and the
    model's attention implementation restored afterwards."""
    device = accelerator.device
    layouts = candidates(device.type, model.config, cfg.hardware.logps_chunk_size, cfg.max_length)
    original, was_training = model.config._attn_implementation, model.training
    devices = rng_devices(device)
    model.to(device).train()
    try:
        with torch.random.fork_rng(devices=devices):
            return measure(model, layouts, pairs, pad_token_id, device, accelerator.autocast, fused)
    finally:
        model.train(was_training)
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)
        if device.type == "cuda":  # the run's peak-memory figure (train/gpu_max_allocated_gb) starts after this
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
