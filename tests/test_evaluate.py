"""The evaluate stage (python -m simpo_exp.evaluate): a sweep evaluated by the rule judge and ranked by
compare, AlpacaEval/Arena-Hard output files, the judge path against a fake local endpoint, bad input."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from simpo_exp.inference.files import read_jsonl
from tests.runs import free_port, run_module
from tests.test_run import simpo

RUNS = [
    "logger=wandb",  # offline (the test's environment): evaluate adds its numbers to each job's W&B run
    "logger.mode=offline",
    "max_steps=30",
    "dataset.synthetic.num_train=128",
    "dataset.synthetic.num_test=32",
    "eval_steps=10",
    "logging_steps=5",
    "num_generations=0",
    "per_device_train_batch_size=8",
]  # test_run's SMALL, fewer evals
ALPACA = [
    {
        "instruction": f"Say something about the number {i}.",
        "output": "x" * (12 * i + 1),
        "generator": "gpt4_1106_preview",
        "dataset": "helpful_base",
    }
    for i in range(6)
]


def evaluate(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_module("simpo_exp.evaluate", *args, cwd=cwd, timeout=timeout)


def compare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_module("simpo_exp.compare", *args, "--no-plots", cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`python -m simpo_exp --multirun beta=2,5` (small), then `python -m simpo_exp.evaluate <sweep> benchmark=rule`."""
    root = tmp_path_factory.mktemp("eval")
    out = root / "sweep"
    res = simpo("--multirun", "beta=2,5", *RUNS, f"hydra.sweep.dir={out}", cwd=root, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    res = evaluate(str(out), "benchmark=rule", f"hydra.run.dir={root / 'ev'}", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    return out


def jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())


# ----------------------------------------------------------------------------- rule judge + compare
def test_sweep_is_evaluated_and_ranked_by_the_rule_win_rate(sweep):
    rates, starts = {}, []
    for job in jobs(sweep):
        res = json.loads((job / "eval" / "rule" / "results.json").read_text())
        m = res["metrics"]
        assert m["n"] == 32 and 0.0 <= m["win_rate"] <= 100.0 and 0.0 <= m["score"] <= 1.0
        rows = read_jsonl(job / "eval" / "rule" / "generations.jsonl")
        assert len(rows) == 32 and all(r["prompt"].startswith("sort:") for r in rows)
        wins = sum(r["preference"] - 1 for r in rows) / len(rows) * 100  # the file's verdicts give its number
        assert m["win_rate"] == pytest.approx(wins)
        assert m["standard_error"] == pytest.approx(100 * statistics.stdev(r["preference"] for r in rows) / 32**0.5)
        assert m["score"] == pytest.approx(sum(r["score_model"] for r in rows) / 32)
        rates[job.name] = m["win_rate"]
        starts.append([r["start"] for r in rows])
        assert {"random_init", "seed"} <= set(res["start_weights"])  # which starting model: compare reads it
        card = (job / "model" / "README.md").read_text()
        assert card.startswith("---\n") and "model-index" in card and "win_rate" in card and "| `beta` |" in card
    # both jobs start from the same random init (same seed): the starting model answers identically
    assert starts[0] == starts[1]
    print(f"\nrule judge: win rate of the trained model over its starting model: {rates}")

    res = compare(str(sweep), "--rank-by", "bench/rule/win_rate", cwd=sweep.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    print(res.stdout)
    table = [line for line in res.stdout.splitlines() if line.startswith(("0 ", "1 "))]
    ranked = [line.split()[0] for line in table]
    expected = [name.split("_")[0] for name in sorted(rates, key=lambda n: -rates[n])]
    if len(set(rates.values())) > 1:
        assert ranked == expected
    assert "bench/rule/win_rate" in res.stdout
    assert "do not compare" not in res.stdout  # one starting model, one prompt set


def test_compare_refuses_an_unknown_metric_but_takes_bench_names(sweep):
    assert compare(str(sweep), "--metric", "nonsense", cwd=sweep.parent).returncode == 2
    res = compare(str(sweep), "--metric", "bench/alpacaeval2/win_rate", cwd=sweep.parent)
    assert res.returncode == 0 and "no run has bench/alpacaeval2/win_rate" in res.stdout


def test_a_run_trained_with_output_dir_is_evaluated_where_its_model_is(sweep, tmp_path):
    """``python -m simpo_exp output_dir=X``: the model and records go to X, Hydra's ``.hydra/`` stays in its run
    folder. The evaluate stage given that folder said "no trained model" (compare followed output_dir), and given X
    "no run directory". Now it evaluates the model in X and writes the results there, where compare reads them;
    X alone is refused, naming the folder to give."""
    import shutil

    import yaml

    job = jobs(sweep)[0]  # a trained job, moved apart as output_dir= leaves a run
    folder, moved = tmp_path / "hydra-run", tmp_path / "elsewhere"
    shutil.copytree(job / ".hydra", folder / ".hydra")
    shutil.copytree(job, moved, ignore=shutil.ignore_patterns(".hydra", "eval"))
    config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**config, "output_dir": str(moved)}))
    res = evaluate(
        str(folder), "benchmark=rule", "evaluate.wandb=off", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((moved / "eval" / "rule" / "results.json").read_text())
    assert got["metrics"] == json.loads((job / "eval" / "rule" / "results.json").read_text())["metrics"]
    assert got["run_dir"] == str(moved.resolve()) and not (folder / "eval").exists()
    assert "win_rate" in (moved / "model" / "README.md").read_text()
    res = compare(str(folder), "--rank-by", "bench/rule/win_rate", cwd=tmp_path)
    assert res.returncode == 0 and "no run has" not in res.stdout, res.stdout + res.stderr[-2000:]

    res = evaluate(str(moved), "benchmark=rule", f"hydra.run.dir={tmp_path / 'ev2'}", cwd=tmp_path)
    assert res.returncode == 2 and "holds a trained model but not the run's config" in res.stderr, res.stderr


def test_a_relative_output_dir_is_found_where_the_run_ran(tmp_path):
    """``output_dir=runs/x`` is relative to the folder training ran in (Hydra's ``runtime.cwd``, or the job's own
    folder under ``hydra.job.chdir=true``), not to the folder compare or evaluate is started in."""
    import yaml

    from simpo_exp.rundir import records_dir

    folder, ran_in = tmp_path / "outputs" / "run", tmp_path / "project"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"output_dir": "runs/x"}))
    hydra = {"hydra": {"runtime": {"cwd": str(ran_in)}, "job": {"chdir": False}}}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    assert records_dir(folder) == folder  # no such folder: the Hydra folder's own
    (ran_in / "runs" / "x").mkdir(parents=True)
    assert records_dir(folder) == ran_in / "runs" / "x"
    hydra["hydra"]["job"]["chdir"] = True
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (folder / "runs" / "x").mkdir(parents=True)
    assert records_dir(folder) == folder / "runs" / "x"
    (folder / "metrics.jsonl").write_text("")  # records of its own: the folder is the run's
    assert records_dir(folder) == folder


# ----------------------------------------------------------------------------- W&B
def wandb_files(job: Path) -> tuple[str, list[Path]]:
    """The W&B run id training recorded and that run's offline files, oldest first."""
    run_id = json.loads((job / "wandb_run.json").read_text())["id"]
    return run_id, sorted((job / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_results_are_added_to_the_training_runs_wandb_run(sweep):
    from simpo_exp.runinfo import sweep_group
    from tests.test_wandb_offline import fold, read_wandb_log

    for job in jobs(sweep):
        run_id, files = wandb_files(job)
        assert len(files) >= 2, files  # training's run file, then evaluation's, under the same id
        train, ev = (fold(read_wandb_log(f)) for f in files[:2])
        assert ev.run.run_id == train.run.run_id == run_id
        assert ev.run.run_group == train.run.run_group == sweep_group(str(sweep))  # the sweep's W&B group
        assert ev.run.display_name == train.run.display_name and "exit" in ev.kinds
        metrics = json.loads((job / "eval" / "rule" / "results.json").read_text())["metrics"]
        for name, value in metrics.items():
            assert ev.summary[f"bench/rule/{name}"] == pytest.approx(value), name
        assert not any(k.startswith("bench/") for k in train.summary)
        (table,) = [row["bench/rule/samples"] for row in ev.history if "bench/rule/samples" in row]
        assert table["_type"] == "table-file" and table["nrows"] == 8 and table["ncols"] >= 3


def test_wandb_trouble_never_fails_the_evaluation(tmp_path, monkeypatch):
    import wandb

    from simpo_exp.evaluate import wandb_log
    from simpo_exp.inference.files import write_json

    write_json(tmp_path / "eval" / "rule" / "results.json", {"metrics": {"win_rate": 60.0}})
    with pytest.warns(UserWarning, match="recorded no run id"):  # trained with W&B before the id was recorded
        assert wandb_log.log_results(tmp_path, ["rule"], trained_with_wandb=True) is False
    assert wandb_log.log_results(tmp_path, ["rule"], trained_with_wandb=False) is False  # W&B was off: silent

    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    write_json(tmp_path / "wandb_run.json", {"id": "abc123", "project": "p", "group": "g", "mode": "online"})
    with pytest.warns(UserWarning, match="no network"):
        assert wandb_log.log_results(tmp_path, ["rule"]) is False
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_log.wandb_mode("online") == "offline" and wandb_log.wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_log.wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_log.log_results(tmp_path, ["rule"]) is False  # disabled: nothing sent, nothing raised


# ----------------------------------------------------------------------------- AlpacaEval, Arena-Hard, judge
def arena_label(a: str, b: str) -> str:
    """The fake judge's Arena-Hard verdict: the longer answer wins, strongly when at least twice as long."""
    if len(a) == len(b):
        return "A=B"
    long, short, name = (a, b, "A>{}B") if len(a) > len(b) else (b, a, "B>{}A")
    return name.format(">" if len(long) >= 2 * len(short) else "")


def arena_reply(messages: list[dict]) -> str:
    """A reply to arena-hard-auto's judge prompt by ``arena_label``; questions with 'no verdict' never give a
    label, those with 'late verdict' give it only when asked to finish."""
    text = messages[1]["content"]
    a = text.split("<|The Start of Assistant A's Answer|>\n", 1)[1].split("\n<|The End of Assistant A's", 1)[0]
    b = text.split("<|The Start of Assistant B's Answer|>\n", 1)[1].split("\n<|The End of Assistant B's", 1)[0]
    if "no verdict" in text or ("late verdict" in text and len(messages) == 2):
        return "My own answer first: ... Both answers have merits."
    return f"My own answer first: ... My final verdict is: [[{arena_label(a, b)}]]"


class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions: for the one-letter prompt it prefers the longer output ('b'
    on a tie); for arena-hard-auto's prompt it answers by ``arena_reply``."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        self.respond(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def respond(self, body: dict) -> None:
        self.requests.append(body)  # the class's list (a subclass can keep its own)
        content = self.content(body)
        reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
        self.send_response(200 if self.path == "/v1/chat/completions" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def content(self, body: dict) -> str:
        text = body["messages"][-1]["content"]
        if body["messages"][0]["content"].startswith("Please act as an impartial judge"):
            return arena_reply(body["messages"])
        a = text.split("## Output (a)\n", 1)[1].split("\n\n## Output (b)\n", 1)[0]
        b = text.split("\n\n## Output (b)\n", 1)[1].rsplit("\n\nReply with", 1)[0]
        return "a" if len(a) > len(b) else "b"

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judged(sweep, tmp_path_factory):
    """AlpacaEval + Arena-Hard files for one job; the judge first down (exit 2), then judge_only against it up."""
    root = tmp_path_factory.mktemp("bench")
    job = jobs(sweep)[0]
    prompts = root / "alpaca_eval.json"
    prompts.write_text(json.dumps(ALPACA))
    questions, baseline = root / "question.jsonl", root / "gpt-4-0314.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question_id": f"q{i}", "category": "arena-hard-v0.1", "turns": [{"content": f"Explain {i}."}]})
            + "\n"
            for i in range(3)
        )
    )
    baseline.write_text(
        "".join(
            json.dumps(
                {
                    "question_id": f"q{i}",
                    "model_id": "gpt-4-0314",
                    "choices": [{"index": 0, "turns": [{"content": "y" * (10 * i + 5)}]}],
                }
            )
            + "\n"
            for i in range(3)
        )
    )
    port = free_port()
    judge = [
        "judge.kind=openai",
        f"judge.base_url=http://127.0.0.1:{port}/v1",
        "judge.model=fake-judge",
        "judge.max_retries=0",
        "judge.timeout_s=5",
    ]
    args = [
        str(job),
        "benchmark=[alpacaeval2,arena-hard]",
        f"benchmarks.alpacaeval2.prompts_path={prompts}",
        f"benchmarks.arena-hard.prompts_path={questions}",
        f"benchmarks.arena-hard.reference_path={baseline}",
        "evaluate.device=cpu",
        *(f"benchmarks.alpacaeval2.{j}" for j in judge),
        *(f"benchmarks.arena-hard.{j}" for j in judge),
        *(
            f"benchmarks.{b}.decoding.{k}"
            for b in ("alpacaeval2", "arena-hard")
            for k in ("backend=hf", "max_new_tokens=24")
        ),
    ]
    down = evaluate(*args, f"hydra.run.dir={root / 'down'}", cwd=root)
    server = ThreadingHTTPServer(("127.0.0.1", port), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = evaluate(*args, "evaluate.judge_only=true", f"hydra.run.dir={root / 'up'}", cwd=root)
    finally:
        server.shutdown()
    return {"job": job, "down": down, "up": up, "prompts": prompts, "requests": list(FakeJudge.requests)}


def test_a_judge_that_does_not_answer_keeps_the_generations(judged):
    down, out = judged["down"], judged["job"] / "eval" / "alpacaeval2"
    assert down.returncode == 2, down.stderr[-3000:]
    assert "did not answer" in down.stderr and "judge_only=true" in down.stderr and "Traceback" not in down.stderr
    assert "benchmarks.alpacaeval2.judge.base_url" in down.stderr
    assert (out / "model_outputs.json").exists() and list((out / "shards").glob("trained-*.jsonl"))
    assert list((judged["job"] / "eval" / "arena-hard" / "model_answer").glob("*.jsonl"))  # the next benchmark ran


def test_judge_only_rejudges_stored_generations_with_the_fake_endpoint(judged):
    from simpo_exp.inference.sampling import derive_seed

    up, out = judged["up"], judged["job"] / "eval" / "alpacaeval2"
    assert up.returncode == 0, up.stderr[-3000:]

    def expected_rate(ids: list[str], model: list[str], reference: list[str]) -> float:
        """The fake judge's verdicts worked out here: the longer answer wins, on a tie the one shown second."""
        wins = []
        for key, m, r in zip(ids, model, reference):
            model_first = derive_seed("judge-order", key) % 2 == 0
            wins.append(1.0 if len(m) > len(r) else 0.0 if len(m) < len(r) else float(not model_first))
        return 100 * sum(wins) / len(wins)

    outputs = json.loads((out / "model_outputs.json").read_text())
    res = json.loads((out / "results.json").read_text())
    expected = expected_rate([str(i) for i in range(6)], [r["output"] for r in outputs], [r["output"] for r in ALPACA])
    assert res["metrics"]["win_rate"] == pytest.approx(expected)
    assert 0 < expected < 100  # some reference answers are longer than the model's, some shorter
    # the file is not alpaca_eval's 805 rows: said so, not blamed on a max_prompts cut this run did not make
    assert res["metrics"]["lc_win_rate"] is None and any("the prompts file has 6 rows, not" in n for n in res["notes"])
    assert not any("max_prompts" in n for n in res["notes"]), res["notes"]
    assert (
        "not measured: lc_win_rate, lc_standard_error; " in up.stdout and "805" in up.stdout
    )  # said where the user looks, with why
    assert res["judge"] == {
        "kind": "openai",
        "base_url": res["judge"]["base_url"],
        "model": "fake-judge",
    }  # the package annotator's name is recorded for judge.kind=alpaca_eval only
    assert res["win_rate_method"].startswith("this project's pairwise judge")
    # AlpacaEval: one request per prompt; Arena-Hard: two games per question, each replied with a label at once
    assert all(r["model"] == "fake-judge" for r in judged["requests"]) and len(judged["requests"]) == 6 + 2 * 3
    arena = json.loads((judged["job"] / "eval" / "arena-hard" / "results.json").read_text())
    answer_files = (judged["job"] / "eval" / "arena-hard" / "model_answer").glob("*.jsonl")
    answers = [a for f in answer_files for a in read_jsonl(f)]
    model = [a["choices"][0]["turns"][0]["content"] for a in answers]
    by_hand = arena_by_hand(model, ["y" * (10 * i + 5) for i in range(3)])
    assert arena["metrics"]["n"] == 3 and arena["metrics"]["win_rate"] == pytest.approx(
        100 * sum(p for p, _ in by_hand) / sum(n for _, n in by_hand)
    )
    assert arena["metrics"]["unparseable_games"] == 0 and "arena-hard-auto v0.1 score" in arena["win_rate_method"]
    # the score's strong-verdict weight and the reply's length are the judge's record too: compare flags runs
    # judged with another
    recorded = {k: arena["judge"][k] for k in ("model", "strong_weight", "max_tokens")}
    assert recorded == {"model": "fake-judge", "strong_weight": 3, "max_tokens": 4096}
    print(
        f"\nfake judge (prefers the longer answer): AlpacaEval-format WR {res['metrics']['win_rate']:.1f}, "
        f"Arena-Hard score {arena['metrics']['win_rate']:.1f} "
        f"({arena['metrics']['win_rate_ci_low']:.1f}, {arena['metrics']['win_rate_ci_high']:.1f})"
    )


def arena_by_hand(model: list[str], reference: list[str], weight: int = 3) -> list[tuple[float, int]]:
    """Per question (the model's summed battle outcomes, battles) from the fake judge's two verdicts."""
    battle = {"A>>B": (1.0, weight), "A>B": (1.0, 1), "A=B": (0.5, 1), "B>A": (0.0, 1), "B>>A": (0.0, weight)}
    out = []
    for m, r in zip(model, reference):
        a_won_1, n1 = battle[arena_label(r, m)]  # game 1: the baseline is assistant A
        a_won_2, n2 = battle[arena_label(m, r)]  # game 2: the model is assistant A
        out.append(((1 - a_won_1) * n1 + a_won_2 * n2, n1 + n2))
    return out


def test_alpacaeval_outputs_follow_the_package_format(judged):
    path = judged["job"] / "eval" / "alpacaeval2" / "model_outputs.json"
    rows = json.loads(path.read_text())
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in ALPACA]
    assert all(
        set(r) == {"instruction", "output", "generator", "dataset"} and isinstance(r["output"], str) for r in rows
    )
    assert len({r["generator"] for r in rows}) == 1
    res = json.loads((path.parent / "results.json").read_text())
    assert res["versions"]["alpaca-eval"] == _installed("alpaca-eval")


def _installed(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def test_alpacaeval_outputs_load_with_alpaca_eval_itself(judged):
    pytest.importorskip("alpaca_eval", reason="alpaca-eval not installed (pip install -e '.[eval]')")
    from alpaca_eval import utils

    df = utils.load_or_convert_to_dataframe(judged["job"] / "eval" / "alpacaeval2" / "model_outputs.json")
    assert list(df["instruction"]) == [r["instruction"] for r in ALPACA]
    assert utils.get_generator_name(None, df) == df["generator"].iloc[0]


def test_arena_hard_has_a_sample_table_for_wandb(judged):
    """The W&B run got bench/<b>/samples for the rule benchmark and the openai AlpacaEval judge only: Arena-Hard
    writes neither file they read; its answers and the judge's two labels make its table."""
    from simpo_exp.evaluate.wandb_log import sample_rows

    columns, rows = sample_rows(judged["job"], "arena-hard")
    assert columns == ["question_id", "answer", "verdict_baseline_first", "verdict_model_first"]
    assert [r[0] for r in rows] == ["q0", "q1", "q2"] and all(r[1] for r in rows)
    labels = {r[2] for r in rows} | {r[3] for r in rows}
    assert labels and labels <= {"A>>B", "A>B", "A=B", "B>A", "B>>A", "none"}


def test_sample_tables_of_alpaca_evals_own_judge_and_of_unjudged_answers(tmp_path):
    """judge.kind=alpaca_eval writes its annotations where alpaca-eval puts them (results.json's annotations_path)
    and judge.kind=none no verdicts at all: both had no W&B table; the first now shows the package's judged pairs,
    the second the answers."""
    from simpo_exp.evaluate.judge import package_annotations_path
    from simpo_exp.evaluate.wandb_log import sample_rows
    from simpo_exp.inference.files import write_json, write_jsonl

    out = tmp_path / "eval" / "alpacaeval2"
    answers = [{"instruction": f"Say {i}.", "output": f"{i}", "generator": "run", "dataset": "x"} for i in range(3)]
    write_json(out / "model_outputs.json", answers)
    assert sample_rows(tmp_path, "alpacaeval2") == (
        ["instruction", "output", "generator", "dataset"],
        [[a[k] for k in ("instruction", "output", "generator", "dataset")] for a in answers],
    )
    judged = [
        {"instruction": a["instruction"], "output_1": "ref", "output_2": a["output"], "preference": 1.75}
        | {"raw_completion": {"logprobs": []}}
        for a in answers
    ]
    path = package_annotations_path(out / "alpaca_eval", "weighted_alpaca_eval_gpt4_turbo")
    assert path == out / "alpaca_eval" / "weighted_alpaca_eval_gpt4_turbo" / "annotations.json"
    mine = package_annotations_path(out / "alpaca_eval", "my/annotator.yaml")
    assert mine == out / "alpaca_eval" / "annotations.json"
    write_json(path, judged)
    write_json(out / "results.json", {"metrics": {"win_rate": 80.0}, "annotations_path": str(path)})
    stale = [{"instruction": "Say 0.", "annotator": "local-judge", "preference": 2.0}]  # an earlier openai judging's
    write_json(out / "annotations.json", stale)
    columns, rows = sample_rows(tmp_path, "alpacaeval2")
    assert columns == ["instruction", "output_1", "output_2", "preference"] and len(rows) == 3
    assert rows[2] == ["Say 2.", "ref", "2", 1.75]

    arena = tmp_path / "eval" / "arena-hard"
    write_jsonl(
        arena / "model_answer" / "run.jsonl",
        [{"question_id": "q0", "choices": [{"index": 0, "turns": [{"content": "An answer."}]}]}],
    )
    assert sample_rows(tmp_path, "arena-hard") == (["question_id", "answer"], [["q0", "An answer."]])


def test_package_annotations_path_is_where_alpaca_eval_writes(tmp_path):
    pytest.importorskip("alpaca_eval", reason="alpaca-eval not installed (pip install -e '.[eval]')")
    from alpaca_eval import utils

    from simpo_exp.evaluate.judge import package_annotations_path

    for config in ("weighted_alpaca_eval_gpt4_turbo", str(tmp_path / "mine" / "configs.yaml")):
        made = utils.get_output_path(tmp_path / "out", tmp_path / "model_outputs.json", None, annotators_config=config)
        assert package_annotations_path(tmp_path / "out", config) == made / "annotations.json"


def test_arena_hard_answers_follow_arena_hard_auto_format(judged):
    files = list((judged["job"] / "eval" / "arena-hard" / "model_answer").glob("*.jsonl"))
    assert len(files) == 1
    rows = read_jsonl(files[0])
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2"]
    for r in rows:
        assert r["model_id"] == files[0].stem and isinstance(r["tstamp"], float)
        assert r["choices"][0]["index"] == 0 and isinstance(r["choices"][0]["turns"][0]["content"], str)


# ----------------------------------------------------------------------------- Arena-Hard scored as arena-hard-auto
ARENA_CASES = [  # (question, the baseline's answer, the model's answer) for the fake judge's length rule
    ("Explain sorting.", "r" * 10, "m" * 30),  # the model's twice as long: strong wins in both games
    ("Explain hashing.", "r" * 10, "m" * 15),  # slightly longer: slight wins
    ("Explain trees.", "r" * 20, "m" * 20),  # as long: ties
    ("Explain graphs.", "r" * 25, "m" * 5),  # the baseline's 5 times as long: strong losses
    ("Explain heaps (late verdict).", "r" * 12, "m" * 18),  # a label only once the judge is asked to finish
    ("Explain tries (no verdict).", "r" * 5, "m" * 50),  # never a label: both games unparseable
]


class ArenaFakeJudge(FakeJudge):
    requests: list[dict] = []


@pytest.fixture
def arena_judge(tmp_path):
    """The fake endpoint on a free port, and a judging call against it writing under tmp_path."""
    from simpo_exp.evaluate.arena import judge_arena_hard
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), ArenaFakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ArenaFakeJudge.requests.clear()

    def run(texts: list[str], url: str = f"http://127.0.0.1:{port}/v1", **settings) -> dict:
        judge = JudgeConfig(kind="openai", base_url=url, model="org/fake-judge", max_retries=0, timeout_s=5, **settings)
        b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=judge)
        prompts = [{"id": f"q{i}", "instruction": q, "reference": r} for i, (q, r, _) in enumerate(ARENA_CASES)]
        return judge_arena_hard(b, prompts, texts, "my-model", "gpt-4-0314", tmp_path)

    yield run
    server.shutdown()


def test_arena_hard_verdict_labels_are_read_as_arena_hard_auto_reads_them():
    from simpo_exp.evaluate.arena import parse_label, question_outcomes

    assert parse_label("My own answer: ... My final verdict is: [[A>>B]]") == ("A>>B", False)
    assert parse_label("B is slightly better [[B>A]].\n\nFinal verdict: [[B>A]]") == ("B>A", False)
    assert parse_label('My final verdict is tie: [[A=B]]".') == ("A=B", False)
    assert parse_label("[[B<<A]]") == ("B<<A", False)  # a mirrored spelling, as show_result maps it
    assert parse_label("Both are fine; I cannot decide.") == (None, True)  # no label: ask the judge to finish
    assert parse_label("Verdict: [A>B], **B>A**") == (None, True)  # single brackets are no label
    assert parse_label("First [[A>B]], on reflection [[B>A]]") == (None, False)  # two labels: no verdict
    assert parse_label("[[A>>>B]]") == (None, False)  # one label, off the scale
    # game 1 shows the baseline as A, game 2 the model: [[A>>B]] then [[A>B]] is 3 lost battles and 1 won
    assert question_outcomes({"games": [{"score": "A>>B"}, {"score": "A>B"}]}, 3) == (1.0, 4, 0)
    assert question_outcomes({"games": [{"score": "B>>A"}, {"score": None}]}, 3) == (3.0, 3, 1)
    # a tie is half a battle to each side in either game; one game without a verdict leaves one judged game
    assert question_outcomes({"games": [{"score": "B>A"}, {"score": "A=B"}]}, 3) == (1.5, 2, 0)
    assert question_outcomes({"games": [{"score": "B=A"}, {"score": "A<B"}]}, 3) == (0.5, 2, 0)
    # each mirrored spelling is the verdict it mirrors, in either game
    mirrored = {"B<<A": "A>>B", "B<A": "A>B", "B=A": "A=B", "A<B": "B>A", "A<<B": "B>>A"}
    for label, same in mirrored.items():
        for other in ("A>>B", "B>A"):
            games = lambda first: {"games": [{"score": first}, {"score": other}]}  # noqa: E731
            assert question_outcomes(games(label), 3) == question_outcomes(games(same), 3), label


def test_arena_hard_counts_judged_games_and_its_interval_brackets_the_score():
    """A question with one game judged counts one judged game; on 12 questions of mixed verdicts the bootstrap
    interval lies strictly around the win rate (the earlier test's questions gave an upper bound of 100, the same
    for every seed) and moves with the seed."""
    from simpo_exp.evaluate.arena import arena_score

    assert arena_score([{"games": [{"score": "A>B"}, {"score": None}]}], 3, 10, 0)["judged_games"] == 1
    verdicts = ["A>B", "B>A", "A=B", "B>>A", "A>>B"]
    rows = [{"games": [{"score": verdicts[i % 5]}, {"score": verdicts[(3 * i + 1) % 5]}]} for i in range(12)]
    scores = {seed: arena_score(rows, 3, 100, seed) for seed in (42, 43)}
    low, high = scores[42]["win_rate_ci_low"], scores[42]["win_rate_ci_high"]
    assert 0 < low < scores[42]["win_rate"] < high < 100 and scores[42]["win_rate"] == scores[43]["win_rate"]
    assert (low, high) != (scores[43]["win_rate_ci_low"], scores[43]["win_rate_ci_high"])


def test_arena_hard_score_interval_and_judgments_match_arena_hard_auto(arena_judge, tmp_path):
    import numpy as np

    texts = [m for _, _, m in ARENA_CASES]
    res = arena_judge(texts)
    m, reqs = res["metrics"], list(ArenaFakeJudge.requests)
    # by hand, per question (the model's outcomes summed over its battles, battles), strong verdicts 3 battles:
    # [[B>>A]] [[A>>B]] 6 of 6; [[B>A]] [[A>B]] 2 of 2; two ties 1 of 2; [[A>>B]] [[B>>A]] 0 of 6; late 2 of 2
    per_q = [(6.0, 6), (2.0, 2), (1.0, 2), (0.0, 6), (2.0, 2)]
    assert arena_by_hand(texts[:5], [r for _, r, _ in ARENA_CASES[:5]]) == per_q
    assert m["win_rate"] == pytest.approx(100 * 11 / 18)
    assert (m["battles"], m["judged_games"], m["unparseable_games"]) == (18, 10, 2)
    assert "2 of 12 judge replies gave no single verdict label" in res["notes"][0]
    # the interval: 100 resamples of the 5 questions with verdicts (numpy's generator, seed 42), 2.5/97.5 percentiles
    draws = np.random.default_rng(42).integers(0, 5, size=(100, 5))
    rates = [100 * sum(per_q[i][0] for i in d) / sum(per_q[i][1] for i in d) for d in draws]
    assert [m["win_rate_ci_low"], m["win_rate_ci_high"]] == pytest.approx(list(np.percentile(rates, [2.5, 97.5])))
    assert m["win_rate_ci_low"] < m["win_rate"] < m["win_rate_ci_high"]
    # requests: 2 games x 6 questions, plus one follow-up in each game of the late and the label-less question
    assert len(reqs) == 12 + 4 and all(r["max_tokens"] == 4096 and r["temperature"] == 0 for r in reqs)
    follow = [r["messages"] for r in reqs if len(r["messages"]) > 2]
    assert len(follow) == 4 and all(f[2]["role"] == "assistant" for f in follow)
    finish = "continue your judgment and finish by outputting a final verdict label"  # arena-hard-auto's follow-up
    assert all(f[3]["content"] == finish for f in follow)

    path = tmp_path / "model_judgment" / "org_fake-judge" / "my-model.jsonl"
    assert res["judgments_path"] == str(path)
    rows = read_jsonl(path)
    assert [r["question_id"] for r in rows] == [f"q{i}" for i in range(6)]
    for r, (q, ref, out) in zip(rows, ARENA_CASES):
        assert set(r) == {"question_id", "model", "judge", "games"}
        assert (r["model"], r["judge"]) == ("my-model", "org/fake-judge")
        # arena-hard-auto's game record; a game out of replies without a label keeps them too (to go on from them
        # under a larger judge.label_attempts), which its show_result.py, reading the score alone, passes over
        extra = [["replies"] if g["score"] is None else [] for g in r["games"]]
        assert [sorted(g) for g in r["games"]] == [sorted(["judgment", "score", "user_prompt", *e]) for e in extra]
        start = f"<|User Prompt|>\n{q}\n\n<|The Start of Assistant A's Answer|>\n"
        assert r["games"][0]["user_prompt"].startswith(start + ref + "\n")  # game 1: the baseline is A
        assert r["games"][1]["user_prompt"].startswith(start + out + "\n")  # game 2: the model is A
    labels = [["B>>A", "A>>B"], ["B>A", "A>B"], ["A=B", "A=B"], ["A>>B", "B>>A"], ["B>A", "A>B"], [None, None]]
    assert [[g["score"] for g in r["games"]] for r in rows] == labels
    assert rows[4]["games"][0]["judgment"].count("My own answer") == 2  # both replies kept, as arena-hard-auto does

    # a re-run asks nothing again; a changed answer alone is judged again
    assert arena_judge(texts)["metrics"] == m and len(ArenaFakeJudge.requests) == len(reqs)
    changed = arena_judge([texts[0], "m" * 9, *texts[2:]])
    assert len(ArenaFakeJudge.requests) == len(reqs) + 2  # q1's two games; q1 now 0 of 2
    assert changed["metrics"]["win_rate"] == pytest.approx(100 * 9 / 18)
    # an endpoint that does not answer: a clear error, the stored judgments stay
    from simpo_exp.evaluate.judge import JudgeError

    with pytest.raises(JudgeError, match="did not answer.*judge_only=true"):
        arena_judge([texts[0], "m" * 8, *texts[2:]], url=f"http://127.0.0.1:{free_port()}/v1")
    assert len(read_jsonl(path)) == 5  # q1's answer changed: its old judgment no longer holds


def test_the_arena_hard_scores_settings_reach_the_score(arena_judge):
    """judge.strong_weight, bootstrap_rounds and bootstrap_seed change the score and its interval from the stored
    judgments (nothing is asked again), and the method record says which were used."""
    import numpy as np

    texts = [m for _, _, m in ARENA_CASES]
    arena_judge(texts)
    asked = len(ArenaFakeJudge.requests)
    res = arena_judge(texts, strong_weight=1, bootstrap_rounds=20, bootstrap_seed=7)
    m = res["metrics"]
    assert len(ArenaFakeJudge.requests) == asked
    per_q = [(2.0, 2), (2.0, 2), (1.0, 2), (0.0, 2), (2.0, 2)]  # a strong verdict one battle
    assert m["win_rate"] == pytest.approx(70.0) and m["battles"] == 10
    draws = np.random.default_rng(7).integers(0, 5, size=(20, 5))
    rates = [100 * sum(per_q[i][0] for i in d) / sum(per_q[i][1] for i in d) for d in draws]
    assert [m["win_rate_ci_low"], m["win_rate_ci_high"]] == pytest.approx(list(np.percentile(rates, [2.5, 97.5])))
    assert "weighted 1," in res["win_rate_method"] and "from 20 bootstrap rounds" in res["win_rate_method"]
    assert "(seed 7;" in res["win_rate_method"]


def test_two_player_bradley_terry_fit_is_the_battles_mean_outcome():
    """arena-hard-auto's fit (logistic regression over the battles, each tie one win and one loss of two
    copies) gives the model's win rate against the baseline equal to the closed form used here."""
    pytest.importorskip("sklearn")
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from simpo_exp.evaluate.arena import arena_score

    rows = [{"games": [{"score": a}, {"score": b}]} for a, b in [("B>>A", "A>>B"), ("B>A", "A=B"), ("A>>B", "B>A")]]
    outcomes = [1.0] * 6 + [1.0, 0.5] + [0.0] * 4  # the model's battles, a strong verdict's 3 times
    x = np.tile([[1.0, -1.0]], (2 * len(outcomes), 1))  # columns: model, baseline (model plays first)
    y = np.array([o >= 0.5 for o in outcomes] + [o > 0.5 for o in outcomes], dtype=float)  # a tie: one win, one loss
    fit = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-10).fit(x, y)
    bt = 100 / (1 + np.exp(-(fit.coef_[0][0] - fit.coef_[0][1])))
    score = arena_score(rows, weight=3, rounds=10, seed=0)
    assert score["win_rate"] == pytest.approx(100 * 7.5 / 12) and bt == pytest.approx(score["win_rate"], abs=1e-4)


# ----------------------------------------------------------------------------- bad input
def test_a_run_without_a_trained_model_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    res = evaluate(str(run), "benchmark=rule", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path)
    assert res.returncode == 2 and "no trained model" in res.stderr and "Traceback" not in res.stderr


def test_an_unknown_benchmark_is_refused(tmp_path):
    res = evaluate(str(tmp_path), "benchmark=[rule,nope]", cwd=tmp_path)
    assert res.returncode == 2 and "unknown benchmark 'nope'" in res.stderr and "alpacaeval2" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_benchmark_preset_in_the_users_own_config_dir_is_composed(tmp_path):
    """A preset of --config-dir was refused as an unknown benchmark (the name check read the package's conf/ only),
    and the run directory had to be the first argument (after --config-dir: Hydra's "missing EQUAL")."""
    presets = tmp_path / "myconf" / "benchmark"
    presets.mkdir(parents=True)
    (presets / "mysort.yaml").write_text(
        "# @package benchmarks.mysort\nname: mysort\nkind: alpacaeval\nprompts_path: ???\n"
    )
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    given = ["--config-dir", str(tmp_path / "myconf"), str(run)]
    res = evaluate(*given, "benchmark=mysort", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path)
    assert res.returncode == 2 and "benchmarks.mysort.prompts_path=" in res.stderr, res.stderr
    res = evaluate(*given, "benchmark=[mysort,nope]", cwd=tmp_path)
    assert res.returncode == 2 and "unknown benchmark 'nope'" in res.stderr and "mysort, rule" in res.stderr


def test_a_run_directory_that_is_not_there_is_named(tmp_path):
    res = evaluate(str(tmp_path / "outputs" / "nope"), "benchmark=rule", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "evaluate.path=" in res.stderr and "no such directory" in res.stderr and "missing EQUAL" not in res.stderr


def test_missing_prompt_files_are_named(sweep, tmp_path):
    job = str(jobs(sweep)[0])
    res = evaluate(job, "benchmark=alpacaeval2", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert res.returncode == 2 and "benchmarks.alpacaeval2.prompts_path" in res.stderr and "Traceback" not in res.stderr
    missing = tmp_path / "nowhere" / "alpaca_eval.json"
    res = evaluate(
        job,
        "benchmark=alpacaeval2",
        f"benchmarks.alpacaeval2.prompts_path={missing}",
        f"hydra.run.dir={tmp_path / 'b'}",
        cwd=tmp_path,
    )
    assert res.returncode == 2 and str(missing) in res.stderr and "no such file" in res.stderr
    assert "Traceback" not in res.stderr
    # the second benchmark's file: named before the first benchmark runs on any run (it generated first)
    run = tmp_path / "run"
    shutil.copytree(job, run, ignore=shutil.ignore_patterns("eval"))
    res = evaluate(
        str(run),
        "benchmark=[rule,alpacaeval2]",
        f"benchmarks.alpacaeval2.prompts_path={missing}",
        f"hydra.run.dir={tmp_path / 'c'}",
        cwd=tmp_path,
    )
    assert res.returncode == 2 and str(missing) in res.stderr and not (run / "eval" / "rule").exists()


def test_a_run_whose_eval_folder_cannot_be_written_is_named(sweep, tmp_path):
    """Another user's run on shared storage (here: eval/ a plain file, which root cannot write into either): named
    before any benchmark runs; it stopped with a traceback after a warning that its lock could not be taken."""
    run = tmp_path / "theirs"
    shutil.copytree(jobs(sweep)[0], run, ignore=shutil.ignore_patterns("eval"))
    (run / "eval").write_text("")
    res = evaluate(str(run), "benchmark=rule", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{run / 'eval'} cannot be written" in res.stderr


def test_gsm8k_without_lm_eval_says_what_to_install(sweep, tmp_path):
    if _installed("lm-eval"):
        pytest.skip("lm-eval is installed here; the message is for machines without it")
    run = tmp_path / "run"  # after another benchmark: said before that one runs (it was said at gsm8k's turn)
    shutil.copytree(jobs(sweep)[0], run, ignore=shutil.ignore_patterns("eval"))
    res = evaluate(str(run), "benchmark=[rule,gsm8k]", f"hydra.run.dir={tmp_path / 'g'}", cwd=tmp_path)
    assert res.returncode == 2 and "pip install lm-eval" in res.stderr and "Traceback" not in res.stderr
    assert not (run / "eval" / "rule").exists()


def test_a_bad_value_names_its_key(tmp_path):
    res = evaluate(str(tmp_path), "benchmarks.rule.decoding.top_p=2", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert res.returncode == 2 and "benchmarks.rule.decoding.top_p=2" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- shared pieces
def test_model_card_front_matter_is_what_the_hub_parses(tmp_path):
    from huggingface_hub import ModelCard

    from simpo_exp.inference.files import write_json
    from simpo_exp.modelcard import push_model, write_model_card

    record = {
        "metrics": {"win_rate": 41.5, "standard_error": 17.4, "lc_win_rate": None, "n": 8, "unparseable_verdicts": 1}
    }
    record["metrics"] |= {"unjudged": 2}  # answers the judge gave no verdict on: a counter, not a result
    record |= {"dataset_name": "AlpacaEval 2", "baseline": "gpt4_turbo", "judge": {"kind": "openai", "model": "j"}}
    record |= {"notes": ["LC needs the alpaca-eval package"]}
    write_json(tmp_path / "eval" / "alpacaeval2" / "results.json", record)
    cfg = {
        "model": {"name": "llama3-8b-instruct", "path": "meta-llama/Meta-Llama-3-8B-Instruct"},
        "beta": 2.5,
        "dataset": {"name": "x", "sources": {"uf": {"path": "princeton-nlp/llama3-ultrafeedback"}}},
    }
    card = ModelCard.load(write_model_card(tmp_path, cfg, "my-run"))
    assert card.data.base_model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert card.data.datasets == ["princeton-nlp/llama3-ultrafeedback"]
    moved = {**cfg, "dataset": {"name": "local", "sources": {"local": {"path": "data/prefs.jsonl"}}}}
    assert ModelCard.load(write_model_card(tmp_path, moved, "my-run")).data.datasets is None  # a file, not a repo
    # local folders no longer there (cleaned away, another machine): absolute paths, no repo ids for the hub
    gone = {"model": {"name": "m", "path": "/scratch/models/llama3-sft"}}
    gone |= {"dataset": {"name": "local", "sources": {"local": {"path": "/scratch/data/prefs_dir"}}}}
    data = ModelCard.load(write_model_card(tmp_path, {**cfg, **gone}, "my-run")).data
    assert data.base_model is None and data.datasets is None
    # the model's results only (not the counters), named with how they were made: 8 prompts and a local judge make
    # AlpacaEval-format figures, not the leaderboard's
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("alpacaeval2", "win_rate", 41.5)
    ]
    assert card.data.eval_results[0].dataset_name == "AlpacaEval 2 (judge j, baseline gpt4_turbo, 8 prompts)"
    # the starting model's figures and the other counters (token lengths, cut answers, games judged, lm-eval's
    # samples) are not this model's results either
    rule = {"win_rate": 60.0, "avg_tokens": 9.5, "score_start": 0.2, "exact_start": 0.0, "cut_at_max_new_tokens": 1}
    write_json(tmp_path / "eval" / "rule" / "results.json", {"metrics": rule, "dataset_name": "Sorting"})
    arena = {"win_rate": 30.0, "win_rate_ci_low": 12.5, "win_rate_ci_high": 50.0, "judged_games": 10, "battles": 18}
    arena |= {"unjudged_games": 0}
    write_json(tmp_path / "eval" / "arena-hard" / "results.json", {"metrics": arena, "dataset_name": "Arena-Hard"})
    lm = {"gsm8k/exact_match:strict-match": 0.25, "gsm8k/exact_match_stderr:strict-match": 0.1, "gsm8k/n": 1319}
    write_json(tmp_path / "eval" / "gsm8k" / "results.json", {"metrics": lm, "dataset_name": "GSM8K"})
    card = ModelCard.load(write_model_card(tmp_path, cfg, "my-run"))
    assert [r.dataset_name for r in card.data.eval_results] == [
        "AlpacaEval 2 (judge j, baseline gpt4_turbo, 8 prompts)",
        "Arena-Hard",
        "GSM8K",
        "Sorting",  # its data set's name, where no judge or baseline says more
    ]
    assert [r.metric_type for r in card.data.eval_results] == [
        "win_rate",
        "win_rate",
        "gsm8k/exact_match:strict-match",
        "win_rate",
    ]
    assert "| alpacaeval2 | lc_win_rate |" not in card.text and "LC needs the alpaca-eval package" in card.text
    # the standard errors and interval bounds sit beside their results in the card's table, not among the results
    assert (
        "| arena-hard | win_rate_ci_low | 12.5 |" in card.text
        and "| alpacaeval2 | standard_error | 17.4 |" in card.text
    )
    assert push_model(tmp_path, "someone/model", token_env="SIMPO_EXP_TEST_NO_SUCH_TOKEN") is None  # no token: no push
    # a NaN or a flag is no result the hub's metadata check takes (YAML's .nan): in the table, not the model-index
    odd = {"metrics": {"win_rate": float("nan"), "all_judged": True, "score": 0.5}, "dataset_name": "Odd"}
    write_json(tmp_path / "eval" / "odd" / "results.json", odd)
    card = ModelCard.load(write_model_card(tmp_path, cfg, "my-run"))
    assert [r.metric_type for r in card.data.eval_results if r.dataset_type == "odd"] == ["score"]
    (tmp_path / "eval" / "odd" / "results.json").unlink()
    assert card.data.tags[0] == "simpo"  # the method trained (no method key: the default)
    # lm-eval cut by a limit: its samples per task (a float in lm-eval's results) named, as a judge's prompts are;
    # and a DPO baseline is tagged dpo, not simpo
    cut = {"metrics": {**lm, "gsm8k/n": 2.0}, "dataset_name": "GSM8K", "lm_eval": {"limit": 2}}
    write_json(tmp_path / "eval" / "gsm8k" / "results.json", cut)
    card = ModelCard.load(write_model_card(tmp_path, {**cfg, "method": "dpo"}, "my-run"))
    assert "GSM8K (2 prompts)" in [r.dataset_name for r in card.data.eval_results]
    assert card.data.tags[0] == "dpo" and "simpo" not in card.data.tags


def test_model_card_recipe_holds_the_values_the_run_used(tmp_path):
    """The learning rate resolved from the model's size and the accumulation for the global batch, as the run's
    summary.json recorded them, over the config's own (None; tiny's 1); the method by its key."""
    from simpo_exp.inference.files import write_json
    from simpo_exp.modelcard import write_model_card

    summary = {"resolved/learning_rate": 0.001, "resolved/gradient_accumulation_steps": 2}
    summary |= {"precision/master_weights_dtype": "float32", "precision/autocast_dtype": "bfloat16"}
    write_json(tmp_path / "summary.json", summary)
    cfg = {
        "method": "dpo",
        "beta": 0.1,
        "learning_rate": None,
        "gradient_accumulation_steps": 1,
        "model": {"name": "t", "path": "org/base", "revision": "0123abc"},
        "weight_decay": 0.05,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-08,
        "max_grad_norm": 0.5,
    }
    text = write_model_card(tmp_path, cfg, "run").read_text()
    for row in ("| `method` | dpo |", "| `learning_rate` | 0.001 |", "| `gradient_accumulation_steps` | 2 |"):
        assert row in text, text
    # the optimizer's settings and the dtypes it trained in: a card without them read like the defaults'
    rows = ["| `weight_decay` | 0.05 |", "| `adam_beta2` | 0.95 |", "| `max_grad_norm` | 0.5 |"]
    rows += ["| `adam_beta1` | 0.9 |", "| `adam_epsilon` | 1e-08 |"]
    for row in rows:
        assert row in text, text
    assert (
        "| `precision/master_weights_dtype` | float32 |" in text and "| `precision/autocast_dtype` | bfloat16 |" in text
    )
    assert "from org/base at revision `0123abc` on" in text  # the commit it trained from (base_model cannot say)
    random = {**cfg, "model": {"name": "t", "path": None, "revision": "v1"}}  # built from config: no revision to name
    assert "at revision" not in write_model_card(tmp_path, random, "run").read_text()
    # pairs the generate stage made (local files the metadata cannot name): the policy and scorer they came from
    made = {"created_by": "simpo_exp.generate", "file": "/g/data/provenance.json", "binarise": {"mode": "best_worst"}}
    made |= {"policy": {"path": "/r0/model", "fingerprint": {"kind": "local", "sha256": "ef74fdae691a73af"}}}
    made |= {"generate": {"seeds": [13, 21], "samples_per_seed": 2, "temperature": 0.8, "top_p": 0.95}}
    made |= {"scorer": {"name": "armorm", "path": "RLHFlow/ArmoRM-Llama3-8B-v0.1"}}
    made["generate"]["max_new_tokens"] = 4096
    write_json(tmp_path / "data_report.json", {"sources": {"local": {"provenance": made}, "other": {"train_rows": 3}}})
    text = write_model_card(tmp_path, cfg, "run").read_text()
    assert (
        "Data source `local`: on-policy pairs from simpo-exp's generate stage, sampled from /r0/model (weights "
        "ef74fdae691a) with 2 seeds x 2 at temperature 0.8, top_p 0.95, up to 4096 new tokens, scored by "
        "RLHFlow/ArmoRM-Llama3-8B-v0.1, binarised best_worst (its provenance.json: /g/data/provenance.json)."
    ) in text and "`other`" not in text
    cfg["model"] = {"name": "t"}
    # the keys the method's loss reads, not another method's: DPO has no margin, AlphaPO its alpha
    assert "gamma_beta_ratio" not in text and "| `beta` | 0.1 |" in text
    own = {**cfg, "method": "alphapo", "gamma_beta_ratio": 0.5, "alphapo_alpha": 0.25}
    text = write_model_card(tmp_path, own, "run").read_text()
    assert all(row in text for row in ("| `gamma_beta_ratio` | 0.5 |", "| `alphapo_alpha` | 0.25 |")), text
    # SimPO's margin as it trained, beta x gamma_beta_ratio, beside the ratio
    simpo = {**cfg, "method": "simpo", "beta": 2.5, "gamma_beta_ratio": 0.55}
    text = write_model_card(tmp_path, simpo, "run", resolved={"gamma": 1.375}, training={}).read_text()
    assert "| `gamma_beta_ratio` | 0.55 |" in text and "| `gamma` | 1.375 |" in text, text
    # dataset=[ultrafeedback-binarized,local] keeps the last preset's name: a mixture is named by its sources
    mixture = {"name": "local", "sources": {"ultrafeedback": {"path": "a"}, "local": {"path": "b"}}}
    text = write_model_card(tmp_path, {**cfg, "dataset": mixture}, "run").read_text()
    assert "on ultrafeedback, local." in text and "dataset preset" not in text
    # the official recipe's empty system turn, which the saved template does not add, is said (and only there)
    assert "empty system turn" not in text
    official = {**cfg, "dataset": {**mixture, "chat_format": "simpo_repo"}}
    card = write_model_card(tmp_path, official).read_text()
    assert 'start the messages with `{"role": "system", "content": ""}`' in card
    from omegaconf import OmegaConf

    from tests.conftest import CONF

    mix = OmegaConf.to_container(OmegaConf.load(CONF / "dataset" / "ultrafeedback-mix.yaml"))  # one preset, 2 sources
    text = write_model_card(tmp_path, {**cfg, "dataset": mix}, "run").read_text()
    assert "(dataset preset `ultrafeedback-mix`)" in text
    mine = {"name": "mine", "sources": {"mine": {"path": "d.jsonl"}}}  # one source: its preset, whatever its file
    assert "(dataset preset `mine`)" in write_model_card(tmp_path, {**cfg, "dataset": mine}, "run").read_text()
    assert "LoRA" not in text
    # a LoRA run: the card says its weights are the merge, and where the adapter alone is
    lora = {"lora": True, "lora_r": 8, "lora_alpha": 16, "lora_target_modules": ["q_proj", "v_proj"]}
    text = write_model_card(tmp_path, {**cfg, "hardware": lora}, "run").read_text()
    assert "Trained with LoRA adapters (rank 8, alpha 16, on ['q_proj', 'v_proj'])" in text
    assert "the adapters merged in, stored in float32" in text and "`adapter/`" in text
    assert "its base is the random initialisation, stored nowhere" in text  # the tiny model: its adapter has no base
    hub = {**cfg, "hardware": lora, "model": {"name": "t", "path": "org/base"}}
    assert "stored nowhere" not in write_model_card(tmp_path, hub, "run").read_text()
    text = write_model_card(tmp_path, {**cfg, "hardware": lora, "save_dtype": "bfloat16"}, "run").read_text()
    assert "stored in bfloat16 (save_dtype" in text and "stored in float32" not in text  # as its files hold them


def test_model_card_carries_the_base_models_licence_the_runs_own_figures_and_no_unused_epochs(tmp_path):
    """A Llama or Gemma derivative pushed with the card showed no licence; the run's own held-out accuracy was not
    in it until evaluate ran; and `num_train_epochs | 1.0` stood beside the max_steps that ended the run."""
    from huggingface_hub import ModelCard

    from simpo_exp.inference.files import write_json
    from simpo_exp.modelcard import write_model_card

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n---\n# base\n")
    run = tmp_path / "run"
    write_json(run / "summary.json", {"eval/rewards/accuracies": 0.7512, "eval/loss": 0.5, "train/global_step": 10})
    cfg = {"model": {"name": "m", "path": str(base)}, "num_train_epochs": 1.0, "max_steps": 10, "beta": 2.0}
    card = ModelCard.load(write_model_card(run, cfg, "run"))
    assert (card.data.license, card.data.license_name, card.data.license_link) == ("other", "llama3", "LICENSE")
    assert not (run / "model" / "LICENSE").exists()  # none in the base folder to ship
    # a licence file the base's card links to goes beside the derivative's card (the link was dead on the hub)
    (base / "LICENSE").write_text("META LLAMA 3 COMMUNITY LICENSE")
    write_model_card(run, cfg, "run")
    assert (run / "model" / "LICENSE").read_text() == "META LLAMA 3 COMMUNITY LICENSE"
    assert "| eval/rewards/accuracies | 0.7512 |" in card.text and "| train/global_step | 10 |" in card.text
    assert "| `max_steps` | 10 |" in card.text and "num_train_epochs" not in card.text
    # by epochs: the epochs row, no max_steps; a base model without a card of its own: no licence, no error
    card = ModelCard.load(write_model_card(run, {**cfg, "model": {"name": "t"}, "max_steps": -1}, "run"))
    assert "| `num_train_epochs` | 1.0 |" in card.text and "max_steps" not in card.text and card.data.license is None


def test_the_evaluate_stages_card_keeps_the_origin_the_training_card_read(tmp_path, monkeypatch):
    """A relative local ``model.path`` (``sft/final``) is no hub id where training ran; the evaluate stage, run from
    another folder, rewrote the card with ``base_model: sft/final`` (an unrelated or missing hub repo) and dropped
    the base's licence, which it could no longer read."""
    from huggingface_hub import ModelCard

    from simpo_exp.modelcard import write_model_card

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft" / "final").mkdir(parents=True)
    (tmp_path / "sft" / "final" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    cfg = {"model": {"name": "m", "path": "sft/final"}, "max_steps": 10, "beta": 2.0}
    run = tmp_path / "run"
    card = ModelCard.load(write_model_card(run, cfg, "run", resolved={}, training={}))  # as training writes it
    assert card.data.base_model is None and card.data.license == "apache-2.0"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # evaluate, started in another folder
    card = ModelCard.load(write_model_card(run, cfg, "run", rewrite=True))
    assert card.data.base_model is None and card.data.license == "apache-2.0"


def test_each_sweep_job_is_pushed_to_a_valid_repo_of_its_own():
    """Job directories hold '=' and ',' and run past the Hub's 96 characters: each job's repo name is made valid
    (the Hub refused them before any upload) and two long names that differ only at the end stay apart."""
    from huggingface_hub.utils import validate_repo_id

    from simpo_exp.modelcard import job_repo_id

    long = "0_dataset.synthetic.num_test=16,dataset.synthetic.num_train=64,eval_on_start=False,logger=none,max_steps="
    repos = [job_repo_id("user/name", job) for job in ("0_beta=5,gamma_beta_ratio=0.3", long + "2", long + "3")]
    for repo in repos:
        validate_repo_id(repo)
        assert repo.startswith("user/name-") and len(repo.split("/")[1]) <= 96
    assert repos[0] == "user/name-0_beta-5-gamma_beta_ratio-0.3" and repos[1] != repos[2]


def test_the_stage_imports_no_other_stage():
    code = (
        "import sys, simpo_exp.evaluate.__main__, simpo_exp.evaluate.run; "
        "bad = [m for m in ('simpo_exp.train', 'simpo_exp.generate', 'simpo_exp.compare', 'simpo_exp.dashboard') "
        "if m in sys.modules]; assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_compare_pools_evaluation_numbers_over_seeds(tmp_path):
    """Runs that differ only by seed: compare's seed groups give mean and spread of a benchmark's win rate."""
    from simpo_exp.compare import load_runs, runs_table, seed_groups
    from simpo_exp.inference.files import write_json

    rates = {("2", "1"): 40.0, ("2", "2"): 50.0, ("5", "1"): 70.0, ("5", "2"): 80.0}
    for i, ((beta, seed), rate) in enumerate(rates.items()):
        run = tmp_path / f"{i}_beta={beta},seed={seed}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- beta={beta}\n- seed={seed}\n")
        write_json(run / "summary.json", {"eval/rewards/accuracies": 0.5})
        write_json(run / "eval" / "rule" / "results.json", {"metrics": {"win_rate": rate, "n": 32}})
    runs = load_runs(tmp_path)
    groups = seed_groups(runs, "bench/rule/win_rate")
    assert [(g["beta"], g["seeds"], g["bench/rule/win_rate mean"]) for g in groups] == [("5", 2, 75.0), ("2", 2, 45.0)]
    assert groups[0]["std"] == pytest.approx(7.0710678) and groups[0]["min"] == 70.0
    table = runs_table(runs, "bench/rule/win_rate")
    assert [row["bench/rule/win_rate"] for row in table] == [80.0, 70.0, 50.0, 40.0]


def test_rule_ties_count_half_and_annotations_put_the_baseline_first():
    """The rule benchmark's equal scores (both answers sorted right, a common case) are a tie worth half a win, as
    alpaca-eval counts its ties; annotations hand alpaca-eval the baseline as output_1 and the model as output_2,
    the order its length-controlled model reads the length difference in (preference 2.0: output_2 won)."""
    from simpo_exp.evaluate.judge import annotations, rule_preferences, standard_error, win_rate

    prompt = {"id": "0", "instruction": "sort: 3 1 2", "reference": "R"}
    (tie,) = rule_preferences([prompt], ["1 2 3"], ["1 2 3"])
    assert tie["score_model"] == tie["score_baseline"] and tie["preference"] == 1.5
    won, lost = rule_preferences([prompt, prompt], ["1 2 3", "3 2 1"], ["3 2 1", "1 2 3"])
    assert (won["preference"], lost["preference"]) == (2.0, 1.0)  # 2.0: the model (output_2) sorted better
    assert win_rate([2.0, 1.5, 1.0]) == 50.0 and win_rate([1.5]) == 50.0
    # alpaca-eval's standard error: deviations 0.5, 0, -0.5 -> sample variance 0.25, over n = 3 -> sqrt(1/12)
    assert standard_error([2.0, 1.5, 1.0]) == pytest.approx(100 * (1 / 12) ** 0.5) and standard_error([1.5]) is None
    assert standard_error([1.0, 2.0, 1.5, 2.0, 2.0]) == pytest.approx(20.0)  # alpaca-eval 0.6.6's get_winrate gives 20
    (row,) = annotations([prompt], ["M"], [{"preference": 2.0}], "gen", "ref", "judge")
    assert (row["output_1"], row["generator_1"], row["output_2"], row["generator_2"]) == ("R", "ref", "M", "gen")


def test_win_rate_matches_alpaca_eval_and_lc_says_why_it_is_missing(monkeypatch):
    """Our win rate equals alpaca-eval's own on the same verdicts (ties half); offline, LC is null with a reason."""
    pytest.importorskip("alpaca_eval", reason="alpaca-eval not installed (pip install -e '.[eval]')")
    from alpaca_eval.metrics import get_winrate

    from simpo_exp.evaluate.judge import ALPACA_EVAL_ROWS, annotations, length_controlled, standard_error, win_rate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prefs = [(1.0, 2.0, 1.5)[i % 3] if i % 7 else 2.0 for i in range(ALPACA_EVAL_ROWS)]
    prompts = [{"id": str(i), "instruction": f"q{i}", "reference": "r" * (i % 50 + 1)} for i in range(ALPACA_EVAL_ROWS)]
    rows = annotations(
        prompts,
        ["m" * (i % 40 + 1) for i in range(ALPACA_EVAL_ROWS)],
        [{"preference": p} for p in prefs],
        "model",
        "gpt4_1106_preview",
        "judge",
    )
    theirs = get_winrate(rows)
    assert win_rate(prefs) == pytest.approx(theirs["win_rate"])
    assert standard_error(prefs) == pytest.approx(theirs["standard_error"])
    lc, why = length_controlled(rows, ALPACA_EVAL_ROWS)
    if lc["lc_win_rate"] is None:  # its GLM needs df_gamed.csv from the hub: not cached on an offline machine
        assert "df_gamed.csv" in why and lc["lc_standard_error"] is None
    else:
        assert 0.0 <= lc["lc_win_rate"] <= 100.0 and 0.0 < lc["lc_standard_error"] < 5.0
    lc, why = length_controlled(rows[:10], ALPACA_EVAL_ROWS)
    assert lc == {"lc_win_rate": None, "lc_standard_error": None} and why.endswith("judged 10 of them (max_prompts)")


def test_lc_says_whether_the_set_was_cut_or_is_another_file(tmp_path):
    """No LC win rate off the whole 805-row set, and the note names why: a max_prompts cut, or a prompts file of
    another size (which the note blamed on max_prompts, with none set)."""
    from simpo_exp.evaluate.benchmarks import alpaca_prompts
    from simpo_exp.evaluate.judge import length_controlled

    # the set's size is the file's, before max_prompts: what the note compares with alpaca_eval's 805
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(12)]))
    prompts, info = alpaca_prompts(str(path), "benchmarks.b.prompts_path", 5)
    assert len(prompts) == 5 and info["rows"] == 12

    rows = [{"preference": 2.0}] * 10
    lc, why = length_controlled(rows, 805)
    assert lc["lc_win_rate"] is None and why.endswith("this evaluation judged 10 of them (max_prompts)")
    lc, why = length_controlled(rows, 10)
    assert lc["lc_win_rate"] is None and why.endswith("the prompts file has 10 rows, not alpaca_eval's 805")


def test_a_hub_bases_relative_licence_link_points_at_its_own_repo(tmp_path, monkeypatch):
    """``license_link: LICENSE`` names a file of the base's repo; copied as it was, it pointed into the derivative's
    repo, where there is none."""
    from simpo_exp.modelcard import base_license

    card = tmp_path / "README.md"
    card.write_text("---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n---\n# base\n")
    monkeypatch.setattr("simpo_exp.hub.cached_hub_file", lambda repo, name: card)
    assert base_license("meta-llama/Meta-Llama-3-8B")["license_link"] == (
        "https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/LICENSE"
    )
    # a leading "./" is the repo's root; a folder whose name starts with a dot keeps it
    for link, path in (("./LICENSE.txt", "LICENSE.txt"), (".github/LICENSE", ".github/LICENSE")):
        card.write_text(f"---\nlicense: other\nlicense_name: llama3\nlicense_link: {link}\n---\n# base\n")
        assert base_license("org/base")["license_link"] == f"https://huggingface.co/org/base/blob/main/{path}"
    # not in the cache (transformers fetched the weights, never the card): fetched where the hub can be reached
    import huggingface_hub

    monkeypatch.setattr("simpo_exp.hub.cached_hub_file", lambda repo, name: None)
    monkeypatch.setattr("simpo_exp.hub.hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(card))
    assert base_license("org/base")["license_name"] == "llama3"
    monkeypatch.setattr("simpo_exp.hub.hub_reachable", lambda: False)  # offline: nothing asked, no licence
    assert base_license("org/base") == {}


def fake_hub(monkeypatch) -> tuple[list, list, type]:
    """huggingface_hub's HfApi stood in, its token read from $SIMPO_EXP_TEST_PUSH_TOKEN ("secret"): the repos created
    (id, private), the folders uploaded (path, repo id), and the stand-in class (to make a call of it fail)."""
    import types

    import huggingface_hub

    created, uploaded = [], []

    class FakeApi:
        def __init__(self, token):
            assert token == "secret"

        def create_repo(self, repo_id, private=False, exist_ok=False):
            created.append((repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message=""):
            uploaded.append((folder_path, repo_id))
            return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("SIMPO_EXP_TEST_PUSH_TOKEN", "secret")
    return created, uploaded, FakeApi


def test_evaluate_pushes_each_sweep_job_to_a_private_repo_of_its_own(tmp_path, monkeypatch, caplog):
    """evaluate.push_to_hub=true: a sweep's jobs go each to ``<hub_repo>-<job>`` (one repo for all kept only the last
    job's model), a single run to ``hub_repo`` itself, and every repo is created private."""
    import types

    from simpo_exp.evaluate.run import _finish_run

    created, uploaded, FakeApi = fake_hub(monkeypatch)
    sweep = tmp_path / "sweep"
    runs = [sweep / "0_beta=2", sweep / "1_beta=5"]
    for r in runs:
        (r / ".hydra").mkdir(parents=True)
        (r / ".hydra" / "config.yaml").write_text("{}\n")
    e = types.SimpleNamespace(
        model_card=False, push_to_hub=True, hub_repo="me/simpo", hub_token_env="SIMPO_EXP_TEST_PUSH_TOKEN", path=""
    )
    for r in runs:
        _finish_run(r, r, None, types.SimpleNamespace(**{**vars(e), "path": str(sweep)}), r.name)
    _finish_run(runs[0], runs[0], None, types.SimpleNamespace(**{**vars(e), "path": str(runs[0])}), runs[0].name)
    assert created == [("me/simpo-0_beta-2", True), ("me/simpo-1_beta-5", True), ("me/simpo", True)]
    assert uploaded == [(str(r / "model"), repo) for r, (repo, _) in zip([*runs, runs[0]], created)]
    # a job of a --multirun over run folders sees one run: it too gets a repo of its own (each pushed over the last)
    from simpo_exp import runinfo

    monkeypatch.setattr(runinfo, "this_sweeps_keys", lambda: frozenset({"benchmarks.rule.max_prompts"}))
    _finish_run(runs[1], runs[1], None, types.SimpleNamespace(**{**vars(e), "path": str(runs[1])}), runs[1].name)
    assert created[-1] == ("me/simpo", True)  # a sweep over another key: this job's run is the one evaluated
    monkeypatch.setattr(runinfo, "this_sweeps_keys", lambda: frozenset({"evaluate.path"}))
    _finish_run(runs[1], runs[1], None, types.SimpleNamespace(**{**vars(e), "path": str(runs[1])}), runs[1].name)
    assert created[-1] == ("me/simpo-1_beta-5", True)

    def refused(self, repo_id, private=False, exist_ok=False):
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(FakeApi, "create_repo", refused)  # said, and the next run goes on (it was a traceback)
    with caplog.at_level("ERROR", logger="simpo_exp.evaluate.run"):
        _finish_run(runs[0], runs[0], None, types.SimpleNamespace(**{**vars(e), "path": str(sweep)}), runs[0].name)
    assert "failed (RuntimeError: 401 Unauthorized); the results are kept" in caplog.text


def test_the_card_training_writes_carries_the_figures_it_is_given(tmp_path):
    """Training writes the card before its summary.json: the held-out figures it hands over are the card's, not
    those of a summary.json left from an earlier finish (or none)."""
    from simpo_exp.inference.files import write_json
    from simpo_exp.modelcard import write_model_card

    write_json(tmp_path / "summary.json", {"eval/loss": 9.9, "train/global_step": 1})  # an earlier finish's
    cfg = {"model": {"name": "t"}, "beta": 2.0}
    text = write_model_card(tmp_path, cfg, "run", resolved={}, training={"eval/loss": 0.5, "train/global_step": 10})
    text = text.read_text()
    assert "| eval/loss | 0.5 |" in text and "| train/global_step | 10 |" in text and "9.9" not in text


def test_arena_hard_sample_table_keeps_each_games_verdict_in_its_own_column(tmp_path):
    """Game 1 shows the baseline's answer first, game 2 the model's: each label goes to its own column, and a
    judgment with other than two games is left out."""
    from simpo_exp.evaluate.wandb_log import sample_rows
    from simpo_exp.inference.files import write_json, write_jsonl

    arena = tmp_path / "eval" / "arena-hard"
    answer = {"question_id": "q0", "choices": [{"index": 0, "turns": [{"content": "An answer."}]}]}
    write_jsonl(arena / "model_answer" / "run.jsonl", [answer, answer | {"question_id": "q1"}])
    judgments = arena / "model_judgment" / "judge" / "run.jsonl"
    write_jsonl(
        judgments,
        [
            {"question_id": "q0", "games": [{"score": "A>>B"}, {"score": None}]},
            {"question_id": "q1", "games": [{"score": "B>A"}]},  # one game: no row
        ],
    )
    write_json(arena / "results.json", {"metrics": {"score": 50.0}, "judgments_path": str(judgments)})
    assert sample_rows(tmp_path, "arena-hard") == (
        ["question_id", "answer", "verdict_baseline_first", "verdict_model_first"],
        [["q0", "An answer.", "A>>B", "none"]],
    )


def test_wandb_mode_from_the_environment_wins_over_the_runs_recorded_mode(tmp_path, monkeypatch):
    """WANDB_MODE is the user's word: an online run's evaluation stays offline (or off) when it says so."""
    import wandb

    from simpo_exp.evaluate import wandb_log
    from simpo_exp.inference.files import write_json

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_log.wandb_mode("online") == "offline"
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs))
    write_json(tmp_path / "wandb_run.json", {"id": "abc123", "project": "p", "group": "g", "mode": "online"})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_log.log_results(tmp_path, ["rule"]) is False and calls == []  # nothing opened, nothing sent


def test_an_online_evaluation_whose_wandb_start_fails_logs_offline_instead(tmp_path, monkeypatch):
    """Training falls back to an offline record when its online start fails; the evaluation of the same run warned
    and sent nothing, so its numbers reached W&B only by hand."""
    import wandb

    from simpo_exp.evaluate import wandb_log
    from simpo_exp.inference.files import write_json
    from simpo_exp.rundir import read_json

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    write_json(tmp_path / "eval" / "rule" / "results.json", {"metrics": {"win_rate": 60.0}})
    write_json(tmp_path / "wandb_run.json", {"id": "abc123", "project": "p", "group": "g", "mode": "online"})
    modes, real_init = [], wandb.init

    def init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise ConnectionError("no route to the server")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    with pytest.warns(UserWarning, match="logging the evaluation offline instead: send it later with `wandb sync"):
        assert wandb_log.log_results(tmp_path, ["rule"]) is True
    assert modes == ["online", "offline"]
    assert read_json(tmp_path / wandb_log.SENT)["mode"] == "offline"
    assert list((tmp_path / "wandb").glob("offline-run-*-abc123"))


def test_a_number_a_re_evaluation_no_longer_has_is_cleared_on_wandb(tmp_path, monkeypatch):
    """A re-evaluation whose LC win rate was withheld (another judge: too many replies without a verdict) left the
    earlier LC win rate in the W&B run's summary, where the dashboard ranks by it, beside the new raw win rate: a
    summary update sets only the keys it is given. The numbers of a benchmark not evaluated now stay."""
    import types

    from simpo_exp.evaluate import wandb_log
    from simpo_exp.inference.files import write_json

    earlier = {"bench/alpacaeval2/lc_win_rate": 35.2, "bench/alpacaeval2/win_rate": 30.0}
    earlier |= {"bench/alpacaeval2/lc_standard_error": 1.1, "bench/arena-hard/win_rate": 20.0}
    earlier["bench/alpacaeval2/samples"] = {"_type": "table-file", "nrows": 3}  # the sample table logged before
    earlier["bench/gsm8k/acc"] = 0.4  # a benchmark evaluated where this copy of the run has no results.json of it
    summary = dict(earlier)
    run = types.SimpleNamespace(summary=summary, log=lambda *a, **k: None, finish=lambda: None)
    monkeypatch.setattr(wandb_log, "open_wandb", lambda *args, **kwargs: run)
    write_json(tmp_path / "wandb_run.json", {"id": "abc123", "project": "p", "mode": "offline"})
    metrics = {"lc_win_rate": None, "lc_standard_error": None, "win_rate": 12.0, "n": 805}
    write_json(tmp_path / "eval" / "alpacaeval2" / "results.json", {"metrics": metrics})
    write_json(tmp_path / "eval" / "arena-hard" / "results.json", {"metrics": {"win_rate": 20.0}})
    assert wandb_log.log_results(tmp_path, ["alpacaeval2"]) is True
    assert summary["bench/alpacaeval2/win_rate"] == 12.0 and summary["bench/alpacaeval2/n"] == 805
    assert summary["bench/alpacaeval2/lc_win_rate"] is None and summary["bench/alpacaeval2/lc_standard_error"] is None
    assert summary["bench/arena-hard/win_rate"] == 20.0 and summary["bench/gsm8k/acc"] == 0.4  # not evaluated now
    assert summary["bench/alpacaeval2/samples"] == earlier["bench/alpacaeval2/samples"]  # a table, not a number: kept
    # a key the run's summary holds and no results file names any more (a metric an older version wrote, which
    # recorded nothing of what it sent): cleared
    summary["bench/alpacaeval2/old_name"] = 3.0
    (tmp_path / wandb_log.SENT).unlink()
    wandb_log.log_results(tmp_path, ["alpacaeval2"])
    assert summary["bench/alpacaeval2/old_name"] is None


def test_a_re_evaluation_with_nothing_new_opens_no_wandb_run(tmp_path, monkeypatch):
    """Evaluating a sweep again (one run added, or judging resumed for another) reopened every run's W&B run and
    sent the same numbers and tables again: an offline folder more each time, or a resume over the network per run.
    The same results, benchmarks, run and mode send nothing; a change to any of them sends."""
    import types

    from simpo_exp.evaluate import wandb_log
    from simpo_exp.inference.files import write_json, write_jsonl

    opened = []

    def fake_open(*args, **kwargs):
        opened.append(kwargs["id"])
        return types.SimpleNamespace(summary={}, log=lambda *a, **k: None, finish=lambda: None)

    monkeypatch.setattr(wandb_log, "open_wandb", fake_open)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    write_json(tmp_path / "wandb_run.json", {"id": "abc123", "project": "p", "mode": "offline"})
    write_json(tmp_path / "eval" / "rule" / "results.json", {"metrics": {"win_rate": 60.0}, "created": "10:00:00"})
    for created in ("10:00:00", "10:00:05"):  # each evaluation writes results.json again, at its own time
        write_json(tmp_path / "eval" / "rule" / "results.json", {"metrics": {"win_rate": 60.0}, "created": created})
        assert wandb_log.log_results(tmp_path, ["rule"]) is True
    assert opened == ["abc123"]
    write_jsonl(tmp_path / "eval" / "rule" / "generations.jsonl", [{"prompt": "p", "answer": "a"}])  # its table
    wandb_log.log_results(tmp_path, ["rule"])
    assert len(opened) == 2
    write_json(tmp_path / "eval" / "rule" / "results.json", {"metrics": {"win_rate": 61.0}})  # re-judged
    wandb_log.log_results(tmp_path, ["rule"])
    write_json(tmp_path / "eval" / "arena-hard" / "results.json", {"metrics": {"win_rate": 20.0}})  # another bench
    wandb_log.log_results(tmp_path, ["rule"])
    wandb_log.log_results(tmp_path, ["rule", "arena-hard"])  # its table too
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's word: sent again, now online (with a key)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    wandb_log.log_results(tmp_path, ["rule", "arena-hard"])
    assert len(opened) == 6
    wandb_log.log_results(tmp_path, ["rule", "arena-hard"])
    assert len(opened) == 6


def test_a_benchmarks_wandb_table_holds_its_first_few_rows(tmp_path):
    from simpo_exp.evaluate.wandb_log import SAMPLE_ROWS, sample_rows
    from simpo_exp.inference.files import write_jsonl

    rows = [{"prompt": f"p{i}", "preference": 1 + i % 2, "n": i} for i in range(SAMPLE_ROWS + 4)]
    write_jsonl(tmp_path / "eval" / "rule" / "generations.jsonl", rows)
    columns, table = sample_rows(tmp_path, "rule")
    assert columns == ["prompt", "preference", "n"]
    assert table == [[r["prompt"], r["preference"], r["n"]] for r in rows[:SAMPLE_ROWS]]


def test_a_sweep_over_run_folders_gives_each_job_its_folder_and_reports_a_failed_one(sweep, tmp_path):
    """``--multirun evaluate.path=A,B``: the jobs differ by the path alone, which their folder names leave out, so
    the second job took the first one's folder; a job that failed went unreported and the sweep exited 0."""
    (tmp_path / "notarun").mkdir()
    one = shutil.copytree(jobs(sweep)[0], tmp_path / "run", ignore=shutil.ignore_patterns("eval", "wandb"))
    out = tmp_path / "ev"
    res = evaluate(
        "--multirun", f"evaluate.path='{tmp_path / 'notarun'}','{one}'", "benchmark=rule",
        "benchmarks.rule.max_prompts=4", "evaluate.wandb=off", f"hydra.sweep.dir={out}", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "1 of 2 jobs FAILED" in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr[-3000:]
    assert (one / "eval" / "rule" / "results.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "0_benchmark=rule,benchmarks.rule.max_prompts=4,evaluate.wandb=off",
        "1_benchmark=rule,benchmarks.rule.max_prompts=4,evaluate.wandb=off",
    ]
