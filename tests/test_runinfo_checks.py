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


def test_the_records_pointer_is_followed_only_to_an_absolute_existing_folder(tmp_path, monkeypatch):
    """A run's .hydra/records_dir (runinfo.point_to_records writes it resolved) names where output_dir= put the
    records; a relative one (hand-written, or another tool's) says nothing about where it was taken from, and one
    naming a folder since removed points nowhere: both fall back to the config's output_dir."""
    import yaml

    from simpo_exp.rundir import RECORDS_POINTER, records_dir

    run, pointed, configured = tmp_path / "run", tmp_path / "pointed", tmp_path / "configured"
    (run / ".hydra").mkdir(parents=True)
    pointed.mkdir(), configured.mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(configured)}))
    (run / ".hydra" / RECORDS_POINTER).write_text(f"{pointed}\n")
    assert records_dir(run) == pointed
    (run / ".hydra" / RECORDS_POINTER).write_text("pointed\n")  # relative: not followed
    (run / "pointed").mkdir()  # even where it names a folder from where compare is started
    monkeypatch.chdir(run)
    assert records_dir(run) == configured
    (run / ".hydra" / RECORDS_POINTER).write_text(str(tmp_path / "gone"))
    assert records_dir(run) == configured


def test_the_holder_line_replaces_a_longer_one_left_in_the_lock_file(tmp_path):
    """The lock file is reused by every job of a folder; the second job's refusal quotes the holder line, which
    must be the holder's alone (a longer line left by an earlier job on another machine kept its tail)."""
    import os
    import subprocess
    import sys

    from simpo_exp.rundir import IN_USE_FILE, hold_folder, release_folders

    (tmp_path / IN_USE_FILE).write_text("pid 1 on a-much-longer-host-name-than-this-one.cluster.example, since 2020")
    try:
        hold_folder(tmp_path, "test")
        line = (tmp_path / IN_USE_FILE).read_text()
        assert line.startswith(f"pid {os.getpid()} on ") and "cluster.example" not in line and "2020" not in line
        probe = (
            "from simpo_exp.rundir import hold_folder; from simpo_exp.errors import FolderInUse\n"
            f"try: hold_folder({str(tmp_path)!r}, 'go elsewhere')\n"
            "except FolderInUse as e: print(e)\n"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
        assert f"in use by another job ({line}): go elsewhere" in out, out
    finally:
        release_folders()


def test_a_file_system_without_locks_holds_nothing_and_says_so(tmp_path, monkeypatch, caplog):
    """Lustre without its flock option, some NFS set-ups: flock fails with ENOLCK (or EOPNOTSUPP). The job runs,
    warned that a second job in its folder is not refused, and keeps no descriptor it would later close."""
    import errno
    import fcntl

    from simpo_exp import rundir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger=rundir.__name__):
        rundir.hold_folder(tmp_path, "test")
    assert f"{tmp_path} cannot be locked here" in caplog.text and "No locks available" in caplog.text
    assert rundir._held == {}
    (tmp_path / rundir.IN_USE_FILE).write_text(f"pid 1{rundir._this_machine()}2026")
    assert rundir.ended_unrecorded(tmp_path) is False  # no lock to probe: nothing said about the job


# ----------------------------------------------------------------------------- from a second mutation review of runinfo
def test_a_long_job_folder_name_shortens_a_dotted_key_only_where_its_last_part_names_one_item():
    """Two keys of one last part (dataset.a.num, dataset.b.num) keep their whole names (num=1,num=2 would not say
    which); one item alone past the limit is cut at its end, never dropped for a name of a hash alone."""
    name = runinfo.job_dirname("dataset.a.num=1,dataset.b.num=2,model.path=/" + "y" * 100)
    assert name.startswith("dataset.a.num=1,dataset.b.num=2") and len(name) <= 120
    name = runinfo.job_dirname("model.path=/" + "x" * 200)
    assert name.startswith("path=_xxx") and len(name) <= 120
    # two jobs whose names differ only where they are cut never share a folder (one would resume the other's run)
    assert runinfo.job_dirname("model.path=/" + "x" * 200 + "a") != runinfo.job_dirname(
        "model.path=/" + "x" * 200 + "b"
    )
    assert runinfo.job_dirname("beta=" + "1" * 114) == "beta=" + "1" * 114  # at the limit: as it is


def test_a_setting_listed_twice_reuses_the_lowest_numbered_earlier_folder(tmp_path):
    for folder in ("4_beta=5", "2_beta=5"):
        (tmp_path / folder).mkdir()
    assert runinfo.job_subdir("beta=5", str(tmp_path), 0) == "2_beta=5"
    assert runinfo.job_subdir("beta=5", str(tmp_path), 4) == "4_beta=5"  # its own number first


def test_the_sweep_group_is_of_the_folder_however_its_path_is_spelt(tmp_path):
    """A user's own W&B group in a job's record is no sweep's; x/./s and x/s/ are the folder x/s (compare and the
    dashboard compute the group from the plain path)."""
    import json

    (tmp_path / "0_beta=2").mkdir()
    (tmp_path / "0_beta=2" / "wandb_run.json").write_text(json.dumps({"group": "mine"}))
    assert runinfo.recorded_sweep_group(tmp_path) is None
    assert runinfo.sweep_group("x/./s", "/c") == runinfo.sweep_group("x/s/", "/c") == runinfo.sweep_group("x/s", "/c")


def test_the_records_pointer_is_written_absolute_and_only_where_hydra_keeps_its_files(tmp_path, monkeypatch):
    """A relative output_dir is written resolved from where the run ran (records_dir follows only an absolute one,
    so compare started elsewhere lost the records); with hydra.output_subdir=null nothing is written."""
    from simpo_exp.rundir import RECORDS_POINTER

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    hc = SimpleNamespace(runtime=SimpleNamespace(output_dir=str(run)), output_subdir=".hydra")
    runinfo.point_to_records(OmegaConf.create({"output_dir": "rel/out"}), hc)
    assert (run / ".hydra" / RECORDS_POINTER).read_text() == str(tmp_path / "rel" / "out")
    other = tmp_path / "other"
    hc = SimpleNamespace(runtime=SimpleNamespace(output_dir=str(other)), output_subdir=None)
    runinfo.point_to_records(OmegaConf.create({"output_dir": "rel/out"}), hc)
    assert not other.exists()


def test_hand_started_processes_are_refused_only_without_a_folder_of_their_own(monkeypatch):
    """WORLD_SIZE=2 by hand needs a fixed folder: hydra.run.dir, or output_dir for a single run; WORLD_SIZE=1 is one
    process and needs none."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    def hc(task):
        overrides = SimpleNamespace(hydra=[], task=task)
        return SimpleNamespace(mode=RunMode.RUN, overrides=overrides, run=SimpleNamespace(dir="d"))

    monkeypatch.setenv("WORLD_SIZE", "2")
    runinfo.refuse_a_folder_per_hand_started_process(hc(["output_dir=/x"]))
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 without a fixed hydra.run.dir="):
        runinfo.refuse_a_folder_per_hand_started_process(hc([]))
    monkeypatch.setenv("WORLD_SIZE", "1")
    runinfo.refuse_a_folder_per_hand_started_process(hc([]))
    # torchrun: one machine's processes share their launcher's start time; several machines' do not (each node's
    # folder held its own shards, and no process ever wrote the data set)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    runinfo.refuse_a_folder_per_hand_started_process(hc([]))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=4 without a fixed hydra.run.dir=.* each machine's launcher's"):
        runinfo.refuse_a_folder_per_hand_started_process(hc([]))
    runinfo.refuse_a_folder_per_hand_started_process(hc(["output_dir=/x"]))


def test_a_single_process_torchrun_multirun_needs_no_fixed_sweep_folder(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "1")
    hc = SimpleNamespace(mode=RunMode.MULTIRUN, overrides=SimpleNamespace(hydra=[]), sweep=SimpleNamespace(dir="d"))
    assert not runinfo.under_torchrun()
    runinfo.refuse_a_sweep_folder_per_process(hc)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--multirun on 2 processes"):
        runinfo.refuse_a_sweep_folder_per_process(hc)


def test_the_start_up_files_a_job_keeps_follow_its_last_restore(tmp_path, monkeypatch):
    """restore_run_config puts the files the run ran with back and keeps them as the job's own: the job's closing
    rewrite (keep_run_config) then writes those, not the refused command's it started with."""
    run = tmp_path / "run"
    (run / ".hydra" / runinfo.RAN_WITH).mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("beta: 5\n")
    (run / ".hydra" / runinfo.RAN_WITH / "config.yaml").write_text("beta: 2\n")
    monkeypatch.setattr(runinfo, "_started_with", {str(run.resolve()): {"config.yaml": "beta: 5\n"}})
    runinfo.restore_run_config(run)
    assert (run / ".hydra" / "config.yaml").read_text() == "beta: 2\n"
    assert runinfo._started_with[str(run.resolve())]["config.yaml"] == "beta: 2\n"


def test_a_holder_that_ran_no_sweep_gets_no_sweep_mark_back(tmp_path):
    """An older holder's mark left in .hydra/held/ is dropped when this holder has none: put back, it named another
    sweep's command as this job's."""
    job = tmp_path / "job"
    (job / ".hydra" / runinfo.HELD).mkdir(parents=True)
    (job / ".hydra" / runinfo.HELD / runinfo.SWEEP_MARK).write_text("old")
    runinfo._keep_sweep_mark(job)
    (job / ".hydra" / runinfo.SWEEP_MARK).write_text("a refused sweep's")
    runinfo._put_back_sweep_mark(job)
    assert not (job / ".hydra" / runinfo.SWEEP_MARK).exists()


def test_a_generate_sweep_is_finished_without_training_records(tmp_path, capsys):
    """finished.json is training's: a generate sweep whose jobs all ended well was listed as unfinished, exit 1."""
    (tmp_path / "0_a" / ".hydra").mkdir(parents=True)
    (tmp_path / "0_a" / ".hydra" / "overrides.yaml").write_text("[]\n")
    summary = runinfo.SweepSummary()
    summary.sweep_dir, summary.before, summary.training, summary.token = tmp_path, {}, False, None
    summary.rerun, summary.listed = "x", False
    assert summary._list_failed() is False
    assert f"sweep finished: 1 jobs in {tmp_path}" in capsys.readouterr().out


def test_a_run_inside_a_jobs_folder_is_no_job_of_the_sweep(tmp_path):
    """A job's eval/ (or a run nested in its folder) holds .hydra files too: it is not counted as a job."""
    for folder in (tmp_path / "0_a", tmp_path / "0_a" / "eval"):
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text("[]\n")
    assert [p.name for p in runinfo.sweep_jobs(tmp_path)] == ["0_a"]


def test_added_and_removed_overrides_are_items_of_their_own():
    assert runinfo._override_items("beta=2,+logger=none,~foo=1") == ["beta=2", "+logger=none", "~foo=1"]
    assert runinfo._trains_alike("beta=2,+logger=none") == ["beta=2"]


def test_epochs_and_steps_given_together_are_the_users_choice(monkeypatch):
    """num_train_epochs with max_steps given too (max_steps decides, by the user's word): not refused as unused."""
    cfg = OmegaConf.create({"method": "simpo", "num_train_epochs": 2, "max_steps": 10})
    monkeypatch.setattr(runinfo, "this_sweeps_keys", lambda: frozenset())
    runinfo.refuse_unused(cfg, {"num_train_epochs", "max_steps"}, {})
    with pytest.raises(ConfigError, match="num_train_epochs=2 would not be used"):
        runinfo.refuse_unused(cfg, {"num_train_epochs"}, {})


def test_training_by_torchrun_on_several_machines_needs_a_fixed_folder(tmp_path):
    """Each machine's launcher starts at its own second: without hydra.run.dir each node's processes resolved a
    folder of their own, a sharded checkpoint's parts landing in two folders. Refused before anything loads."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "0"}
    env |= {"LOCAL_RANK": "0", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "simpo_exp", "logger=none"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "WORLD_SIZE=4 without a fixed hydra.run.dir=...: every process of one run must name" in done.stderr
