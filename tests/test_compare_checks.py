"""compare's choices that no test pinned (from a mutation review of compare.py): the direction and order of the
ranking at its edges, the order flags reaching the seed tables, the exit code and notes of the command, the
benchmark settings that make numbers comparable, how runs are read from their folders, and the plot titles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from simpo_exp import compare
from simpo_exp.rundir import _this_machine
from tests.test_compare import _run

ACC = "eval/rewards/accuracies"


def _job(folder: Path, overrides: list[str], summary: dict | None = None, results: dict | None = None) -> Path:
    """A job's folder as compare reads it: its overrides, its summary (finished) where given, and each benchmark's
    results.json."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    for bench, record in (results or {}).items():
        (folder / "eval" / bench).mkdir(parents=True)
        (folder / "eval" / bench / "results.json").write_text(json.dumps(record))
    return folder


def test_the_ranking_at_its_edges():
    """Any *_loss is lower-is-better (the SFT term's too); a diverged or missing value ranks after every number
    whichever the direction (as 0.0 it was the best loss); a killed job after a running one."""
    assert compare.lower_is_better("eval/sft_loss") and compare.lower_is_better("train/sft_loss")
    runs = [_run("a", {}, {"eval/sft_loss": 0.9}), _run("b", {}, {"eval/sft_loss": 0.3})]
    assert [r.name for r in compare.rank_runs(runs, "eval/sft_loss")] == ["b", "a"]
    runs = [_run("diverged", {}, {"eval/loss": float("nan")}), _run("none", {}, {}), _run("fine", {}, {"eval/loss": 5})]
    assert [r.name for r in compare.rank_runs(runs, "eval/loss")][0] == "fine"
    assert [r.name for r in compare.rank_runs(runs, "eval/loss", ascending=False)][0] == "fine"
    runs = [_run("killed", {}, {ACC: 0.9}, status="killed"), _run("running", {}, {ACC: 0.1}, status="running")]
    assert [r.name for r in compare.rank_runs(runs)] == ["running", "killed"]


def _seed_sweep(root: Path) -> Path:
    """beta=2 seeds (0.6, 0.7) win rates (40, 50); beta=5 seeds (0.8, 0.9) win rates (30, 20)."""
    values = {("2", "1"): (0.6, 40.0), ("2", "2"): (0.7, 50.0), ("5", "1"): (0.8, 30.0), ("5", "2"): (0.9, 20.0)}
    for i, ((beta, seed), (acc, rate)) in enumerate(values.items()):
        rule = {"metrics": {"win_rate": rate, "n": 8}}
        _job(root / f"{i}_beta={beta},seed={seed}", [f"beta={beta}", f"seed={seed}"], {ACC: acc}, {"rule": rule})
    return root


def _first_setting(out: str, metric: str) -> str:
    section = out.split(f"over seeds (runs that differ only by seed), by {metric}:\n", 1)[1]
    return section.splitlines()[2].split()[0]  # below the header and its rule


def test_the_order_flags_reach_the_seed_table_of_the_ranked_metric_alone(tmp_path, capsys):
    sweep = _seed_sweep(tmp_path / "sweep")
    assert compare.main([str(sweep), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert _first_setting(out, ACC) == "5" and _first_setting(out, "bench/rule/win_rate") == "2"
    assert compare.main([str(sweep), "--no-plots", "--ascending"]) == 0
    out = capsys.readouterr().out  # the main table and its seed table name one best setting
    assert _first_setting(out, ACC) == "2" and _first_setting(out, "bench/rule/win_rate") == "2"
    assert compare.main([str(sweep), "--no-plots", "--metric", "eval/loss", "--descending"]) == 0
    assert _first_setting(capsys.readouterr().out, "bench/rule/win_rate") == "2"  # a win rate stays highest first


def test_no_runs_found_is_an_error_exit(tmp_path, capsys):
    assert compare.main([str(tmp_path), "--no-plots"]) == 2
    assert "no run directories under" in capsys.readouterr().err


def test_benchmark_numbers_of_one_judge_on_another_host_are_comparable(tmp_path):
    for i, url in enumerate(("http://a:8000/v1", "http://b:9000/v1")):
        judge = {"model": "gpt-4-1106-preview", "base_url": url}
        _job(tmp_path / f"{i}_beta={i}", [f"beta={i}"], {ACC: 0.5}, {"alpacaeval2": {"judge": judge, "metrics": {}}})
    assert compare.mixed_bench_settings(compare.load_runs(tmp_path)) == {}


def test_a_benchmark_metric_measured_by_no_run_or_some_is_no_typo(tmp_path, capsys):
    """An lm-eval name with slashes that no run measured (null) is the 'not measured' note, not a typo refusal; a
    metric some runs hold is not said to be held by none."""
    lm = {"lambada": {"metrics": {"lambada_openai/acc:none": None}, "notes": ["no GPU"]}}
    _job(tmp_path / "0_beta=1", ["beta=1"], {ACC: 0.5}, lm)
    assert compare.main([str(tmp_path), "--no-plots", "--metric", "bench/lambada/lambada_openai/acc:none"]) == 0
    assert "bench/lambada/lambada_openai/acc:none was not measured for any run: no GPU" in capsys.readouterr().out
    some = tmp_path / "some"
    _job(some / "0_beta=1", ["beta=1"], {ACC: 0.5}, {"rule": {"metrics": {"win_rate": 60.0, "n": 8}}})
    _job(some / "1_beta=2", ["beta=2"], {ACC: 0.5})
    assert compare.main([str(some), "--no-plots", "--metric", "bench/rule/win_rate"]) == 0
    out = capsys.readouterr().out
    assert "evaluate them first" not in out and "not measured" not in out and "no run has" not in out, out


def test_runs_read_from_their_folders(tmp_path):
    """A refused.json beside a run's own records (a later job refused there) leaves the run done; a killed run is
    told to resume from its last checkpoint; a job that failed before Hydra wrote its overrides keeps those its
    error.json names; a run reached through two paths is one run."""
    done = _job(tmp_path / "done", ["beta=1"], {ACC: 0.5})
    (done / "refused.json").write_text(json.dumps({"type": "ConfigError", "error": "in use"}))
    run = compare.load_run(done)
    assert run.status == "done" and run.final(ACC) == 0.5

    killed = _job(tmp_path / "killed", ["beta=2"])
    (killed / ".in-use").write_text(f"pid 1{_this_machine()}2026-12-05 10:00:00")
    for step in (2, 4):
        (killed / "checkpoints" / f"step-00000{step}").mkdir(parents=True)
        (killed / "checkpoints" / f"step-00000{step}" / "COMPLETE").write_text("{}")
    run = compare.load_run(killed)
    assert run.status == "killed" and run.error.endswith("to resume from step 4")

    failed = tmp_path / "failed"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "error.json").write_text(json.dumps({"type": "ConfigError", "error": "beta", "overrides": ["beta=-1"]}))
    assert compare.load_run(failed).overrides == {"beta": "-1"}

    sweep = tmp_path / "sweep"
    for i in (2, 5):
        _job(sweep / f"{i}_beta={i}", [f"beta={i}"], {ACC: 0.5})
    assert len(compare.load_runs([sweep, sweep / "2_beta=2"])) == len(compare.load_runs(sweep)) == 2


def test_last_generations_are_the_first_prompts_at_the_last_step(tmp_path):
    run = _job(tmp_path / "r", ["beta=1"], {ACC: 0.5})
    rows = [
        {"step": step, "prompt": p, "chosen": "c", "rejected": "r", "generation": f"{p}@{step}"}
        for step in (2, 4)
        for p in ("p1", "p2", "p3")
    ]
    (run / "generations.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (entry,) = compare.last_generations(compare.load_runs(tmp_path), 1)
    assert entry["prompt"] == "p1" and list(entry["runs"].values()) == ["p1@4"]


def _title(runs: list) -> str:
    for run in runs:
        run.history = [{"step": 1, ACC: 0.5}, {"step": 2, ACC: run.summary.get(ACC, 0.5)}]
    return " ".join(compare.figure(compare.label_runs(runs), "rewards_accuracies").get_suptitle().split())


def _seeded(values: dict[str, tuple[float, float]]) -> list:
    return [
        _run(f"{beta}-{seed}", {"seed": str(seed), "beta": beta}, {ACC: v})
        for beta, pair in values.items()
        for seed, v in enumerate(pair, 1)
    ]


def test_a_plots_title_says_within_the_spread_only_of_the_next_setting_it_overlaps():
    pytest.importorskip("matplotlib")
    apart = _title(_seeded({"2": (0.8, 0.9), "5": (0.5, 0.6)}))
    assert "over seeds: beta=2" in apart and "within the spread" not in apart, apart
    three = _title(_seeded({"2": (0.85, 0.95), "5": (0.8, 0.9), "10": (0.1, 0.2)}))
    assert three.endswith("within the spread of the next: beta=5"), three
    below = _title(_seeded({"2": (0.8, 0.9), "5": (0.5, 0.85)}))  # the next's range reaches into the best's
    assert "within the spread of the next: beta=5" in below, below
    losses = [
        _run(f"{beta}-{seed}", {"seed": str(seed), "beta": beta}, {"eval/loss": v})
        for beta, pair in {"2": (0.1, 0.2), "5": (0.5, 0.6)}.items()
        for seed, v in enumerate(pair, 1)
    ]
    for run in losses:
        run.history = [{"step": 1, "eval/loss": 1.0}, {"step": 2, "eval/loss": run.summary["eval/loss"]}]
    title = " ".join(compare.figure(compare.label_runs(losses), "loss", "eval/loss").get_suptitle().split())
    assert "over seeds: beta=2" in title and "within the spread" not in title, title  # lower is better: apart


def test_a_plots_title_names_no_best_run_while_none_is_done():
    pytest.importorskip("matplotlib")
    title = _title(
        [_run("a", {"beta": "2"}, {ACC: 0.9}, status="running"), _run("b", {"beta": "5"}, {ACC: 0.5}, status="running")]
    )
    assert "best by" not in title, title
    title = _title([_run("a", {"beta": "2"}, {ACC: 0.9}), _run("b", {"beta": "5"}, {ACC: 0.5})])
    assert "best by eval/rewards/accuracies: beta=2" in title, title


def test_a_sweep_with_every_job_folder_made_gets_no_so_far_note_while_its_last_job_runs(tmp_path):
    """All the jobs asked have a folder and the last one still trains: nothing is missing, nothing to say. Asked for
    a third, the sweep is still at work on its later jobs."""
    from simpo_exp.rundir import hold_folder, release_folders

    sweep = tmp_path / "sw"
    sweep.mkdir()
    basic = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}

    def ask(values: str) -> None:
        request = {"hydra": {"sweeper": basic, "overrides": {"task": [f"beta={values}"]}}}
        (sweep / "multirun.yaml").write_text(yaml.safe_dump(request))

    _job(sweep / "0_beta=2", ["beta=2"], {ACC: 0.5})
    live = _job(sweep / "1_beta=5", ["beta=5"])
    hold_folder(live, "")
    try:
        ask("2,5")
        assert compare.unstarted_jobs(compare.load_runs(sweep)) == []
        ask("2,5,7")
        assert compare.unstarted_jobs(compare.load_runs(sweep)) == [
            f"{sweep}: 2 of the sweep's 3 jobs have a folder so far; 1 is running"
        ]
    finally:
        release_folders()


def test_a_diverged_setting_ranks_last_in_the_seed_table_of_a_lower_is_better_metric():
    """A NaN mean (a diverged seed) sorts last whichever the direction: ranked as a number, a loss's NaN row came
    first, the diverged setting named the best."""
    import math

    runs = [
        _run(str(i), {"beta": b, "seed": s}, {"eval/loss": v})
        for i, (b, s, v) in enumerate([("2", "1", 0.5), ("2", "2", 0.7), ("5", "1", 0.4), ("5", "2", math.nan)])
    ]
    groups = compare.seed_groups(compare.label_runs(runs), "eval/loss")
    assert [g["beta"] for g in groups] == ["2", "5"] and math.isnan(groups[-1]["eval/loss mean"])


def test_a_running_epoch_based_run_is_at_its_step_of_no_stated_total():
    """max_steps=-1 (train for num_train_epochs) names no total: "at step 3", never "of -1"."""
    epochs = compare.Run("a", "running", config={"max_steps": -1}, history=[{"step": 3}])
    capped = compare.Run("b", "running", overrides={"max_steps": "10"}, history=[{"step": 3}])
    notes = {row["run"]: row["note"] for row in compare.runs_table([epochs, capped])}
    assert notes == {"a": "at step 3", "b": "at step 3 of 10"}
