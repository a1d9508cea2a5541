"""Sweeps: a failing job does not stop the others; the Optuna preset finds and reports the best trial."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.test_run import simpo

FAST = [
    "max_steps=3",
    "eval_steps=0",
    "eval_on_start=false",  # the objective and the checks read the final eval only
    "num_generations=0",
    "logger=none",
    "dataset.synthetic.num_train=128",
    "dataset.synthetic.num_test=32",
]


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    res = simpo("--multirun", "beta=-1,2,5", f"hydra.sweep.dir={sweep}", *FAST, cwd=tmp_path)
    assert res.returncode == 1  # the sweep reports that something failed ...
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 3
    done = [j for j in jobs if (j / "summary.json").exists()]
    failed = [j for j in jobs if (j / "error.json").exists()]
    assert len(done) == 2 and len(failed) == 1  # ... after the other jobs finished
    err = json.loads((failed[0] / "error.json").read_text())
    assert err["type"] == "ConfigError" and "beta=-1.0" in err["error"]
    assert "1 of 3 jobs FAILED" in res.stderr and failed[0].name in res.stderr


def test_a_sweep_run_again_without_one_of_its_values_trains_nothing_again(tmp_path):
    """Jobs are numbered in the order of the values: ``beta=3`` after ``beta=2,3`` is job 0, and its folder was
    ``0_beta=3`` beside the finished ``1_beta=3``: the finished setting trained again from the start. The same with
    a setting added that does not change what trains (eval_steps, logger=none)."""
    sweep = tmp_path / "sweep"
    first = simpo("--multirun", "beta=2,3", f"hydra.sweep.dir={sweep}", *FAST, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (finished,) = sweep.glob("1_beta=3,*/finished.json")
    stamp = finished.stat().st_mtime_ns
    again = simpo("--multirun", "beta=3", f"hydra.sweep.dir={sweep}", *FAST, cwd=tmp_path)  # now job 0
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name.split(",")[0] for p in sweep.iterdir() if p.is_dir()) == ["0_beta=2", "1_beta=3"]
    assert finished.stat().st_mtime_ns == stamp  # skipped as finished, not trained again
    assert "already finished" in again.stdout + again.stderr
    # run again with a setting a resume may change (the job folders are named by the overrides): new folders, and
    # every job trained again from the start; now each finds its folder, is skipped and says what it did not apply
    cadence = simpo("--multirun", "beta=2,3", f"hydra.sweep.dir={sweep}", *FAST, "eval_steps=1", cwd=tmp_path)
    assert cadence.returncode == 0, cadence.stderr[-3000:]
    assert sorted(p.name.split(",")[0] for p in sweep.iterdir() if p.is_dir()) == ["0_beta=2", "1_beta=3"]
    assert finished.stat().st_mtime_ns == stamp
    said = cadence.stdout + cadence.stderr
    assert said.count("eval_steps: finished with 0, now 1") == 2 and "already finished" in said


def test_a_sweep_with_nested_job_folders_lists_its_failed_jobs(tmp_path):
    """``hydra.sweep.subdir`` two levels deep: the summary looked one level down only, said no job ran and exited 0."""
    sweep = tmp_path / "sweep"
    args = ["--multirun", "beta=-1,2", "seed=1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=b${beta}/s${seed}"]
    res = simpo(*args, *FAST, cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "1 of 2 jobs FAILED" in res.stderr and "b-1.0/s1: ConfigError" in res.stderr
    assert (sweep / "b2.0" / "s1" / "summary.json").exists()


def test_a_sweep_whose_presets_do_not_compose_says_no_job_ran(tmp_path):
    """Hydra composes every job before the first starts; a preset name that is not there ended the sweep with
    "sweep finished: 0 jobs", which reads as a success."""
    sweep = tmp_path / "sweep"
    res = simpo("--multirun", "hparams=default,nope", f"hydra.sweep.dir={sweep}", *FAST, cwd=tmp_path)
    assert res.returncode != 0 and "nope" in res.stderr
    assert "sweep ended before any job ran" in res.stderr and "sweep finished" not in res.stdout + res.stderr


def test_optuna_preset_runs_trials_and_reports_the_best(tmp_path):
    sweep = tmp_path / "optuna"
    res = simpo(
        "--multirun", "+sweep=optuna", "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}", *FAST, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = [p for p in sweep.iterdir() if p.is_dir()]
    assert len(jobs) == 4 and all((j / "summary.json").exists() for j in jobs)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"beta", "gamma_beta_ratio", "learning_rate"}
    accs = [json.loads((j / "summary.json").read_text())["eval/rewards/accuracies"] for j in jobs]
    assert best["best_value"] == max(accs)
    assert "Best parameters" in res.stdout + res.stderr
    # the sweep's request, which the Optuna sweeper does not write itself: compare counts the trials asked for
    from simpo_exp.compare import jobs_asked
    from simpo_exp.runinfo import swept_keys

    assert jobs_asked(sweep) == 4 and swept_keys(sweep) == {"beta", "gamma_beta_ratio", "learning_rate"}


def test_a_failed_optuna_trial_is_a_failed_trial_and_the_search_goes_on(tmp_path):
    """A trial whose sampled value is refused (here a negative gamma_beta_ratio) used to end the whole search:
    its NaN return was refused by Optuna. Now it is a failed trial, the others run, the best is reported and
    the sweep ends by listing the failure."""
    sweep = tmp_path / "optuna"
    args = ["--multirun", "+sweep=optuna", "hydra.sweeper.n_trials=4", "gamma_beta_ratio=interval(-1.0, 0.5)"]
    res = simpo(*args, f"hydra.sweep.dir={sweep}", *FAST, cwd=tmp_path)
    jobs = [p for p in sweep.iterdir() if p.is_dir()]
    failed = [j for j in jobs if (j / "error.json").exists()]
    done = [j for j in jobs if (j / "summary.json").exists()]
    assert len(jobs) == 4 and failed and done and len(failed) + len(done) == 4, res.stderr[-3000:]
    assert res.returncode == 1 and f"{len(failed)} of 4 jobs FAILED" in res.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"]["gamma_beta_ratio"] >= 0
    assert best["best_value"] == max(
        json.loads((j / "summary.json").read_text())["eval/rewards/accuracies"] for j in done
    )


def test_an_optuna_search_in_which_every_trial_fails_still_lists_them(tmp_path):
    """With no successful trial the Optuna sweeper fails asking for the best one, before the sweep's end: the
    failed jobs are listed at exit all the same."""
    sweep = tmp_path / "optuna"
    args = ["--multirun", "+sweep=optuna", "hydra.sweeper.n_trials=2", f"model.path={tmp_path / 'nowhere'}"]
    res = simpo(*args, f"hydra.sweep.dir={sweep}", *FAST, cwd=tmp_path)
    assert res.returncode == 1 and "2 of 2 jobs FAILED" in res.stderr and "does not exist" in res.stderr
    # said in a line, not as the traceback of Optuna's ValueError through Hydra's and the plugin's frames
    assert "every trial of the Optuna search failed" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_a_crashed_job_does_not_stop_the_sweep_and_a_fixed_rerun_reports_only_its_own_jobs(tmp_path):
    """A job that crashes (weights of another shape than its config's: not a user error, so its traceback is shown)
    leaves error.json and
    the sweep goes on to list it, as a job with a bad value does. Re-run into the same directory with the crashing
    job replaced, the sweep reports the jobs it ran, not the earlier failure left in the directory."""
    from tests.tiny import save_tiny_llama

    broken, wider = tmp_path / "broken", tmp_path / "wider"
    save_tiny_llama(broken)
    save_tiny_llama(wider, hidden_size=64, intermediate_size=128)
    shutil.copy(wider / "model.safetensors", broken / "model.safetensors")
    sweep = tmp_path / "sweep"
    res = simpo("--multirun", f"model.path={broken},''", f"hydra.sweep.dir={sweep}", *FAST, cwd=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert res.returncode == 1 and len(jobs) == 2, res.stderr[-3000:]
    assert (jobs[0] / "error.json").exists() and (jobs[1] / "finished.json").exists()
    assert "Traceback" in res.stderr and "1 of 2 jobs FAILED" in res.stderr and jobs[0].name in res.stderr

    again = simpo("--multirun", "seed=1,2", f"hydra.sweep.dir={sweep}", *FAST, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep finished: 2 jobs" in again.stdout and (jobs[0] / "error.json").exists()  # left, not reported


@pytest.mark.slow
def test_a_multirun_under_torchrun_runs_its_jobs_in_turn_on_the_same_processes(tmp_path):
    """``torchrun --nproc_per_node 2 -m simpo_exp --multirun ...`` (or accelerate launch): the jobs run one after
    another on the same two processes and share their process group, which used to be destroyed after the first
    job (the second then failed: "Default process group has not been initialized"). Two jobs of one config log
    the same numbers: nothing of the first job carries into the second. The processes exit cleanly. (beta=3 and
    beta=3.0: one config under two folder names; a value given twice names one folder, whose finished run the
    second job would return.)"""
    from tests.test_run import read_metrics
    from tests.test_scale import assert_same_records, two_processes

    sweep = tmp_path / "sweep"
    args = ["--multirun", "hardware=cpu", *FAST, "max_steps=2", "dataset.synthetic.num_train=64", "beta=3,3.0"]
    res = two_processes(*args, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name[:2] for j in jobs] == ["0_", "1_"]
    assert all((j / "finished.json").is_file() for j in jobs)
    # one summary, of both jobs: each process marked the jobs with its own identity and counted its share
    assert res.stdout.count("sweep finished") == 1 and "sweep finished: 2 jobs" in res.stdout, res.stdout[-2000:]
    first, second = (read_metrics(j) for j in jobs)
    assert len(first) >= 2
    assert_same_records(first, second)


def test_a_sweep_stopped_by_a_signal_says_so_not_that_it_finished(tmp_path, capsys):
    """A SIGTERM in job 0 ends the sweep there; its summary said "sweep finished: 1 jobs" although job 1 never ran."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    from simpo_exp.runinfo import SweepSummary

    sweep = tmp_path / "sweep"

    def stopped_job(name: str, override: str, record: str, given=()) -> SweepSummary:
        """A sweep's summary started, then a job of it that left with ``record`` as its stopped.json. ``given``:
        the command line's hydra overrides."""
        summary = SweepSummary()
        hydra = SimpleNamespace(
            sweep=SimpleNamespace(dir=str(sweep)), mode=RunMode.MULTIRUN, overrides=SimpleNamespace(hydra=list(given))
        )
        summary.on_multirun_start(SimpleNamespace(hydra=hydra))
        (sweep / name / ".hydra").mkdir(parents=True)
        (sweep / name / ".hydra" / "overrides.yaml").write_text(f"- {override}\n")
        (sweep / name / "stopped.json").write_text(record)
        return summary

    summary = stopped_job("0_beta=2", "beta=2", '{"signal": "SIGTERM", "step": 8}')
    assert summary._list_failed() is False
    out = capsys.readouterr()
    assert "sweep stopped by SIGTERM after step 8, checkpoint saved, in job 0_beta=2" in out.err
    assert "sweep finished" not in out.out
    # the sweep's folder was Hydra's default, named after the time: the same command alone would start afresh
    assert f"re-run the same command with hydra.sweep.dir={sweep} to resume" in out.err
    # one stopped before its first step says so: no checkpoint was saved
    given = [f"hydra.sweep.dir={sweep}"]
    summary = stopped_job("1_beta=5", "beta=5", '{"signal": "SIGTERM", "step": 0, "during": "set-up"}', given)
    assert summary._list_failed() is False
    err = capsys.readouterr().err
    assert "SIGTERM during set-up, before a step (nothing saved), in job 1_beta=5" in err
    assert "re-run the same command to resume" in err  # the folder named on the command line


def test_a_process_that_failed_while_the_main_one_took_a_stop_is_a_failure(tmp_path, capsys):
    """Under torchrun, rank 1 failing in set-up (a model.path missing on its node) made the launcher SIGTERM the
    main process, which recorded a stop "before a step (nothing saved)": compare and the sweep's summary said
    "stopped ... re-run to resume", and rank 1's message was in no record (it wrote one for crashes only, which
    nothing read). A process's own failure is now the run's, and a re-run's start clears it."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    from simpo_exp.compare import load_run
    from simpo_exp.rundir import failure_record
    from simpo_exp.runinfo import SweepSummary, _take_records

    sweep = tmp_path / "sweep"
    summary = SweepSummary()
    hydra = SimpleNamespace(
        sweep=SimpleNamespace(dir=str(sweep)), mode=RunMode.MULTIRUN, overrides=SimpleNamespace(hydra=[])
    )
    summary.on_multirun_start(SimpleNamespace(hydra=hydra))
    job = sweep / "0_beta=2"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- beta=2\n")
    (job / "stopped.json").write_text('{"signal": "SIGTERM", "step": 0, "during": "set-up"}')
    missing = {"error": "model.path=/models/llama3-8b: no such directory", "type": "ConfigError"}
    (job / "error-rank1.json").write_text(json.dumps(missing))
    assert summary._list_failed() is True
    err = capsys.readouterr().err
    assert "1 of 1 jobs FAILED" in err and "ConfigError: on process 1: model.path=/models/llama3-8b" in err
    assert "sweep stopped" not in err
    run = load_run(job)
    assert run.status == "failed" and "on process 1: model.path=/models/llama3-8b" in run.error
    # the main process's record echoes its collective; the process that failed says why, beside it
    (job / "error.json").write_text('{"error": "Connection closed by peer", "type": "RuntimeError"}')
    assert failure_record(job)["error"] == (
        "Connection closed by peer (process 1: ConfigError: model.path=/models/llama3-8b: no such directory)"
    )
    taken = _take_records(job)  # a re-run's start: the earlier command's records go, to be put back if refused
    assert "error-rank1.json" in taken and not list(job.glob("error*.json")) and failure_record(job) is None
    assert "stopped.json" in taken and not (job / "stopped.json").exists()  # the stop record of before goes too


def test_a_job_killed_without_a_record_is_listed_not_a_finished_sweep(tmp_path, capsys):
    """Under the submitit launchers a job killed outright (out of memory, kill -9, a lost node) writes nothing and
    the launcher's error ends the sweep's command, whose summary then said "sweep finished: 2 jobs" while another
    job was still training. Each unfinished job is listed: killed (its folder's lock free), or not yet recorded."""
    import fcntl
    from types import SimpleNamespace

    from hydra.types import RunMode

    from simpo_exp.rundir import IN_USE_FILE, _this_machine
    from simpo_exp.runinfo import SweepSummary

    sweep = tmp_path / "sweep"
    summary = SweepSummary()
    hydra = SimpleNamespace(
        sweep=SimpleNamespace(dir=str(sweep)), mode=RunMode.MULTIRUN, overrides=SimpleNamespace(hydra=[])
    )
    summary.on_multirun_start(SimpleNamespace(hydra=hydra, method="simpo"))
    assert summary.training
    jobs = [sweep / name for name in ("0_beta=2", "1_beta=5", "2_beta=10")]
    for job in jobs:
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- {job.name[2:]}\n")
        (job / IN_USE_FILE).write_text(f"pid 1{_this_machine()}2026-12-04 10:00:00")
    (jobs[0] / "finished.json").write_text("{}")
    with open(jobs[2] / IN_USE_FILE) as held:  # job 2 still at work
        fcntl.flock(held, fcntl.LOCK_EX)
        assert summary._list_failed() is True
    err = capsys.readouterr().err
    assert "sweep ended with 2 of 3 started jobs unfinished" in err and "sweep finished" not in err
    assert "1_beta=5: killed without a record (out of memory, kill -9); it resumes from its newest checkpoint" in err
    assert "2_beta=10: no record yet: still running, or on another machine" in err
    assert "0_beta=2:" not in err
    for job in jobs[1:]:
        (job / "finished.json").write_text("{}")
    summary.listed = False
    assert summary._list_failed() is False
    assert "sweep finished: 3 jobs in" in capsys.readouterr().out


def test_the_way_to_go_on_names_the_folder_where_the_command_did_not(tmp_path, monkeypatch):
    """Hydra's default folders are named after the time the command started: "re-run the same command" started a
    new run from step 0 in a new folder. Where the command did not name its folder, the advice adds it."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    from simpo_exp.rundir import rerun_command

    monkeypatch.chdir(tmp_path)

    def hydra(mode, given=(), cwd=None):
        return SimpleNamespace(
            mode=mode,
            overrides=SimpleNamespace(hydra=list(given)),
            run=SimpleNamespace(dir="outputs/runs/2030-01-01_00-00-00"),
            sweep=SimpleNamespace(dir="outputs/multirun/2030-01-01_00-00-00"),
            runtime=SimpleNamespace(cwd=cwd),
        )

    run_dir = tmp_path / "outputs" / "runs" / "2030-01-01_00-00-00"
    assert rerun_command(hydra(RunMode.RUN)) == f"re-run the same command with hydra.run.dir={run_dir}"
    sweep_dir = tmp_path / "outputs" / "multirun" / "2030-01-01_00-00-00"
    assert rerun_command(hydra(RunMode.MULTIRUN)) == f"re-run the same command with hydra.sweep.dir={sweep_dir}"
    assert rerun_command(hydra(RunMode.RUN, ["hydra.run.dir=mine"])) == "re-run the same command"
    assert rerun_command(hydra(RunMode.MULTIRUN, ["hydra.sweep.dir=mine"])) == "re-run the same command"
    assert rerun_command(hydra(RunMode.RUN, ["++hydra.run.dir=mine"])) == "re-run the same command"
    # a sweep folder holding a comma and a space: the folder given as one word Hydra reads back as it is
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    odd = SimpleNamespace(**vars(hydra(RunMode.MULTIRUN)))
    odd.sweep = SimpleNamespace(dir="my runs/b=2,s=1")
    (word,) = shlex.split(rerun_command(odd).split(" with ", 1)[1])
    assert OverridesParser.create().parse_override(word).value() == str(tmp_path / "my runs" / "b=2,s=1")
    # under hydra.job.chdir=true the process works in the job's folder: the command's own directory counts
    (tmp_path / "job").mkdir()
    monkeypatch.chdir(tmp_path / "job")
    in_job = rerun_command(hydra(RunMode.RUN, cwd=str(tmp_path)))
    assert in_job == f"re-run the same command with hydra.run.dir={run_dir}"
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # another test's in-process Hydra run may have set it
    assert rerun_command() == "re-run the same command"  # outside a Hydra run: nothing to add


def test_a_failed_sweep_of_another_stage_is_not_pointed_at_compare(tmp_path, capsys):
    """compare reads training runs: a generate or evaluate sweep's summary pointed at it, which then found none."""
    from types import SimpleNamespace

    from simpo_exp.runinfo import SweepSummary

    # the generate stage's config has a method too (its schema extends the training one): the primary config decides
    for stage, name in (("generate", "generate"), ("evaluate", "evaluate"), ("train", "config")):
        sweep = tmp_path / stage
        summary = SweepSummary()
        hydra = SimpleNamespace(sweep=SimpleNamespace(dir=str(sweep)), job=SimpleNamespace(config_name=name))
        summary.on_multirun_start(SimpleNamespace(hydra=hydra, method="simpo"))
        (sweep / "0_x=1" / ".hydra").mkdir(parents=True)
        (sweep / "0_x=1" / ".hydra" / "overrides.yaml").write_text("- x=1\n")
        (sweep / "0_x=1" / "error.json").write_text('{"type": "ConfigError", "error": "no"}')
        assert summary._list_failed() is True
        err = capsys.readouterr().err
        assert "1 of 1 jobs FAILED" in err and ("simpo_exp.compare" in err) == (stage == "train"), err


def test_the_multinode_sbatch_script_gives_each_node_its_own_rank(tmp_path):
    """launchers/slurm-multinode.sbatch under stand-ins for srun (one task per node, each with its SLURM_NODEID),
    scontrol and accelerate: the rank was expanded once, on the first node, so every node got machine_rank 0.
    Also: srun is given the tasks' CPUs, torchrun time to let its processes save after the signal (30 s by default),
    and a run stopped at the time limit is requeued (SLURM requeues only preempted jobs), one that ended is not;
    RUN_DIR=... resumes the run of another job."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "srun": f'while [[ $1 == --* ]]; do echo "$1" >> {tmp_path}/srun_options; shift; done\n'
        'for n in 0 1; do SLURM_NODEID=$n "$@" || exit $?; done',
        "scontrol": f'if [[ $1 == requeue ]]; then echo "$*" >> {tmp_path}/requeued\n'
        'else printf "node-a\\nnode-b\\n"; fi',
        "accelerate": f'echo "$* shutdown=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" >> {tmp_path}/launched\n'
        "[[ -n ${FAIL:-} ]] && exit 1\n"  # the launch failed before the run began (a rendezvous timeout, say)
        'if [[ -n ${STOP:-} ]]; then mkdir -p "$RUN_DIR" && echo "$STOP" > "$RUN_DIR/stopped.json" && exit 143; fi',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]"}
    env |= {"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_CPUS_PER_TASK": "64"}
    env.pop("RUN_DIR", None)
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    script = Path(__file__).resolve().parents[1] / "launchers" / "slurm-multinode.sbatch"

    def sbatch(**extra):
        return subprocess.run(
            ["bash", str(script)], env=env | extra, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    res = sbatch()
    assert res.returncode == 0, res.stderr
    lines = (tmp_path / "launched").read_text().splitlines()
    assert len(lines) == 2 and all("--num_processes 16" in x and "--main_process_ip node-a" in x for x in lines)
    assert ["--machine_rank 0" in lines[0], "--machine_rank 1" in lines[1]] == [True, True]
    assert all("hydra.run.dir=outputs/runs/slurm-77" in x and x.endswith("shutdown=110") for x in lines)
    # the rendezvous port follows the job id: two jobs of a few GPUs each placed on one node bound 29500 both
    assert all("--main_process_port 20077 " in x for x in lines)
    # the launcher and the hardware preset are a pair (another preset is refused at start-up), one launcher a node
    # (it starts a process per GPU), SIGTERM early enough for torchrun's 110 s shutdown window, requeued on preemption
    import re

    assert all(re.search(r"--config_file launchers/(\S+)\.yaml .* hardware=\1 ", x) for x in lines), lines
    head = [line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert {"--ntasks-per-node=1", "--requeue"} <= set(head)
    assert int(next(h for h in head if h.startswith("--signal=TERM@")).split("@")[1]) > 110
    assert (tmp_path / "srun_options").read_text() == "--cpus-per-task=64\n"
    assert not (tmp_path / "requeued").exists()  # it ended: nothing to requeue
    (tmp_path / "launched").unlink()  # nodes of 4 GPUs (--gpus-per-node=4): 4 processes each, not 8 (two a GPU)
    assert sbatch(SLURM_GPUS_ON_NODE="4").returncode == 0
    assert all("--num_processes 8 " in x for x in (tmp_path / "launched").read_text().splitlines())
    res = sbatch(STOP='{"signal": "SIGTERM", "step": 40}')  # stopped by the signal before the limit, saved
    assert res.returncode == 143 and (tmp_path / "requeued").read_text() == "requeue 77\n", res.stderr
    # requeued again and again without progress before: the earlier attempt's stopped.json with this one failed,
    # a stop during set-up (one longer than --time), or past MAX_REQUEUES
    res = sbatch(FAIL="1")
    assert res.returncode == 1 and "an earlier attempt's" in res.stderr
    res = sbatch(STOP='{"signal": "SIGTERM", "step": 0, "during": "set-up"}')
    assert res.returncode == 143 and "before its first step" in res.stderr
    res = sbatch(STOP='{"signal": "SIGTERM", "step": 80}', SLURM_RESTART_COUNT="10")
    assert res.returncode == 143 and "MAX_REQUEUES=10" in res.stderr
    assert (tmp_path / "requeued").read_text() == "requeue 77\n"  # none of the three
    (tmp_path / "launched").unlink()
    assert sbatch(RUN_DIR="outputs/runs/slurm-5").returncode == 0  # the run of job 5 goes on in this job
    assert all("hydra.run.dir=outputs/runs/slurm-5 " in x for x in (tmp_path / "launched").read_text().splitlines())


# Loaded by every Python process of the sweep below: the second training process crashes at its first step, once.
CRASH_ON_RANK_1 = """
import os

if os.environ.get("RANK") == "1":
    import simpo_exp.train as train

    real, crashed = train.optimizer_step, []

    def crash_once(*args, **kwargs):
        if not crashed:
            crashed.append(True)
            raise RuntimeError("injected crash on rank 1")
        return real(*args, **kwargs)

    train.optimizer_step = crash_once
"""


@pytest.mark.slow
def test_a_crash_on_one_process_of_a_multirun_ends_the_sweep_on_every_process(tmp_path):
    """Under torchrun a crash on rank 1 was caught there as one job's failure: rank 1 went on to the next job alone
    while rank 0 waited in the first one's collectives, and the only record, rank 0's error.json, held the follow-on
    error. Every process now stops, and rank 1's own crash is recorded beside the job's error.json."""
    from tests.test_scale import two_processes

    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(CRASH_ON_RANK_1)
    sweep = tmp_path / "sweep"
    args = ["--multirun", "hardware=cpu", *FAST, "max_steps=2", "dataset.synthetic.num_train=64", "beta=3,4"]
    args += ["hardware.collective_timeout=60", f"hydra.sweep.dir={sweep}"]
    res = two_processes(*args, cwd=tmp_path, inject=tmp_path / "inject", timeout=300)
    assert res.returncode != 0
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name[:2] for j in jobs] == ["0_"], res.stderr[-3000:]  # the second job never started
    own = json.loads((jobs[0] / "error-rank1.json").read_text())
    assert own["error"] == "injected crash on rank 1" and own["type"] == "RuntimeError"


def test_the_launcher_and_sweeper_name_neither_the_job_folders_nor_the_runs():
    """`+launcher=local,+sweep=optuna,beta=...` named every job folder and W&B run: a sweep tried locally and then
    submitted to SLURM had other folders, so it neither skipped its finished jobs nor resumed the others."""
    import yaml
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from simpo_exp.rundir import CONF_DIR
    from simpo_exp.runinfo import run_name

    given = ["+launcher=slurm", "+sweep=optuna", "beta=2", "hydra.launcher.partition=gpu"]
    assert run_name(given, 0.0) == "beta=2"
    dirname = yaml.safe_load((Path(CONF_DIR) / "config.yaml").read_text())["hydra"]["job"]["config"]["override_dirname"]
    overrides = OverridesParser.create().parse_overrides(given[:3])
    assert get_overrides_dirname(overrides, dirname["exclude_keys"], dirname["item_sep"], dirname["kv_sep"]) == "beta=2"


def test_a_long_job_folder_name_keeps_what_tells_the_jobs_apart():
    """Hydra sorts the overrides by key and the name was cut at 120 characters from the end: a sweep over seed
    with a few other overrides lost the seed from every folder (two failed jobs could not be told apart), an Optuna
    trial lost its learning rate. Past the limit, what does not change the training goes first, long floats are
    rounded, dotted keys shortened; the hash of the whole list keeps the names apart."""
    from simpo_exp.runinfo import job_dirname

    assert job_dirname("beta=2,model.path=/data/m") == "beta=2,model.path=_data_m"  # short: as Hydra gives it
    at_limit = "beta=2,seed=1,model.path=" + "x" * (120 - len("beta=2,seed=1,model.path="))
    assert len(at_limit) == 120 and job_dirname(at_limit) == at_limit  # 120 characters: as given, no hash
    past = job_dirname(at_limit + "y")
    assert len(past) <= 120 and len(past.rsplit("-", 1)[1]) == 8  # one more: cut, its hash after it
    seeds = [
        "beta=-1,dataset.synthetic.num_test=32,dataset.synthetic.num_train=128,eval_steps=0,logger=none,max_steps=3,"
        f"num_generations=0,seed={seed}"
        for seed in (1, 2)
    ]
    names = [job_dirname(o) for o in seeds]
    assert names[0].startswith(
        "beta=-1,dataset.synthetic.num_test=32,dataset.synthetic.num_train=128,max_steps=3,seed=1-"
    )
    assert names[1].split("-")[:-1] != names[0].split("-")[:-1] and all(len(n) <= 120 for n in names)
    trial = (
        "beta=4.939549651064031,dataset.synthetic.num_test=32,dataset.synthetic.num_train=128,"
        "gamma_beta_ratio=0.6183818137361412,learning_rate=0.0003361286938479,max_steps=3"
    )
    name = job_dirname(trial)
    assert name.startswith(
        "beta=4.93955,num_test=32,num_train=128,gamma_beta_ratio=0.618382,learning_rate=0.000336129,"
    )
    assert len(name) <= 120 and name != job_dirname(trial.replace("max_steps=3", "max_steps=4"))
    # a job of a sweep started before names were cut this way keeps its folder (and the checkpoints in it)
    import hashlib
    import tempfile

    with tempfile.TemporaryDirectory() as sweep_dir:
        before = trial[:111] + "-" + hashlib.sha256(trial.encode()).hexdigest()[:8]
        assert job_dirname(trial, sweep_dir, 3) == name
        (Path(sweep_dir) / f"3_{before}").mkdir()
        assert job_dirname(trial, sweep_dir, 3) == before and job_dirname(trial, sweep_dir, 4) == name
        from simpo_exp.runinfo import job_subdir  # numbered anew (a value taken out of the sweep): the same folder

        assert job_subdir(trial, sweep_dir, 3) == job_subdir(trial, sweep_dir, 0) == f"3_{before}"
        assert job_subdir("beta=2", sweep_dir, 1) == "1_beta=2"
    lists = "dataset.sources=[ultrafeedback,argilla],eval_steps=5," + "x" * 120 + "=1"  # a list value's commas stay
    assert job_dirname(lists).startswith("sources=[ultrafeedback,argilla]-")  # eval_steps, the long item left out
    # whole items give way, the longest first and the sweep's swept keys last: the name was cut inside a value
    # ("max_steps=" then the hash, read as max_steps=-4954...) and a seed sweep's names differed by their hash alone
    recipe = "beta=2.5,experiment=simpo-llama3-8b-instruct,gamma_beta_ratio=0.55,hardware=ddp-lora,"
    recipe += "learning_rate=8e-07,max_length=2048,seed={},warmup_ratio=0.1"
    assert [job_dirname(recipe.format(s)).split(",")[5] for s in (1, 12)] == ["seed=1", "seed=12"]
    assert all(i in recipe.format(1).split(",") for i in job_dirname(recipe.format(1))[:-9].split(","))  # whole
    with tempfile.TemporaryDirectory() as sweep_dir:  # swept: experiment kept, the next longest left out
        (Path(sweep_dir) / "multirun.yaml").write_text(
            "hydra:\n  overrides:\n    task: ['experiment=simpo-llama3-8b-instruct,simpo-mistral-7b-base']\n"
        )
        assert "experiment=simpo-llama3-8b-instruct" in job_dirname(recipe.format(1), sweep_dir, 0)
    # a quoted path holding a comma (a sweep job's model, as the README passes it) is one value: its "eval_steps=10"
    # is no setting, and two jobs trained from different models do not train alike
    from simpo_exp.runinfo import _trains_alike

    models = [f"model.path='/sweep/0_beta=5,eval_steps={n}/model',seed=1" for n in (10, 50)]
    assert _trains_alike(models[0]) != _trains_alike(models[1])
    assert _trains_alike(models[0] + ",eval_steps=7") == _trains_alike(models[0])  # a real eval_steps: left out
    quoted = job_dirname(models[0] + ",eval_steps=7," + "x" * 120 + "=1")
    assert "eval_steps=10" in quoted and "eval_steps=7" not in quoted


def test_a_sweep_over_a_setting_a_resume_may_change_runs_each_value(tmp_path):
    """A job goes on in the folder of a job that trained alike under other operational settings (logger=none added,
    another eval_steps): a sweep run again with one added resumes. A sweep that itself gives such a setting several
    values (``eval_steps=1,2``) asked for a run of each: its second job went into the first's folder and was skipped
    as finished."""
    from simpo_exp.runinfo import job_subdir

    def job(folder: str, overrides: str) -> None:
        (tmp_path / folder / ".hydra").mkdir(parents=True)
        hydra = {"hydra": {"job": {"override_dirname": overrides}}}
        (tmp_path / folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))

    def asked(*task: str) -> None:
        sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}
        multirun = {"hydra": {"overrides": {"task": list(task)}, "sweeper": sweeper}}
        (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(multirun))

    job("0_beta=2,eval_steps=1", "beta=2,eval_steps=1")
    asked("beta=2", "eval_steps=1,2")
    assert job_subdir("beta=2,eval_steps=2", tmp_path, 1) == "1_beta=2,eval_steps=2"
    assert job_subdir("beta=2,eval_steps=1", tmp_path, 0) == "0_beta=2,eval_steps=1"
    asked("beta=2", "eval_steps=1", "logger=none")  # the sweep run again, one setting added: the job goes on
    assert job_subdir("beta=2,eval_steps=1,logger=none", tmp_path, 0) == "0_beta=2,eval_steps=1"
    asked("beta=2", "eval_steps=3")  # one value for everything, the old folder's trained alike
    assert job_subdir("beta=2,eval_steps=3", tmp_path, 0) == "0_beta=2,eval_steps=1"
    asked("beta=2,3", "eval_steps=range(2,4)")  # sweep grammar: range() sweeps too
    assert job_subdir("beta=2,eval_steps=3", tmp_path, 1) == "1_beta=2,eval_steps=3"
    # a folder without its record (hydra.output_subdir=null) trains like nothing known: a job of operational
    # settings alone (which trains as the default) does not go into it
    (tmp_path / "5_beta=7").mkdir()
    asked("logger=none")
    assert job_subdir("logger=none", tmp_path, 6) == "6_logger=none"


def test_a_sweep_folders_recorded_keys_are_its_own_not_another_stages(tmp_path, monkeypatch):
    """An evaluate --multirun records its swept keys (run_dir) for its own folder; a training sweep's folder read
    meanwhile (the runs it evaluates) took them for its own: its jobs' names and folders by the wrong keys."""
    from simpo_exp.runinfo import SWEEP_DIR_ENV, SWEPT_ENV, swept_keys

    sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}
    (tmp_path / "train").mkdir()
    multirun = {"hydra": {"overrides": {"task": ["beta=2,3"]}, "sweeper": sweeper}}
    (tmp_path / "train" / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    monkeypatch.setenv(SWEPT_ENV, '["run_dir"]')
    monkeypatch.setenv(SWEEP_DIR_ENV, str(tmp_path / "eval"))
    assert swept_keys(tmp_path / "train") == {"beta"} and swept_keys(tmp_path / "eval") == {"run_dir"}


def test_a_multirun_on_several_processes_without_a_fixed_sweep_folder_is_refused(tmp_path):
    """Each torchrun process resolved the default sweep folder (outputs/multirun/${now}) at its own start: processes
    a second apart wrote two folders, one of them holding a log alone, and two sweep summaries."""
    from tests.test_scale import two_processes

    args = ["--multirun", "hardware=cpu", *FAST, "max_steps=1", "beta=3"]
    res = two_processes(*args, cwd=tmp_path, timeout=300)
    assert "give a fixed hydra.sweep.dir=" in res.stderr, res.stderr[-3000:]
    assert not list(tmp_path.glob("outputs/multirun/*/*/metrics.jsonl"))  # nothing trained


def test_a_process_other_than_the_main_one_names_its_rank_in_the_log(monkeypatch):
    """Every process of a run logs into the one __main__.log: on 2 processes each line stood there twice, unnamed
    (the log-prob check's line, the main process's alone, looked like both processes')."""
    import io
    import logging

    from simpo_exp.runinfo import name_the_rank_in_logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        monkeypatch.setenv("RANK", "0")
        name_the_rank_in_logs()
        logging.getLogger("simpo_exp.x").warning("main")
        monkeypatch.setenv("RANK", "1")
        name_the_rank_in_logs()
        name_the_rank_in_logs()  # a sweep's next job in this process: named once
        logging.getLogger("simpo_exp.x").warning("other")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["[WARNING] - main", "[rank 1][WARNING] - other"]


def test_a_sweep_without_hydra_folders_still_lists_its_failed_jobs_and_a_rerun_clears_a_refusal(tmp_path, capsys):
    """Under hydra.output_subdir=null a job has no .hydra/overrides.yaml: its log marks it as run (and failed, with
    its error.json). A re-run's start takes away the refusal an earlier command recorded, which the summary and
    compare would otherwise read as this run's."""
    from types import SimpleNamespace

    from simpo_exp.rundir import REFUSED_FILE
    from simpo_exp.runinfo import SweepSummary, _take_records

    sweep = tmp_path / "sweep"
    summary = SweepSummary()
    hydra_cfg = SimpleNamespace(sweep=SimpleNamespace(dir=str(sweep)))
    summary.on_multirun_start(SimpleNamespace(hydra=hydra_cfg, method="simpo"))
    job = sweep / "0_beta=-1"
    job.mkdir(parents=True)
    (job / "__main__.log").write_text("[ERROR] beta=-1\n")
    (job / "error.json").write_text('{"type": "ConfigError", "error": "beta=-1: must be positive"}')
    assert summary._list_failed() is True
    assert "1 of 1 jobs FAILED" in capsys.readouterr().err
    (job / REFUSED_FILE).write_text('{"type": "OtherRunsDirectory", "error": "another run"}')
    _take_records(job)
    assert not (job / REFUSED_FILE).exists() and not (job / "error.json").exists()


def test_a_second_sweep_in_the_same_folder_does_not_fail_the_first(tmp_path, capsys, monkeypatch):
    """The same sweep command started twice in one folder: the second's jobs were refused (the first's held their
    folders), and the first's summary, reading the refusal records beside its jobs, listed them as its own failures
    ("1 of 2 jobs FAILED") although every job of its own finished. Each refusal names the sweep that ran the job."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    from simpo_exp.errors import FolderInUse, OtherRunsDirectory
    from simpo_exp.rundir import REFUSED_FILE
    from simpo_exp.runinfo import IN_USE_REFUSED, SWEEP_ENV, SweepSummary, refusal_record

    monkeypatch.delenv(SWEEP_ENV, raising=False)  # restored after the test: on_multirun_start sets it
    sweep = tmp_path / "sweep"
    hydra = SimpleNamespace(
        sweep=SimpleNamespace(dir=str(sweep)), mode=RunMode.MULTIRUN, overrides=SimpleNamespace(hydra=[])
    )
    first = SweepSummary()
    first.on_multirun_start(SimpleNamespace(hydra=hydra, method="simpo"))
    jobs = [sweep / "0_beta=2", sweep / "1_beta=5"]
    for job in jobs:
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- {job.name[2:]}\n")
        (job / "finished.json").write_text("{}")
    # the second sweep's jobs, refused: one whose folder the first's job held, one refused by the run in its folder
    monkeypatch.setenv(SWEEP_ENV, "other-host:4242:second")
    (sweep / f"{IN_USE_REFUSED}0_beta=2.json").write_text(refusal_record(FolderInUse("0_beta=2 is in use")))
    (jobs[1] / REFUSED_FILE).write_text(refusal_record(OtherRunsDirectory("another run's folder")))
    assert first._list_failed() is False
    captured = capsys.readouterr()
    assert "FAILED" not in captured.err and "sweep finished: 2 jobs in" in captured.out
    # the first sweep's own refusal is still its failure
    monkeypatch.setenv(SWEEP_ENV, first.token)
    (sweep / f"{IN_USE_REFUSED}0_beta=2.json").write_text(refusal_record(FolderInUse("0_beta=2 is in use")))
    first.listed = False
    assert first._list_failed() is True
    assert "1 of 2 jobs FAILED" in capsys.readouterr().err


def test_a_refused_job_of_a_second_sweep_leaves_the_working_jobs_sweep_mark(tmp_path, monkeypatch):
    """Hydra calls on_job_start before the job can be refused: the second sweep's refused job had marked the first
    sweep's working job as its own, and the first sweep's summary left that job out (a stop or failure of it
    unreported, the sweep saying it ended before any job ran)."""
    import fcntl
    import os

    from simpo_exp import runinfo
    from simpo_exp.rundir import IN_USE_FILE, release_folders

    job = tmp_path / "sweep" / "0_beta=2"
    (job / ".hydra").mkdir(parents=True)
    mark = job / ".hydra" / runinfo.SWEEP_MARK
    monkeypatch.setattr(runinfo, "hydra_files", lambda cfg: {"overrides.yaml": "- beta=2\n"})
    monkeypatch.setattr(runinfo, "_started_with", {})
    mark.write_text("host:1:first")  # the first sweep's job starts (on_job_start), and takes its folder
    assert runinfo._take_folder(job, job, None, single=False)
    assert (job / ".hydra" / runinfo.HELD / "overrides.yaml").read_text() == "- beta=2\n"  # its copy to put back
    release_folders()  # ... and holds it from a process of its own
    holder = os.open(job / IN_USE_FILE, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        monkeypatch.setenv(runinfo.SWEEP_ENV, "host:2:second")
        mark.write_text("host:2:second")  # the second sweep's job starts in the same folder, and is refused there
        assert not runinfo._take_folder(job, job, None, single=False)
        assert mark.read_text() == "host:1:first" and runinfo._sweep_mark(job) == "host:1:first"
        assert (job.parent / f"{runinfo.IN_USE_REFUSED}0_beta=2.json").exists()
        (job / ".hydra" / runinfo.HELD / runinfo.SWEEP_MARK).unlink()  # a holder that ran no sweep has no mark
        mark.write_text("host:2:second")
        assert not runinfo._take_folder(job, job, None, single=False)
        assert not mark.exists()
    finally:
        os.close(holder)


def test_a_job_another_sweep_started_in_the_folder_is_not_this_sweeps(tmp_path, capsys, monkeypatch):
    """Two sweeps in one folder (two default folders made in the same second are one): the first listed the second's
    failed, stopped or running jobs as its own and exited 1. Each job's folder carries the identity of the sweep that
    last started it (``.hydra/sweep``, written as the job starts); and a job reads its own sweep's swept keys, not
    those of whichever sweep rewrote the folder's multirun.yaml last (its eval_steps=20 job was taken for the
    finished eval_steps=10 one and never ran)."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from simpo_exp.runinfo import SWEEP_DIR_ENV, SWEEP_ENV, SWEEP_MARK, SWEPT_ENV, SweepSummary, swept_keys

    for name in (SWEEP_ENV, SWEPT_ENV, SWEEP_DIR_ENV):
        monkeypatch.delenv(name, raising=False)  # restored after the test: on_multirun_start sets them
    sweep = tmp_path / "sweep"
    hydra = {
        "sweep": {"dir": str(sweep)}, "mode": "MULTIRUN", "output_subdir": ".hydra",
        "overrides": {"hydra": [], "task": ["beta=2", "eval_steps=10,20"]}, "sweeper": {},
    }  # fmt: skip
    first = SweepSummary()
    first.on_multirun_start(OmegaConf.create({"hydra": hydra, "method": "simpo"}))
    (sweep / "multirun.yaml").parent.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml({"hydra": hydra | {"overrides": {"task": ["beta=3"]}}}))
    assert swept_keys(sweep) == {"eval_steps"}  # its own, though the folder's multirun.yaml is another sweep's now
    mine, theirs = sweep / "0_beta=2,eval_steps=10", sweep / "0_beta=3"
    for job in (mine, theirs):
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- {job.name[2:]}\n")
        job_cfg = OmegaConf.create({"hydra": hydra | {"runtime": {"output_dir": str(job)}}})
        job_cfg.hydra.mode = RunMode.MULTIRUN
        first.on_job_start(job_cfg)  # as Hydra calls it in the job's process
    (mine / "finished.json").write_text("{}")
    (theirs / ".hydra" / SWEEP_MARK).write_text("other-host:4242:second")  # the second sweep started it last
    (theirs / "error.json").write_text('{"error": "boom", "type": "RuntimeError"}')
    assert (mine / ".hydra" / SWEEP_MARK).read_text() == first.token
    assert first._list_failed() is False
    captured = capsys.readouterr()
    assert "FAILED" not in captured.err and "boom" not in captured.err and "sweep finished: 1 jobs in" in captured.out


def test_a_fixed_sweep_folder_given_with_plus_signs_counts_as_fixed_under_torchrun(monkeypatch):
    """``++hydra.sweep.dir=...`` names the folder as ``hydra.sweep.dir=...`` does: under torchrun it was refused as
    "not fixed", the message calling the user's own folder the default."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    from simpo_exp.config import ConfigError
    from simpo_exp.runinfo import refuse_a_sweep_folder_per_process

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    hc = lambda given: SimpleNamespace(  # noqa: E731
        mode=RunMode.MULTIRUN, overrides=SimpleNamespace(hydra=given), sweep=SimpleNamespace(dir="outputs/multirun/b")
    )
    for given in (["hydra.sweep.dir=outputs/multirun/b"], ["++hydra.sweep.dir=outputs/multirun/b"]):
        refuse_a_sweep_folder_per_process(hc(given))
    with pytest.raises(ConfigError, match="give a fixed hydra.sweep.dir"):
        refuse_a_sweep_folder_per_process(hc([]))


def test_a_moved_sweep_keeps_the_wandb_group_its_jobs_recorded(tmp_path):
    """A sweep moved to another folder and resumed there: its resumed and new jobs got a group of the new path, the
    finished ones kept theirs, and the dashboard refused the sweep as two. The group its jobs recorded is taken."""
    from simpo_exp.runinfo import recorded_sweep_group, sweep_group

    moved = tmp_path / "moved" / "beta"
    assert recorded_sweep_group(moved) is None  # nothing recorded: the group comes from the path
    old = sweep_group(str(tmp_path / "first" / "beta"))
    for job, group in (("0_beta=2", old), ("1_beta=5", old), ("2_beta=9", None)):
        (moved / job).mkdir(parents=True)
        record = {"id": job, **({"group": group} if group else {})}
        (moved / job / "wandb_run.json").write_text(json.dumps(record))
    (moved / "3_beta=1").mkdir()
    (moved / "3_beta=1" / "wandb_run.json").write_text("{not json")  # a damaged record is passed over
    assert recorded_sweep_group(moved) == old != sweep_group(str(moved))


def test_a_sweep_whose_jobs_write_to_an_output_dir_of_their_own_finds_their_records(tmp_path, capsys):
    """``output_dir=/x/b${beta}`` (how a sweep's jobs each get a folder of their own outside the sweep's) cannot be
    resolved from a job's saved config: the sweep's summary called both finished jobs "still running" and exited 1,
    and compare listed them as running without metrics. Each job now writes where its records went (here with a
    Hydra resolver in the path, which nothing outside the run resolves: the pointer alone finds them)."""
    from simpo_exp import compare

    sweep, out = tmp_path / "sweep", tmp_path / "out"
    res = simpo(
        "--multirun",
        "beta=2,5",
        f"output_dir={out}/b${{beta}}-j${{hydra:job.num}}",
        f"hydra.sweep.dir={sweep}",
        *FAST,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sweep finished: 2 jobs" in res.stdout and "still running" not in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["b2.0-j0", "b5.0-j1"]  # beta resolved as the float it is
    assert all((out / b / "summary.json").exists() for b in ("b2.0-j0", "b5.0-j1"))
    assert compare.main([str(sweep), "--no-plots"]) == 0
    table = capsys.readouterr().out
    assert "(2 done, 0 running, 0 failed)" in table and "no metrics" not in table, table


def _identity(tmp_path, monkeypatch, *overrides: str, swept: tuple = ()) -> tuple:
    """(logger.run_name, logger.group) as ``fill_run_identity`` sets them for a job given ``overrides`` (a --multirun
    job of a sweep over ``swept`` where that is given), in process: Hydra's state as a run would have it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from simpo_exp.runinfo import SWEEP_DIR_ENV, SWEPT_ENV, fill_run_identity
    from tests.conftest import CONF

    sweep = tmp_path / "sweep"
    overrides = [f"output_dir={tmp_path / 'run'}", f"hydra.sweep.dir={sweep}", *overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd, cfg.hydra.runtime.output_dir = str(tmp_path), str(tmp_path / "run")
        if swept:
            cfg.hydra.mode = "MULTIRUN"
            monkeypatch.setenv(SWEPT_ENV, json.dumps(list(swept)))  # as the sweeping command records them
            monkeypatch.setenv(SWEEP_DIR_ENV, str(sweep))
    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        cfg = fill_run_identity(cfg)
    finally:
        HydraConfig.instance().cfg = before
    return cfg.logger.run_name, cfg.logger.group


def test_a_jobs_name_and_group_come_from_its_sweep_unless_the_command_names_them(tmp_path, monkeypatch):
    """What fill_run_identity passes on was untested: without the sweep's keys, two jobs of a sweep over an
    operational key (logging_steps=1,2) got one W&B name and model card name; a logger.run_name or logger.group given
    was replaced; a single run got a sweep's group; a moved sweep's jobs left the group the finished ones recorded."""
    from simpo_exp.runinfo import sweep_group

    names = [_identity(tmp_path, monkeypatch, f"logging_steps={n}", "beta=3", swept=("logging_steps",)) for n in (1, 2)]
    assert names[0][0] != names[1][0] and "logging_steps=1" in names[0][0]
    assert names[0][1] == names[1][1] == sweep_group(str(tmp_path / "sweep"))  # one group: the sweep's
    assert _identity(tmp_path, monkeypatch, "logging_steps=1", "beta=3") == ("beta=3", None)  # not swept: no group
    mine = _identity(tmp_path, monkeypatch, "beta=3", "logger.run_name=ablation-A", "logger.group=g", swept=("beta",))
    assert mine == ("ablation-A", "g")
    old = sweep_group(str(tmp_path / "first" / "sweep"))  # the sweep's finished jobs recorded it before the move
    (tmp_path / "sweep" / "0_beta=2").mkdir(parents=True)
    (tmp_path / "sweep" / "0_beta=2" / "wandb_run.json").write_text(json.dumps({"id": "x", "group": old}))
    assert _identity(tmp_path, monkeypatch, "beta=3", swept=("beta",))[1] == old


# Loaded by the sweep's process below: a USR2 handler that declines to requeue as submitit's does once a job's
# time-outs are used up (it raises UncompletedJobError), and the first job signalled at its first step.
DECLINED_REQUEUE = """
import os, signal

class UncompletedJobError(RuntimeError):
    pass

def declines(signum, frame):
    raise UncompletedJobError("Job not requeued because: timed-out too many times.")

signal.signal(signal.SIGUSR2, declines)

import simpo_exp.train as train

real, sent = train.optimizer_step, []

def signalled_once(run, *args, **kwargs):
    if not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGUSR2)
    return real(run, *args, **kwargs)

train.optimizer_step = signalled_once
"""


def test_a_job_submitit_declines_to_requeue_is_stopped_not_crashed(tmp_path):
    """At a time limit after hydra.launcher.max_num_timeout requeues, submitit's handler raises UncompletedJobError
    from the main task: the job had saved its checkpoint and stopped.json, yet was recorded as a crash (error.json
    with a traceback) beside them, and the run's processes left without meeting. It is a stopped, resumable run; the
    sweep goes on."""
    from tests.runs import run_module

    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(DECLINED_REQUEUE)
    sweep = tmp_path / "sweep"
    args = ["--multirun", "hardware=cpu", *FAST, "dataset.synthetic.num_train=64", "beta=3,4"]
    args.append(f"hydra.sweep.dir={sweep}")
    env = {"PYTHONPATH": f"{tmp_path / 'inject'}:{Path(__file__).resolve().parents[1]}"}
    res = run_module("simpo_exp", *args, cwd=tmp_path, env=env, timeout=300)
    first, second = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert (first / "stopped.json").exists() and not (first / "error.json").exists(), res.stderr[-3000:]
    assert "stopped at the time limit and not requeued (Job not requeued because: timed-out too many times.)" in (
        res.stderr
    )
    assert "crashed" not in res.stderr and (second / "summary.json").exists()
