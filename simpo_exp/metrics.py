"""The logging window: statistics summed over the steps since the last report, the time those steps took,
and the throughput and MFU figures made from them."""

from __future__ import annotations

import torch

from simpo_exp.tracking import PAIR_METRICS, TOKEN_METRICS, all_batch_metrics, divisor_keys


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


UNTIMED = "untimed/"  # prefix of the work sums of a window's untimed (compile) steps
SKIPPED = "skipped/"  # prefix of the work sums of a window's skipped (non-finite) steps
# what throughput reads (local_pairs: the pairs of sliding or chunked attention layers, summed over them)
WORK_KEYS = ("tokens", "pairs", "length/chosen", "length/rejected", "attention_pairs", "local_pairs")


class Window:
    """Sums of batch statistics since the last report. They stay on the device where the batch was
    computed (0-dim tensors), so adding a micro-batch's statistics never waits for the device; the
    host reads them only to log (``means``) or to checkpoint (``state``)."""

    def __init__(self, saved: dict | None = None, seconds: float = 0.0, steps: int = 0):
        self.sums: dict[str, torch.Tensor] = {k: torch.tensor(v) for k, v in (saved or {}).items()}
        self.seconds, self.steps = seconds, steps  # time in the window's training steps (not eval or saves)

    def step_done(self, stats: "Window | None", seconds: float, timed: bool = True, skipped: bool = False) -> None:
        """Close an optimizer step: add its statistics and its time. An untimed step (one that compiled:
        simpo_exp/compiled.py) counts in the means but not in the speed figures: its time is left out, and so is
        its work (summed apart under ``untimed/``). A ``skipped`` step (its gradient not finite) counts in no mean,
        but its work does, in the speed figures and ``train/num_tokens`` (summed apart under ``skipped/``): the
        step was computed, and TRL counts the tokens of every batch."""
        if stats is not None and skipped:
            self.add({f"{SKIPPED}{k}": v for k, v in stats.sums.items() if k in (*WORK_KEYS, "input_tokens")})
        elif stats is not None:
            self.add(stats.sums)
        if stats is not None:  # zeros on a timed step: each process compiles on its own (a recompile may come on
            # one process alone), and ``means`` reduces one stacked tensor of the keys held: the same keys everywhere
            self.add({f"{UNTIMED}{k}": v if not timed else v * 0 for k, v in stats.sums.items() if k in WORK_KEYS})
        if timed:
            self.seconds += seconds
            self.steps += 1

    def train_report(self, accelerator, flops, peak: float | None) -> tuple[dict[str, float], dict[str, float]]:
        """``means`` under ``train/`` plus the window's speed, memory and MFU; starts a new window."""
        metrics, totals = self.means(accelerator, "train")
        done = {k.removeprefix(SKIPPED) for k in totals if not k.startswith(UNTIMED)}  # skipped steps' work too
        timed = {
            k: totals.get(k, 0.0) + totals.get(f"{SKIPPED}{k}", 0.0) - totals.get(f"{UNTIMED}{k}", 0.0) for k in done
        }
        metrics |= throughput(timed, self.seconds, self.steps, flops, peak, accelerator)
        self.seconds, self.steps = 0.0, 0
        return metrics, totals

    def local(self) -> dict[str, float]:
        """This process's sums (a checkpoint keeps every process's: see ``restore``)."""
        return {k: float(v) for k, v in self.sums.items()}

    @classmethod
    def restore(cls, saved: list | dict, seconds: float, steps: int, accelerator) -> "Window":
        """A checkpoint's open window (``saved``: each process's sums, in rank order) for this process: its own
        sums, so that the next report adds them up exactly as the run would have. Resumed on another number of
        processes, the main process takes all of them (the same totals, summed in another order) and every other
        process zeros under the same keys: ``means`` reduces one stacked tensor of the keys each process holds, and
        a key only some steps add (a skipped step's ``skipped/*``) held by the main process alone made the reduce
        sizes differ (gloo aborted; NCCL hangs). A dict is one window (checkpoints written before every process's
        was kept)."""
        windows = saved if isinstance(saved, list) else [saved]
        if len(windows) == accelerator.num_processes:
            return cls(windows[accelerator.process_index], seconds, steps)
        merged: dict[str, float] = {k: 0.0 for window in windows for k in window}
        for window in windows if accelerator.is_main_process else []:
            for k, v in window.items():
                merged[k] += v
        return cls(merged, seconds, steps)

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()

    def means(self, accelerator, prefix: str) -> tuple[dict[str, float], dict[str, float]]:
        """(means named ``prefix/metric``, totals over all processes) of the window; empties it. A per-pair
        metric is divided by the pair count, a per-token one by its token count (tracking.divisor_keys)."""
        keys = sorted(self.sums)  # the same on every process: a step is skipped on all of them or none
        if not keys:  # every step of the window was skipped
            return {f"{prefix}/{m}": float("nan") for m in PAIR_METRICS + tuple(TOKEN_METRICS)}, {}
        stacked = torch.stack([self.sums[k].to(accelerator.device) for k in keys])  # restored sums are on the CPU
        totals = dict(zip(keys, accelerator.reduce(stacked, reduction="sum").tolist()))  # over all processes
        self.sums = {}
        means = {}
        for m in all_batch_metrics():
            if m in totals:
                by = divisor_keys(m) or ("pairs",)
                means[f"{prefix}/{m}"] = totals[m] / max(sum(totals[k] for k in by), 1.0)
        if not means:  # every step of the window was skipped: only their work was summed
            means = {f"{prefix}/{m}": float("nan") for m in PAIR_METRICS + tuple(TOKEN_METRICS)}
        return means, totals


def throughput(totals: dict, seconds: float, steps: int, flops, peak: float | None, accelerator) -> dict:
    """Speed and memory of a logging window: ``totals`` are its statistics summed over all processes."""
    import resource

    out = {"train/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if accelerator.device.type == "cuda":
        out["train/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    if not steps:  # every step of the window compiled (torch.compile's warm-up): nothing timed
        return out
    seconds = max(seconds, 1e-9)
    out["train/step_time_s"] = seconds / steps
    if not totals:  # no work summed
        return out
    out["train/tokens_per_s"] = totals["tokens"] / seconds
    out["train/samples_per_s"] = totals["pairs"] / seconds
    if peak:
        response = totals["length/chosen"] + totals["length/rejected"]
        # a window restored from a checkpoint written before local layers were counted has no local_pairs
        work = flops.step_flops(totals["tokens"], response, totals["attention_pairs"], totals.get("local_pairs", 0.0))
        out["train/mfu"] = work / seconds / (peak * accelerator.num_processes)
    return out
