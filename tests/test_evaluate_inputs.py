"""Benchmark files of the wrong shape are refused with a message naming the key, the file, the row and the expected
schema (a UserError: exit 2), never a KeyError or TypeError from deep inside the stage."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from simpo_exp.errors import UserError
from simpo_exp.evaluate.benchmarks import alpaca_prompts, arena_prompts

KEY = "benchmarks.arena-hard"


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def questions(tmp_path: Path, n: int = 3) -> str:
    rows = [
        {"question_id": f"q{i}", "category": "arena-hard-v0.1", "turns": [{"content": f"Explain {i}."}]}
        for i in range(n)
    ]
    return jsonl(tmp_path / "question.jsonl", rows)


def answer(qid: str, text: str = "y") -> dict:
    return {"question_id": qid, "model_id": "gpt-4-0314", "choices": [{"index": 0, "turns": [{"content": text}]}]}


def test_arena_hard_files_in_the_v01_format_are_read(tmp_path):
    refs = jsonl(tmp_path / "gpt-4-0314.jsonl", [answer(f"q{i}", "y" * i) for i in range(3)])
    prompts, info = arena_prompts(questions(tmp_path), refs, KEY, None)
    assert [(p["id"], p["instruction"], p["reference"]) for p in prompts] == [
        ("q0", "Explain 0.", ""),
        ("q1", "Explain 1.", "y"),
        ("q2", "Explain 2.", "yy"),
    ]
    assert info == {"rows": 3, "reference_generator": "gpt-4-0314"}
    # max_prompts: the first questions alone are answered and judged; the file's size is still said (the notes'
    # "N of M prompts")
    prompts, info = arena_prompts(questions(tmp_path), refs, KEY, 2)
    assert [p["id"] for p in prompts] == ["q0", "q1"] and info["rows"] == 3


def test_a_question_without_a_baseline_answer_is_refused_by_its_id(tmp_path):
    """Judged against a missing answer (the text None), the question would count as a win for the model."""
    refs = jsonl(tmp_path / "gpt-4-0314.jsonl", [answer("q0"), answer("q2")])
    with pytest.raises(UserError, match=r"reference_path=.*no answer for question_id 'q1'"):
        arena_prompts(questions(tmp_path), refs, KEY, None)


def test_a_damaged_line_is_named_by_its_number_and_ids_of_two_types_pair(tmp_path):
    """Each JSONL line was parsed alone, so every damaged line was reported as "line 1"; and a question_id written
    as 0 in the questions and "0" in the answers was "no answer for question_id 0" beside its answer."""
    path = Path(questions(tmp_path, n=5))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:3], lines[3][:20], lines[4]]) + "\n")
    with pytest.raises(UserError, match=r"question.jsonl'. line 4 is not valid JSON"):
        arena_prompts(str(path), "", KEY, None)
    qs = jsonl(tmp_path / "q.jsonl", [{"question_id": i, "turns": [{"content": f"Explain {i}."}]} for i in range(2)])
    refs = jsonl(tmp_path / "refs.jsonl", [answer(str(i), "y" * (i + 1)) for i in range(2)])
    prompts, _ = arena_prompts(qs, refs, KEY, None)
    assert [(p["id"], p["reference"]) for p in prompts] == [("0", "y"), ("1", "yy")]


@pytest.mark.parametrize(
    "row, says",
    [
        ({"qid": "q1", "choices": [{"turns": [{"content": "y"}]}]}, "keys ['choices', 'qid']"),
        (
            {
                "question_id": "q1",
                "model": "gpt-4-0314",
                "messages": [{"role": "assistant", "content": {"answer": "y"}}],
            },
            "v2's uid/prompt/messages files are not read",
        ),
        ({"question_id": "q1", "choices": []}, "keys ['choices', 'question_id']"),
        ({"question_id": "q1", "choices": [{"turns": [{"content": None}]}]}, "choices[0].turns[0].content, a string"),
        (["q1", "y"], "keys []"),
    ],
)
def test_a_reference_answer_of_another_shape_names_file_row_and_schema(tmp_path, row, says):
    refs = jsonl(tmp_path / "refs.jsonl", [answer("q0"), row, answer("q2")])
    with pytest.raises(UserError) as err:
        arena_prompts(questions(tmp_path), refs, KEY, None)
    message = str(err.value)
    assert f"{KEY}.reference_path={refs!r}: row 1 " in message and says in message
    assert "arena-hard-auto v0.1's model_answer format: question_id and choices[0].turns[0].content" in message


def test_a_question_of_another_shape_names_file_row_and_schema(tmp_path):
    path = jsonl(tmp_path / "question.jsonl", [{"uid": "u0", "prompt": "Explain."}])
    with pytest.raises(UserError, match=r"prompts_path=.*question.jsonl'. row 0 .*question_id and turns\[0\]"):
        arena_prompts(path, "", KEY, None)
    path = jsonl(tmp_path / "question.jsonl", [{"question_id": "q0", "turns": [{"content": ["a"]}]}])
    with pytest.raises(UserError, match="row 0 .keys \\['question_id', 'turns'\\]. is not arena-hard-auto v0.1"):
        arena_prompts(path, "", KEY, None)


def test_an_empty_or_undecodable_question_file_is_refused_by_file_and_line(tmp_path):
    """An empty Arena-Hard file "finished" the benchmark with n=0 (AlpacaEval's reader refused one); a byte that is not
    UTF-8 stopped the stage with a traceback."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl'. expected JSON lines, one row per question"):
        arena_prompts(str(empty), "", KEY, None)
    rows = [{"question_id": f"q{i}", "turns": [{"content": "Hi"}]} for i in range(3)]
    path = jsonl(tmp_path / "question.jsonl", rows)
    Path(path).write_bytes(Path(path).read_bytes().replace(b"q2", b"q\xe92"))
    with pytest.raises(UserError, match=r"question.jsonl'. line 3 holds text that is not UTF-8"):
        arena_prompts(path, "", KEY, None)
    renamed = str(Path(path).rename(tmp_path / "question.json"))  # JSON lines under a .json name
    with pytest.raises(UserError, match=r"question.json'. line 3 holds text that is not UTF-8"):
        arena_prompts(renamed, "", KEY, None)


def test_alpacaeval_rows_written_as_json_lines_under_a_json_name_are_read(tmp_path):
    """datasets' ``to_json`` writes JSON lines, under whatever name it is given: a prompts file saved that way as
    ``alpaca_eval.json`` was "not valid JSON (Extra data ...)". A broken JSON list is still named as one."""
    rows = [{"instruction": f"Say {i}", "output": "x" * i, "generator": "gpt4_turbo"} for i in range(1, 4)]
    path = tmp_path / "alpaca_eval.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, _ = alpaca_prompts(str(path), "benchmarks.alpacaeval2.prompts_path", None)
    assert [p["instruction"] for p in prompts] == ["Say 1", "Say 2", "Say 3"]
    prompts, info = alpaca_prompts(str(path), "benchmarks.alpacaeval2.prompts_path", 2)  # max_prompts
    assert [p["id"] for p in prompts] == ["0", "1"] and info["rows"] == 3
    path.write_text("[]")  # no row: refused, not a benchmark "finished" with n=0
    with pytest.raises(UserError, match=r"alpaca_eval.json'. expected a JSON list of rows"):
        alpaca_prompts(str(path), "benchmarks.alpacaeval2.prompts_path", None)
    path.write_text(json.dumps(rows) + "]")
    with pytest.raises(UserError, match=r"alpaca_eval.json'. not valid JSON \(Extra data"):
        alpaca_prompts(str(path), "benchmarks.alpacaeval2.prompts_path", None)


@pytest.mark.parametrize(
    "row, says",
    [
        ({"instruction": None, "output": "x"}, "row 1 (instruction=None)"),
        ({"instruction": "hi", "output": ["x"]}, "row 1 (output=['x'])"),
        ({"output": "x"}, "row 1 (keys ['output'])"),  # missing, not null: the row's own fields named
        ({"prompt": "hi", "response": "x"}, "row 1 (keys ['prompt', 'response'])"),  # another schema's
        ({"instruction": 5}, "row 1 (keys ['instruction'])"),  # one of the two missing: the row's keys
        ("just text", "row 1 ('just text')"),
    ],
)
def test_an_alpacaeval_row_without_string_instruction_and_output_is_named(tmp_path, row, says):
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, row]))
    with pytest.raises(UserError) as err:
        alpaca_prompts(str(path), "benchmarks.alpacaeval2.prompts_path", None)
    message = str(err.value)
    assert f"benchmarks.alpacaeval2.prompts_path={str(path)!r}: " + says in message
    assert "instruction and output must be strings" in message


def test_rule_prompts_need_the_synthetic_task_itself_or_a_provenance_naming_it(tmp_path):
    """A run on real data has no rule to judge by (refused, naming the data set); a run on generate-stage pairs
    gets the held-out prompts of the task recorded in its data's provenance.json; a damaged record is no task."""
    from simpo_exp.config import ConfigError, DatasetConfig, SourceConfig, SyntheticConfig
    from simpo_exp.data.synthetic import generate
    from simpo_exp.evaluate.benchmarks import rule_prompts

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    run = types.SimpleNamespace(dataset=DatasetConfig(name="local", sources={"local": SourceConfig(path=str(data))}))
    with pytest.raises(ConfigError, match="dataset='local' \\(local\\).*no synthetic_task in a provenance.json"):
        rule_prompts(run, 4)
    task = SyntheticConfig(num_train=50, num_test=8, seed=7)
    (data / "provenance.json").write_text(json.dumps({"synthetic_task": vars(task)}))
    prompts = rule_prompts(run, 4)
    assert [p["instruction"] for p in prompts] == [r["prompt"] for r in generate(task)["test_prefs"][:4]]
    # the source named by the generate stage's own folder, above its data/: the record beside the file read counts
    top = {"local": SourceConfig(path=str(tmp_path))}
    above = types.SimpleNamespace(dataset=DatasetConfig(name="local", sources=top))
    assert [p["instruction"] for p in rule_prompts(above, 4)] == [p["instruction"] for p in prompts]
    (data / "provenance.json").write_text(json.dumps({"synthetic_task": {"digits": 3}}))
    with pytest.raises(ConfigError, match="benchmark=rule"):
        rule_prompts(run, 4)
    # the data moved away: the copy the run kept in its data_report.json still names the task
    (data / "provenance.json").unlink()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report = {"sources": {"local": {"train_rows": 9, "provenance": {"synthetic_task": vars(task)}}}}
    (run_dir / "data_report.json").write_text(json.dumps(report))
    assert [p["instruction"] for p in rule_prompts(run, 4, run_dir)] == [p["instruction"] for p in prompts]


def test_a_judge_the_benchmark_does_not_run_and_bad_retry_settings_are_refused_by_key():
    """benchmark=rule with judge.kind=none still judged by the rule, Arena-Hard with judge.kind=alpaca_eval judged
    nothing, and both recorded the judge they named; judge.max_retries=-1 and timeout_s=0 were blamed on the
    endpoint ("did not answer after 0 tries")."""
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig, _validate_benchmark

    def bench(benchmark, **judge):
        files = {"rule": {}, "alpacaeval": {"prompts_path": "p.json"}}
        files = files.get(benchmark, {"prompts_path": "q.jsonl", "reference_path": "r.jsonl"})
        return BenchmarkConfig(name=benchmark, kind=benchmark, **files, judge=JudgeConfig(**judge))

    with pytest.raises(ConfigError, match="b.judge.kind='none'.*allowed values are 'rule'"):
        _validate_benchmark("b", bench("rule", kind="none"))
    with pytest.raises(ConfigError, match="b.judge.kind='alpaca_eval'"):
        _validate_benchmark("b", bench("arena_hard", kind="alpaca_eval"))
    _validate_benchmark("b", bench("alpacaeval", kind="alpaca_eval"))
    endpoint = dict(kind="openai", base_url="http://127.0.0.1:1/v1", model="m")
    with pytest.raises(ConfigError, match="b.judge.max_retries=-1"):
        _validate_benchmark("b", bench("arena_hard", **endpoint, max_retries=-1))
    with pytest.raises(ConfigError, match="b.judge.timeout_s=0"):
        _validate_benchmark("b", bench("arena_hard", **endpoint, timeout_s=0))
    _validate_benchmark("b", bench("arena_hard", **endpoint))


def test_a_cut_short_or_mismatched_answer_shard_is_named_not_paired_with_other_prompts(tmp_path):
    """An answer shard emptied by a crash was taken as done and the next shard's answers scored against its
    prompts; a half-written line ended in a JSONDecodeError naming no file. Both are refused, naming the file."""
    from types import SimpleNamespace

    from simpo_exp.evaluate.run import generate
    from simpo_exp.inference.files import DamagedFile, read_jsonl

    bad = tmp_path / "cut.jsonl"
    bad.write_text('{"id": "0", "text": "a"}\n{"id": "1", "te')
    with pytest.raises(DamagedFile, match="cut.jsonl: line 2 is not valid JSON"):
        read_jsonl(bad)
    prompts = [{"id": str(i), "instruction": f"q{i}", "messages": []} for i in range(4)]
    dec = SimpleNamespace(shard_size=2, seed=0, temperature=0.0)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "trained-00000.jsonl").write_text('{"id": "0", "text": "a"}\n{"id": "1", "text": "b"}\n')
    (shards / "trained-00001.jsonl").write_text("")  # emptied by a crash
    (tmp_path / "m").mkdir()  # a trained model directory (no weights needed: the stored answers are read)
    model = SimpleNamespace(path=str(tmp_path / "m"), name="m", dtype="float32", tokenizer_path=None)
    model.chat_template = None
    cfg = SimpleNamespace(model=model)
    cfg.hardware = SimpleNamespace(mixed_precision="auto", device="cpu", master_weights="fp32", lora=False)
    cfg.dataset = SimpleNamespace(chat_format="generation_prompt")
    with pytest.raises(DamagedFile, match="trained-00001.jsonl holds 0 answers"):
        generate(cfg, prompts, dec, shards, "trained", judge_only=True)
    # deleted, as that message advises: judge_only still makes no answers (no model is loaded, nothing sampled)
    from simpo_exp.config import ConfigError

    (shards / "trained-00001.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"judge_only=true, but \S*trained-00001.jsonl holds no stored generations"):
        generate(cfg, prompts, dec, shards, "trained", judge_only=True)


def test_the_trained_model_is_loaded_in_the_dtype_it_was_saved_in(tmp_path, compose):
    """A bf16-based run saves float32 weights (master weights; a LoRA merge too): evaluate loaded them in the run's
    model.dtype=bfloat16, rounding away most of a SimPO-size update before any computation."""
    import json

    from simpo_exp.evaluate.runs import load_run_config, trained_policy
    from tests.test_evaluate_lmeval import fake_run

    run = fake_run(tmp_path / "run", ["model.dtype=bfloat16"], compose, weights=True)
    config = json.loads((run / "model" / "config.json").read_text())
    config["dtype"] = "float32"
    (run / "model" / "config.json").write_text(json.dumps(config))
    run_cfg = load_run_config(run)
    assert run_cfg.model.dtype == "bfloat16" and trained_policy(run_cfg, run, "cpu").model.dtype == "float32"


def test_ctrl_c_says_where_the_evaluate_stage_keeps_its_work(tmp_path, monkeypatch, capsys):
    """Interrupted, the evaluate stage said its Hydra folder (a log file) held the finished shards and judge
    replies; they are in each run's eval/ folder."""
    import sys

    import simpo_exp.evaluate.run
    from simpo_exp.evaluate.__main__ import main

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(simpo_exp.evaluate.run, "evaluate_all", interrupted)
    runs = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)  # the stage's own dated folder (its log) goes here
    monkeypatch.setattr(sys, "argv", ["evaluate", f"evaluate.path={runs}"])
    with pytest.raises(SystemExit) as leaving:
        main()
    assert leaving.value.code == 130
    said = capsys.readouterr().err
    assert f"interrupted; what the eval/ folder of each run under {runs} holds so far" in said
    # the same command finds the work in each run's eval/: no folder of the stage's own to name, no checkpoints
    assert "re-run the same command to go on" in said and "hydra.run.dir" not in said and "checkpoints" not in said


def test_a_generate_stage_folder_given_to_evaluate_is_named_as_such(tmp_path):
    """It holds a .hydra/config.yaml, as a run does: 'no run directory (one with .hydra/config.yaml)' was wrong."""
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.run import _runs_to_evaluate

    (tmp_path / "gen" / ".hydra").mkdir(parents=True)
    (tmp_path / "gen" / ".hydra" / "config.yaml").write_text("generate:\n  seeds: [1]\nmodel:\n  name: tiny\n")
    with pytest.raises(ConfigError, match="this is the generate stage's output, not a training run"):
        _runs_to_evaluate(str(tmp_path / "gen"))
    with pytest.raises(ConfigError, match="no run directory"):  # a folder that holds none at all
        _runs_to_evaluate(str(tmp_path))


@pytest.mark.parametrize(
    "kind, key, value, says",
    [
        ("lm_eval", "decoding.temperature", 0.7, "lm-eval decodes as its tasks say"),
        ("lm_eval", "max_prompts", 5, "lm-eval's own cap on prompts is limit"),
        ("lm_eval", "judge.strong_weight", 9, "kinds that do: arena_hard"),
        ("rule", "tasks", ["gsm8k"], "kinds that do: lm_eval"),
        ("rule", "num_fewshot", 3, "Remove it or set it to None"),
        ("rule", "judge.base_url", "http://127.0.0.1:1/v1", "kinds that do: alpacaeval, arena_hard"),
        ("alpacaeval", "judge.strong_weight", 2, "set it to 3"),
        ("alpacaeval", "reference_path", "r.jsonl", "kinds that do: arena_hard"),
        ("arena_hard", "judge.annotators_config", "x", "kinds that do: alpacaeval"),
    ],
)
def test_a_setting_the_benchmark_kind_never_reads_is_refused_by_key(kind, key, value, says):
    """Such a setting was accepted and recorded, and the benchmark ran as if it had not been given (a temperature
    for lm-eval's GSM8K, the Arena-Hard battle weight for AlpacaEval, lm-eval tasks for the rule benchmark)."""
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig, _validate_benchmark

    files = {"rule": {"judge": JudgeConfig(kind="rule")}, "lm_eval": {"tasks": ["gsm8k"]}}
    files["alpacaeval"] = {"prompts_path": "p.json"}
    b = BenchmarkConfig(name="b", kind=kind, **files.get(kind, {"prompts_path": "q.jsonl"}))
    _validate_benchmark("benchmarks.b", b)
    section, _, name = key.rpartition(".")
    setattr(getattr(b, section) if section else b, name, value)
    with pytest.raises(ConfigError) as err:
        _validate_benchmark("benchmarks.b", b)
    assert f"benchmarks.b.{key}={value!r}: a benchmark of kind {kind} never reads it" in str(err.value)
    assert says in str(err.value), str(err.value)


def test_decoding_vllm_settings_are_checked_as_the_generate_stage_checks_them():
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.config import BenchmarkConfig, DecodingConfig, JudgeConfig, _validate_benchmark

    def rule(**decoding):
        return BenchmarkConfig(
            name="b", kind="rule", decoding=DecodingConfig(**decoding), judge=JudgeConfig(kind="rule")
        )

    with pytest.raises(ConfigError, match=r"b.decoding.vllm_gpu_memory_utilization=7.*\(0, 1\]"):
        _validate_benchmark("b", rule(vllm_gpu_memory_utilization=7))
    with pytest.raises(ConfigError, match="b.decoding.vllm_tensor_parallel_size=0"):
        _validate_benchmark("b", rule(vllm_tensor_parallel_size=0))


def test_a_runs_paths_are_read_as_training_read_them_wherever_evaluate_runs(tmp_path, monkeypatch):
    """Hydra saves the config unresolved: ``${hydra:runtime.cwd}`` was resolved with evaluate's own Hydra (its
    folder, not the run's), and a relative model.path against evaluate's folder, where another model of that name
    would have served as the starting policy without a word."""
    import yaml

    from simpo_exp.evaluate.runs import load_run_config

    user = tmp_path / "user"
    (user / "models" / "mine").mkdir(parents=True)
    (user / "data").mkdir()
    (user / "data" / "prefs.jsonl").write_text("")
    run = user / "out" / "run1"
    (run / ".hydra").mkdir(parents=True)
    saved = {"seed": 3, "model": {"name": "mine", "path": "${hydra:runtime.cwd}/models/mine", "tokenizer_path": "tok"}}
    (user / "tok").mkdir()
    saved["dataset"] = {"name": "local", "sources": {"local": {"path": "data/prefs.jsonl"}}}
    saved |= {"hardware": {"name": "cpu"}, "logger": {"name": "none"}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"cwd": str(user)}}}))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "prefs.jsonl").write_text("")  # a file of the same relative name where evaluate runs
    monkeypatch.chdir(elsewhere)
    cfg = load_run_config(run)
    assert cfg.model.path == f"{user}/models/mine" and cfg.model.tokenizer_path == str(user / "tok")
    assert cfg.dataset.sources["local"].path == str(user / "data" / "prefs.jsonl")
    saved["model"]["path"] = "org/model"  # a hub id stays one
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert load_run_config(run).model.path == "org/model"


def test_answers_of_an_older_manifest_are_not_refused_over_a_key_it_did_not_record(tmp_path):
    """Answers made before model_dtype was recorded were refused ("model_dtype: stored None, now 'float32'") right
    after their manifest's weights were upgraded for reuse; the generate stage already read older manifests so."""
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.run import _check_manifest

    path = tmp_path / "trained-manifest.json"
    path.write_text(json.dumps({"weights": "w", "decoding": {"temperature": 0.0}}))
    now = {"weights": "w", "decoding": {"temperature": 0.0}, "model_dtype": "float32"}
    _check_manifest(path, now, has_answers=True)
    _check_manifest(path, {**now, "decoding": {"temperature": 0.0, "seed": 0}}, has_answers=True)  # nested too
    with pytest.raises(ConfigError, match="decoding.temperature: stored 0.0, now 0.7"):
        _check_manifest(path, {**now, "decoding": {"temperature": 0.7}}, has_answers=True)
    # sampled answers made before their batch size was recorded are kept; a batch size recorded binds them
    sampled = {"temperature": 0.7, "top_p": 0.9, "seed": 0}
    path.write_text(json.dumps({"weights": "w", "decoding": sampled}))
    _check_manifest(path, {**now, "decoding": sampled | {"batch_size": 8}}, has_answers=True)
    path.write_text(json.dumps({"weights": "w", "decoding": sampled | {"batch_size": 4}}))
    with pytest.raises(ConfigError, match="batch_size"):
        _check_manifest(path, {**now, "decoding": sampled | {"batch_size": 8}}, has_answers=True)


def test_a_damaged_manifest_beside_stored_answers_is_named(tmp_path):
    """A manifest cut short or edited into another shape failed with a JSONDecodeError or an AttributeError: what
    the stored answers were made with is unknown, so the file is named and the folder's deletion advised. Without
    stored answers, it binds nothing and is replaced."""
    from simpo_exp.evaluate.run import _check_manifest
    from simpo_exp.inference.files import DamagedFile

    path, now = tmp_path / "trained-manifest.json", {"weights": "w", "decoding": {"temperature": 0.0}}
    for damaged in ('{"weights": "w", "deco', "[1, 2]"):
        path.write_text(damaged)
        with pytest.raises(DamagedFile, match=f"{path} does not read back .* delete {tmp_path} to generate"):
            _check_manifest(path, now, has_answers=True)
    _check_manifest(path, now, has_answers=False)
    assert json.loads(path.read_text()) == now


def test_stored_answers_without_their_manifest_are_taken_with_a_warning(tmp_path, caplog):
    """Shards copied without their manifest (or it deleted): their settings are unknown, which is said."""
    import logging

    from simpo_exp.evaluate.run import _check_manifest

    path, now = tmp_path / "trained-manifest.json", {"weights": "w", "decoding": {"temperature": 0.0}}
    with caplog.at_level(logging.WARNING, logger="simpo_exp.evaluate.run"):
        _check_manifest(path, now, has_answers=False)
        assert caplog.text == ""
        path.unlink()
        _check_manifest(path, now, has_answers=True)
    assert "the stored answers beside it have no record of how they were made" in caplog.text
    assert json.loads(path.read_text()) == now


def test_runs_are_ranked_by_a_score_not_its_standard_error_and_a_missing_data_set_is_named():
    """A task whose only score is lower-is-better (perplexity) ranked the runs by its standard error, which is not
    lower-is-better; and the hub's LocalEntryNotFoundError (a data set not in the cache) escaped as a traceback."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from simpo_exp.data.sources import DataSourceError
    from simpo_exp.evaluate.lmeval import raise_if_not_cached
    from simpo_exp.evaluate.run import _rank_metric

    metrics = {"w/word_perplexity:none": 9.0, "w/word_perplexity_stderr:none": 0.2, "w/n": 10.0}
    assert _rank_metric([{"benchmark": "wt", "metrics": metrics}]) == "bench/wt/w/word_perplexity:none"
    with pytest.raises(DataSourceError, match=r"benchmarks\.g\.tasks=\['gsm8k'\]: a task's data set is not on"):
        raise_if_not_cached(types.SimpleNamespace(name="g", tasks=["gsm8k"]), LocalEntryNotFoundError("no such file"))
    raise_if_not_cached(types.SimpleNamespace(name="g", tasks=["gsm8k"]), ValueError("bad value"))  # not ours


def test_the_run_directory_is_found_among_hydras_options_and_overrides(tmp_path):
    """After --config-dir it was Hydra's "missing EQUAL"; the values of --cfg and --package, and a ~deletion, were
    taken for directories; a sweep job's directory holds '=' and is still the directory."""
    from simpo_exp.evaluate.__main__ import _path_argument

    run = tmp_path / "0_beta=2,seed=1"
    run.mkdir()
    path = f"evaluate.path='{run}'"
    assert _path_argument(["m", "--config-dir", "c", str(run), "benchmark=rule"]) == [
        "m", "--config-dir", "c", path, "benchmark=rule"
    ]  # fmt: skip
    assert _path_argument(["m", str(run), "--cfg", "job", "--package", "benchmarks"])[1] == path
    assert _path_argument(["m", "--info", "config", "-m", str(run), "~benchmarks.rule"])[4] == path
    assert _path_argument(["m", "evaluate.path=x", "--cfg", "job"]) == ["m", "evaluate.path=x", "--cfg", "job"]
    assert _path_argument(["m", str(run), "-p", "benchmarks"])[1] == path  # -p is --package's short form
    # a folder with a quote in its name becomes an override Hydra reads back as that folder
    from hydra.core.override_parser.overrides_parser import OverridesParser

    quoted = tmp_path / "bob's run"
    quoted.mkdir()
    override = OverridesParser.create().parse_override(_path_argument(["m", str(quoted)])[1])
    assert override.key_or_group == "evaluate.path" and override.value() == str(quoted)
    # a directory named twice: Hydra took the last, the other went unevaluated without a word
    twice = (["m", "evaluate.path=x", str(run)], ["m", "evaluate.path=x", "evaluate.path=y"])
    for argv in (["m", str(tmp_path / "nope")], ["m", str(run), "extra"], *twice):
        with pytest.raises(SystemExit) as err:
            _path_argument(argv)
        assert err.value.code == 2


@pytest.mark.parametrize("stage", ["evaluate", "generate"])
def test_sigterm_ends_the_evaluate_and_generate_stages_as_ctrl_c_does(tmp_path, monkeypatch, capsys, stage):
    """A scheduler's SIGTERM ended these stages at once (status -15): the judge replies in flight, which the Ctrl-C
    path waits for and writes, were lost and paid for again. Now it takes the Ctrl-C path."""
    import importlib
    import os
    import signal
    import sys
    import time

    module = importlib.import_module(f"simpo_exp.{stage}.run")
    work = {"evaluate": "evaluate_all", "generate": "generate_data"}[stage]

    def terminated(config):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # else the kill below ends pytest
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    monkeypatch.setattr(module, work, terminated)
    given = [f"evaluate.path={tmp_path / 'sweep'}"] if stage == "evaluate" else []
    monkeypatch.setattr(sys, "argv", [stage, *given, f"hydra.run.dir={tmp_path / 'log'}"])
    main = importlib.import_module(f"simpo_exp.{stage}.__main__").main
    found = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a command starts (a test worker may hold another)
    try:
        with pytest.raises(SystemExit) as leaving:
            main()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
    finally:
        signal.signal(signal.SIGTERM, found)
    # 128 + SIGTERM, as a process the signal ended would report: Ctrl-C's 130 read as the user's interrupt
    said = capsys.readouterr().err
    assert leaving.value.code == 143 and "interrupted; what" in said
    kept = "(finished shards, judge replies) is kept" if stage == "evaluate" else "(finished shards) is kept"
    assert kept in said  # each stage's own (the generate stage has no judge)


@pytest.mark.parametrize(
    "model, temperature, max_new_tokens",
    [
        ("llama3-8b-instruct", 0.0, 4096),
        ("llama3-8b-base-sft", 0.0, 4096),
        ("gemma2-9b-it", 0.0, 4096),
        ("zephyr-7b-sft-full", 0.0, 2048),
        ("mistral-7b-instruct-v0.2", 0.5, 2048),
    ],
)
def test_alpacaeval_decodes_as_the_papers_numbers_were_made(model, temperature, max_new_tokens):
    """The official configs' ``do_sample: true`` with a temperature ran under alpaca-eval 0.6.2 as vLLM beam search
    of width 1 (greedy); the preset sampled at those temperatures instead. Only Mistral-Instruct's config, without
    do_sample, sampled (at 0.5)."""
    from hydra import compose, initialize_config_dir

    from simpo_exp.evaluate.config import decoding_for, to_evaluate_config
    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=["evaluate.path=/tmp/unused", "output_dir=/tmp/unused", "benchmark=alpacaeval2"]
            + ["benchmarks.alpacaeval2.prompts_path=p.json"],
        )
    dec = decoding_for(to_evaluate_config(cfg).benchmarks["alpacaeval2"], model)
    assert (dec.temperature, dec.top_p, dec.max_new_tokens) == (temperature, 1.0, max_new_tokens)


def test_a_missing_run_directory_is_asked_for_as_the_stage_takes_it():
    """It said "give it on the command line (evaluate.path=...) (a local file ...)": the stage takes a directory, as
    its one positional argument."""
    from hydra import compose, initialize_config_dir

    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.config import to_evaluate_config
    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["output_dir=/tmp/unused", "benchmark=rule"])
    with pytest.raises(ConfigError, match=r"evaluate.path: give a run or sweep directory, .* RUN_OR_SWEEP_DIR"):
        to_evaluate_config(cfg)


def test_alpaca_evals_own_judge_gives_its_leaderboards_numbers_with_their_standard_errors(tmp_path, monkeypatch):
    """judge.kind=alpaca_eval reads the leaderboard row alpaca_eval.evaluate returns: its win rates and their standard
    errors (a column an older alpaca-eval lacks, or a NaN, is null rather than an error)."""
    import pandas as pd

    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
    from simpo_exp.evaluate.judge import package_judge

    board = {"length_controlled_winrate": 41.5, "win_rate": 30.0, "standard_error": 1.4, "avg_length": 1800.0}
    calls = []

    def evaluate(**kwargs):
        calls.append(kwargs)
        return pd.DataFrame([board], index=["my-run"]), None

    monkeypatch.setitem(sys.modules, "alpaca_eval", types.SimpleNamespace(evaluate=evaluate))
    b = BenchmarkConfig(name="alpacaeval2", kind="alpacaeval", judge=JudgeConfig(kind="alpaca_eval"))
    got = package_judge(b, tmp_path / "model_outputs.json", "ref.json", tmp_path / "alpaca_eval")
    assert got == {
        "lc_win_rate": 41.5,
        "lc_standard_error": None,  # not in this leaderboard
        "win_rate": 30.0,
        "standard_error": 1.4,
        "avg_length": 1800.0,
    }
    board |= {"lc_standard_error": 0.7, "standard_error": float("nan")}
    got = package_judge(b, tmp_path / "model_outputs.json", "ref.json", tmp_path / "alpaca_eval")
    assert (got["lc_standard_error"], got["standard_error"]) == (0.7, None)
    assert calls[0]["is_return_instead_of_print"] is True and calls[0]["reference_outputs"] == "ref.json"
    # the user's annotator, the answers handed over and where its annotations go (package_annotations_path reads there)
    assert calls[0]["annotators_config"] == b.judge.annotators_config
    assert calls[0]["model_outputs"] == str(tmp_path / "model_outputs.json")
    assert calls[0]["output_path"] == str(tmp_path / "alpaca_eval") and calls[0]["precomputed_leaderboard"] is None


def test_alpaca_evals_own_judge_on_a_subset_reports_no_lc_and_answers_go_stripped(tmp_path, monkeypatch):
    """alpaca-eval's evaluate_from_model strips each answer before its judge reads it and its length is counted;
    they went with their whitespace. And judge.kind=alpaca_eval reported an LC win rate fitted on a max_prompts
    subset, where the openai judge (and this record's other runs) say LC is defined on the full set only."""
    from simpo_exp.evaluate import run as ev
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
    from simpo_exp.evaluate.judge import ALPACA_EVAL_ROWS
    from tests.test_evaluate import ALPACA

    prompts = tmp_path / "alpaca_eval.json"  # JSON lines under a .json name, as datasets' to_json writes: read here,
    prompts.write_text("".join(json.dumps(row) + "\n" for row in ALPACA[:3]))  # refused by alpaca-eval's own loader
    judge = JudgeConfig(kind="alpaca_eval")
    b = BenchmarkConfig(name="alpacaeval2", kind="alpacaeval", prompts_path=str(prompts), judge=judge)
    handed, references = [], []

    def package_judge(b, outputs_path, reference_path, out_dir):
        handed.extend(json.loads(Path(outputs_path).read_text()))
        references.append(json.loads(Path(reference_path).read_text()))  # one JSON array, as alpaca-eval reads
        return {"lc_win_rate": 41.5, "win_rate": 30.0, "avg_length": 8.0}

    monkeypatch.setattr(ev, "package_judge", package_judge)
    answers = [{"text": f"\n  answer {i} \n", "finished": True, "n_tokens": 4} for i in range(3)]
    out = tmp_path / "eval" / "alpacaeval2"
    out.mkdir(parents=True)
    (out / "annotations.json").write_text("[]")  # an earlier judging's pairs (judge.kind=openai): not this one's
    ctx = {"benchmark": b, "out": out, "trained": None, "name": "my-run", "generate": lambda *_: answers}
    record = ev._alpacaeval(ctx)
    assert not (out / "annotations.json").exists()  # W&B's sample table would have shown it as this judge's
    assert [row["output"] for row in handed] == ["answer 0", "answer 1", "answer 2"]
    assert references == [ALPACA[:3]]
    assert ALPACA_EVAL_ROWS != 3 and record["metrics"]["lc_win_rate"] is None
    assert record["metrics"]["win_rate"] == 30.0
    assert any(n.endswith("the prompts file has 3 rows, not alpaca_eval's 805") for n in record["notes"])
    assert not any("max_prompts" in n for n in record["notes"]), record["notes"]


def _saved_run(tmp_path, saved):
    run = tmp_path / "r1"
    (run / ".hydra").mkdir(parents=True)
    base = {"model": {"name": "tiny"}, "dataset": {"name": "synthetic"}, "hardware": {"name": "cpu"}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(base | {"logger": {"name": "none"}} | saved))
    return run


def test_a_runs_seed_and_its_older_model_tiny_key_are_read_back(tmp_path):
    """The starting policy of a random-init run is rebuilt from its seed and shape: a run saved before model.tiny was
    renamed random_init, or with a seed other than the default, must come back as it trained."""
    from simpo_exp.evaluate.runs import load_run_config

    run = _saved_run(tmp_path, {"seed": 7, "model": {"name": "tiny", "tiny": {"hidden_size": 48}}})
    cfg = load_run_config(run)
    assert cfg.seed == 7 and cfg.model.random_init.hidden_size == 48


def test_a_runs_config_of_another_shape_is_named_and_an_unknown_hydra_value_is_left_as_written(tmp_path):
    """A .hydra/config.yaml holding a list (at the top, or as a section) is refused naming the file, not a
    traceback; a ${hydra:...} value the run's hydra.yaml does not hold is left as written (it became "None/x")."""
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.runs import load_run_config, saved_config

    run = _saved_run(tmp_path, {"model": {"name": "x", "path": "${hydra:runtime.nope}/x"}})
    assert saved_config(run)["model"]["path"] == "${hydra:runtime.nope}/x"
    for text in ("- a\n- b\n", "model: [1]\n"):
        (run / ".hydra" / "config.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"evaluate.path: cannot read the run's config .*config.yaml"):
            load_run_config(run)


def test_a_runs_policies_for_inference_drop_its_training_only_settings(tmp_path):
    """Sampling a run's models: no new LoRA adapters wrapped around them (the trained model is merged), no
    checkpointing or training kernels; the trained model/ with its own tokenizer and template (a template fixed
    there is the one the model was saved with), in the dtype it was saved in."""
    from simpo_exp.evaluate.runs import for_inference, load_run_config, starting_policy, trained_policy

    run = _saved_run(tmp_path, {"model": {"name": "tiny", "chat_template": "chatml", "tokenizer_path": "elsewhere"}})
    run_cfg = load_run_config(run)
    run_cfg.hardware.lora, run_cfg.hardware.gradient_checkpointing = True, True
    run_cfg.hardware.fused_layers = "liger"
    for cfg in (for_inference(run_cfg, "cpu"), starting_policy(run_cfg, "cpu"), trained_policy(run_cfg, run, "cpu")):
        assert not cfg.hardware.lora and not cfg.hardware.gradient_checkpointing
        assert cfg.hardware.fused_layers == "none" and cfg.hardware.device == "cpu"
    trained = trained_policy(run_cfg, run, "cpu")
    assert trained.model.path == str((run / "model").resolve())
    assert (trained.model.chat_template, trained.model.tokenizer_path, trained.model.revision) == ("auto", "", None)
    assert run_cfg.hardware.lora and run_cfg.model.chat_template == "chatml"  # the run's own config is left as it was


def test_the_starting_model_is_the_one_the_run_trained_from(tmp_path):
    """score_start, exact_start and the rule benchmark's win rate compare with the starting model rebuilt from the
    run's model.path: a local folder rewritten since (an on-policy round's start is an earlier run's model/, which a
    resumed or extended run writes again) was compared with, unsaid; a hub model followed main. A local folder whose
    files changed is refused, naming them; a hub model is read at the commit the run recorded."""
    import json
    import os

    from simpo_exp.config import ConfigError
    from simpo_exp.environment import local_model_files
    from simpo_exp.evaluate.runs import load_run_config, starting_policy

    start = tmp_path / "start"
    start.mkdir()
    names = ("config.json", "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "tokenizer.json")
    for name in (*names, "generation_config.json", "special_tokens_map.json", "chat_template.json"):
        (start / name).write_text(name)
    run = _saved_run(tmp_path, {"model": {"name": "tiny", "path": str(start)}})
    run_cfg = load_run_config(run)
    first = {"model_commit": None, "model_files": local_model_files(str(start))}
    # weights, their index and shape, not the tokenizer, chat template or generation settings (a template edited
    # leaves the weights compared with as they were)
    assert sorted(first["model_files"]) == sorted(names[:4])
    later = {"model_files": {"other.bin": [1, 1]}}  # the first start's files count, not a later start's
    (run / "env.json").write_text(json.dumps({**later, "earlier_starts": [first, later]}))
    assert starting_policy(run_cfg, "cpu", run).model.path == str(start)  # unchanged: its first start's files
    os.utime(start / "model.safetensors", ns=(1, 1))  # written again (a later round, a resumed run)
    with pytest.raises(ConfigError, match=r"benchmarks.rule: the run trained from model.path=.*start, whose files "
                       r"changed since it started \(model.safetensors written"):  # fmt: skip
        starting_policy(run_cfg, "cpu", run, "benchmarks.rule")
    os.utime(start / "model.safetensors", ns=tuple([first["model_files"]["model.safetensors"][1]] * 2))  # as it was
    starting_policy(run_cfg, "cpu", run, "benchmarks.rule")
    (start / "extra.bin").write_text("x")  # a file added is named too
    with pytest.raises(ConfigError, match=r"\(extra.bin written, added or removed\)"):
        starting_policy(run_cfg, "cpu", run, "benchmarks.rule")
    hub = _saved_run(tmp_path / "hub", {"model": {"name": "tiny", "path": "org/tiny"}})
    (hub / "env.json").write_text(json.dumps({"model_commit": "c" * 40, "model_files": None}))
    assert starting_policy(load_run_config(hub), "cpu", hub).model.revision == "c" * 40  # not main as it is now
    assert starting_policy(load_run_config(hub), "cpu").model.revision is None  # no run folder: as configured


def test_a_sweeps_runs_are_found_in_their_numbers_order(tmp_path):
    from simpo_exp.evaluate.runs import find_runs

    for name in ("10", "2", "0"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text("seed: 1\n")
    assert [p.name for p in find_runs(tmp_path)] == ["0", "2", "10"]


def test_a_by_model_entry_under_a_name_no_preset_or_run_has_is_said(caplog):
    """A misspelt model name in by_model was never applied and nothing said so (entries for other presets are the
    shipped benchmarks' own, and stay quiet)."""
    import types

    from simpo_exp.evaluate.config import BenchmarkConfig
    from simpo_exp.evaluate.run import check_benchmark_inputs

    b = BenchmarkConfig(name="b", kind="rule", by_model={"tiyn": {"max_new_tokens": 2}, "gemma2-9b-it": {}, "mine": {}})
    with caplog.at_level("WARNING"):
        check_benchmark_inputs(types.SimpleNamespace(benchmarks={"b": b}), {"tiny", "mine"})
    said = [r.getMessage() for r in caplog.records if "by_model" in r.getMessage()]
    assert (
        len(said) == 1 and said[0].startswith("benchmarks.b.by_model.tiyn: no model preset") and "mine, tiny" in said[0]
    )


@pytest.mark.parametrize(
    "kind, change, says",
    [
        ("lm_eval", {"judge.kind": "openai"}, "b.judge.kind='openai': allowed values are 'none'"),
        ("arena_hard", {"judge.kind": "rule"}, "b.judge.kind='rule': allowed values are 'none', 'openai'"),
        ("rule", {"decoding.batch_size": 0}, "b.decoding.batch_size=0: must be an integer >= 1"),
        ("rule", {"shard_size": 0}, "b.shard_size=0: must be an integer >= 1"),
        ("rule", {"by_model": {"tiny": {"temprature": 0.5}}}, "b.by_model.tiny=['temprature']: unknown decoding keys"),
        ("rule", {"max_prompts": 0}, "b.max_prompts=0: must be >= 1 or null"),
        ("alpacaeval", {"prompts_path": ""}, "b.prompts_path='': alpacaeval needs a local prompts file"),
        ("arena_hard", {"judge.kind": "openai", "reference_path": ""}, "b.reference_path='': judging Arena-Hard"),
        ("arena_hard", {"judge.kind": "openai", "judge.base_url": ""}, "b.judge.base_url='': judge.kind=openai needs"),
        ("arena_hard", {"judge.kind": "openai", "judge.base_url": "127.0.0.1:8000/v1"}, "must start with http://"),
        # credentials in the URL: never sent by urllib ("the endpoint did not answer"), and not echoed here
        (
            "arena_hard",
            {"judge.kind": "openai", "judge.base_url": "http://alice:pw-SECRET@127.0.0.1:8000/v1"},
            "b.judge.base_url holds a user name or password",
        ),
        # the key itself given as the variable's name: sent nowhere, written everywhere; not echoed
        ("arena_hard", {"judge.kind": "openai", "judge.api_key_env": "sk-SECRET-1"}, "b.judge.api_key_env names the"),
        (
            "arena_hard",
            {"judge.kind": "openai", "judge.model": ""},
            "b.judge.model='': judge.kind=openai needs a model",
        ),
        ("arena_hard", {"judge.kind": "openai", "judge.concurrency": 0}, "b.judge.concurrency=0: must be >= 1"),
        ("lm_eval", {"tasks": []}, "b.tasks=[]: name at least one lm-eval task"),
        ("rule", {"decoding.temperature": -0.1}, "b.decoding.temperature=-0.1: must be >= 0"),
        ("rule", {"decoding.top_p": 0.0}, "b.decoding.top_p=0.0: must be in (0, 1]"),
        ("rule", {"decoding.vllm_gpu_memory_utilization": 1.5}, "b.decoding.vllm_gpu_memory_utilization=1.5: must be"),
        ("arena_hard", {"judge.kind": "openai", "judge.bootstrap_rounds": 0}, "b.judge.bootstrap_rounds=0: must be"),
        # the key given as the user name alone (no password): urllib sends it nowhere, the records keep it
        (
            "arena_hard",
            {"judge.kind": "openai", "judge.base_url": "http://sk-SECRET@127.0.0.1:8000/v1"},
            "b.judge.base_url holds a user name or password",
        ),
        # a model's own decoding is what it is sampled with: held to the same ranges (it was only spell-checked)
        ("rule", {"by_model": {"tiny": {"top_p": 2.0}}}, "b.by_model.tiny.top_p=2.0: must be in (0, 1]"),
        ("rule", {"by_model": {"tiny": {"batch_size": 0}}}, "b.by_model.tiny.batch_size=0: must be an integer >= 1"),
    ],
)
def test_each_bad_benchmark_value_is_refused_by_its_key(kind, change, says):
    """Each check of its own: without it an lm-eval run recorded a judge it never ran, a shard size of 0 or a
    by_model typo failed deep in the stage, and an OpenAI judge without an endpoint or a reference file ran."""
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig, _validate_benchmark

    files = {"rule": {"judge": JudgeConfig(kind="rule")}, "lm_eval": {"tasks": ["gsm8k"]}}
    files["alpacaeval"] = {"prompts_path": "p.json"}
    endpoint = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    b = BenchmarkConfig(
        name="b", kind=kind, **files.get(kind, {"prompts_path": "q.jsonl", "reference_path": "r.jsonl"})
    )
    if kind == "arena_hard":
        b.judge.base_url, b.judge.model = endpoint["base_url"], endpoint["model"]
    _validate_benchmark("b", b)
    for key, value in change.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(b, section) if section else b, name, value)
    with pytest.raises(ConfigError) as err:
        _validate_benchmark("b", b)
    assert says in str(err.value) and "SECRET" not in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "kind, key, value",
    [
        ("lm_eval", "apply_chat_template", False),
        ("lm_eval", "decoding.batch_size", 4),
        ("lm_eval", "limit", 10),
        ("arena_hard", "judge.bootstrap_seed", 7),
        ("alpacaeval", "judge.annotators_config", "alpaca_eval_gpt4"),
    ],
)
def test_a_setting_the_benchmark_kind_reads_is_accepted(kind, key, value):
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig, _validate_benchmark

    files = {"lm_eval": {"tasks": ["gsm8k"]}, "alpacaeval": {"prompts_path": "p.json"}}
    b = BenchmarkConfig(name="b", kind=kind, **files.get(kind, {"prompts_path": "q.jsonl"}), judge=JudgeConfig())
    section, _, name = key.rpartition(".")
    setattr(getattr(b, section) if section else b, name, value)
    _validate_benchmark("b", b)


def test_a_refused_setting_names_the_kinds_that_read_it():
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.config import BenchmarkConfig, DecodingConfig, _validate_benchmark

    b = BenchmarkConfig(name="b", kind="lm_eval", tasks=["gsm8k"], decoding=DecodingConfig(top_p=0.5))
    with pytest.raises(ConfigError) as err:
        _validate_benchmark("b", b)
    assert "kinds that do: rule, alpacaeval, arena_hard." in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["evaluate.push_to_hub=true"], "evaluate.hub_repo='': push_to_hub=true needs a repo id"),
        # a repo id the hub refuses: found at the push, after the first run's benchmarks, as a traceback
        (["evaluate.push_to_hub=true", "evaluate.hub_repo='me/my model'"], "evaluate.hub_repo='me/my model': Repo id"),
        (["evaluate.hub_token_env=hf_SECRET-token"], "evaluate.hub_token_env names the environment variable"),
        (["evaluate.device=tpu"], "evaluate.device='tpu': allowed values are"),
        (["evaluate.wandb=always"], "evaluate.wandb='always': allowed values are"),
        (["~benchmark"], "benchmark=None: choose at least one benchmark"),
    ],
)
def test_the_stages_own_settings_are_refused_by_their_keys(overrides, says):
    """A push with no repo to push to, an unknown device or W&B mode, no benchmark at all: refused before any run is
    read, naming the key."""
    from hydra import compose, initialize_config_dir

    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.config import to_evaluate_config
    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="evaluate", overrides=["output_dir=/tmp/unused", "evaluate.path=/tmp/runs", *overrides]
        )
    with pytest.raises(ConfigError) as err:
        to_evaluate_config(cfg)
    assert says in str(err.value), str(err.value)


def test_the_command_lines_decoding_wins_over_a_presets_by_model_entry_and_a_judge_needs_its_kind():
    """alpacaeval2's by_model gives Mistral-Instruct temperature 0.5 and 2048 tokens: a command-line
    decoding.temperature=0 (greedy) was replaced by it without a word, and results.json credited 0.5 to ``decoding``.
    An endpoint given without judge.kind=openai judged nothing, at exit 0."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.config import apply_command_line, decoding_for, to_evaluate_config
    from tests.conftest import CONF

    given = ["benchmark=alpacaeval2", "benchmarks.alpacaeval2.prompts_path=/x.json"]
    given += ["benchmarks.alpacaeval2.decoding.temperature=0"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["output_dir=/tmp/unused", "evaluate.path=/tmp/runs", *given])
        judged = compose(
            config_name="evaluate",
            overrides=["evaluate.path=/r", *given[:2], "benchmarks.alpacaeval2.judge.base_url=http://127.0.0.1:1/v1"],
        )
    OmegaConf.resolve(cfg)
    apply_command_line(cfg, given)
    b = to_evaluate_config(cfg).benchmarks["alpacaeval2"]
    mistral = decoding_for(b, "mistral-7b-instruct-v0.2")
    assert mistral.temperature == 0 and mistral.max_new_tokens == 2048  # the preset's other change stays
    with pytest.raises(ConfigError, match="judge.base_url='http://127.0.0.1:1/v1': is given but .*judge.kind=none"):
        apply_command_line(judged, ["benchmarks.alpacaeval2.judge.base_url=http://127.0.0.1:1/v1"])


def test_alpaca_evals_own_judge_without_a_usable_alpaca_eval_is_refused_before_any_answer(tmp_path, monkeypatch):
    """judge.kind=alpaca_eval without alpaca-eval was refused after every answer had been generated (805 prompts of
    every run); now with the prompt files, before any model loads. alpaca-eval installed but failing on an import of
    its own (0.6.6 imports pkg_resources, gone from setuptools 81) was called "not installed"."""
    from dataclasses import replace

    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
    from simpo_exp.evaluate.judge import alpaca_eval_unusable, length_controlled
    from simpo_exp.evaluate.run import check_benchmark_inputs

    prompts = tmp_path / "ae.json"
    prompts.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi.", "generator": "gpt4", "dataset": "x"}]))
    b = BenchmarkConfig(name="ae", kind="alpacaeval", prompts_path=str(prompts), judge=JudgeConfig(kind="alpaca_eval"))
    cfg = types.SimpleNamespace(benchmarks={"ae": b})
    monkeypatch.setitem(sys.modules, "alpaca_eval", None)  # not installed
    with pytest.raises(ConfigError, match=r"benchmarks.ae.judge.kind=alpaca_eval needs the alpaca-eval package"):
        check_benchmark_inputs(cfg)
    check_benchmark_inputs(types.SimpleNamespace(benchmarks={"ae": replace(b, judge=JudgeConfig(kind="openai"))}))
    broken = ModuleNotFoundError("No module named 'pkg_resources'", name="pkg_resources")
    said = alpaca_eval_unusable(broken)
    assert "installed but fails to import" in said and "pip install 'setuptools<81'" in said
    assert (
        length_controlled([{"preference": 2.0}] * 805, 805)[1]
        == "LC needs the alpaca-eval package: pip install -e '.[eval]'"
    )


def test_each_answer_shard_samples_from_a_seed_of_its_own(tmp_path, monkeypatch):
    """Under sampled decoding every shard drew from one stream if seeded alike: its own seed (the decoding's seed,
    the answers' tag and the shard), the same on a rerun."""
    from types import SimpleNamespace

    import simpo_exp.inference.sampling as sampling
    import simpo_exp.model
    from simpo_exp.evaluate.run import generate

    seeds = []

    class Sampler:
        def sample(self, ids, keys, seed):
            seeds.append(seed)
            return [[{"text": f"a{seed}", "n_tokens": 1, "finished": True}] for _ in ids]

        def close(self):
            pass

    made = []
    monkeypatch.setattr(sampling, "make_sampler", lambda *a, **k: made.append(k) or Sampler())
    monkeypatch.setattr(sampling, "prompt_token_ids", lambda tok, messages, fmt: [[1] * len(m) for m in messages])
    monkeypatch.setattr(simpo_exp.model, "load_tokenizer", lambda m: None)
    prompts = [{"id": str(i), "instruction": f"q{i}", "messages": [{}] * (7 - i)} for i in range(6)]
    dec = SimpleNamespace(shard_size=2, seed=0, temperature=0.7, top_p=0.95, max_new_tokens=8, backend="hf")
    (tmp_path / "m").mkdir()
    model = SimpleNamespace(path=str(tmp_path / "m"), name="m", dtype="float32", tokenizer_path=None)
    model.chat_template = None
    cfg = SimpleNamespace(model=model, dataset=SimpleNamespace(chat_format="generation_prompt"))
    cfg.hardware = SimpleNamespace(mixed_precision="auto", device="cpu", master_weights="fp32", lora=False)
    generate(cfg, prompts, dec, tmp_path / "shards", "trained", judge_only=False)
    assert len(seeds) == 3 and len(set(seeds)) == 3
    assert seeds == [sampling.derive_seed(0, "trained", i) for i in range(3)]
    assert made == [{"longest_prompt": 7}]  # vLLM's context sized to the longest prompt of every shard


# ------------------------------------------------------------------------- from a mutation review of evaluate/run.py
def test_the_rule_benchmark_counts_exact_answers_and_names_the_starting_weights(tmp_path, monkeypatch):
    """exact and exact_start count the answers sorted whole (a score of 1), not the partly sorted; start_weights is
    what the starting model's answers' manifest names."""
    import simpo_exp.evaluate.run as stage
    from simpo_exp.inference.files import write_json

    prompts = [{"id": f"p{i}", "instruction": "sort: 3 1 2", "messages": []} for i in range(3)]
    monkeypatch.setattr(stage.bm, "rule_prompts", lambda *args: prompts)
    monkeypatch.setattr(stage, "starting_policy", lambda cfg, device, run_dir, what: "start")
    texts = {"trained": ["1 2 3", "1 3 2", "1 2 3"], "start": ["1 3 2", "x", "1 3 2"]}
    out = tmp_path / "eval" / "rule"
    write_json(out / "shards" / "start-manifest.json", {"weights": {"random_init": {}, "seed": 1}})
    ctx = {
        "benchmark": types.SimpleNamespace(max_prompts=None, name="rule"),
        "run_cfg": None,
        "out": out,
        "run_dir": tmp_path,
        "device": "cpu",
        "trained": "trained",
        "generate": lambda cfg, asked, tag: [{"text": t, "n_tokens": 3} for t in texts[tag]],
    }
    result = stage._rule(ctx)
    assert result["metrics"]["exact"] == pytest.approx(200 / 3) and result["metrics"]["exact_start"] == 0.0
    assert result["start_weights"] == {"random_init": {}, "seed": 1}


def test_an_arena_answer_file_of_a_run_named_with_a_path_is_one_file(tmp_path, monkeypatch):
    """A run named by its overrides holds a path (model.path=/data/org/m): its answers went into folders under
    model_answer/, where arena-hard-auto's model_answer/*.jsonl does not look."""
    import simpo_exp.evaluate.run as stage
    from simpo_exp.inference.files import read_jsonl

    prompts = [{"id": f"q{i}", "instruction": f"Q{i}"} for i in range(2)]
    monkeypatch.setattr(stage.bm, "arena_prompts", lambda *args: (prompts, {"reference_generator": "gpt-4-0314"}))
    b = types.SimpleNamespace(name="arena-hard", prompts_path="p", reference_path="r", max_prompts=None)
    b.judge = types.SimpleNamespace(kind="none")
    out = tmp_path / "eval" / "arena-hard"
    ctx = {
        "benchmark": b,
        "out": out,
        "trained": "trained",
        "name": "model.path=/data/org/m,beta=2",
        "decoding": {"max_new_tokens": 8},
        "generate": lambda cfg, asked, tag: [{"text": "a", "n_tokens": 1, "finished": True} for _ in asked],
    }
    stage._arena_hard(ctx)
    (answers,) = (out / "model_answer").iterdir()
    assert answers.name == "model.path=_data_org_m,beta=2.jsonl"
    assert {row["model_id"] for row in read_jsonl(answers)} == {"model.path=_data_org_m,beta=2"}


def test_the_generate_entry_point_refuses_a_training_key_before_any_work(tmp_path, monkeypatch, capsys):
    """``python -m simpo_exp.generate beta=5``: a training key the stage never reads is refused by the entry point
    (exit 2, named), not run as if it had not been given."""
    import sys

    from simpo_exp.generate import __main__ as entry
    from simpo_exp.generate import run

    called = []
    monkeypatch.setattr(run, "generate_data", lambda config: called.append(config))
    monkeypatch.setattr(sys, "argv", ["generate", "beta=5", f"hydra.run.dir={tmp_path / 'log'}"])
    with pytest.raises(SystemExit) as leaving:
        entry.main()
    assert leaving.value.code == 2 and "beta" in capsys.readouterr().err and called == []


def test_a_benchmark_preset_in_a_searchpath_folder_is_known(tmp_path):
    from simpo_exp.evaluate.__main__ import _check_benchmark_names

    (tmp_path / "myconf" / "benchmark").mkdir(parents=True)
    (tmp_path / "myconf" / "benchmark" / "mysort.yaml").write_text("{}\n")
    searched = f"hydra.searchpath=[file://{tmp_path}/myconf]"
    _check_benchmark_names(["m", searched, "benchmark=mysort"])
    with pytest.raises(SystemExit) as leaving:
        _check_benchmark_names(["m", searched, "benchmark=nope"])
    assert leaving.value.code == 2


def test_lc_is_alpaca_evals_own_fit_on_a_cached_file_and_its_failure_is_said(monkeypatch):
    """AlpacaEval 2's LC win rate comes from alpaca-eval's GLM, which reads the hub's df_gamed.csv: without a cached
    copy it is not computed (nothing downloads) and the note says how to fetch it; a NaN standard error is null;
    a failure of the fit is said and the win rate stands. (alpaca-eval stood in here: not installed for the tests.)"""
    import huggingface_hub

    from simpo_exp.evaluate.judge import ALPACA_EVAL_ROWS, NO_LC, length_controlled

    handed, outcome = [], {"lc": {"length_controlled_winrate": 41.0, "lc_standard_error": float("nan")}}

    def fit(rows, save_weights_dir=None):
        handed.append(len(rows))
        if isinstance(outcome["lc"], Exception):
            raise outcome["lc"]
        return outcome["lc"]

    glm = types.ModuleType("alpaca_eval.metrics.glm_winrate")
    glm.get_length_controlled_winrate = fit
    for name, module in (("alpaca_eval", types.ModuleType("alpaca_eval")),
                         ("alpaca_eval.metrics", types.ModuleType("alpaca_eval.metrics")),
                         ("alpaca_eval.metrics.glm_winrate", glm)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    cached = {"path": None}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: cached["path"])
    rows = [{"preference": 2.0}] * ALPACA_EVAL_ROWS
    lc, why = length_controlled(rows, ALPACA_EVAL_ROWS)
    assert lc == NO_LC and "df_gamed.csv" in why and "nothing is downloaded" in why and handed == []
    cached["path"] = "/cache/df_gamed.csv"
    assert length_controlled(rows, ALPACA_EVAL_ROWS) == ({"lc_win_rate": 41.0, "lc_standard_error": None}, None)
    assert handed == [ALPACA_EVAL_ROWS]
    outcome["lc"] = RuntimeError("boom")
    lc, why = length_controlled(rows, ALPACA_EVAL_ROWS)
    assert lc == NO_LC and why.startswith("alpaca-eval's LC failed (RuntimeError: boom")
