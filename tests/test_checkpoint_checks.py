"""Checkpoint and stop-signal paths that no end-to-end run pins: a checkpoint of fewer processes, a LoRA
checkpoint's trained and frozen weights, a disk-full message's figures, the config check past an unreadable
record, the owed eval's records, and the signal handlers set and put back (tests from a mutation review of
checkpoint.py and signals.py)."""

from __future__ import annotations

import errno
import json
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from simpo_exp import checkpoint
from simpo_exp.signals import (
    StopSignal,
    TerminatedInterrupt,
    ignore_stop_signals,
    interrupt_status,
    sigterm_as_interrupt,
    stop_signals,
)


def _saved(run_dir, model, step: int = 4, rng=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return (
        checkpoint.save(run_dir, model, opt, sched, checkpoint.TrainState(step=step), {}, keep=2, rng=rng),
        opt,
        sched,
    )


def test_a_checkpoint_of_fewer_processes_is_refused_by_name_not_called_damaged(tmp_path):
    """One process's checkpoint resumed on two failed on the second's missing generator state, reported damaged
    with advice to delete it: refused instead, naming both counts."""
    model = torch.nn.Linear(2, 2)
    path, opt, sched = _saved(tmp_path, model, rng=[checkpoint.rng_state()])
    with pytest.raises(checkpoint.CheckpointError, match=r"written by 1 process\(es\), this run has 2") as e:
        checkpoint.load(path, model, opt, sched, {}, process=(0, 2))
    assert not isinstance(e.value, checkpoint.DamagedCheckpoint)


def test_a_lora_checkpoint_must_hold_its_trained_weights_over_the_same_frozen_base(tmp_path):
    """A checkpoint of the trained weights alone: one lacking a trained tensor loaded the rest and left that one at
    its initial values, without a word; one over another base is refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)  # the frozen base
    path, opt, sched = _saved(tmp_path, model)
    assert checkpoint.load(path, model, opt, sched, {}).step == 4
    weights = load_file(path / "model.safetensors")
    assert set(weights) == {"1.weight", "1.bias"}  # the trained weights alone
    save_file({"1.weight": weights["1.weight"]}, path / "model.safetensors")  # 1.bias lost
    with pytest.raises(checkpoint.DamagedCheckpoint, match="does not hold this run's trained weights"):
        checkpoint.load(path, model, opt, sched, {})
    save_file(weights, path / "model.safetensors")
    with torch.no_grad():
        model[0].weight.add_(1.0)  # another base
    with pytest.raises(checkpoint.CheckpointError, match="frozen base weights differ"):
        checkpoint.load(path, model, opt, sched, {})


def test_a_full_disk_says_which_file_failed_and_how_large_a_checkpoint_is(tmp_path):
    model = torch.nn.Linear(64, 64)
    newest, *_ = _saved(tmp_path, model, step=1)
    staging = checkpoint.start(tmp_path, 2, None)
    full = OSError(errno.ENOSPC, "No space left on device", str(staging / "model.safetensors"))
    message = str(checkpoint.save_failed(tmp_path, staging, full, estimate=1))
    assert f"({staging / 'model.safetensors'})" in message and "No space left on device" in message
    assert f"needs about {checkpoint._size(checkpoint.dir_bytes(newest))}" in message  # the newest one's size
    assert checkpoint.dir_bytes(newest) > 64 * 64 * 4 and not staging.exists()


def test_the_config_check_passes_over_a_checkpoint_whose_record_cannot_be_read(tmp_path):
    """The newest checkpoint's state.json unreadable: the one before it is checked, so a mistyped override is
    still refused before the set-up, not after the model, the data and a reference pass."""
    for step, record in ((1, json.dumps({"config": {"beta": 2.0}})), (2, "garbage")):
        folder = tmp_path / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(record)
        (folder / checkpoint.MARKER).write_text("{}")
    with pytest.raises(checkpoint.DifferentConfigCheckpoint, match="step-000001"):
        checkpoint.refuse_another_config(tmp_path, {"beta": 5.0})
    checkpoint.refuse_another_config(tmp_path, {"beta": 2.0})


def test_a_run_recorded_before_data_fingerprints_keeps_its_data_paths_compared(tmp_path):
    """Only sources whose files the run recorded by content may move to another path; one recorded before that
    (no ``files``) is compared by its path, as before."""
    (tmp_path / "data_report.json").write_text(json.dumps({"sources": {"mine": {"path": "/a/d.jsonl"}}}))
    assert checkpoint.fingerprinted_sources(tmp_path) == frozenset()
    saved = {"dataset": {"sources": {"mine": {"path": "/a/d.jsonl"}}}}
    now = {"dataset": {"sources": {"mine": {"path": "/b/d.jsonl"}}}}
    assert any("dataset.sources.mine.path" in d for d in checkpoint.incompatible_keys(saved, now))
    files = {"sources": {"mine": {"path": "/a/d.jsonl", "files": {"d.jsonl": "abc"}}}}
    (tmp_path / "data_report.json").write_text(json.dumps(files))
    assert checkpoint.fingerprinted_sources(tmp_path) == frozenset({"mine"})


def test_the_owed_evals_records_go_and_its_steps_training_record_stays(tmp_path):
    """A checkpoint that owes step 2's eval: the resumed run logs that eval again, so its earlier records go, but
    step 2's training metrics were logged once, before the checkpoint, and stay."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 2, "train/loss": 1.0}, {"step": 2, "eval/loss": 1.0}, {"step": 3, "train/loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint.trim_metrics(path, 2, eval_owed=2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint.trim_metrics(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]


@pytest.fixture
def handlers():
    """The stop signals' handlers as found, put back after the test."""
    found = {sig: signal.getsignal(sig) for sig in stop_signals()}
    yield found
    for sig, handler in found.items():
        signal.signal(sig, handler)


def test_a_dataloader_worker_ignores_the_stop_signals(handlers):
    """A scheduler signals every process of the job: a worker that died of it made torch fail the training process
    wherever it was, and the stop ended without its checkpoint."""
    ignore_stop_signals()
    assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in stop_signals())


def test_sigterm_as_ctrl_c_leaves_a_handler_installed_before_alone(handlers):
    mine = lambda *args: None  # noqa: E731
    signal.signal(signal.SIGTERM, mine)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGTERM) is mine
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, mine)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    # the exit status a scheduler reads: 143 for its SIGTERM, 130 for the user's Ctrl-C
    assert interrupt_status(TerminatedInterrupt()) == 143 and interrupt_status(KeyboardInterrupt()) == 130


def test_a_stop_puts_back_every_handler_and_ends_cleanly_over_the_default_ctrl_c_handler(handlers):
    """Python's own Ctrl-C handler, found at start, turned a clean stop into a KeyboardInterrupt traceback when
    called on the way out; and every handler found at start is the one in place after the stop."""
    sentinels = {sig: (lambda *args: None) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    for sig, handler in sentinels.items():
        signal.signal(sig, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = StopSignal()
    assert all(signal.getsignal(sig) is not handler for sig, handler in sentinels.items())
    with pytest.raises(SystemExit) as leaving:
        stop.exit(3, signal.SIGINT)
    assert leaving.value.code == 130
    assert all(signal.getsignal(sig) is handler for sig, handler in sentinels.items())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------- from a mutation review of checkpoint.py
# and signals.py
def test_the_agreed_signal_is_handed_on_not_the_one_this_process_got(handlers):
    """Another process got submitit's USR2, this one a Ctrl-C: the agreed signal (USR2) is the one whose handler is
    called (submitit's requeue) and whose status the process leaves with."""
    called = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: called.append(signum))
    stop = StopSignal()
    stop.signum = signal.SIGINT
    with pytest.raises(SystemExit) as leaving:
        stop.exit(3, signal.SIGUSR2)
    assert called == [signal.SIGUSR2] and leaving.value.code == 128 + signal.SIGUSR2


def test_a_handler_not_installed_from_python_is_left_as_it_is(handlers):
    """getsignal answers None for a handler installed outside Python: it cannot be put back, and trying turned the
    clean stop into a TypeError traceback; the others are put back."""
    stop = StopSignal()
    stop._previous[signal.SIGUSR2] = None
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]


def test_a_key_saved_as_null_is_no_key_added_since():
    """A source's test_split=null (its test set carved out of train) resumed without it: the default 'test' is another
    training set, refused; only a key the checkpoint lacks may be at its default."""
    from simpo_exp.checkpoint import incompatible_keys

    def source(**keys):
        return {"dataset": {"sources": {"mine": keys}}}

    assert incompatible_keys(source(test_split=None), source(test_split="test")) == [
        "dataset.sources.mine.test_split: checkpoint None, now 'test'"
    ]
    assert incompatible_keys(source(), source(test_split="test")) == []


def test_a_fingerprinted_source_may_move_between_local_folders_only(tmp_path):
    """Its files are compared by content (check_same_data) only where both paths are local: a hub id that became a
    local folder is another source."""
    from simpo_exp.checkpoint import incompatible_keys

    def source(path):
        return {"dataset": {"sources": {"mine": {"path": path}}}}

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    mine = frozenset({"mine"})
    assert incompatible_keys(source(str(tmp_path / "a")), source(str(tmp_path / "b")), fingerprinted=mine) == []
    moved = incompatible_keys(source("org/ds"), source(str(tmp_path / "b")), fingerprinted=mine)
    assert [d.split(":")[0] for d in moved] == ["dataset.sources.mine.path"]
