#!/usr/bin/env python
"""This project's SimPO step against TRL's ``CPOTrainer(loss_type="simpo", cpo_alpha=0)``, in one run.

    python benchmarks/bench_trl.py --preset cpu        # tiny Llama, 2-core CPU, a few minutes
    python benchmarks/bench_trl.py --preset cpu-128k   # 128k vocabulary, 1-2k tokens: peak memory
    python benchmarks/bench_trl.py --preset gpu        # 1.24B Llama, 128k vocabulary, bf16 (needs CUDA)

Both sides train the same randomly initialised Llama (built from a config, same seed, so the same
weights) on the same generated preference pairs, in the same order, with the same batch size,
max_length, dtype, gradient checkpointing and optimizer (one ``torch.optim.AdamW``, fused on a GPU as
both projects do by default, constant lr, clip 1.0). TRL runs its own ``Trainer.train()`` loop; ours runs
the loop of ``simpo_exp/train.py`` (``ResponseLogps`` + ``simpo_loss`` as in
``simpo_exp.objective.batch_loss`` -> ``accelerator.backward`` -> clip -> step) with each ``--variants``
setting of ``ResponseLogps`` / ``PairCollator`` (packing, prefix sharing, chunked head).

Before any timing, one process computes the loss of the first batch with TRL and with every variant
from the same weights (float32, no autocast) and its gradient with respect to every weight, and stops unless all
losses agree within 1e-4 and all gradients within 1e-3 (relative L2 error against TRL's), after checking that both
sides see the same tokens: we never time a faster wrong thing (a variant that lost its backward passes a loss
check). A timed run of ours that skipped an optimizer step (a non-finite gradient) is reported as failed: a step
without AdamW is shorter and never allocates its moments.

Each measurement runs in a fresh subprocess (peak RSS is per process), one after another, and the whole set is
repeated ``--rounds`` times, interleaved, so slow drift on a shared machine hits both sides. On a GPU,
``--shared-process`` runs our variants one after another in one process instead (TRL keeps its own), sparing
each a process start; each variant's peak GPU memory is then counted from a reset, above whatever an earlier
one left allocated (recorded as ``leftover_cuda_mb``). A step's time runs from the end of the previous step to
the end of this one (data loading included); the first ``--warmup`` steps are dropped, and so is any step in
which torch.compile built graphs (``<variant>+compile``: its compile warm-up is reported apart); the figures
are medians over the remaining steps of all rounds. pairs/s = batch / median step time (the headline);
response tokens/s = the median of per-step (response tokens / step time) - both sides see the same batches, so
prompts counted twice by one and once by the other do not inflate either. Peak memory: RSS high-water mark on
CPU (and its rise over the RSS just before training, which removes the shared import/model baseline),
``torch.cuda.max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BETA, GAMMA_BETA_RATIO = 2.0, 0.5
LOSS_TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-3  # relative L2 error of a variant's first-batch gradient against TRL's, float32

# ----------------------------------------------------------------------------- presets
# lengths: (median, lognormal sigma, min, max) in tokens, before BOS/EOS; UltraFeedback-like at full scale
# (prompts ~50-500 tokens, responses ~100-800, right-skewed); the cpu preset scales them by 1/4.
VARIANTS = {
    "plain": dict(packing="none", attention="segments", chunk_size=0),
    "packed": dict(packing="packed", attention="segments", chunk_size=0),
    "prefix": dict(packing="prefix_shared", attention="segments", chunk_size=0),
    "packed-mask": dict(packing="packed", attention="mask", chunk_size=0),
    "prefix-mask": dict(packing="prefix_shared", attention="mask", chunk_size=0),
    "plain+chunk256": dict(packing="none", attention="segments", chunk_size=256),
    "plain+chunk1024": dict(packing="none", attention="segments", chunk_size=1024),
    "prefix+chunk256": dict(packing="prefix_shared", attention="segments", chunk_size=256),
    "prefix+chunk1024": dict(packing="prefix_shared", attention="segments", chunk_size=1024),
    "packed+chunk1024": dict(packing="packed", attention="segments", chunk_size=1024),
    # FlexAttention (one call per layer with a block mask): GPU only (torch has no CPU backward)
    "packed-flex": dict(packing="packed", attention="flex", chunk_size=0),
    "prefix-flex": dict(packing="prefix_shared", attention="flex", chunk_size=0),
    "prefix-flex+chunk1024": dict(packing="prefix_shared", attention="flex", chunk_size=1024),
    # flash-attn's variable-length kernel over the packed row (GPU with flash-attn; packed layout only)
    "packed-flash": dict(packing="packed", attention="flash", chunk_size=0),
    # hardware.fused_head=liger: Liger-Kernel's fused-linear SimPO loss, no batch-wide logits, in any layout
    "plain+liger": dict(packing="none", attention="segments", chunk_size=0, fused="liger"),
    "packed+liger": dict(packing="packed", attention="segments", chunk_size=0, fused="liger"),
    "prefix+liger": dict(packing="prefix_shared", attention="segments", chunk_size=0, fused="liger"),
    "packed-flex+liger": dict(packing="packed", attention="flex", chunk_size=0, fused="liger"),
    "prefix-flex+liger": dict(packing="prefix_shared", attention="flex", chunk_size=0, fused="liger"),
}
# Any variant with these suffixes, in any order (ours only: TRL keeps the preset's settings):
# +compile: its decoder layers under torch.compile (hardware.compile, simpo_exp/compiled.py; steps that compiled
#   are dropped from the figures like the warm-up steps);
# +nockpt: without gradient checkpointing where the preset turns it on (hardware.gradient_checkpointing=false:
#   memory for the recomputed forward pass);
# +ckpt2, +ckpt4: only every 2nd / 4th decoder layer checkpointed (hardware.checkpoint_every_n_layers);
# +offload: the checkpointed layers' inputs in pinned host memory (hardware.checkpoint_offload; GPU);
# +liger-layers: Liger's RMSNorm, SwiGLU and rotary kernels in the decoder layers (hardware.fused_layers=liger; GPU).
COMPILE_SUFFIX = "+compile"
LIGER_LAYERS_SUFFIX = "+liger-layers"
NO_CHECKPOINTING_SUFFIX = "+nockpt"
SUFFIXES = {  # suffix: (setting, its value with the suffix)
    COMPILE_SUFFIX: ("compile", True),
    NO_CHECKPOINTING_SUFFIX: ("no_checkpointing", True),
    "+ckpt2": ("checkpoint_every_n_layers", 2),
    "+ckpt4": ("checkpoint_every_n_layers", 4),
    "+offload": ("checkpoint_offload", True),
    LIGER_LAYERS_SUFFIX: ("liger_layers", True),
}
SUFFIX_DEFAULTS = {
    "compile": False,
    "no_checkpointing": False,
    "checkpoint_every_n_layers": 1,
    "checkpoint_offload": False,
    "liger_layers": False,
}
TRL_NO_CHECKPOINTING = "TRL" + NO_CHECKPOINTING_SUFFIX  # --trl-nockpt: TRL's run without gradient checkpointing


def split_variant(name: str) -> tuple[str, dict]:
    """A variant's base name (a key of VARIANTS, or not, for an unknown one) and its suffixes' settings; each
    setting takes one suffix at most (a second one stays in the base name, which then names no variant)."""
    flags, taken = dict(SUFFIX_DEFAULTS), set()
    base, found = name, True
    while found:
        found = next((s for s in SUFFIXES if base.endswith(s) and SUFFIXES[s][0] not in taken), None)
        if found:
            key, value = SUFFIXES[found]
            flags[key] = value
            taken.add(key)
            base = base.removesuffix(found)
    return base, flags


def variant_settings(name: str) -> dict:
    """A variant's settings, its suffixes' included."""
    base, flags = split_variant(name)
    return VARIANTS[base] | flags


def trl_like(name: str, checkpointing: bool) -> str | None:
    """The TRL run a run of ours is set against, like with like: TRL with gradient checkpointing for a run that
    checkpoints every layer, TRL without (``--trl-nockpt``) for a ``+nockpt`` run, none for partial checkpointing
    (``+ckpt2``/``+ckpt4`` recompute fewer layers than any TRL run: set against TRL's full recompute it would be
    credited with the work it skips), nor for ``+offload`` and ``+liger-layers``: transformers' Trainer gives TRL
    both (``gradient_checkpointing_kwargs``, ``use_liger_kernel``), and TRL is timed without them. ``checkpointing``:
    the preset's; without it every other run is set against TRL."""
    if name in ("TRL", TRL_NO_CHECKPOINTING):
        return name if checkpointing else "TRL"
    v = variant_settings(name)
    if v["checkpoint_offload"] or v["liger_layers"]:
        return None
    if not checkpointing:
        return "TRL"
    if v["no_checkpointing"]:
        return TRL_NO_CHECKPOINTING
    return "TRL" if v["checkpoint_every_n_layers"] == 1 else None


PRESETS = {
    "cpu": dict(
        device="cpu",
        model=dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=0,
            tie_word_embeddings=True,
        ),  # model=tiny (model.random_init's defaults)
        prompt=(32, 0.7, 12, 125),
        response=(70, 0.6, 25, 200),
        batch=8,
        max_length=512,
        lr=1e-3,
        bf16=False,
        gradient_checkpointing=False,
        warmup=3,
        steps=20,
        rounds=2,
        variants=["plain", "packed", "prefix", "packed-mask", "prefix-mask"],
    ),
    "cpu-128k": dict(
        device="cpu",
        model=dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=128_256,
            tie_word_embeddings=True,
        ),
        prompt=(300, 0.4, 150, 600),
        response=(700, 0.3, 400, 1100),  # sequences of ~1-1.7k tokens
        batch=1,
        max_length=2048,
        lr=1e-4,
        bf16=False,
        gradient_checkpointing=False,
        warmup=1,
        steps=2,
        rounds=1,
        variants=["plain", "plain+chunk1024", "prefix", "prefix+chunk1024", "prefix+chunk256"],
    ),
    "gpu": dict(
        device="cuda",
        # Llama-3.2-1B's shape (1.24B parameters with the tied 128k-token embedding), randomly initialised
        model=dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128_256,
            tie_word_embeddings=True,
        ),
        prompt=(130, 0.7, 50, 500),
        response=(280, 0.6, 100, 800),
        batch=4,
        max_length=2048,
        lr=1e-6,
        bf16=True,
        gradient_checkpointing=True,
        warmup=3,
        steps=10,
        rounds=1,
        variants=[
            # the layouts the targets need first: a run cut short by its time limit keeps them
            # (fastest on the H200 on 2026-11-30: packed-flex, then prefix-flex; segment attention last)
            "plain",
            "packed-flex",
            "packed-flex+liger",
            "prefix-flex",
            "plain+liger",
            "plain+compile",
            "packed-flex+compile",
            "packed-flex+nockpt",
            "packed-flex+compile+nockpt",
            "plain+chunk1024",
            "prefix-flex+chunk1024",
            "packed-flash",
            "prefix",
        ],
    ),
}


# ----------------------------------------------------------------------------- shared set-up
def generate_texts(preset: dict, n: int, seed: int = 1234) -> list[dict]:
    """Random letters with UltraFeedback-like, right-skewed (lognormal) lengths. With the byte-level
    tokenizer one character is one token, so the lengths are token counts."""
    import random

    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz     "

    def length(spec):
        median, sigma, lo, hi = spec
        return int(min(hi, max(lo, round(median * math.exp(rng.gauss(0.0, sigma))))))

    def text(k):
        return "".join(rng.choice(alphabet) for _ in range(k)).replace("  ", " a")

    rows = []
    for _ in range(n):
        rows.append(
            {
                "prompt": text(length(preset["prompt"])),
                "chosen": text(length(preset["response"])),
                "rejected": text(length(preset["response"])),
            }
        )
    return rows


def tokenize_like_trl(tok, rows: list[dict], max_length: int) -> list[dict]:
    """The token ids CPOTrainer builds: BOS + prompt, response + EOS, responses cut to fit max_length."""
    out = []
    for row in rows:
        prompt = [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
        pair = {"prompt_input_ids": prompt}
        for key in ("chosen", "rejected"):
            response = tok(row[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            pair[f"{key}_input_ids"] = response[: max(0, max_length - len(prompt))]
        out.append(pair)
    return out


def build_model(preset: dict, tok, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    m = dict(preset["model"])
    m["vocab_size"] = max(m["vocab_size"], len(tok))
    config = LlamaConfig(
        **m,
        max_position_embeddings=max(2048, preset["max_length"]),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    # Initialised where it will train: a 1.2B model's random init takes about 30 s on CPU cores and well
    # under one on a GPU. Both sides build it the same way, so they start from the same weights.
    with torch.device(preset["device"]):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    return model


def setup(spec: dict):
    import torch

    from simpo_exp.model import build_tiny_tokenizer

    preset = PRESETS[spec["preset"]] | spec.get("overrides", {})
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    tok = build_tiny_tokenizer()
    n_pairs = preset["batch"] * (preset["warmup"] + preset["steps"])
    rows = generate_texts(preset, n_pairs)
    return preset, tok, rows


def fused_adamw(preset: dict) -> bool | None:
    """Both sides step AdamW as they would by default: fused on a GPU (transformers' ``adamw_torch_fused``;
    ``simpo_exp.engine.adamw_fused``), torch's default elsewhere."""
    return True if preset["device"] == "cuda" else None


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def step_loss(policy, batch: dict):
    """The loss (and statistics) of simpo_exp.train.batch_loss for SimPO with sft_weight 0:
    ResponseLogps -> simpo_loss (+ the NLL term it always computes for logging). Written out here so the
    benchmark does not depend on batch_loss's config object, which other methods extend."""
    import torch

    from simpo_exp.losses import nll_loss, simpo_loss

    out = policy(**batch)
    if not hasattr(out, "logp_sums"):  # a fused head (simpo_exp/fused.py) returned the loss itself
        return fused_step_loss(out, batch)
    n = out.num_tokens.shape[0] // 2
    logps = out.mean_logps
    pref = simpo_loss(logps[:n], logps[n:], BETA, GAMMA_BETA_RATIO)
    sft = nll_loss(out.logp_sums[:n], out.num_tokens[:n])
    loss = pref.losses.mean() + 0.0 * sft
    stats = torch.stack(
        [
            sft.detach(),
            pref.chosen_rewards.sum(),
            pref.rejected_rewards.sum(),
            (pref.chosen_rewards > pref.rejected_rewards).float().sum(),
            out.logit_means.sum(),
            batch["attention_mask"].sum().float(),
        ]
    )
    return loss, stats


def fused_step_loss(out, batch: dict):
    """``step_loss`` for ``simpo_exp.fused.FusedPreference``: its loss, and the statistics it can give
    (the logit sum over response tokens in place of the sum of per-row means)."""
    import torch

    from simpo_exp.losses import nll_loss

    n = out.num_tokens.shape[0] // 2
    sft = nll_loss((out.logp_means * out.num_tokens)[:n], out.num_tokens[:n])
    stats = torch.stack(
        [
            sft.detach(),
            out.chosen_rewards.sum(),
            out.rejected_rewards.sum(),
            (out.chosen_rewards > out.rejected_rewards).float().sum(),
            out.logit_sums.sum(),
            batch["attention_mask"].sum().float(),
        ]
    )
    return out.loss, stats


def make_trl_trainer(
    preset: dict, tok, rows: list[dict], model, out_dir: str, callbacks=(), bf16=None, accumulation: int = 1
):
    """TRL's CPOTrainer(loss_type="simpo") on ``rows`` in order, the preset's batch a step: in ``accumulation``
    micro-batches of batch/accumulation pairs (the sequential sampler gives step i the same pairs either way)."""
    import torch
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    if preset["batch"] % accumulation:
        raise SystemExit(f"--trl-accum {accumulation} does not divide the batch of {preset['batch']} pairs")
    args = CPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=preset["batch"] // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=preset["warmup"] + preset["steps"],
        learning_rate=preset["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=preset["bf16"] if bf16 is None else bf16,
        fp16=False,
        gradient_checkpointing=preset["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=preset["max_length"],
        loss_type="simpo",
        beta=BETA,
        simpo_gamma=BETA * GAMMA_BETA_RATIO,  # TRL's gamma is absolute
        cpo_alpha=0.0,  # pure SimPO: no NLL term
        label_smoothing=0.0,
        disable_dropout=True,
        train_sampling_strategy="sequential",  # same order as ours
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        logging_steps=10_000,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=preset["device"] == "cpu",
        seed=0,
        disable_tqdm=True,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=preset["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused_adamw(preset)
    )
    return CPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        optimizers=(optimizer, None),
        callbacks=list(callbacks),
    )


def make_ours(preset: dict, tok, model, variant: str):
    from simpo_exp.data.collate import PairCollator
    from simpo_exp.logps import ResponseLogps

    v = variant_settings(variant)
    if v["liger_layers"]:  # replaces the family's rotary embedding for the process: see kept_modeling_modules
        from simpo_exp.fused import fuse_layers

        fuse_layers(model)
    checkpointing = preset["gradient_checkpointing"] and not v["no_checkpointing"]
    if checkpointing:
        from simpo_exp.model import enable_checkpointing

        enable_checkpointing(model, v["checkpoint_every_n_layers"], v["checkpoint_offload"])
    fused = None
    if v.get("fused") == "liger":  # the run's SimPO settings, sft_weight 0 as step_loss
        from simpo_exp.fused import LigerPreferenceHead

        fused = LigerPreferenceHead("simpo", BETA, BETA * GAMMA_BETA_RATIO, 0.0, 0.0)
    policy = ResponseLogps(
        model, chunk_size=v["chunk_size"], packing=v["packing"], attention=v["attention"], fused=fused
    )
    collate = PairCollator(tok.pad_token_id, packing=v["packing"], attention=v["attention"])
    if v["compile"]:  # after ResponseLogps installed its attention hook, as simpo_exp/train.py does
        from types import SimpleNamespace

        from simpo_exp.compiled import compile_model

        hardware = dict(compile_mode=None, compile_backend="inductor")
        compile_model(model, SimpleNamespace(gradient_checkpointing=checkpointing, **hardware))
    return policy, collate


def response_tokens(pairs: list[dict], batch: int) -> list[int]:
    return [
        sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs[i : i + batch])
        for i in range(0, len(pairs) - batch + 1, batch)
    ]


# ----------------------------------------------------------------------------- workers
def worker_check(spec: dict) -> dict:
    """First-batch loss and gradient of TRL and of every variant, from the same weights, float32: ``{"trl": loss,
    "ours": {variant: loss}, "grad_error": {variant: relative L2 error against TRL's gradient, or None where the
    device has no backward for the variant (FlexAttention's on a CPU)}, "grad_unchecked": {variant: why}}``."""
    import torch

    from simpo_exp.fused import kept_modeling_modules

    preset, tok, rows = setup(spec)
    device = preset["device"]
    pairs = tokenize_like_trl(tok, rows, preset["max_length"])
    model = build_model(preset, tok)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trl_trainer(preset, tok, rows, model, tmp, bf16=False)
        batch = next(iter(trainer.get_train_dataloader()))
        model.train()
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        trl_loss = float(loss.detach())
        trl_grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    # Same tokens? TRL's rows (unpadded) against ours.
    first = pairs[: preset["batch"]]
    for key in ("chosen", "rejected"):
        for i, pair in enumerate(first):
            n = int(batch[f"{key}_attention_mask"][i].sum())
            theirs = batch[f"{key}_input_ids"][i, :n].tolist()
            if theirs != pair["prompt_input_ids"] + pair[f"{key}_input_ids"]:
                raise SystemExit(f"token mismatch between TRL and this harness ({key}, row {i})")
    losses, grad_error, unchecked = {}, {}, {}
    # compiling is in place on the shared model: the compiled variants last
    for variant in sorted(spec["variants"], key=lambda name: variant_settings(name)["compile"]):
        # --eager-check: a +compile variant's loss from its eager twin (tests/test_compile.py checks the compiled
        # one), so that no compile stands between the start and the first timed run
        built = variant.replace(COMPILE_SUFFIX, "") if spec.get("eager_check") else variant
        # Liger's layer kernels patch the model they are given: a copy of the same weights takes them, and
        # what they replaced for the process is put back after it
        own = variant_settings(variant)["liger_layers"]
        with kept_modeling_modules():
            weights = copy.deepcopy(model) if own else model
            policy, collate = make_ours(preset, tok, weights, built)
            b = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate(first).items()}
            try:
                loss = step_loss(policy, b)[0]
                loss.backward()
                grad_error[variant] = gradient_error(weights, trl_grads)
            except NotImplementedError as e:  # FlexAttention has no backward on a CPU: the loss alone
                if device != "cpu":
                    raise
                weights.zero_grad(set_to_none=True)
                with torch.no_grad():
                    loss = step_loss(policy, b)[0]
                grad_error[variant], unchecked[variant] = None, str(e).split(". ")[0][:120]
            losses[variant] = float(loss)
            weights.zero_grad(set_to_none=True)
            del policy, loss
    return {"trl": trl_loss, "ours": losses, "grad_error": grad_error, "grad_unchecked": unchecked}


def gradient_error(model, reference: list) -> float:
    """``|g - g_ref| / |g_ref|`` over every weight (L2), ``g`` the gradients ``model`` holds, ``reference`` TRL's in
    parameter order; a weight with a gradient on one side only counts its whole gradient as error."""
    import torch

    diff = norm = torch.zeros((), dtype=torch.float64)
    for p, ref in zip(model.parameters(), reference, strict=True):
        mine = None if p.grad is None else p.grad.detach().double()
        theirs = None if ref is None else ref.double()
        if theirs is not None:
            norm = norm + theirs.square().sum().cpu()
        if mine is not None or theirs is not None:
            gap = mine if theirs is None else -theirs if mine is None else mine - theirs
            diff = diff + gap.square().sum().cpu()
    return float((diff / norm).sqrt()) if norm > 0 else float("inf")


def worker_trl(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    preset, tok, rows = setup(spec)
    if spec.get("no_checkpointing"):  # the run "TRL+nockpt" (--trl-nockpt)
        preset = preset | {"gradient_checkpointing": False}
    device = preset["device"]
    model = build_model(preset, tok)
    marks: list[float] = []
    profiler = step_profiler(spec, preset)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sync(device)
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            marks.append(time.perf_counter())
            if profiler is not None:
                profiler.step_done()

    with tempfile.TemporaryDirectory() as tmp:
        accumulation = spec.get("accumulation", 1)
        trainer = make_trl_trainer(preset, tok, rows, model, tmp, callbacks=[Timer()], accumulation=accumulation)
        base = rss_mb()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    pairs = tokenize_like_trl(tok, rows, preset["max_length"])
    out = finish(preset, marks, base, device, tokens=response_tokens(pairs, preset["batch"]), profiler=profiler)
    mfu = padded_mfu(preset, tok, model, pairs, out["times"])
    return out | ({"mfu": mfu} if mfu else {})


def padded_mfu(preset: dict, tok, model, pairs: list[dict], times: list[float]) -> list[float] | None:
    """MFU of each step by the FLOP count of our padded layout (simpo_exp/flops.py) over the same batches, in
    order: for TRL, whose steps do the same useful work. Against our plain and packed runs (the prompt counted
    twice, as TRL runs it) the two MFUs compare speeds under one convention; a prefix-shared run's MFU counts the
    prompt once, the work it does, and reads lower than its speed against TRL's by the prompt's share. None where
    the device's peak is unknown (CPU)."""
    from simpo_exp.data.collate import PairCollator
    from simpo_exp.flops import flop_spec

    peak = device_peak(preset)
    if not peak:
        return None
    spec, collate, size = flop_spec(model), PairCollator(tok.pad_token_id, packing="none"), preset["batch"]
    return [
        batch_flops(spec, collate(pairs[i * size : (i + 1) * size]), "none") / seconds / peak
        for i, seconds in enumerate(times)
    ]


def batch_flops(spec, batch: dict, packing: str) -> float:
    """Model FLOPs of one step on ``batch``, laid out as ``packing`` (``simpo_exp.flops.FlopSpec.step_flops``)."""
    from simpo_exp.flops import attention_pairs

    tokens, response = float(batch["attention_mask"].sum()), float(sum(batch["row_lengths"]))
    return spec.step_flops(
        tokens, response, float(attention_pairs(batch, packing)), float(spec.local_pairs(batch, packing))
    )


def device_peak(preset: dict) -> float | None:
    """The preset's device's peak FLOP/s at its precision (None where unknown: no MFU)."""
    import torch

    from simpo_exp.flops import peak_flops

    return peak_flops(torch.device(preset["device"]), "bf16" if preset["bf16"] else "no", None)


def worker_ours(spec: dict) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from torch.utils.data import DataLoader

    from simpo_exp.compiled import graphs_built
    from simpo_exp.flops import flop_spec

    preset, tok, rows = setup(spec)
    device = preset["device"]
    # what an earlier variant left allocated in this process (--shared-process; none in a fresh process): the
    # peak is counted above it
    leftover = torch.cuda.memory_allocated() if device == "cuda" else 0
    pairs = tokenize_like_trl(tok, rows, preset["max_length"])
    model = build_model(preset, tok)
    # batches pinned and copied without waiting on a GPU, as simpo_exp.train's loader does
    loading = DataLoaderConfiguration(non_blocking=device == "cuda")
    accelerator = Accelerator(
        cpu=device == "cpu", mixed_precision="bf16" if preset["bf16"] else "no", dataloader_config=loading
    )
    policy, collate = make_ours(preset, tok, model, spec["variant"])
    pinned = device == "cuda"
    loader = DataLoader(pairs, batch_size=preset["batch"], drop_last=True, collate_fn=collate, pin_memory=pinned)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=preset["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused_adamw(preset)
    )
    policy, optimizer, loader = accelerator.prepare(policy, optimizer, loader)
    policy.train()
    spec_flops = flop_spec(model)
    # model FLOPs of each step, for MFU (simpo_exp/flops.py), counted on the host from the same batches (the loader
    # neither shuffles nor drops a pair before the last): counting the device's copies would wait for them each step
    packing, size = variant_settings(spec["variant"])["packing"], preset["batch"]
    work = [batch_flops(spec_flops, collate(pairs[i : i + size]), packing) for i in range(0, len(loader) * size, size)]
    base = rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    profiler = step_profiler(spec, preset)
    sync(device)
    marks, compiled, skipped = [time.perf_counter()], [], 0
    for batch in loader:  # the inner loop of simpo_exp/train.py with accumulation 1
        graphs = graphs_built()
        loss = step_loss(policy, batch)[0]
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), 1.0)
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:  # recorded: such a run is reported as failed (a step without AdamW is no step to time)
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        marks.append(time.perf_counter())
        compiled.append(graphs_built() > graphs)  # torch.compile built graphs in this step: a warm-up step
        if profiler is not None:
            profiler.step_done()
    out = finish(preset, marks, base, device, response_tokens(pairs, preset["batch"]), profiler, leftover)
    out["compiled"], out["skipped_steps"] = compiled, skipped
    peak = device_peak(preset)
    if peak:
        out["mfu"] = [w / t / peak for w, t in zip(work, out["times"])]
    return out


def finish(preset, marks, base_rss, device, tokens, profiler=None, leftover_cuda: int = 0) -> dict:
    import torch

    times = [b - a for a, b in zip(marks, marks[1:])]
    out = {"times": times, "tokens": tokens[: len(times)], "rss_before_mb": base_rss, "peak_rss_mb": peak_rss_mb()}
    if device == "cuda":
        out["peak_cuda_mb"] = (torch.cuda.max_memory_allocated() - leftover_cuda) / 2**20
        out["leftover_cuda_mb"] = leftover_cuda / 2**20
    if profiler is not None:
        out["profile"] = profiler.summary(times)
    return out


def step_profiler(spec: dict, preset: dict):
    """``--profile``: a torch.profiler over the steps after the warm-up (benchmarks/profile_trace.py)."""
    if not spec.get("profile"):
        return None
    from benchmarks.profile_trace import StepProfiler

    return StepProfiler(preset["device"], preset["warmup"], preset["steps"])


def worker_ours_shared(spec: dict) -> dict:
    """``--shared-process``: our variants one after another in this one process, to spare a GPU run the start-up
    of a process per variant (about 10-15 s each on the H200). Between variants everything of the last is freed,
    the allocator's cache emptied and torch.compile's caches reset; each variant's peak is counted from a reset
    (``worker_ours``), so it is its own. Each result is printed as soon as it is measured (``RESULT_OF``), so a
    run cut short keeps the variants it finished; a variant that runs out of memory is recorded as such."""
    import gc

    import torch

    from simpo_exp.fused import kept_modeling_modules

    for variant in spec["variants"]:
        try:
            with kept_modeling_modules():  # what a +liger-layers variant replaced for the process, put back
                res = worker_ours(spec | {"variant": variant})
        except torch.OutOfMemoryError:
            res = {"error": "out of memory"}
        print("RESULT_OF " + json.dumps({"variant": variant, "result": res}), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return {"variants": spec["variants"]}


WORKERS = {"check": worker_check, "trl": worker_trl, "ours": worker_ours, "ours_shared": worker_ours_shared}


# ----------------------------------------------------------------------------- the driver
def worker_process(spec: dict) -> dict:
    """How a worker process is started (``subprocess.run`` / ``Popen`` keywords): this script with ``--worker``,
    from the repository root, quiet and without W&B."""
    quiet = {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "TRANSFORMERS_VERBOSITY": "error"}
    return dict(args=[sys.executable, __file__, "--worker", json.dumps(spec)], env=os.environ | quiet, cwd=ROOT)


def run_worker(spec: dict, must_succeed: bool = True) -> dict:
    """One measurement in a fresh process. A failed timing run (out of memory, say) comes back as
    ``{"error": ...}`` unless ``must_succeed``, so the rest of the table is still measured."""
    proc = subprocess.run(**worker_process(spec), capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-3000:])
    what = f"worker {spec.get('impl')}/{spec.get('variant', '')} failed (exit {proc.returncode})"
    if must_succeed:
        raise SystemExit(what)
    oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
    return {"error": "out of memory" if oom else what}


def run_shared_worker(spec: dict, on_result) -> str | None:
    """``worker_ours_shared`` in a fresh process, ``on_result(variant, result)`` called as each variant's result
    arrives. Returns None when the process ended cleanly, else why it did not (the end of its output)."""
    proc = subprocess.Popen(**worker_process(spec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    try:
        for line in proc.stdout:
            if line.startswith("RESULT_OF "):
                got = json.loads(line[len("RESULT_OF ") :])
                on_result(got["variant"], got["result"])
            else:
                tail = (tail + [line])[-40:]
        proc.wait()
    finally:  # cut short (SIGTERM, Ctrl-C): the worker goes too
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        return None
    text = "".join(tail)
    sys.stderr.write(text[-3000:])
    return "out of memory" if "out of memory" in text else f"shared worker failed (exit {proc.returncode})"


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def stop_once(signum, frame):
    """SIGTERM as SystemExit, once: ``timeout`` signals the process and then its whole group, and a second exit
    raised inside the ``finally`` that writes the report cut the report short (its JSON and markdown lost)."""
    signal.signal(signum, signal.SIG_IGN)
    sys.exit(128 + signum)


def write_whole(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: a process killed while writing leaves the old file or
    none, never half of one (which a later reader could not parse)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes to tracked files, which the benchmark runs);
    ``$COMMIT`` where set (a device's copy of the tree may come without ``.git``: gpu_check.sh passes it on)."""
    if os.environ.get("COMMIT", "?") != "?":
        return os.environ["COMMIT"]
    try:
        run = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 10}
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine(threads: int | None = None) -> str:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu_name()}, {os.cpu_count()} cores visible, torch threads per run {threads or torch.get_num_threads()}; "
        f"GPU {gpu}; "
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, accelerate {accelerate.__version__}, datasets {datasets.__version__}, "
        f"liger-kernel {liger_version()}"
    )


def liger_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        return "absent"


def measured(run: dict, key: str, warmup: int) -> list:
    """``run[key]`` over the measured steps: past the first ``warmup``, and none in which torch.compile
    built graphs (``+compile`` variants: compiling happens in the first steps, and again on a recompile)."""
    compiled = run.get("compiled") or [False] * len(run[key])
    return [x for i, (x, c) in enumerate(zip(run[key], compiled)) if i >= warmup and not c]


def keep_run(runs: dict, failures: dict, name: str, res: dict, warmup: int) -> str | None:
    """Add a finished run to ``runs``; or, for a run that failed or has no timed step (every step past the warm-up
    built graphs: a ``+compile`` run, a recompile at a new width), the reason to ``failures``, returned. A run with
    no timed step left the report itself failing (a median of nothing), every other row's output lost with it."""
    skipped = res.get("skipped_steps")
    why = (
        res.get("error")
        or (f"skipped {skipped} optimizer steps (non-finite gradients): not a run to time" if skipped else None)
        or (None if measured(res, "times", warmup) else NO_TIMED_STEP)
    )
    if why:
        failures.setdefault(name, why)
        return why
    runs.setdefault(name, []).append(res)
    return None


NO_TIMED_STEP = "no timed step: every measured step compiled; raise --steps"


def paired_ratio(runs: list[dict], ref_runs: list[dict], warmup: int) -> float | None:
    """How many times faster ``runs`` are than ``ref_runs``: the median, over the measured steps both timed (the same
    round and step, so the same batch), of the reference's step time over this one's. Each step is another batch
    (1.9k to 3.5k response tokens on the GPU preset), so the ratio of two medians over a few steps could set one
    side's slow batch against the other's quick one, and one hiccup moved it by a whole rank: 2.03x where the
    paired steps say 1.77x (H200, 8 steps). None where no step pairs up."""
    ratios = []
    for ours, ref in zip(runs, ref_runs):
        mine, theirs = step_times(ours, warmup), step_times(ref, warmup)
        ratios += [theirs[i] / mine[i] for i in sorted(mine.keys() & theirs.keys())]
    return statistics.median(ratios) if ratios else None


def step_times(run: dict, warmup: int) -> dict[int, float]:
    """``{step index: seconds}`` of the steps ``measured`` keeps."""
    return dict(
        zip(measured({**run, "index": list(range(len(run["times"])))}, "index", warmup), measured(run, "times", warmup))
    )


def summarise(name: str, runs: list[dict], warmup: int, batch: int, device: str) -> dict:
    times = [t for r in runs for t in measured(r, "times", warmup)]
    rates = [k / t for r in runs for k, t in zip(measured(r, "tokens", warmup), measured(r, "times", warmup))]
    med = statistics.median(times)
    out = {
        "name": name,
        "steps": len(times),
        "median_step_s": med,
        "pairs_per_s": batch / med,
        "resp_tokens_per_s": statistics.median(rates),
        "round_pairs_per_s": [batch / statistics.median(measured(r, "times", warmup)) for r in runs],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "rss_rise_mb": max(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs),
    }
    if device == "cuda":
        out["peak_cuda_mb"] = max(r["peak_cuda_mb"] for r in runs)
    if all("mfu" in r for r in runs):
        out["mfu"] = statistics.median(m for r in runs for m in measured(r, "mfu", warmup))
    if any(any(r.get("compiled", ())) for r in runs):  # the compile steps' time, left out of the figures above
        out["compile_steps"] = max(sum(r["compiled"]) for r in runs)
        out["compile_warmup_s"] = max(sum(t for t, c in zip(r["times"], r["compiled"]) if c) for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument(
        "--variants",
        help=f"comma list of our variants (default: the preset's); known: {', '.join(VARIANTS)}, "
        f"each also with any of the suffixes {', '.join(SUFFIXES)} (ours only): {COMPILE_SUFFIX} its layers under "
        f"torch.compile, {NO_CHECKPOINTING_SUFFIX} without the preset's gradient checkpointing, +ckptN only every "
        f"N-th layer checkpointed, +offload the checkpointed inputs in host memory, {LIGER_LAYERS_SUFFIX} Liger's "
        "kernels in the decoder layers (GPU)",
    )
    ap.add_argument("--rounds", type=int, help="repeat the whole set, interleaved (default: the preset's)")
    ap.add_argument("--steps", type=int, help="measured steps per run (default: the preset's)")
    ap.add_argument("--warmup", type=int, help="steps dropped at the start of each run (default: the preset's)")
    ap.add_argument("--batch", type=int, help="pairs per step (default: the preset's)")
    ap.add_argument(
        "--check-pairs",
        type=int,
        help="pairs of the first batch in the loss check (default: the batch). At a batch TRL cannot fit, its "
        "float32 check would not fit either; the first pairs of the same data check the same computation",
    )
    ap.add_argument(
        "--eager-check",
        action="store_true",
        help=f"the loss check runs the {COMPILE_SUFFIX} variants eagerly (their compiled loss is tested in "
        "tests/test_compile.py), so that no compile warm-up comes before the first timed run",
    )
    ap.add_argument(
        "--checkpointing",
        action="store_true",
        help="gradient checkpointing on both sides where the preset has it off (the CPU presets), so that the "
        "+nockpt, +ckpt2 and +ckpt4 variants can be set beside it",
    )
    ap.add_argument("--threads", type=int, help="torch threads in each worker (default: torch's)")
    ap.add_argument(
        "--no-trl",
        action="store_true",
        help="leave out TRL's run with the preset's checkpointing (the loss check still runs); with --trl-nockpt, "
        "TRL without checkpointing is still timed",
    )
    ap.add_argument(
        "--trl-nockpt",
        action="store_true",
        help=f"also time TRL without the preset's gradient checkpointing ({TRL_NO_CHECKPOINTING}), to set beside our "
        f"{NO_CHECKPOINTING_SUFFIX} variants; the ratios stay against TRL with the preset's settings",
    )
    ap.add_argument(
        "--trl-accum",
        type=int,
        default=1,
        help=f"{TRL_NO_CHECKPOINTING} in this many micro-batches a step (batch/K pairs each, K accumulation steps: the "
        "same pairs a step, and for SimPO's mean loss the same gradient), where TRL without checkpointing does not "
        "fit the whole batch in one; recorded in the JSON's config as trl_nockpt_accumulation",
    )
    ap.add_argument(
        "--shared-process",
        action="store_true",
        help="GPU only: our variants one after another in one process (TRL in its own), sparing each the start-up "
        "of a process; each variant's peak GPU memory is counted from a reset, with the last one's memory freed",
    )
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--markdown", help="also write the table as markdown to this file")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: one run each under torch.profiler (the --steps after --warmup), and where the "
        "step's time goes: GPU busy time, kernels, synchronisations, the slowest kernels (no loss check)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        print("RESULT " + json.dumps(WORKERS[spec["impl"]](spec)), flush=True)
        return

    preset = dict(PRESETS[args.preset])
    overrides = {k: getattr(args, k) for k in ("steps", "warmup", "batch") if getattr(args, k) is not None}
    if args.checkpointing:
        overrides["gradient_checkpointing"] = True
    preset |= overrides
    if preset["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                f"--preset {args.preset} needs a CUDA GPU and none is visible "
                "(torch.cuda.is_available() is False); use --preset cpu or cpu-128k here"
            )
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (or pip install trl)")
    variants = args.variants.split(",") if args.variants else preset["variants"]
    unknown = [v for v in variants if split_variant(v)[0] not in VARIANTS]
    if unknown:
        raise SystemExit(
            f"unknown variants {unknown}; known: {', '.join(VARIANTS)}, each also with any of {', '.join(SUFFIXES)}"
        )
    settings = {v: variant_settings(v) for v in variants}
    if any(settings[v].get("fused") == "liger" for v in variants) and not importlib.util.find_spec("liger_kernel"):
        print("liger-kernel is not installed (pip install liger-kernel): the +liger variants are left out")
        variants = [v for v in variants if settings[v].get("fused") != "liger"]
    if any(settings[v]["liger_layers"] for v in variants) and (
        preset["device"] != "cuda" or not importlib.util.find_spec("liger_kernel")
    ):
        print(f"the {LIGER_LAYERS_SUFFIX} variants need a GPU and liger-kernel: left out")
        variants = [v for v in variants if not settings[v]["liger_layers"]]
    if any(settings[v]["attention"] == "flash" for v in variants) and not importlib.util.find_spec("flash_attn"):
        print("flash-attn is not installed (pip install flash-attn): the -flash variants are left out")
        variants = [v for v in variants if settings[v]["attention"] != "flash"]
    if args.shared_process and preset["device"] != "cuda":
        raise SystemExit(
            "--shared-process is for GPU presets: on a CPU the peak memory is the process's RSS high-water mark, "
            "which one variant cannot reset for the next"
        )
    rounds = args.rounds or preset["rounds"]
    base = {"preset": args.preset, "overrides": overrides, "threads": args.threads, "trl_accum": args.trl_accum}

    print(f"machine: {machine(args.threads)}")
    print(
        f"preset {args.preset}: model {preset['model']}, batch {preset['batch']} pairs, max_length "
        f"{preset['max_length']}, prompt {preset['prompt']}, response {preset['response']} (median, sigma, min, max), "
        f"{'bf16' if preset['bf16'] else 'fp32'}, gradient checkpointing {preset['gradient_checkpointing']}, "
        f"AdamW lr {preset['lr']}, {preset['warmup']} warm-up + {preset['steps']} measured steps x {rounds} rounds",
        flush=True,
    )

    # `timeout` (as benchmarks/gpu_check.sh uses) sends SIGTERM, which would end Python without running the
    # `finally` below; as SystemExit it does run it, and subprocess.run kills the worker it was waiting on.
    signal.signal(signal.SIGTERM, stop_once)
    started = time.time()
    # --no-trl leaves out TRL with the preset's checkpointing; --trl-nockpt beside it times TRL without it alone
    trl_runs = ([] if args.no_trl else ["TRL"]) + ([TRL_NO_CHECKPOINTING] if args.trl_nockpt else [])
    order = trl_runs + variants
    if args.profile:
        return profile_runs(args, base, order)
    check_overrides = overrides | ({"batch": args.check_pairs} if args.check_pairs else {})
    check_spec = {"impl": "check", "variants": variants, "overrides": check_overrides, "eager_check": args.eager_check}
    check = run_worker(base | check_spec)
    eager = " (+compile variants checked eagerly)" if args.eager_check else ""
    print(f"\nfirst-batch loss and gradient (float32, same weights){eager}: TRL {check['trl']:.6f}")
    bad = []
    for v, loss in check["ours"].items():
        diff, grad = abs(loss - check["trl"]), check["grad_error"].get(v)
        said = f"{grad:.1e}" if grad is not None else f"not checked here ({check['grad_unchecked'][v]})"
        print(f"  {v:<18} {loss:.6f}  |diff| {diff:.1e}  gradient rel. error {said}")
        if not diff <= LOSS_TOLERANCE or (grad is not None and not grad <= GRAD_TOLERANCE):
            bad.append(v)
    if bad:
        raise SystemExit(
            f"loss check failed for {bad} (loss tolerance {LOSS_TOLERANCE}, gradient {GRAD_TOLERANCE}): not timing "
            "a wrong computation"
        )

    runs: dict[str, list] = {}
    failures: dict[str, str] = {}  # run -> why it failed ("out of memory", ...); a run cut off is in neither

    def record(r: int, name: str, res: dict) -> None:
        why = keep_run(runs, failures, name, res, preset["warmup"])
        if why:
            print(f"round {r + 1}: {name:<18} FAILED: {why}", flush=True)
            return
        med = statistics.median(measured(res, "times", preset["warmup"]))
        memory = (
            f"peak GPU {res['peak_cuda_mb']:8.0f} MiB"
            if "peak_cuda_mb" in res
            else f"peak RSS {res['peak_rss_mb']:8.0f} MiB"
        )
        print(
            f"round {r + 1}: {name:<18} median step {med * 1e3:8.1f} ms  {memory}  ({time.time() - started:.0f} s)",
            flush=True,
        )

    try:
        for r in range(rounds):
            for name in trl_runs:  # TRL's runs, each in a process of its own
                record(r, name, run_worker(worker_spec(base, name), must_succeed=False))
            alone = variants
            if args.shared_process:  # ours in one process; any it left unmeasured then runs alone
                done: list[str] = []

                def arrived(name: str, res: dict, r=r) -> None:
                    done.append(name)
                    record(r, name, res)

                why = run_shared_worker(base | {"impl": "ours_shared", "variants": variants}, arrived)
                if why:
                    print(f"round {r + 1}: the shared process stopped ({why}); the rest run alone", flush=True)
                alone = [v for v in variants if v not in done]
            for name in alone:
                record(r, name, run_worker(worker_spec(base, name), must_succeed=False))
    finally:  # a run cut short (a time limit, Ctrl-C) still prints and writes what it measured
        ran = preset | {"rounds": rounds, "variants": variants}  # recorded: what ran, not the preset's defaults
        if args.trl_nockpt and args.trl_accum > 1:
            ran["trl_nockpt_accumulation"] = args.trl_accum
        report(args, ran, check, order, runs, started, failures)


def worker_spec(base: dict, name: str) -> dict:
    """The worker spec of one timed run: TRL (with the preset's checkpointing or without, the latter in
    ``trl_accum`` micro-batches), or one of our variants."""
    if name in ("TRL", TRL_NO_CHECKPOINTING):
        free = name == TRL_NO_CHECKPOINTING
        return base | {"impl": "trl", "no_checkpointing": free, "accumulation": base.get("trl_accum", 1) if free else 1}
    return base | {"impl": "ours", "variant": name}


def profile_runs(args, base: dict, order: list[str]) -> None:
    """``--profile``: each run once under the profiler; the table (stdout, ``--markdown``) and ``--json``."""
    from benchmarks.profile_trace import markdown

    rows = {}
    try:
        for name in order:
            spec = worker_spec(base, name) | {"profile": True}
            res = run_worker(spec, must_succeed=False)
            rows[name] = res.get("profile") or {"error": res.get("error", "the profiled steps were not reached")}
            print(f"{name}: profiled", flush=True)
    finally:  # a run cut short still reports the runs it profiled
        text = markdown(rows, machine(args.threads))
        print("\n" + text, flush=True)
        if args.markdown:
            Path(args.markdown).write_text(text)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(args.threads), "profiles": rows}, indent=1))


def report(
    args, preset: dict, check: dict, order: list[str], runs: dict, started: float, failures: dict | None = None
) -> None:
    """The side-by-side table (stdout), and the same as JSON (``--json``) and markdown (``--markdown``)."""
    rows = [summarise(n, runs[n], preset["warmup"], preset["batch"], preset["device"]) for n in order if n in runs]
    missing = [n for n in order if n not in runs]
    trl_rows = {r["name"]: r for r in rows if r["name"] in ("TRL", TRL_NO_CHECKPOINTING)}
    refs = {r["name"]: trl_rows.get(trl_like(r["name"], preset["gradient_checkpointing"])) for r in rows}
    for row in rows:  # pairs/s x TRL: step by step on the same batches (paired_ratio), not a ratio of two medians
        if refs[row["name"]]:
            row["x_trl"] = paired_ratio(runs[row["name"]], runs[refs[row["name"]]["name"]], preset["warmup"])
    mem_key = "peak_cuda_mb" if preset["device"] == "cuda" else "peak_rss_mb"
    print(
        f"\n{'':<18} {'pairs/s':>9} {'x TRL':>6} {'resp tok/s':>11} {'x TRL':>6} "
        f"{'peak MiB':>9} {'x TRL':>6}"
        + ("" if preset["device"] == "cuda" else f" {'RSS rise MiB':>12} {'x TRL':>6}")
        + "  per-round pairs/s (x TRL: against the TRL run of the same checkpointing, pairs/s as the median of "
        "the per-step time ratios on the same batches; blank where none)"
    )
    for row in rows:
        ref = refs[row["name"]]
        line = f"{row['name']:<18} {row['pairs_per_s']:9.2f} "
        line += f"{row['x_trl']:6.2f} " if ref and row.get("x_trl") else f"{'':6} "
        line += f"{row['resp_tokens_per_s']:11.0f} "
        line += f"{row['resp_tokens_per_s'] / ref['resp_tokens_per_s']:6.2f} " if ref else f"{'':6} "
        line += f"{row[mem_key]:9.0f} "
        line += f"{row[mem_key] / ref[mem_key]:6.2f}" if ref else f"{'':6}"
        if preset["device"] != "cuda":
            line += f" {row['rss_rise_mb']:12.0f} " + (
                f"{row['rss_rise_mb'] / ref['rss_rise_mb']:6.2f}" if ref else f"{'':6}"
            )
        line += "  " + " ".join(f"{x:.2f}" for x in row["round_pairs_per_s"])
        print(line)
    failures = failures or {}
    for name in missing:
        print(f"{name:<18} not measured ({failures.get(name, 'not reached')})")
    for row in rows:
        if "compile_steps" in row:
            print(f"{row['name']}: {row['compile_steps']} steps compiled, {row['compile_warmup_s']:.1f} s, left out")
    print(f"\ntotal {time.time() - started:.0f} s", flush=True)
    if args.json:
        write_whole(
            args.json,
            json.dumps(
                {
                    "machine": machine(args.threads),
                    "command": " ".join(sys.argv),
                    "commit": git_commit(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "load_average": os.getloadavg()[0],
                    "preset": args.preset,
                    "config": preset,
                    "check": check,
                    "eager_check": args.eager_check,  # the +compile variants' losses came from their eager twins
                    "rows": rows,
                    "runs": runs,
                    "missing": missing,
                    "failures": failures,
                    "shared_process": args.shared_process,  # ours one after another in one process
                },
                indent=1,
            ),
        )
    if args.markdown:
        write_whole(
            args.markdown,
            markdown_table(
                rows,
                missing,
                refs,
                mem_key,
                machine(args.threads) + ("; ours in one shared process" if args.shared_process else ""),
                args.preset,
                failures,
            ),
        )


def markdown_table(
    rows: list[dict], missing: list[str], refs: dict, mem_key: str, where: str, preset: str, failures=None
) -> str:
    """``refs``: each row's TRL run of the same checkpointing (``trl_like``), None where there is none."""
    lines = [
        f"preset `{preset}`; {where}; x TRL: against the TRL run of the same gradient checkpointing (pairs/s: the "
        "median over the steps of TRL's step time over ours, on the same batches)",
        "",
        "| run | median step ms | pairs/s | x TRL | resp. tokens/s | peak MiB | x TRL | MFU | timed steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref = refs.get(row["name"])
        ratio = (lambda key: f"{row[key] / ref[key]:.2f}") if ref else (lambda key: "")
        speed = f"{row['x_trl']:.2f}" if ref and row.get("x_trl") else ""
        lines.append(
            f"| {row['name']} | {row['median_step_s'] * 1e3:.1f} | {row['pairs_per_s']:.2f} | {speed} | "
            f"{row['resp_tokens_per_s']:.0f} | {row[mem_key]:.0f} | {ratio(mem_key)} | "
            + (f"{row['mfu']:.1%} |" if "mfu" in row else " |")
            # the steps the figures are medians of; those in which torch.compile built graphs are left out
            + f" {row['steps']}"
            + (
                f" (+{row['compile_steps']} compiling, {row['compile_warmup_s']:.0f} s)"
                if "compile_steps" in row
                else ""
            )
            + " |"
        )
    lines += [f"| {name} | {(failures or {}).get(name, 'not reached')} | | | | | | | |" for name in missing]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
