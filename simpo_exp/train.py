"""The training loop, top to bottom.

    set_up            tokenizer, data, model, optimizer, schedule, accelerate; resume from a checkpoint if any
    each step         optimizer_step: for each micro-batch forward (chosen + rejected in one pass) -> loss ->
                      backward; clip -> optimizer step (skipped if the gradient is not finite) -> schedule
                      every logging_steps log_train; every eval_steps evaluate_and_sample;
                      every save_steps (and on SIGTERM/SIGINT/SIGUSR2, then exit) save_checkpoint
    finish            model + tokenizer (safetensors), summary.json, a table of the results

Engine set-up lives in simpo_exp/engine.py, the logging window and throughput in simpo_exp/metrics.py,
signal handling in simpo_exp/signals.py, the loss of a batch in simpo_exp/objective.py.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, send_to_device
from torch.utils.data import DataLoader

from simpo_exp import checkpoint, finished, samples
from simpo_exp.compiled import eager_only, watch_compiles
from simpo_exp.config import (
    Config,
    ConfigError,
    check_preset_size,
    large_rate_note,
    lora_rate_note,
    replaced_rate_note,
    resolve_gamma,
    resolve_learning_rate,
    schema_default,
)
from simpo_exp.data import MODEL_COLUMNS, PairCollator, build_datasets
from simpo_exp.data.dealt import Dealt
from simpo_exp.data.sampler import LengthGroupedSampler, pair_lengths
from simpo_exp.data.sources import changes_since_record
from simpo_exp.engine import (
    SHARDED_ENGINES,
    adamw,
    adamw_fused,
    check_extras,
    check_same_config,
    engine_checkpoints,
    fsdp2,
    lr_schedule,
    make_accelerator,
    on_every,
    on_main,
    together,
)
from simpo_exp.environment import environment_record, with_earlier_starts
from simpo_exp.errors import UserError, out_of_memory
from simpo_exp.flops import FlopSpec, attention_pairs, flop_spec, matmul_precision, peak_flops
from simpo_exp.fused import fused_head
from simpo_exp.inference.files import probe_writable, write_json
from simpo_exp.inference.results import EVAL_DIR
from simpo_exp.layout import BatchLayout
from simpo_exp.layout_auto import layout_for_run
from simpo_exp.logps import ResponseLogps, shared_parameters
from simpo_exp.logps_check import check_logps
from simpo_exp.memory import check_device_memory
from simpo_exp.methods import REFERENCE_METHODS, TABLE
from simpo_exp.metrics import SKIPPED, Window, pearson
from simpo_exp.model import (
    TORCH_DTYPES,
    chat_template_hash,
    check_positions,
    count_parameters,
    eval_mode,
    load_model,
    load_tokenizer,
    pick_attention,
    ready_to_generate,
    save_tokenizer,
    save_trained,
    tokenizer_hash,
)
from simpo_exp.modelcard import resolved_values, write_model_card
from simpo_exp.objective import batch_loss, chosen_tokens
from simpo_exp.precision import (
    AUTOCAST_DTYPES,
    engine_keeps_master_copy,
    engine_state_dict,
    upcast_as_fsdp_does,
    warn_if_the_engine_rounds_the_base,
    warn_if_updates_vanish,
)
from simpo_exp.reference import (
    REF_INDEX,
    CachedReference,
    architecture_fingerprint,
    from_main_process,
    in_fsdp1s_precision,
    in_the_policys_precision,
    live_reference,
    shard_like_the_policy,
    shares_the_policy,
    weights_fingerprint,
)
from simpo_exp.rundir import (
    STOPPED_FILE,
    read_json,
    read_jsonl,
    recorded_sources,
    rerun_command,
    stopped_before_a_step_record,
    stopped_record,
)
from simpo_exp.runinfo import keep_run_config
from simpo_exp.signals import StopRequested, StopSignal, ignore_stop_signals
from simpo_exp.tracking import (
    GENERATIONS_FILE,
    HEADLINE_METRICS,
    METRICS_FILE,
    SAMPLES_KEY,
    WANDB_RECORD,
    Tracker,
    config_to_dict,
    final_table,
    wandb_holds_through,
)

log = logging.getLogger(__name__)


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient (or none that succeeded)."""


@dataclass
class Run:
    """What the steps of one run share: built once by ``set_up``, read by the steps of the loop."""

    cfg: Config
    run_dir: Path
    accelerator: Any
    accum: int  # micro-batches per optimizer step
    steps: int  # optimizer steps in the run
    pairs_per_step: int  # per-device batch x accumulation x processes
    tokenizer: Any
    policy: Any  # the prepared ResponseLogps around the model
    reference: Any  # a live reference model, or None (reference-free, or cached reference log-probs)
    layout: BatchLayout
    collate: Any
    train_loader: Any
    eval_loader: Any
    optimizer: Any
    scheduler: Any
    tracker: Tracker
    state: checkpoint.TrainState
    config_dict: dict
    summary_extra: dict  # resolved values, where the learning rate came from, precision used
    flops: FlopSpec
    peak: float | None
    checkpoint_bytes: int
    shown: list  # the eval pairs whose greedy completions are logged at each eval
    started: float
    step_lr: float = 0.0  # the learning rate the last optimizer step used (logged as TRL logs it)
    compiler: Any = None  # a CompileWatch: compile steps apart from timed ones (simpo_exp/compiled.py)


# ----------------------------------------------------------------------------- set-up
def check_writable(run_dir: Path) -> Path:
    try:
        probe_writable(run_dir)  # every process of a run checks the folder, each with a probe of its own
    except OSError as e:
        raise ConfigError(f"output_dir={str(run_dir)!r} is not a writable directory ({e.strerror or e})") from e
    return run_dir


def check_batches_per_process(batches: int, per_device: int, processes: int) -> None:
    """Refuse a train split that gives each process no whole batch (``batches``: one process's share, as prepare
    deals them; the split had fewer than ``per_device x processes`` pairs): the run died dividing by it."""
    if batches == 0:
        raise ConfigError(
            f"the train split gives each of the {processes} processes no whole batch of per_device_train_batch_size="
            f"{per_device} pairs: it needs at least {per_device} x {processes} processes = {per_device * processes} "
            "pairs; use more data or a smaller per_device_train_batch_size"
        )


def epoch_batches(batches_per_epoch: int, accum: int) -> int:
    """Micro-batches of each epoch that training uses: whole optimizer steps of ``accum`` only, the last
    ``batches_per_epoch % accum`` left out (as transformers 4.x's Trainer, which the official recipes ran, leaves
    them from its epochs of ``len // accum`` steps; 5.x trains them as one short step), so that no pair is seen
    twice within ``num_train_epochs=1``; the whole epoch where it holds less than one step."""
    return batches_per_epoch // accum * accum or batches_per_epoch


def same_epochs(state: "checkpoint.TrainState", per_epoch: int, loader_batches: int) -> int:
    """``per_epoch``, checked against a resumed checkpoint's: one written before epochs ended at their last whole
    optimizer step counted every micro-batch of an epoch (its data position and schedule length follow that
    rule), so where the two rules differ for this run it cannot be continued as the same run."""
    if state.step and state.epoch_batches != per_epoch and (state.epoch_batches or per_epoch != loader_batches):
        raise checkpoint.CheckpointError(
            f"the checkpoint at step {state.step} counted {state.epoch_batches or loader_batches} micro-batches an "
            f"epoch, this version {per_epoch} (an epoch now ends at its last whole optimizer step): its data "
            "position and learning-rate schedule would not carry over. Finish it with the version that wrote it, "
            "or run with resume=false to start fresh"
        )
    return per_epoch


def cadence_past_the_end(cfg: Config, steps: int) -> list[str]:
    """A warning for each of ``eval_steps`` and ``save_steps`` set (other than its default) to the run's length or
    more: the run would evaluate only at its end, or keep no checkpoint to resume from before it."""
    said = {"eval_steps": "evaluates only at its end", "save_steps": "saves no checkpoint before its end"}
    return [
        f"{key}={every} is not below the run's {steps} steps: it {what}"
        for key, what in said.items()
        if (every := getattr(cfg, key)) >= steps and every != schema_default(key)
    ]


def total_steps(cfg: Config, batches_per_epoch: int, accum: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * epoch_batches(batches_per_epoch, accum) / accum))


def make_loaders(
    cfg: Config, model, splits: dict, collate, accelerator, layout: BatchLayout, start_weights: str | None = None
):
    """(eval collate, reference, train loader, eval loader, eval split). ``reference``: a frozen copy of the
    model (``reference_mode=live``), a ``CachedReference`` whose ``fill`` must run after ``prepare``
    (``cached``; its key takes ``start_weights``, the weights' fingerprint the run took), or None; length grouping
    when asked for."""
    columns, reference, collates = list(MODEL_COLUMNS), None, {"train": collate, "test": collate}
    if cfg.method in REFERENCE_METHODS and cfg.reference_mode == "cached":
        reference = CachedReference(cfg, model, splits, collate, accelerator, layout, start_weights)
        splits, collates, columns = reference.splits, reference.collates, columns + [REF_INDEX]
    elif cfg.method in REFERENCE_METHODS:
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ConfigError(
                "reference_mode=live keeps a frozen copy of the model beside the policy, which DeepSpeed ZeRO-3's "
                "partitioned weights cannot run outside the engine; use reference_mode=cached (the default)"
            )
        reference = live_reference(model, layout, share=shares_the_policy(model, accelerator))
        fsdp = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
        if fsdp is not None and fsdp.cpu_ram_efficient_loading:  # only the main process loaded the weights
            from_main_process(reference, accelerator.device)
        if fsdp is not None and not fsdp2(accelerator):  # in FSDP1's param_dtype before it goes to the device
            in_fsdp1s_precision(reference, accelerator)
        if not fsdp2(accelerator):  # FSDP2 moves it to the device shard by shard (reference.shard_like_the_policy)
            reference = reference.to(accelerator.device)
    train_ds, eval_ds = splits["train"], splits["test"]
    pinned = accelerator.device.type == "cuda"  # copied to the GPU without waiting (engine.make_accelerator)
    train_loader = train_data_loader(cfg, train_ds.select_columns(columns), collates["train"], pin_memory=pinned)
    eval_loader = Dealt(
        eval_ds.select_columns(columns),
        collates["test"],
        cfg.per_device_eval_batch_size,
        accelerator.process_index,
        accelerator.num_processes,
    )
    return collates["test"], reference, train_loader, eval_loader, eval_ds


def train_data_loader(cfg: Config, train_ds, collate, num_workers: int | None = None, pin_memory=False) -> DataLoader:
    """The train split's loader: shuffled from the seed (accelerate reseeds it per epoch), or in batches
    of similar length where ``hardware.group_by_length`` asks. ``pin_memory``: batches in page-locked memory,
    which a GPU copies from without making the host wait."""
    sampler = None
    if cfg.hardware.group_by_length:
        sampler = LengthGroupedSampler(pair_lengths(train_ds), cfg.per_device_train_batch_size, cfg.seed)
    return DataLoader(
        train_ds,
        batch_size=cfg.per_device_train_batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate,
        num_workers=cfg.hardware.dataloader_num_workers if num_workers is None else num_workers,
        worker_init_fn=ignore_stop_signals,  # a stop signal sent to the whole job is the training process's
        generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=pin_memory,
    )


def first_pairs(cfg: Config, train_ds, accelerator) -> list[dict]:
    """This process's first training batch, as uncollated pairs, from a copy of the train loader prepared
    as ``accelerator.prepare`` prepares it (the run's own loader is not touched)."""
    from accelerate.data_loader import prepare_data_loader

    loader = train_data_loader(cfg, train_ds.select_columns(list(MODEL_COLUMNS)), list, num_workers=0)
    loader = prepare_data_loader(
        loader,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        use_seedable_sampler=True,
        data_seed=accelerator.dataloader_config.data_seed,
    )
    return next(iter(loader))


def check_logps_for_run(cfg: Config, accelerator, model, layout, train_ds, pad_token_id: int) -> dict:
    """``logps_check.check_logps`` on the first train pair, on the main process with the model on the run's device
    (where ``prepare`` puts it); what was not checked and why, where it is not (env.json's ``logps_check``)."""
    if not cfg.hardware.check_logps:
        return {"skipped": "hardware.check_logps=false"}
    if accelerator.distributed_type in SHARDED_ENGINES:
        return {"skipped": f"the weights are sharded ({accelerator.distributed_type.value})"}
    pair = {k: train_ds[0][k] for k in MODEL_COLUMNS}
    dtype = TORCH_DTYPES.get(AUTOCAST_DTYPES.get(accelerator.mixed_precision))

    def check() -> dict:
        device = accelerator.device
        return check_logps(model.to(device), layout, pair, pad_token_id, device, accelerator.autocast, dtype)

    record = on_main(accelerator, check)
    if "gap" in record:
        log.info("log-probs as the model's own forward gives them (one pair: gap %.2g)", record["gap"])
    return record


def checkpoint_engine(cfg: Config, accelerator) -> str:
    """What writes (and so must read) this run's checkpoints: the accelerate engine by name, for engine checkpoints,
    else ``checkpoint.PLAIN`` (the project's own safetensors). FSDP's says its version and the launcher's
    ``fsdp_state_dict_type``, which lay the files out: read under the other type, a sharded checkpoint left one
    process looking for a whole-model file while the others waited in a broadcast, for the collective timeout."""
    if not engine_checkpoints(cfg, accelerator):
        return checkpoint.PLAIN
    engine, plugin = accelerator.distributed_type.value, getattr(accelerator.state, "fsdp_plugin", None)
    if engine == "FSDP" and plugin is not None:
        kind = getattr(plugin.state_dict_type, "name", plugin.state_dict_type)
        engine = f"FSDP{plugin.fsdp_version} {kind}"
    return engine


def start_or_resume(
    cfg: Config, run_dir: Path, accelerator, policy, optimizer, scheduler, config_dict, data_sources: dict
) -> "checkpoint.TrainState":
    """Load the newest intact checkpoint in the run directory (damaged ones skipped with a warning), or clear
    old state to start fresh. A checkpoint of the same config on local data files that have changed since
    (``data_sources``: this run's data report's) is refused, as one of another config is."""
    records = [run_dir / METRICS_FILE, run_dir / GENERATIONS_FILE]  # by step
    if cfg.resume and checkpoint.checkpoint_dirs(run_dir):
        check_same_data(run_dir, data_sources)
    if cfg.resume:
        load_state = accelerator.load_state if engine_checkpoints(cfg, accelerator) else None
        resumed = checkpoint.load_newest(
            run_dir,
            accelerator.unwrap_model(policy).model,
            optimizer,
            scheduler,
            config_dict,
            load_state,
            on_main=lambda fn: on_main(accelerator, fn),
            on_every=lambda fn: on_every(accelerator, fn, "loading a checkpoint"),
            process=(accelerator.process_index, accelerator.num_processes),
            engine=checkpoint_engine(cfg, accelerator),
        )
        if resumed:
            path, state = resumed
            if state.grad_scaler and accelerator.scaler is not None:  # (an engine's checkpoint holds it as well)
                accelerator.scaler.load_state_dict(state.grad_scaler)
            if accelerator.is_main_process:
                # an earlier finish's records, stale once it trains again (a finished run re-run to write its model):
                # finished.json left here made a model/ cut short in this run's save count as trained
                for stale in (run_dir / "summary.json", run_dir / finished.FINISHED):
                    stale.unlink(missing_ok=True)
                cut = [checkpoint.trim_metrics(records_file, state.step, state.eval_owed) for records_file in records]
                wandb_holds_through(run_dir, max((s for s in cut if s is not None), default=None))
            log.info("resumed from %s (step %d)", path, state.step)
            return state
    if accelerator.is_main_process:
        # A fresh start in a used directory: nothing of the earlier run may mix with this one's (its checkpoints,
        # records, and W&B run: its id, which a resume continues, and its offline files, which a sync uploads)
        # and its benchmark results, which are the earlier model's (simpo_exp/evaluate)
        for folder in ("checkpoints", "wandb", EVAL_DIR, *earlier_model(cfg, run_dir)):
            shutil.rmtree(run_dir / folder, ignore_errors=True)
        for path in [*records, run_dir / WANDB_RECORD, run_dir / "summary.json", run_dir / finished.FINISHED]:
            path.unlink(missing_ok=True)
    return checkpoint.TrainState()


def check_same_data(run_dir: Path, data_sources: dict) -> None:
    """Refuse to resume a run whose local data files have changed since it started (its data_report.json's
    fingerprints against this run's): its data position and schedule would be carried over to other data."""
    changed = changes_since_record(recorded_sources(run_dir), data_sources, run_dir)
    if changed:
        raise checkpoint.DifferentConfigCheckpoint(
            f"the checkpoints in {run_dir} were written on data that has changed since: {'; '.join(changed)}. Run "
            "with resume=false to start fresh on the data as it is now, or use another hydra.run.dir."
        )


def check_same_tokenizer(run_dir: Path, tokenizer) -> None:
    """Refuse to resume on another tokenizer or chat template than the run's last start had (its data_report.json's
    hashes): the same rows would be other tokens from the checkpoint on, and the record of the first ones lost."""
    then = read_json(run_dir / "data_report.json").get("tokenization") or {}
    now = {"chat_template_sha256": chat_template_hash(tokenizer), "tokenizer_sha256": tokenizer_hash(tokenizer)}
    changed = [
        f"{key} {then[key]} then, {value} now"
        for key, value in now.items()
        if value is not None and then.get(key) not in (None, value)  # a hash one start could not take: unchecked
    ]
    if changed:
        raise checkpoint.DifferentConfigCheckpoint(
            f"the checkpoints in {run_dir} were written with another tokenizer or chat template ({'; '.join(changed)}"
            "; the files at model.path or model.tokenizer_path, or model.chat_template). Put those back, or run with "
            "resume=false to start fresh, or use another hydra.run.dir."
        )


def check_same_start(run_dir: Path, cfg: Config, weights: str, architecture: str | None = None) -> None:
    """Refuse to resume a reference-based method whose starting weights (``model.path``'s, now) or architecture
    (its config.json, its own code: ``architecture_fingerprint``) are not the ones its reference log-probs were of
    at its last start (env.json): the reference would be another model's. A run that recorded no architecture
    (started before it was recorded) is checked on its weights alone."""
    env = read_json(run_dir / "env.json")
    then, then_architecture = env.get("start_weights"), env.get("start_architecture")
    if then_architecture and architecture and then_architecture != architecture:
        raise checkpoint.DifferentConfigCheckpoint(
            f"the checkpoints in {run_dir} were trained against the reference of another model config than "
            f"model.path={cfg.model.path or cfg.model.name!r} has now (architecture {then_architecture} then, "
            f"{architecture} now: its config.json, or the code it ships, changed since). Put it back, or run with "
            "resume=false to start fresh."
        )
    if then and then != weights:
        raise checkpoint.DifferentConfigCheckpoint(
            f"the checkpoints in {run_dir} were trained against the reference of other starting weights than "
            f"model.path={cfg.model.path or cfg.model.name!r} holds now (weights {then} then, {weights} now: the "
            "folder was written again since?). Put those weights back, or run with resume=false to start fresh."
        )


def set_up(cfg: Config) -> Run:
    """Everything a run needs before its first step, in order; resumes from the newest intact checkpoint."""
    from accelerate.utils import set_seed

    started = time.time()
    run_dir = check_writable(Path(cfg.output_dir))
    accelerator, accum = make_accelerator(cfg)
    if accelerator.num_processes > 1:  # each rank resolved its own Hydra directory: use the main one's
        run_dir = Path(on_main(accelerator, lambda: str(run_dir)))
    check_same_config(cfg, accelerator)  # one config on every process
    check_extras(cfg)  # before the data and the model load
    resuming = cfg.resume and bool(checkpoint.checkpoint_dirs(run_dir))
    if resuming:  # another config is refused before the model, the data and a reference pass are loaded
        checkpoint.refuse_another_config(run_dir, config_to_dict(cfg))
    set_seed(cfg.seed)
    lr, lr_source = resolve_learning_rate(cfg)
    for note in (lora_rate_note(cfg, lr, lr_source), replaced_rate_note(cfg), large_rate_note(cfg, lr)):
        if note:
            log.warning(note)
    log.info("learning rate %.3g (from %s)", lr, lr_source)

    tokenizer = load_tokenizer(cfg.model)
    if resuming:
        check_same_tokenizer(run_dir, tokenizer)
    with accelerator.main_process_first():
        train_ds, eval_ds, data_report = build_datasets(cfg, tokenizer)
    if len(train_ds) < cfg.per_device_train_batch_size:  # the loader drops a last short batch: it would be empty
        raise ConfigError(  # before the model loads (a recipe's smoke test on a few pairs)
            f"the train split has {len(train_ds)} pairs, fewer than per_device_train_batch_size="
            f"{cfg.per_device_train_batch_size}: lower it, or use more data"
        )
    model = load_model(cfg, tokenizer, pick_attention(cfg), engine_keeps_master_copy(accelerator))
    check_preset_size(cfg, count_parameters(model))
    # what a reference-based method's reference log-probs are of: the same starting weights on resume
    start_weights = weights_fingerprint(model) if cfg.method in REFERENCE_METHODS else None  # (every process: ZeRO-3)
    if start_weights:  # the main process's: under FSDP's RAM-efficient loading only it holds the weights before prepare
        start_weights = on_main(accelerator, lambda: start_weights)
    start_architecture = architecture_fingerprint(model) if start_weights else None  # config.json and own code
    if resuming and start_weights:
        check_same_start(run_dir, cfg, start_weights, start_architecture)
    check_positions(model, cfg)
    upcast_as_fsdp_does(model, accelerator)
    log.info(
        "model %s: %.2fM parameters, %.2fM trained%s",
        cfg.model.path or cfg.model.name,
        count_parameters(model) / 1e6,
        count_parameters(model, trained_only=True) / 1e6,
        f" (LoRA r={cfg.hardware.lora_r}, alpha={cfg.hardware.lora_alpha})" if cfg.hardware.lora else "",
    )
    # a frozen copy of the model as well (not where the reference is the policy with its adapters off)
    live = (
        cfg.method in REFERENCE_METHODS and cfg.reference_mode == "live" and not shares_the_policy(model, accelerator)
    )
    check_device_memory(model, accelerator, cfg.hardware, live)  # the trained state (and copy) alone must fit
    if accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed keeps its own fp32 master copy
        warn_if_updates_vanish(model, lr)
    head = fused_head(cfg, model)  # hardware.fused_head: None for the project's own head
    layout, layout_choice = layout_for_run(
        cfg, accelerator, model, run_dir, lambda: first_pairs(cfg, train_ds, accelerator), tokenizer.pad_token_id, head
    )
    logps_check = check_logps_for_run(cfg, accelerator, model, layout, train_ds, tokenizer.pad_token_id)
    policy = ResponseLogps.for_layout(model, layout, fused=head)
    checkpoint_bytes = checkpoint.check_space(
        run_dir,
        model,
        cfg.save_total_limit,
        cfg.save_model,
        accelerator.is_main_process,
        engine_checkpoints(cfg, accelerator),
        engine_keeps_master_copy(accelerator),
        cfg.save_dtype,
    )  # warns if the disk is short
    collate = PairCollator(tokenizer.pad_token_id, packing=layout.packing, attention=layout.attention)
    collate, reference, train_loader, eval_loader, eval_ds = make_loaders(
        cfg, model, {"train": train_ds, "test": eval_ds}, collate, accelerator, layout, start_weights
    )
    flops = step_work(model, reference)  # before any sharding
    fused_optimizer = adamw_fused(accelerator)
    optimizer = adamw(model, cfg, lr, fused_optimizer)
    compiler = watch_compiles(cfg, accelerator, model)  # after the reference is copied, before prepare
    warn_if_the_engine_rounds_the_base(accelerator, model)
    policy, optimizer, train_loader = accelerator.prepare(policy, optimizer, train_loader)  # eval_loader: dealt
    check_batches_per_process(len(train_loader), cfg.per_device_train_batch_size, accelerator.num_processes)
    if reference is not None and not isinstance(reference, CachedReference):
        if fsdp2(accelerator):
            shard_like_the_policy(reference, accelerator)  # a live reference: 1/N of it per process, not a copy
        in_the_policys_precision(reference, policy, accelerator)
    steps = total_steps(cfg, len(train_loader), accum)
    scheduler = lr_schedule(optimizer, cfg.lr_scheduler_type, math.ceil(cfg.warmup_ratio * steps), steps)

    config_dict = config_to_dict(cfg)
    pairs_per_step = cfg.per_device_train_batch_size * accum * accelerator.num_processes
    resolved = {"learning_rate": lr, "gradient_accumulation_steps": accum, "effective_batch_size": pairs_per_step}
    if "gamma_beta_ratio" in TABLE[cfg.method].reads:  # a margin only where the method's loss has one
        resolved["gamma"], resolved["gamma_beta_ratio"] = resolve_gamma(cfg)
    if isinstance(reference, CachedReference):  # from the starting weights: before a checkpoint is loaded
        try:
            reference.fill(policy, accelerator)
        except torch.OutOfMemoryError as e:
            raise out_of_memory("the reference log-probs (per_device_eval_batch_size)", e) from e
        reference = None
    state = start_or_resume(cfg, run_dir, accelerator, policy, optimizer, scheduler, config_dict, data_report.sources)
    compiler.earlier_s, compiler.earlier_steps = state.compile_warmup_s, state.compile_warmup_steps
    state.epoch_batches = same_epochs(state, epoch_batches(len(train_loader), accum), len(train_loader))
    started -= state.runtime_s  # a resumed run's time goes on from its checkpoint's
    if accelerator.is_main_process:  # this command's .hydra files, put back if a later command is refused here
        keep_run_config(run_dir)
    env = environment_record(cfg, accelerator, model, data_report, layout)
    env["layout_choice"] = layout_choice  # how packing=auto was decided (measured timings, or a rule)
    env["logps_check"] = logps_check  # the run's log-probs against the model's own forward on one pair
    env["adamw_fused"] = bool(fused_optimizer)
    if start_weights:
        env["start_weights"], env["start_architecture"] = start_weights, start_architecture
    env["resolved"] = resolved  # the values training worked out (compare shows them for a run not yet finished)
    env, drift = with_earlier_starts(env, read_json(run_dir / "env.json"), state.step)
    if drift:
        log.warning(
            "resumed at step %d on a different set-up than the last start (%s): the steps from here may not match "
            "what an uninterrupted run would have done; env.json keeps each start's record in earlier_starts",
            state.step,
            "; ".join(drift),
        )
    tracker = Tracker(
        run_dir, cfg.logger, config_dict | {"resolved": resolved, "env": env}, enabled=accelerator.is_main_process
    )
    tracker.write_json("data_report.json", data_report.__dict__)
    tracker.write_json("env.json", env)
    log.info(
        "%d steps of %d pairs (%d per device x %d accumulation x %d processes) on %s",
        steps,
        pairs_per_step,
        cfg.per_device_train_batch_size,
        accum,
        accelerator.num_processes,
        accelerator.device,
    )
    for message in cadence_past_the_end(cfg, steps):
        log.warning(message)
    if len(train_loader) < accum:
        log.warning(
            "the train split gives each process %d micro-batches of %d pairs an epoch, fewer than the %d of one "
            "optimizer step: each step goes over the data more than once (%.1f epochs a step; num_train_epochs "
            "counts micro-batches); lower the accumulation (hardware.effective_batch_size or "
            "gradient_accumulation_steps) or use more data",
            len(train_loader),
            cfg.per_device_train_batch_size,
            accum,
            accum / len(train_loader),
        )
    # Sharded weights are gathered layer by layer during a forward, which every process must join: under
    # FSDP and DeepSpeed all processes generate (in step, synced_gpus); elsewhere the main one alone.
    generating = accelerator.is_main_process or accelerator.distributed_type in SHARDED_ENGINES
    summary_extra = {"learning_rate_source": lr_source} | {f"resolved/{k}": v for k, v in resolved.items()}
    summary_extra |= {f"precision/{k}": v for k, v in env["precision"].items()}  # dtypes actually trained in
    return Run(
        cfg,
        run_dir,
        accelerator,
        accum,
        steps,
        pairs_per_step,
        tokenizer,
        policy,
        reference,
        layout,
        collate,
        train_loader,
        eval_loader,
        optimizer,
        scheduler,
        tracker,
        state,
        config_dict,
        summary_extra,
        flops,
        peak_flops(accelerator.device, matmul_precision(accelerator.mixed_precision, policy), cfg.hardware.peak_tflops),
        checkpoint_bytes,
        samples.sample_pairs(eval_ds, cfg.num_generations) if generating else [],
        started,
        compiler=compiler,
    )


def step_work(model, reference) -> FlopSpec:
    """What a step's MFU counts: the policy's forward and backward, and a live reference's forward, which every
    step runs as well (a cached reference's log-probs were computed before training: not a step's work)."""
    live = reference is not None and not isinstance(reference, CachedReference)
    return replace(flop_spec(model), live_reference=live)


# ----------------------------------------------------------------------------- the steps
def forever(loader, accelerator, consumed: int = 0, per_epoch: int | None = None):
    """Yield batches endlessly, the first ``per_epoch`` (``epoch_batches``) of each epoch, reshuffling each
    epoch from (seed, epoch), starting after ``consumed`` micro-batches: a resumed run sees exactly the
    batches it would have seen."""
    per_epoch = per_epoch or len(loader)
    epoch, skip = divmod(consumed, per_epoch)
    while True:
        loader.set_epoch(epoch)
        source = accelerator.skip_first_batches(loader, skip) if skip else loader
        if hasattr(loader, "_non_blocking"):  # accelerate's skipping loader does not carry the copy mode over
            source._non_blocking = loader._non_blocking
        batches = iter(source)
        yield from itertools.islice(batches, per_epoch - skip)
        if hasattr(batches, "close"):  # an epoch left before its end: let go of its iterator (and workers)
            batches.close()
        if hasattr(source, "end"):  # and of accelerate's record of an iteration in progress
            source.end()
        epoch, skip = epoch + 1, 0


def optimizer_step(run: Run, batches, window: Window) -> float:
    """One optimizer step over ``accum`` micro-batches; returns the gradient norm. A step whose gradient is not
    finite is skipped and counted; more than ``max_bad_steps`` of them in a row stop the run."""
    acc, state, started = run.accelerator, run.state, time.time()
    run.compiler.step_started()
    step_stats = Window()
    micro = [next(batches) for _ in range(run.accum)]
    state.micro_batches += run.accum
    sft_tokens = step_sft_tokens(micro, acc) if run.cfg.sft_weight else None
    try:
        for batch in micro:
            work = attention_pairs(batch, run.layout.packing)  # per full-attention layer
            local = run.flops.local_pairs(batch, run.layout.packing)  # summed over sliding or chunked layers
            # accumulate(): no gradient all-reduce until the last micro-batch of the step, and
            # backward() scales the loss by 1/accum (DeepSpeed's engine does both itself).
            with acc.accumulate(run.policy):
                loss, stats, _ = batch_loss(run.policy, batch, run.cfg, run.reference, sft_tokens)
                acc.backward(loss)
            pairs = {"attention_pairs": work, "local_pairs": local}
            step_stats.add(stats | {k: torch.as_tensor(v, dtype=torch.float32) for k, v in pairs.items()})
    except torch.OutOfMemoryError as e:
        raise out_of_memory(f"training step {state.step + 1}", e) from e
    grad_norm = acc.clip_grad_norm_(run.policy.parameters(), run.cfg.max_grad_norm)
    if grad_norm is None and hasattr(run.policy, "get_global_grad_norm"):  # DeepSpeed clipped in its own step
        grad_norm = run.policy.get_global_grad_norm()
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)  # waits for the device
    ok = math.isfinite(grad_norm)
    # DeepSpeed's engine has stepped already, in the last backward, or skipped a non-finite step itself (its
    # gradient norm is then inf): the step is counted as skipped all the same. Under fp16's loss scaler the step
    # goes to the scaler even when not finite: it skips the update and lowers its scale (without its update() the
    # next step's unscale_ fails: "unscale_() has already been called")
    scaler = getattr(acc, "scaler", None)
    if ok or acc.distributed_type == DistributedType.DEEPSPEED or scaler is not None:
        try:
            run.optimizer.step()  # AdamW's moments are allocated at the first step
        except torch.OutOfMemoryError as e:
            raise out_of_memory(f"the optimizer step {state.step + 1} (AdamW's state)", e) from e
    if ok:
        state.bad_in_a_row = 0
    else:  # a non-finite loss gives non-finite gradients too
        skip_step(run, fp16_loss_scale(run))
    run.step_lr = run.scheduler.get_last_lr()[0]  # the rate this step used, before the schedule moves on
    if not acc.optimizer_step_was_skipped:  # an fp16 overflow the scaler skipped holds the schedule (as the Trainer)
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    if acc.device.type == "cuda" and (state.step % run.cfg.logging_steps == 0 or state.step == run.steps):
        # a logged step's optimizer kernels inside its own time: log_train waits for them next, outside any step's
        # (an unlogged step's spill into the next step's, whose gradient norm waits for them)
        torch.cuda.synchronize(acc.device)
    seconds = time.time() - started
    compiled = run.compiler.step_finished(seconds, state.step, acc)
    window.step_done(step_stats, seconds, timed=not compiled, skipped=not ok)  # compile warm-up: not timed
    return grad_norm


def step_sft_tokens(micro: list[dict], accelerator) -> float:
    """The NLL term's denominator for each micro-batch of a step: the step's chosen tokens, over all its
    micro-batches and processes, divided by their number. Accumulation and data parallel average the
    micro-batches' losses, so the step's NLL term is the token mean over the whole step, as one batch of
    the same pairs gives (a per-micro-batch token mean weighs a token by its micro-batch's size)."""
    local = float(sum(chosen_tokens(b) for b in micro))
    if accelerator.num_processes > 1:  # one process knows its count on the host: nothing to wait for
        local = float(accelerator.reduce(torch.tensor([local], device=accelerator.device), reduction="sum"))
    return local / (len(micro) * accelerator.num_processes)


def fp16_loss_scale(run: Run) -> float | None:
    """fp16's loss scale after a skipped step, or None (no loss scaling): accelerate's GradScaler's, or under
    DeepSpeed, where the engine scales the loss itself and accelerate makes no scaler, the engine's. DeepSpeed
    reports each overflow it skips as an infinite gradient norm, six in a row as it settles its scale at the start
    (65536 down by halves, hysteresis 2): without its scale here they stopped the run as non-finite steps."""
    scaler = getattr(run.accelerator, "scaler", None)
    if scaler is not None:
        return scaler.get_scale()
    engine = run.policy
    fp16 = getattr(engine, "fp16_enabled", lambda: False)()
    if run.accelerator.distributed_type != DistributedType.DEEPSPEED or not fp16:
        return None
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "loss_scale", None)
    scale = getattr(optimizer, "cur_scale", None) if scale is None else scale
    return float(scale) if isinstance(scale, (int, float)) else None


def skip_step(run: Run, loss_scale: float | None = None) -> None:
    """Count a step whose gradient was not finite; past ``max_bad_steps`` in a row, stop. ``loss_scale``: fp16's
    scale after its scaler lowered it; an overflow it can still scale away (scale >= 1) is not counted as bad."""
    run.state.skipped_steps += 1
    step = run.state.step + 1
    if loss_scale is not None and loss_scale >= 1.0:
        log.warning("step %d: fp16 gradient overflow; step skipped, loss scale now %g", step, loss_scale)
        return
    run.state.bad_in_a_row += 1
    log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)", step, run.state.bad_in_a_row)
    if run.state.bad_in_a_row > run.cfg.max_bad_steps:
        last = checkpoint.checkpoint_dirs(run.run_dir)
        raise NonFiniteError(
            f"{run.state.bad_in_a_row} consecutive steps with a non-finite loss or gradient, the last at step {step}; "
            f"last good checkpoint: {last[-1] if last else 'none'}. Lower learning_rate or check the data."
        )


def log_train(run: Run, window: Window, grad_norm: float) -> dict:
    """The logging window's metrics (means, speed, memory, MFU) plus the optimiser's, logged at this step."""
    metrics, totals = window.train_report(run.accelerator, run.flops, run.peak)
    run.state.num_tokens += totals.get("input_tokens", 0.0) + totals.get(f"{SKIPPED}input_tokens", 0.0)
    metrics |= {
        "train/num_tokens": run.state.num_tokens,
        "train/grad_norm": grad_norm,
        "train/learning_rate": run.step_lr,
        "train/epoch": logged_epoch(run.state.micro_batches, run.state.epoch_batches, len(run.train_loader)),
        "train/skipped_steps": run.state.skipped_steps,
        SAMPLES_KEY: run.state.step * run.pairs_per_step,
    }
    run.tracker.log(metrics, run.state.step)
    return metrics


def logged_epoch(micro_batches: int, epoch_batches: int, loader_batches: int) -> float:
    """``train/epoch`` as transformers 4.x's Trainer (the official runs') logs it: the epochs done, plus this epoch's
    micro-batches over all of the epoch's (``loader_batches``). An epoch trains its whole steps only
    (``epoch_batches``), so its last step reads below 1 where micro-batches are left over: 448 of 478 is 0.937, as
    the official runs logged it (counted over the trained micro-batches, it read 1.0 and every point ran up to 7%
    ahead). Data shorter than one step, which each step reads more than once, counts its passes."""
    if micro_batches <= 0:
        return 0.0
    if epoch_batches > loader_batches:
        return micro_batches / epoch_batches
    done, into = divmod(micro_batches - 1, epoch_batches)
    return done + (into + 1) / loader_batches


@torch.no_grad()
def evaluate(policy, batches: Dealt, cfg: Config, accelerator, reference=None) -> dict[str, float]:
    """Eval metrics over the test split, each pair counted once whatever the number of processes."""
    from accelerate.utils import gather_object

    window = Window()
    rewards, lengths = [], []
    with eval_mode(policy):
        for position, batch in batches:
            _, stats, (r, n) = batch_loss(policy, send_to_device(batch, accelerator.device), cfg, reference)
            if position is None:  # a repeat that keeps the processes' forwards in step: it counts nothing, but
                window.add({k: torch.zeros_like(v) for k, v in stats.items()})  # its keys join the all-process sums
                continue
            if cfg.sft_weight:  # the batch's NLL term taken out of its loss: put back below as the split's token mean
                nll = stats["sft_loss"] / max(chosen_tokens(batch), 1)
                stats["loss"] = stats["loss"] - cfg.sft_weight * stats["pairs"] * nll
            window.add(stats)
            rewards.append(r.float().cpu())
            lengths.append(n.float().cpu())
    metrics, _ = window.means(accelerator, "eval")
    # eval/loss = the preference loss's mean + sft_weight x eval/sft_loss (the chosen tokens' mean NLL over the split,
    # as a training step's is over the step): a mean of per-batch token means moved with per_device_eval_batch_size
    metrics["eval/loss"] += cfg.sft_weight * metrics.get("eval/sft_loss", 0.0)
    # every process's (rewards, lengths); gather_object hands a single process's list back as it is
    every = gather_object([(torch.cat(rewards), torch.cat(lengths))] if rewards else [])  # [] without a batch
    # SimPO's length normalisation is meant to keep the reward from favouring long answers: watch it.
    metrics["eval/length/reward_corr"] = pearson(torch.cat([r for r, _ in every]), torch.cat([n for _, n in every]))
    return metrics


def evaluate_and_sample(run: Run, step: int) -> dict:
    """Eval metrics over the test split, and greedy completions of a few fixed eval prompts."""
    acc = run.accelerator
    try:
        metrics = evaluate(run.policy, run.eval_loader, run.cfg, acc, run.reference)
    except torch.OutOfMemoryError as e:
        raise out_of_memory(f"evaluation at step {step} (per_device_eval_batch_size)", e) from e
    run.tracker.log(metrics, step)
    if run.shown:
        unwrapped = acc.unwrap_model(run.policy)
        with eval_mode(unwrapped), torch.no_grad():  # as the evaluation scored: no dropout noise
            batch = send_to_device(run.collate(run.shown), acc.device)
            _, _, (rewards, _) = batch_loss(unwrapped, batch, run.cfg, run.reference)
        with eager_only(run.compiler.asked):  # decoding shapes would only add compiled graphs
            texts = samples.generate(
                unwrapped.model,
                run.tokenizer,
                run.shown,
                run.cfg.max_new_tokens,
                acc.device,
                synced=acc.distributed_type in SHARDED_ENGINES,
                chat_format=run.cfg.dataset.chat_format,
            )
        run.tracker.log_generations(samples.generation_rows(step, run.shown, texts, rewards), step)  # main only
    return metrics


def save_checkpoint(run: Run, window: Window) -> None:
    """A checkpoint of everything, the open logging window included: one writer, or every process for
    sharded engines (their shards go through accelerator.save_state into the same staging directory).
    Each phase ends with every process agreeing that it worked (engine.together): a save that fails on
    one process stops them all with a message naming it, and the main process removes the staging directory."""
    acc, state = run.accelerator, run.state
    # every process's part of the open logging window and its generator states, so that a resumed run goes on as
    # this one; gathering them is also where every process has finished the step
    parts = on_every(acc, lambda: (window.local(), checkpoint.rng_state()), "saving the window and RNG states")
    state.window, rng = [w for w, _ in parts], [r for _, r in parts]
    state.window_seconds, state.window_steps = window.seconds, window.steps
    state.runtime_s = time.time() - run.started
    state.compile_warmup_s, state.compile_warmup_steps = run.compiler.totals()
    state.grad_scaler = acc.scaler.state_dict() if acc.scaler is not None else {}
    tmp = checkpoint.staging_dir(run.run_dir, state.step)
    main = acc.is_main_process

    def failed_elsewhere(ranks: list[int]) -> checkpoint.CheckpointSaveError:
        return checkpoint.CheckpointSaveError(
            f"process {', '.join(map(str, ranks))} of {acc.num_processes} could not write checkpoint "
            f"{checkpoint.final_dir(tmp)} (its own error says why); the earlier checkpoints are "
            f"untouched. Fix that, then {rerun_command()} to resume from the newest one."
        )

    on_all = partial(together, acc, failed_elsewhere=failed_elsewhere)
    rest = (run.scheduler, state, run.config_dict, run.cfg.save_total_limit)
    if engine_checkpoints(run.cfg, acc):
        size = run.checkpoint_bytes
        try:
            on_all(lambda: main and checkpoint.start(run.run_dir, state.step, size))
            on_all(lambda: save_engine_state(run, tmp))
            kind = checkpoint_engine(run.cfg, acc)
            path = on_all(lambda: main and checkpoint.finish(run.run_dir, tmp, None, None, *rest, size, rng, kind))
        except Exception:
            if main:  # once every process has stopped writing into it
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        model = acc.unwrap_model(run.policy).model
        path = on_all(lambda: main and checkpoint.save(run.run_dir, model, run.optimizer, *rest, rng))
    if main:
        log.info("checkpoint %s", path)


def save_engine_state(run: Run, tmp: Path) -> None:
    """This process's part of an engine checkpoint (its shards, under ``tmp``'s ``engine/``)."""
    try:
        run.accelerator.save_state(str(tmp / checkpoint.ENGINE_DIR))
    except checkpoint.WRITE_ERRORS as e:  # disk full, permissions: the earlier checkpoints stay as they were
        # the staging directory is shared: the main process removes it once every process is done with it
        raise checkpoint.save_failed(run.run_dir, tmp, e, run.checkpoint_bytes, remove=False) from e


def finish(run: Run, summary: dict) -> dict:
    """Save the model and tokenizer, write summary.json, mark the run finished, print the results."""
    acc, state = run.accelerator, run.state
    if state.skipped_steps >= run.steps:  # the weights never changed: nothing to report as a result
        raise NonFiniteError(
            f"all {run.steps} steps had a non-finite loss or gradient and were skipped; no weights "
            "were updated. Lower learning_rate or check the data (run with resume=false)."
        )
    summary |= {
        "train/global_step": run.steps,
        "train/skipped_steps": state.skipped_steps,
        "runtime_s": time.time() - run.started,
    } | run.summary_extra
    summary |= run.compiler.summary()  # the compile steps left out of train/step_time_s, tokens/s and MFU
    acc.wait_for_everyone()
    full_state_dict = None
    if run.cfg.save_model and acc.distributed_type in SHARDED_ENGINES:
        # sharded weights: every process takes part in gathering them ("model." is the wrapper's prefix);
        # ZeRO-3 hands the gathered weights to the main process only (None elsewhere), which alone writes them
        # DeepSpeed under bf16: its float32 master copy (the buffers too: one dtype for the saved model, which its
        # config records), not the bf16 working weights
        keeps = engine_keeps_master_copy(acc)
        gathered = engine_state_dict(acc, run.policy) if keeps else acc.get_state_dict(run.policy)
        if gathered is not None:
            full_state_dict = {k.removeprefix("model."): v for k, v in gathered.items()}
            full_state_dict = without_tied_copies(full_state_dict, acc.unwrap_model(run.policy).model)
    if run.cfg.save_model:  # every process waits for the main one's write and fails with it
        saving = f"writing the model to {run.run_dir / 'model'}"
        together(acc, lambda: acc.is_main_process and save_final_model(run, full_state_dict, summary), saving)
    if acc.is_main_process:
        run.tracker.finish(summary)
        finished.record(run.run_dir, run.config_dict)  # last: a re-run of this command now returns this summary
        keys = HEADLINE_METRICS + ["runtime_s"] + (["train/skipped_steps"] if state.skipped_steps else [])
        print(f"\nrun directory: {run.run_dir.resolve()}\n{final_table(summary, keys)}", flush=True)
    return summary


def without_tied_copies(state_dict: dict, model: torch.nn.Module) -> dict:
    """``state_dict`` less the second names of tied parameters (an output head tied to the input embeddings).
    FSDP gathers a separate copy under each name, which save_pretrained would write twice; as the model
    itself would be saved, each tied matrix is kept once, under its first name."""
    tied = {name for _, *others in shared_parameters(model) for name in others}
    return {k: v for k, v in state_dict.items() if k not in tied}


def earlier_model(cfg: Config, run_dir: Path) -> list[str]:
    """``["model"]`` where a fresh start finds an earlier run's trained model in its folder: left there, a run of
    this one that stopped, failed or did not save (``save_model=false``) looked trained with the earlier weights,
    and evaluate scored them under this run's recipe. Kept (with a warning) where this run trains from it."""
    folder = run_dir / "model"
    if not folder.exists():
        return []
    base = Path(cfg.model.path).expanduser().resolve() if cfg.model.path else None
    if base is not None and (base == folder.resolve() or folder.resolve() in base.parents):
        log.warning("%s is the model this run starts from (model.path): kept, and replaced when it finishes", folder)
        return []
    return ["model"]


def save_final_model(run: Run, full_state_dict: dict | None, summary: dict) -> None:
    """The trained model, its tokenizer and model card in ``<run>/model`` (main process only). A write that fails
    (a full disk) is a ``CheckpointSaveError`` saying what it needs; the run is not recorded finished, so a re-run
    resumes from the last checkpoint."""
    out = run.run_dir / "model"
    try:
        save_trained(run.accelerator.unwrap_model(run.policy).model, out, full_state_dict, run.cfg.save_dtype)
        if save_tokenizer(run.tokenizer, out):
            log.info("model/: the chat template saved with the BOS training put before every sequence")
        ready_to_generate(out, run.tokenizer)
    except checkpoint.WRITE_ERRORS as e:
        free = shutil.disk_usage(run.run_dir).free
        raise checkpoint.CheckpointSaveError(
            f"could not write the trained model to {out} ({getattr(e, 'strerror', None) or e}); {free:,} bytes are "
            f"free there. Free space, then {rerun_command()}: it resumes from the last checkpoint"
        ) from e
    # model/README.md with the values the run used; evaluate adds its results to it
    write_model_card(run.run_dir, run.cfg, resolved=resolved_values(run.summary_extra), training=summary)


# ----------------------------------------------------------------------------- the run
def train(cfg: Config, stop: StopSignal | None = None) -> dict:
    """Train one run; return its summary (final train and eval metrics, run time). ``stop``: the stop-signal
    handler, if the caller installed one already (the entry point does, from its start)."""
    stop = stop or StopSignal()
    stop.at_once = True  # set-up has no step to finish: a stop signal ends it where it is
    try:
        try:
            run = set_up(cfg)
        except StopRequested as e:
            stopped_before_a_step(cfg, stop, e.signum, "set-up")
        with run.tracker:  # a run that fails closes its W&B run as failed, not as finished at exit
            summary = finish(run, train_loop(run, stop))
        # a stop signal in the final evaluation or while the model was written: the run is finished, and a sweep
        # in this process must not start its next job
        stop.after_finish(run.accelerator)
        return summary
    finally:  # however it ends (a refused set-up too): the next job of a sweep, in this process, finds the handlers
        stop.restore()  # it would have found without this run


def stopped_before_a_step(cfg: Config, stop: StopSignal, signum: int, during: str, tracker=None) -> None:
    """Leave at a stop signal that came before the run's first step (in ``during``): nothing to save, a record
    that compare and the sweep's summary read (main process; through ``tracker``, the run's W&B run as well, once
    there is one), the handlers found at start called and put back."""
    if os.environ.get("RANK", "0") == "0":
        record = stopped_before_a_step_record(Path(cfg.output_dir), signum, during)
        if tracker is not None:
            tracker.mark_stopped(record)
        else:
            write_json(Path(cfg.output_dir) / STOPPED_FILE, record)
    stop.exit(None, signum)


def train_loop(run: Run, stop: StopSignal) -> dict:
    """The steps from the run's state to its last one, with logging, evals and checkpoints; the last metrics.
    ``stop``: the run's stop-signal handler (a signal saves the step it reached, then ends the run; until the first
    step it ends the run where it is, as there is nothing to save)."""
    cfg, summary = run.cfg, {}
    owed = run.state.eval_owed or (cfg.eval_on_start and run.state.step == 0)
    if owed:  # at start, or the eval of the step a stop signal saved before its eval (the checkpoint still owes it)
        try:
            summary |= evaluate_and_sample(run, run.state.eval_owed)
        except StopRequested as e:
            if run.state.eval_owed:  # resumed: the checkpoint of this step is there (and still owes this eval)
                run.tracker.mark_stopped(stopped_record(e.signum, run.state.step))
                stop.exit(run.state.step, e.signum)
            stopped_before_a_step(cfg, stop, e.signum, "evaluation at start", run.tracker)
        run.state.eval_owed = 0
    stop.at_once = False  # from here a signal waits for the step to end, then a checkpoint
    batches = forever(run.train_loader, run.accelerator, run.state.micro_batches, run.state.epoch_batches)
    window = Window.restore(run.state.window, run.state.window_seconds, run.state.window_steps, run.accelerator)
    bar = progress_bar(run)
    run.policy.train()
    started_at = run.state.step
    while run.state.step < run.steps:
        grad_norm = optimizer_step(run, batches, window)
        step, last = run.state.step, run.state.step == run.steps
        if step % cfg.logging_steps == 0 or last:
            summary |= log_train(run, window, grad_norm)
            if bar is not None:
                bar.set_postfix(loss=f"{summary['train/loss']:.3f}", acc=f"{summary['train/rewards/accuracies']:.2f}")
        # a stop signal on any process (SIGTERM/SIGINT, submitit's USR2): all save this step and leave, the last
        # one too (its evaluation, generations and model write could outlast the grace time a save is sized for;
        # the resumed run does them)
        stopping = stop.agreed(run.accelerator)  # the signal's number, or 0
        if (cfg.eval_steps and step % cfg.eval_steps == 0) or last:
            if stopping:  # the checkpoint first, within the scheduler's grace time; the resumed run evaluates
                run.state.eval_owed = step
            else:
                summary |= evaluate_and_sample(run, step)
                # a signal during the eval; after the last one the model is written (as long as a checkpoint)
                stopping = 0 if last else stop.agreed(run.accelerator)
        if (cfg.save_steps and step % cfg.save_steps == 0 and not last) or stopping:
            save_checkpoint(run, window)
            # a signal during the save stops the run here, on the checkpoint just written, not a step and a save on
            stopping = stopping or stop.agreed(run.accelerator)
        if bar is not None:
            bar.update(1)
        if stopping:  # compare and the sweep's summary tell a stopped run from a running one by this file
            run.tracker.mark_stopped(stopped_record(stopping, step))
            stop.exit(step, stopping, together=run.accelerator.wait_for_everyone)
    if bar is not None:
        bar.close()
    if run.state.step == started_at and run.accelerator.is_main_process:  # resumed at its last step (stopped there,
        summary = last_train_record(run.run_dir) | summary  # before its eval): that step's logged training metrics
    return summary


def last_train_record(run_dir: Path) -> dict:
    """The metrics the run logged at its last training step (``metrics.jsonl``), as the loop returned them."""
    rows = [r for r in read_jsonl(run_dir / METRICS_FILE) if "train/loss" in r]
    return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}


def progress_bar(run: Run):
    if not (run.cfg.progress_bar and run.accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.steps, initial=run.state.step, desc="training", dynamic_ncols=True)
