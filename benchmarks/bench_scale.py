#!/usr/bin/env python
"""Step time, tokens/s, peak memory and MFU of whole training runs, one per hardware preset.

    python benchmarks/bench_scale.py --preset gpu    # model=random-750m with hardware=gpu, zero3, gpu-lora
    python benchmarks/bench_scale.py --preset cpu    # the same harness on the tiny model (a check of it)

Each run is the real command, ``python -m simpo_exp model=... hardware=...``, in its own process, on
a generated local data set with UltraFeedback-like lengths (``benchmarks/bench_trl.py``'s generator,
written as a JSONL file and read through ``dataset=local``). The figures come from the run's own
``metrics.jsonl`` (logged every step): the medians of ``train/step_time_s``, ``train/tokens_per_s``,
``train/samples_per_s`` and ``train/mfu`` after ``--warmup`` steps, and the peaks of
``train/gpu_max_allocated_gb`` and ``train/max_rss_gb``. MFU counts the FLOPs of the layout actually
run, without gradient checkpointing's recomputation (``simpo_exp/flops.py``).

``--runs`` takes hardware presets, each optionally followed by more overrides after a colon:
``--runs gpu "gpu:hardware.packing=prefix_shared" zero3``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trl import cpu_name, generate_texts, git_commit  # noqa: E402  (the same length model as the TRL comparison; puts ROOT on the path)

from simpo_exp.rundir import read_jsonl  # noqa: E402

PRESETS = {
    "gpu": dict(
        model="random-750m",
        runs=["gpu", "zero3", "gpu-lora"],
        prompt=(130, 0.7, 50, 500),
        response=(280, 0.6, 100, 800),  # UltraFeedback-like
        batch=4,
        max_length=2048,
        max_prompt_length=1024,
        steps=25,
        warmup=5,
        overrides=[],
    ),
    "cpu": dict(
        model="tiny",
        runs=["cpu", "cpu-lora"],
        prompt=(32, 0.7, 12, 125),
        response=(70, 0.6, 25, 200),  # UltraFeedback / 4
        batch=8,
        max_length=512,
        max_prompt_length=256,
        steps=8,
        warmup=2,
        # no GPU peak to look up: MFU against a nominal 1 TFLOP/s, only to exercise the column
        overrides=["hardware.peak_tflops=1"],
    ),
}


def write_data(preset: dict, path: Path, pairs: int) -> None:
    rows = generate_texts(preset, pairs)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def command(preset: dict, run: str, data: Path, run_dir: Path) -> list[str]:
    hardware, _, extra = run.partition(":")
    args = [
        f"model={preset['model']}",
        f"hardware={hardware}",
        "dataset=local",
        f"dataset.sources.local.path={data}",
        "logger=none",
        f"max_steps={preset['steps']}",
        "logging_steps=1",
        "eval_steps=0",
        "eval_on_start=false",
        "save_steps=0",
        "save_model=false",
        "num_generations=0",
        "dataset.max_eval_samples=8",
        f"per_device_train_batch_size={preset['batch']}",
        "per_device_eval_batch_size=4",
        "gradient_accumulation_steps=1",
        "hardware.effective_batch_size=null",
        "warmup_ratio=0",
        f"max_length={preset['max_length']}",
        f"max_prompt_length={preset['max_prompt_length']}",
        "progress_bar=false",
        f"hydra.run.dir={run_dir}",
        *preset["overrides"],
        *extra.split(),
    ]
    return [sys.executable, "-m", "simpo_exp", *args]


def summarise(run_dir: Path, warmup: int) -> dict:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "train/step_time_s" in r]
    timed = [r for r in steps if r["step"] > warmup]

    def median(key):
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    def peak(key):
        values = [r[key] for r in steps if r.get(key) is not None]
        return max(values) if values else None

    env = json.loads((run_dir / "env.json").read_text())
    return {
        "steps_timed": len(timed),
        "step_time_s": median("train/step_time_s"),
        "tokens_per_s": median("train/tokens_per_s"),
        "pairs_per_s": median("train/samples_per_s"),
        "mfu": median("train/mfu"),
        "gpu_max_allocated_gb": peak("train/gpu_max_allocated_gb"),
        "max_rss_gb": peak("train/max_rss_gb"),
        "final_loss": steps[-1]["train/loss"],
        "packing": (env.get("batch_layout") or {}).get("packing"),
        "attn_implementation": env.get("attn_implementation"),
        "mixed_precision": env.get("mixed_precision"),
        "device": ", ".join(env.get("device_names") or []),
    }


def machine(threads: int | None) -> str:
    """The CPU, cores, GPU and versions of this machine (each run's env.json holds its own as well)."""
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    omp = threads or os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"{cpu_name()}, {os.cpu_count()} cores visible, OMP_NUM_THREADS {omp}; "
        f"GPU {gpu}; {platform.platform()}; python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--runs", nargs="+", help="hardware presets (with ':overrides'); default: the preset's")
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, help="steps left out of the medians")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: the machine's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="keep the run directories under this folder")
    args = parser.parse_args()

    preset = dict(PRESETS[args.preset])
    preset["steps"] = args.steps or preset["steps"]
    preset["warmup"] = args.warmup if args.warmup is not None else preset["warmup"]
    if preset["steps"] <= preset["warmup"]:
        parser.error(f"--steps {preset['steps']} leaves no step past --warmup {preset['warmup']} to time")
    runs = args.runs or preset["runs"]
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs.jsonl"
    write_data(preset, data, pairs=preset["batch"] * (preset["steps"] + 2) + 40)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results = []
    for i, run in enumerate(runs):
        run_dir = work / f"run{i}-{run.split(':')[0]}"
        cmd = command(preset, run, data, run_dir)
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            tail = res.stderr.strip().splitlines()[-1:] or ["(no output)"]
            print(f"  failed (exit {res.returncode}): {tail[0]}", flush=True)
            results.append({"run": run, "error": res.stderr[-4000:], "returncode": res.returncode})
            continue
        row = {"run": run} | summarise(run_dir, preset["warmup"])
        results.append(row)
        speed = f"{fmt(row['step_time_s'], '.3f')} s/step, {fmt(row['tokens_per_s'], '.0f')} computed tokens/s"
        print(f"  {speed}", flush=True)

    print(
        f"\npreset {args.preset}: model={preset['model']}, {preset['batch']} pairs per step, "
        f"max_length {preset['max_length']}, medians over steps {preset['warmup'] + 1}-{preset['steps']}"
    )
    # tokens/s: the tokens the layout computes (a shared prompt once), not bench_trl's response tokens/s
    header = (
        f"{'run':34} {'s/step':>7} {'comp. tok/s':>11} {'pairs/s':>8} {'MFU':>6} {'GPU GiB':>8} {'RSS GiB':>8}  layout"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['run']:34} failed (exit {r['returncode']})")
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        print(
            f"{r['run']:34} {fmt(r['step_time_s'], '7.3f')} {fmt(r['tokens_per_s'], '11.0f')} "
            f"{fmt(r['pairs_per_s'], '8.2f')} {fmt(mfu, '5.1f') + '%' if mfu is not None else '     -'} "
            f"{fmt(r['gpu_max_allocated_gb'], '8.2f')} {fmt(r['max_rss_gb'], '8.2f')}  "
            f"{r['packing']}, {r['attn_implementation']}, {r['mixed_precision']}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "preset": args.preset,
                    "config": preset | {"runs": runs, "threads": args.threads},
                    "command": " ".join(sys.argv),
                    "machine": machine(args.threads),
                    "commit": git_commit(),
                    "load_average": os.getloadavg()[0],
                    "results": results,
                },
                indent=2,
            )
        )
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
