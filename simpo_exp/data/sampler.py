"""Batches of similar lengths, for the padded layout (``hardware.group_by_length``).

Under ``packing=none`` every row of a batch is padded to the batch's longest ``prompt + response``,
so a random batch with one long pair pays for it on every row. Grouping pairs of similar length
cuts that waste without packing (which some models cannot use: Gemma 2's logit softcapping, sliding
windows). The order is transformers' ``get_length_grouped_indices``: a random permutation cut into
mega-batches of up to 50 batches, each sorted by length. Each epoch reshuffles from (seed, epoch),
so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import pyarrow.compute as pc
import torch
from torch.utils.data import Sampler


def pair_lengths(ds) -> list[int]:
    """Width of each pair's longer row in the padded layout: prompt + the longer response (read from
    the Arrow columns, without materialising the token lists)."""
    table = ds.with_format("arrow")
    prompt, chosen, rejected = (
        pc.list_value_length(table[c]) for c in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    )
    return pc.add(prompt, pc.max_element_wise(chosen, rejected)).to_pylist()


class LengthGroupedSampler(Sampler[int]):
    """Indices in a random order in which each run of ``batch_size`` has similar lengths."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    def __len__(self) -> int:
        return len(self.lengths)
