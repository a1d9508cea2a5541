"""The compare command and the notebook, on one real sweep: beta=2,5 x seed=1,2 plus an invalid beta=-1."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from simpo_exp import compare, rundir
from simpo_exp.rundir import hold_folder, release_folders
from tests.runs import run_module
from tests.test_run import simpo

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "max_steps=4",
    "eval_steps=2",
    "logging_steps=2",
    "logger=none",
    "save_model=false",
    "num_generations=2",
    "max_new_tokens=8",
    "dataset.synthetic.num_train=128",
    "dataset.synthetic.num_test=32",
]
PLOTS = sorted(f"{fam.slug}.png" for fam in compare.FAMILIES)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Six jobs: four train (beta 2 and 5, seeds 1 and 2), two fail validation (beta=-1)."""
    root = tmp_path_factory.mktemp("cmp")
    sweep = root / "sweep"
    with pytest.MonkeyPatch.context() as mp:
        # One thread: the tiny model gains nothing from more, and on a busy 2-core machine spinning
        # OpenMP threads made each job ~15x slower (50 s instead of 3 s).
        mp.setenv("OMP_NUM_THREADS", "1")
        res = simpo("--multirun", "beta=2,5,-1", "seed=1,2", f"hydra.sweep.dir={sweep}", *FAST, cwd=root)
    assert res.returncode == 1, res.stderr[-3000:]  # the invalid jobs are reported at the end
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [(j / "summary.json").exists() for j in jobs] == [True] * 4 + [False] * 2, res.stderr[-3000:]
    return sweep


def job(sweep: Path, num: int) -> Path:
    return next(sweep.glob(f"{num}_*"))


def killed_at_step_2(folder: Path) -> Path:
    """``folder`` (a copy of a finished job) as a kill after its step-2 checkpoint leaves it: no summary.json."""
    (folder / "summary.json").unlink(missing_ok=True)
    (folder / "checkpoints" / "step-000002").mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints" / "step-000002" / "COMPLETE").write_text("{}")
    return folder


def check_pngs(paths) -> None:
    from matplotlib.image import imread

    assert sorted(p.name for p in paths) == PLOTS
    for png in paths:
        assert png.stat().st_size > 20_000, png
        pixels = imread(png)
        assert pixels.shape[0] > 400 and pixels.shape[1] > 800 and pixels.std() > 0.05, f"{png} looks blank"


def printed_rows(out: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the printed table (columns are two or more spaces apart)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run "))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return re.split(r"\s{2,}", lines[start].strip()), rows


def test_without_matplotlib_the_tables_print_and_the_plots_are_said_to_be_missing(sweep, capsys, monkeypatch):
    """matplotlib is in the test extras only: a user who installed the package alone got a traceback."""
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else found(name, *a))
    assert compare.main([str(sweep), "--out", str(sweep / "plots")]) == 0
    out = capsys.readouterr().out
    assert "6 runs (4 done, 0 running, 2 failed)" in out and "plots: not drawn, matplotlib is not installed" in out
    assert not (sweep / "plots").exists()


def test_table_ranks_done_jobs_and_marks_the_failed_ones(sweep, capsys):
    assert compare.main([str(sweep), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "6 runs (4 done, 0 running, 2 failed)" in out and "common overrides: max_steps=4" in out
    assert not (sweep / "compare").exists()
    runs = compare.load_runs(sweep)
    assert [r.label for r in runs[:2]] == ["beta=2, seed=1", "beta=2, seed=2"]
    rows = compare.runs_table(runs)
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"] * 2
    accs = [r["eval/rewards/accuracies"] for r in rows[:4]]
    assert accs == sorted(accs, reverse=True)
    assert {r["beta"] for r in rows} == {"2", "5", "-1"} and {r["seed"] for r in rows} == {"1", "2"}
    for row in rows[4:]:
        assert row["note"] == "ConfigError: invalid config value beta=-1.0: must be > 0"
        assert row["eval/rewards/accuracies"] is None
    header, printed = printed_rows(out)
    assert header[:4] == ["run", "status", "beta", "seed"]  # only swept keys; shared overrides are above
    assert all(m in header for m in compare.TABLE_METRICS)
    assert [r[0] for r in printed] == [r["run"] for r in rows] and printed[-1][-1] == rows[-1]["note"]


def test_sort_order_follows_the_metric(sweep, capsys):
    runs = compare.load_runs(sweep)
    for metric, ascending, lower_first in [
        ("eval/loss", None, True),
        ("eval/rewards/margins", None, False),
        ("eval/rewards/margins", True, True),
    ]:
        values = [r[metric] for r in compare.runs_table(runs, metric, ascending)[:4]]
        assert values == sorted(values, reverse=not lower_first), (metric, ascending)
    assert compare.main([str(sweep), "--metric", "eval/rewards/margins", "--ascending", "--no-plots"]) == 0
    header, printed = printed_rows(capsys.readouterr().out)
    margins = [float(r[header.index("eval/rewards/margins")]) for r in printed[:4]]
    assert margins == sorted(margins)
    with pytest.raises(SystemExit) as exc:
        compare.main([str(sweep), "--metric", "eval/nonsense"])
    assert exc.value.code == 2


def test_command_line_writes_readable_plots(sweep, tmp_path):
    res = run_module(
        "simpo_exp.compare",
        str(sweep),
        "--out",
        str(tmp_path / "plots"),
        cwd=ROOT,
        env={"MPLBACKEND": "Agg"},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "over seeds" in res.stdout and f"plots: {tmp_path / 'plots'}" in res.stdout
    check_pngs(list((tmp_path / "plots").glob("*.png")))


def test_plots_one_line_per_setting_with_its_seeds_band(sweep, tmp_path):
    """Seeds are swept: each setting is drawn once, the mean over its seeds with their spread as a band (four lines,
    two per setting, each seed's own, told the best setting apart no better than the noise between seeds)."""
    runs = compare.load_runs(sweep)
    check_pngs(compare.plot_runs(runs, tmp_path))
    fig = compare.figure(runs, "rewards_margins")
    labels = [" ".join(t.get_text().split()) for t in fig.legends[0].get_texts()]
    assert len(labels) == 2 and all("beta=" in label and "(2 seeds, mean eval" in label for label in labels), labels
    assert labels[0].startswith("1. ") and "mean over seeds" in fig.legends[0].get_title().get_text()
    eval_axes = fig.axes[1]
    assert len(eval_axes.collections) == 2  # one band per setting
    best = compare.seed_groups(runs)[0]
    seeds = [r for r in runs if r.status == "done" and r.value_of("beta") == best["beta"]]
    assert len(seeds) == 2 and labels[0].startswith(f"1. beta={best['beta']}")
    steps, values = seeds[0].series("eval/rewards/margins")
    other = dict(zip(*seeds[1].series("eval/rewards/margins")))
    line = eval_axes.lines[0]  # the best setting's mean curve, drawn first
    assert list(line.get_xdata()) == steps
    assert list(line.get_ydata()) == pytest.approx([(v + other[s]) / 2 for s, v in zip(steps, values)])
    band = eval_axes.collections[0].get_paths()[0].vertices[:, 1]
    low = [min(v, other[s]) for s, v in zip(steps, values)]
    high = [max(v, other[s]) for s, v in zip(steps, values)]
    assert min(band) == pytest.approx(min(low)) and max(band) == pytest.approx(max(high))
    # seeds are swept: the title names the best setting over them, not one seed's lucky run
    groups = compare.seed_groups(runs)
    title = " ".join(fig.get_suptitle().split())  # unwrapped
    assert f"best setting by eval/rewards/accuracies over seeds: beta={groups[0]['beta']}" in title, title
    assert "2 seeds" in title and "best by eval/rewards/accuracies: beta=" not in title
    overlap = max(groups[0]["min"], groups[1]["min"]) <= min(groups[0]["max"], groups[1]["max"])
    assert (f"within the spread of the next: beta={groups[1]['beta']}" in title) == overlap
    assert "not plotted" in fig.get_supxlabel() and "beta=-1" in fig.get_supxlabel()  # failed jobs, no crash


def test_a_settings_curve_is_its_seeds_mean_and_spread_at_the_steps_all_logged():
    from types import SimpleNamespace

    seeds = [
        SimpleNamespace(series=lambda key: ([0, 10, 20], [0.5, 0.75, 0.25])),
        SimpleNamespace(series=lambda key: ([0, 10, 20, 30], [0.25, 1.0, 0.5, 0.5])),  # a step the other lacks
        SimpleNamespace(series=lambda key: ([0, 10, 20], [1.0, 0.5, 0.0])),
    ]
    steps, mean, low, high = compare.seed_curve(seeds, "eval/rewards/margins")
    assert steps == [0, 10, 20] and mean == pytest.approx([1.75 / 3, 0.75, 0.25])
    assert low == [0.25, 0.5, 0.0] and high == [1.0, 1.0, 0.5]


def test_a_run_with_one_train_point_shows_it(sweep, tmp_path):
    """A run shorter than logging_steps logs its train metrics once: drawn as a line without markers, the train
    panel was blank."""
    short = tmp_path / "short"
    shutil.copytree(job(sweep, 0), short)
    rows = [json.loads(line) for line in (short / "metrics.jsonl").read_text().splitlines()]
    first = next(r["step"] for r in rows if "train/rewards/margins" in r)
    kept = [r for r in rows if "train/rewards/margins" not in r or r["step"] == first]
    (short / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    fig = compare.figure(compare.load_runs(short), "rewards_margins")
    train_line = fig.axes[0].lines[0]
    assert len(train_line.get_xdata()) == 1 and train_line.get_marker() == "o"


def test_single_run_and_a_running_job(sweep, tmp_path, capsys):
    done = job(sweep, 0)
    running = tmp_path / "still-running"
    shutil.copytree(done, running)
    (running / "summary.json").unlink()
    hold_folder(running, "")  # its job is alive: it holds its folder
    try:
        assert compare.main([str(running), "--no-plots"]) == 0
    finally:
        release_folders()
    out = capsys.readouterr().out
    assert "1 runs (0 done, 1 running, 0 failed)" in out and "at step 4 of 4" in out

    single = shutil.copytree(done, tmp_path / "single")
    assert compare.main([str(single)]) == 0  # plots default to RUN/compare/
    header, printed = printed_rows(capsys.readouterr().out)
    values = dict(zip(header, printed[0]))
    assert len(printed) == 1 and values["status"] == "done"
    assert values["beta"] == "2" and values["seed"] == "1" and values["max_steps"] == "4"  # all its overrides
    check_pngs(list((single / "compare").glob("*.png")))


def test_a_sweep_still_running_is_not_said_to_have_stopped(sweep, tmp_path, capsys):
    """Compare run while a sweep's first job trained said its other jobs "never started (the sweep stopped first)"
    and told the user to re-run the sweep's command: a second sweep process in the same folder."""
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(sweep / "multirun.yaml", live / "multirun.yaml")  # six jobs asked
    first = shutil.copytree(job(sweep, 0), live / job(sweep, 0).name)
    (first / "summary.json").unlink()
    hold_folder(first, "")  # its job is alive
    try:
        assert compare.main([str(live), "--no-plots"]) == 0
    finally:
        release_folders()
    out = capsys.readouterr().out
    assert "1 of the sweep's 6 jobs have a folder so far; 0 is running" in out  # the job as the table names it
    assert "never started" not in out


def test_a_run_in_a_default_folder_is_told_to_name_its_folder_to_resume(sweep, tmp_path):
    """A run started without hydra.run.dir lives in a folder named after its start time: "re-run its command"
    started a new run in a new folder, from step 0, where training's own message names the folder to add."""
    killed = killed_at_step_2(shutil.copytree(job(sweep, 0), tmp_path / "2026-12-03_07-34-34"))
    hydra_yaml = killed / ".hydra" / "hydra.yaml"
    hydra = yaml.safe_load(hydra_yaml.read_text())
    hydra["hydra"]["mode"], hydra["hydra"]["overrides"]["hydra"] = "RUN", ["hydra.mode=RUN"]
    hydra_yaml.write_text(yaml.safe_dump(hydra))
    said = compare.load_run(killed).error
    assert said.endswith(f"re-run its command with hydra.run.dir={killed.resolve()} to resume from step 2"), said
    hydra["hydra"]["mode"] = "MULTIRUN"  # a sweep's job without hydra.sweep.dir: the sweep's folder is named
    hydra_yaml.write_text(yaml.safe_dump(hydra))
    assert f"re-run its command with hydra.sweep.dir={tmp_path.resolve()} to resume" in compare.load_run(killed).error


def test_a_job_killed_without_a_record_is_told_from_a_running_one(sweep, tmp_path, capsys):
    """A job killed where it could write nothing (out of memory, kill -9) left its folder's lock free: it is
    not "running at step 4" for ever. A lock file of another machine's job is not judged (node-local locks)."""
    killed = shutil.copytree(job(sweep, 0), tmp_path / "killed")
    (killed / "summary.json").unlink()
    shutil.rmtree(killed / "checkpoints", ignore_errors=True)
    assert compare.main([str(killed), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "1 runs (0 done, 0 running, 1 killed, 0 failed)" in out
    assert "ended without a record (killed" in out and "start it again (no checkpoint was saved)" in out

    killed_at_step_2(killed)
    assert compare.load_run(killed).error.endswith("re-run its command to resume from step 2")
    config = killed / ".hydra" / "config.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "resume": False}))
    assert compare.load_run(killed).error.endswith("start it again (it ran with resume=false)")

    (killed / ".in-use").write_text("pid 12 on another-machine, since 2026-12-01 10:00:00")
    assert compare.load_run(killed).status == "running"
    (killed / ".in-use").unlink()  # a folder no job held (runs older than the lock): nothing is said
    assert compare.load_run(killed).status == "running"


def test_a_job_starting_while_compare_probes_its_folder_waits_for_the_probe(tmp_path):
    """compare's probe holds a killed job's lock shared for an instant; the re-run starting in that instant (a
    requeue) waits for it instead of being refused as if another job worked there."""
    import fcntl
    import socket
    import threading

    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / ".in-use").write_text(f"pid 12 on {socket.gethostname()}, since 2026-12-01 10:00:00")
    probe = os.open(folder / ".in-use", os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as ended_unrecorded does, held a little longer
    threading.Timer(0.3, os.close, [probe]).start()
    try:
        hold_folder(folder, "")
        assert compare.load_run(folder).status == "running"  # now held
    finally:
        release_folders()
    assert compare.load_run(folder).status == "killed"


def test_a_running_job_inside_a_sweep_ranks_after_the_done_ones(sweep, tmp_path):
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    (job(copy, 1) / "summary.json").unlink()
    hold_folder(job(copy, 1), "")
    try:
        rows = compare.runs_table(compare.load_runs(copy))
    finally:
        release_folders()
    assert [r["status"] for r in rows] == ["done"] * 3 + ["running"] + ["failed"] * 2
    assert rows[3]["run"] == "1" and rows[3]["note"] == "at step 4 of 4"
    assert rows[3]["eval/rewards/accuracies"] is not None  # its last logged value


def test_last_generations_side_by_side(sweep):
    entries = compare.last_generations(compare.load_runs(sweep), 2)
    assert len(entries) == 2
    for e in entries:
        assert e["chosen"] and len(e["runs"]) == 4 and all("(step 4)" in k for k in e["runs"])


def test_seed_groups(sweep):
    groups = compare.seed_groups(compare.load_runs(sweep))
    assert [g["seeds"] for g in groups] == [2, 2, 0] and [g["beta"] for g in groups][2] == "-1"
    for g in groups[:2]:
        assert g["min"] <= g["eval/rewards/accuracies mean"] <= g["max"] and g["std"] is not None
    # beta=-1's seeds both failed (refused at start): listed, last, with nothing to average
    assert groups[2]["failed"] == 2 and groups[2]["eval/rewards/accuracies mean"] is None
    assert "failed" not in groups[0]


def test_notebook_executes_on_the_sweep(sweep, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SIMPO_RUNS", str(sweep))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    nb = nbformat.read(ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()  # raises CellExecutionError if a cell fails
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    assert any("6 runs" in o.get("text", "") for o in outputs)
    # a W&B group asked for without a key (NETRC: tests/conftest.py, no `wandb login`): it read the local folders
    # in its place and said nothing; now it stops, saying why
    # (its first two cells, plain Python, run here: a second kernel cost 8 s)
    monkeypatch.setenv("WANDB_GROUP", "sweep-real-abcdef")
    setup, load = [cell.source for cell in nb.cells if cell.cell_type == "code"][:2]
    with pytest.raises(RuntimeError, match="WANDB_GROUP=sweep-real-abcdef is set but there is no W&B key"):
        exec(setup + "\n" + load, {})


def test_seed_groups_pool_equal_values_and_group_choices_however_they_were_given():
    """Runs that differ only by seed pool into one setting although one was given ``beta=2`` and another left it
    at its config value 2.0, and one chose ``dataset=synthetic`` on the command line while the others had it as
    the default choice. A run with another value stays apart."""

    def run(name, overrides, beta, acc):
        return compare.Run(
            name=name,
            status="done",
            overrides=overrides,
            config={"beta": beta, "seed": int(overrides["seed"]), "dataset": {"name": "synthetic"}},
            choices={"dataset": "synthetic", "model": "tiny"},
            summary={"eval/rewards/accuracies": acc},
        )

    runs = compare.label_runs(
        [
            run("a", {"seed": "1", "beta": "2"}, 2.0, 0.6),
            run("b", {"seed": "2", "beta": "2"}, 2.0, 0.7),
            run("c", {"seed": "3"}, 2.0, 0.8),
            run("d", {"seed": "4", "dataset": "synthetic"}, 2.0, 0.9),
            run("e", {"seed": "5", "beta": "5.0"}, 5.0, 0.5),
        ]
    )
    assert compare.swept_keys(runs) == ["seed", "beta"]  # dataset is the same choice everywhere
    assert [r.swept["beta"] for r in runs] == ["2", "2", "2", "2", "5"]  # one way of writing, however given
    groups = compare.seed_groups(runs)
    assert [(g["beta"], g["seeds"]) for g in groups] == [("2", 4), ("5", 1)]
    # a config's True beside an override's "false", and numbers given either way, read alike
    shown = [compare._shown_as(v) for v in (True, "false", "1e-6", 1e-06, 0.3, "0.30", None, "cosine")]
    assert shown == ["true", "false", "1e-06", "1e-06", "0.3", "0.3", "-", "cosine"]
    assert compare._same("1e-6", 1e-06) and not compare._same("1e-6", 1e-05)  # YAML 1.1 read "1e-6" as text
    assert [compare._shown_as(v) for v in (12345678901, 12345678902, "nan", "infinity")] == [
        "12345678901", "12345678902", "nan", "infinity"
    ]  # distinct integers stay distinct; a word stays a word  # fmt: skip
    assert groups[0]["eval/rewards/accuracies mean"] == pytest.approx(0.75)


def test_runs_whose_configs_differ_where_no_override_says_so_are_shown_apart_not_pooled_as_seeds():
    """Two runs of ``hparams=my-fast seed=1`` and ``seed=2`` with the preset's beta edited between them (2.0, then
    10.0) showed a seed column alone and were pooled as two seeds of one setting. A value that differs in the
    saved configs is a column now; one a resume may change (eval_steps), or under a swept group, is not."""

    def run(name, seed, beta, acc, eval_steps=0, model="tiny"):
        config = {"beta": beta, "seed": seed, "eval_steps": eval_steps, "model": {"name": model, "layers": len(model)}}
        overrides = {"hparams": "my-fast", "seed": str(seed)} | ({"model": model} if model != "tiny" else {})
        return compare.Run(name, "done", overrides=overrides, config=config, summary={"eval/rewards/accuracies": acc})

    runs = compare.label_runs([run("a", 1, 2.0, 0.82), run("b", 2, 10.0, 0.89), run("c", 3, 2.0, 0.84, eval_steps=5)])
    assert compare.swept_keys(runs) == ["seed", "beta"]
    groups = compare.seed_groups(runs)
    assert [(g["beta"], g["seeds"]) for g in groups] == [("10", 1), ("2", 2)]
    runs = compare.label_runs([run("a", 1, 2.0, 0.8), run("d", 1, 2.0, 0.8, model="tiny-wide")])
    assert compare.swept_keys(runs) == ["model"]  # not model.name and model.layers beside it
    for r, host in zip(runs, ("node-1", "node-2")):  # a W&B run's config: the machine it ran on is no setting
        r.config |= {"env": {"hostname": host}, "resolved": {"learning_rate": 1e-3}}
    assert compare.swept_keys(runs) == ["model"]
    # model=tiny given to every run alike, its preset edited between them (the learning rate 1e-3, then 3e-3): the
    # group given on every command line hid all its values, and the runs pooled as two seeds of one setting
    edited = [run("e", 1, 2.0, 0.94), run("f", 2, 2.0, 0.97)]
    for r, rate in zip(edited, (1e-3, 3e-3)):
        r.overrides["model"] = "tiny"
        r.config["model"]["learning_rate"] = rate
    edited = compare.label_runs(edited)
    assert compare.swept_keys(edited) == ["seed", "model.learning_rate"]
    assert [g["seeds"] for g in compare.seed_groups(edited)] == [1, 1]


def test_the_step_and_sample_counters_the_loop_logs_can_be_ranked_on():
    assert {"train/global_step", "train/samples_seen"} <= set(compare.KNOWN_METRICS)
    # and the numbers summary.json adds (--metric refused them), cheapest first
    assert {"runtime_s", "train/compile_warmup_s"} <= set(compare.KNOWN_METRICS)
    assert compare.lower_is_better("runtime_s") and compare.lower_is_better("train/compile_warmup_s")


def test_generate_and_evaluate_outputs_are_not_taken_for_training_runs(tmp_path):
    """outputs/ holds outputs/generate and outputs/evaluate beside the runs, each with a .hydra/ folder: compare
    listed them as runs "still running" and the evaluate stage as failed runs."""
    from simpo_exp.compare import find_run_dirs
    from simpo_exp.evaluate.runs import find_runs

    for name, section in (("runs/r0", "method"), ("generate/g1", "generate"), ("evaluate/e1", "evaluate")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text(f"{section}: {{}}\nseed: 1\n")
    assert find_run_dirs(tmp_path) == [tmp_path / "runs" / "r0"]
    assert find_runs(tmp_path) == [tmp_path / "runs" / "r0"]
    # a sweep folder of one's own, its jobs 4 deep under outputs/: left out at a search depth of 3
    deep = tmp_path / "multirun" / "exp1" / "2026-01-01_00-00-00" / "0_beta=3"
    (deep / ".hydra").mkdir(parents=True)
    (deep / ".hydra" / "config.yaml").write_text("method: {}\nseed: 1\n")
    assert find_run_dirs(tmp_path) == find_runs(tmp_path) == [deep, tmp_path / "runs" / "r0"]


def test_a_sweep_launched_through_submitit_is_found_by_evaluate_as_by_compare(tmp_path):
    """+launcher=local or slurm leaves .submitit/ beside the jobs: the evaluate stage's sort compared its name with
    a job number (TypeError) and the README's evaluate step crashed on every SLURM sweep."""
    from simpo_exp.compare import find_run_dirs
    from simpo_exp.evaluate.runs import find_runs

    (tmp_path / ".submitit" / "123_0").mkdir(parents=True)
    jobs = [tmp_path / f"{n}_beta={n}" for n in (10, 2)]
    for job in jobs:
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "config.yaml").write_text("method: {}\nseed: 1\n")
    assert find_runs(tmp_path) == find_run_dirs(tmp_path) == jobs[::-1]  # job 2 before job 10


def _run(name, overrides, summary, config=None, status="done"):
    return compare.Run(name=name, status=status, overrides=overrides, config=config or {}, summary=summary)


def test_a_seed_met_twice_for_one_setting_counts_once_and_the_order_follows_ascending():
    """A sweep compared beside its copy pooled each seed twice (4 "seeds", a smaller spread); the seed table
    also ignored --ascending, naming another best setting than the main table."""
    runs = compare.label_runs(
        [
            _run("0", {"seed": "1", "beta": "2"}, {"eval/loss": 0.6}),
            _run("1", {"seed": "2", "beta": "2"}, {"eval/loss": 0.8}),
            _run("copy/0", {"seed": "1", "beta": "2"}, {"eval/loss": 0.7}),
            _run("2", {"seed": "1", "beta": "5"}, {"eval/loss": 0.9}),
        ]
    )
    groups = compare.seed_groups(runs, "eval/loss")
    assert [(g["beta"], g["seeds"], g.get("same seed left out")) for g in groups] == [("2", 2, 1), ("5", 1, None)]
    # the repeated seed's first run counts (0.6), not its copy's (0.7): mean and spread of 0.6 and 0.8
    assert groups[0]["eval/loss mean"] == pytest.approx(0.7) and groups[0]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert [g["beta"] for g in compare.seed_groups(runs, "eval/loss", ascending=False)] == ["5", "2"]


def test_a_legends_mean_over_seeds_is_over_the_seeds_that_have_the_value():
    runs = [_run("0", {"seed": "1"}, {"eval/loss": 1.0}), _run("1", {"seed": "2"}, {"train/loss": 0.5})]
    assert compare._mean_final(runs, "eval/loss") == 1.0 and compare._mean_final(runs, "eval/nosuch") is None


def test_runs_not_done_rank_after_the_done_ones_and_stay_out_of_the_seed_means():
    """A running or stopped job's value is of an unfinished model: a better one must not make it the best run, nor
    enter the mean over seeds (seed 3 here, still at 0.0 early in its training)."""
    runs = compare.label_runs(
        [
            _run("0", {"seed": "1"}, {"eval/rewards/accuracies": 0.6}),
            _run("1", {"seed": "2"}, {"eval/rewards/accuracies": 0.7}),
            _run("2", {"seed": "3"}, {"eval/rewards/accuracies": 0.0}, status="running"),
            _run("3", {"seed": "4"}, {"eval/rewards/accuracies": 0.9}, status="stopped"),
            _run("4", {"seed": "5"}, {"eval/rewards/accuracies": 0.95}, status="running"),
        ]
    )
    assert [r.name for r in compare.rank_runs(runs)] == ["1", "0", "4", "3", "2"]
    (group,) = compare.seed_groups(runs)
    assert group["seeds"] == 2 and group["eval/rewards/accuracies mean"] == pytest.approx(0.65)


def test_cost_metrics_rank_lowest_first_and_a_resolved_learning_rate_is_shown():
    assert compare.lower_is_better("train/step_time_s") and compare.lower_is_better("train/max_rss_gb")
    assert not compare.lower_is_better("eval/rewards/accuracies")
    slow = _run("slow", {"beta": "2"}, {"train/step_time_s": 2.0})
    fast = _run("fast", {"beta": "5"}, {"train/step_time_s": 1.0})
    assert [r.name for r in compare.rank_runs([slow, fast], "train/step_time_s")] == ["fast", "slow"]
    sized = _run("r", {}, {"resolved/learning_rate": 1e-3}, config={"learning_rate": None})
    assert sized.value_of("learning_rate") == 1e-3


def test_the_rejected_side_ranks_lowest_first_and_a_length_bias_by_its_size():
    """Ranked highest first, the run whose rejected reward rose most, or whose reward leaned most on length, was
    named best: the rejected side's rewards and log-probs rank lowest first, reward_corr nearest zero first."""
    for metric in ("eval/rewards/rejected", "eval/logps/rejected", "eval/logps_mean/rejected"):
        low = _run("low", {"beta": "2"}, {metric: -3.0})
        high = _run("high", {"beta": "5"}, {metric: -1.0})
        assert [r.name for r in compare.rank_runs([high, low], metric)] == ["low", "high"], metric
    assert not compare.lower_is_better("eval/logits/rejected") and not compare.lower_is_better("eval/length/rejected")
    corr = "eval/length/reward_corr"
    runs = [_run(n, {"beta": n}, {corr: v}) for n, v in (("plus", 0.6), ("none", 0.05), ("minus", -0.3))]
    assert [r.name for r in compare.rank_runs(runs, corr)] == ["none", "minus", "plus"]
    assert [r.name for r in compare.rank_runs(runs, "eval/rewards/chosen")] == ["plus", "none", "minus"]  # no value


def test_plots_name_no_best_run_for_a_metric_no_run_has(tmp_path):
    history = [{"step": s, "train/loss": 1.0 / s, "eval/loss": 1.0 / s} for s in (1, 2)]
    runs = compare.label_runs([_run(n, {"beta": b}, {"eval/loss": 0.5}) for n, b in (("a", "2"), ("b", "5"))])
    for r in runs:
        r.history = history
    fig = compare.figure(runs, "loss", "eval/log_odds_ratio")
    assert "best by" not in fig._suptitle.get_text()
    assert "best by eval/loss" in compare.figure(runs, "loss", "eval/loss")._suptitle.get_text()


def test_the_command_line_notes_a_metric_no_run_has_and_takes_descending(sweep, capsys):
    assert compare.main([str(sweep), "--no-plots", "--metric", "eval/log_odds_ratio"]) == 0
    assert "note: no run has eval/log_odds_ratio" in capsys.readouterr().out
    assert compare.main([str(sweep), "--no-plots", "--metric", "eval/loss", "--descending"]) == 0
    assert "ranked by eval/loss (descending)" in capsys.readouterr().out


class FakeWandbRun:
    """What compare reads of a run of W&B's public API (``wandb.Api().runs(...)``)."""

    def __init__(self, name, state, summary=None, rows=()):
        self.name, self.state, self.summary, self.config = name, state, summary or {}, {"beta": name[-1]}
        self.rows = rows

    def scan_history(self):
        return iter(self.rows)


def test_wandb_runs_read_the_states_and_history_compare_knows():
    """The notebook's W&B path: W&B's states as compare's statuses (a run left at a stop signal exits with 128 +
    the signal's number, which W&B shows as failed: its summary's ``stopped`` tells it apart); the history on
    the global-step axis (a row without it, W&B's own, dropped); the overrides the job's name carries."""
    rows = [
        {"train/global_step": 3, "train/loss": 0.6, "_step": 0},
        {"_runtime": 2.0},
        {"train/global_step": 6, "eval/rewards/accuracies": 0.75, "_step": 1},
    ]
    done = FakeWandbRun("beta=1", "finished", {"eval/rewards/accuracies": 0.75}, rows)
    stopped = FakeWandbRun("beta=2", "failed", {"stopped": "SIGTERM after step 6, checkpoint saved"})
    failed = FakeWandbRun("beta=3", "failed")
    crashed = FakeWandbRun("beta=4", "crashed")
    live = FakeWandbRun("beta=5", "running")
    halted = FakeWandbRun("beta=7", "killed", {"stopped": "SIGINT after step 3, checkpoint saved"})  # W&B's "killed"
    waiting, preempting, preempted = (FakeWandbRun(f"beta={b}", s) for b, s in ((8, "pending"), (9, "preempting"),
                                                                              (10, "preempted")))  # fmt: skip
    unknown = FakeWandbRun("beta=11", "a-state-added-later")
    listed = [done, stopped, failed, crashed, live, halted, waiting, preempting, preempted, unknown]
    runs = {r.name: r for r in compare.wandb_runs(listed)}
    assert {name: r.status for name, r in runs.items()} == {
        "beta=1": "done",
        "beta=2": "stopped",
        "beta=3": "failed",
        "beta=4": "killed",
        "beta=5": "running",
        "beta=7": "stopped",
        "beta=8": "running",
        "beta=9": "running",
        "beta=10": "killed",  # resumable: it wrote no error
        "beta=11": "failed",
    }
    assert runs["beta=10"].error.startswith("preempted by its scheduler; re-run its command")
    assert [r["step"] for r in runs["beta=1"].history] == [3, 6] and "_step" not in runs["beta=1"].history[0]
    assert runs["beta=1"].series("train/loss") == ([3], [0.6])
    assert runs["beta=1"].final("eval/rewards/accuracies") == 0.75 and runs["beta=1"].label == "beta=1"
    assert runs["beta=2"].error == "stopped by SIGTERM after step 6, checkpoint saved; re-run its command to resume"
    assert "crashed" in runs["beta=4"].error and runs["beta=1"].error is None
    assert runs["beta=3"].error == "failed (its run directory's error.json says why)"  # it recorded no error
    table = compare.format_table(compare.runs_table(list(runs.values())))
    assert table.index("beta=1") < table.index("beta=2") < table.index("beta=4")
    # a resumed offline run synced: the steps past its checkpoint come twice (the later rows win), and its
    # evaluate numbers sit in the summary: curves went back on themselves and the table had no bench columns
    again = [
        {"train/global_step": s, "train/loss": v} for s, v in [(10, 0.5), (20, 0.4), (30, 0.3), (20, 0.35), (30, 0.25)]
    ]
    (resumed,) = compare.wandb_runs([FakeWandbRun("beta=6", "finished", {"bench/rule/win_rate": 61.0}, again)])
    assert resumed.series("train/loss") == ([10, 20, 30], [0.5, 0.35, 0.25])
    # train and eval metrics logged in two calls at one step are one row: neither replaces the other's points (a
    # key the other call did not log may come back as None)
    split = [
        {"train/global_step": 10, "train/loss": 0.7, "eval/loss": None},
        {"train/global_step": 10, "eval/loss": 0.8, "train/loss": None},
    ]
    (both,) = compare.wandb_runs([FakeWandbRun("beta=8", "finished", {}, split)])
    assert both.series("train/loss") == ([10], [0.7]) and both.series("eval/loss") == ([10], [0.8])
    assert resumed.bench == {"bench/rule/win_rate": 61.0} and "bench/rule/win_rate" in compare.runs_table([resumed])[0]
    # a list-valued override (a data mixture) stays one value: split at every comma, the two mixtures below were
    # both dataset='[ufb' and pooled as two seeds of one setting
    mixes = [
        FakeWandbRun(f"dataset=[ufb,{other}],seed={i}", "finished", {"eval/rewards/accuracies": 0.5})
        for i, other in enumerate(("argilla", "math"))
    ]
    read = compare.wandb_runs(mixes)
    assert [r.overrides for r in read] == [
        {"dataset": "[ufb,argilla]", "seed": "0"},
        {"dataset": "[ufb,math]", "seed": "1"},
    ]
    assert compare.name_parts("a='x,y',b={c: 1, d: 2},e=(1,2)") == ["a='x,y'", "b={c: 1, d: 2}", "e=(1,2)"]
    # Hydra's \' inside a quoted value (a path with an apostrophe and a comma) does not end the quotes
    assert compare.name_parts("a='it\\'s,b=1',c=2") == ["a='it\\'s,b=1'", "c=2"]


def test_a_diverged_seed_read_from_wandb_makes_its_settings_mean_nan():
    """A seed stopped by non-finite steps makes its setting's mean NaN in the run folders; read from W&B, where
    every failed run had one message, the setting was ranked by its surviving seeds (first, at 0.65 beside 0.63)."""
    final = lambda v: {"eval/rewards/accuracies": v}  # noqa: E731
    listed = [
        FakeWandbRun("beta=2,seed=1", "finished", final(0.65)),
        FakeWandbRun("beta=2,seed=2", "failed", {"error": "NonFiniteError: 3 steps in a row had a non-finite loss"}),
        FakeWandbRun("beta=5,seed=1", "finished", final(0.62)),
        FakeWandbRun("beta=5,seed=2", "finished", final(0.64)),
    ]
    runs = compare.wandb_runs(listed)
    assert runs[1].error == "NonFiniteError: 3 steps in a row had a non-finite loss"
    rows = compare.seed_groups(runs, "eval/rewards/accuracies")
    assert [r["beta"] for r in rows] == ["5", "2"] and math.isnan(rows[1]["eval/rewards/accuracies mean"])
    listed[1] = FakeWandbRun("beta=2,seed=2", "failed", {"error": "OutOfMemoryError: CUDA out of memory"})
    rows = compare.seed_groups(compare.wandb_runs(listed), "eval/rewards/accuracies")
    assert (
        rows[0]["beta"] == "2" and rows[0]["failed"] == 1
    )  # another failure: the survivors' mean, the failure counted


def _job(folder: Path, overrides: list[str], ran: dict | None = None) -> None:
    """A finished job's folder as compare reads it: its overrides, a summary, its resolved config (finished.json)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "summary.json").write_text('{"eval/rewards/accuracies": 0.5}')
    (folder / "finished.json").write_text(json.dumps({"config": ran or {}}))


def test_runs_are_named_apart_whatever_their_folders(tmp_path):
    """Two sweeps in folders of one name (outputs/a/beta, outputs/b/beta) crashed compare; two sweeps run into one
    folder gave two runs of each job number the same name."""
    for sweep in ("a/beta", "b/beta"):
        _job(tmp_path / sweep / "0_beta=2", ["beta=2"])
    assert sorted(r.name for r in compare.load_runs([tmp_path / "a" / "beta", tmp_path / "b" / "beta"])) == [
        "a/beta/0",
        "b/beta/0",
    ]
    both = tmp_path / "twice"
    for job, beta in (("0_beta=2", 2), ("1_beta=4", 4), ("0_beta=4", 4), ("1_beta=6", 6)):
        _job(both / job, [f"beta={beta}"])
    assert sorted(r.name for r in compare.load_runs(both)) == ["0_beta=2", "0_beta=4", "1_beta=4", "1_beta=6"]


def test_an_interpolated_override_shows_the_value_the_run_resolved(tmp_path):
    """``beta=${oc.env:BETA}`` run with BETA=2 and BETA=6: the same text, two values, which compare must tell."""
    for beta in (2.0, 6.0):
        _job(tmp_path / f"b{beta:g}", ["beta=${oc.env:BETA}"], {"beta": beta})
    runs = compare.load_runs(tmp_path)
    assert {r.name: r.swept for r in runs} == {"b2": {"beta": "2"}, "b6": {"beta": "6"}}
    for marker in ("[]", '{"config": [1]}'):  # a finished.json of another shape: the override's text, not a crash
        (tmp_path / "b2" / "finished.json").write_text(marker)
        assert {r.name: r.swept for r in compare.load_runs(tmp_path)}["b2"] == {"beta": "${oc.env:BETA}"}


def test_a_job_that_wrote_elsewhere_is_read_there_and_one_refused_says_why(tmp_path):
    """``--multirun beta=2,4 output_dir=X``: the first job wrote its records to X, the second was refused there
    (refused.json in its own folder); compare listed both as running."""
    elsewhere = tmp_path / "X"
    elsewhere.mkdir()
    (elsewhere / "summary.json").write_text('{"eval/rewards/accuracies": 0.75}')
    for job, beta in (("0_beta=2", 2), ("1_beta=4", 4)):
        (tmp_path / "sweep" / job / ".hydra").mkdir(parents=True)
        (tmp_path / "sweep" / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"beta={beta}"]))
        (tmp_path / "sweep" / job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(elsewhere)}))
    refusal = {"error": f"{elsewhere} holds a finished run of a different config", "type": "OtherRunsDirectory"}
    (tmp_path / "sweep" / "1_beta=4" / "refused.json").write_text(json.dumps(refusal))
    runs = {r.name: r for r in compare.load_runs(tmp_path / "sweep")}
    assert (runs["0"].status, runs["0"].final("eval/rewards/accuracies")) == ("done", 0.75)
    assert runs["1"].status == "failed" and runs["1"].error.startswith("OtherRunsDirectory: ")


def test_a_sweep_whose_every_run_failed_is_said_so_not_blamed_on_the_metric(tmp_path, capsys):
    for job, beta in (("0_beta=-1", -1), ("1_beta=-2", -2)):
        (tmp_path / "sweep" / job / ".hydra").mkdir(parents=True)
        (tmp_path / "sweep" / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"beta={beta}"]))
        error = {"error": f"invalid config value beta={beta}: must be > 0", "type": "ConfigError"}
        (tmp_path / "sweep" / job / "refused.json").write_text(json.dumps(error))
    assert compare.main([str(tmp_path / "sweep"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "(every run failed before it had one: the table says why)" in out and "another method" not in out


def test_benchmark_numbers_measured_differently_are_said_not_to_compare(tmp_path, capsys):
    """Two runs evaluated on AlpacaEval by different judges against different baselines were ranked in one
    column without a word."""
    for job, judge, baseline in (("0_beta=2", "judge-a", "gpt4_turbo"), ("1_beta=4", "judge-b", "other")):
        _job(tmp_path / "sweep" / job, [f"beta={job[-1]}"])
        results = tmp_path / "sweep" / job / "eval" / "alpacaeval2" / "results.json"
        results.parent.mkdir(parents=True)
        record = {"metrics": {"win_rate": 25.0}, "baseline": baseline, "prompts_path": "/data/alpaca.json"}
        record["judge"] = {"kind": "openai", "base_url": f"http://127.0.0.1:{len(judge)}/v1", "model": judge}
        results.write_text(json.dumps(record))
    runs = compare.load_runs(tmp_path / "sweep")
    differ = compare.mixed_bench_settings(runs)
    assert list(differ) == ["alpacaeval2"] and len(differ["alpacaeval2"]) == 2, differ  # judge, baseline
    assert compare.main([str(tmp_path / "sweep"), "--metric", "bench/alpacaeval2/win_rate", "--no-plots"]) == 0
    assert "note: bench/alpacaeval2/* was measured with different settings (judge:" in capsys.readouterr().out
    same = compare.load_runs(tmp_path / "sweep" / "0_beta=2")
    assert compare.mixed_bench_settings(same) == {}


def test_a_run_that_wrote_elsewhere_has_its_benchmark_settings_and_samples_read_there(tmp_path):
    """``output_dir=X``: compare read the numbers from X but the benchmark settings and generations from the Hydra
    folder, so runs judged differently were ranked without the note and their samples were "not there"; the
    dashboard left their benchmarks out."""
    from simpo_exp.dashboard import read_sweep

    for job, judge in (("0_beta=2", "judge-a"), ("1_beta=4", "judge-b")):
        records = tmp_path / "elsewhere" / job
        (tmp_path / "sweep" / job / ".hydra").mkdir(parents=True)
        (tmp_path / "sweep" / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"beta={job[-1]}"]))
        (tmp_path / "sweep" / job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(records)}))
        (records / "eval" / "alpacaeval2").mkdir(parents=True)
        (records / "summary.json").write_text('{"eval/rewards/accuracies": 0.5}')
        record = {"metrics": {"win_rate": 25.0}, "judge": {"kind": "openai", "model": judge}}
        (records / "eval" / "alpacaeval2" / "results.json").write_text(json.dumps(record))
        sample = {"step": 4, "prompt": "p", "chosen": "c", "rejected": "r", "generation": f"from {job}"}
        (records / "generations.jsonl").write_text(json.dumps(sample) + "\n")
    runs = compare.label_runs(compare.load_runs(tmp_path / "sweep"))
    assert list(compare.mixed_bench_settings(runs)) == ["alpacaeval2"]
    (shown,) = compare.last_generations(runs, 1)
    assert sorted(shown["runs"].values()) == ["from 0_beta=2", "from 1_beta=4"]
    assert read_sweep(tmp_path / "sweep").bench == ["bench/alpacaeval2/win_rate"]


def test_decoding_the_answers_do_not_depend_on_is_not_a_difference_and_lm_evals_settings_are(tmp_path):
    """A job re-judged with evaluate.judge_only=true (its results record the stored answers' decoding, without
    batch_size) or re-run with a smaller batch after running out of memory was said "not to compare" with its
    sweep; two lm-eval runs, 5-shot on the whole task and a 0-shot limit=20 smoke test, were ranked side by side
    without a word (their settings are under "lm_eval", which was not compared)."""
    decoding = {"backend": "hf", "max_new_tokens": 4096, "temperature": 0.0, "top_p": 1.0}
    gsm8k = {"tasks": ["gsm8k"], "num_fewshot": 5, "limit": None, "apply_chat_template": True, "dtype": "bfloat16"}
    records = (
        {"decoding": {**decoding, "batch_size": 16, "vllm_gpu_memory_utilization": 0.9}, "lm_eval": gsm8k},
        {"decoding": decoding, "lm_eval": {**gsm8k, "batch_size": 4, "device": "cpu"}},
        {"decoding": {**decoding, "batch_size": 4}, "lm_eval": {**gsm8k, "num_fewshot": 0, "limit": 20}},
    )
    for i, record in enumerate(records):
        job = tmp_path / "sweep" / f"{i}_beta={i + 2}"
        _job(job, [f"beta={i + 2}"])
        for bench, key in (("alpacaeval2", "decoding"), ("gsm8k", "lm_eval")):
            results = job / "eval" / bench / "results.json"
            results.parent.mkdir(parents=True)
            results.write_text(json.dumps({"metrics": {"win_rate": 25.0 + i}, key: record[key]}))
    runs = compare.load_runs(tmp_path / "sweep")
    assert compare.mixed_bench_settings(runs[:2]) == {}  # batch size, vLLM memory and lm-eval's device: alike
    differ = compare.mixed_bench_settings(runs)
    assert list(differ) == ["gsm8k"] and differ["gsm8k"][0].startswith("lm_eval: "), differ
    assert '"limit": 20' in differ["gsm8k"][0] and '"num_fewshot": 0' in differ["gsm8k"][0]


def test_lm_evals_perplexities_rank_lowest_first_and_are_not_offered_to_rank_by():
    """lambada lists its perplexity before its accuracy: the printed "rank them" command named the perplexity and
    compare ranked the highest perplexity first."""
    from simpo_exp.evaluate.run import _rank_metric

    metrics = {"lambada_openai/perplexity:none": 9.9, "lambada_openai/acc:none": 0.4, "lambada_openai/n": 50.0}
    assert _rank_metric([{"benchmark": "lambada", "metrics": metrics}]) == "bench/lambada/lambada_openai/acc:none"
    only = {"wikitext/word_perplexity:none": 30.0}  # nothing else to rank by: that one, lowest first
    assert _rank_metric([{"benchmark": "wikitext", "metrics": only}]) == "bench/wikitext/wikitext/word_perplexity:none"
    for name in ("perplexity:none", "word_perplexity:none", "bits_per_byte:none", "ter:none"):
        assert compare.lower_is_better(f"bench/b/task/{name}"), name


def test_a_task_with_a_length_normalised_accuracy_is_ranked_by_it():
    """lm-eval lists ARC's and HellaSwag's acc before their acc_norm, which the leaderboards and the SimPO paper
    report: the printed "rank them" command named acc."""
    from simpo_exp.evaluate.run import _rank_metric

    arc = {"arc_challenge/acc:none": 0.5, "arc_challenge/acc_stderr:none": 0.01, "arc_challenge/acc_norm:none": 0.55}
    assert _rank_metric([{"benchmark": "lb", "metrics": arc}]) == "bench/lb/arc_challenge/acc_norm:none"
    mmlu = {"mmlu/acc:none": 0.6, "mmlu_stem/acc_norm:none": 0.5}  # another task's acc_norm is not mmlu's
    assert _rank_metric([{"benchmark": "lb", "metrics": mmlu}]) == "bench/lb/mmlu/acc:none"
    assert not compare.lower_is_better("bench/b/task/acc:none")
    assert not compare.lower_is_better("bench/b/task/exact_match:strict-match")


def test_a_benchmark_metric_no_run_has_is_explained(tmp_path):
    """The note said to evaluate the runs first, also where they were evaluated and LC was not measured (the
    results' notes say why), or the metric name was mistyped."""
    _job(tmp_path / "run", ["beta=2"])
    runs = compare.load_runs(tmp_path / "run")
    said = compare.missing_bench_metric(runs, "bench/alpacaeval2/lc_win_rate", "R")
    first = "evaluate them first: python -m simpo_exp.evaluate R benchmark=alpacaeval2"
    assert said == f"no run has bench/alpacaeval2/lc_win_rate; {first}"
    results = tmp_path / "run" / "eval" / "alpacaeval2" / "results.json"
    results.parent.mkdir(parents=True)
    record = {"metrics": {"win_rate": 25.0, "lc_win_rate": None}, "notes": ["LC needs the alpaca-eval package."]}
    results.write_text(json.dumps(record))
    runs = compare.load_runs(tmp_path / "run")
    said = compare.missing_bench_metric(runs, "bench/alpacaeval2/lc_win_rate", "R")
    assert said == "bench/alpacaeval2/lc_win_rate was not measured for any run: LC needs the alpaca-eval package."
    said = compare.missing_bench_metric(runs, "bench/alpacaeval2/winrate", "R")
    assert said == "alpacaeval2 reports no 'winrate'; it reports lc_win_rate, win_rate"


def test_a_mistyped_benchmark_metric_is_refused_and_failure_counts_rank_lowest_first(tmp_path, capsys):
    """--rank-by bench/rules/win_rate printed a table "ranked by" it in load order and exited 0, its note pointing at
    an evaluate command that fails (no benchmark 'rules'); and unparseable_verdicts ranked the worst run best."""
    _job(tmp_path / "run", ["beta=2"])
    path = str(tmp_path / "run")
    assert compare.main([path, "--rank-by", "bench/rules/win_rate", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'rules'; the evaluate stage's are alpacaeval2, arena-hard, gsm8k, rule" in err
    assert compare.main([path, "--rank-by", "bench/rule/win_rate", "--no-plots"]) == 0  # not evaluated yet: a note
    assert "evaluate them first: python -m simpo_exp.evaluate" in capsys.readouterr().out
    results = tmp_path / "run" / "eval" / "mine" / "results.json"  # a benchmark of the user's own config dir
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"metrics": {"win_rate": 25.0}}))
    assert compare.main([path, "--rank-by", "bench/mine/win_rate", "--no-plots"]) == 0
    assert compare.main([path, "--rank-by", "bench/mine/win_rte", "--no-plots"]) == 2
    assert "mine reports no 'win_rte'; it reports win_rate" in capsys.readouterr().err
    for name in ("unparseable_verdicts", "unparseable_games", "cut_at_max_new_tokens", "exact_match_stderr:strict"):
        assert compare.lower_is_better(f"bench/b/{name}"), name
    assert not compare.lower_is_better("bench/gsm8k/exact_match:strict-match")


def test_a_diverged_runs_final_value_is_its_nan_or_inf_and_ranks_last():
    """summary.json keeps a non-finite final value as NaN/Infinity; metrics.jsonl writes NaN as null and an infinity
    as 1e308. The NaN was passed over for an earlier eval's finite value, shown as the run's final one, and the
    1e308 taken as a number: a diverged run ranked first by its reward margin and squashed every curve of the plot."""
    acc, margin = "eval/rewards/accuracies", "eval/rewards/margins"
    history = [{"step": 10, acc: 0.91, margin: 2.0}, {"step": 20, acc: None, margin: 1e308}]
    diverged = _run("diverged", {"beta": "2"}, {acc: float("nan"), margin: float("inf")})
    diverged.history = history
    running = _run("running", {"beta": "3"}, {}, status="running")
    running.history = history
    fine = _run("fine", {"beta": "5"}, {acc: 0.8, margin: 1.5})
    assert math.isnan(diverged.final(acc)) and diverged.final(margin) == math.inf
    assert math.isnan(running.final(acc)) and running.final(margin) == math.inf  # its last logged values
    assert running.series(margin) == ([10], [2.0])  # the plot leaves the non-finite out
    for metric in (acc, margin):
        assert [r.name for r in compare.rank_runs([diverged, fine], metric)] == ["fine", "diverged"]
    seeds = compare.label_runs(
        [
            _run(str(i), {"seed": str(i), "beta": b}, {margin: v})
            for i, (b, v) in enumerate([("2", 1.0), ("2", float("inf")), ("5", 0.5)])
        ]
    )
    assert [g["beta"] for g in compare.seed_groups(seeds, margin)] == ["5", "2"]  # a diverged seed: its mean is inf


def test_a_setting_with_a_nan_seed_shows_nan_in_the_table_and_the_plots_legend():
    """A seed whose final value is NaN: the table's min and max depended on where it sat (0.9 to 0.9 with the NaN
    hidden, or nan to nan), and the plot's legend averaged the finite seeds alone, a finer "mean" than the setting
    has, beside a title that ranks it last."""
    acc = "eval/rewards/accuracies"
    runs = []
    for i, (seed, beta, value) in enumerate([(1, 2, 0.9), (2, 2, math.nan), (1, 5, math.nan), (2, 5, 0.8)]):
        run = _run(str(i), {"seed": str(seed), "beta": str(beta)}, {acc: value})
        run.history = [{"step": 1, acc: 0.5}, {"step": 2, acc: None if math.isnan(value) else value}]
        runs.append(run)
    groups = compare.seed_groups(compare.label_runs(runs), acc)
    assert all(math.isnan(g["min"]) and math.isnan(g["max"]) for g in groups), groups
    fig = compare.figure(runs, "rewards_accuracies")
    labels = [" ".join(t.get_text().split()) for t in fig.legends[0].get_texts()]
    assert all("mean eval nan" in label for label in labels), labels


def test_jobs_a_killed_sweep_never_started_are_counted_from_its_multirun_yaml(sweep, tmp_path, capsys):
    """A sweep killed itself (out of memory, kill -9) leaves no folder for the jobs it had not started: compare
    listed what was there, and a 6-job grid read as a complete sweep of 4."""
    import shutil

    assert compare.jobs_asked(sweep) == 6  # beta=2,5,-1 x seed=1,2
    assert compare.main([str(sweep), "--no-plots"]) == 0
    assert "never started" not in capsys.readouterr().out
    assert compare.main([str(job(sweep, 0)), str(job(sweep, 2)), "--no-plots"]) == 0  # some of its jobs, asked for
    assert "never started" not in capsys.readouterr().out
    cut = tmp_path / "cut"
    shutil.copytree(sweep, cut, ignore=shutil.ignore_patterns("compare"))
    for num in (4, 5):
        shutil.rmtree(job(cut, num))
    assert compare.main([str(cut), "--no-plots"]) == 0
    assert f"{cut}: 4 of the sweep's 6 jobs have a folder; the others never started" in capsys.readouterr().out
    (cut / "multirun.yaml").write_text("hydra: {sweeper: {_target_: some.OtherSweeper}}\n")
    assert compare.jobs_asked(cut) is None  # a sweeper that does not say: nothing said
    # glob() (every preset of a group) and interval() are expanded by Hydra's config loader alone: compare printed
    # the table, then a traceback (ConfigLoader is not set), and exited 1
    import yaml

    for swept in ("loss=glob([simpo,cpo])", "beta=interval(1, 10)"):
        sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}
        multirun = {"hydra": {"sweeper": sweeper, "overrides": {"task": [swept, "seed=1,2"]}}}
        (cut / "multirun.yaml").write_text(yaml.safe_dump(multirun))
        assert rundir.sweep_request(cut)[1] is not None  # read by Hydra's grammar
        assert compare.jobs_asked(cut) is None, swept
    assert compare.main([str(cut), "--no-plots"]) == 0
    # a value given twice runs in one folder (its second job is skipped as finished): beta=2,5,2 is 2 folders, and
    # compare said the complete sweep "stopped first"; Optuna's choice() trials repeat settings likewise
    sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}
    (cut / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"sweeper": sweeper, "overrides": {"task": ["beta=2,5,2", "seed=1,2"]}}})
    )
    assert compare.jobs_asked(cut) == 4
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "n_trials": 8}
    for params, asked in (({"beta": "choice(2,5)"}, None), ({"beta": "interval(1, 10)", "seed": "range(1, 3)"}, None)):
        (cut / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {**optuna, "params": params}}}))
        assert compare.jobs_asked(cut) is asked, params
    (cut / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"sweeper": {**optuna, "params": {"beta": "interval(1, 10)"}}}})
    )
    assert compare.jobs_asked(cut) == 8


def test_runs_of_different_methods_ranked_by_their_own_rewards_get_a_note(tmp_path, capsys):
    """rewards/accuracies orders a pair by each method's own reward (SimPO's mean log-prob, the DPO family's
    log-ratio to the reference): a simpo,dpo sweep was ranked on it with nothing said (on one batch, 0.625 beside
    0.375)."""
    for num, method in enumerate(("simpo", "dpo")):
        job_dir = tmp_path / "sweep" / f"{num}_loss={method}"
        _job(job_dir, [f"loss={method}"])
        (job_dir / ".hydra" / "config.yaml").write_text(f"method: {method}\nseed: 1\n")
    runs = compare.load_runs(tmp_path / "sweep")
    note = compare.mixed_methods_note(runs, "eval/rewards/accuracies")
    assert "dpo: log-ratio to the reference; simpo: mean log-prob" in note
    assert "--metric eval/logps_mean/accuracies" in note and "eval/logps_mean/accuracies" in compare.KNOWN_METRICS
    assert compare.mixed_methods_note(runs, "eval/logps_mean/chosen") is None  # the same for every method
    # logps/* is the log-prob each loss takes: DPO's summed over the tokens beside SimPO's per-token mean
    note = compare.mixed_methods_note(runs, "eval/logps/chosen")
    assert "(dpo: summed; simpo: per-token mean)" in note and "--metric eval/logps_mean/chosen (" in note
    assert compare.mixed_methods_note(runs, "train/logps/rejected").endswith(
        "--metric train/logps_mean/rejected (the per-token mean for every method) is"
    )
    (tmp_path / "sweep" / "1_loss=dpo" / ".hydra" / "config.yaml").write_text("method: orpo\nseed: 1\n")
    assert compare.mixed_methods_note(compare.load_runs(tmp_path / "sweep"), "eval/logps/chosen") is None  # both means
    assert compare.mixed_methods_note(runs[:1], "eval/rewards/accuracies") is None
    assert compare.main([str(tmp_path / "sweep"), "--no-plots"]) == 0
    assert "note: these runs train different methods" in capsys.readouterr().out


def test_rule_win_rates_against_different_starting_models_or_prompt_counts_are_said_not_to_compare(tmp_path, capsys):
    """The rule benchmark's win rate is against each run's own starting model: a run trained on generated pairs
    from another run's model was ranked beside one from the random init, and one evaluated on 8 prompts beside
    one on 64, without a word."""
    starts = (("0_beta=2", {"sha256": "aa"}, 64), ("1_beta=4", {"random_init": {}, "seed": 1}, 64))
    for job, start, n in (*starts, ("2_beta=6", {"sha256": "aa"}, 8)):
        _job(tmp_path / "sweep" / job, [f"beta={job[-1]}"])
        results = tmp_path / "sweep" / job / "eval" / "rule" / "results.json"
        results.parent.mkdir(parents=True)
        record = {"metrics": {"win_rate": 50.0 + n, "n": n}, "baseline": "the starting model", "start_weights": start}
        results.write_text(json.dumps(record))
    runs = compare.load_runs(tmp_path / "sweep")
    differ = compare.mixed_bench_settings(runs)["rule"]
    assert [d.split(":")[0] for d in differ] == ["start_weights", "prompts"], differ
    assert compare.main([str(tmp_path / "sweep"), "--metric", "bench/rule/win_rate", "--no-plots"]) == 0
    assert "bench/rule/score is measured against no starting model" in capsys.readouterr().out
    # a seed sweep from a random init: each run's own seed draws its starting model, and the seeds pool (an
    # evaluated seed sweep was told its numbers "do not compare", beside the table that pooled them)
    for job, seed in (("0_seed=1", 1), ("1_seed=2", 2)):
        _job(tmp_path / "seeds" / job, [f"seed={seed}"])
        results = tmp_path / "seeds" / job / "eval" / "rule" / "results.json"
        results.parent.mkdir(parents=True)
        start = {"random_init": {"hidden_size": 64}, "seed": seed}
        results.write_text(json.dumps({"metrics": {"win_rate": 50.0, "n": 8}, "start_weights": start}))
    assert compare.mixed_bench_settings(compare.load_runs(tmp_path / "seeds")) == {}
    older = tmp_path / "sweep" / "0_beta=2" / "eval" / "rule" / "results.json"  # a record from before start_weights
    older.write_text(json.dumps({"metrics": {"win_rate": 1.0, "n": 64}, "baseline": "the starting model"}))
    assert compare.mixed_bench_settings(compare.load_runs(tmp_path / "sweep" / "0_beta=2")) == {}


def test_the_length_controlled_win_rate_ranks_first_where_it_was_measured():
    """The printed "rank them" command and the dashboard's sort took AlpacaEval's raw win rate, which favours long
    answers, over its length-controlled one (the benchmark's headline, and the paper's)."""
    from simpo_exp.evaluate.run import _rank_metric
    from simpo_exp.inference.results import headline_keys

    keys = ["bench/alpacaeval2/win_rate", "bench/arena-hard/win_rate", "bench/alpacaeval2/lc_win_rate"]
    keys += ["bench/alpacaeval2/avg_length", "bench/alpacaeval2/win_rate"]
    expected = ["bench/alpacaeval2/lc_win_rate", "bench/alpacaeval2/win_rate", "bench/arena-hard/win_rate"]
    assert headline_keys(keys) == expected
    record = {"benchmark": "alpacaeval2", "metrics": {"win_rate": 30.1, "lc_win_rate": 22.4, "n": 805}}
    assert _rank_metric([record]) == "bench/alpacaeval2/lc_win_rate"
    record["metrics"]["lc_win_rate"] = None  # not measured (no alpaca-eval package): the raw one
    assert _rank_metric([record]) == "bench/alpacaeval2/win_rate"
    other = {"benchmark": "alpacaeval2", "metrics": {"win_rate": 31.0, "lc_win_rate": 23.0, "n": 805}}
    assert _rank_metric([record, other]) == "bench/alpacaeval2/lc_win_rate"  # another run measured it: the first
    answers = {"benchmark": "alpacaeval2", "metrics": {"avg_length": 1234.0, "n": 805, "cut_at_max_new_tokens": 0}}
    assert _rank_metric([answers]) is None  # answers alone (judge.kind=none): never ranked by their length
    arena = {"benchmark": "arena-hard", "metrics": {"avg_tokens": 512.0, "n": 500, "win_rate": 40.9}}
    assert _rank_metric([answers, arena]) == "bench/arena-hard/win_rate"


def test_each_evaluation_number_is_shown_with_its_standard_error_or_interval(tmp_path):
    """Whether two runs' win rates differ by more than noise: compare's table puts AlpacaEval's standard errors,
    Arena-Hard's bootstrap interval and lm-eval's stderr right after the number they belong to, where a run has one."""
    from simpo_exp.inference.files import write_json

    alpaca = {"lc_win_rate": 22.4, "lc_standard_error": 0.8, "win_rate": 30.1, "standard_error": 1.6, "n": 805}
    arena = {"win_rate": 40.0, "win_rate_ci_low": 37.5, "win_rate_ci_high": 42.0, "battles": 900}
    lm = {"gsm8k/exact_match:strict-match": 0.25, "gsm8k/exact_match_stderr:strict-match": 0.1, "gsm8k/n": 4.0}
    for i, beta in enumerate((2, 5)):
        run = tmp_path / f"{i}_beta={beta}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- beta={beta}\n")
        write_json(run / "summary.json", {"eval/rewards/accuracies": 0.5})
        for bench, metrics in (("alpacaeval2", alpaca), ("arena-hard", arena), ("gsm8k", lm)):
            write_json(run / "eval" / bench / "results.json", {"metrics": {**metrics, "n": 8}})
    runs = compare.load_runs(tmp_path)
    columns = [c for c in compare.runs_table(runs)[0] if c.startswith("bench/")]
    assert columns == [
        "bench/alpacaeval2/lc_win_rate",
        "bench/alpacaeval2/lc_standard_error",
        "bench/alpacaeval2/win_rate",
        "bench/alpacaeval2/standard_error",
        "bench/arena-hard/win_rate",
        "bench/arena-hard/win_rate_ci_low",
        "bench/arena-hard/win_rate_ci_high",
    ]
    metric = "bench/gsm8k/gsm8k/exact_match:strict-match"
    row = compare.runs_table(runs, metric)[0]
    assert [c for c in row if c.startswith("bench/gsm8k")] == [
        metric,
        "bench/gsm8k/gsm8k/exact_match_stderr:strict-match",
    ]
    assert row["bench/gsm8k/gsm8k/exact_match_stderr:strict-match"] == 0.1
    assert row["bench/arena-hard/win_rate_ci_high"] == 42.0 and row["bench/alpacaeval2/standard_error"] == 1.6
    # a run without them (an older record) shows only its number
    write_json(tmp_path / "0_beta=2" / "eval" / "arena-hard" / "results.json", {"metrics": {"win_rate": 41.0}})
    rows = {r["beta"]: r for r in compare.runs_table(compare.load_runs(tmp_path))}
    assert (
        rows["2"]["bench/arena-hard/win_rate_ci_low"] is None and rows["5"]["bench/arena-hard/win_rate_ci_low"] == 37.5
    )


def test_read_results_keeps_finite_numbers_only_and_skips_what_does_not_read(tmp_path):
    from simpo_exp.inference.files import write_json
    from simpo_exp.inference.results import read_results, set_aside

    write_json(tmp_path / "eval" / "a" / "results.json",
               {"metrics": {"win_rate": 40, "n": 8, "lc_win_rate": None, "ok": True, "x": float("nan"),
                            "y": float("inf"), "s": "12"}})  # fmt: skip
    write_json(tmp_path / "eval" / "b" / "results.json", {"benchmark": "b"})  # no metrics recorded
    (tmp_path / "eval" / "c").mkdir()
    (tmp_path / "eval" / "c" / "results.json").write_text('{"metrics": {"win')  # changed by hand
    (tmp_path / "eval" / "d" / "results.json").mkdir(parents=True)  # not a file
    write_json(tmp_path / "eval" / "e" / "results.json", [1, 2])  # edited into a list
    assert read_results(tmp_path) == {"bench/a/win_rate": 40.0, "bench/a/n": 8.0}
    set_aside(tmp_path, "a")
    assert read_results(tmp_path) == {}
    assert json.loads((tmp_path / "eval" / "a" / "results.previous.json").read_text())["metrics"]["n"] == 8


def test_uncertainty_keys_and_is_uncertainty_pair_up():
    from simpo_exp.inference.results import is_uncertainty, uncertainty_keys

    b = "bench/alpacaeval2/"
    assert uncertainty_keys(b + "lc_win_rate") == [b + "lc_standard_error"]
    assert uncertainty_keys(b + "win_rate") == [b + "standard_error", b + "win_rate_ci_low", b + "win_rate_ci_high"]
    assert uncertainty_keys("win_rate") == ["standard_error", "win_rate_ci_low", "win_rate_ci_high"]
    lm = "bench/gsm8k/gsm8k/exact_match:strict-match"
    assert uncertainty_keys(lm) == ["bench/gsm8k/gsm8k/exact_match_stderr:strict-match"]
    assert uncertainty_keys("bench/gsm8k/gsm8k/exact_match_stderr:strict-match") == []
    assert uncertainty_keys("bench/rule/avg_tokens") == [] and uncertainty_keys("bench/gsm8k/gsm8k/n") == []
    for metric in ("win_rate", "lc_win_rate", lm):
        assert not is_uncertainty(metric) and all(is_uncertainty(k) for k in uncertainty_keys(metric))
    assert not is_uncertainty("bench/x/stderr_count") and not is_uncertainty("bench/x/n")


def test_headline_keys_keep_the_benchmarks_in_first_seen_order():
    from simpo_exp.inference.results import headline_keys

    keys = ["bench/zeta/win_rate", "bench/alpha/win_rate", "bench/alpha/lc_win_rate", "bench/zeta/win_rate"]
    assert headline_keys(keys) == ["bench/zeta/win_rate", "bench/alpha/lc_win_rate", "bench/alpha/win_rate"]


def test_runs_of_one_config_on_different_numbers_of_processes_show_their_batch_apart():
    """One config run on 1 process and on 2 trains on 16 and 32 pairs a step; nothing in their configs or overrides
    says so, and the two were pooled as seeds of one setting. The batch each resolved is a column where it differs."""

    def run(name, seed, pairs, acc):
        summary = {"eval/rewards/accuracies": acc, "resolved/effective_batch_size": pairs}
        config = {"seed": seed, "per_device_train_batch_size": 16}
        return compare.Run(name, "done", overrides={"seed": str(seed)}, config=config, summary=summary)

    runs = compare.label_runs([run("one", 1, 16, 0.8), run("two", 2, 32, 0.7), run("one-b", 3, 16, 0.9)])
    assert compare.swept_keys(runs) == ["seed", "effective_batch_size"]
    assert [r.label for r in runs] == [f"seed={s}, effective_batch_size={p}" for s, p in ((1, 16), (2, 32), (3, 16))]
    groups = compare.seed_groups(runs)
    assert [(g["effective_batch_size"], g["seeds"]) for g in groups] == [("16", 2), ("32", 1)]
    same = compare.label_runs([run("one", 1, 16, 0.8), run("one-b", 3, 16.0, 0.9)])
    assert compare.swept_keys(same) == ["seed"]  # not where it is one value (as 16 and 16.0)


def test_a_nested_sweep_is_found_from_its_jobs_two_folders_down(sweep, tmp_path, capsys):
    """``hydra.sweep.subdir=b${beta}/s${seed}`` puts each job two folders below the sweep: a killed job was told to
    re-run with ``hydra.sweep.dir=<sweep>/b2.0`` (a new sweep there, trained from step 0), and a job that never
    started was not noticed (the parent folder holds no multirun.yaml)."""
    nested = tmp_path / "nested"
    nested.mkdir()
    shutil.copy(sweep / "multirun.yaml", nested / "multirun.yaml")
    jobs = compare.find_run_dirs(sweep, depth=1)
    for i, d in enumerate(jobs[:5]):  # the sixth never started
        moved = shutil.copytree(d, nested / f"g{i}" / d.name, ignore=shutil.ignore_patterns("compare"))
        hydra_yaml = moved / ".hydra" / "hydra.yaml"
        hydra = yaml.safe_load(hydra_yaml.read_text())
        hydra["hydra"]["sweep"]["subdir"] = subdir = "g${hydra.job.num}/${hydra.job.override_dirname}"
        hydra["hydra"]["overrides"]["hydra"] = ["hydra.mode=MULTIRUN", f"hydra.sweep.subdir={subdir}"]  # dated folder
        hydra_yaml.write_text(yaml.safe_dump(hydra))
    killed = killed_at_step_2(nested / "g0" / jobs[0].name)
    assert f"with hydra.sweep.dir={nested.resolve()} to resume from step 2" in compare.load_run(killed).error
    assert compare.main([str(nested), "--no-plots"]) == 0
    assert f"{nested}: 5 of the sweep's 6 jobs have a folder; the others never started" in capsys.readouterr().out


def test_a_plots_folder_that_cannot_be_made_and_a_gpu_only_metric_are_named(sweep, tmp_path, capsys):
    """``--out`` naming a file ended in a traceback after the table; ``--metric train/mfu`` on CPU runs was called
    "a metric of another method, or of runs not yet evaluated"."""
    taken = tmp_path / "plots.png"
    taken.write_text("")
    assert compare.main([str(sweep), "--out", str(taken)]) == 2
    assert f"error: cannot write the plots in {taken} (FileExistsError" in capsys.readouterr().err
    assert compare.main([str(sweep), "--no-plots", "--metric", "train/mfu"]) == 0
    assert "no run has train/mfu (logged only where it can be known: MFU with a known GPU's peak" in (
        capsys.readouterr().out
    )


def test_runs_that_skipped_steps_are_noted():
    """A run whose loss went non-finite on 4 of its 6 steps was listed "done" beside the others, without a word."""
    runs = compare.label_runs(
        [
            _run("0", {"learning_rate": "1e30"}, {"train/skipped_steps": 4, "train/global_step": 6}),
            _run("1", {"learning_rate": "1e-3"}, {"train/skipped_steps": 0, "train/global_step": 6}),
        ]
    )
    said = compare.skipped_steps_note(runs)
    assert said.startswith("1 run(s) skipped steps whose loss or gradient was not finite") and said.endswith("(4 of 6)")
    assert compare.skipped_steps_note(runs[1:]) is None


def test_a_run_without_a_summary_shows_the_values_its_start_resolved(tmp_path):
    """A killed or running run of a preset that leaves ``learning_rate`` to the model's size showed it as ``-``:
    only summary.json, written at the end, recorded the value; env.json, written at the start, does now."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("learning_rate: null\nbeta: 2.0\n")
    (run / "env.json").write_text(json.dumps({"resolved": {"learning_rate": 5e-4, "effective_batch_size": 16}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 0.7}) + "\n")
    loaded = compare.load_run(run)
    assert loaded.status != "done" and loaded.value_of("learning_rate") == 5e-4
    assert loaded.value_of("effective_batch_size") == 16


def test_a_sampled_answers_batch_size_is_not_held_against_a_record_made_before_it_was_kept(tmp_path):
    """Sampled hf answers record their batch size now: a run evaluated before (no batch_size) beside one evaluated
    after, both at batch 16, were said to have been measured with different settings."""
    decoding = {"backend": "hf", "temperature": 0.5, "max_new_tokens": 64}
    for job, dec in (("0_beta=2", decoding), ("1_beta=4", decoding | {"batch_size": 16})):
        _job(tmp_path / "sweep" / job, [f"beta={job[-1]}"])
        results = tmp_path / "sweep" / job / "eval" / "alpacaeval2" / "results.json"
        results.parent.mkdir(parents=True)
        results.write_text(json.dumps({"metrics": {"win_rate": 50.0, "n": 8}, "decoding": dec}))
    assert compare.mixed_bench_settings(compare.load_runs(tmp_path / "sweep")) == {}


def test_a_killed_run_moved_from_where_it_ran_is_told_to_name_its_new_folder(sweep, tmp_path):
    """A killed run copied or moved elsewhere was told to "re-run its command", whose hydra.run.dir names the folder
    it ran in: the command resumed (or started) there, not here."""
    moved = killed_at_step_2(shutil.copytree(job(sweep, 0), tmp_path / "moved"))
    hydra_yaml = moved / ".hydra" / "hydra.yaml"
    hydra = yaml.safe_load(hydra_yaml.read_text())
    hydra["hydra"]["mode"], hydra["hydra"]["overrides"]["hydra"] = "RUN", [f"hydra.run.dir={job(sweep, 0)}"]
    hydra["hydra"]["runtime"]["output_dir"] = str(job(sweep, 0))
    hydra_yaml.write_text(yaml.safe_dump(hydra))
    said = compare.load_run(moved).error
    assert said.endswith(f"re-run its command with hydra.run.dir={moved.resolve()} to resume from step 2"), said
    hydra["hydra"]["runtime"]["output_dir"] = str(moved)  # where it ran: its command names it already
    hydra_yaml.write_text(yaml.safe_dump(hydra))
    assert compare.load_run(moved).error.endswith("; re-run its command to resume from step 2")


def test_settings_tied_over_their_seeds_are_titled_tied_not_one_best():
    """Two settings of equal means over their seeds (and equal spreads): the plot's title named one of them the
    "best setting", within the spread of the next, where runs without seeds say "tied with"."""
    acc = "eval/rewards/accuracies"
    runs = []
    for i, (seed, beta, value) in enumerate([(1, 2, 0.9), (2, 2, 0.8), (1, 5, 0.8), (2, 5, 0.9)]):
        run = _run(str(i), {"seed": str(seed), "beta": str(beta)}, {acc: value})
        run.history = [{"step": 1, acc: 0.5}, {"step": 2, acc: value}]
        runs.append(run)
    title = " ".join(compare.figure(compare.label_runs(runs), "rewards_accuracies").get_suptitle().split())
    assert "tied with 1 other setting (beta=" in title and "within the spread" not in title, title
    runs[3].summary = {acc: 0.95}  # beta=5 now ahead: a best setting, within the spread of the other
    runs[3].history[-1][acc] = 0.95
    title = " ".join(compare.figure(compare.label_runs(runs), "rewards_accuracies").get_suptitle().split())
    assert "over seeds: beta=5" in title and "tied with" not in title and "within the spread of the next" in title


def _seeded(rows, metric="eval/rewards/accuracies"):
    """Runs of (seed, beta, final value or an error type for a failed run), labelled as a sweep's."""
    runs = []
    for i, (seed, beta, value) in enumerate(rows):
        if isinstance(value, str):
            run = _run(str(i), {"seed": str(seed), "beta": str(beta)}, {}, status="failed")
            run.error = f"{value}: it stopped"
        else:
            run = _run(str(i), {"seed": str(seed), "beta": str(beta)}, {metric: value})
            run.history = [{"step": 1, metric: value}]
        runs.append(run)
    return compare.label_runs(runs)


def test_a_setting_whose_seeds_diverged_is_not_ranked_on_its_survivors():
    """Seeds stopped by their non-finite steps (NonFiniteError) failed and left the pool: beta=10 with 2 of 3 seeds
    diverged ranked best on its one survivor (0.95) above beta=2's steady 0.9, with no word of the failures. A
    diverged seed is the setting's, as a NaN seed is; any failed seed is counted."""
    acc = "eval/rewards/accuracies"
    runs = _seeded([(1, 2, 0.88), (2, 2, 0.90), (3, 2, 0.92), (1, 10, "NonFiniteError"), (2, 10, "NonFiniteError"),
                    (3, 10, 0.95), (1, 5, 0.85), (2, 5, 0.87), (3, 5, "OutOfMemoryError")])  # fmt: skip
    groups = compare.seed_groups(runs, acc)
    assert [(g["beta"], g["seeds"], g.get("failed")) for g in groups] == [("2", 3, None), ("5", 2, 1), ("10", 1, 2)]
    assert math.isnan(groups[2][f"{acc} mean"]) and math.isnan(groups[2]["min"])
    assert groups[1][f"{acc} mean"] == pytest.approx(0.86)  # a crash is counted, not taken for divergence


def test_a_near_zero_metric_is_pooled_over_seeds_by_its_size():
    """eval/length/reward_corr is a length bias whichever way it leans: seeds of +0.6 and -0.6 averaged to 0 and
    ranked that setting best over one whose seeds lean 0.1, while the runs' own table ranked them by size."""
    metric = "eval/length/reward_corr"
    runs = _seeded([(1, 2, 0.6), (2, 2, -0.6), (1, 5, 0.1), (2, 5, -0.1)], metric)
    groups = compare.seed_groups(runs, metric)
    assert [g["beta"] for g in groups] == ["5", "2"]
    assert groups[0][f"|{metric}| mean"] == pytest.approx(0.1) and groups[1][f"|{metric}| mean"] == pytest.approx(0.6)
    assert f"{metric} mean" not in groups[0]  # the column says what it averages


@pytest.mark.parametrize(
    "rows, caveat",
    [
        # means equal but for their summation's rounding (0.20000000000000004 and 0.19999999999999998)
        ([(1, 2, 0.1), (2, 2, 0.2), (3, 2, 0.3), (1, 5, 0.3), (2, 5, 0.2), (3, 5, 0.1)], "tied with 1 other setting"),
        # one seed has no spread: its lead over a setting of three seeds (0.7 to 0.9) tells nothing
        ([(1, 5, 0.91), (1, 2, 0.7), (2, 2, 0.8), (3, 2, 0.9)], "one seed, no spread to tell it from the next"),
        ([(1, 5, 0.95), (2, 5, 0.96), (1, 2, 0.7), (2, 2, 0.8)], ""),  # apart: a clear best
    ],
)
def test_the_seed_table_and_the_title_say_when_the_first_setting_is_no_clear_best(rows, caveat, capsys, tmp_path):
    acc = "eval/rewards/accuracies"
    runs = _seeded(rows)
    title = " ".join(compare.figure(runs, "rewards_accuracies").get_suptitle().split())
    groups = [g for g in compare.seed_groups(runs, acc)]
    assert compare.best_setting_caveat(groups, acc).startswith(caveat) and (caveat in title)
    if not caveat:
        assert compare.best_setting_caveat(groups, acc) == "" and "tied" not in title and "spread" not in title


def test_the_printed_seed_table_says_when_its_first_setting_is_no_clear_best(monkeypatch, capsys, tmp_path):
    """Only the plot's title said a best setting was within the spread of the next; the printed tables ranked on."""
    runs = _seeded([(1, 5, 0.91), (2, 5, 0.82), (1, 2, 0.85), (2, 2, 0.86)])  # beta=5 first, its range over beta=2's
    monkeypatch.setattr(compare, "load_runs", lambda paths: runs)
    assert compare.main([str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "note: the first setting, beta=5, is no clear best: within the spread of the next: beta=2" in out
