"""Checkpoint checksums (xxh3_128 now, SHA-256 markers still read) and the stop signal's hand-off to the
handler it replaced (submitit's requeue). No training here: tests/test_faults.py has the real run."""

import hashlib
import json
import os
import signal
import sys
from types import SimpleNamespace

import pytest
import torch

from simpo_exp import checkpoint
from simpo_exp.engine import ProcessFailed, UserProcessFailed, on_every, on_main, together
from simpo_exp.errors import UserError
from simpo_exp.signals import StopSignal
from simpo_exp.tracking import Tracker


@pytest.fixture
def saved(tmp_path):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()  # AdamW moments in the checkpoint
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=7), {}, keep=2)


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_new_marker_names_xxh3_and_verifies(saved):
    marker = json.loads((saved / checkpoint.MARKER).read_text())
    assert marker["algorithm"] == "xxh3_128"
    entry = marker["files"]["model.safetensors"]
    assert set(entry) == {"size", "xxh3_128"} and len(entry["xxh3_128"]) == 32  # 128 bits in hex
    assert checkpoint.verify(saved) is None


def test_a_flipped_byte_is_caught(saved):
    flip_a_byte(saved / "optimizer.safetensors")  # same size, one bit changed
    assert checkpoint.verify(saved) == "optimizer.safetensors does not match its checksum"


def test_an_old_sha256_marker_still_verifies_and_catches_damage(saved):
    files = {
        f.name: {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in saved.iterdir()
        if f.name != checkpoint.MARKER
    }
    (saved / checkpoint.MARKER).write_text(json.dumps({"files": files}))  # as written before xxhash
    assert checkpoint.verify(saved) is None
    flip_a_byte(saved / "model.safetensors")
    assert checkpoint.verify(saved) == "model.safetensors does not match its checksum"


def test_an_unknown_algorithm_is_named(saved):
    marker = json.loads((saved / checkpoint.MARKER).read_text())
    (saved / checkpoint.MARKER).write_text(json.dumps(marker | {"algorithm": "md4"}))
    assert "unknown checksum 'md4' (known: xxh3_128, sha256)" in checkpoint.verify(saved)


def test_file_hash_matches_the_libraries_over_chunk_boundaries(tmp_path):
    import xxhash

    data = os.urandom(3 * 1000 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert checkpoint.file_hash(path, "sha256", chunk=1000) == hashlib.sha256(data).hexdigest()
    assert checkpoint.file_hash(path, "xxh3_128", chunk=1000) == xxhash.xxh3_128(data).hexdigest()


def test_the_replaced_handler_is_called_after_the_save(monkeypatch):
    """submitit's USR2 handler (stood in for here) runs once the loop calls exit(), not when the signal
    lands: the checkpoint is written first, then submitit requeues."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    before = signal.getsignal(signal.SIGTERM)
    try:
        stop = StopSignal()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested and stop.signum == signal.SIGUSR2 and calls == []  # only remembered
        with pytest.raises(SystemExit) as leaving:
            stop.exit(5, signal.SIGUSR2)
        assert calls == [signal.SIGUSR2] and leaving.value.code == 128 + signal.SIGUSR2
        # handlers put back (``stop._handle`` is a new bound method at each access: an ``is not`` always held)
        assert signal.getsignal(signal.SIGTERM) == before != stop._handle
    finally:
        signal.signal(signal.SIGUSR2, previous)


class CheckpointableJob:
    """A callable submitit can requeue, as hydra-submitit-launcher's launcher is (its ``checkpoint``)."""

    def __call__(self):
        return None

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def test_submitit_requeues_only_after_the_loop_saved(tmp_path):
    """submitit's own USR2 handler (checkpoint the submission, requeue, exit) is installed before the run
    starts; the run's handler defers it to ``exit``, which the loop calls after the checkpoint."""
    pytest.importorskip("submitit")
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths

    requeued = []
    env = SimpleNamespace(global_rank=0, _requeue=requeued.append)  # scontrol requeue, recorded
    delayed = DelayedSubmission(CheckpointableJob())
    delayed.set_timeout(60, 3)
    paths = JobPaths(tmp_path, job_id="42")
    previous = signal.signal(signal.SIGUSR2, SignalHandler(env, paths, delayed).checkpoint_and_try_requeue)
    try:
        stop = StopSignal()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.signum == signal.SIGUSR2 and requeued == [] and not paths.submitted_pickle.exists()
        with pytest.raises(SystemExit) as leaving:
            stop.exit(4, signal.SIGUSR2)
        assert requeued == [3] and paths.submitted_pickle.exists()  # not timed out: the countdown is kept
        assert leaving.value.code == -1  # submitit's own exit, as without this project's handler
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_default_handler_is_not_called_on_exit():
    stop = StopSignal()  # SIGTERM's handler before it: SIG_DFL (would kill), SIGINT's: KeyboardInterrupt
    with pytest.raises(SystemExit) as leaving:
        stop.exit(3, signal.SIGINT)
    assert leaving.value.code == 128 + signal.SIGINT


class TwoProcesses:
    """An accelerator of two processes, whose gather adds the other process's value."""

    num_processes, device = 2, "cpu"

    def __init__(self, other: float):
        self.other = other

    def gather(self, t):
        return torch.cat([t, torch.tensor([self.other])])


def test_every_process_agrees_on_the_signal_one_got():
    stop = StopSignal()
    try:
        assert stop.agreed(TwoProcesses(0.0)) == 0
        # another process got USR2: this one stops too and knows it was USR2 (to hand it on)
        assert stop.agreed(TwoProcesses(float(signal.SIGUSR2))) == signal.SIGUSR2
        stop.signum = signal.SIGTERM
        assert stop.agreed(TwoProcesses(0.0)) == signal.SIGTERM
        assert stop.agreed(SimpleNamespace(num_processes=1)) == signal.SIGTERM
    finally:
        stop.restore()


class Rank(TwoProcesses):
    """One of two processes: ``other`` is what the other process hands to gather (1.0: it failed) and to
    broadcast_object_list (main's value, failure) when this is not the main process."""

    def __init__(self, other, main: bool):
        super().__init__(other)
        self.is_main_process = main


def test_a_failure_on_one_process_is_raised_on_every_process():
    def boom():
        raise OSError(28, "No space left on device")

    def elsewhere(ranks):
        return RuntimeError(f"failed on {ranks}")

    assert together(Rank(0.0, True), lambda: 7, elsewhere) == 7
    with pytest.raises(OSError, match="No space"):  # where it failed: its own error
        together(Rank(0.0, True), boom, elsewhere)
    with pytest.raises(RuntimeError, match=r"failed on \[1\]"):  # the main process, when the other failed
        together(Rank(1.0, True), lambda: 7, elsewhere)
    with pytest.raises(ProcessFailed, match="process 1 failed while writing the model"):
        together(Rank(1.0, True), lambda: None, "writing the model")
    assert together(SimpleNamespace(num_processes=1), lambda: 3, elsewhere) == 3


def test_on_main_sends_the_main_processs_value_from_rank_0(monkeypatch):
    """The value every process gets is rank 0's (the one that computed it): sent from another rank, each got None."""
    import accelerate.utils

    sources = []

    def broadcast(objects, from_process=0):
        sources.append(from_process)
        return objects

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    assert on_main(Rank(0.0, True), lambda: 1) == 1 and sources == [0]


def test_a_failure_of_the_main_process_in_on_main_stops_the_others(monkeypatch):
    import accelerate.utils

    sent = {}

    def broadcast(objects, from_process=0):  # the other process: it receives what the main one sent
        sent["given"] = objects
        return sent.get("objects", objects)

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    sent["objects"] = [None, (True, "CheckpointError: step-000004 is damaged")]
    with pytest.raises(UserProcessFailed, match="main process failed, so this one stops: CheckpointError: step-0"):
        on_main(Rank(0.0, False), lambda: "never run here")
    sent["objects"] = [None, (False, "KeyError: 'x'")]
    with pytest.raises(ProcessFailed) as err:
        on_main(Rank(0.0, False), lambda: "never run here")
    assert not isinstance(err.value, UserError)
    sent["objects"] = ["/runs/a", None]
    assert on_main(Rank(0.0, False), lambda: "never run here") == "/runs/a"
    sent.clear()

    def damaged():
        raise checkpoint.CheckpointError("step-000004 is damaged")

    with pytest.raises(checkpoint.CheckpointError, match="damaged"):  # the main process raises its own error
        on_main(Rank(0.0, True), damaged)
    assert sent["given"] == [None, (True, "CheckpointError: step-000004 is damaged")]  # after telling the others


def test_on_every_gives_each_process_every_result(monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: objects + ["the other's"])
    assert on_every(Rank(0.0, True), lambda: "mine", "loading") == ["mine", "the other's"]
    with pytest.raises(ProcessFailed, match="process 1 failed while loading"):  # it raised there
        on_every(Rank(1.0, True), lambda: "mine", "loading")
    assert on_every(SimpleNamespace(num_processes=1), lambda: 5, "loading") == [5]


def test_a_checkpoint_one_process_cannot_load_is_skipped_by_every_process(tmp_path, caplog, monkeypatch):
    """Process 1 cannot read the newest checkpoint (its node's copy is damaged, say), which this process
    (0) loaded: both fall back to the older one, and this process's model holds the older weights."""
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    older = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=4), {}, keep=2)
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=7), {}, keep=2)
    other = {"step-000007": "step-000007 cannot be read (OSError: [Errno 5] Input/output error)"}

    def two_processes(fn):  # this process's result, then process 1's
        mine = fn()
        return [mine, other.get(loading[-1])]

    loading = []
    real_load = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda path, *a: loading.append(path.name) or real_load(path, *a))
    path, state = checkpoint.load_newest(tmp_path, model, opt, sched, {}, on_every=two_processes)
    assert loading == ["step-000007", "step-000004"]  # this process loaded the newest, then the older
    assert (path.name, state.step) == ("step-000004", 4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in older.items())
    assert "step-000007 is damaged and skipped: on process 1: step-000007 cannot be read (OSError" in caplog.text

    other["step-000004"] = "step-000004 cannot be read (OSError: [Errno 5] Input/output error)"
    with pytest.raises(checkpoint.CheckpointError, match=r"step-000004: on process 1: step-000004 cannot be read"):
        checkpoint.load_newest(tmp_path, model, opt, sched, {}, on_every=two_processes)


@pytest.fixture
def keep_generators():
    """Leave this test process's generators as they were."""
    import random

    import numpy as np

    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(before[0])
    random.setstate(before[1])
    np.random.set_state(before[2])


def test_each_process_gets_its_own_generator_states_back(tmp_path, keep_generators):
    """A checkpoint keeps every process's RNG states (LoRA's dropout draws differently on each); resumed on as
    many processes, each takes its own (another number is refused: see test_reliability). Older checkpoints
    kept one."""
    import random

    import numpy as np
    from safetensors.torch import load_file, save_file

    def seed_all(seed):  # torch's, Python's and numpy's global generators, as transformers' set_seed seeds them
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    states = []
    for seed in (1, 2):
        seed_all(seed)
        states.append(checkpoint.rng_state())
    path = checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=3), {}, keep=2, rng=states)

    def restored(process):
        seed_all(99)
        checkpoint.load(path, model, opt, sched, {}, process=process)
        return torch.get_rng_state(), random.random(), np.random.random()

    for seed, process in ((2, (1, 2)), (1, (0, 2))):
        seed_all(seed)
        want = (torch.get_rng_state(), random.random(), np.random.random())
        got = restored(process)
        assert torch.equal(got[0], want[0]) and got[1:] == want[1:], process

    # the format before: one process's states, unprefixed
    meta = json.loads((path / "state.json").read_text())
    meta["rng"] = meta["rng"][1]
    (path / "state.json").write_text(json.dumps(meta))
    save_file(
        {k.removeprefix("1."): v for k, v in load_file(path / "rng.safetensors").items() if k.startswith("1.")},
        path / "rng.safetensors",
    )
    torch.manual_seed(2), random.seed(2)
    want = (torch.get_rng_state(), random.random())
    got = restored((0, 1))
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_a_process_keeps_its_own_gpus_generator_and_takes_it_back_whatever_devices_it_sees(monkeypatch):
    """Every visible device's CUDA generator was saved and all put back: resumed where fewer devices were visible
    (CUDA_VISIBLE_DEVICES=1, a launcher that narrows them), the load ended in an IndexError; and with ten or more,
    "cuda.10" sorted before "cuda.2" and the states went to other devices. A process keeps its own device's, and a
    checkpoint of the former kind gives back the state of this process's device."""
    generators = {2: torch.tensor([2], dtype=torch.uint8), 7: torch.tensor([7], dtype=torch.uint8)}
    current = {"device": 2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": generators[current["device"]].clone())
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device="cuda": generators.update({current["device"]: state})
    )
    tensors, meta = checkpoint.rng_state()
    assert set(tensors) == {"torch", "cuda"} and tensors["cuda"].item() == 2
    current["device"], generators[7] = 7, torch.tensor([0], dtype=torch.uint8)  # resumed on another device
    checkpoint._set_rng_state({f"0.{k}": v for k, v in tensors.items()}, [meta], (0, 1))
    assert generators[7].item() == 2
    former = {"torch": tensors["torch"], **{f"cuda.{i}": torch.tensor([100 + i], dtype=torch.uint8) for i in range(12)}}
    checkpoint._set_rng_state({f"0.{k}": v for k, v in former.items()}, [meta], (0, 1))
    assert generators[7].item() == 107  # its own device's, by number


def test_a_stop_signal_while_setting_up_ends_the_run_at_once_as_stopped(tmp_path, monkeypatch):
    """The handler was installed only when the steps began: a scheduler's SIGTERM during set-up (loading,
    tokenising, the reference log-probs) killed the job with nothing written, so compare showed it as running and
    a sweep ended without its summary. Now it stops at once (a first step could be minutes away), records
    stopped.json and leaves with 128 + the signal, the handlers found at start put back."""
    import time

    import simpo_exp.train as train_mod

    def slow_set_up(cfg):
        try:  # a reader's own error handling (a data source, the W&B start) must not take the signal for its failure
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the reference log-probs, say: the signal does not wait for them
        except Exception as e:
            raise AssertionError(f"the signal was caught as {type(e).__name__}") from e
        raise AssertionError("the signal did not stop the set-up")

    monkeypatch.setattr(train_mod, "set_up", slow_set_up)
    before = signal.getsignal(signal.SIGTERM)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started = time.time()
    with pytest.raises(SystemExit) as leaving:
        train_mod.train(SimpleNamespace(output_dir=str(run_dir)))
    assert leaving.value.code == 128 + signal.SIGTERM and time.time() - started < 30
    assert json.loads((run_dir / "stopped.json").read_text()) == {"signal": "SIGTERM", "step": 0, "during": "set-up"}
    assert signal.getsignal(signal.SIGTERM) == before

    def refused(cfg):
        raise UserError("a checkpoint of other data")

    # a refused set-up puts the handlers back: the next job of a sweep, in the same process, finds them as they were
    monkeypatch.setattr(train_mod, "set_up", refused)
    with pytest.raises(UserError):
        train_mod.train(SimpleNamespace(output_dir=str(run_dir)))
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_stop_signal_during_the_evaluation_at_start_ends_the_run_at_once(tmp_path, monkeypatch):
    """eval_on_start runs before the first step: a signal waited for the whole evaluation and a step (minutes on
    a real model and test split), then saved a checkpoint of that step."""
    import time

    import simpo_exp.train as train_mod
    from simpo_exp.compare import load_run

    def slow_evaluation(run, step):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        raise AssertionError("the signal did not stop the evaluation")

    monkeypatch.setattr(train_mod, "evaluate_and_sample", slow_evaluation)
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- beta=5\n")
    cfg = SimpleNamespace(eval_on_start=True, output_dir=str(run_dir))
    tracker = Tracker(run_dir, SimpleNamespace(wandb=False), {})  # writes stopped.json (and marks a W&B run)
    marked, mark_stopped = [], tracker.mark_stopped
    monkeypatch.setattr(tracker, "mark_stopped", lambda record: marked.append(record) or mark_stopped(record))
    run = SimpleNamespace(cfg=cfg, state=checkpoint.TrainState(), tracker=tracker)
    stop = StopSignal(at_once=True)
    try:
        with pytest.raises(SystemExit) as leaving:
            train_mod.train_loop(run, stop)
    finally:
        stop.restore()  # a failure here must not leave this handler to the tests after it
    assert leaving.value.code == 128 + signal.SIGTERM
    record = json.loads((run_dir / "stopped.json").read_text())
    assert record == {"signal": "SIGTERM", "step": 0, "during": "evaluation at start"} and marked == [record]
    shown = load_run(run_dir)  # compare tells it from a stop that saved a checkpoint
    assert shown.status == "stopped" and "during evaluation at start, before a step (nothing saved)" in shown.error


def test_a_stop_before_a_steps_eval_saves_first_and_the_resumed_run_evaluates_that_step(tmp_path, monkeypatch):
    """A stop signal in a step with an eval due waited for the whole eval (minutes on a real test split, within a
    scheduler's grace time) before the checkpoint. It now saves first; the checkpoint owes the eval, and the
    resumed run evaluates that step before training on, so the eval curve has no gap."""
    import dataclasses

    from tests.test_train_checks import _loop, _stubbed_loop

    # SIGTERM arrives during step 2, whose eval is due
    run, evals, saved = _stubbed_loop(monkeypatch, tmp_path, steps=4, eval_steps=2, signal_at=("step", 2))
    with pytest.raises(SystemExit):
        _loop(run)
    assert evals == [] and [(s.step, s.eval_owed) for s in saved] == [(2, 2)]
    run.state = dataclasses.replace(saved[0])  # resumed from that checkpoint
    summary = _loop(run)
    assert evals == [2, 4] and summary["eval/step"] == 4 and run.state.eval_owed == 0


def test_a_stop_signal_before_training_begins_leaves_the_runs_records_as_they_were(tmp_path, monkeypatch):
    """Between the entry point's start and the training's own handler (the config checks, the finished-run
    check's hashing of the data), SIGTERM killed the process by default, after the entry point had taken the
    run's earlier stopped.json: compare then showed a run stopped at step 4 as running."""
    import sys
    import time

    import simpo_exp.__main__ as entry

    def slow_check(config):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        raise AssertionError("the signal did not stop the entry point")

    monkeypatch.setattr(entry, "recorded_summary", slow_check)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stopped.json").write_text('{"signal": "SIGUSR2", "step": 4}')
    monkeypatch.setattr(sys, "argv", ["simpo_exp", "logger=none", f"hydra.run.dir={run_dir}"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as leaving:
        entry.main()
    assert leaving.value.code == 128 + signal.SIGTERM
    assert json.loads((run_dir / "stopped.json").read_text()) == {"signal": "SIGUSR2", "step": 4}
    assert not (run_dir / "error.json").exists() and signal.getsignal(signal.SIGTERM) == before


def _entry_failing_with(error: BaseException, run_dir, monkeypatch):
    """The training entry point in this process, its finished-run check raising ``error`` (set-up, before training)."""
    import sys

    import simpo_exp.__main__ as entry

    def failing(config):
        raise error

    monkeypatch.setattr(entry, "recorded_summary", failing)
    monkeypatch.setattr(sys, "argv", ["simpo_exp", "logger=none", f"hydra.run.dir={run_dir}"])
    return entry.main


def test_ctrl_c_in_set_up_leaves_the_runs_stop_record(tmp_path, monkeypatch, capsys):
    """A stopped run re-run and interrupted with Ctrl-C before it began: its stopped.json, which the re-run had
    taken, is put back (compare said running, or killed, not stopped at step 4)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stopped.json").write_text('{"signal": "SIGUSR2", "step": 4}')
    main = _entry_failing_with(KeyboardInterrupt(), run_dir, monkeypatch)
    with pytest.raises(SystemExit) as leaving:
        main()
    assert leaving.value.code == 130
    assert json.loads((run_dir / "stopped.json").read_text()) == {"signal": "SIGUSR2", "step": 4}
    assert f"what {run_dir} holds so far (checkpoints) is kept" in capsys.readouterr().err  # training keeps no shards


def test_a_declined_requeue_without_a_stop_record_is_a_failure(tmp_path, monkeypatch, capsys):
    """submitit's UncompletedJobError is a stop at the time limit only where the run saved its stop record; raised
    before any (in set-up) it is the run's failure, recorded as one, not "stopped ... keeps its checkpoint"."""

    class UncompletedJobError(Exception):  # submitit's, by its name
        pass

    main = _entry_failing_with(UncompletedJobError("job 7 timed out"), tmp_path / "run", monkeypatch)
    with pytest.raises(SystemExit) as leaving:  # Hydra's exit for a crash, its traceback printed
        main()
    assert leaving.value.code == 1
    assert json.loads((tmp_path / "run" / "error.json").read_text())["type"] == "UncompletedJobError"
    assert "stopped at the time limit" not in capsys.readouterr().err


def test_a_crash_in_the_folder_of_a_finished_run_is_a_crash_not_a_refusal(tmp_path, monkeypatch, capsys):
    """A user error in the folder of a finished run is refused, the run left as it was; a crash there (not the
    user's) was shown as that refusal: exit 2, no traceback, no error.json, "holds a run from before"."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "finished.json").write_text("{}")
    main = _entry_failing_with(RuntimeError("boom"), run_dir, monkeypatch)
    with pytest.raises(SystemExit) as leaving:  # Hydra's exit for a crash (a refusal's is 2)
        main()
    assert leaving.value.code == 1
    assert json.loads((run_dir / "error.json").read_text())["type"] == "RuntimeError"
    assert "holds a run from before" not in capsys.readouterr().err


def test_a_process_other_than_the_main_one_records_its_own_failure_under_its_rank(tmp_path, monkeypatch):
    """A failure on process 1 alone (a path missing on its node): error-rank1.json, which the main process's record
    names beside its own; an error.json of its own overwrote the main one's (covered only by a slow torchrun test)."""
    from simpo_exp.config import ConfigError

    monkeypatch.setenv("RANK", "1")
    main = _entry_failing_with(ConfigError("model.path=/models/m: no such directory"), tmp_path / "run", monkeypatch)
    with pytest.raises(SystemExit):
        main()
    record = json.loads((tmp_path / "run" / "error-rank1.json").read_text())
    assert record["type"] == "ConfigError" and not (tmp_path / "run" / "error.json").exists()


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_written_weights_follow_the_umask_as_other_files_do(tmp_path, mask):
    """safetensors 0.8 creates its files 0o600 whatever the umask: a colleague could read a run's config.json but
    not its model, checkpoint or the team's reference cache. Each comes out as an ordinary new file would."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_exp.model import save_trained
    from simpo_exp.reference import write_cache

    old = os.umask(mask)
    try:
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        ckpt = checkpoint.save(tmp_path / "run", model, opt, sched, checkpoint.TrainState(step=1), {}, keep=2)
        write_cache(tmp_path / "cache" / "ref-logps-x.safetensors", {"train.chosen": torch.zeros(2)})
        llama = LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
        )
        save_trained(LlamaForCausalLM(llama), tmp_path / "model")
    finally:
        os.umask(old)
    written = [*ckpt.glob("*.safetensors"), tmp_path / "cache" / "ref-logps-x.safetensors"]
    written += [tmp_path / "model" / "model.safetensors", tmp_path / "model" / "config.json"]
    modes = {str(f.relative_to(tmp_path)): oct(f.stat().st_mode & 0o777) for f in written}
    assert modes == {name: oct(0o666 & ~mask) for name in modes} and len(modes) == 6  # model, optimizer, rng


def test_a_stop_before_training_began_is_recorded_for_compare(tmp_path, monkeypatch):
    """A stop signal in the first seconds (composing, checking the config: before ``train()``) left no
    ``stopped.json``, and compare took the run for one killed by an out-of-memory error or ``kill -9``."""
    import sys

    import simpo_exp.__main__ as entry
    from simpo_exp import compare
    from simpo_exp.signals import StopRequested

    def stopped(cfg):
        raise StopRequested(signal.SIGTERM)

    monkeypatch.setattr(entry, "fill_run_identity", stopped)
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["simpo_exp", "logger=none", f"hydra.run.dir={run}"])
    with pytest.raises(SystemExit) as leaving:
        entry.main()
    assert leaving.value.code == 128 + signal.SIGTERM
    assert json.loads((run / "stopped.json").read_text()) == {"signal": "SIGTERM", "step": 0, "during": "start-up"}
    (found,) = compare.load_runs(run)
    assert found.status == "stopped" and "SIGTERM during start-up, before a step" in found.error


def test_a_real_sigterm_during_start_up_ends_the_job_where_it_is(tmp_path, monkeypatch):
    """The stop signal is taken at once from the start: a scheduler's SIGTERM while the config is checked ends the job
    there (held back, it waited through the whole model load for the first step)."""
    import os
    import sys

    import simpo_exp.__main__ as entry

    def signalled(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        return cfg

    monkeypatch.setattr(entry, "fill_run_identity", signalled)
    monkeypatch.setattr(entry, "to_config", lambda cfg: pytest.fail("the job went on past the signal"))
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["simpo_exp", "logger=none", f"hydra.run.dir={run}"])
    found = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a command starts (a test worker may hold another)
    try:
        with pytest.raises(SystemExit) as leaving:
            entry.main()
    finally:
        signal.signal(signal.SIGTERM, found)
    assert leaving.value.code == 128 + signal.SIGTERM
    assert json.loads((run / "stopped.json").read_text())["during"] == "start-up"


def _save(run_dir, step: int, keep: int = 2):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return checkpoint.save(run_dir, model, opt, sched, checkpoint.TrainState(step=step), {}, keep=keep)


def test_a_copy_beside_the_checkpoints_and_stale_staging_folders_are_no_checkpoints(tmp_path):
    """A user's step-000008.bak crashed every resume (int('000008.bak')); staging folders left by saves cut short
    at another step were never removed, a model's worth of bytes each."""
    import shutil

    newest = _save(tmp_path, 8)
    shutil.copytree(newest, newest.with_name("step-000008.bak"))
    (tmp_path / "checkpoints" / "step-000006.tmp").mkdir()  # a stop-triggered save killed in the grace period
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000008"]
    _save(tmp_path, 10)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step-000008", "step-000008.bak", "step-000010"]


def test_a_save_after_resuming_past_a_damaged_checkpoint_keeps_itself(tmp_path):
    """With save_total_limit=1 and a damaged step-8 (resume went back to step 4), each new save (5, 6, 7) was pruned
    as older than step 8 right after it was written, leaving the damaged one alone: the next kill lost everything."""
    _save(tmp_path, 4, keep=1)
    damaged = _save(tmp_path, 8, keep=1)
    (damaged / "optimizer.safetensors").write_bytes(b"\0" * 1000)
    for step in (5, 6):
        _save(tmp_path, step, keep=1)
    names = [p.name for p in checkpoint.checkpoint_dirs(tmp_path)]
    assert names == ["step-000006", "step-000008"]  # the newest save kept; step 8 replaced when step 8 is saved
    assert checkpoint.verify(tmp_path / "checkpoints" / "step-000006") is None


def test_every_process_waits_for_the_main_ones_requeue_before_leaving(monkeypatch):
    """submitit requeues from the main task (then exits there) and returns at once on the others, which left at
    once too: where srun ends a job at the first task to exit (KillOnBadExit), the main task could be killed before
    its requeue. The processes now meet after the handed-on handler, the main task past submitit's own exit."""
    calls = []

    def submitits(signum, frame):  # on the main task: requeue, then exit
        calls.append("requeued")
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitits)
    try:
        stop = StopSignal()
        with pytest.raises(SystemExit) as leaving:
            stop.exit(4, signal.SIGUSR2, together=lambda: calls.append("all processes met"))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == ["requeued", "all processes met"] and leaving.value.code == -1


def test_submitits_refusal_to_requeue_is_handed_on_after_every_process_met():
    """Once a job's time-outs are used up submitit's handler raises UncompletedJobError on the main task (its way of
    ending the job): raised at once, the main task left the others waiting at the barrier until the time limit
    killed them. The processes meet first; the refusal is then handed on (runinfo records a stopped run). Another
    error from the handler is not taken for it."""
    calls = []

    class UncompletedJobError(RuntimeError):
        pass

    def declines(signum, frame):
        calls.append("declined")
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    previous = signal.signal(signal.SIGUSR2, declines)
    try:
        with pytest.raises(UncompletedJobError):
            StopSignal().exit(4, signal.SIGUSR2, together=lambda: calls.append("all processes met"))
        assert calls == ["declined", "all processes met"]
        signal.signal(signal.SIGUSR2, lambda signum, frame: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            StopSignal().exit(4, signal.SIGUSR2, together=lambda: calls.append("met again"))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == ["declined", "all processes met"]


def test_a_finished_run_hands_its_recorded_accuracy_to_the_sweeper(tmp_path, monkeypatch):
    """A re-run sweep skips its finished jobs: each must still return its recorded eval accuracy, which the Optuna
    sweeper takes as the trial's value (None is a failed trial; a search whose trials all finished had "every trial
    of the Optuna search failed")."""
    from hydra._internal.hydra import Hydra

    import simpo_exp.__main__ as entry

    monkeypatch.setattr(entry, "recorded_summary", lambda config: {"eval/rewards/accuracies": 0.75})
    monkeypatch.setattr(sys, "argv", ["simpo_exp", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    returned, run = [], Hydra.run

    def keep(self, *args, **kwargs):  # the job's return value, which hydra.main does not hand back
        returned.append(run(self, *args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(Hydra, "run", keep)
    entry.main()
    assert returned[-1].return_value == pytest.approx(0.75)


def test_ctrl_c_is_remembered_until_the_step_ends_as_the_schedulers_signals_are():
    """SIGINT (a user's Ctrl-C) is one of the stop signals: remembered, the step finished and saved, not a
    KeyboardInterrupt wherever the run is."""
    stop = StopSignal()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
            stop.signum = None
            try:
                os.kill(os.getpid(), sig)
            except KeyboardInterrupt:
                pytest.fail(f"{signal.Signals(sig).name} raised KeyboardInterrupt where the run was")
            assert stop.requested and stop.signum == sig
    finally:
        stop.restore()


def test_submitits_requeue_signal_stays_when_sigterm_follows_and_is_handed_on_over_it(monkeypatch):
    """SLURM sends SIGTERM at the limit itself (and again at a preemption's grace time), after submitit's USR2: it
    replaced the USR2 while the step or the save went on (and ranked above it across processes, 15 > 12), and
    submitit's SIGTERM handler only logs, so the job was never requeued. A cluster's own SUBMITIT_PREEMPT_SIGNAL is
    caught as USR2 is (submitit's handler ran mid-step on it, requeuing without a checkpoint)."""
    from simpo_exp import signals

    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGUSR2
        # across processes: one got USR2, another SIGTERM (an all-gather of each one's signal, its rank first)
        two = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
        for mine, theirs, agreed in (
            (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR2),
            (signal.SIGUSR2, signal.SIGTERM, signal.SIGUSR2),
            (signal.SIGINT, signal.SIGTERM, signal.SIGTERM),  # neither is the requeue signal: as before
            (None, signal.SIGINT, signal.SIGINT),
        ):
            other = 1000 * (theirs == stop.requeue) + theirs
            two.gather = lambda flag, other=other: torch.cat([flag, torch.tensor([float(other)])])  # noqa: B023
            stop.signum = mine
            assert stop.agreed(two) == agreed, (mine, theirs)
    finally:
        stop.restore()
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert signals.requeue_signal() == signal.SIGUSR1 and signal.SIGUSR1 in signals.stop_signals()
    assert signal.SIGUSR2 in signals.stop_signals()  # still caught, as the usual requeue signal
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # its default would end the process
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGUSR1 and stop.requeue == signal.SIGUSR1
        assert stop.after_finish(SimpleNamespace(num_processes=1)) is None  # not handed on as the run finishes
    finally:
        stop.restore()
        signal.signal(signal.SIGUSR1, previous)
    # spelt with SIG or in lower case; two that cannot be caught and one that does not exist: USR2
    for name, meant in (("SIGUSR1", signal.SIGUSR1), ("usr1", signal.SIGUSR1), ("KILL", signal.SIGUSR2),
                        ("STOP", signal.SIGUSR2), ("NOSUCH", signal.SIGUSR2)):  # fmt: skip
        monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", name)
        assert signals.requeue_signal() == meant, name


def test_usr2_as_the_run_finishes_lets_the_sweep_go_on_and_sigterm_does_not():
    """submitit's USR2 (a warning before a time limit) in a run's last step: the run is done and nothing is
    requeued, so the process goes on (a sweep's next job); SIGTERM or Ctrl-C there ends it with 128 + signal."""
    one = SimpleNamespace(num_processes=1)
    stop = StopSignal()
    try:
        stop.signum = signal.SIGUSR2
        assert stop.after_finish(one) is None
        stop.signum = signal.SIGTERM
        with pytest.raises(SystemExit) as leaving:
            stop.after_finish(one)
        assert leaving.value.code == 128 + signal.SIGTERM
    finally:
        stop.restore()


def test_a_damaged_file_in_an_engine_checkpoints_folder_is_caught(tmp_path):
    """A sharded engine's checkpoint keeps its weights and optimizer in engine/: the marker lists them too, so a
    truncated or flipped engine file is noticed on resume like any other."""
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), lambda s: 1.0)
    tmp = checkpoint.start(tmp_path, 8, None)
    (tmp / checkpoint.ENGINE_DIR).mkdir()
    (tmp / checkpoint.ENGINE_DIR / "pytorch_model_fsdp_0").write_bytes(os.urandom(4096))
    path = checkpoint.finish(tmp_path, tmp, None, None, sched, checkpoint.TrainState(step=8), {}, 2, engine="FSDP")
    files = json.loads((path / checkpoint.MARKER).read_text())["files"]
    assert f"{checkpoint.ENGINE_DIR}/pytorch_model_fsdp_0" in files
    flip_a_byte(path / checkpoint.ENGINE_DIR / "pytorch_model_fsdp_0")
    assert checkpoint.verify(path) == f"{checkpoint.ENGINE_DIR}/pytorch_model_fsdp_0 does not match its checksum"


def test_saving_a_step_again_replaces_its_damaged_checkpoint(tmp_path):
    """Resumed from step 4 past a damaged step-8 checkpoint, the run reaches step 8 again: its new checkpoint takes
    the damaged one's place (the save failed with 'Directory not empty' otherwise)."""
    _save(tmp_path, 4)
    damaged = _save(tmp_path, 8)
    (damaged / "optimizer.safetensors").write_bytes(b"\0" * 1000)
    assert checkpoint.verify(damaged) is not None
    again = _save(tmp_path, 8)
    assert again == damaged and checkpoint.verify(again) is None
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000004", "step-000008"]


def test_a_checkpoint_whose_weights_no_longer_match_their_checksum_is_passed_over_on_resume(tmp_path, caplog):
    """A flipped byte keeps the file's size and its safetensors header: it loads, so only the checksum tells.
    load_newest must check it and fall back to the older checkpoint, not resume on the damaged weights."""
    import logging

    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=4), {}, keep=2)
    newest = checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=7), {}, keep=2)
    flip_a_byte(newest / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="simpo_exp.checkpoint"):
        path, state = checkpoint.load_newest(tmp_path, model, opt, sched, {})
    assert path.name == "step-000004" and state.step == 4
    assert "step-000007 is damaged and skipped: model.safetensors does not match its checksum" in caplog.text


def test_weights_in_a_checkpoints_subfolders_follow_the_umask_too(tmp_path):
    import os

    from simpo_exp.inference.files import readable_as_umask, umask

    nested = tmp_path / "checkpoint-4" / "pytorch_model_fsdp_0"
    nested.mkdir(parents=True)
    for f in (tmp_path / "checkpoint-4" / "model.safetensors", nested / "shard.safetensors"):
        f.write_bytes(b"w")
        os.chmod(f, 0o600)  # as safetensors 0.8 leaves them
    readable_as_umask(tmp_path)
    modes = {oct(f.stat().st_mode & 0o777) for f in tmp_path.rglob("*.safetensors")}
    assert modes == {oct(0o666 & ~umask())}


def test_a_missing_file_is_named_and_one_that_cannot_be_read_fails_the_check(saved, monkeypatch):
    """A file gone is named (the warning and the "no intact checkpoint" error say which); an I/O error while
    checking is no pass: the checkpoint is skipped, not loaded unchecked."""
    import errno

    def broken_disk(path, algorithm):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint, "file_hash", broken_disk)
    assert checkpoint.verify(saved) == "cannot be read (Input/output error)"
    monkeypatch.undo()
    assert checkpoint.verify(saved) is None
    (saved / "rng.safetensors").unlink()
    assert checkpoint.verify(saved) == "rng.safetensors is missing"


def test_an_fsdp_checkpoint_is_read_with_the_state_dict_type_it_was_written_with(tmp_path):
    """Written as SHARDED_STATE_DICT and resumed under FULL_STATE_DICT (the launcher file edited in between), one
    process looked for a whole-model file while the others waited in its broadcast, for the collective timeout
    (30 minutes), then failed naming neither; the other way, a bare AssertionError. Refused by name, before loading."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import StateDictType

    from simpo_exp.train import checkpoint_engine

    plugin = SimpleNamespace(fsdp_version=2, state_dict_type=StateDictType.SHARDED_STATE_DICT)
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    cfg = SimpleNamespace(hardware=SimpleNamespace(checkpoint_format="accelerate"))
    assert checkpoint_engine(cfg, fsdp) == "FSDP2 SHARDED_STATE_DICT"
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), lambda s: 1.0)
    tmp = checkpoint.start(tmp_path, 2, None)
    (tmp / checkpoint.ENGINE_DIR).mkdir()
    (tmp / checkpoint.ENGINE_DIR / "pytorch_model_fsdp_0").write_bytes(b"shards")
    path = checkpoint.finish(tmp_path, tmp, None, None, sched, checkpoint.TrainState(step=2), {}, 2, engine="FSDP")
    loaded = []
    for written, reading in (
        ("FSDP2 SHARDED_STATE_DICT", "FSDP2 FULL_STATE_DICT"),
        ("FSDP1 FULL_STATE_DICT", "FSDP2 FULL_STATE_DICT"),
    ):
        state = json.loads((path / "state.json").read_text()) | {"engine": written}
        (path / "state.json").write_text(json.dumps(state))
        with pytest.raises(
            checkpoint.CheckpointError,
            match=f"as {written}'s accelerate .* to read {reading}'s .*"
            "the launcher's fsdp_version and fsdp_state_dict_type",
        ):
            checkpoint.load(path, None, None, sched, {}, load_engine_state=loaded.append, engine=reading)
    assert loaded == []
    for written in ("FSDP", "FSDP2 FULL_STATE_DICT"):  # one recorded before the type was, and the same type: read
        (path / "state.json").write_text(
            json.dumps(json.loads((path / "state.json").read_text()) | {"engine": written})
        )
        checkpoint.load(path, None, None, sched, {}, load_engine_state=loaded.append, engine="FSDP2 FULL_STATE_DICT")
    assert len(loaded) == 2
