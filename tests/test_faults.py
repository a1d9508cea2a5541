"""Faults a cluster produces: damaged checkpoints, a full disk, a preempted and re-run sweep, numbers
that cannot train. Each is a real run of the embedded default with short overrides."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from simpo_exp import checkpoint
from simpo_exp.finished import FINISHED
from simpo_exp.tracking import MEASURED_METRICS
from tests.runs import start_module
from tests.test_reliability import _poison, _tiny_config, weights
from tests.test_run import read_metrics, simpo

# 6 steps, checkpoints at 2 and 4 (both kept), evals at 3 and 6
RUN = [
    "max_steps=6",
    "save_steps=2",
    "eval_steps=3",
    "logging_steps=2",
    "logger=none",
    "eval_on_start=false",
    "num_generations=0",
    "dataset.synthetic.num_train=64",
    "dataset.synthetic.num_test=16",
    "per_device_train_batch_size=8",
    "gradient_accumulation_steps=1",
]


SWEEP = ["--multirun", "beta=2,5", *RUN]  # beta=2 is the default: its job is RUN's run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`--multirun beta=2,5` over RUN, run once: the re-run test preempts its second job; its first job is
    the finished run the damaged-checkpoint tests copy (only the re-run test writes into this sweep)."""
    sweep_dir = tmp_path_factory.mktemp("faults") / "sweep"
    res = simpo(*SWEEP, f"hydra.sweep.dir={sweep_dir}", cwd=sweep_dir.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep_dir


@pytest.fixture(scope="module")
def finished_run(sweep):
    run_dir = next(p for p in sorted(sweep.iterdir()) if p.is_dir() and "beta=2" in p.name)
    assert [p.name for p in checkpoint.checkpoint_dirs(run_dir)] == ["step-000002", "step-000004"]
    return run_dir


def killed_copy(finished_run: Path, dest: Path) -> Path:
    """The finished run as if killed after its last checkpoint: no model, summary or finished marker."""
    shutil.copytree(finished_run, dest)
    shutil.rmtree(dest / "model")
    (dest / "summary.json").unlink()
    (dest / FINISHED).unlink()
    return dest


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path):
    run_dir = killed_copy(finished_run, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step-000004" / "model.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # a truncated copy
    assert "model.safetensors has" in checkpoint.verify(newest.parent)

    res = simpo(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)  # the same command again
    assert res.returncode == 0, res.stderr[-3000:]
    log = (run_dir / "__main__.log").read_text()
    assert "step-000004 is damaged and skipped: model.safetensors has" in log
    assert "resumed from" in log and "step-000002 (step 2)" in log
    # the same result as the uninterrupted run: summary, weights and every logged record
    done, again = (json.loads((d / "summary.json").read_text()) for d in (finished_run, run_dir))
    for key, value in done.items():
        if key.startswith(("eval/", "train/")) and key not in MEASURED_METRICS:
            assert again[key] == value, key
    wa, wb = weights(finished_run), weights(run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in MEASURED_METRICS} for r in rs]  # noqa: E731
    assert strip(read_metrics(run_dir)) == strip(read_metrics(finished_run))
    assert checkpoint.verify(run_dir / "checkpoints" / "step-000004") is None  # written again, intact


def test_every_checkpoint_damaged_stops_naming_them(finished_run, tmp_path):
    run_dir = killed_copy(finished_run, tmp_path / "run")
    weights_file = run_dir / "checkpoints" / "step-000002" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, wrong checksum
    weights_file.write_bytes(bytes(data))
    (run_dir / "checkpoints" / "step-000004" / "optimizer.safetensors").write_bytes(b"")
    res = simpo(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"no intact checkpoint in {run_dir / 'checkpoints'}" in res.stderr
    assert "step-000002: model.safetensors does not match its checksum" in res.stderr
    assert "step-000004: optimizer.safetensors has 0 bytes" in res.stderr
    assert "resume=false" in res.stderr


def test_a_checkpoint_without_checksums_still_loads(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=3), {}, keep=2)
    assert set(json.loads((path / checkpoint.MARKER).read_text())["files"]) == {
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    }
    (path / checkpoint.MARKER).write_text("")  # the marker of checkpoints written before checksums
    found, state = checkpoint.load_newest(tmp_path, model, opt, sched, {})
    assert found == path and state.step == 3


def test_a_failed_save_keeps_earlier_checkpoints_and_the_run_resumes(compose, tmp_path, monkeypatch, caplog):
    from simpo_exp.train import train

    real, calls = checkpoint.save_model, {"n": 0}

    def disk_full_on_third(model, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            Path(filename).write_bytes(b"\0" * 1000)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(model, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_model", disk_full_on_third)
    extra = ("max_steps=5", "save_steps=1", "save_total_limit=3", "per_device_train_batch_size=8")
    cfg = _tiny_config(compose, tmp_path, *extra)
    with pytest.raises(checkpoint.CheckpointSaveError) as err:
        train(cfg)
    message = str(err.value)
    run_dir = tmp_path / "run"
    assert f"could not write checkpoint {run_dir / 'checkpoints' / 'step-000003'}" in message
    assert "No space left on device" in message and "bytes" in message and "free" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001", "step-000002"]  # no .tmp
    assert all(checkpoint.verify(p) is None for p in checkpoint.checkpoint_dirs(run_dir))

    monkeypatch.setattr(checkpoint, "save_model", real)  # space freed: the same run again
    with caplog.at_level(logging.INFO, logger="simpo_exp.train"):
        resumed = train(_tiny_config(compose, tmp_path, *extra))
    assert any("resumed from" in r.message and "step-000002" in r.message for r in caplog.records)
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3, 4, 5]
    fresh = train(_tiny_config(compose, tmp_path / "fresh", *extra))  # uninterrupted, for comparison
    for key, value in fresh.items():
        if key.startswith(("eval/", "train/")) and key not in MEASURED_METRICS:
            assert resumed[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key


def test_short_disk_is_warned_about_at_start(tmp_path, monkeypatch, caplog):
    model = torch.nn.Linear(100, 100)  # 10,100 float32 weights: 40,400 bytes, 121,200 with AdamW's moments
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=250_000))
    with caplog.at_level(logging.WARNING, logger="simpo_exp.checkpoint"):
        assert checkpoint.check_space(tmp_path, model, keep=1, save_model=False) == 121_200
    assert not caplog.records  # two checkpoints (one being written) fit in 250,000 bytes
    with caplog.at_level(logging.WARNING, logger="simpo_exp.checkpoint"):
        checkpoint.check_space(tmp_path, model, keep=2, save_model=True)
    assert "250,000 bytes" in caplog.text and "3 checkpoints" in caplog.text and "404,000 bytes" in caplog.text
    # LoRA-like: a frozen base of 10,100 bf16 weights and 808 trained float32 ones. A checkpoint keeps the trained
    # ones and their moments (9,696 bytes), not the base (16 GB of an 8B model's 0.2 GB checkpoint were counted);
    # the model is written merged in float32 (10,100 + 808 weights, 43,632 bytes)
    base, adapter = torch.nn.Linear(100, 100).to(torch.bfloat16), torch.nn.Linear(100, 8)
    base.requires_grad_(False)
    lora = torch.nn.ModuleDict({"base": base, "adapter": adapter})
    assert checkpoint.estimated_bytes(lora) == 3 * 808 * 4
    # through an engine's save_state (FSDP, ZeRO) the module is written whole, its frozen base included
    assert checkpoint.estimated_bytes(lora, whole=True) == 10_100 * 2 + 3 * 808 * 4
    assert checkpoint.check_space(tmp_path, lora, keep=1, save_model=False, whole=True) == 10_100 * 2 + 3 * 808 * 4
    # DeepSpeed under bf16: the bf16 module beside a float32 master copy and float32 moments (14 bytes a parameter,
    # where 6 were counted), and model/ written from the master copy in float32
    half = torch.nn.Linear(100, 100).to(torch.bfloat16)
    assert checkpoint.estimated_bytes(half, whole=True, master_copy=True) == 10_100 * (2 + 12)
    assert checkpoint.model_bytes(half, master_copy=True) == 10_100 * 4 == 2 * checkpoint.model_bytes(half)
    assert checkpoint.model_bytes(lora) == (10_100 + 808) * 4
    # save_dtype=bfloat16 writes every floating weight in 2 bytes (a LoRA merge or float32 master weights included)
    assert checkpoint.model_bytes(lora, save_dtype="bfloat16") == (10_100 + 808) * 2
    assert checkpoint.model_bytes(half, master_copy=True, save_dtype="bfloat16") == 10_100 * 2


def test_a_rerun_sweep_trains_only_the_unfinished_job(sweep, tmp_path):
    args = [*SWEEP, f"hydra.sweep.dir={sweep}"]
    done, killed = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert "beta=5" in killed.name
    before = (done / "metrics.jsonl").read_bytes()
    # the second job is preempted after its last checkpoint: its final outputs never got written
    shutil.rmtree(killed / "model")
    for name in ("summary.json", FINISHED):
        (killed / name).unlink()

    res = simpo(*args, cwd=tmp_path)  # the same sweep again
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{done.resolve()}: already finished with this config; skipped" in res.stdout
    assert f"{killed.resolve()}: already finished" not in res.stdout
    assert (done / "metrics.jsonl").read_bytes() == before  # not trained again
    assert "resumed from" not in (done / "__main__.log").read_text()
    assert "resumed from" in (killed / "__main__.log").read_text()  # from its step-4 checkpoint
    assert json.loads((killed / "summary.json").read_text())["train/global_step"] == 6
    assert [r["step"] for r in read_metrics(killed) if "train/loss" in r] == [2, 4, 6]


@pytest.mark.parametrize("override", ["beta=inf", "learning_rate=inf", "gamma_beta_ratio=-inf"])
def test_infinite_values_are_refused_before_anything_loads(tmp_path, override):
    run_dir = tmp_path / "run"
    res = simpo(override, *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 2
    assert f"invalid config value {override}: must be finite" in res.stderr and "Traceback" not in res.stderr
    assert not (run_dir / "data_report.json").exists() and not (run_dir / "metrics.jsonl").exists()


def test_empty_data_file_is_named_as_empty(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = simpo("dataset=local", f"dataset.sources.local.path={empty}", *RUN, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{empty} is empty (0 bytes)" in res.stderr


def test_skipped_steps_are_reported_and_a_run_with_no_good_step_fails(compose, tmp_path, monkeypatch, capsys):
    from simpo_exp.train import NonFiniteError, train

    _poison(monkeypatch, {2})
    summary = train(_tiny_config(compose, tmp_path, "max_steps=3", "per_device_train_batch_size=8"))
    assert summary["train/skipped_steps"] == 1
    table = capsys.readouterr().out.split("run directory:")[1]
    assert "train/skipped_steps" in table and table.split("train/skipped_steps")[1].split()[0] == "1"

    _poison(monkeypatch, set(range(1, 100)))
    cfg = _tiny_config(compose, tmp_path / "bad", "max_steps=3", "max_bad_steps=10", "per_device_train_batch_size=8")
    with pytest.raises(NonFiniteError, match="all 3 steps had a non-finite loss"):
        train(cfg)
    assert not (tmp_path / "bad" / "run" / "summary.json").exists()


def test_usr2_saves_the_step_it_reached_and_the_rerun_resumes_there(finished_run, tmp_path):
    """submitit's warning before a time limit or a preemption (USR2): the run ends the step it is in,
    saves a verified checkpoint of that step and exits; the same command resumes from exactly there."""
    run_dir = tmp_path / "run"
    # no periodic checkpoints (only the signal's), and a record per step to know which step was reached
    args = [*RUN, "save_steps=100", "logging_steps=1", f"hydra.run.dir={run_dir}"]
    proc = start_module("simpo_exp", *args, cwd=tmp_path)  # forked from the test server, not waited for
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):  # a step has been trained
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR2, err[-3000:]
    saved = checkpoint.checkpoint_dirs(run_dir)
    trained = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(saved) == 1 and trained == list(range(1, len(trained) + 1)) and len(trained) < 6
    assert saved[0].name == f"step-{trained[-1]:06d}"  # the step it was in when the signal came
    assert checkpoint.verify(saved[0]) is None
    log = (run_dir / "__main__.log").read_text()
    assert f"stopped by SIGUSR2 after step {trained[-1]}, checkpoint saved" in log
    assert not (run_dir / "summary.json").exists()

    res = simpo(*args, cwd=tmp_path)  # the same command again, as the requeued job runs it
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {saved[0]} (step {trained[-1]})" in (run_dir / "__main__.log").read_text()
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    done, again = (json.loads((d / "summary.json").read_text()) for d in (finished_run, run_dir))
    evals = [k for k in done if k.startswith("eval/") and k not in MEASURED_METRICS]
    assert evals and all(again[k] == pytest.approx(done[k], rel=1e-6, nan_ok=True) for k in evals), evals


def test_a_write_refused_inside_safetensors_is_a_failed_save_too(tmp_path):
    """A full disk met while safetensors writes raises its own SafetensorError, not an OSError. Here the
    process may write files of 50 kB at most (RLIMIT_FSIZE, its signal ignored, so the write fails with EFBIG
    as on a full disk); a 160 kB model: the save stops with CheckpointSaveError and no staging directory."""
    code = f"""
import resource, signal, sys, torch
from simpo_exp import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
model = torch.nn.Linear(200, 200)
opt = torch.optim.AdamW(model.parameters())
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
try:
    checkpoint.save({str(tmp_path)!r}, model, opt, sched, checkpoint.TrainState(step=1), {{}}, keep=2)
except checkpoint.CheckpointSaveError as e:
    print("refused:", e)
    sys.exit(3)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "could not write checkpoint" in res.stdout and "File too large" in res.stdout
    assert list((tmp_path / "checkpoints").iterdir()) == []


# ----------------------------------------------------------------------------- a folder another job works in
def test_a_folder_another_job_works_in_is_refused_by_every_stage(tmp_path):
    """Two jobs in one folder (a requeue while the old job lives, one hydra.run.dir given twice, two runs started in
    the same second) both ran: their metrics interleaved in one metrics.jsonl, one deleted the other's checkpoint
    being written, and the folder's config, summary and model were whichever wrote last. Here this test process
    holds the folders, as a working job would."""
    from simpo_exp.evaluate.run import evaluate_all  # noqa: F401  (the stage the third command runs)
    from simpo_exp.rundir import hold_folder
    from tests.runs import run_module

    run = tmp_path / "run"
    hold_folder(run, "test")
    (run / ".hydra" / "held").mkdir(parents=True)  # the working job's own .hydra files, as it keeps them
    (run / ".hydra" / "held" / "config.yaml").write_text("beta: 2.0\n")
    res = simpo("logger=none", "max_steps=2", "beta=7", f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 2 and f"{run} is in use by another job (pid {os.getpid()} on " in res.stderr
    assert "give this command a folder of its own" in res.stderr and not (run / "metrics.jsonl").exists()
    assert (run / ".hydra" / "config.yaml").read_text() == "beta: 2.0\n"  # Hydra wrote beta 7 there; put back

    gen = tmp_path / "gen"
    hold_folder(gen, "test")  # lets go of the run folder
    res = run_module("simpo_exp.generate", "logger=none", f"hydra.run.dir={gen}", cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and f"{gen} is in use by another job" in res.stderr and not (gen / "shards").exists()

    trained = tmp_path / "trained"
    (trained / ".hydra").mkdir(parents=True)
    (trained / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (trained / "model").mkdir()
    (trained / "model" / "config.json").write_text("{}")
    (trained / "finished.json").write_text("{}")
    hold_folder(trained / "eval", "test")
    res = run_module("simpo_exp.evaluate", str(trained), "benchmark=rule", f"hydra.run.dir={tmp_path / 'ev'}",
                     cwd=tmp_path, timeout=300)  # fmt: skip
    assert res.returncode == 2 and "another evaluate command is working on this run" in res.stderr, res.stderr
    hold_folder(tmp_path / "elsewhere", "test")  # the run folder is free again: it trains
    res = simpo("logger=none", "max_steps=2", "eval_steps=0", "eval_on_start=false", f"hydra.run.dir={run}",
                "dataset.synthetic.num_train=64", "dataset.synthetic.num_test=16", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0 and (run / "metrics.jsonl").exists(), res.stderr[-2000:]
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())  # written from the job's memory
    hydra = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert saved["max_steps"] == 2 and hydra["runtime"]["cwd"] == str(tmp_path)
    assert "max_steps=2" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())


def test_a_forked_child_does_not_keep_its_parents_folder(tmp_path):
    """Data loader workers share the parent's lock: a run killed with -9 held its folder for the seconds its
    workers took to exit, and a re-run at once was refused naming the dead process."""
    from simpo_exp.rundir import hold_folder

    script = (
        "import os, sys, time\n"
        "from simpo_exp.rundir import hold_folder\n"
        f"hold_folder({str(tmp_path / 'run')!r}, 'test')\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    os.close(1), os.close(2)\n"  # the test reads the parent's output to its end
        "    time.sleep(30)\n"  # a worker still alive when its parent dies
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "os._exit(0)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    child = int(res.stdout.strip())
    try:
        os.kill(child, 0)  # still alive
        hold_folder(tmp_path / "run", "test")  # the parent is gone, its child lives: the folder is free
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_working_job_keeps_the_hydra_files_it_started_with(tmp_path, monkeypatch):
    """Hydra rewrites .hydra/ for a command before the command can be refused; a refused second job there while the
    first was still in set-up left the first run's record saying the second's config."""
    from simpo_exp import runinfo

    run, other = tmp_path / "run", tmp_path / "other"
    for folder, beta in ((run, 5), (other, 7)):
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text(f"beta: {beta}\n")  # 5: the refused command's
    monkeypatch.setattr(runinfo, "_started_with", {str(run.resolve()): {"config.yaml": "beta: 2\n"}})
    runinfo.keep_run_config(run)
    assert (run / ".hydra" / "config.yaml").read_text() == "beta: 2\n"
    assert (run / ".hydra" / runinfo.RAN_WITH / "config.yaml").read_text() == "beta: 2\n"
    runinfo.keep_run_config(other)  # another folder's record is its own
    assert (other / ".hydra" / runinfo.RAN_WITH / "config.yaml").read_text() == "beta: 7\n"


def test_a_sweep_job_whose_folder_another_job_holds_is_refused_and_the_sweep_goes_on(tmp_path):
    """It ended the whole sweep (under submitit, with a traceback, and 'sweep finished' after it)."""
    from simpo_exp.rundir import hold_folder

    sweep = tmp_path / "sweep"
    hold_folder(sweep / "0", "test")
    fast = ["max_steps=2", "eval_steps=0", "eval_on_start=false", "logger=none"]
    fast += ["dataset.synthetic.num_train=64", "dataset.synthetic.num_test=16"]
    res = simpo(
        "--multirun", "beta=2,5", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}", *fast, cwd=tmp_path
    )
    assert res.returncode == 1 and "1 of 2 jobs FAILED" in res.stderr, res.stderr[-3000:]
    assert "FolderInUse" in res.stderr and "is in use by another job" in res.stderr
    assert (sweep / "1" / "summary.json").exists() and not (sweep / "0" / "metrics.jsonl").exists()
