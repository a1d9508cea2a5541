#!/usr/bin/env python
"""Building FlexAttention's block mask for one packed row: ``simpo_exp.logps.flex_block_mask`` (tiles from the
row's pieces) against torch's ``create_block_mask`` (the rule evaluated on every query-key pair).

    python benchmarks/bench_blockmask.py                 # CPU; rows of 4k to 32k tokens, UltraFeedback-like pairs
    python benchmarks/bench_blockmask.py --device cuda   # on a GPU

Each size runs in a fresh process (peak memory is per process): seconds to build (median of 3 after one
warm-up) and the peak memory the first build added (CPU: the rise of the RSS high-water mark, which also
holds the imports' first use; GPU: ``torch.cuda.max_memory_allocated``). For the packed layout the two must
mark the same tiles (a difference is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pairs_for(tokens: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) lengths, UltraFeedback-like, packed to about ``tokens`` in the packed layout."""
    import random

    rng = random.Random(seed)
    out, total = [], 0
    while total < tokens:
        p, c, r = rng.randint(50, 500), rng.randint(100, 800), rng.randint(100, 800)
        out.append((p, c, r))
        total += 2 * p + c + r
    return out


def worker(how: str, tokens: int, packing: str, device: str) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from simpo_exp.logps import flex_block_mask, row_groups, visibility

    segments = pairs_for(tokens)
    dev = torch.device(device)

    def build():
        if how == "ours":
            return flex_block_mask(segments, packing, dev)
        doc, role = (x.to(dev) for x in row_groups(segments, packing))
        return create_block_mask(visibility(doc, role), None, None, len(doc), len(doc), device=device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # memory: what the first build adds to the high-water mark (a later one cannot raise it again)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    build()
    sync()
    if dev.type == "cuda":
        extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        mask = build()
        sync()
        seconds.append(time.perf_counter() - started)
    tiles = (int(mask.kv_num_blocks.sum()), int(mask.full_kv_num_blocks.sum()))
    return {"seconds": statistics.median(seconds), "extra_mb": extra_mb, "tiles": tiles, "length": mask.seq_lengths[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", default="4096,8192,16384,32768", help="comma list of row lengths")
    ap.add_argument("--packing", default="packed", choices=["packed", "prefix_shared"])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*json.loads(args.worker))))
        return
    import torch
    from bench_trl import cpu_name, git_commit

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores visible; GPU {gpu}; python {platform.python_version()}, "
        f"torch {torch.__version__}; device {args.device}"
    )
    print(f"machine: {machine}")
    print(f"{'tokens':>7} {'builder':<18} {'ms':>9} {'extra MiB':>9} {'partial/full tiles':>19}")
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        got = {}
        for how in ("ours", "create_block_mask"):
            spec = json.dumps([how, tokens, args.packing, args.device])
            proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{tokens:>7} {how:<18} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            got[how] = json.loads(line[len("RESULT ") :])
            r = got[how]
            print(f"{r['length']:>7} {how:<18} {r['seconds'] * 1e3:9.1f} {r['extra_mb']:9.0f} {str(r['tiles']):>19}")
            rows.append({"builder": how, "packing": args.packing, **r})
        if len(got) == 2 and args.packing == "packed" and got["ours"]["tiles"] != got["create_block_mask"]["tiles"]:
            print("  tiles differ for the packed layout")
    if args.json:
        record = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
            "commit": git_commit(),
            "machine": machine,
            "device": args.device,
            "torch": torch.__version__,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
