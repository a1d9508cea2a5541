"""Length-grouped batches: a permutation per epoch, less padding, and an exact resume position."""

import random

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from simpo_exp.data import PairCollator
from simpo_exp.data.sampler import LengthGroupedSampler, pair_lengths


def pairs_dataset(n: int = 400, seed: int = 0) -> Dataset:
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(5, 250) for _ in range(k)]

    rows = [
        {
            "prompt_input_ids": ids(rng.randint(2, 40)),
            "chosen_input_ids": ids(rng.randint(1, 120)),
            "rejected_input_ids": ids(rng.randint(1, 120)),
        }
        for _ in range(n)
    ]
    return Dataset.from_list(rows)


def test_pair_lengths_are_the_longer_padded_row():
    ds = pairs_dataset(20).shuffle(seed=3)  # through an indices mapping, as after a split
    expected = [len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in ds]
    assert pair_lengths(ds) == expected


def test_each_epoch_is_a_permutation_reshuffled_from_seed_and_epoch():
    lengths = pair_lengths(pairs_dataset())
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(len(lengths))) and list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == sorted(first) and second != first
    assert list(LengthGroupedSampler(lengths, 8, seed=1)) == first  # a new process, same seed: same order


def test_the_loaders_length_is_the_batches_it_yields():
    """The epoch, the schedule and the resume position are sized from len(train_loader), which under drop_last
    comes from len(sampler): at 96 pairs in batches of 8, one pair short of a length would have been 11 batches
    counted for 12 yielded (at 100 pairs, where the tests ran, 99 // 8 and 100 // 8 agree)."""
    ds = pairs_dataset(96)
    sampler = LengthGroupedSampler(pair_lengths(ds), 8, seed=0)
    assert len(sampler) == len(list(sampler)) == 96
    loader = DataLoader(ds, batch_size=8, drop_last=True, sampler=sampler, collate_fn=PairCollator(0))
    assert len(loader) == len(list(loader)) == 12


def padded_tokens(loader) -> int:
    return sum(b["input_ids"].numel() for b in loader)


def test_grouping_cuts_the_padding_of_the_padded_layout():
    ds = pairs_dataset()
    collate = PairCollator(0)
    random_order = DataLoader(
        ds, batch_size=8, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0)
    )
    grouped = DataLoader(
        ds, batch_size=8, sampler=LengthGroupedSampler(pair_lengths(ds), 8, seed=0), collate_fn=collate
    )
    real = sum(b["attention_mask"].sum().item() for b in grouped)
    assert real == sum(b["attention_mask"].sum().item() for b in random_order)  # the same pairs
    assert padded_tokens(grouped) < 0.8 * padded_tokens(random_order)
    # A pair's two rows always share a width (its longer row): the least any order can pad to.
    # Here: 85296 padded tokens grouped, 110736 in random order, 81126 at that bound.
    bound = sum(2 * n for n in pair_lengths(ds))
    assert padded_tokens(grouped) < 1.1 * bound


def test_resume_position_is_exact_across_epochs():
    """The loop's data position (simpo_exp.train.forever) with this sampler behind accelerate's loader:
    starting after k micro-batches gives exactly the batches a run without a stop saw from k on."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from simpo_exp.train import forever

    ds = pairs_dataset(96)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    loader = accelerator.prepare(
        DataLoader(
            ds,
            batch_size=8,
            drop_last=True,
            collate_fn=PairCollator(0),
            sampler=LengthGroupedSampler(pair_lengths(ds), 8, seed=5),
        )
    )
    per_epoch = len(loader)  # 12
    whole = forever(loader, accelerator)
    seen = [next(whole)["input_ids"] for _ in range(3 * per_epoch)]
    for k in (5, per_epoch + 3):
        resumed = forever(loader, accelerator, consumed=k)
        for i in range(k, k + per_epoch):
            assert torch.equal(next(resumed)["input_ids"], seen[i]), (k, i)


def test_a_resumed_epoch_keeps_the_loaders_non_blocking_copies():
    """accelerate's skip_first_batches builds a new loader without the copy mode: after a mid-epoch resume on a
    GPU, the rest of the epoch was copied with the host waiting for each batch."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from simpo_exp.train import forever

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(non_blocking=True))
    loader = accelerator.prepare(DataLoader(list(range(16)), batch_size=2, drop_last=True))
    made, skip = [], accelerator.skip_first_batches
    accelerator.skip_first_batches = lambda dl, n: made.append(skip(dl, n)) or made[-1]
    assert next(forever(loader, accelerator, consumed=3)).tolist() == [6, 7]
    assert loader._non_blocking is True and made[0]._non_blocking is True


def test_an_epoch_ends_at_its_last_whole_optimizer_step():
    """num_train_epochs=1 with 12 micro-batches an epoch and 5 per step: 2 steps of 10, the last 2 micro-batches
    left out (as HF Trainer's len // accum steps an epoch) instead of a third step that would see 3 micro-batches
    of the next epoch again; the next epoch starts with its own first batch; a resume mid-epoch lands in place."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from simpo_exp.config import Config
    from simpo_exp.train import epoch_batches, forever, total_steps

    assert (epoch_batches(12, 5), epoch_batches(12, 4), epoch_batches(3, 5)) == (10, 12, 3)  # < one step: all
    cfg = Config.__new__(Config)
    cfg.max_steps, cfg.num_train_epochs = -1, 1.0
    assert total_steps(cfg, 12, 5) == 2
    cfg.num_train_epochs = 2.5
    assert total_steps(cfg, 12, 5) == 5
    cfg.num_train_epochs = 1.5  # 4.5 steps: the half step is taken (HF Trainer's ceil)
    assert total_steps(cfg, 12, 4) == 5

    ds = pairs_dataset(96)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    loader = accelerator.prepare(DataLoader(ds, batch_size=8, drop_last=True, collate_fn=PairCollator(0), shuffle=True))
    full = forever(loader, accelerator)  # whole epochs of 12
    epochs = [[next(full)["input_ids"] for _ in range(12)] for _ in range(3)]
    assert not all(torch.equal(a, b) for a, b in zip(*epochs[:2]))  # each epoch its own order
    used = forever(loader, accelerator, per_epoch=10)
    seen = [next(used)["input_ids"] for _ in range(30)]
    assert all(torch.equal(a, b) for a, b in zip(seen, epochs[0][:10] + epochs[1][:10] + epochs[2][:10]))
    resumed = forever(loader, accelerator, consumed=13, per_epoch=10)  # and on into the next epoch
    assert all(torch.equal(next(resumed)["input_ids"], seen[i]) for i in range(13, 30))
    before = len(accelerator.gradient_state.dataloader_references)
    for _ in range(50):  # five more epochs: each left early is taken off accelerate's record of open iterations
        next(used)
    assert len(accelerator.gradient_state.dataloader_references) <= before + 1


def test_a_checkpoint_from_before_whole_step_epochs_resumes_only_where_the_rules_agree():
    """A checkpoint written when an epoch counted every micro-batch holds a data position and a schedule length of
    that rule: resumed where the rules differ (16 micro-batches, accumulation 3: 15 used now) it is refused by
    name; where they agree (accumulation 4), and for checkpoints that record their rule, it resumes."""
    from simpo_exp.checkpoint import CheckpointError, TrainState
    from simpo_exp.train import same_epochs

    with pytest.raises(CheckpointError, match="counted 16 micro-batches an epoch, this version 15"):
        same_epochs(TrainState(step=6), 15, 16)
    assert same_epochs(TrainState(step=6), 16, 16) == 16  # the same under both rules
    assert same_epochs(TrainState(step=6, epoch_batches=15), 15, 16) == 15
    assert same_epochs(TrainState(), 15, 16) == 15  # a fresh start
    with pytest.raises(CheckpointError, match="counted 12 micro-batches"):  # a recorded rule of another length
        same_epochs(TrainState(step=6, epoch_batches=12), 16, 16)


def test_the_train_loader_shuffles_keeps_whole_batches_and_groups_lengths_by_the_runs_seed():
    """The loader training reads: a shuffled order (a data set stored sorted, by source or length, would otherwise
    train in file order), 100 pairs in 12 whole batches of 8 (the last 4 left out, not a batch of 4 weighed as
    one of 8), and length grouping drawn from the run's seed (a seed sweep sees as many orders as seeds)."""
    from types import SimpleNamespace

    from torch.utils.data import RandomSampler

    from simpo_exp.train import train_data_loader

    def loader_of(seed: int, group: bool = False):
        hardware = SimpleNamespace(group_by_length=group, dataloader_num_workers=0)
        cfg = SimpleNamespace(per_device_train_batch_size=8, seed=seed, hardware=hardware)
        return train_data_loader(cfg, ds, lambda rows: [r["i"] for r in rows])

    ds = pairs_dataset(100)
    ds = ds.add_column("i", list(range(len(ds))))
    loader = loader_of(1)
    torch.manual_seed(0)
    batches = list(loader)
    order = [i for b in batches for i in b]
    assert isinstance(loader.sampler, RandomSampler) and len(loader) == 12 and {len(b) for b in batches} == {8}
    assert len(set(order)) == 96 and order != sorted(order)
    grouped = {seed: [i for b in loader_of(seed, group=True) for i in b] for seed in (1, 2)}
    assert len(set(grouped[1])) == len(set(grouped[2])) == 96 and grouped[1] != grouped[2]
