#!/usr/bin/env python
"""FlexAttention alone on one packed row of the ``gpu`` preset's shape: the forward and the forward plus backward,
as the run calls it and under other kernel options, beside cuDNN's SDPA over the same sequences padded.

    python benchmarks/bench_flex.py --device cuda                  # batch 16, packed rows, every config
    python benchmarks/bench_flex.py --device cuda --packing prefix_shared --configs ours,safe
    python benchmarks/bench_flex.py --device cpu --batch 2 --heads 4 --kv-heads 2 --configs ours   # a smoke run

Why: on the H200 (2026-12-04, ``benchmarks/RESULTS.md``) the profile of a checkpointed batch-16 step showed
FlexAttention's forward kernel at 2.3 ms a call and its backward at 1.8 ms, where a backward usually costs about
2.5 forwards. Each config here is one change a run could make (``simpo_exp.logps.flex_attention_fn``):

- ``ours``: the run's own call (compiled with ``dynamic=True``, torch's default kernel options);
- ``static``: compiled for this row's length only (``dynamic=False``);
- ``pad128``: the row padded to a whole number of 128-token tiles and compiled for that length (inductor drops the
  kernels' edge checks only where the length is known, at compile time, to be a whole number of tiles: under
  ``dynamic=True`` it is a symbol, and the padded row would run the same kernel as ``ours``);
- ``safe``: ``ROWS_GUARANTEED_SAFE`` (every query sees at least itself, so no row needs the empty-row guard);
- ``fwd64``: forward tiles of 64 x 64 instead of the H100 default for a head width of 64 (128 x 128);
- ``sdpa-padded``: not FlexAttention: causal SDPA over the row's sequences as a padded batch (``packed`` only),
  the yardstick of what the fused kernels do with the same sequences and the padding besides;
- ``tma``: ``USE_TMA`` (Hopper's bulk tensor copies for the tiles; torch calls it experimental, so it runs last: a
  device fault leaves the process's CUDA context unusable, and the configs after it are then not measured).

Query, key and value are laid out as the model hands them over: [batch, tokens, heads, width] memory seen as
[batch, heads, tokens, width] (a transposed view, as transformers' attention modules pass them), not contiguous.

Times are CUDA-event medians after warm-up calls (the first call compiles; its wall time is printed apart).
"TFLOP/s" counts the visible (query, key) pairs only, 4 x pairs x head width x query heads for the forward and
2.5 times that for the backward, so padding and masked-out work count for nothing. On the CPU only the forward
runs (torch has no FlexAttention backward there), eagerly.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "ours": {},
    "static": {"dynamic": False},
    "pad128": {"pad": True, "dynamic": False},
    "safe": {"options": {"ROWS_GUARANTEED_SAFE": True}},
    "fwd64": {"options": {"BLOCK_M": 64, "BLOCK_N": 64}},
    "sdpa-padded": {"sdpa": True},
    "tma": {"options": {"USE_TMA": True}},
}


def pairs_for(batch: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) lengths from the ``gpu`` preset's distributions (median, lognormal sigma, min,
    max: bench_trl.PRESETS), plus the BOS and EOS tokens the collator adds."""
    from benchmarks.bench_trl import PRESETS

    rng = random.Random(seed)

    def draw(median, sigma, low, high):
        return int(min(high, max(low, rng.lognormvariate(math.log(median), sigma))))

    preset = PRESETS["gpu"]
    return [
        (draw(*preset["prompt"]) + 1, draw(*preset["response"]) + 1, draw(*preset["response"]) + 1)
        for _ in range(batch)
    ]


def visible_pairs(segments: list[tuple[int, int, int]], packing: str) -> int:
    """The (query, key) pairs the mask lets through: each sequence causally; under prefix sharing the prompt once,
    and each response its prompt plus itself causally."""
    tri = lambda n: n * (n + 1) // 2  # noqa: E731
    if packing == "packed":
        return sum(tri(p + c) + tri(p + r) for p, c, r in segments)
    return sum(tri(p) + c * p + tri(c) + r * p + tri(r) for p, c, r in segments)


def block_mask(segments: list, packing: str, device, pad: bool):
    """The run's block mask (``simpo_exp.logps.flex_block_mask``), or the same rule over a row padded to whole
    tiles: the padding tokens form one more group, so every row of the mask still sees itself."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    from simpo_exp.logps import FLEX_BLOCK, flex_block_mask, flex_tiles, row_groups, tile_table, visibility

    if not pad:
        return flex_block_mask(segments, packing, device)
    doc, role = row_groups(segments, packing)
    extra = -len(doc) % FLEX_BLOCK
    doc = torch.cat([doc, torch.full((extra,), int(doc.max()) + 1)])
    role = torch.cat([role, torch.zeros(extra, dtype=role.dtype)])
    tables = [x.to(device) for tiles in flex_tiles(doc, role, FLEX_BLOCK) for x in tile_table(tiles)]
    visible = visibility(doc.to(device), role.to(device))
    return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=FLEX_BLOCK, mask_mod=visible, seq_lengths=(len(doc),) * 2)


def timed(fn, device, warmup: int, iters: int) -> tuple[float, float]:
    """(the first call's wall seconds, the median ms of ``iters`` calls after ``warmup`` more)."""
    import torch

    cuda = device.type == "cuda"
    started = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - started
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return first, statistics.median(times)


def measure(name: str, args, segments: list) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from simpo_exp.logps import flex_attention_fn

    config, device = CONFIGS[name], torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)
    if config.get("sdpa"):
        if args.packing != "packed":
            return {"config": name, "skipped": "sdpa-padded serves packed rows only"}
        lengths = [n for p, c, r in segments for n in (p + c, p + r)]
        shape = (len(lengths), max(lengths))
    else:
        length = sum(2 * p + c + r if args.packing == "packed" else p + c + r for p, c, r in segments)
        length += -length % 128 if config.get("pad") else 0
        shape = (1, length)

    def tensor(heads):  # [batch, tokens, heads, width] memory, seen as [batch, heads, tokens, width]
        x = torch.randn(shape[0], shape[1], heads, args.head_dim, generator=gen, dtype=torch.float32)
        leaf = x.to(device=device, dtype=dtype).requires_grad_(cuda)
        return leaf, leaf.transpose(1, 2)

    (q_leaf, q), (k_leaf, k), (v_leaf, v) = tensor(args.heads), tensor(args.kv_heads), tensor(args.kv_heads)

    gqa = args.heads != args.kv_heads
    if config.get("sdpa"):
        attend = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # noqa: E731
    else:
        mask = block_mask(segments, args.packing, device, config.get("pad", False))
        if name == "ours" or not cuda:
            fn = flex_attention_fn(device)  # the run's own: compiled with dynamic=True on a GPU, eager elsewhere
        else:  # a compile of its own per config, so that no config reuses another's kernels
            fn = torch.compile(flex_attention, dynamic=config.get("dynamic", True))
        options = config.get("options")
        attend = lambda: fn(q, k, v, block_mask=mask, enable_gqa=gqa, kernel_options=options)  # noqa: E731
    out = {"config": name, "tokens": shape[0] * shape[1]}
    with torch.no_grad() if not cuda else torch.enable_grad():
        out["compile_s"], out["forward_ms"] = timed(attend, device, args.warmup, args.iters)
    if cuda:
        grad = torch.randn(attend().shape, generator=gen).to(device=device, dtype=dtype)

        def both():
            q_leaf.grad = k_leaf.grad = v_leaf.grad = None
            attend().backward(grad)

        out["backward_compile_s"], out["forward_backward_ms"] = timed(both, device, args.warmup, args.iters)
    work = 4 * visible_pairs(segments, args.packing) * args.head_dim * args.heads
    out["forward_tflops"] = work / (out["forward_ms"] * 1e-3) / 1e12
    if "forward_backward_ms" in out:
        backward_ms = out["forward_backward_ms"] - out["forward_ms"]
        out["backward_ms"] = backward_ms
        out["backward_tflops"] = 2.5 * work / (backward_ms * 1e-3) / 1e12 if backward_ms > 0 else None
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16, help="pairs in the row")
    ap.add_argument("--packing", default="packed", choices=["packed", "prefix_shared"])
    ap.add_argument("--heads", type=int, default=32, help="query heads (the gpu preset's Llama-3.2-1B shape)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: no config {', '.join(unknown)} (the configs: {', '.join(CONFIGS)})")
    import torch

    segments = pairs_for(args.batch)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    machine = f"GPU {gpu}; python {platform.python_version()}, torch {torch.__version__}; device {args.device}"
    print(f"machine: {machine}")
    print(
        f"{args.packing} row of {args.batch} pairs, {visible_pairs(segments, args.packing):,} visible pairs; "
        f"heads {args.heads}/{args.kv_heads} x {args.head_dim}"
    )
    print(f"{'config':<12} {'tokens':>7} {'compile s':>9} {'fwd ms':>8} {'TFLOP/s':>8} {'bwd ms':>8} {'TFLOP/s':>8}")
    rows = []
    from benchmarks.bench_trl import git_commit

    record = {
        "command": " ".join([Path(sys.executable).name, *(argv if argv is not None else sys.argv)]),
        "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "commit": git_commit(),
        "machine": machine,
        "segments": segments,
        "rows": rows,
    }
    names = args.configs.split(",")
    for i, name in enumerate(names):
        try:
            row = measure(name, args, segments)
        except Exception as err:  # one config's failure (an option this torch lacks) never costs the others
            row = {"config": name, "failed": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        rows.append(row)
        if args.json:  # after each config: a run cut off by its time limit keeps the configs it finished
            Path(args.json).write_text(json.dumps(record, indent=1))
        if "forward_ms" not in row:
            print(f"{name:<12} {row.get('failed') or row.get('skipped')}", flush=True)
            if "CUDA error" in row.get("failed", "") or "AcceleratorError" in row.get("failed", ""):
                # a device fault leaves this process's CUDA context unusable: every later config would fail too
                print(f"stopped: the configs after {name} ({', '.join(names[i + 1 :]) or 'none'}) not measured")
                break
            continue
        bwd = f"{row['backward_ms']:8.2f} {row['backward_tflops'] or 0:8.1f}" if "backward_ms" in row else ""
        fwd = f"{row['forward_ms']:8.2f} {row['forward_tflops']:8.1f}"
        print(f"{name:<12} {row['tokens']:>7} {row['compile_s']:9.1f} {fwd} {bwd}", flush=True)
    return rows


if __name__ == "__main__":
    main()
