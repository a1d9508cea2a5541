"""A split dealt to processes in whole batches (simpo_exp/data/dealt.py): every pair counted exactly once."""

import pytest

from simpo_exp.data.dealt import Dealt, deal


@pytest.mark.parametrize(
    "n,batch,processes", [(10, 3, 2), (12, 3, 2), (7, 2, 3), (2, 4, 3), (64, 7, 2), (5, 5, 1), (10, 2, 2), (11, 2, 3)]
)
def test_every_pair_counted_once_and_every_process_runs_as_many_batches(n, batch, processes):
    dealt = [deal(n, batch, p, processes) for p in range(processes)]
    assert len({len(batches) for batches, _ in dealt}) == 1  # as many forwards on every process
    counted = {}
    for batches, positions in dealt:
        assert all(0 < len(b) <= batch for b in batches)
        assert batches[len(positions) :] == [batches[0]] * (len(batches) - len(positions))  # the repeats, last
        counted |= dict(zip(positions, batches))
    assert sorted(counted) == list(range(len(counted)))
    assert [i for k in sorted(counted) for i in counted[k]] == list(range(n))  # in order, each row once


def test_dealt_yields_the_positions_and_marks_the_repeats():
    rows = [{"x": i} for i in range(7)]
    first = list(Dealt(rows, lambda pairs: [p["x"] for p in pairs], 2, process=1, processes=3))
    assert first == [(1, [2, 3]), (None, [2, 3])]  # of batches 0..3 it has batch 1, then repeats it (process 0 has two)
    last = list(Dealt(rows, lambda pairs: [p["x"] for p in pairs], 2, process=0, processes=3))
    assert last == [(0, [0, 1]), (3, [6])]
    # a process of several batches that also repeats one: its own batches first, each at its own position
    rows = [{"x": i} for i in range(10)]
    second = list(Dealt(rows, lambda pairs: [p["x"] for p in pairs], 2, process=1, processes=2))
    assert second == [(1, [2, 3]), (3, [6, 7]), (None, [2, 3])]
