#!/usr/bin/env python
"""How fast a checkpoint's files are checksummed: SHA-256 (markers before xxhash) against xxh3_128 (now).

    python benchmarks/bench_hash.py                  # a 1 GiB file in a temporary directory, 3 repeats
    python benchmarks/bench_hash.py --size-gib 4 --dir /scratch --json out.json

Each checksum is ``simpo_exp.checkpoint.file_hash``, the function saves and resumes call, over one
file of random bytes. The file is read once before timing, so it is in the page cache (as a file just
written by a save usually is): the figures are the hashing's speed plus the copy from the cache, not
the disk's. ``read only`` is the same loop with no hashing, the floor any checksum pays. The median of
``--repeats`` timings is reported, in GB/s (10^9 bytes a second).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simpo_exp.checkpoint import HASHES, file_hash  # noqa: E402


class NoHash:
    """A digest that does nothing: the reading loop alone."""

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def machine() -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "xxhash": f"{xxhash.VERSION} (libxxhash {xxhash.XXHASH_VERSION})",
        "hashlib": ssl.OPENSSL_VERSION,
    }


def write_file(path: Path, size: int, block: int = 1 << 24) -> None:
    with open(path, "wb") as f:
        for start in range(0, size, block):
            f.write(os.urandom(min(block, size - start)))


def timed(path: Path, algorithm: str, repeats: int) -> tuple[float, str]:
    times, digest = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        digest = file_hash(path, algorithm)
        times.append(time.perf_counter() - started)
    return statistics.median(times), digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the file is written (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    info = machine()
    for key, value in info.items():
        print(f"{key}: {value}")
    size = int(args.size_gib * 2**30)
    HASHES["read only"] = NoHash  # the loop with no hashing, timed through the same function
    results = {}
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            path = Path(tmp) / "blob.bin"
            write_file(path, size)
            file_hash(path, "read only")  # into the page cache
            print(f"\nfile: {size:,} bytes, median of {args.repeats}")
            print(f"{'checksum':<10} {'seconds':>8} {'GB/s':>7}")
            for algorithm in ("read only", "sha256", "xxh3_128"):
                seconds, digest = timed(path, algorithm, args.repeats)
                results[algorithm] = {"seconds": seconds, "gb_per_s": size / seconds / 1e9, "digest": digest}
                print(f"{algorithm:<10} {seconds:8.3f} {size / seconds / 1e9:7.2f}")
    finally:
        del HASHES["read only"]
    speedup = results["sha256"]["seconds"] / results["xxh3_128"]["seconds"]
    print(f"\nxxh3_128 is {speedup:.1f}x as fast as sha256 here")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "bytes": size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
