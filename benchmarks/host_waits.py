"""Where a training micro-batch makes the host wait for the device, per batch layout: counted, not timed.

Each layout's forward, loss and backward run on the ``meta`` device under the dispatch mode of
tests/test_host_waits.py, which records every operation that would make the host wait for a GPU (a value read,
an output sized by data, a blocking copy from host memory) with the line that asked for it. The table splits
this project's own from the libraries' (transformers, Liger). FlexAttention does not run on meta: a stand-in
of the same shape takes its place, so the block mask's construction is counted and the kernel is not.

    python benchmarks/host_waits.py
"""

from __future__ import annotations

import collections
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = [("none", "segments"), ("packed", "segments"), ("prefix_shared", "segments"), ("packed", "flex")]


class Patch:
    """The two calls of pytest's monkeypatch that ``step_on_meta`` makes, kept for the process."""

    def setattr(self, owner, name, value):
        setattr(owner, name, value)


def main() -> None:
    import torch

    from simpo_exp.fused import LigerPreferenceHead
    from tests.test_host_waits import step_on_meta

    print(f"torch {torch.__version__}, Python {platform.python_version()}; SimPO with sft_weight 0.5\n")
    print("| layout | head | this project's | libraries' | where (libraries) |\n|---|---|---|---|---|")
    for packing, attention in LAYOUTS:
        for fused in (False, True):
            head = None
            if fused:
                if attention == "flex":
                    continue
                head = LigerPreferenceHead("simpo", beta=2.0, gamma=1.0, label_smoothing=0.0, sft_weight=0.5)
                head.compiled, head.split_cost = False, 0  # eager Liger, split wherever a call saves padding
            waits, _ = step_on_meta(Patch(), packing, attention, fused=head, sft_weight=0.5)
            ours = len(waits.ours())
            libs = collections.Counter(where.split("site-packages/")[-1] for _, where in waits.waits)
            libs = {k: v for k, v in libs.items() if not k.startswith(str(Path(__file__).resolve().parents[1]))}
            where = ", ".join(f"{k} x{v}" for k, v in sorted(libs.items())) or "-"
            print(
                f"| {packing}/{attention} | {'liger' if fused else 'plain'} | {ours} | {sum(libs.values())} | {where} |"
            )


if __name__ == "__main__":
    main()
