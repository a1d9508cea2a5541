"""Reference log-probs for the reference-based baselines (DPO, LN-DPO, IPO, R-DPO).

The reference model is the policy as it starts. Rather than keep a second model in memory for
the whole run, its summed response log-probs are computed once, before training, and cached on
disk under a key made of the model's identity, its initial weights, and the exact token ids of
both splits: a changed model, data set or tokenisation never reuses stale numbers. They travel
with each pair as two extra columns. ``reference_mode=live`` keeps a frozen copy instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import pyarrow.compute as pc
import torch
from accelerate.utils import send_to_device
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from simpo_exp.config import Config
from simpo_exp.data import MODEL_COLUMNS
from simpo_exp.engine import on_every
from simpo_exp.layout import BatchLayout
from simpo_exp.logps import ResponseLogps

log = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def data_fingerprint(ds: Dataset) -> str:
    """Hash of the token ids of every pair, in order."""
    h = hashlib.sha256()
    for batch in ds.select_columns(MODEL_COLUMNS).with_format("arrow").iter(batch_size=8192):
        for name in MODEL_COLUMNS:
            col = batch[name]
            h.update(pc.list_value_length(col).to_numpy(zero_copy_only=False).tobytes())
            h.update(pc.list_flatten(col).to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


def model_fingerprint(cfg: Config, model) -> str:
    params = list(model.parameters())
    h = hashlib.sha256(
        json.dumps(
            {
                "path": cfg.model.path,
                "revision": cfg.model.revision,
                "dtype": cfg.model.dtype,
                "n": sum(p.numel() for p in params),
            }
        ).encode()
    )
    for p in (params[0], params[-1]):  # the initial weights themselves (a random tiny model differs by seed)
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_path(cfg: Config, model, splits: dict[str, Dataset]) -> Path:
    root = Path(cfg.reference_cache_dir or Path.home() / ".cache" / "simpo_exp" / "reference").expanduser()
    key = hashlib.sha256(
        (
            model_fingerprint(cfg, model)
            + "".join(f"{name}:{data_fingerprint(ds)}" for name, ds in sorted(splits.items()))
        ).encode()
    ).hexdigest()[:24]
    return root / f"ref-logps-{key}.safetensors"


@torch.no_grad()
def compute(
    model, ds: Dataset, collate, batch_size: int, device, autocast, layout: BatchLayout | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of every pair under ``model``: (chosen [N], rejected [N])."""
    scorer = ResponseLogps.for_layout(model, layout).to(device).eval()
    loader = DataLoader(ds.select_columns(MODEL_COLUMNS), batch_size=batch_size, collate_fn=collate)
    chosen, rejected = [], []
    for batch in loader:
        with autocast():
            out = scorer(**send_to_device(batch, device))
        n = out.logp_sums.shape[0] // 2
        chosen.append(out.logp_sums[:n].float().cpu())
        rejected.append(out.logp_sums[n:].float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def attach_reference_logps(
    cfg: Config, model, splits: dict[str, Dataset], collate, accelerator, layout: BatchLayout | None = None
) -> dict[str, Dataset]:
    """Add the two reference columns to each split, from the cache when every process can read it, else
    computed and cached. Each process computes a contiguous share of every split and the shares are
    gathered in order, so N processes take 1/N of the time, and none waits at a collective for a
    process scoring the whole data set alone (long enough, for a 7B model, to pass the collective timeout)."""
    path = cache_path(cfg, model, splits)
    if all(on_every(accelerator, path.exists, "looking for the reference log-prob cache")):
        tensors = load_file(path)
        log.info("reference log-probs from cache %s", path)
    else:
        rank, world = accelerator.process_index, accelerator.num_processes

        def share() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            return {
                name: compute(
                    model,
                    ds.shard(num_shards=world, index=rank, contiguous=True),
                    collate,
                    cfg.per_device_eval_batch_size,
                    accelerator.device,
                    accelerator.autocast,
                    layout,
                )
                for name, ds in splits.items()
            }

        shares = on_every(accelerator, share, "computing reference log-probs")
        tensors = {}
        for name in splits:
            for i, side in enumerate(("chosen", "rejected")):
                tensors[f"{name}.{side}"] = torch.cat([s[name][i] for s in shares])
        if accelerator.is_main_process:
            write_cache(path, tensors)
        log.info(
            "reference log-probs computed for %s pairs (shares of %s processes: %s)",
            {k: len(v) for k, v in splits.items()},
            world,
            [len(s["train"][0]) for s in shares],
        )
    return {
        name: ds.add_column(REF_COLUMNS[0], tensors[f"{name}.chosen"].tolist()).add_column(
            REF_COLUMNS[1], tensors[f"{name}.rejected"].tolist()
        )
        for name, ds in splits.items()
    }


def write_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write the cache atomically; a cache that cannot be written costs the next run the computation, not
    this run its life."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp))
        tmp.replace(path)
        log.info("reference log-probs cached in %s", path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("could not cache the reference log-probs in %s (%s); this run goes on without the cache", path, e)


class WithReference:
    """Wrap a pair collator so the batch also carries the pairs' cached reference log-probs."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collate(pairs)
        for key in REF_COLUMNS:
            batch[key] = torch.tensor([p[key] for p in pairs], dtype=torch.float32)
        return batch


def live_reference(model, layout: BatchLayout | None = None) -> ResponseLogps:
    """A frozen copy of the starting policy, for ``reference_mode=live``."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ResponseLogps.for_layout(ref, layout)
