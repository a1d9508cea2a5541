"""The compare command and the notebook, on real run directories (one sweep with a failed job)."""

import json
import shutil
from pathlib import Path

import pytest

from simpo_exp import compare
from tests.test_run import simpo

ROOT = Path(__file__).resolve().parents[1]
FAST = ["max_steps=4", "eval_steps=2", "logging_steps=2", "logger=none", "save_model=false", "num_generations=2",
        "max_new_tokens=8", "dataset.synthetic.num_train=128", "dataset.synthetic.num_test=32"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """beta=2,5,10 plus an invalid job (beta=-1), and a copy of one job made to look still running."""
    root = tmp_path_factory.mktemp("cmp")
    sweep = root / "sweep"
    res = simpo("--multirun", "beta=2,5,10,-1", f"hydra.sweep.dir={sweep}", *FAST, cwd=root)
    assert res.returncode == 1, res.stderr[-3000:]  # the invalid job is reported at the end
    return sweep


def test_table_ranks_done_jobs_and_marks_the_failed_one(sweep, capsys):
    assert compare.main([str(sweep), "--no-plots"]) == 0
    out = capsys.readouterr().out
    runs = compare.load_runs(sweep)
    rows = compare.runs_table(runs)
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    accs = [r["eval/rewards/accuracies"] for r in rows[:3]]
    assert accs == sorted(accs, reverse=True)
    assert {r["beta"] for r in rows} == {"2", "5", "10", "-1"}
    assert "ConfigError" in rows[-1]["note"] and "beta=-1.0" in rows[-1]["note"]
    assert "3 done, 0 running, 1 failed" in out and "failed" in out


def test_plots_one_line_per_job(sweep, tmp_path):
    runs = compare.load_runs(sweep)
    written = compare.plot_runs(runs, tmp_path)
    assert sorted(p.name for p in written) == ["logps.png", "loss.png", "rewards_accuracies.png",
                                               "rewards_margins.png"]
    assert all(p.stat().st_size > 20_000 for p in written)
    fig = compare.figure(runs, "rewards_margins")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 3 and all("beta=" in label for label in labels)


def test_single_run_and_a_running_job(sweep, tmp_path, capsys):
    done = next(p for p in sorted(sweep.iterdir()) if (p / "summary.json").exists())
    running = tmp_path / "still-running"
    shutil.copytree(done, running)
    (running / "summary.json").unlink()
    assert compare.main([str(running), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "running" in out and "at step 4 of 4" in out
    assert compare.main([str(done), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "rewards_accuracies.png").exists()


def test_last_generations_side_by_side(sweep):
    entries = compare.last_generations(compare.load_runs(sweep), 2)
    assert len(entries) == 2
    for e in entries:
        assert e["chosen"] and len(e["runs"]) == 3 and all("(step 4)" in k for k in e["runs"])


def test_seed_groups(tmp_path):
    sweep = tmp_path / "seeds"
    res = simpo("--multirun", "seed=1,2", "beta=2,5", f"hydra.sweep.dir={sweep}", *FAST, "num_generations=0",
                cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    groups = compare.seed_groups(compare.load_runs(sweep))
    assert [g["seeds"] for g in groups] == [2, 2] and {g["beta"] for g in groups} == {"2", "5"}
    for g in groups:
        assert g["min"] <= g["eval/rewards/accuracies mean"] <= g["max"] and g["std"] is not None


def test_notebook_executes_on_the_sweep(sweep):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    import os

    os.environ["SIMPO_RUNS"] = str(sweep)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.pop("SIMPO_RUNS")
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    assert any("4 runs" in o.get("text", "") for o in outputs)
