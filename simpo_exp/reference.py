"""Reference log-probs for the reference-based baselines (DPO, LN-DPO, IPO, R-DPO).

The reference model is the policy as it starts. Rather than keep a second model in memory for
the whole run, its summed response log-probs are computed once, before training, and cached on
disk under a key made of the model's identity, its initial weights, and the exact token ids of
both splits: a changed model, data set or tokenisation never reuses stale numbers. Each pair carries
its index in its split, and the batch collator adds the pair's two reference numbers to the batch.
``reference_mode=live`` keeps a frozen copy instead; under FSDP2 that copy is sharded as the policy is.

They are computed with the prepared policy (after ``accelerator.prepare``, before a checkpoint is
loaded, so from the starting weights), every process scoring its share of the batches: under ZeRO-3 and
FSDP the weights are only whole inside the engine's forward, and no process scores the data set alone
while the others wait.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from pathlib import Path

import pyarrow.compute as pc
import torch
from datasets import Dataset
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from simpo_exp.config import Config
from simpo_exp.data import MODEL_COLUMNS
from simpo_exp.data.dealt import Dealt
from simpo_exp.engine import fsdp2, on_every, resolved_precision
from simpo_exp.flops import full_numel
from simpo_exp.inference.files import readable_as_umask, temporary_name
from simpo_exp.layout import BatchLayout
from simpo_exp.logps import ResponseLogps
from simpo_exp.model import eval_mode, is_dropout_name
from simpo_exp.precision import AUTOCAST_DTYPES, engine_keeps_master_copy, precision_record

log = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REF_INDEX = "pair_index"  # the column holding each pair's row number in its split


def data_fingerprint(ds: Dataset) -> str:
    """Hash of the token ids of every pair, in order."""
    h = hashlib.sha256()
    for batch in ds.select_columns(MODEL_COLUMNS).with_format("arrow").iter(batch_size=8192):
        for name in MODEL_COLUMNS:
            col = batch[name]
            h.update(pc.list_value_length(col).to_numpy(zero_copy_only=False).tobytes())
            h.update(pc.list_flatten(col).to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


FINGERPRINT_VALUES = 4096  # of each weight, evenly spaced: a changed layer changes them (a whole 8B model would
# take a minute to hash on every start)


def sampled(p: torch.Tensor, n: int = FINGERPRINT_VALUES) -> torch.Tensor:
    """Up to ``n`` of a weight's values, evenly spaced through it, on the CPU; gathered first where ZeRO-3
    partitioned it at load (a collective: every process must call this for the same weights)."""

    def pick(t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().reshape(-1)
        return flat[:: max(1, flat.numel() // n)][:n].float().cpu().clone()

    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return pick(p)
    return pick(p)


def weights_fingerprint(model) -> str:
    """The starting weights' values alone (``sampled`` from each weight but LoRA's adapters), as a short hash: what
    a reference-based method's reference log-probs are of. Every process must call it (ZeRO-3 gathers)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            h.update(name.encode() + sampled(p).numpy().tobytes())
    return h.hexdigest()[:16]


# config keys that do not change what the forward computes, or that the run sets itself (dropout: zeroed for
# training, and the reference is scored in eval mode; the dtype, path and kernels enter the keys on their own)
NOT_ARCHITECTURE = {
    "_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype", "use_cache", "return_dict",
    "output_attentions", "output_hidden_states", "bos_token_id", "eos_token_id", "pad_token_id",
}  # fmt: skip


def architecture_fingerprint(model) -> str:
    """What the model's forward computes beyond its weights, as a short hash: its config (``rms_norm_eps``,
    ``rope_theta`` and rope scaling, softcapping, sliding windows...) less ``NOT_ARCHITECTURE`` and dropout, and
    for a model that ships its own code (``trust_remote_code``) that code. Weights alone left a ``config.json``
    edited at ``model.path`` with the old reference log-probs (about 1 nat apart on a tiny model), on a fresh
    run and at resume."""
    import sys

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT's wrapper: the base
    config = getattr(base, "config", None)
    if config is None:
        return ""

    def kept(d):
        if isinstance(d, dict):
            return {
                k: kept(v)
                for k, v in d.items()
                if k not in NOT_ARCHITECTURE
                and not str(k).startswith("_attn_implementation")
                and not is_dropout_name(str(k))  # what model.disable_dropout zeroes
            }
        return d

    h = hashlib.sha256(json.dumps(kept(config.to_dict()), sort_keys=True, default=str).encode())
    module = sys.modules.get(type(base).__module__)
    if type(base).__module__.startswith("transformers_modules") and getattr(module, "__file__", None):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def model_path_key(path: str) -> str:
    """A model path as the key reads it: a local folder by its resolved path (``/x/base`` and ``/x/base/``, or a
    link to it, are one model), a hub id as written."""
    local = Path(path).expanduser()
    return str(local.resolve()) if path and local.is_dir() else path


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def model_fingerprint(cfg: Config, model, accelerator=None, weights: str | None = None) -> str:
    """The starting weights' identity: the model's path, revision, dtype, the dtype they are computed in (weights,
    autocast, and a sharding engine's own cast), size, its architecture (``architecture_fingerprint``) and the
    transformers release computing it, and values sampled from every weight (a model overwritten at the same path,
    a merged adapter, another seed of a random model differ).
    LoRA's adapters are left out: they add nothing at the start (B = 0), whatever their seed or rank."""
    params = [p for name, p in model.named_parameters() if "lora_" not in name]
    identity = {
        "path": model_path_key(cfg.model.path),
        "revision": cfg.model.revision,
        "dtype": cfg.model.dtype,
        # what the log-probs are computed in: a LoRA base stays in model.dtype, full fine-tuning upcasts it
        "weights": sorted({str(p.dtype) for p in params}),
        "autocast": resolved_precision(cfg.hardware),  # "auto" as resolved: bf16 on a GPU, none on a CPU
        "n": sum(full_numel(p) for p in params),
        "architecture": architecture_fingerprint(model),
        # the library's release line: one that changes a family's forward changes its log-probs
        "transformers": ".".join(transformers_version().split(".")[:2]),
    }
    # a sharding engine that computes the forward in its own copy of the weights, where DDP or one device run the
    # weights as loaded under the autocast (log-probs of one model 0.01-0.1 nats apart): FSDP's mixed precision in its
    # param_dtype copies (without it, FSDP computes as one device), DeepSpeed under bf16/fp16 in its cast copy (made
    # when the engine is built, after this key: weights loaded in float32 gave the key of DDP's)
    engine, key, compute = getattr(accelerator, "distributed_type", None), None, None
    if engine is not None and engine.value == "FSDP":
        key, compute = "fsdp_param_dtype", precision_record(model, accelerator)["fsdp_param_dtype"]
    elif engine is not None and engine_keeps_master_copy(accelerator):
        key, compute = "deepspeed_dtype", AUTOCAST_DTYPES[accelerator.mixed_precision]
    if key is not None and compute not in {str(p.dtype).removeprefix("torch.") for p in params}:
        identity[key] = compute
    h = hashlib.sha256(json.dumps(identity).encode())
    # the weights' values by ``weights_fingerprint`` (given: the run's start_weights, taken once; each take under
    # ZeRO-3 gathers every weight)
    h.update((weights or weights_fingerprint(model)).encode())
    return h.hexdigest()


def kernels(cfg: Config, model, layout: BatchLayout | None) -> str:
    """How the reference forward computes, beyond the weights and their dtypes: the attention kernel, the batch
    layout (packed rows and the mask or segment attention sum in another order: under bf16 autocast the summed
    log-probs of one model moved 0.006-0.05 nats between them, so a cache of another layout gave a run nonzero
    DPO rewards at step 0), the fused kernels and the compiler's backend under ``hardware.compile``. Empty for the
    padded SDPA path, so that keys made before this was part of them still match it."""
    attention = (getattr(model.config, "_attn_implementation", None) or "sdpa").rsplit(":", 1)[-1]
    parts = {
        "attention": attention if attention != "sdpa" else None,
        "layout": f"{layout.packing}/{layout.attention}" if layout is not None and layout.packing != "none" else None,
        "fused_layers": cfg.hardware.fused_layers if cfg.hardware.fused_layers != "none" else None,
        "fused_head": cfg.hardware.fused_head if cfg.hardware.fused_head != "none" else None,
        # compiled layers (the cache is filled by the prepared policy): inductor fuses and sums in its own order
        "compile": cfg.hardware.compile_backend if cfg.hardware.compile else None,
    }
    return json.dumps({k: v for k, v in parts.items() if v}) if any(parts.values()) else ""


def cache_path(
    cfg: Config, model, splits: dict[str, Dataset], accelerator=None, layout=None, weights: str | None = None
) -> Path:
    root = Path(cfg.reference_cache_dir or Path.home() / ".cache" / "simpo_exp" / "reference").expanduser()
    key = hashlib.sha256(
        (
            model_fingerprint(cfg, model, accelerator, weights)
            + "".join(f"{name}:{data_fingerprint(ds)}" for name, ds in sorted(splits.items()))
            + kernels(cfg, model, layout)
        ).encode()
    ).hexdigest()[:24]
    return root / f"ref-logps-{key}.safetensors"


class WithReference:
    """Wrap a pair collator so the batch also carries each pair's reference log-probs, looked up by its
    ``pair_index`` once ``fill`` has given them."""

    def __init__(self, collate):
        self.collate = collate
        self.chosen = self.rejected = None

    def fill(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.chosen, self.rejected = chosen.float(), rejected.float()

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        if self.chosen is None:
            raise RuntimeError("the reference log-probs are not computed yet (CachedReference.fill)")
        batch = self.collate(pairs)
        index = torch.tensor([p[REF_INDEX] for p in pairs])
        batch[REF_COLUMNS[0]], batch[REF_COLUMNS[1]] = self.chosen[index], self.rejected[index]
        return batch


class CachedReference:
    """``reference_mode=cached``: the splits given an index column, a collator per split, the cache file's
    path (from the main process's weights: under FSDP's low-memory loading the others may hold none before
    ``prepare``), and ``fill`` after ``prepare``."""

    def __init__(self, cfg: Config, model, splits: dict[str, Dataset], collate, accelerator, layout=None, weights=None):
        path = lambda: str(cache_path(cfg, model, splits, accelerator, layout, weights))  # noqa: E731
        self.path = Path(on_every(accelerator, path, "hashing the model")[0])
        self.splits = {name: ds.add_column(REF_INDEX, list(range(len(ds)))) for name, ds in splits.items()}
        self.collates = {name: WithReference(collate) for name in splits}
        self.batch_size = cfg.per_device_eval_batch_size

    def fill(self, policy, accelerator) -> None:
        """Every split's reference log-probs into its collator: read from the cache where every process can
        read it, else scored with ``policy`` (the prepared model, still at its starting weights) and cached."""
        read = {}

        def readable() -> bool:
            read["tensors"] = read_cache(self.path, self.splits)
            return read["tensors"] is not None

        if all(on_every(accelerator, self.path.exists, "looking for the reference log-prob cache")) and all(
            on_every(accelerator, readable, "reading the reference log-prob cache")
        ):
            tensors = read["tensors"]
        else:
            tensors = {}
            for name, ds in self.splits.items():
                chosen, rejected = score(policy, ds, self.collates[name].collate, self.batch_size, accelerator)
                tensors[f"{name}.chosen"], tensors[f"{name}.rejected"] = chosen, rejected
            if accelerator.is_main_process:
                write_cache(self.path, tensors)
            log.info(
                "reference log-probs computed for %s pairs on %d processes",
                {name: len(ds) for name, ds in self.splits.items()},
                accelerator.num_processes,
            )
        for name, ds in self.splits.items():
            chosen, rejected = tensors[f"{name}.chosen"], tensors[f"{name}.rejected"]
            if len(chosen) != len(ds) or len(rejected) != len(ds):
                raise RuntimeError(
                    f"{self.path}: {len(chosen)} reference log-probs for the {len(ds)} {name} pairs; "
                    "delete the file to compute them again"
                )
            self.collates[name].fill(chosen, rejected)


@torch.no_grad()
def score(policy, ds: Dataset, collate, batch_size: int, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of every pair of ``ds`` under ``policy``: (chosen [N], rejected [N]), in order.
    The batches are dealt out to the processes (simpo_exp/data/dealt.py) and gathered back in their order."""
    from accelerate.utils import gather_object, send_to_device

    batches = Dealt(ds.select_columns(MODEL_COLUMNS), collate, batch_size, accelerator.process_index,
                    accelerator.num_processes)  # fmt: skip
    mine = []
    with eval_mode(policy):
        for position, batch in batches:
            with accelerator.autocast():
                sums = policy(**send_to_device(batch, accelerator.device)).logp_sums.float().cpu()
            if position is not None:
                n = sums.shape[0] // 2
                mine.append((position, sums[:n], sums[n:]))
    every = sorted(gather_object(mine), key=lambda part: part[0])  # every process's batches, in split order
    return torch.cat([c for _, c, _ in every]), torch.cat([r for _, _, r in every])


CHECKSUM = "simpo_exp_sha256"  # the cache file's metadata: a hash of its numbers (``checksum``)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_cache(path: Path, splits: dict[str, Dataset]) -> dict[str, torch.Tensor] | None:
    """The cached log-probs of every split; None, with a warning naming the file, when it cannot be read (a
    damaged or cut-off file): they are computed again and the file rewritten."""
    try:
        tensors = load_file(path)
        missing = [
            f"{name}.{side}" for name in splits for side in ("chosen", "rejected") if f"{name}.{side}" not in tensors
        ]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        with safe_open(path, "pt") as f:
            recorded = (f.metadata() or {}).get(CHECKSUM)
        if recorded is not None and recorded != checksum(tensors):  # a file written before the checksum: as read
            raise ValueError("its numbers do not match the checksum written with them")
        bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all() and (t <= 0).all())]
        if bad:  # a sum of log-probs is finite and at most 0
            raise ValueError(f"{', '.join(bad)} hold values that are no sums of log-probs")
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        log.warning("the reference log-prob cache %s cannot be read (%s); computing them again", path, e)
        return None
    log.info("reference log-probs from cache %s", path)
    return tensors


def write_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write the cache atomically (a file of this process's own until it is complete: sweep jobs of one model
    and data may write the same cache at once); a cache that cannot be written costs the next run the
    computation, not this run its life."""
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={CHECKSUM: checksum(tensors)})
        readable_as_umask(tmp)  # a cache shared by a team's runs
        with open(tmp, "rb") as f:  # on the disk before the rename: never a renamed file missing its numbers
            os.fsync(f.fileno())
        tmp.replace(path)
        log.info("reference log-probs cached in %s", path)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning("could not cache the reference log-probs in %s (%s); this run goes on without the cache", path, e)


def shares_the_policy(model, accelerator) -> bool:
    """Whether ``reference_mode=live`` runs the policy itself with its LoRA adapters off rather than a copy: a
    PEFT model on one device or under DDP (sharded engines hold no whole model to run outside their forward)."""
    return hasattr(model, "disable_adapter") and accelerator.distributed_type.value not in ("FSDP", "DEEPSPEED")


def live_reference(model, layout: BatchLayout | None = None, share: bool = False) -> ResponseLogps:
    """The starting policy, for ``reference_mode=live``: a frozen copy, or with ``share`` (``shares_the_policy``)
    the policy itself with its LoRA adapters switched off and in eval mode for each forward, which is the
    starting model exactly (the base is frozen) without a second copy of it (16 GB for an 8B base in bf16)."""
    if not share:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return ResponseLogps.for_layout(ref, layout)
    ref = ResponseLogps.for_layout(model, layout)
    forward = ref.forward

    def adapters_off(*args, **kwargs):
        with eval_mode(model), torch.no_grad(), model.disable_adapter():
            return forward(*args, **kwargs)

    ref.forward = adapters_off
    log.info("live reference: the policy with its LoRA adapters off (no copy of the model)")
    return ref


def cast_in_place(tensors, dtype: torch.dtype) -> None:
    """Cast each floating-point tensor of ``tensors`` to ``dtype`` in place (integer buffers stay as they are)."""
    for t in tensors:
        if t.is_floating_point():
            t.data = t.data.to(dtype)


def in_the_policys_precision(reference: ResponseLogps, policy, accelerator) -> None:
    """The live reference computes as the prepared policy does. It is copied before ``prepare``, which wraps only the
    policy's forward in the run's autocast: under bf16 the policy's log-probs were bf16 sums and the reference's
    float32 ones, so the DPO family's log-ratios started off zero by their rounding (growing with the response's
    length), rewards/accuracies near 0.5 at step 0, and live and cached runs (the cache scores under the autocast)
    differed. DeepSpeed casts the policy's weights to its bf16/fp16 instead of autocasting: the copy is cast too.
    FSDP1's mixed precision casts the gathered weights to its ``param_dtype`` and the buffers (RoPE's frequencies)
    to its ``buffer_dtype`` for every forward, autocast or not: the copy is cast to them (the same rounding of the
    same float32 weights), where only the autocast left its forward in float32 weights and buffers. FSDP2's copy is
    sharded under the policy's own mixed precision (``shard_like_the_policy``)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # the weights to the engine's dtype; each buffer to the dtype the policy's engine left it in: DeepSpeed
        # 0.19 casts parameters only and keeps float32 buffers (RoPE's inv_freq), where a whole-module .to() put
        # the reference's RoPE on bf16 frequencies (up to 3.7 rad off by position 2048 at Llama-3's theta)
        cast_in_place(reference.parameters(), next(policy.parameters()).dtype)
        held = {name.removeprefix("module."): b.dtype for name, b in policy.named_buffers()}
        for name, t in reference.named_buffers():
            if name in held:
                cast_in_place([t], held[name])
    elif accelerator.distributed_type == DistributedType.FSDP and not fsdp2(accelerator):
        in_fsdp1s_precision(reference, accelerator)  # done before it went to the device: a no-op now
    forward = reference.forward

    def under_autocast(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)

    reference.forward = under_autocast


def in_fsdp1s_precision(reference: torch.nn.Module, accelerator) -> None:
    """A live reference's weights and buffers cast to FSDP1's mixed-precision ``param_dtype`` and ``buffer_dtype``
    (as FSDP1 casts the policy's for every forward): before the copy goes to the device, so that a float32 model's
    copy (as FSDP trains it) takes 2 bytes a parameter there under bf16, not 4."""
    mixed = accelerator.state.fsdp_plugin.mixed_precision_policy
    for tensors, dtype in ((reference.parameters(), "param_dtype"), (reference.buffers(), "buffer_dtype")):
        if (to := getattr(mixed, dtype, None)) is not None:
            cast_in_place(tensors, to)


def from_main_process(module: torch.nn.Module, device: torch.device) -> None:
    """Every weight and buffer of ``module`` set to the main process's, one tensor at a time through ``device``.

    With FSDP's ``cpu_ram_efficient_loading`` only the main process reads the weights; the others hold
    uninitialised ones (zeros with transformers before 5.23) until ``prepare`` broadcasts the main process's into
    the policy. The live reference, copied before ``prepare``, has no such step: each process would shard (FSDP2)
    or keep (FSDP1) its own copy, and a reference with empty weights scores every response wrong, with no error."""
    import torch.distributed as dist

    for tensor in [*module.parameters(), *module.buffers()]:
        on_device = tensor.data.to(device)
        dist.broadcast(on_device, src=0)
        tensor.data.copy_(on_device)


def shard_like_the_policy(reference: ResponseLogps, accelerator) -> None:
    """Under FSDP2, shard the live reference as the policy is sharded (each transformer layer, then the rest;
    the same mixed precision, resharded after each layer's forward): each process keeps 1/N of its weights
    instead of a whole copy, and every process runs each of its forwards together, as for the policy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = accelerator.state.fsdp_plugin.mixed_precision_policy or MixedPrecisionPolicy()
    layers = set(reference._no_split_modules or ())
    for module in list(reference.model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, mp_policy=mp_policy, reshard_after_forward=True)
    fully_shard(reference, mp_policy=mp_policy, reshard_after_forward=True)
    kept = sum(p.to_local().numel() for p in reference.parameters())
    total = sum(full_numel(p) for p in reference.parameters())
    log.info("live reference sharded like the policy (FSDP2): %d of its %d weights on each process", kept, total)
