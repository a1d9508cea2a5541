"""The training loop, top to bottom.

    set up   -> tokenizer, data, model, optimizer, schedule, accelerate; resume from a checkpoint if any
    each step:  for each micro-batch: forward (chosen+rejected in one pass) -> SimPO loss -> backward
                clip -> optimizer step (skipped if the gradient is not finite) -> schedule step
                every logging_steps: train metrics;  every eval_steps: eval metrics;
                every save_steps (and on SIGTERM): a checkpoint
    at the end  -> final eval, model + tokenizer (safetensors), summary.json, a table of the results
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType, send_to_device
from torch.utils.data import DataLoader

from simpo_exp import checkpoint, finished, samples
from simpo_exp.config import Config, ConfigError, resolve_gamma, resolve_learning_rate
from simpo_exp.data import MODEL_COLUMNS, PairCollator, build_datasets
from simpo_exp.data.sampler import LengthGroupedSampler, pair_lengths
from simpo_exp.environment import environment_record
from simpo_exp.flops import attention_pairs, flop_spec, peak_flops
from simpo_exp.logps import ResponseLogps
from simpo_exp.methods import REFERENCE_METHODS
from simpo_exp.objective import batch_loss
from simpo_exp.reference import REF_COLUMNS, WithReference, attach_reference_logps, live_reference
from simpo_exp.model import count_parameters, load_model, load_tokenizer
from simpo_exp.precision import warn_if_updates_vanish
from simpo_exp.tracking import (HEADLINE_METRICS, PAIR_METRICS, SAMPLES_KEY, TOKEN_METRICS, Tracker,
                                 all_batch_metrics, config_to_dict, divisor_keys, final_table)

log = logging.getLogger(__name__)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


class Window:
    """Sums of batch statistics since the last report. They stay on the device where the batch was
    computed (0-dim tensors), so adding a micro-batch's statistics never waits for the device; the
    host reads them only to log (``means``) or to checkpoint (``state``)."""

    def __init__(self, saved: dict | None = None):
        self.sums: dict[str, torch.Tensor] = {k: torch.tensor(v) for k, v in (saved or {}).items()}

    def merge(self, other: "Window") -> None:
        self.add(other.sums)

    def state(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.sums.items()}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()

    def means(self, accelerator, prefix: str) -> tuple[dict[str, float], dict[str, float]]:
        """(means named ``prefix/metric``, totals over all processes) of the window; empties it. A per-pair
        metric is divided by the pair count, a per-token one by its token count (tracking.divisor_keys)."""
        keys = sorted(self.sums)
        if not keys:  # every step of the window was skipped
            return {f"{prefix}/{m}": float("nan") for m in PAIR_METRICS + tuple(TOKEN_METRICS)}, {}
        stacked = torch.stack([self.sums[k].to(accelerator.device) for k in keys])  # restored sums are on the CPU
        totals = accelerator.reduce(stacked, reduction="sum").tolist()
        totals = dict(zip(keys, totals))
        self.sums = {}
        means = {}
        for m in all_batch_metrics():
            if m in totals:
                by = divisor_keys(m) or ("pairs",)
                means[f"{prefix}/{m}"] = totals[m] / max(sum(totals[k] for k in by), 1.0)
        return means, totals


@torch.no_grad()
def evaluate(policy, loader, cfg: Config, accelerator, reference=None) -> dict[str, float]:
    policy.eval()
    window = Window()
    rewards, lengths = [], []
    for batch in loader:
        _, stats, (r, n) = batch_loss(policy, batch, cfg, reference)
        window.add(stats)
        rewards.append(accelerator.gather_for_metrics(r))
        lengths.append(accelerator.gather_for_metrics(n))
    policy.train()
    metrics, _ = window.means(accelerator, "eval")
    # SimPO's length normalisation is meant to keep the reward from favouring long answers: watch it.
    metrics["eval/length/reward_corr"] = pearson(torch.cat(rewards), torch.cat(lengths))
    return metrics


def forever(loader, accelerator, consumed: int = 0):
    """Yield batches endlessly, reshuffling each epoch from (seed, epoch), starting after
    ``consumed`` micro-batches: a resumed run sees exactly the batches it would have seen."""
    epoch, skip = divmod(consumed, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


class StopSignal:
    """Remember a SIGTERM/SIGINT (what a scheduler sends before it kills) until the step ends."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, accelerator) -> bool:
        """Whether any process got a signal: all must stop at the same step, or the checkpoint's
        collectives would wait forever for the ones still training."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


SHARDED_ENGINES = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def engine_checkpoints(cfg: Config, accelerator) -> bool:
    """Whether checkpoints go through accelerator.save_state (see simpo_exp/checkpoint.py)."""
    sharded = accelerator.distributed_type in SHARDED_ENGINES
    fmt = cfg.hardware.checkpoint_format
    if fmt == "safetensors" and sharded:
        raise ConfigError(f"hardware.checkpoint_format='safetensors' cannot hold {accelerator.distributed_type.value}'s "
                          "sharded weights and optimizer; use 'accelerate' or 'auto'")
    return fmt == "accelerate" or (fmt == "auto" and sharded)


def on_main(accelerator, fn):
    """``fn()`` computed on the main process and given to every process."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([fn() if accelerator.is_main_process else None], from_process=0)[0]


def start_or_resume(cfg: Config, run_dir: Path, accelerator, policy, optimizer, scheduler, config_dict) -> "checkpoint.TrainState":
    """Load the newest intact checkpoint in the run directory (damaged ones skipped with a warning),
    or clear old state to start fresh."""
    metrics_path = run_dir / "metrics.jsonl"
    if cfg.resume:
        engine = accelerator.load_state if engine_checkpoints(cfg, accelerator) else None
        resumed = checkpoint.load_newest(run_dir, accelerator.unwrap_model(policy).model, optimizer, scheduler,
                                         config_dict, engine, on_main=lambda fn: on_main(accelerator, fn))
        if resumed:
            path, state = resumed
            if accelerator.is_main_process:
                checkpoint.trim_metrics(metrics_path, state.step)
            log.info("resumed from %s (step %d)", path, state.step)
            return state
    if accelerator.is_main_process:
        # A fresh start in a used directory: earlier checkpoints and metrics would mix with this run's.
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        metrics_path.unlink(missing_ok=True)
        (run_dir / finished.FINISHED).unlink(missing_ok=True)
    return checkpoint.TrainState()


# ----------------------------------------------------------------------------- set-up helpers
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
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
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


def batch_layout(cfg: Config, accelerator, model) -> dict:
    """ResponseLogps' layout arguments; ``packing=auto`` picks what was measured fastest per device
    (benchmarks/RESULTS.md): prefix sharing on CPU, the plain padded layout on GPU (not yet measured),
    and the padded layout for models whose attention softcaps its logits (Gemma 2), which segment
    attention does not implement."""
    h = cfg.hardware
    packing = h.packing
    if packing == "auto":
        softcap = getattr(getattr(model, "config", None), "attn_logit_softcapping", None)
        packing = "prefix_shared" if accelerator.device.type == "cpu" and not softcap else "none"
    return {"packing": packing, "attention": h.packing_attention, "chunk_size": h.logps_chunk_size}


def throughput(totals: dict, seconds: float, steps: int, flops, peak: float | None, accelerator) -> dict:
    """Speed and memory of a logging window: ``totals`` are its statistics summed over all processes."""
    import resource

    seconds = max(seconds, 1e-9)
    out = {"train/step_time_s": seconds / max(steps, 1),
           "train/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if accelerator.device.type == "cuda":
        out["train/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    if not totals:  # every step of the window was skipped
        return out
    out["train/tokens_per_s"] = totals["tokens"] / seconds
    out["train/samples_per_s"] = totals["pairs"] / seconds
    if peak:
        work = flops.step_flops(totals["tokens"], totals["length/chosen"] + totals["length/rejected"],
                                totals["attention_pairs"])
        out["train/mfu"] = work / seconds / (peak * accelerator.num_processes)
    return out


def pick_attention(cfg: Config) -> str:
    wanted = cfg.model.attn_implementation or cfg.hardware.attn_implementation
    if wanted == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            log.warning("flash_attention_2 asked for but flash-attn is not installed; using sdpa")
            return "sdpa"
    return wanted


def check_writable(run_dir: Path) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir={str(run_dir)!r} is not a writable directory ({e.strerror or e})") from e
    return run_dir


def total_steps(cfg: Config, batches_per_epoch: int, accum: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * batches_per_epoch / accum))


# ----------------------------------------------------------------------------- the run
def train(cfg: Config) -> dict:
    """Train one run; return its summary (final train and eval metrics, run time)."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    started = time.time()
    run_dir = check_writable(Path(cfg.output_dir))
    accelerator, accum = make_accelerator(cfg)
    if accelerator.num_processes > 1:  # each rank resolved its own Hydra directory: use the main one's
        from accelerate.utils import broadcast_object_list

        run_dir = Path(broadcast_object_list([str(run_dir)], from_process=0)[0])
    set_seed(cfg.seed)
    lr, lr_source = resolve_learning_rate(cfg)
    log.info("learning rate %.3g (from %s)", lr, lr_source)

    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        train_ds, eval_ds, data_report = build_datasets(cfg, tokenizer)
    model = load_model(cfg, tokenizer, pick_attention(cfg))
    log.info("model %s: %.2fM parameters", cfg.model.name, count_parameters(model) / 1e6)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed keeps its own fp32 master copy
        warn_if_updates_vanish(model, lr)
    layout = batch_layout(cfg, accelerator, model)
    policy = ResponseLogps(model, **layout)
    flops = flop_spec(model)  # before any sharding
    ckpt_bytes = checkpoint.check_space(run_dir, model, cfg.save_total_limit, cfg.save_model,
                                        warn=accelerator.is_main_process)  # warns if the disk is short
    peak = peak_flops(accelerator.device, accelerator.mixed_precision, cfg.hardware.peak_tflops)

    collate = PairCollator(tokenizer.pad_token_id, packing=layout["packing"], attention=layout["attention"])
    columns, reference = list(MODEL_COLUMNS), None
    if cfg.method in REFERENCE_METHODS and cfg.reference_mode == "cached":
        splits = attach_reference_logps(cfg, model, {"train": train_ds, "test": eval_ds}, collate, accelerator, layout)
        train_ds, eval_ds = splits["train"], splits["test"]
        collate, columns = WithReference(collate), columns + list(REF_COLUMNS)
    elif cfg.method in REFERENCE_METHODS:
        reference = live_reference(model, layout).to(accelerator.device)
    sampler = None
    if cfg.hardware.group_by_length:
        sampler = LengthGroupedSampler(pair_lengths(train_ds), cfg.per_device_train_batch_size, cfg.seed)
    train_loader = DataLoader(
        train_ds.select_columns(columns), batch_size=cfg.per_device_train_batch_size, shuffle=sampler is None,
        sampler=sampler,
        drop_last=True, collate_fn=collate, num_workers=cfg.hardware.dataloader_num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    eval_loader = DataLoader(
        eval_ds.select_columns(columns), batch_size=cfg.per_device_eval_batch_size, collate_fn=collate,
    )
    if len(train_loader) == 0:
        raise ConfigError(
            f"the train split has {len(train_ds)} pairs, fewer than per_device_train_batch_size="
            f"{cfg.per_device_train_batch_size}"
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    policy, optimizer, train_loader, eval_loader = accelerator.prepare(policy, optimizer, train_loader, eval_loader)
    steps = total_steps(cfg, len(train_loader), accum)
    scheduler = get_scheduler(
        cfg.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * steps), num_training_steps=steps
    )
    pairs_per_step = cfg.per_device_train_batch_size * accum * accelerator.num_processes

    gamma, gamma_beta_ratio = resolve_gamma(cfg)
    config_dict = config_to_dict(cfg)
    resolved = {"learning_rate": lr, "gamma": gamma, "gamma_beta_ratio": gamma_beta_ratio,
                "gradient_accumulation_steps": accum, "effective_batch_size": pairs_per_step}
    state = start_or_resume(cfg, run_dir, accelerator, policy, optimizer, scheduler, config_dict)
    env = environment_record(cfg, accelerator, model, data_report, layout)
    tracker = Tracker(run_dir, cfg.logger, config_dict | {"resolved": resolved, "env": env},
                      enabled=accelerator.is_main_process)
    tracker.write_json("data_report.json", data_report.__dict__)
    tracker.write_json("env.json", env)
    log.info("%d steps of %d pairs (%d per device x %d accumulation x %d processes) on %s",
             steps, pairs_per_step, cfg.per_device_train_batch_size, accum, accelerator.num_processes,
             accelerator.device)

    by_engine = engine_checkpoints(cfg, accelerator)

    def save_checkpoint() -> None:
        state.window, state.window_seconds, state.window_steps = window.state(), window_time, window_steps
        accelerator.wait_for_everyone()
        if by_engine:  # every process writes its shards into the staging directory
            if accelerator.is_main_process:
                checkpoint.start(run_dir, state.step)
            accelerator.wait_for_everyone()
            tmp = checkpoint.staging_dir(run_dir, state.step)
            try:
                accelerator.save_state(str(tmp / checkpoint.ENGINE_DIR))
            except OSError as e:  # disk full, permissions: the earlier checkpoints stay as they were
                raise checkpoint.save_failed(run_dir, tmp, e, ckpt_bytes) from e
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                path = checkpoint.finish(run_dir, tmp, None, None, scheduler, state, config_dict, cfg.save_total_limit,
                                         ckpt_bytes)
                log.info("checkpoint %s", path)
        elif accelerator.is_main_process:
            path = checkpoint.save(run_dir, accelerator.unwrap_model(policy).model, optimizer, scheduler, state,
                                   config_dict, cfg.save_total_limit)
            log.info("checkpoint %s", path)
        accelerator.wait_for_everyone()

    # Sharded weights are gathered layer by layer during a forward, which every process must join:
    # under FSDP and DeepSpeed all processes generate (in step, synced_gpus); elsewhere the main one alone.
    sharded = accelerator.distributed_type in SHARDED_ENGINES
    generating = accelerator.is_main_process or sharded
    shown = samples.sample_pairs(eval_ds, cfg.num_generations) if generating else []

    def run_eval(step: int) -> dict:
        metrics = evaluate(policy, eval_loader, cfg, accelerator, reference)
        tracker.log(metrics, step)
        if shown:  # what the model writes for a few fixed eval prompts
            unwrapped = accelerator.unwrap_model(policy)
            with torch.no_grad():
                batch = send_to_device(collate(shown), accelerator.device)
                _, _, (rewards, _) = batch_loss(unwrapped, batch, cfg, reference)
            texts = samples.generate(unwrapped.model, tokenizer, shown, cfg.max_new_tokens, accelerator.device,
                                     synced=sharded)
            tracker.log_generations(samples.generation_rows(step, shown, texts, rewards), step)  # main only
        return metrics

    summary: dict = {}
    if cfg.eval_on_start and state.step == 0:
        summary |= run_eval(0)

    batches = forever(train_loader, accelerator, state.micro_batches)
    window = Window(state.window)
    window_time, window_steps = state.window_seconds, state.window_steps  # training steps only, not eval or saves
    bar = None
    if cfg.progress_bar and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=state.step, desc="training", dynamic_ncols=True)
    stop = StopSignal()
    bad_in_a_row = 0
    policy.train()
    for step in range(state.step + 1, steps + 1):
        step_started = time.time()
        step_stats = Window()
        for _ in range(accum):
            batch = next(batches)
            state.micro_batches += 1
            work = attention_pairs(batch, layout["packing"])
            # accumulate(): no gradient all-reduce until the last micro-batch of the step, and
            # backward() scales the loss by 1/accum (DeepSpeed's engine does both itself).
            with accelerator.accumulate(policy):
                loss, stats, _ = batch_loss(policy, batch, cfg, reference)
                accelerator.backward(loss)
            step_stats.add(stats | {"attention_pairs": torch.as_tensor(work, dtype=torch.float32)})
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        if grad_norm is None and hasattr(policy, "get_global_grad_norm"):  # DeepSpeed clipped in its own step
            grad_norm = policy.get_global_grad_norm()
        grad_norm = torch.tensor(float("nan") if grad_norm is None else float(grad_norm))
        if torch.isfinite(grad_norm) or accelerator.distributed_type == DistributedType.DEEPSPEED:
            optimizer.step()
            window.merge(step_stats)
            bad_in_a_row = 0
        else:  # a non-finite loss gives non-finite gradients too
            state.skipped_steps += 1
            bad_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)", step, bad_in_a_row)
            if bad_in_a_row > cfg.max_bad_steps:
                last = checkpoint.checkpoint_dirs(run_dir)
                raise NonFiniteError(
                    f"{bad_in_a_row} consecutive steps with a non-finite loss or gradient, the last at step {step}; "
                    f"last good checkpoint: {last[-1] if last else 'none'}. Lower learning_rate or check the data."
                )
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step
        window_time += time.time() - step_started  # grad_norm's float() waited for the device
        window_steps += 1

        if step % cfg.logging_steps == 0 or step == steps:
            metrics, totals = window.means(accelerator, "train")
            state.num_tokens += totals.get("input_tokens", 0.0)
            metrics |= {
                "train/num_tokens": state.num_tokens,
                "train/grad_norm": float(grad_norm),
                "train/learning_rate": scheduler.get_last_lr()[0],
                "train/epoch": state.micro_batches / len(train_loader),
                "train/skipped_steps": state.skipped_steps,
                SAMPLES_KEY: step * pairs_per_step,
            } | throughput(totals, window_time, window_steps, flops, peak, accelerator)
            tracker.log(metrics, step)
            summary |= metrics
            window_time, window_steps = 0.0, 0
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/rewards/accuracies']:.2f}")
        if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == steps:
            summary |= run_eval(step)
        stopping = stop.agreed(accelerator)
        if (cfg.save_steps and step % cfg.save_steps == 0 and step < steps) or stopping:
            save_checkpoint()
        if bar is not None:
            bar.update(1)
        if stopping:
            signum = stop.signum or signal.SIGTERM  # another process got it first
            log.warning("stopped by signal %s after step %d; re-run the same command to resume", signum, step)
            raise SystemExit(128 + signum)
    if bar is not None:
        bar.close()
    stop.restore()
    if state.skipped_steps >= steps:  # the weights never changed: nothing to report as a result
        raise NonFiniteError(f"all {steps} steps had a non-finite loss or gradient and were skipped; no weights "
                             "were updated. Lower learning_rate or check the data (run with resume=false).")

    summary |= {"train/global_step": steps, "train/skipped_steps": state.skipped_steps,
                "runtime_s": time.time() - started,
                "learning_rate_source": lr_source} | {f"resolved/{k}": v for k, v in resolved.items()}
    summary |= {f"precision/{k}": v for k, v in env["precision"].items()}  # dtypes actually trained in
    accelerator.wait_for_everyone()
    full_state_dict = None
    if cfg.save_model and accelerator.distributed_type in SHARDED_ENGINES:
        # sharded weights: every process takes part in gathering them ("model." is the wrapper's prefix)
        full_state_dict = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(policy).items()}
    if accelerator.is_main_process:
        if cfg.save_model:
            unwrapped = accelerator.unwrap_model(policy).model
            unwrapped.save_pretrained(run_dir / "model", state_dict=full_state_dict)  # LoRA: the adapter only
            tokenizer.save_pretrained(run_dir / "model")
        tracker.finish(summary)
        finished.record(run_dir, config_dict)  # last: a re-run of this command now returns this summary
        keys = HEADLINE_METRICS + ["runtime_s"] + (["train/skipped_steps"] if state.skipped_steps else [])
        print(f"\nrun directory: {run_dir.resolve()}\n{final_table(summary, keys)}", flush=True)
    return summary
