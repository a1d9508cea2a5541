"""What the loop logs at a logging step, with accumulation and skipped steps (from a mutation review of train.py:
every run of the suite accumulates one micro-batch on one process, where a count of micro-batches, of steps and of
pairs per device are one number)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from simpo_exp.checkpoint import TrainState
from simpo_exp.metrics import SKIPPED
from simpo_exp.tracking import SAMPLES_KEY
from simpo_exp.train import log_train


def test_a_logged_step_counts_epochs_in_micro_batches_pairs_over_processes_and_skipped_steps_tokens():
    logged = []
    state = TrainState(step=2, micro_batches=4, epoch_batches=10, num_tokens=100.0, skipped_steps=1)
    window = SimpleNamespace(train_report=lambda *a: ({}, {"input_tokens": 30.0, f"{SKIPPED}input_tokens": 12.0}))
    run = SimpleNamespace(
        accelerator=None, flops=None, peak=None, state=state, step_lr=1e-6, pairs_per_step=16, train_loader=[0] * 10,
        tracker=SimpleNamespace(log=lambda metrics, step: logged.append((step, metrics))),
    )  # fmt: skip
    metrics = log_train(run, window, grad_norm=0.5)
    assert metrics["train/epoch"] == 0.4  # 4 micro-batches of the epoch's 10 (2 steps of 2)
    assert metrics[SAMPLES_KEY] == 32  # 2 steps of 16 pairs (per device x accumulation x processes)
    assert metrics["train/num_tokens"] == 142.0 and state.num_tokens == 142.0  # a skipped step's tokens were fed too
    assert metrics["train/skipped_steps"] == 1 and logged == [(2, metrics)]


def _stubbed_loop(monkeypatch, tmp_path, steps: int, signal_at=None, **settings):
    """A train_loop whose step, eval and checkpoint only record themselves: ``(run, evals, saved)``. ``signal_at``:
    ``("step", n)`` sends SIGTERM during step n, ``("eval", n)`` during step n's eval."""
    import dataclasses
    import os
    import signal

    import simpo_exp.train as train_mod
    from simpo_exp.tracking import Tracker

    evals, saved = [], []

    def step(run, batches, window):
        run.state.step += 1
        if signal_at == ("step", run.state.step):
            os.kill(os.getpid(), signal.SIGTERM)
        return 0.0

    def evaluate(run, step):
        evals.append(step)
        if signal_at == ("eval", step):
            os.kill(os.getpid(), signal.SIGTERM)
        return {"eval/step": step}

    monkeypatch.setattr(train_mod, "optimizer_step", step)
    monkeypatch.setattr(train_mod, "forever", lambda *args: None)
    monkeypatch.setattr(train_mod, "log_train", lambda *args: {"train/loss": 0.5})
    monkeypatch.setattr(train_mod, "evaluate_and_sample", evaluate)
    monkeypatch.setattr(train_mod, "save_checkpoint", lambda run, window: saved.append(dataclasses.replace(run.state)))
    cfg = dict(eval_on_start=False, logging_steps=1, eval_steps=0, save_steps=0, progress_bar=False) | settings
    run = SimpleNamespace(
        cfg=SimpleNamespace(**cfg),
        state=TrainState(step=settings.get("start", 0)),
        steps=steps,
        train_loader=None,
        accelerator=SimpleNamespace(num_processes=1, is_main_process=True, wait_for_everyone=lambda: None),
        policy=SimpleNamespace(train=lambda: None),
        tracker=Tracker(tmp_path, SimpleNamespace(wandb=False), {}),
        run_dir=tmp_path,
    )
    return run, evals, saved


def _loop(run):
    import simpo_exp.train as train_mod
    from simpo_exp.signals import StopSignal

    stop = StopSignal()
    try:
        return train_mod.train_loop(run, stop)
    finally:
        stop.restore()  # a failure must not leave this handler to the tests after it


def test_eval_on_start_is_the_first_starts_alone(monkeypatch, tmp_path):
    """A resumed run with eval_on_start evaluated step 0 again after its checkpoint's step: a second step-0 row in
    the records, and a whole evaluation a resume."""
    run, evals, saved = _stubbed_loop(monkeypatch, tmp_path, steps=4, eval_on_start=True, eval_steps=2, start=2)
    assert _loop(run)["eval/step"] == 4 and evals == [4] and saved == []
    run, evals, saved = _stubbed_loop(monkeypatch, tmp_path, steps=4, eval_on_start=True, eval_steps=2)
    _loop(run)
    assert evals == [0, 2, 4]


def test_no_checkpoint_at_the_last_step_and_a_signal_in_its_eval_finishes_the_run(monkeypatch, tmp_path):
    """The last step's checkpoint would be written just before the model (a whole checkpoint's time and disk); and
    a signal during the last eval saved one and left with 143, the resumed run rebuilding its summary without the
    eval's metrics. Both now finish: the model write that follows is as long as a checkpoint."""
    run, evals, saved = _stubbed_loop(monkeypatch, tmp_path, steps=4, save_steps=2)
    _loop(run)
    assert [s.step for s in saved] == [2] and evals == [4]
    run, evals, saved = _stubbed_loop(monkeypatch, tmp_path, steps=2, eval_steps=2, signal_at=("eval", 2))
    summary = _loop(run)
    assert summary["eval/step"] == 2 and summary["train/loss"] == 0.5 and saved == []
    run, evals, saved = _stubbed_loop(monkeypatch, tmp_path, steps=4, eval_steps=2, signal_at=("eval", 2))
    with pytest.raises(SystemExit):  # an earlier step's eval: saved, and stopped there
        _loop(run)
    assert [(s.step, s.eval_owed) for s in saved] == [(2, 0)] and evals == [2]


@pytest.mark.parametrize("packing, pairs, local", [("prefix_shared", 13, 27), ("packed", 16, 36), ("none", 16, 36)])
def test_a_step_counts_the_attention_pairs_of_the_layout_it_runs(monkeypatch, packing, pairs, local):
    """The step's attention work (train/mfu's attention term) is counted in the run's layout: a prefix-shared pair
    (prompt 2, chosen 1, rejected 2) sees 13 (query, key) pairs; counted as one causal row of 5 it would be 15, and
    MFU too high under the packed layouts. Three sliding-window layers of 2 see 3 x (5 + 7) pairs, the shared
    prompt's 3 once under prefix sharing."""
    import contextlib

    import torch

    from simpo_exp import train as train_mod
    from simpo_exp.data import PairCollator
    from simpo_exp.flops import FlopSpec
    from simpo_exp.metrics import Window

    monkeypatch.setattr(train_mod, "batch_loss", lambda *a: (torch.tensor(0.0), {"pairs": torch.tensor(1.0)}, None))
    acc = SimpleNamespace(
        accumulate=lambda m: contextlib.nullcontext(), backward=lambda loss: None, clip_grad_norm_=lambda *a: 1.0,
        distributed_type=None, device=torch.device("cpu"), optimizer_step_was_skipped=False,
    )  # fmt: skip
    run = SimpleNamespace(
        accelerator=acc, state=TrainState(), layout=SimpleNamespace(packing=packing), accum=1,
        policy=torch.nn.Linear(1, 1), reference=None, steps=1,
        cfg=SimpleNamespace(sft_weight=0, max_grad_norm=1.0, logging_steps=1),
        compiler=SimpleNamespace(step_started=lambda: None, step_finished=lambda *a: False),
        optimizer=SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none: None),
        scheduler=SimpleNamespace(get_last_lr=lambda: [0.0], step=lambda: None),
        flops=FlopSpec(0, 0, 0, 0, layers=1, attention_width=1, local=(("window", 2, 3),)),
    )  # fmt: skip
    pair = {"prompt_input_ids": [5, 6], "chosen_input_ids": [7], "rejected_input_ids": [8, 9]}
    window = Window()
    train_mod.optimizer_step(run, iter([PairCollator(0, packing=packing)([pair])]), window)
    assert window.local()["attention_pairs"] == pairs and run.state.step == 1
    assert window.local()["local_pairs"] == local


def test_the_logged_epoch_is_the_trainers():
    """transformers' Trainer logs an epoch's micro-batches over all of its micro-batches: 478 of them at
    accumulation 64 make 7 steps, the last at 448/478 = 0.937 as the official runs logged it; counted over the 448
    trained, every point read up to 7% ahead and the last 1.0. The next epoch starts from 1."""
    from simpo_exp.train import logged_epoch

    assert [round(logged_epoch(64 * k, 448, 478), 4) for k in (1, 7, 8, 14)] == [0.1339, 0.9372, 1.1339, 1.9372]
    assert logged_epoch(0, 448, 478) == 0.0 and logged_epoch(480, 480, 480) == 1.0  # no micro-batch left over
    assert logged_epoch(8, 8, 3) == 1.0  # data shorter than a step (each step reads it more than once): passes


def test_an_eval_or_save_cadence_at_or_past_the_runs_length_is_warned_about():
    """``eval_steps=50`` on a 2-step run evaluated only at the end and ``save_steps=40`` kept no checkpoint to
    resume from, without a word; the defaults (100) on a short run are not the user's choice and say nothing."""
    from simpo_exp.config import Config
    from simpo_exp.train import cadence_past_the_end

    cfg = SimpleNamespace(eval_steps=50, save_steps=40)
    assert cadence_past_the_end(cfg, 2) == [
        "eval_steps=50 is not below the run's 2 steps: it evaluates only at its end",
        "save_steps=40 is not below the run's 2 steps: it saves no checkpoint before its end",
    ]
    assert cadence_past_the_end(cfg, 51) == []
    assert cadence_past_the_end(SimpleNamespace(eval_steps=2, save_steps=0), 2) == [
        "eval_steps=2 is not below the run's 2 steps: it evaluates only at its end"
    ]
    defaults = SimpleNamespace(eval_steps=Config.eval_steps, save_steps=Config.save_steps)
    assert cadence_past_the_end(defaults, 10) == []


def test_too_few_pairs_for_one_batch_are_refused_before_the_model_loads(compose, tmp_path, monkeypatch):
    """A recipe's smoke test on a few pairs (an 8B model's) loaded the weights, then stopped: the loader, which drops
    a last short batch, was empty."""
    from simpo_exp import train
    from simpo_exp.config import ConfigError, to_config

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train, "load_model", loaded)
    overrides = ["dataset.synthetic.num_train=7", "per_device_train_batch_size=8", "logger=none"]
    cfg = to_config(compose(f"output_dir={tmp_path}", *overrides))
    with pytest.raises(ConfigError, match="the train split has 7 pairs, fewer than per_device_train_batch_size=8"):
        train.set_up(cfg)
