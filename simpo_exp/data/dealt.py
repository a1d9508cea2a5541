"""A split dealt to the processes in whole batches, for evaluation and reference scoring: every pair counted once.

The split is cut into batches of ``batch_size`` pairs in order (the last one short) and process ``p`` of ``P``
takes batches ``p, p + P, ...``. Engines that gather sharded weights during a forward (ZeRO-3, FSDP) need
every process to run as many forwards, so a process with one batch fewer than the others runs a repeat of
one of its batches, marked as not counted. A padded loader (accelerate's ``even_batches``) would count its
repeated pairs in the sums instead.
"""

from __future__ import annotations

from torch.utils.data import DataLoader


def deal(n: int, batch_size: int, process: int, processes: int) -> tuple[list[list[int]], list[int]]:
    """(this process's batches as row indices, repeats last; the split positions of the counted ones)."""
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    positions = list(range(process, len(batches), processes))
    rounds = -(-len(batches) // processes)
    mine = [batches[k] for k in positions]
    repeat = mine[0] if mine else batches[0]
    return mine + [repeat] * (rounds - len(mine)), positions


class Dealt:
    """This process's share of ``dataset``: iterating yields ``(position, batch)``, ``position`` being the
    batch's index in the split, or None for a repeat whose results must not count. Batches stay on the CPU."""

    def __init__(self, dataset, collate, batch_size: int, process: int = 0, processes: int = 1):
        self.batches, self.positions = deal(len(dataset), batch_size, process, processes)
        self.loader = DataLoader(dataset, batch_sampler=self.batches, collate_fn=collate)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        positions = self.positions + [None] * (len(self.batches) - len(self.positions))
        yield from zip(positions, self.loader, strict=True)
