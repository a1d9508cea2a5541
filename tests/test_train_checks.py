"""What the loop logs at a logging step, with accumulation and skipped steps (from a mutation review of train.py:
every run of the suite accumulates one micro-batch on one process, where a count of micro-batches, of steps and of
pairs per device are one number)."""

from __future__ import annotations

from types import SimpleNamespace

from simpo_exp.checkpoint import TrainState
from simpo_exp.metrics import SKIPPED
from simpo_exp.tracking import SAMPLES_KEY
from simpo_exp.train import log_train


def test_a_logged_step_counts_epochs_in_micro_batches_pairs_over_processes_and_skipped_steps_tokens():
    logged = []
    state = TrainState(step=2, micro_batches=4, epoch_batches=10, num_tokens=100.0, skipped_steps=1)
    window = SimpleNamespace(train_report=lambda *a: ({}, {"input_tokens": 30.0, f"{SKIPPED}input_tokens": 12.0}))
    run = SimpleNamespace(
        accelerator=None, flops=None, peak=None, state=state, step_lr=1e-6, pairs_per_step=16,
        tracker=SimpleNamespace(log=lambda metrics, step: logged.append((step, metrics))),
    )  # fmt: skip
    metrics = log_train(run, window, grad_norm=0.5)
    assert metrics["train/epoch"] == 0.4  # 4 micro-batches of the epoch's 10 (2 steps of 2)
    assert metrics[SAMPLES_KEY] == 32  # 2 steps of 16 pairs (per device x accumulation x processes)
    assert metrics["train/num_tokens"] == 142.0 and state.num_tokens == 142.0  # a skipped step's tokens were fed too
    assert metrics["train/skipped_steps"] == 1 and logged == [(2, metrics)]
