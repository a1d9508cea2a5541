"""The W&B workspace built by ``python -m simpo_exp.dashboard``, checked against a real local sweep.

One three-job sweep (beta=2,5,10, a few seconds a job) is run once for the module. The spec the
command writes must name the sweep's W&B group, group by the swept key, plot every metric the jobs
logged, and ask for nothing they did not log: a renamed metric can never leave an empty panel.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("wandb_workspaces")

from simpo_exp import dashboard  # noqa: E402
from simpo_exp.inference.files import read_jsonl  # noqa: E402
from simpo_exp.methods import METHODS  # noqa: E402
from simpo_exp.runinfo import sweep_group  # noqa: E402
from simpo_exp.tracking import CONDITIONAL_METRICS, STEP_KEY, eval_keys, train_keys  # noqa: E402
from tests.runs import run_module  # noqa: E402

FAST = [
    "max_steps=3",
    "eval_steps=0",
    "eval_on_start=false",  # the final eval logs every eval key (samples go to no metrics file)
    "num_generations=0",
    "logging_steps=1",
    "logger=none",
    "save_model=false",
    "dataset.synthetic.num_train=128",
    "dataset.synthetic.num_test=32",
]
SUMMARY_AGGREGATES = (".max", ".min", ".last", ".mean", ".best")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dash")
    sweep_dir = root / "2030-01-01_00-00-00"
    res = run_module("simpo_exp", "--multirun", "beta=2,5,10", *FAST, f"hydra.sweep.dir={sweep_dir}", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep_dir


@pytest.fixture(scope="module")
def spec(sweep) -> dict:
    res = run_module("simpo_exp.dashboard", str(sweep), cwd=sweep.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    out = sweep / "wandb_workspace.json"
    assert f"view spec: {out}" in res.stdout
    # No key: nothing was sent, and the command says how to send it.
    assert "WANDB_API_KEY=... python -m simpo_exp.dashboard" in res.stdout
    assert "did not log to W&B (logger.wandb=false" in res.stderr  # logger=none jobs: an empty view, said so
    bad = run_module("simpo_exp.dashboard", str(sweep), "--swept", "beta,nosuch", cwd=sweep.parent)
    assert bad.returncode == 2 and "--swept nosuch: in no job's config" in bad.stderr
    return json.loads(out.read_text())


def jobs(sweep: Path) -> list[Path]:
    found = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(found) == 3
    return found


def logged_keys(sweep: Path) -> set[str]:
    """Every key the jobs logged. metrics.jsonl calls the step "step"; W&B gets it as tracking.STEP_KEY."""
    keys = set()
    for job in jobs(sweep):
        for record in read_jsonl(job / "metrics.jsonl"):
            assert isinstance(record.pop("step"), int)
            keys |= set(record)
    return keys | {STEP_KEY}


def test_spec_filters_to_the_sweeps_group_and_groups_by_the_swept_key(sweep, spec):
    asked = dashboard.spec_keys(spec)
    assert asked["groups"] == {sweep_group(str(sweep))}  # as runinfo.fill_run_identity names it
    assert asked["grouping"] == {"config:beta.value"}  # beta differs between jobs; max_steps etc. do not
    columns = spec["spec"]["section"]["runSets"][0]["runFeed"]["columnOrder"]
    assert columns[:2] == ["run:displayName", "config:beta.value"]
    assert f"summary:{dashboard.TARGET_SUMMARY}" in columns
    panels = [p for s in spec["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]]
    pc = [p for p in panels if p["viewType"] == "Parallel Coordinates Plot"]
    assert len(pc) == 1
    accessors = [c["accessor"] for c in pc[0]["config"]["columns"]]
    assert accessors == ["config:beta.value", f"summary:{dashboard.TARGET_SUMMARY}"]
    assert dashboard.TARGET_SUMMARY.startswith(dashboard.TARGET)
    lines = [p for p in panels if p["viewType"] == "Run History Line Plot"]
    assert lines and all(p["config"]["xAxis"] == STEP_KEY for p in lines)
    # the table best first by the held-out accuracy (W&B's own order: newest first)
    sort = spec["spec"]["section"]["runSets"][0]["sort"]["keys"]
    assert sort == [{"key": {"section": "summary", "name": dashboard.TARGET_SUMMARY}, "ascending": False}]


def test_every_job_of_a_large_sweep_is_drawn():
    """W&B draws the first 10 runs of a set in each panel by default: a sweep of 12 jobs lost 2 from every plot."""
    spec = dashboard.view_spec(dashboard.build_workspace(dashboard.Sweep(group="g", jobs=[Path("j")] * 12), "e", "p"))
    assert '"maxRuns": 12' in json.dumps(spec)
    # a W&B group given by name: no folder to count its jobs in, and a 27-job group was drawn 10 a panel
    spec = dashboard.view_spec(dashboard.build_workspace(dashboard.Sweep(group="sweep-big-abcdef", jobs=[]), "e", "p"))
    assert f'"maxRuns": {dashboard.MAX_RUNS_UNCOUNTED}' in json.dumps(spec) and dashboard.MAX_RUNS_UNCOUNTED >= 100


def test_a_view_made_while_the_sweep_runs_groups_by_what_it_asked_and_draws_every_run(sweep, tmp_path):
    """Built from the jobs started so far alone, a view of a running sweep grouped by nothing (one job: every
    override taken as swept) and drew ten runs a panel whatever the sweep's size; multirun.yaml says both."""
    import shutil

    live = tmp_path / sweep.name
    live.mkdir()
    shutil.copy(sweep / "multirun.yaml", live)
    first = min(jobs(sweep), key=lambda j: j.name)
    shutil.copytree(first, live / first.name)
    read = dashboard.read_sweep(live)
    assert len(read.jobs) == 1 and read.runs == 3 and read.groupby == ["beta"] and list(read.swept) == ["beta"]
    for job in jobs(sweep):  # 3 more started than asked (a hand-copied folder): every one of them drawn
        shutil.copytree(job, live / f"{job.name}-again")
    spec = dashboard.view_spec(dashboard.build_workspace(dashboard.read_sweep(live), "e", "p"))
    assert dashboard.spec_keys(spec)["grouping"] == {"config:beta.value"} and '"maxRuns": 10' in json.dumps(spec)
    big = dashboard.Sweep(group="g", jobs=[Path("j")] * 2, asked=30)
    assert '"maxRuns": 30' in json.dumps(dashboard.view_spec(dashboard.build_workspace(big, "e", "p")))


@pytest.mark.parametrize("group", ["alice's beta sweep", "runs\\b", "lr=1e-6<2>"])
def test_a_group_name_with_quotes_or_operators_filters_on_itself(group):
    """wandb-workspaces parses a filter back from an expression: a quote in the group's name raised SyntaxError
    (no spec written), a backslash and =, <, > changed the name the view filtered on (a view of no runs)."""
    spec = dashboard.view_spec(dashboard.build_workspace(dashboard.Sweep(group=group, jobs=[Path("j")] * 2), "e", "p"))
    assert dashboard.spec_keys(spec)["groups"] == {group}
    assert spec["displayName"] == "SimPO " + group.replace("=", "_").replace("<", "_").replace(">", "_")


def test_panels_cover_every_logged_metric(sweep, spec):
    plotted = dashboard.spec_keys(spec)["history"]
    missing = logged_keys(sweep) - plotted
    assert not missing, f"logged but in no panel: {sorted(missing)}"
    sections = {s["name"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"]}
    assert {"Sweep", "Preference", "Log-probs", "Optimisation", "Lengths"} <= sections
    families = {k.split("/")[1] for k in logged_keys(sweep) if "/" in k}
    assert families <= {k.split("/")[1] for k in plotted if "/" in k}


def test_every_key_a_panel_asks_for_was_logged(sweep, spec):
    asked = dashboard.spec_keys(spec)
    logged = logged_keys(sweep)
    never = asked["history"] - logged - set(CONDITIONAL_METRICS)  # those need a GPU or a stated peak
    assert not never, f"asked for but never logged: {sorted(never)}"
    # Summary keys: what the jobs ended with (summary.json), under W&B's aggregate suffix if any.
    for key in asked["summary"]:
        base = next((key[: -len(s)] for s in SUMMARY_AGGREGATES if key.endswith(s)), key)
        assert base in logged, key
        for job in jobs(sweep):
            assert base in json.loads((job / "summary.json").read_text()), (key, job.name)
    # Config keys ("beta.value", "dataset.value.synthetic.num_train"): a value in every job's config.
    for key in asked["config"]:
        path = key.replace(".value", "", 1).split(".")
        for job in jobs(sweep):
            node = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
            for part in path:
                node = node[part]
            assert not isinstance(node, dict), key


def test_panel_keys_are_tracking_keys():
    """The dashboard names no metric of its own: every plotted key is in tracking.py's lists (by
    default, the metrics of every method; a sweep directory narrows them to its jobs' methods)."""
    known = set(train_keys(METHODS) + eval_keys(METHODS)) | {STEP_KEY, dashboard.SAMPLES_KEY}
    plotted = {k for s in dashboard.metric_sections() for _, keys in s.panels for k in keys}
    assert plotted == known - {STEP_KEY}
    every = [k for s in dashboard.metric_sections() for _, keys in s.panels for k in keys]
    assert len(every) == len(set(every))  # a rejected metric drawn with its chosen partner only, not again alone


def test_the_metric_sections_open_but_progress_and_throughput():
    sweep = dashboard.Sweep(group="g", swept={}, jobs=[Path("a")])
    spec = dashboard.view_spec(dashboard.build_workspace(sweep, None, "simpo-exp"))
    opened = {s["name"]: s["isOpen"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"]}
    assert opened["Preference"] and opened["Log-probs"] and not opened["Progress and throughput"]


def test_spec_is_stable_and_loads_back(sweep, spec):
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    again = dashboard.view_spec(dashboard.build_workspace(dashboard.read_sweep(sweep), None, "simpo-exp"))
    assert again == spec  # the same sweep gives the same file: diffable, panel ids included
    loaded = ws.Workspace._from_model(internal.View.model_validate(spec))
    assert [s.name for s in loaded.sections][:2] == ["Sweep", "Preference"]
    assert sweep_group(str(sweep)) in loaded.runset_settings.filters


def test_bare_group_and_offline_mode_with_a_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key, but offline: write the spec, send nothing
    out = tmp_path / "view.json"
    assert dashboard.main(["sweep-elsewhere", "--entity", "team", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "not saved to W&B" in said
    # the command to push it keeps --out (where the view's W&B name is kept: pushed without it, a later run with
    # --out made a second view) and undoes the WANDB_MODE that kept it offline
    assert "WANDB_MODE=online WANDB_API_KEY=... python -m simpo_exp.dashboard sweep-elsewhere" in said
    assert said.rstrip().endswith(f"--out {out}")
    spec = json.loads(out.read_text())
    asked = dashboard.spec_keys(spec)
    assert asked["groups"] == {"sweep-elsewhere"} and asked["grouping"] == set()
    assert spec["entity"] == "team"
    assert {dashboard.config_column(k).split(":", 1)[1] for k in dashboard.DEFAULT_KNOBS} <= asked["config"]
    with pytest.raises(SystemExit):
        dashboard.main([str(tmp_path / "no" / "such" / "sweep")])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # W&B refuses it in a view's name: said, not pydantic's traceback
        dashboard.main(["sweep-elsewhere", "--name", "lr=1e-6", "--out", str(out)])
    assert "--name 'lr=1e-6': W&B refuses =" in capsys.readouterr().err
    for mode in ("disabled", "dryrun", "DISABLED"):  # W&B told to stay off the network: nothing pushed either
        monkeypatch.setenv("WANDB_MODE", mode)
        assert not dashboard._online()
        assert dashboard.main(["sweep-elsewhere", "--out", str(out)]) == 0
        assert "not saved to W&B" in capsys.readouterr().out


def test_the_printed_push_command_keeps_every_choice_made(tmp_path, monkeypatch, capsys):
    """Without a key the command says how to push the view: with the same project, entity, swept keys, name and spec
    file, or the pushed view would differ from the one written."""
    import shlex

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    out = tmp_path / "view.json"
    asked = ["--entity", "team", "--project", "proj", "--swept", "beta", "--name", "beta sweep", "--out", str(out)]
    assert dashboard.main([str(sweep_dir), *asked]) == 0
    said = capsys.readouterr().out.rstrip().splitlines()[-1].strip()
    assert said.startswith("WANDB_API_KEY=... python -m simpo_exp.dashboard ")
    argv = shlex.split(said.removeprefix("WANDB_API_KEY=... "))[3:]
    assert argv[0] == str(sweep_dir) and dict(zip(argv[1::2], argv[2::2])) == dict(zip(asked[::2], asked[1::2]))


def test_a_mistyped_sweep_folder_read_as_a_group_name_is_said(tmp_path, monkeypatch, capsys):
    """``dashboard sweepp`` (the folder is ``sweep``) wrote a view of an empty W&B group without a word."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep").mkdir()
    assert dashboard.main(["sweepp"]) == 0
    assert "'sweepp' is no folder here, so it is read as a W&B group name" in (err := capsys.readouterr().err)
    assert "did you mean the folder 'sweep'?" in err
    assert dashboard.main(["sweep-run-0a1b2c"]) == 0  # a sweep's group name: nothing to say
    assert "is no folder here" not in capsys.readouterr().err


def test_swept_config_groups_map_to_config_keys():
    model = [
        {"model": {"name": "tiny", "dtype": "float32"}, "beta": 2.0},
        {"model": {"name": "big", "dtype": "bf16"}, "beta": 2.0},
    ]
    assert dashboard.config_keys_for("model", model, [{"model": "tiny"}, {"model": "big"}]) == ["model.name"]
    assert dashboard.config_keys_for("beta", model, [{}, {}]) == ["beta"]
    # hparams writes to the top level and has no name: the values that differ between the jobs
    hp = [
        {"beta": 2.0, "sft_weight": 0.0, "output_dir": "/a", "logger": {"run_name": "a"}},
        {"beta": 2.5, "sft_weight": 0.1, "output_dir": "/b", "logger": {"run_name": "b"}},
    ]
    choices = [{"hparams": "default"}, {"hparams": "instruct"}]
    assert dashboard.config_keys_for("hparams", hp, choices) == ["beta", "sft_weight"]
    assert dashboard.config_keys_for("nothing", hp, [{}, {}]) == []


def test_no_evaluation_section_without_eval_results(spec):
    sections = [s["name"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"]]
    assert dashboard.EVAL_SECTION not in sections
    assert not any("bench/" in key for keys in dashboard.spec_keys(spec).values() for key in keys)


def evaluated_sweep(root: Path, win_rates: dict[tuple[str, str], float]) -> Path:
    """A --multirun directory as Hydra and the evaluate stage leave it (no training: only the files read here)."""
    from simpo_exp.inference.files import write_json

    sweep_dir = root / "2030-03-03_00-00-00"
    for i, ((beta, seed), rate) in enumerate(win_rates.items()):
        job = sweep_dir / f"{i}_beta={beta},seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- beta={beta}\n- seed={seed}\n")
        (job / ".hydra" / "config.yaml").write_text(f"beta: {beta}\nseed: {seed}\nlogger:\n  project: simpo-exp\n")
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  mode: MULTIRUN\n  sweep:\n    dir: {sweep_dir}\n")
        write_json(job / "eval" / "rule" / "results.json", {"metrics": {"win_rate": rate, "score": 0.5, "n": 32}})
    return sweep_dir


def test_a_sweep_logged_to_wandb_by_some_of_its_jobs_counts_as_logged(tmp_path):
    """The note that the jobs did not log to W&B (an empty view) is for a sweep none of whose jobs did."""
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    first, second = sorted(p / ".hydra" / "config.yaml" for p in sweep_dir.iterdir() if p.is_dir())
    first.write_text(first.read_text() + "  wandb: false\n")
    assert dashboard.read_sweep(sweep_dir).logged
    second.write_text(second.read_text() + "  wandb: false\n")
    assert not dashboard.read_sweep(sweep_dir).logged


def test_evaluation_panels_group_seeds_and_rank_the_table(tmp_path):
    rates = {("2", "1"): 40.0, ("2", "2"): 50.0, ("5", "1"): 70.0, ("5", "2"): 80.0}
    sweep = dashboard.read_sweep(evaluated_sweep(tmp_path, rates))
    assert sweep.bench == ["bench/rule/win_rate", "bench/rule/score", "bench/rule/n"]
    spec = dashboard.view_spec(dashboard.build_workspace(sweep, None, "simpo-exp"))
    asked = dashboard.spec_keys(spec)
    assert asked["grouping"] == {"config:beta.value"}  # seeds pooled: one group per beta
    sections = {s["name"]: s for s in spec["spec"]["section"]["panelBankConfig"]["sections"]}
    bars = sections[dashboard.EVAL_SECTION]["panels"]
    assert [p["viewType"] for p in bars] == ["Bar Chart"] * 3
    assert [p["config"]["metrics"] for p in bars] == [[k] for k in sweep.bench]
    for p in bars:  # one bar per beta: the mean over its seeds, the standard deviation as its range
        c = p["config"]
        assert (c["groupAgg"], c["groupArea"], c["groupBy"], c["aggregate"]) == ("mean", "stddev", "beta.value", True)
    assert set(sweep.bench) <= asked["summary"]
    runset = spec["spec"]["section"]["runSets"][0]
    assert "summary:bench/rule/win_rate" in runset["runFeed"]["columnOrder"]
    assert "summary:bench/rule/score" not in runset["runFeed"]["columnOrder"]  # win rates only, as compare
    first = runset["sort"]["keys"][0]  # the table sorted by the win rate, best first
    assert first == {"key": {"section": "summary", "name": "bench/rule/win_rate"}, "ascending": False}
    (pc,) = [p for p in sections["Sweep"]["panels"] if p["viewType"] == "Parallel Coordinates Plot"]
    assert "summary:bench/rule/win_rate" in [c["accessor"] for c in pc["config"]["columns"]]


def test_a_win_rates_standard_error_sits_beside_it_in_the_table_and_gets_no_bars(tmp_path):
    """AlpacaEval's standard errors and Arena-Hard's interval were bar charts of their own, and the table showed the
    win rates without them: whether 31.2 against 29.8 is more than noise was not to be read off the dashboard."""
    from simpo_exp.inference.files import write_json

    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        alpaca = {"lc_win_rate": 41.0, "lc_standard_error": 0.9, "win_rate": 40.0, "standard_error": 1.7, "n": 805}
        write_json(job / "eval" / "alpacaeval2" / "results.json", {"metrics": alpaca})
        arena = {"win_rate": 20.0, "win_rate_ci_low": 18.5, "win_rate_ci_high": 21.4}
        write_json(job / "eval" / "arenahard" / "results.json", {"metrics": arena})
    sweep = dashboard.read_sweep(sweep_dir)
    spec = dashboard.view_spec(dashboard.build_workspace(sweep, None, "simpo-exp"))
    sections = {s["name"]: s for s in spec["spec"]["section"]["panelBankConfig"]["sections"]}
    barred = [p["config"]["metrics"][0] for p in sections[dashboard.EVAL_SECTION]["panels"]]
    a, h, r = "bench/alpacaeval2/", "bench/arenahard/", "bench/rule/"
    assert barred == [f"{a}lc_win_rate", f"{a}win_rate", f"{a}n", f"{h}win_rate", f"{r}win_rate", f"{r}score", f"{r}n"]
    order = spec["spec"]["section"]["runSets"][0]["runFeed"]["columnOrder"]
    shown = [c.removeprefix("summary:") for c in order if c.startswith("summary:bench/")]
    assert shown == [
        f"{a}lc_win_rate", f"{a}lc_standard_error", f"{a}win_rate", f"{a}standard_error",
        f"{h}win_rate", f"{h}win_rate_ci_low", f"{h}win_rate_ci_high", f"{r}win_rate",
    ]  # fmt: skip
    sort = spec["spec"]["section"]["runSets"][0]["sort"]["keys"][0]["key"]
    assert sort == {"section": "summary", "name": f"{a}lc_win_rate"}


def test_sweeps_in_directories_of_one_name_get_their_own_group_and_a_recorded_group_wins(sweep, tmp_path):
    """outputs/a/beta and outputs/b/beta were both W&B group sweep-beta: each one's dashboard showed both sweeps.
    A job's wandb_run.json (what W&B was given, e.g. by an older naming) is what its dashboard filters on."""
    assert sweep_group("outputs/a/beta", "/work") != sweep_group("outputs/b/beta", "/work")
    assert sweep_group("outputs/a/beta", "/work") == sweep_group("/work/outputs/a/beta")
    assert sweep_group("outputs/a/beta", "/work").startswith("sweep-beta-")
    import shutil

    copy = tmp_path / "beta"
    shutil.copytree(sweep, copy)
    assert dashboard.read_sweep(copy).group == sweep_group(str(sweep))  # moved: the group it ran under
    for job in jobs(copy):
        (job / "wandb_run.json").write_text(json.dumps({"id": job.name[:8], "group": "sweep-2030-01-01_00-00-00"}))
    assert dashboard.read_sweep(copy).group == "sweep-2030-01-01_00-00-00"


def test_a_second_save_updates_the_view_where_the_runs_logged(sweep, tmp_path, monkeypatch, capsys):
    """Saved, the spec on disk holds the view's W&B name and id; a second push (the README's, again after
    evaluate) updates that view, where each push made a new one of the same title. The view goes to the entity
    and project the runs logged to (wandb_run.json: an entity from WANDB_ENTITY is in no config), not the
    viewer's default entity. The server is a fake here: nothing leaves the machine."""
    import shutil

    import wandb_workspaces.workspaces.interface as interface
    import wandb_workspaces.workspaces.internal as internal

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    for job in jobs(copy):
        record = {
            "id": job.name[:8],
            "entity": "team-x",
            "project": "proj-y",
            "group": dashboard.read_sweep(sweep).group,
        }
        (job / "wandb_run.json").write_text(json.dumps(record))
    sent = []

    def upsert(view):
        sent.append((view.entity, view.project, view.name, view.id))
        return {"upsertView": {"view": {"name": view.name, "id": view.id or f"view-{len(sent)}"}}}

    monkeypatch.setattr(internal, "upsert_view2", upsert)
    monkeypatch.setattr(interface.Workspace, "url", property(lambda ws: f"https://w.example/{ws._internal_name}"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    for _ in range(2):
        assert dashboard.main([str(copy)]) == 0
    assert "saved: https://w.example/" in capsys.readouterr().out
    (first, second) = sent
    assert first[:2] == ("team-x", "proj-y") and not first[3]
    assert second == (*first[:3], "view-1")
    spec = json.loads((copy / "wandb_workspace.json").read_text())
    assert (spec["name"], spec["id"]) == (first[2], "view-1")

    def refused(view):
        raise ConnectionError("no route to the server")

    monkeypatch.setattr(internal, "upsert_view2", refused)  # a failed push: the spec is kept, the exit says so
    assert dashboard.main([str(copy)]) == 1
    err = capsys.readouterr().err
    assert "error: saving the view to W&B failed (ConnectionError" in err
    assert f"the spec is in {copy / 'wandb_workspace.json'}; retry with:" in err
    monkeypatch.setenv("WANDB_MODE", "offline")  # and an offline re-run: neither forgets the view saved
    assert dashboard.main([str(copy)]) == 0
    spec = json.loads((copy / "wandb_workspace.json").read_text())
    assert (spec["name"], spec["id"]) == (first[2], "view-1")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(internal, "upsert_view2", upsert)
    assert dashboard.main([str(copy)]) == 0 and sent[-1] == (*first[:3], "view-1")  # the same view again


def test_a_view_of_runs_that_recorded_no_entity_goes_to_the_keys_default_entity(tmp_path, monkeypatch, capsys):
    """With a key, no --entity, no WANDB_ENTITY and no entity recorded by the jobs, the view is saved under the
    key's default entity (W&B's API says which), and the spec on disk names it."""
    import types

    import wandb
    import wandb_workspaces.workspaces.interface as interface
    import wandb_workspaces.workspaces.internal as internal

    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    sent = []

    def upsert(view):
        sent.append((view.entity, view.project))
        return {"upsertView": {"view": {"name": "v", "id": "view-1"}}}

    monkeypatch.setattr(internal, "upsert_view2", upsert)
    monkeypatch.setattr(interface.Workspace, "url", property(lambda ws: "https://w.example/v"))
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: types.SimpleNamespace(default_entity="me"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    assert dashboard.main([str(sweep_dir)]) == 0
    assert sent == [("me", "simpo-exp")] and "saved: https://w.example/v" in capsys.readouterr().out
    assert json.loads((sweep_dir / "wandb_workspace.json").read_text())["entity"] == "me"


def test_swept_group_choices_and_nested_job_folders(sweep, tmp_path):
    """--swept hparams grouped by a config key no run has (hparams writes to the top level): every run in one null
    group. And a sweep with nested job folders (hydra.sweep.subdir=beta${beta}/seed${seed}), which compare reads,
    held "no --multirun jobs" for the dashboard."""
    import shutil

    nested = tmp_path / "nested"
    for n, job in enumerate(jobs(sweep)):
        shutil.copytree(job, nested / f"beta{n}" / "seed1")
    found = dashboard.read_sweep(nested)
    assert len(found.jobs) == 3 and found.swept == {"beta": ["beta"]}
    out = tmp_path / "view.json"
    for job in found.jobs:  # as if the sweep had swept hparams presets: they differ in beta
        hydra = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())
        hydra["hydra"]["runtime"]["choices"]["hparams"] = f"preset-{job.parent.name}"
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    assert dashboard.main([str(nested), "--swept", "hparams", "--out", str(out)]) == 0
    grouping = dashboard.spec_keys(json.loads(out.read_text()))["grouping"]
    assert grouping == {dashboard.config_column("beta")}, grouping


def test_a_methods_own_statistics_go_with_the_log_probs(monkeypatch):
    """Read from the table of methods (ORPO's log odds, and a method added later): the dashboard held a list of
    ORPO's names, and sent any other method's statistics to "Progress and throughput"."""
    from dataclasses import replace

    from simpo_exp import methods

    assert dashboard._section_of("log_odds_ratio") == "Log-probs"
    added = replace(methods.TABLE["simpo"], extra_metrics=("calibration_gap",))
    monkeypatch.setitem(methods.TABLE, "slic", added)
    assert dashboard._section_of("calibration_gap") == "Log-probs"
    assert dashboard._section_of("tokens_per_s") == "Progress and throughput"


def test_evaluation_bars_of_two_swept_keys_pool_seeds_only(tmp_path):
    """Swept over beta and gamma_beta_ratio: a bar per setting (the runs table's grouping), not one per beta that
    averages different gamma_beta_ratio values together."""
    sweep = dashboard.Sweep(
        group="g",
        swept={"beta": ["beta"], "gamma_beta_ratio": ["gamma_beta_ratio"], "seed": ["seed"]},
        jobs=[Path("a"), Path("b"), Path("c"), Path("d")],
        bench=["bench/rule/win_rate"],
    )
    spec = dashboard.view_spec(dashboard.build_workspace(sweep, None, "simpo-exp"))
    sections = {s["name"]: s for s in spec["spec"]["section"]["panelBankConfig"]["sections"]}
    (bar,) = sections[dashboard.EVAL_SECTION]["panels"]
    assert bar["config"]["aggregate"] is True and not bar["config"].get("groupBy")
    assert dashboard.spec_keys(spec)["grouping"] == {"config:beta.value", "config:gamma_beta_ratio.value"}


def _record(sweep_dir: Path, **fields_of_job) -> None:
    for i, job in enumerate(sorted(p for p in sweep_dir.iterdir() if p.is_dir())):
        record = {"id": f"id{i}", **{k: v[i] if isinstance(v, list) else v for k, v in fields_of_job.items()}}
        (job / "wandb_run.json").write_text(json.dumps(record))


def test_jobs_of_two_sweeps_are_refused(tmp_path):
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    _record(sweep_dir, group=["sweep-a-000000", "sweep-b-111111"])
    with pytest.raises(SystemExit, match=r"holds jobs of 2 sweeps \(sweep-a-000000, sweep-b-111111\)"):
        dashboard.read_sweep(sweep_dir)


def test_a_folder_of_no_jobs_and_a_single_run_beside_a_sweeps_jobs(tmp_path):
    """An empty folder is named in the refusal; a single run's folder (Hydra mode RUN) inside a sweep's folder is
    not one of its jobs (it has no sweep group)."""
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=re.escape(f"error: {empty} holds no --multirun jobs")):
        dashboard.read_sweep(empty)
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    single = sweep_dir / "x_single"
    shutil.copytree(sorted(p for p in sweep_dir.iterdir() if p.is_dir())[0], single)
    (single / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: RUN\n")
    assert [j.name for j in dashboard.read_sweep(sweep_dir).jobs] == ["0_beta=2,seed=1", "1_beta=5,seed=1"]


def test_every_jobs_benchmarks_and_methods_get_their_panels(tmp_path):
    """A benchmark only a later job was evaluated on, and a sweep over methods: each one's numbers and statistics are
    in the view, not only the first job's."""
    from simpo_exp.inference.files import write_json

    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    last = sorted(p for p in sweep_dir.iterdir() if p.is_dir())[-1]
    write_json(last / "eval" / "arena-hard" / "results.json", {"metrics": {"win_rate": 20.0}})
    config = last / ".hydra" / "config.yaml"
    config.write_text(config.read_text() + "method: orpo\n")
    sweep = dashboard.read_sweep(sweep_dir)
    assert "bench/arena-hard/win_rate" in sweep.bench and "bench/rule/win_rate" in sweep.bench
    assert sweep.methods == ("orpo", "simpo")
    asked = dashboard.spec_keys(dashboard.view_spec(dashboard.build_workspace(sweep, None, "simpo-exp")))
    assert any("log_odds_ratio" in k for k in asked["history"]) and "bench/arena-hard/win_rate" in asked["summary"]


def test_jobs_that_ran_under_a_logger_group_are_filtered_on_it(tmp_path):
    """Jobs run with logger.group=X logged under X; those without a wandb_run.json (they failed before W&B started)
    are read from their config, not given the folder's sweep group (an empty view)."""
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    for config in sweep_dir.glob("*/.hydra/config.yaml"):
        config.write_text(config.read_text() + "  group: my-ablation\n")
    assert dashboard.read_sweep(sweep_dir).group == "my-ablation"


def test_jobs_that_logged_to_two_entities_name_none(tmp_path):
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    _record(sweep_dir, group="sweep-x-000000", entity=["team-a", "team-b"], project="p")
    sweep = dashboard.read_sweep(sweep_dir)
    assert sweep.entity is None and sweep.project == "p"
    _record(sweep_dir, group="sweep-x-000000", entity=["", "team-a"], project="p")  # an offline job's: no entity
    assert dashboard.read_sweep(sweep_dir).entity == "team-a"


def test_the_command_lines_entity_and_project_win_over_the_recorded_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    _record(sweep_dir, group="sweep-x-000000", entity="team-x", project="proj-y")
    out = tmp_path / "view.json"
    assert dashboard.main([str(sweep_dir), "--entity", "mine", "--project", "other", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())
    assert (spec["entity"], spec["project"]) == ("mine", "other")


def test_a_saved_views_name_is_kept_only_for_the_same_project(tmp_path, monkeypatch):
    """The spec on disk names the view a save made; written for another project, it must not point at that view."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    out = tmp_path / "view.json"
    saved = {"name": "view-name", "id": "view-id", "project": "simpo-exp", "entity": "team"}
    out.write_text(json.dumps(saved))
    assert dashboard.main([str(sweep_dir), "--project", "elsewhere", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())
    assert spec.get("id") != "view-id" and spec.get("name") != "view-name"
    out.write_text(json.dumps(saved))
    assert dashboard.main([str(sweep_dir), "--entity", "team", "--out", str(out)]) == 0  # the same view: kept
    assert json.loads(out.read_text())["id"] == "view-id"
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    assert dashboard.main([str(sweep_dir), "--out", str(out)]) == 0  # no entity anywhere: the saved view's
    spec = json.loads(out.read_text())
    assert (spec["entity"], spec["id"]) == ("team", "view-id")
    out.write_text(json.dumps(saved))
    out.write_text(json.dumps(saved | {"id": None}))  # a spec with a name and no id (a save that got none): a new view
    assert dashboard.main([str(sweep_dir), "--entity", "team", "--out", str(out)]) == 0
    assert json.loads(out.read_text()).get("name") != "view-name"
    out.write_text(json.dumps(saved))  # another entity's view of the same project: its own view, not team's
    assert dashboard.main([str(sweep_dir), "--entity", "bob", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())
    assert spec["entity"] == "bob" and spec.get("id") != "view-id" and spec.get("name") != "view-name"


def test_a_sweep_at_hydras_default_directory_gets_the_group_it_ran_under(tmp_path):
    """Left at its default, hydra.sweep.dir is saved unresolved (${now:...}): the group comes from the folder the
    jobs ran in, as recorded in hydra.yaml's runtime.output_dir."""
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    for job in (p for p in sweep_dir.iterdir() if p.is_dir()):
        (job / ".hydra" / "hydra.yaml").write_text(
            "hydra:\n  mode: MULTIRUN\n  sweep:\n    dir: multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}\n"
            f"  runtime:\n    cwd: {tmp_path}\n    output_dir: {job}\n"
        )
    assert dashboard.read_sweep(sweep_dir).group == sweep_group(str(sweep_dir))


def test_a_nested_sweep_at_hydras_default_directory_with_a_job_that_never_logged_is_one_group(tmp_path):
    """hydra.sweep.subdir=b${beta}/s${seed} at Hydra's dated default folder: a job that failed before W&B started (no
    wandb_run.json) was given its inner folder's group, and the dashboard refused the folder as two sweeps."""
    import shutil

    flat = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    sweep_dir = tmp_path / "multirun" / "2026-12-04_17-33-24"
    for n, job in enumerate(sorted(p for p in flat.iterdir() if p.is_dir())):
        nested = sweep_dir / f"b{n}" / "s1"
        shutil.copytree(job, nested)
        (nested / ".hydra" / "hydra.yaml").write_text(
            "hydra:\n  mode: MULTIRUN\n  sweep:\n    dir: multirun/${now:%Y-%m-%d_%H-%M-%S}\n"
            "    subdir: b${beta}/s${seed}\n"
            f"  runtime:\n    cwd: {tmp_path}\n    output_dir: {nested}\n"
        )
    first = sorted(sweep_dir.glob("*/*"))[0]  # the job that trained recorded the group it logged under
    (first / "wandb_run.json").write_text(json.dumps({"id": "x", "group": sweep_group(str(sweep_dir))}))
    assert dashboard.read_sweep(sweep_dir).group == sweep_group(str(sweep_dir))
    # one job's folder given for its sweep's: said so, naming the sweep's folder (it "held no --multirun jobs")
    with pytest.raises(SystemExit, match=f"is one job of a --multirun sweep; give the sweep's folder, {sweep_dir}$"):
        dashboard.main([str(first)])
    bad = first / ".hydra" / "hydra.yaml" / "view.json"
    with pytest.raises(SystemExit, match=rf"cannot write the view spec {re.escape(str(bad))} .*--out names another"):
        dashboard.main([str(sweep_dir), "--out", str(bad)])


def test_jobs_whose_hydra_yaml_names_no_mode_are_read(tmp_path):
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    for job in (p for p in sweep_dir.iterdir() if p.is_dir()):
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  sweep:\n    dir: {sweep_dir}\n")
    assert len(dashboard.read_sweep(sweep_dir).jobs) == 2


def test_a_sweep_folder_named_two_ways_is_one_group():
    """The training jobs name their group from hydra.sweep.dir as typed, the dashboard from the folder given to it:
    ``outputs/beta/`` and ``./outputs/beta`` are the one sweep, and its dashboard must filter on its jobs' group."""
    one = sweep_group("outputs/a/beta", "/work")
    assert sweep_group("outputs/a/beta/", "/work") == sweep_group("./outputs/a/beta", "/work") == one
    assert sweep_group("outputs/x/../a/beta", "/work") == one


def test_a_nested_config_key_is_its_top_keys_column_and_a_lone_run_is_no_group():
    """W&B keeps a config value under ``<top>.value``: a swept ``dataset.synthetic.num_train`` is the column
    ``config:dataset.value.synthetic.num_train`` (``config:dataset.synthetic.num_train.value`` is an empty one). A
    one-job sweep has nothing to group: grouped by its overrides its lone run drew as a group of one."""
    assert dashboard.config_column("beta") == "config:beta.value"
    assert dashboard.config_column("dataset.synthetic.num_train") == "config:dataset.value.synthetic.num_train"
    lone = dashboard.Sweep(group="g", swept={"dataset.synthetic.num_train": ["dataset.synthetic.num_train"]},
                           jobs=[Path("j")])  # fmt: skip
    spec = dashboard.view_spec(dashboard.build_workspace(lone, "e", "p"))
    assert "config:dataset.value.synthetic.num_train" in spec["spec"]["section"]["runSets"][0]["runFeed"]["columnOrder"]
    assert lone.groupby == [] and not dashboard.spec_keys(spec)["grouping"]
    three = dashboard.Sweep(group="g", swept={"beta": ["beta"]}, jobs=[Path("j")], asked=3)  # two yet to start
    assert (
        three.groupby == ["beta"]
        and dashboard.spec_keys(dashboard.view_spec(dashboard.build_workspace(three, "e", "p")))["grouping"]
    )


def test_jobs_that_logged_to_two_projects_name_none_and_a_configured_entity_stands_for_an_offline_one(tmp_path):
    """The view goes where all the runs are: two projects name none (one picked would hold some runs only). Offline
    runs record an empty entity: the jobs' configured logger.entity is where they sync to."""
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    _record(sweep_dir, group="sweep-x-000000", entity="t", project=["p1", "p2"])
    assert dashboard.read_sweep(sweep_dir).project is None
    for config in sweep_dir.glob("*/.hydra/config.yaml"):
        config.write_text(config.read_text() + "  entity: team-z\n")
    _record(sweep_dir, group="sweep-x-000000", entity="", project="p")
    sweep = dashboard.read_sweep(sweep_dir)
    assert (sweep.entity, sweep.project) == ("team-z", "p")


def test_a_swept_key_in_no_jobs_config_is_said_and_left_out(tmp_path, capsys):
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    for i, overrides in enumerate(sorted(sweep_dir.glob("*/.hydra/overrides.yaml"))):
        overrides.write_text(overrides.read_text() + f"- +foo={i}\n")
    sweep = dashboard.read_sweep(sweep_dir)
    assert "foo" not in sweep.swept and "beta" in sweep.swept
    assert "swept key 'foo' is in no job's config; left out of the view" in capsys.readouterr().err


def test_a_moved_sweep_at_hydras_default_directory_keeps_the_group_it_ran_under(tmp_path):
    """A sweep left at Hydra's dated default folder, moved since, whose jobs recorded no W&B group (none logged yet,
    or they failed before W&B started): the group is of the folder the jobs ran in (hydra.yaml's output_dir), the one
    W&B saw, not of the folder it was moved to."""
    import shutil

    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    for job in (p for p in sweep_dir.iterdir() if p.is_dir()):
        (job / ".hydra" / "hydra.yaml").write_text(
            "hydra:\n  mode: MULTIRUN\n  sweep:\n    dir: multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}\n"
            f"  runtime:\n    cwd: {tmp_path}\n    output_dir: {job}\n"
        )
    ran_under = sweep_group(str(sweep_dir))
    moved = tmp_path / "archive" / "moved"
    moved.parent.mkdir()
    shutil.move(sweep_dir, moved)
    assert dashboard.read_sweep(moved).group == ran_under != sweep_group(str(moved))


def test_a_group_choice_is_its_name_only_where_every_job_has_one():
    configs = [{"model": {"name": "a", "d": 1}}, {"model": {"d": 2}}]
    # the values that differ (model.name alone would group the job without one in a null group, whatever its d)
    assert dashboard.config_keys_for("model", configs, [{"model": "a"}, {"model": "b"}]) == ["model.name", "model.d"]


def test_skipped_steps_and_the_loss_are_with_the_optimisation_panels():
    """train/skipped_steps (non-finite steps) beside the gradient norm, not in the folded progress section."""
    section = {title: s.name for s in dashboard.metric_sections() for title, _ in s.panels}
    assert section["train/skipped_steps"] == section["train/grad_norm"] == section["train/loss"] == "Optimisation"


@pytest.mark.parametrize("ch", ["^", "`", "$", "€", "🚀", "©"])
def test_every_character_wandb_refuses_in_a_view_name_is_replaced(ch):
    """wandb-workspaces refuses modifier symbols (^ `), currency signs ($ €), other symbols (emoji, ©) and lone
    surrogates in a view's name with a pydantic ValidationError: a sweep group such as logger.group=cost$5 wrote no
    spec. The view's name has each as _, its filter the group's own name; & % # ' / and letters are kept."""
    group = f"lr{ch}2"
    spec = dashboard.view_spec(dashboard.build_workspace(dashboard.Sweep(group=group, jobs=[Path("j")] * 2), "e", "p"))
    assert spec["displayName"] == "SimPO lr_2"
    assert dashboard.spec_keys(spec)["groups"] == {group}
    assert dashboard.refused_in_names(f"a{ch}b&%#'/é") == [ch]
    assert dashboard.refused_in_names("a\udcffb") == ["\udcff"]  # a lone surrogate (undecodable bytes in argv)


def test_the_entity_is_the_runs_recorded_one_then_wandb_entity(tmp_path, monkeypatch, capsys):
    """A shell's WANDB_ENTITY does not move the view away from the entity the runs logged to (their wandb_run.json);
    offline runs record none, and `wandb sync` sends them to WANDB_ENTITY: the view and its push command go there
    (W&B's default entity for the key is the viewer's, not the variable's)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_ENTITY", "env-team")
    sweep_dir = evaluated_sweep(tmp_path, {("2", "1"): 40.0, ("5", "1"): 70.0})
    out = tmp_path / "view.json"
    _record(sweep_dir, group="sweep-x-000000", entity="team-x", project="proj-y")
    assert dashboard.main([str(sweep_dir), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["entity"] == "team-x"
    _record(sweep_dir, group="sweep-x-000000", entity="", project="proj-y")
    capsys.readouterr()
    assert dashboard.main([str(sweep_dir), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["entity"] == "env-team"
    assert "--entity env-team" in capsys.readouterr().out


def test_a_file_given_for_the_sweep_is_refused(tmp_path, monkeypatch, capsys):
    """An existing file (multirun.yaml, a saved view) given for the sweep wrote a view of an empty group of its name."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "multirun.yaml").write_text("x: 1\n")
    with pytest.raises(SystemExit):
        dashboard.main(["multirun.yaml"])
    assert "multirun.yaml is not a sweep directory" in capsys.readouterr().err
    assert not list(tmp_path.glob("wandb_workspace_*.json"))
