"""Time and host memory of the start-up tokenisation report (simpo_exp.data.report) at UltraFeedback's size.

Every process of a run builds the report over the tokenised splits. This builds a data set of the shape the report
reads (60k pairs by default, prompt ~90 and responses ~270 tokens, lognormal, ids from a 128k vocabulary, every
response closed by the EOS id) and times the report in a fresh process, printing its wall time and the rise in
peak RSS it caused (the data set is built and saved first, then read memory-mapped by the measuring process, as
a run reads its tokenised cache). Run it at two commits to compare:

    python benchmarks/bench_report.py --pairs 60000
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(pairs: int, seed: int = 0):
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed)

    def rows(mean: float, eos: int | None):
        lengths = np.clip(rng.lognormal(np.log(mean), 0.6, pairs).astype(int), 2, 2600)
        out = [rng.integers(300, 128000, n).tolist() for n in lengths]
        if eos is not None:
            for r in out:
                r[-1] = eos
        return out

    return Dataset.from_dict(
        {
            "prompt_input_ids": [[1] + r for r in rows(90, None)],
            "chosen_input_ids": rows(270, 2),
            "rejected_input_ids": rows(270, 2),
            "chosen_truncated": [False] * pairs,
            "rejected_truncated": [False] * pairs,
            "prompt_tokens_moved": [0] * pairs,
        }
    )


def peak_rss_kib() -> int:
    """This process's peak RSS: /proc's VmHWM where there is one (getrusage's ru_maxrss survives exec on Linux, and
    would report the parent's peak, which building the data set set), else getrusage's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(path: str) -> dict:
    from types import SimpleNamespace

    import datasets
    import torch

    from simpo_exp.config import DatasetConfig
    from simpo_exp.data import report

    ds = datasets.load_from_disk(path)
    tokenizer = SimpleNamespace(
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        bos_token="<s>",
        decode=lambda ids: "x",
        convert_ids_to_tokens=lambda ids: [str(i) for i in ids],
    )
    report.end_token_ids = lambda tok: {2}  # the stand-in tokenizer has no special-token table
    report.chat_template_hash = lambda tok: "-"
    before = peak_rss_kib()
    started = time.perf_counter()
    out = report.tokenization_report({"train": ds}, tokenizer, DatasetConfig())
    seconds = time.perf_counter() - started
    rise = (peak_rss_kib() - before) / 1024
    return {
        "pairs": len(ds),
        "seconds": round(seconds, 2),
        "peak_rss_rise_mib": round(rise, 1),
        "bos_per_sequence": out["splits"]["train"]["bos_per_sequence"],
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "datasets": datasets.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=60000)
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # the measuring process: a saved data set's folder
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    with tempfile.TemporaryDirectory() as folder:
        build(args.pairs).save_to_disk(folder)
        done = subprocess.run([sys.executable, __file__, "--measure", folder], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    record = {"command": " ".join(sys.argv)} | json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
