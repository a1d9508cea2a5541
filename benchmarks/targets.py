"""Issue 17's GPU targets, read off the side-by-side benchmark's JSON files (``bench_trl.py --json``).

    python benchmarks/targets.py bench-b4.json bench-b16.json [--markdown targets.md]

For each file (one per batch size): our fastest run against TRL's pairs/s (target >= 2x), the padded
layout (``plain``, target >= 1.1x), the peak GPU memory of the fastest and of the leanest run against TRL's
(target <= 0.5x), the fastest run's MFU (target >= 35% at a realistic batch such as 16), and whether TRL
ran out of memory at a batch where one of ours ran (a TRL run cut off by a time limit counts for nothing).
Where our fastest run drops gradient checkpointing (``+nockpt``) and TRL was timed without it too
(``--trl-nockpt``), the speed target is also read against that TRL run.
Then which layout ``packing=auto`` would keep on this GPU: the fastest of the plain, prefix-shared and
packed runs without extra options (a chunked head, Liger or compile are separate switches). Every figure
is the benchmark's own; nothing here is measured. ``gpu_check.sh`` appends the table to its summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from benchmarks.bench_trl import TRL_NO_CHECKPOINTING, VARIANTS, paired_ratio, split_variant, trl_like  # noqa: E402  (only the standard library at its top)

SPEED, PADDED_SPEED, MEMORY, MFU = 2.0, 1.1, 0.5, 0.35
# the benchmark's variants that are layouts packing=auto chooses among: no chunked or fused head, and not the
# 4D-mask attention, which auto never picks (+compile variants are not in VARIANTS)
LAYOUTS = {
    name: v["packing"] if v["packing"] == "none" else f"{v['packing']} ({v['attention']})"
    for name, v in VARIANTS.items()
    if v["chunk_size"] == 0 and "fused" not in v and v["attention"] != "mask"
}


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def speedup(result: dict, row: dict, ref: dict) -> float:
    """How many times ``ref``'s pairs/s ``row`` runs: step by step on the same batches (``bench_trl.paired_ratio``)
    where the JSON holds the runs' step times, else (an older file) the ratio of the two medians."""
    runs, warmup = result.get("runs", {}), result.get("config", {}).get("warmup", 0)
    if row["name"] in runs and ref["name"] in runs:
        x = paired_ratio(runs[row["name"]], runs[ref["name"]], warmup)
        if x:
            return x
    return row["pairs_per_s"] / ref["pairs_per_s"]


def assess(result: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows for one benchmark JSON (one batch size)."""
    rows = {r["name"]: r for r in result.get("rows", [])}
    batch = result.get("config", {}).get("batch", "?")
    trl = rows.pop("TRL", None)
    trl_free = rows.pop(TRL_NO_CHECKPOINTING, None)  # bench_trl.py --trl-nockpt: TRL without gradient checkpointing
    out = []
    if not rows:
        return [(f"batch {batch}", "no run of ours measured", verdict(None))]
    mem = "peak_cuda_mb" if all("peak_cuda_mb" in r for r in rows.values()) else "peak_rss_mb"
    fastest = lambda group: max(group, key=lambda r: r["pairs_per_s"], default=None)  # noqa: E731
    # for MFU, which counts the work done whatever the checkpointing: the fastest by the same step-by-step ratio to
    # TRL as the speed rows (by the medians alone it could name another run than they do)
    overall = max(rows.values(), key=lambda r: speedup(result, r, trl)) if trl else fastest(rows.values())
    # like with like (bench_trl.trl_like): runs that checkpoint every layer against TRL with checkpointing, runs
    # without (+nockpt) against TRL without it (--trl-nockpt), partial checkpointing (+ckpt2, +ckpt4) against
    # neither; a run set against a TRL that recomputes more would be credited with the recomputation it skips
    checkpointing = result.get("config", {}).get("gradient_checkpointing", True)
    against = lambda ref, group: max(group, key=lambda r: speedup(result, r, ref), default=None)  # noqa: E731
    like = lambda kind: [r for name, r in rows.items() if trl_like(name, checkpointing) == kind]  # noqa: E731
    best = against(trl, like("TRL")) if trl else fastest(like("TRL"))
    best_free = against(trl_free, like(TRL_NO_CHECKPOINTING)) if trl_free else None
    # memory like with like too: a +offload run keeps its checkpointed inputs in host memory, which the GPU's peak
    # does not count, and TRL could offload them as well (Trainer's gradient_checkpointing_kwargs)
    leanest = min(like("TRL"), key=lambda r: r[mem], default=None)
    if trl and best:
        x = speedup(result, best, trl)
        out.append((f"batch {batch}: best pairs/s >= {SPEED}x TRL", f"{best['name']} {x:.2f}x", verdict(x >= SPEED)))
        if "plain" in rows:
            x = speedup(result, rows["plain"], trl)
            out.append((f"batch {batch}: padded >= {PADDED_SPEED}x TRL", f"plain {x:.2f}x", verdict(x >= PADDED_SPEED)))
        for label, r in (("fastest", best), ("leanest", leanest or best)):
            x = r[mem] / trl[mem]
            out.append(
                (
                    f"batch {batch}: peak memory ({label}) <= {MEMORY}x TRL",
                    f"{r['name']} {x:.2f}x",
                    verdict(x <= MEMORY),
                )
            )
    elif result.get("failures", {}).get("TRL") == "out of memory":
        out.append(
            (
                f"batch {batch}: runs in one micro-batch where TRL does not",
                f"TRL out of memory; {overall['name']} ran",
                "met",
            )
        )
    elif "TRL" in result.get("missing", []):  # cut off, or failed for another reason: no comparison
        why = result.get("failures", {}).get("TRL", "not reached")
        out.append((f"batch {batch}: against TRL", f"TRL not measured ({why})", verdict(None)))
    if trl_free and best_free:
        x = speedup(result, best_free, trl_free)
        out.append(
            (
                f"batch {batch}: best pairs/s >= {SPEED}x TRL, both without checkpointing"
                + (
                    f" (TRL in {k} micro-batches a step)"
                    if (k := result.get("config", {}).get("trl_nockpt_accumulation"))
                    else ""
                ),
                f"{best_free['name']} {x:.2f}x",
                verdict(x >= SPEED),
            )
        )
    elif trl and result.get("failures", {}).get(TRL_NO_CHECKPOINTING) == "out of memory" and like(TRL_NO_CHECKPOINTING):
        # TRL without checkpointing does not fit this batch in one micro-batch on this GPU: its checkpointed run is
        # the fastest TRL measured here, and a run of ours that fits without checkpointing is what this tool offers
        # at that batch. Not measured: TRL without checkpointing on half the batch with two accumulation steps (the
        # same gradient for a mean loss), which may be faster than its checkpointed run. A row of its own, named
        # so, and no verdict: the target is like with like (the rows above, and TRL with accumulation when run).
        free = against(trl, like(TRL_NO_CHECKPOINTING))
        x = speedup(result, free, trl)
        out.append(
            (
                f"batch {batch}: best pairs/s >= {SPEED}x TRL's fastest measured that fits one micro-batch "
                "(TRL without checkpointing: out of memory; with accumulation: not measured)",
                f"{free['name']} {x:.2f}x TRL with checkpointing, at {free[mem] / trl[mem]:.2f}x its peak memory",
                verdict(None),
            )
        )
    if "mfu" in overall:
        # TRL's MFU counts the prompt twice, as TRL runs it; a prefix-shared run's counts it once (the work it does).
        # Both count useful work: tokens, not padding, through the body and response tokens through the head. TRL
        # also runs its padding through both and its prompt positions through the head (about 1.9x the FLOPs it
        # is credited with on the gpu preset's batches): its MFU by the work it executes is higher.
        once = VARIANTS.get(split_variant(overall["name"])[0], {}).get("packing") == "prefix_shared"
        twice = ", prompt counted twice" if once else ""
        theirs = f" (TRL {trl['mfu']:.1%} of useful work{twice})" if trl and "mfu" in trl else ""
        measured = f"{overall['name']} {overall['mfu']:.1%}{', prompt counted once' if once else ''}{theirs}"
        out.append((f"batch {batch}: MFU of the fastest >= {MFU:.0%}", measured, verdict(overall["mfu"] >= MFU)))
    layouts = [r for name, r in rows.items() if name in LAYOUTS]
    if layouts:
        if trl:  # each against TRL on the same batches
            pick = max(layouts, key=lambda r: speedup(result, r, trl))
            ranked = sorted(layouts, key=lambda r: r["name"])
            times = "x TRL: " + ", ".join(f"{r['name']} {speedup(result, r, trl):.2f}" for r in ranked)
        else:
            pick = max(layouts, key=lambda r: r["pairs_per_s"])
            ranked = sorted(layouts, key=lambda r: r["name"])
            times = "pairs/s: " + ", ".join(f"{r['name']} {r['pairs_per_s']:.2f}" for r in ranked)
        out.append((f"batch {batch}: packing=auto would keep", f"{LAYOUTS[pick['name']]} ({times})", ""))
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| target (issue 17) | measured | |", "|---|---|---|"]
    for result in results:
        lines += [f"| {t} | {m} | {v} |" for t, m, v in assess(result)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="bench_trl.py --json files (a missing one is skipped)")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    results, unreadable = [], []
    for f in (f for f in args.files if Path(f).is_file()):
        try:
            results.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as e:  # a part killed while writing it: the others are still assessed
            unreadable.append(f"{f} ({type(e).__name__}: {e})")
    text = markdown(results) if results else "no benchmark results to assess\n"
    text += "".join(f"\nunreadable, left out: {u}\n" for u in unreadable)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
