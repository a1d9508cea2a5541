"""A killed run resumes with nothing lost; bad numbers and bad input never cost a run silently."""

import json
import math
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simpo_exp.tracking import MEASURED_METRICS
from tests.runs import start_module
from tests.test_run import read_metrics, simpo

RUN = [
    "max_steps=12",
    "save_steps=3",
    "eval_steps=4",
    "logging_steps=2",
    "logger=none",
    "eval_on_start=false",
    "num_generations=0",  # sample texts are not compared: only the metrics, summary and weights are
    "dataset.synthetic.num_train=96",
    "dataset.synthetic.num_test=32",
    "per_device_train_batch_size=8",
    "gradient_accumulation_steps=2",
]  # 6 micro-batches an epoch: the resumed run crosses epochs


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model" / "model.safetensors")


def launch(run_dir: Path, *extra: str):
    """The run started and not waited for (forked from the test server: tests/runs.py ``start_module``)."""
    return start_module("simpo_exp", *RUN, f"hydra.run.dir={run_dir}", *extra, cwd=run_dir.parent)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list((run_dir / "checkpoints").glob("step-*[0-9]/COMPLETE")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    res = simpo(*RUN, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key, value in sa.items():
        if key.startswith(("eval/", "train/")) and key not in MEASURED_METRICS:
            assert sb[key] == value, key  # bit-for-bit on CPU
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in MEASURED_METRICS} for r in rs]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))


def test_same_seed_same_metrics(uninterrupted, tmp_path):
    res = simpo(*RUN, f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(uninterrupted, tmp_path / "again")


def test_sigkill_then_rerun_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir)
    wait_for_checkpoint(run_dir, proc)
    time.sleep(random.uniform(0.0, 1.5))  # a random point after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before the kill landed")
    assert not (run_dir / "summary.json").exists()
    res = simpo(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)  # the same command again
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in (run_dir / "__main__.log").read_text()
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12]  # no duplicated or missing steps
    assert_same_run(uninterrupted, run_dir)


def test_sigterm_saves_a_checkpoint_before_exiting(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "save_steps=100")  # no periodic checkpoints: only the one SIGTERM causes
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    saved = list((run_dir / "checkpoints").glob("step-*[0-9]/COMPLETE"))
    assert len(saved) == 1
    # compare tells the stopped run from a running one (it showed "running ... at step N" before)
    from simpo_exp.compare import load_run

    stopped = load_run(run_dir)
    step = int(saved[0].parent.name.split("-")[1])
    assert stopped.status == "stopped" and f"stopped by SIGTERM after step {step}" in stopped.error
    before = json.loads((saved[0].parent / "state.json").read_text())["train_state"]["runtime_s"]
    res = simpo(*RUN, "save_steps=100", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(uninterrupted, run_dir)
    assert load_run(run_dir).status == "done" and not (run_dir / "stopped.json").exists()
    env = json.loads((run_dir / "env.json").read_text())  # each start's record: the first one was not overwritten
    assert env["started_at_step"] == step and [s["started_at_step"] for s in env["earlier_starts"]] == [0]
    # the run time goes on from the checkpoint's (it counted the last start alone)
    assert 0 < before < json.loads((run_dir / "summary.json").read_text())["runtime_s"]


def test_incompatible_checkpoint_is_refused_and_resume_false_starts_fresh(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    # what a kill after step 4 leaves (with the uninterrupted run's later checkpoints): checkpoints, the
    # metrics rows so far, no summary. A fresh start must drop both; a resume would trim the rows to its step.
    shutil.copytree(uninterrupted / "checkpoints", run_dir / "checkpoints")
    rows = [r for r in read_metrics(uninterrupted) if r["step"] <= 4]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [2, 4]
    (run_dir / "summary.json").write_text('{"eval/rewards/accuracies": 0.9}')  # as if an earlier finish wrote it
    res = simpo(*RUN, "beta=5", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 2
    assert "different config" in res.stderr and "beta: checkpoint 2.0, now 5.0" in res.stderr
    assert (run_dir / "summary.json").exists()  # a refused resume trains nothing: it removes nothing
    res = simpo(*RUN, "beta=5", "resume=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_a_resume_trims_the_generations_and_a_fresh_start_drops_the_earlier_runs_files(uninterrupted, tmp_path):
    """generations.jsonl is trimmed to the checkpoint's step as metrics.jsonl is; a fresh start (resume=false)
    removes what the earlier run left: its records, its W&B run id (which a resume would continue) and offline
    files (which a sync would upload), its summary."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", run_dir / "checkpoints")  # the newest: step 9
    rows = [{"step": s, "completion": "x"} for s in (0, 4, 8, 12)]
    (run_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = simpo(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    kept = (run_dir / "generations.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [0, 4, 8]

    stale = {"wandb_run.json": '{"id": "old-run"}', "summary.json": '{"stale": 1}', "generations.jsonl": ""}
    for name, text in stale.items():
        (run_dir / name).write_text(text)
    (run_dir / "wandb" / "offline-run-old").mkdir(parents=True)
    (run_dir / "eval" / "rule").mkdir(parents=True)  # the earlier model's benchmark results: compare would show them
    (run_dir / "eval" / "rule" / "results.json").write_text('{"metrics": {"win_rate": 28.9}}')
    (run_dir / "model").mkdir(exist_ok=True)  # the earlier run's trained model: evaluate scored it as this run's
    (run_dir / "model" / "config.json").write_text("{}")
    res = simpo(*RUN, "max_steps=2", "resume=false", "save_model=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    gone = ("wandb_run.json", "generations.jsonl", "wandb", "eval", "model")
    assert not any((run_dir / name).exists() for name in gone)
    assert json.loads((run_dir / "summary.json").read_text())["train/global_step"] == 2


def test_a_model_is_a_runs_trained_model_only_once_the_run_is_recorded_finished(tmp_path):
    """A model/ without finished.json is a run's that stopped or failed while writing it (or an earlier run's):
    evaluate scored it as trained. And a fresh start keeps the folder this run trains from (model.path)."""
    from types import SimpleNamespace

    from simpo_exp.evaluate.runs import has_model
    from simpo_exp.train import earlier_model

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert not has_model(tmp_path)
    (tmp_path / "finished.json").write_text("{}")
    assert has_model(tmp_path)
    (tmp_path / "finished.json").unlink()
    (tmp_path / "summary.json").write_text("{}")  # a run trained before finished.json was written: its summary
    assert has_model(tmp_path)
    assert earlier_model(SimpleNamespace(model=SimpleNamespace(path="")), tmp_path) == ["model"]
    assert earlier_model(SimpleNamespace(model=SimpleNamespace(path=str(tmp_path / "model"))), tmp_path) == []
    assert earlier_model(SimpleNamespace(model=SimpleNamespace(path="org/hub-model")), tmp_path) == ["model"]
    (tmp_path / "model" / "sub").mkdir()  # a model inside it (a checkpoint's export): the folder is kept too
    assert earlier_model(SimpleNamespace(model=SimpleNamespace(path=str(tmp_path / "model" / "sub"))), tmp_path) == []


def test_a_fresh_start_drops_an_earlier_finish_and_its_records(tmp_path):
    """resume=false over a finished run: its finished.json kept made a model/ cut short by a kill in this run's save
    count as trained (as a resume's stale one did), and its summary and metrics were another run's."""
    from types import SimpleNamespace

    from simpo_exp.train import start_or_resume

    names = ("finished.json", "summary.json", "metrics.jsonl", "generations.jsonl", "wandb_run.json")
    for name in names:
        (tmp_path / name).write_text("{}")
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    cfg = SimpleNamespace(resume=False, model=SimpleNamespace(path=""))
    state = start_or_resume(cfg, tmp_path, SimpleNamespace(is_main_process=True), None, None, None, {}, {})
    assert state.step == 0 and not any((tmp_path / name).exists() for name in names)
    assert not (tmp_path / "checkpoints").exists()


def test_a_reference_methods_start_is_checked_on_what_its_last_start_recorded(tmp_path):
    """check_same_start: weights and architecture each checked where env.json recorded them (a run started before
    they were recorded resumes), and refused by name where they differ."""
    from types import SimpleNamespace

    from simpo_exp.checkpoint import DifferentConfigCheckpoint
    from simpo_exp.train import check_same_start

    cfg = SimpleNamespace(model=SimpleNamespace(path="/models/x", name="x"))
    (tmp_path / "env.json").write_text("{}")
    check_same_start(tmp_path, cfg, "w1", "a1")
    (tmp_path / "env.json").write_text(json.dumps({"start_weights": "w1"}))
    check_same_start(tmp_path, cfg, "w1", "a1")
    (tmp_path / "env.json").write_text(json.dumps({"start_weights": "w0", "start_architecture": "a1"}))
    with pytest.raises(DifferentConfigCheckpoint, match="other starting weights .*weights w0 then, w1 now"):
        check_same_start(tmp_path, cfg, "w1", "a1")
    (tmp_path / "env.json").write_text(json.dumps({"start_weights": "w1", "start_architecture": "a0"}))
    with pytest.raises(DifferentConfigCheckpoint, match="another model config .*architecture a0 then, a1 now"):
        check_same_start(tmp_path, cfg, "w1", "a1")
    check_same_start(tmp_path, cfg, "w1", None)  # no architecture taken now: the weights alone


def test_only_complete_checkpoints_count_and_old_ones_are_pruned(tmp_path):
    from simpo_exp import checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=step), {}, keep=2)
    (tmp_path / "checkpoints" / "step-000004.tmp").mkdir()  # a save killed half-way
    half = tmp_path / "checkpoints" / "step-000005"
    half.mkdir()  # no COMPLETE marker
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000002", "step-000003"]
    state = checkpoint.load(checkpoint.checkpoint_dirs(tmp_path)[-1], model, opt, sched, {})
    assert state.step == 3
    assert not any(p.suffix == ".bin" or p.suffix == ".pt" for p in (tmp_path / "checkpoints").rglob("*"))


def test_a_checkpoints_files_are_on_the_disk_before_its_marker_and_the_pruning(tmp_path, monkeypatch):
    """Only the COMPLETE marker and the checkpoints folder were flushed: after a machine went down in the page cache's
    write-back, the new checkpoint's marker could name files never written (their checksums fail) while the older
    checkpoint to fall back to was already pruned (save_total_limit=1: nothing intact left)."""
    import os

    from simpo_exp import checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=1), {}, keep=1)
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=2), {}, keep=1)
    files = [Path(p).name for p in synced]
    marker = next(i for i, name in enumerate(files) if name.startswith(checkpoint.MARKER))
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert name in files[:marker], (name, files)
    (final,) = checkpoint.checkpoint_dirs(tmp_path)
    assert final.name == "step-000002"
    assert str(final.parent) in synced[marker + 1 :], synced  # the rename into it, flushed before the pruning


def _tiny_config(compose, tmp_path, *extra):
    from simpo_exp.config import to_config

    cfg = to_config(
        compose(
            "logger=none",
            "eval_on_start=false",
            "num_generations=0",
            "save_model=false",
            "dataset.synthetic.num_train=64",
            "dataset.synthetic.num_test=16",
            "logging_steps=1",
            "eval_steps=0",
            *extra,
        )
    )
    cfg.output_dir = str(tmp_path / "run")
    cfg.progress_bar = False
    return cfg


def _poison(monkeypatch, bad_calls):
    """Make the preference loss NaN on the given (1-based) training calls."""
    import simpo_exp.objective as objective_mod

    real, calls = objective_mod.preference_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in bad_calls:
                return out._replace(losses=out.losses * float("nan"))
        return out

    monkeypatch.setattr(objective_mod, "preference_loss", poisoned)


def test_a_non_finite_step_is_skipped_and_counted(compose, tmp_path, monkeypatch):
    from simpo_exp.train import train

    _poison(monkeypatch, {2})
    cfg = _tiny_config(compose, tmp_path, "max_steps=4", "per_device_train_batch_size=8")
    summary = train(cfg)
    assert summary["train/skipped_steps"] == 1
    rows = read_metrics(tmp_path / "run")
    assert [r["train/skipped_steps"] for r in rows if "train/loss" in r] == [0, 1, 1, 1]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r and r["step"] != 2)


def test_bad_steps_apart_are_not_in_a_row_and_the_last_step_is_logged_and_evaluated(compose, tmp_path, monkeypatch):
    """Steps 2 and 4 non-finite with max_bad_steps=1: a good step between them resets the count, so the run
    finishes (two in a row would stop it). Its last step, 5, off the logging and eval interval of 2, is logged and
    evaluated all the same: the summary's figures are the final model's, not step 4's."""
    from simpo_exp.train import train

    _poison(monkeypatch, {2, 4})
    extra = ["max_steps=5", "max_bad_steps=1", "logging_steps=2", "eval_steps=2", "per_device_train_batch_size=8"]
    summary = train(_tiny_config(compose, tmp_path, *extra))
    assert summary["train/skipped_steps"] == 2
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 5]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)  # the skipped steps in no mean
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4, 5]
    assert summary["eval/loss"] == next(r["eval/loss"] for r in rows if r["step"] == 5 and "eval/loss" in r)


def test_a_resumed_fp16_run_goes_on_from_its_loss_scale(compose, tmp_path, monkeypatch):
    """hardware.mixed_precision=fp16 (one GPU or DDP, safetensors checkpoints): accelerate's GradScaler was not in
    the checkpoint, so a resumed run began again at a scale of 65536: where the scale had settled lower, its first
    steps overflowed and were skipped again. A CPU GradScaler stands in for the GPU's here (accelerate makes none on
    a CPU), its scale doubling after every step."""
    import accelerate
    import torch

    from simpo_exp.train import train

    real_init, scales = accelerate.Accelerator.__init__, []

    def with_scaler(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
        update = self.scaler.update
        self.scaler.update = lambda *a: (update(*a), scales.append(self.scaler.get_scale()))[0]

    monkeypatch.setattr(accelerate.Accelerator, "__init__", with_scaler)
    extra = ("max_steps=4", "save_steps=2", "per_device_train_batch_size=8")
    train(_tiny_config(compose, tmp_path, *extra))
    assert scales == [2.0**5, 2.0**6, 2.0**7, 2.0**8]
    run_dir = tmp_path / "run"
    state = json.loads((run_dir / "checkpoints" / "step-000002" / "state.json").read_text())["train_state"]
    assert state["grad_scaler"]["scale"] == 2.0**6
    (run_dir / "finished.json").unlink()  # as if stopped after the step-2 checkpoint
    scales.clear()
    train(_tiny_config(compose, tmp_path, *extra))
    assert scales == [2.0**7, 2.0**8]  # steps 3 and 4 as before, not 2**5, 2**6 from the initial scale


@pytest.mark.parametrize("method", [[], ["loss=cpo"]])
def test_two_micro_batches_of_8_step_as_one_batch_of_16_clipped_at_max_grad_norm(
    compose, tmp_path, monkeypatch, method
):
    """Through the loop: accumulation divides each micro-batch's loss by their number (accelerate's backward), so
    the gradient norm of 2 x 8 pairs is that of the same 16 pairs in one batch (the sampler draws one permutation
    whatever the batch size); and clipping is asked for at the run's max_grad_norm on every step. With an NLL term
    (CPO) each chosen token is weighed by the whole step's count, not its micro-batch's."""
    from accelerate import Accelerator

    from simpo_exp.train import train

    asked, clip = [], Accelerator.clip_grad_norm_
    monkeypatch.setattr(
        Accelerator,
        "clip_grad_norm_",
        lambda self, ps, max_norm, **kw: asked.append(max_norm) or clip(self, ps, max_norm, **kw),
    )
    norms = {}
    for batch, accum in ((16, 1), (8, 2)):
        extra = [f"per_device_train_batch_size={batch}", f"gradient_accumulation_steps={accum}", "max_steps=1"]
        train(_tiny_config(compose, tmp_path / f"{batch}x{accum}", *extra, *method, "max_grad_norm=0.5"))
        norms[accum] = [
            r["train/grad_norm"] for r in read_metrics(tmp_path / f"{batch}x{accum}" / "run") if "train/grad_norm" in r
        ]
    assert asked == [0.5] * 2
    assert len(norms[1]) == 1 and norms[2] == pytest.approx(norms[1], rel=1e-4)


def test_too_many_bad_steps_stop_the_run_naming_step_and_checkpoint(compose, tmp_path, monkeypatch):
    from simpo_exp.train import NonFiniteError, train

    _poison(monkeypatch, set(range(3, 100)))
    cfg = _tiny_config(
        compose, tmp_path, "max_steps=10", "save_steps=2", "max_bad_steps=2", "per_device_train_batch_size=8"
    )
    with pytest.raises(NonFiniteError) as err:
        train(cfg)
    message = str(err.value)
    # steps 3-5 skipped (weights untouched since step 2, so the step-4 checkpoint holds finite weights)
    assert "at step 5" in message and "last good checkpoint" in message and "step-000004" in message
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_resumed_run_goes_on_counting_its_non_finite_steps_in_a_row(compose, tmp_path, monkeypatch):
    """The count of non-finite steps in a row was not in the checkpoint: the same command run again after the
    NonFiniteError (or a resume after a preemption) counted from 0, so a diverged run trained on and, with fewer
    bad steps left than max_bad_steps, finished and was marked done. Now it stops at the same step again."""
    from simpo_exp.train import NonFiniteError, train

    _poison(monkeypatch, set(range(3, 100)))
    cfg = _tiny_config(
        compose, tmp_path, "max_steps=10", "save_steps=2", "max_bad_steps=2", "per_device_train_batch_size=8"
    )
    with pytest.raises(NonFiniteError, match="^3 consecutive .* at step 5"):
        train(cfg)
    with pytest.raises(NonFiniteError, match="^3 consecutive .* at step 5") as err:  # resumed from step 4: 2 so far
        train(cfg)
    assert "step-000004" in str(err.value)


def test_a_resume_may_change_how_a_run_runs_but_not_what_it_trains():
    """Among the hardware keys, those that change the batches, their order, the weights' precision or the
    adapters must match the checkpoint's; where and how the run runs may change (another machine, kernel)."""
    from simpo_exp.checkpoint import incompatible_keys

    saved = {"beta": 2.0, "logging_steps": 1, "hardware": {"device": "cuda", "packing": "packed", "lora": False}}
    moved = {"beta": 2.0, "logging_steps": 5, "hardware": {"device": "cpu", "packing": "none", "lora": False}}
    assert incompatible_keys(saved, moved) == []
    ordered = {"hardware": {"lora_target_modules": ["q_proj", "v_proj"]}}  # the same modules, another order
    assert incompatible_keys(ordered, {"hardware": {"lora_target_modules": ["v_proj", "q_proj"]}}) == []
    changed = {**moved, "hardware": {**moved["hardware"], "lora": True, "group_by_length": True}}
    assert incompatible_keys(saved, changed) == [
        "hardware.group_by_length: checkpoint None, now True",
        "hardware.lora: checkpoint False, now True",
    ]
    # the master copy's precision, the global batch and the adapters' shape each change what is trained (listed
    # here, not read from checkpoint.TRAINING_HARDWARE_KEYS: a key dropped from it must fail this)
    for key, ran, now in (
        ("master_weights", "fp32", "model"),
        ("effective_batch_size", 128, 64),
        ("lora_r", 16, 8),
        ("lora_alpha", 32, 16),
        ("lora_dropout", 0.05, 0.0),
        ("lora_target_modules", ["q_proj"], ["q_proj", "v_proj"]),
    ):
        before, after = {**saved, "hardware": {key: ran}}, {**moved, "hardware": {key: now}}
        assert incompatible_keys(before, after) == [f"hardware.{key}: checkpoint {ran!r}, now {now!r}"], key
    # what only evaluation reads: the eval batch (the out-of-memory message during evaluation names it), the samples
    evaluating = {"per_device_eval_batch_size": 32, "num_generations": 4, "max_new_tokens": 64}
    fewer = {"per_device_eval_batch_size": 4, "num_generations": 0, "max_new_tokens": 16}
    assert incompatible_keys({**saved, **evaluating}, {**moved, **fewer}) == []
    assert incompatible_keys({"per_device_train_batch_size": 8}, {"per_device_train_batch_size": 4})
    # how the data is tokenised and the model preset's kernel: refused before, as hardware's kernel is not
    ran = {"dataset": {"num_proc": None, "name": "a"}, "model": {"attn_implementation": "sdpa", "name": "m"}}
    now = {"dataset": {"num_proc": 8, "name": "a"}, "model": {"attn_implementation": "flash_attention_2", "name": "m"}}
    assert incompatible_keys(ran, now) == []
    assert incompatible_keys(ran, {**now, "model": {**now["model"], "name": "n"}}) == [
        "model.name: checkpoint 'm', now 'n'"
    ]


def test_a_key_added_since_a_run_was_saved_counts_only_when_it_leaves_its_default():
    """A checkpoint or finished run written before dataset.chat_format existed was refused ("checkpoint None, now
    'generation_prompt'"), though the new key's default is what the older version did; no override could help."""
    from simpo_exp.checkpoint import incompatible_keys

    saved = {"beta": 2.0, "dataset": {"name": "synthetic", "sources": {"s": {"path": "/d"}}}}
    added = {"beta": 2.0, "dataset": {"name": "synthetic", "chat_format": "generation_prompt"}}
    added["dataset"]["sources"] = {"s": {"path": "/d", "fraction": 1.0}}
    assert incompatible_keys(saved, added) == []
    added["dataset"] |= {"chat_format": "simpo_repo"}
    assert incompatible_keys(saved, added) == ["dataset.chat_format: checkpoint None, now 'simpo_repo'"]
    assert incompatible_keys({**saved, "gamma": None}, {**saved, "gamma": 1.0}) == ["gamma: checkpoint None, now 1.0"]
    # a default that changed since (model.params_b 0.0 meant "no size", as None does now); a whole new section
    assert incompatible_keys({"model": {"params_b": 0.0}}, {"model": {"params_b": None}}) == []
    assert incompatible_keys({"model": {"params_b": 0.0}}, {"model": {"params_b": 8.0}})
    new_section = {"dataset": {"name": "synthetic", "chat_format": "generation_prompt"}}
    assert incompatible_keys({}, new_section) == ["dataset.name: checkpoint None, now 'synthetic'"]


def test_a_checkpoint_of_another_number_of_processes_is_refused(tmp_path):
    """Each process's data position is its own (the batches are dealt in turn): resumed on another number of
    processes, pairs would be trained twice or never. Refused, naming both counts; the same count loads."""
    from simpo_exp import checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    two = [checkpoint.rng_state(), checkpoint.rng_state()]
    path = checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=4), {}, keep=2, rng=two)
    with pytest.raises(checkpoint.CheckpointError, match=r"written by 2 process\(es\), this run has 1"):
        checkpoint.load(path, model, opt, sched, {}, process=(0, 1))
    assert checkpoint.load(path, model, opt, sched, {}, process=(1, 2)).step == 4


def test_a_checkpoint_of_another_engine_is_refused_by_name_not_called_damaged(tmp_path):
    """DDP's safetensors checkpoint resumed under FSDP, or one engine's engine/ folder under another, failed to load
    and was reported damaged with advice to delete it: refused instead, naming both engines, and kept."""
    from simpo_exp import checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainState(step=4), {}, keep=2)
    never = lambda folder: pytest.fail("an engine checkpoint load was attempted")  # noqa: E731
    with pytest.raises(checkpoint.CheckpointError, match="one process's safetensors.*set up to read FSDP's") as e:
        checkpoint.load_newest(tmp_path, model, opt, sched, {}, never, engine="FSDP")
    assert not isinstance(e.value, checkpoint.DamagedCheckpoint)
    assert checkpoint.load_newest(tmp_path, model, opt, sched, {})[1].step == 4  # the same checkpoint, intact

    tmp = checkpoint.start(tmp_path, 8, None)
    (tmp / checkpoint.ENGINE_DIR).mkdir()
    checkpoint.finish(tmp_path, tmp, None, None, sched, checkpoint.TrainState(step=8), {}, 2, engine="DEEPSPEED")
    with pytest.raises(checkpoint.CheckpointError, match="DEEPSPEED's accelerate checkpoint.*read FSDP's"):
        checkpoint.load_newest(tmp_path, model, opt, sched, {}, never, engine="FSDP")
    with pytest.raises(checkpoint.CheckpointError, match="DEEPSPEED's accelerate checkpoint.*one process's"):
        checkpoint.load_newest(tmp_path, model, opt, sched, {})
    loaded = []
    assert checkpoint.load_newest(tmp_path, model, opt, sched, {}, loaded.append, engine="DEEPSPEED")[1].step == 8
    assert loaded and loaded[0].endswith(checkpoint.ENGINE_DIR)


def test_a_finished_run_of_another_config_is_refused_and_left_as_it_was(tmp_path):
    """A finished run without checkpoints (save_steps=0) re-run with beta=5 was wiped and trained again, exit 0;
    and a refused resume left Hydra's rewrite of .hydra/ (beta=5) and an error.json, so compare listed the run
    as failed with beta=5 beside metrics trained with beta 2."""
    from simpo_exp.compare import load_run

    run_dir = tmp_path / "run"
    short = ["max_steps=2", "save_steps=0", "eval_steps=0", "logging_steps=1", "logger=none", "num_generations=0"]
    short += ["dataset.synthetic.num_train=64", "dataset.synthetic.num_test=16", f"hydra.run.dir={run_dir}"]
    first = simpo(*short, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = (run_dir / "summary.json").read_bytes()
    again = simpo(*short, "beta=5", cwd=tmp_path)
    assert again.returncode == 2 and "different config (beta: finished with 2.0, now 5.0)" in again.stderr
    assert (run_dir / "summary.json").read_bytes() == summary and not (run_dir / "error.json").exists()
    kept = load_run(run_dir)
    assert kept.status == "done" and "beta" not in kept.overrides and kept.config["beta"] == 2.0
    # a value refused before the run started (beta=-1) left an error.json and Hydra's rewrite there too: compare
    # listed the finished run as failed with beta -1
    bad = simpo(*short, "beta=-1", cwd=tmp_path)
    assert bad.returncode == 2 and "beta=-1" in bad.stderr and "holds a run from before, left as it was" in bad.stderr
    assert (run_dir / "summary.json").read_bytes() == summary and not (run_dir / "error.json").exists()
    kept = load_run(run_dir)
    assert kept.status == "done" and "beta" not in kept.overrides and kept.config["beta"] == 2.0
    fresh = simpo(*short, "beta=5", "resume=false", cwd=tmp_path)  # asked for: trained again here
    assert fresh.returncode == 0 and load_run(run_dir).config["beta"] == 5.0


def test_a_finished_run_without_its_model_is_still_refused_to_another_config(compose, tmp_path):
    """A run finished with save_model=false (or its model/ moved away), re-run by a command that saves the model and
    sets beta=3: the config check came after "no model/: train", so it started afresh and replaced the finished
    run's summary and records without a word. The same config trains (to write the model); another is refused."""
    from simpo_exp.errors import OtherRunsDirectory
    from simpo_exp.finished import FINISHED, recorded_summary
    from simpo_exp.tracking import config_to_dict

    cfg = _tiny_config(compose, tmp_path, "max_steps=2")
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir()
    (run_dir / FINISHED).write_text(json.dumps({"config": config_to_dict(cfg)}))
    (run_dir / "summary.json").write_text('{"eval/rewards/accuracies": 0.9}')
    cfg.save_model = True
    assert recorded_summary(cfg) is None  # the same config: trained to write its model
    cfg.beta = 3.0
    with pytest.raises(OtherRunsDirectory, match=r"different config \(beta: finished with 2.0, now 3.0\)"):
        recorded_summary(cfg)
    (run_dir / "summary.json").unlink()
    with pytest.raises(OtherRunsDirectory, match="different config"):
        recorded_summary(cfg)
    for marker in ("{}", "[]", '{"config": 3}'):  # an old or hand-edited marker: trained (resumed), not a crash
        (run_dir / FINISHED).write_text(marker)
        assert recorded_summary(cfg) is None


def test_a_run_on_local_data_that_changed_since_is_neither_skipped_nor_resumed(tmp_path):
    """The on-policy loop re-pairs the generate stage's output in place and runs the same training command again:
    the finished run was skipped, its model reported as trained on the new pairs. The changed file is named, for
    a finished run and for one with checkpoints; resume=false trains on the data as it is now."""
    from simpo_exp.config import SyntheticConfig
    from simpo_exp.data.synthetic import generate

    data, run_dir = tmp_path / "data", tmp_path / "run"
    rows = generate(SyntheticConfig(num_train=64, num_test=16))
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[f"{split}_prefs"]))
    short = ["dataset=local", f"dataset.sources.local.path={data}", "max_steps=2", "save_steps=1", "eval_steps=0"]
    short += ["logging_steps=1", "logger=none", "num_generations=0", f"hydra.run.dir={run_dir}"]
    first = simpo(*short, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = json.loads((run_dir / "data_report.json").read_text())["sources"]["local"]
    assert sorted(recorded["files"]) == ["test.jsonl", "train.jsonl"] and recorded["files_root"] == str(data.resolve())
    assert "already finished with this config; skipped" in simpo(*short, cwd=tmp_path).stdout  # nothing changed
    other = simpo(*short, cwd=tmp_path, env={"RANK": "1"})  # a launch's other process: the main one says it, once
    assert other.returncode == 0 and "already finished" not in other.stdout + other.stderr, other.stderr[-3000:]

    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows["train_prefs"][::-1]))
    summary = (run_dir / "summary.json").read_bytes()
    again = simpo(*short, cwd=tmp_path)
    assert again.returncode == 2 and "on data that has changed since" in again.stderr, again.stderr[-2000:]
    assert f"dataset.sources.local ({data.resolve()}): train.jsonl changed (sha256 " in again.stderr
    assert (run_dir / "summary.json").read_bytes() == summary

    (run_dir / "finished.json").unlink()  # an unfinished run: its checkpoints are of the old data
    resumed = simpo(*short, cwd=tmp_path)
    assert resumed.returncode == 2 and "checkpoints in" in resumed.stderr and "train.jsonl changed" in resumed.stderr
    fresh = simpo(*short, "resume=false", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert json.loads((run_dir / "data_report.json").read_text())["sources"]["local"]["files"] != recorded["files"]


def test_a_finished_run_skipped_keeps_its_config_and_names_the_changes_it_did_not_apply(tmp_path):
    """A finished run skipped on a command with another eval cadence or save_dtype (changes a resume takes) kept
    Hydra's new .hydra files, so compare showed the run as run with them; and the model was not written again in
    the new dtype, without a word."""
    run_dir = tmp_path / "run"
    short = [*RUN, "max_steps=2", "eval_steps=0", "logger=none", "num_generations=0", f"hydra.run.dir={run_dir}"]
    first = simpo(*short, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    ran_with = (run_dir / ".hydra" / "config.yaml").read_text()
    again = simpo(*short, "eval_steps=1", "save_dtype=bfloat16", cwd=tmp_path)
    assert again.returncode == 0 and "already finished with this config; skipped" in again.stdout, again.stderr
    said = again.stdout + again.stderr
    assert "eval_steps: finished with 0, now 1" in said and "save_dtype: finished with None, now 'bfloat16'" in said
    assert (run_dir / ".hydra" / "config.yaml").read_text() == ran_with


def test_a_finished_run_skipped_names_the_hardware_it_did_not_run_on():
    """The changes of how a run runs (hardware keys that do not change what trains, the attention kernel) were
    passed over in silence when a finished run was skipped: re-run with hardware.mixed_precision=fp16, it said
    nothing of it."""
    from simpo_exp.finished import not_applied

    saved = {"eval_steps": 0, "hardware": {"name": "cpu", "mixed_precision": "no", "lora": False}, "model": {}}
    now = {"eval_steps": 0, "hardware": {"name": "gpu", "mixed_precision": "fp16", "lora": False}, "model": {}}
    now["model"]["attn_implementation"] = "sdpa"
    assert not_applied(saved, now) == [
        "hardware.mixed_precision: finished with 'no', now 'fp16'",
        "model.attn_implementation: finished with None, now 'sdpa'",
    ]
    assert not_applied(saved, saved) == []


def test_a_sweep_job_refused_as_another_runs_directory_is_reported(tmp_path):
    """The job disappeared from the sweep's summary (its .hydra files put back with their old times) and the sweep
    said 'sweep finished: 0 jobs', exit 0."""
    sweep = tmp_path / "sweep"
    short = ["max_steps=2", "save_steps=0", "eval_steps=0", "logging_steps=1", "logger=none", "num_generations=0"]
    short += ["dataset.synthetic.num_train=64", "dataset.synthetic.num_test=16", f"hydra.sweep.dir={sweep}"]
    short.append("hydra.sweep.subdir=job${hydra.job.num}")  # one directory for both commands' job 0
    first = simpo("--multirun", *short, "seed=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = simpo("--multirun", *short, "seed=1", "beta=5", cwd=tmp_path)
    assert again.returncode == 1 and "1 of 1 jobs FAILED" in again.stderr
    assert "job0: OtherRunsDirectory: " in again.stderr and (sweep / "job0" / "refused.json").exists()
    from simpo_exp.compare import load_run

    assert load_run(sweep / "job0").status == "done"  # the run itself: as it finished
    ok = simpo("--multirun", *short, "seed=1", cwd=tmp_path)  # its own command again: skipped as finished
    assert ok.returncode == 0 and not (sweep / "job0" / "refused.json").exists()


def test_a_run_recorded_before_data_fingerprints_is_said_to_be_unchecked(tmp_path, caplog):
    """Resumed or found finished, such a run went on or was skipped on local data that had changed, without a word,
    and the record the resume wrote held the new files' fingerprints as if its first steps had seen them."""
    import logging

    from simpo_exp.checkpoint import DifferentConfigCheckpoint
    from simpo_exp.data.sources import file_sha256
    from simpo_exp.train import check_same_data

    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "data_report.json").write_text(json.dumps({"sources": {"local": {"rows": 1}}}))
    now = {"local": {"rows": 1, "files": {"prefs.jsonl": file_sha256(data)}, "files_root": str(tmp_path)}}
    with caplog.at_level(logging.WARNING):
        check_same_data(tmp_path, now)
    assert "holds no fingerprints of the files of dataset.sources.local" in caplog.text
    assert now == {"local": {"rows": 1}}  # what the resumed run records: no fingerprint it cannot vouch for
    (tmp_path / "data_report.json").write_text(json.dumps({"sources": {"local": {"rows": 1, "files": {}}}}))
    with pytest.raises(DifferentConfigCheckpoint, match="prefs.jsonl is read now and was not then"):
        check_same_data(tmp_path, {"local": {"files": {"prefs.jsonl": "x"}, "files_root": str(tmp_path)}})


def _signal_when(monkeypatch, module, name: str, when) -> list:
    """Wrap ``module.name`` so that it sends this process SIGTERM inside the call where ``when(*args)`` holds; the
    list it returns records the calls' first arguments' steps."""
    import os

    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(args[0].state.step)
        if when(*args):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_a_signal_during_a_periodic_save_stops_on_that_checkpoint(compose, tmp_path, monkeypatch):
    """A SIGTERM while the step-2 checkpoint was written let the run train step 3 and save again: a scheduler's
    grace period had to cover a step and two saves."""
    import simpo_exp.train as train_mod

    saves = _signal_when(monkeypatch, train_mod, "save_checkpoint", lambda run, *_: run.state.step == 2)
    cfg = _tiny_config(compose, tmp_path, "max_steps=6", "save_steps=2", "per_device_train_batch_size=8")
    with pytest.raises(SystemExit) as leaving:
        train_mod.train(cfg)
    assert leaving.value.code == 128 + signal.SIGTERM and saves == [2]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002"]
    assert json.loads((tmp_path / "run" / "stopped.json").read_text())["step"] == 2


def test_a_signal_in_the_last_step_saves_it_and_the_rerun_finishes_as_an_uninterrupted_run(
    compose, tmp_path, monkeypatch
):
    """A SIGTERM in a run's last step let the run finish: its evaluation, generations and model write, with no
    checkpoint before them, could outlast the grace time a save is sized for, and a kill there lost every step since
    the last save_steps checkpoint. Now the last step is saved like any other (its eval owed) and the process leaves
    with 128 + the signal; the re-run evaluates it and finishes with the summary an uninterrupted run has."""
    import simpo_exp.train as train_mod

    _signal_when(monkeypatch, train_mod, "optimizer_step", lambda run, *_: run.state.step == 2)
    extra = ("max_steps=3", "per_device_train_batch_size=8", "eval_steps=3")
    with pytest.raises(SystemExit) as leaving:
        train_mod.train(_tiny_config(compose, tmp_path, *extra))
    assert leaving.value.code == 128 + signal.SIGTERM
    run_dir = tmp_path / "run"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000003"]
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == 3 and not (run_dir / "finished.json").exists()
    monkeypatch.undo()
    resumed = train_mod.train(_tiny_config(compose, tmp_path, *extra))
    assert (run_dir / "finished.json").is_file()
    fresh = train_mod.train(_tiny_config(compose, tmp_path / "fresh", *extra))
    assert {k for k in fresh if k.startswith(("train/", "eval/"))} <= set(resumed)
    for key, value in fresh.items():
        if key.startswith(("eval/", "train/")) and key not in MEASURED_METRICS:
            assert resumed[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key
    assert json.loads((run_dir / "summary.json").read_text())["train/loss"] == resumed["train/loss"]


def test_a_full_disk_while_the_model_is_written_is_named_and_the_run_not_recorded_finished(
    compose, tmp_path, monkeypatch
):
    """A disk that took the checkpoints but not the model ended in a safetensors traceback."""
    import errno

    import simpo_exp.train as train_mod
    from simpo_exp.checkpoint import CheckpointSaveError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_mod, "save_trained", full)
    cfg = _tiny_config(compose, tmp_path, "max_steps=1", "per_device_train_batch_size=8", "save_model=true")
    with pytest.raises(CheckpointSaveError, match=r"could not write the trained model to .*model \(No space left"):
        train_mod.train(cfg)
    assert not (tmp_path / "run" / "finished.json").exists()


def test_an_fp16_overflow_step_goes_to_the_loss_scaler_and_the_run_goes_on(compose, tmp_path, monkeypatch):
    """Under fp16's GradScaler (a GPU's, stood in for by torch's CPU scaler) a step with non-finite gradients was
    skipped before the scaler's step/update: its scale never backed off, and the next step's unscale_ raised
    'unscale_() has already been called on this optimizer since the last update()'. The skipped step moved the
    learning-rate schedule on all the same, where transformers' Trainer holds it (an fp16 run's first overflows
    shortened its warm-up and cosine)."""
    import simpo_exp.train as train_mod

    real_set_up, runs = train_mod.set_up, []

    def with_a_scaler(cfg):
        run = real_set_up(cfg)
        runs.append(run)
        from accelerate.optimizer import patch_optimizer_step

        scaler, opt = torch.amp.GradScaler("cpu", init_scale=2.0**16), run.optimizer
        # as prepare() sets them up under fp16 on a GPU (AcceleratedOptimizer.__init__ with a scaler)
        run.accelerator.scaler = opt.scaler = scaler
        opt._accelerate_step_called = False
        opt._optimizer_original_step_method = opt.optimizer.step
        opt._optimizer_patched_step_method = patch_optimizer_step(opt, opt.optimizer.step)
        return run

    monkeypatch.setattr(train_mod, "set_up", with_a_scaler)
    _poison(monkeypatch, {2})
    cfg = _tiny_config(compose, tmp_path, "max_steps=4", "per_device_train_batch_size=8", "max_bad_steps=0")
    summary = train_mod.train(cfg)  # an overflow the scaler scales away is not a bad step: max_bad_steps=0 holds
    assert summary["train/skipped_steps"] == 1
    assert math.isfinite(summary["train/loss"])
    assert runs[0].scheduler.last_epoch == 3  # the schedule moved for the 3 steps the scaler took, not the skipped one


def test_deepspeeds_fp16_warm_up_overflows_are_not_bad_steps():
    """Under DeepSpeed accelerate makes no GradScaler: the engine scales fp16's loss and reports each overflow it
    skips as an infinite gradient norm, about six in a row as it settles its scale at the start. Each was counted
    as a non-finite step, and max_bad_steps=5 stopped the run ("Lower learning_rate or check the data"). The
    engine's scale now counts as the scaler's does."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from simpo_exp.checkpoint import TrainState
    from simpo_exp.train import NonFiniteError, fp16_loss_scale, skip_step

    engine = SimpleNamespace(fp16_enabled=lambda: True, optimizer=SimpleNamespace(loss_scale=32768.0))
    accelerator = SimpleNamespace(scaler=None, distributed_type=DistributedType.DEEPSPEED)
    run = SimpleNamespace(accelerator=accelerator, policy=engine, state=TrainState(), run_dir=Path("/nonexistent"))
    run.cfg = SimpleNamespace(max_bad_steps=5)
    for _ in range(6):
        skip_step(run, fp16_loss_scale(run))
    assert run.state.skipped_steps == 6 and run.state.bad_in_a_row == 0
    engine.optimizer.loss_scale = 0.5  # scaled below 1 and still overflowing: the gradients are not finite
    with pytest.raises(NonFiniteError):
        for _ in range(6):
            skip_step(run, fp16_loss_scale(run))
    older = SimpleNamespace(fp16_enabled=lambda: True, optimizer=SimpleNamespace(cur_scale=1024))  # its other name
    assert fp16_loss_scale(SimpleNamespace(accelerator=accelerator, policy=older)) == 1024.0
    bf16 = SimpleNamespace(fp16_enabled=lambda: False, optimizer=engine.optimizer)  # no loss scaling: every one counts
    assert fp16_loss_scale(SimpleNamespace(accelerator=accelerator, policy=bf16)) is None
    plain = SimpleNamespace(scaler=None, distributed_type=DistributedType.NO)
    assert fp16_loss_scale(SimpleNamespace(accelerator=plain, policy=engine)) is None


def test_a_stop_signal_to_the_whole_process_group_saves_with_dataloader_workers(tmp_path):
    """SLURM's step daemon signals every process of the step, DataLoader workers too (the gpu presets start two):
    a worker that died of the SIGTERM made torch raise "DataLoader worker ... is killed by signal: Terminated" in the
    training process, which ended without a checkpoint or stopped.json. The workers now leave the signal to it."""
    import os

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start_module(
        "simpo_exp", *RUN, "max_steps=400", "save_steps=1000", f"hydra.run.dir={run_dir}",
        "hardware.dataloader_num_workers=2", cwd=tmp_path, new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as the step daemon does: every process, the workers included
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert json.loads((run_dir / "stopped.json").read_text())["signal"] == "SIGTERM"
    assert list((run_dir / "checkpoints").glob("step-*[0-9]/COMPLETE"))


def test_the_sampled_pairs_rewards_are_scored_in_eval_mode(compose, tmp_path, monkeypatch):
    """The rewards beside each eval's greedy samples were scored after evaluate() had put the policy back in train
    mode: with dropout left on (disable_dropout=false, or LoRA's own), they carried its noise."""
    import simpo_exp.train as train_mod

    real, modes = train_mod.batch_loss, []

    def recording(policy, *args, **kwargs):
        if not torch.is_grad_enabled():  # the evaluation's and the samples' scoring
            modes.append(policy.training)
        return real(policy, *args, **kwargs)

    monkeypatch.setattr(train_mod, "batch_loss", recording)
    cfg = _tiny_config(compose, tmp_path, "max_steps=2", "eval_steps=2", "num_generations=2", "disable_dropout=false")
    train_mod.train(cfg)
    assert len(modes) > 1 and not any(modes), modes


@pytest.mark.parametrize("second_stop", ["killed after the owed eval", "SIGTERM during the owed eval"])
def test_the_eval_a_checkpoint_owes_is_logged_once_however_often_the_run_stops(
    compose, tmp_path, monkeypatch, second_stop
):
    """A SIGTERM in step 2, whose eval is due, saves step 2 owing its eval. The resumed run logs that eval first;
    if it then died before its next checkpoint, the step-2 eval survived the trim (step <= 2) and the next resume
    logged it again: two step-2 evals in metrics.jsonl and its samples twice in generations.jsonl. And a SIGTERM
    during the owed eval was recorded as a stop "before a step (nothing saved)", with the step-2 checkpoint there
    (the SLURM launcher then does not requeue)."""
    import simpo_exp.train as train_mod
    from simpo_exp.rundir import stopped_words

    run_dir = tmp_path / "run"
    cfg = _tiny_config(compose, tmp_path, "max_steps=4", "eval_steps=2", "num_generations=2")
    with monkeypatch.context() as patch:  # 1. SIGTERM in step 2: saved, owing the step-2 eval
        _signal_when(patch, train_mod, "optimizer_step", lambda run, *_: run.state.step == 1)
        with pytest.raises(SystemExit):
            train_mod.train(cfg)
    with monkeypatch.context() as patch:  # 2. resumed: the owed eval logged, then the run stops again
        real = train_mod.evaluate_and_sample
        if second_stop == "killed after the owed eval":

            def killed(run, step):
                real(run, step)
                raise RuntimeError("killed")

            patch.setattr(train_mod, "evaluate_and_sample", killed)
            with pytest.raises(RuntimeError, match="killed"):
                train_mod.train(cfg)
        else:
            _signal_when(patch, train_mod, "evaluate_and_sample", lambda *_: True)
            with pytest.raises(SystemExit):
                train_mod.train(cfg)
            record = json.loads((run_dir / "stopped.json").read_text())
            assert record == {"signal": "SIGTERM", "step": 2}
            assert stopped_words(record) == "SIGTERM after step 2, checkpoint saved"
    train_mod.train(cfg)  # 3. resumed again, to the end
    evals = [r["step"] for r in read_metrics(run_dir) if "eval/loss" in r]
    trains = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    samples = [json.loads(line)["step"] for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert evals == [2, 4] and trains == [1, 2, 3, 4] and samples == [2, 2, 4, 4]


def test_a_train_split_under_one_batch_per_process_is_refused_by_name():
    """12 pairs at 8 a device on 2 processes: each process got no whole batch after prepare, and set-up died with
    ZeroDivisionError (one process had the clear message, checked before the batches were dealt)."""
    from simpo_exp.config import ConfigError
    from simpo_exp.train import check_batches_per_process

    check_batches_per_process(1, 8, 2)
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size=8 .* 8 x 2 processes = 16 pairs"):
        check_batches_per_process(0, 8, 2)


def test_a_finished_run_trained_again_is_not_taken_as_finished_until_it_is(compose, tmp_path, monkeypatch):
    """A finished run re-run to write its model (save_model=true after false, or model/ deleted) resumes and trains
    its last steps again; its earlier finished.json stayed, so a model/ cut short by a kill in the save was taken for
    the run's trained model by evaluate."""
    import errno

    import simpo_exp.train as train_mod
    from simpo_exp.checkpoint import CheckpointSaveError
    from simpo_exp.evaluate.runs import has_model

    run = tmp_path / "run"
    args = ("max_steps=2", "save_steps=1", "per_device_train_batch_size=8")
    train_mod.train(_tiny_config(compose, tmp_path, *args))
    assert (run / "finished.json").exists()

    def cut_short(model, out, *rest, **kwargs):  # a model/ begun, then the disk full (or a kill)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_mod, "save_trained", cut_short)
    with pytest.raises(CheckpointSaveError):
        train_mod.train(_tiny_config(compose, tmp_path, *args, "save_model=true"))
    assert (run / "model" / "config.json").exists() and not (run / "finished.json").exists()
    assert not has_model(run)


def test_a_resumed_runs_time_goes_on_from_its_checkpoints(compose, tmp_path, monkeypatch):
    """runtime_s counts every start of a run: the resumed start's seconds are added to those its checkpoint
    recorded (an hour planted there shows in the summary), not counted alone."""
    import simpo_exp.train as train_mod
    from simpo_exp import checkpoint

    args = ("max_steps=2", "save_steps=1", "per_device_train_batch_size=8")
    train_mod.train(_tiny_config(compose, tmp_path, *args))
    (tmp_path / "run" / "finished.json").unlink()  # trained again: it resumes from step 1's checkpoint
    load_newest = checkpoint.load_newest

    def an_hour_in(*args, **kwargs):
        path, state = load_newest(*args, **kwargs)
        assert state.step == 1 and 0 < state.runtime_s < 3600
        state.runtime_s += 3600
        return path, state

    monkeypatch.setattr(checkpoint, "load_newest", an_hour_in)
    summary = train_mod.train(_tiny_config(compose, tmp_path, *args))
    assert summary["runtime_s"] > 3600
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["runtime_s"] == summary["runtime_s"]


def test_a_finished_run_whose_model_is_gone_trains_again_and_an_intact_one_is_skipped(compose, tmp_path):
    """save_model=true and model/ removed (space freed, a failed copy): the run is not finished, so it resumes and
    writes its model again, rather than be skipped and report a model that is not there."""
    from simpo_exp.config import to_config
    from simpo_exp.finished import FINISHED, recorded_summary
    from simpo_exp.tracking import config_to_dict

    cfg = to_config(compose("logger=none", "save_model=true"))
    cfg.output_dir = str(tmp_path)
    (tmp_path / FINISHED).write_text(json.dumps({"config": config_to_dict(cfg)}))
    (tmp_path / "summary.json").write_text('{"eval/rewards/accuracies": 0.75}')
    assert recorded_summary(cfg) is None  # no model/: trained (resumed) again
    (tmp_path / "model").mkdir()
    assert recorded_summary(cfg) == {"eval/rewards/accuracies": 0.75}
    for damaged in ('{"eval/rewards/acc', "[0.75]"):  # cut short, or edited into a list: trained to write it again
        (tmp_path / "summary.json").write_text(damaged)
        assert recorded_summary(cfg) is None
    (tmp_path / "summary.json").write_text('{"eval/rewards/accuracies": 0.75}')
    cfg.resume = False  # asked to train it again, here: it does
    assert recorded_summary(cfg) is None


def test_a_finished_run_that_saved_no_model_is_skipped(compose, tmp_path):
    """save_model=false: a finished run has no model/ to lack; its summary is the result, not trained again."""
    from simpo_exp.config import to_config
    from simpo_exp.finished import FINISHED, recorded_summary
    from simpo_exp.tracking import config_to_dict

    cfg = to_config(compose("logger=none", "save_model=false"))
    cfg.output_dir = str(tmp_path)
    (tmp_path / FINISHED).write_text(json.dumps({"config": config_to_dict(cfg)}))
    (tmp_path / "summary.json").write_text('{"eval/rewards/accuracies": 0.5}')
    assert recorded_summary(cfg) == {"eval/rewards/accuracies": 0.5}


def test_a_setting_put_back_to_its_default_is_not_the_checkpoints_setting():
    """A run saved with beta=5 resumed by a command without it (beta back at its default, 2.0) trains another
    objective on the checkpoint: refused, as beta=5 over a checkpoint of 2.0 is. Only a key the checkpoint lacks
    (added since) may be at its default."""
    from simpo_exp.checkpoint import incompatible_keys

    assert incompatible_keys({"beta": 5.0}, {"beta": 2.0}) == ["beta: checkpoint 5.0, now 2.0"]
    saved = {"dataset": {"chat_format": "simpo_repo"}, "hardware": {"lora": True}}
    now = {"dataset": {"chat_format": "generation_prompt"}, "hardware": {"lora": False}}
    assert incompatible_keys(saved, now) == [
        "dataset.chat_format: checkpoint 'simpo_repo', now 'generation_prompt'",
        "hardware.lora: checkpoint True, now False",
    ]


def test_a_resume_on_another_tokenizer_or_other_reference_weights_is_refused(tmp_path):
    """What the config does not hold changed in place under a run with checkpoints: its chat template file (the
    rows after the checkpoint became other tokens, and the record of the first ones was overwritten), and, for a
    reference-based method, the starting weights at model.path (the reference log-probs were computed again from
    them, another model's). Both resumed without a word; both are refused now, before any training."""
    from tests.tiny import save_tiny_llama

    model, run_dir = tmp_path / "llama", tmp_path / "run"
    save_tiny_llama(model)
    short = [f"model.path={model}", "loss=dpo", "max_steps=2", "save_steps=1", "eval_steps=0", "logging_steps=1"]
    short += ["logger=none", "num_generations=0", "dataset.synthetic.num_train=32", "dataset.synthetic.num_test=8"]
    short += [f"reference_cache_dir={tmp_path / 'ref'}", f"hydra.run.dir={run_dir}"]
    first = simpo(*short, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["start_weights"]
    # the starting folder's weight and config files, which the evaluate stage holds its starting model to
    assert "model.safetensors" in env["model_files"] and "config.json" in env["model_files"]
    (run_dir / "finished.json").unlink()  # as if killed after its last checkpoint
    template = model / "chat_template.jinja"
    kept = template.read_text()
    template.write_text(kept.replace("message['content']", "'### ' + message['content']"))
    res = simpo(*short, cwd=tmp_path)
    assert res.returncode == 2 and "written with another tokenizer or chat template (chat_template_sha256" in res.stderr
    template.write_text(kept)
    save_tiny_llama(model, seed=1)  # the folder written again: other weights of the same shape
    res = simpo(*short, cwd=tmp_path)
    assert res.returncode == 2 and "against the reference of other starting weights" in res.stderr, res.stderr[-2000:]
    save_tiny_llama(model)
    config = model / "config.json"  # the weights as they were, their config.json edited: another forward
    kept = config.read_text()
    config.write_text(json.dumps({**json.loads(kept), "rms_norm_eps": 0.1}))
    res = simpo(*short, cwd=tmp_path)
    assert res.returncode == 2 and "against the reference of another model config" in res.stderr, res.stderr[-2000:]
    config.write_text(kept)
    res = simpo(*short, f"reference_cache_dir={tmp_path / 'elsewhere'}", cwd=tmp_path)  # the cache's place: taken
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in (run_dir / "__main__.log").read_text()


def test_the_config_is_checked_before_the_set_up_and_the_same_data_elsewhere_resumes(tmp_path):
    """A mistyped override on a resume was refused only after the model, the data and a DPO reference pass were
    loaded (minutes on an 8B model); and the same files at another absolute path (a job's scratch disk) were refused
    as another config, though the README says they are the same data (their contents are compared)."""
    from simpo_exp import checkpoint

    step = tmp_path / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / checkpoint.CHECKPOINT_MARKER).write_text("{}")
    config = {"beta": 2.0, "dataset": {"sources": {"local": {"path": "/data/a/prefs.jsonl"}}}}
    (step / "state.json").write_text(json.dumps({"config": config}))
    checkpoint.refuse_another_config(tmp_path, config)
    moved = {"beta": 2.0, "dataset": {"sources": {"local": {"path": "/scratch/job/prefs.jsonl"}}}}
    with pytest.raises(checkpoint.DifferentConfigCheckpoint, match=r"dataset.sources.local.path"):
        checkpoint.refuse_another_config(tmp_path, moved)  # a run that recorded no fingerprints: paths compared
    report = {"sources": {"local": {"files": {"prefs.jsonl": {"sha256": "ab"}}}}}
    (tmp_path / "data_report.json").write_text(json.dumps(report))
    checkpoint.refuse_another_config(tmp_path, moved)  # its files are compared by content: the path may move
    with pytest.raises(checkpoint.DifferentConfigCheckpoint, match=r"beta: checkpoint 2.0, now 5.0"):
        checkpoint.refuse_another_config(tmp_path, moved | {"beta": 5.0})
    hub = {"beta": 2.0, "dataset": {"sources": {"local": {"path": "org/other-set"}}}}  # another hub set: other data
    with pytest.raises(checkpoint.DifferentConfigCheckpoint, match=r"dataset.sources.local.path"):
        checkpoint.refuse_another_config(tmp_path, hub)


def test_the_tokenizer_hash_leaves_out_call_time_settings():
    """A tokenizer saved after a padded, truncated call carries those settings in its file; tokenising the data
    clears them in memory, so the first start's hash and a fresh load's differed: every resume was refused."""
    from simpo_exp.model import build_tiny_tokenizer, tokenizer_hash

    tok = build_tiny_tokenizer()
    clean = tokenizer_hash(tok)
    tok.backend_tokenizer.enable_truncation(max_length=512)
    tok.backend_tokenizer.enable_padding(length=512)
    assert tokenizer_hash(tok) == clean
    tok.add_tokens(["<|new|>"])  # what turns text into ids: another hash
    assert tokenizer_hash(tok) != clean


def test_a_step_of_two_micro_batches_moves_the_data_position_and_the_epoch_by_two(compose, tmp_path):
    """Under gradient accumulation a step reads accum micro-batches: the position a resume starts from and the logged
    epoch count them all (counted as one, a resume read batches again and train/epoch lagged)."""
    from simpo_exp.train import train

    cfg = _tiny_config(compose, tmp_path, "per_device_train_batch_size=8", "gradient_accumulation_steps=2",
                       "max_steps=2", "save_steps=1")  # fmt: skip
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "train/epoch" in r]
    assert [r["train/epoch"] for r in rows] == [0.25, 0.5]  # 64 pairs: 8 micro-batches of 8 an epoch
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "state.json").read_text())
    assert state["train_state"]["micro_batches"] == 2
