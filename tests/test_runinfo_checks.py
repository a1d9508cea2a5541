"""Run and sweep bookkeeping no test pinned (from a mutation review of runinfo.py and rundir.py): a key inert in
some jobs of a sweep over another key, the accepted start of a run, the jobs an earlier run left in a sweep's
folder, the token the processes of one launch share, a job's sweep folder, and the jobs' order."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from simpo_exp import runinfo
from simpo_exp.config import ConfigError


def test_a_key_inert_in_some_jobs_of_a_sweep_over_another_key_is_said_not_refused(monkeypatch, caplog):
    """--multirun hardware.fused_head=none,liger hardware.logps_chunk_size=4: the liger jobs do not read the chunk
    size; refused, every liger job failed. Swept itself, the key would train one run under several names: refused."""
    hc = SimpleNamespace(mode=RunMode.MULTIRUN)
    monkeypatch.setattr(runinfo, "HydraConfig", SimpleNamespace(initialized=lambda: True, get=lambda: hc))
    cfg = OmegaConf.create({"method": "simpo", "hardware": {"fused_head": "liger", "logps_chunk_size": 4}})
    given = {"hardware.logps_chunk_size", "hardware.fused_head"}
    monkeypatch.setattr(runinfo, "this_sweeps_keys", lambda: frozenset({"hardware.fused_head"}))
    with caplog.at_level(logging.WARNING, logger=runinfo.__name__):
        runinfo.refuse_unused(cfg, given, {})
    assert "hardware.logps_chunk_size=4 would not be used" in caplog.text and "this job runs without it" in caplog.text
    monkeypatch.setattr(runinfo, "this_sweeps_keys", lambda: frozenset({"hardware.logps_chunk_size"}))
    with pytest.raises(ConfigError, match="hardware.logps_chunk_size=4 would not be used.*leave it out"):
        runinfo.refuse_unused(cfg, given, {})


def test_a_run_whose_start_was_accepted_is_no_longer_refused_before_it(tmp_path, monkeypatch):
    """A resumed run failing mid-training (too many bad steps, out of memory) was taken for a command refused before
    its start: no error.json, its earlier stop record put back, listed as stopped rather than failed."""
    monkeypatch.setattr(runinfo, "_accepted", set())
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "COMPLETE").write_text("{}")
    assert runinfo._refused_before_its_start(run, run)
    runinfo.keep_run_config(run)
    assert not runinfo._refused_before_its_start(run, run)


def test_a_failed_job_an_earlier_run_left_in_the_sweeps_folder_is_not_this_sweeps(tmp_path, capsys, monkeypatch):
    """hydra.output_subdir=null: no .hydra/ and no sweep mark; the job's log and error.json are from before this
    command, which ran no job (its stamps taken at its start tell)."""
    monkeypatch.delenv(runinfo.SWEEP_ENV, raising=False)
    sweep = tmp_path / "sweep"
    old = sweep / "0_beta=2"
    old.mkdir(parents=True)
    (old / "__main__.log").write_text("log\n")
    (old / "error.json").write_text('{"type": "ConfigError", "error": "beta"}')
    hydra = SimpleNamespace(
        sweep=SimpleNamespace(dir=str(sweep)), mode=RunMode.MULTIRUN, overrides=SimpleNamespace(hydra=[])
    )
    summary = runinfo.SweepSummary()
    summary.on_multirun_start(SimpleNamespace(hydra=hydra, method="simpo"))
    assert summary._list_failed() is False
    captured = capsys.readouterr()
    assert "FAILED" not in captured.err and "sweep ended before any job ran" in captured.err + captured.out


def test_the_processes_of_one_launch_share_a_sweep_token_and_two_commands_do_not(monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "r"}.items():
        monkeypatch.setenv(key, value)
    assert runinfo.sweep_token() == runinfo.sweep_token() == "launch:h:1:r"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runinfo.sweep_token() != runinfo.sweep_token()


def test_a_jobs_sweep_folder_and_the_jobs_order(tmp_path):
    from simpo_exp.rundir import sweep_dir_of

    assert sweep_dir_of(Path("/x/sweep/0_beta=2"), {}) == Path("/x/sweep")  # no subdir recorded: its parent
    assert sweep_dir_of(Path("/x/sweep/b2/s1"), {"sweep": {"subdir": "b${beta}/s${seed}"}}) == Path("/x/sweep")
    for name in ("10_beta=5", "2_beta=3", "1_beta=2"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text("[]\n")
    assert [p.name for p in runinfo.sweep_jobs(tmp_path)] == ["1_beta=2", "2_beta=3", "10_beta=5"]


def test_a_run_config_holding_a_list_is_no_pointer_to_another_records_folder(tmp_path):
    """A .hydra/config.yaml of another shape (a list at the top) failed with an AttributeError wherever the run's
    records folder was looked up (compare, evaluate); it names no other folder, so the records are the run's own."""
    from simpo_exp.rundir import records_dir

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("- a\n- b\n")
    assert records_dir(tmp_path) == tmp_path
