"""Where a training step's time goes, from a torch.profiler trace (``bench_trl.py --profile``).

A step can be slow because the device computes a lot (large kernels: the fix is less work), or because the
device waits for the host (many small kernels, host-device synchronisations: the fix is fewer launches).
The trace tells them apart: per profiled step it gives the time the GPU ran at least one kernel (the union
of the kernels' intervals), the kernels launched, the synchronisations and copies the host waited on, and
the kernels that took the most time. On a CPU-only machine there are no kernels: the counts are zero and
only the operator count means something.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

# CUDA runtime calls in which the host waits for the device
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPY_CALLS = ("cudaMemcpy", "cudaMemcpyAsync")


class StepProfiler:
    """Profile steps ``skip + 1 .. skip + count`` of a loop; call ``step_done()`` after every step."""

    def __init__(self, device: str, skip: int, count: int):
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.skip, self.count, self.done, self.state = skip, count, 0, "waiting"
        if skip == 0:
            self._start()

    def _start(self) -> None:
        self.profiler.start()
        self.state = "running"

    def step_done(self) -> None:
        self.done += 1
        if self.state == "waiting" and self.done == self.skip:
            self._start()
        elif self.state == "running" and self.done == self.skip + self.count:
            self.profiler.stop()
            self.state = "stopped"

    def summary(self, step_seconds: list[float]) -> dict | None:
        """``trace_summary`` of the profiled steps (None if the loop ended before they were all run);
        ``step_seconds``: every step's wall time, as the loop measured it."""
        if self.state != "stopped":
            return None
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            self.profiler.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f)
        finally:
            os.unlink(path)
        return trace_summary(trace, step_seconds[self.skip : self.skip + self.count])


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: time in which at least one kernel ran."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def trace_summary(trace: dict, step_seconds: list[float], top: int = 8) -> dict:
    """Per-step figures from a Chrome trace that torch.profiler exported over ``len(step_seconds)`` steps."""
    steps = max(1, len(step_seconds))
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    runtime = [e["name"] for e in events if e.get("cat") == "cuda_runtime"]
    by_name: dict[str, list[float]] = defaultdict(list)
    for k in kernels:
        by_name[k["name"]].append(float(k["dur"]))
    slowest = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    wall_ms = 1e3 * sum(step_seconds) / steps
    gpu_ms = busy_us([(float(k["ts"]), float(k["ts"]) + float(k["dur"])) for k in kernels]) / 1e3 / steps
    return {
        "steps": len(step_seconds),
        "wall_ms_per_step": wall_ms,
        "gpu_busy_ms_per_step": gpu_ms,
        "gpu_busy_share": gpu_ms / wall_ms if kernels and wall_ms else None,  # None: no GPU in the trace
        "kernels_per_step": len(kernels) / steps,
        "syncs_per_step": sum(n in SYNC_CALLS for n in runtime) / steps,
        "copies_per_step": sum(n in COPY_CALLS for n in runtime) / steps,
        "cpu_ops_per_step": sum(e.get("cat") == "cpu_op" for e in events) / steps,
        "top_kernels": [
            {"name": name[:90], "ms_per_step": sum(d) / 1e3 / steps, "calls_per_step": len(d) / steps}
            for name, d in slowest
        ],
    }


def markdown(rows: dict[str, dict], where: str) -> str:
    """The summaries of several runs (name -> ``trace_summary``, or ``{"error": ...}``) as markdown."""
    lines = [
        f"profile, {where}",
        "",
        "| run | wall ms/step | GPU busy ms/step | busy share | kernels/step | syncs/step | copies/step | ops/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in rows.items():
        if "error" in s:
            lines.append(f"| {name} | {s['error']} | | | | | | |")
            continue
        share = f"{100 * s['gpu_busy_share']:.0f}%" if s["gpu_busy_share"] is not None else ""
        lines.append(
            f"| {name} | {s['wall_ms_per_step']:.1f} | {s['gpu_busy_ms_per_step']:.1f} | {share} | "
            f"{s['kernels_per_step']:.0f} | {s['syncs_per_step']:.1f} | {s['copies_per_step']:.1f} | "
            f"{s['cpu_ops_per_step']:.0f} |"
        )
    for name, s in rows.items():
        if s.get("top_kernels"):
            lines += ["", f"{name}: the kernels that took the most time", "", "| kernel | ms/step | calls/step |"]
            lines.append("|---|---|---|")
            lines += [
                f"| `{k['name']}` | {k['ms_per_step']:.2f} | {k['calls_per_step']:.0f} |" for k in s["top_kernels"]
            ]
    return "\n".join(lines) + "\n"
