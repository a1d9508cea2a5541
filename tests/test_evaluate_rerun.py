"""Re-runs of the evaluate stage on stored answers: a run that failed before its first answer shard binds nothing,
and ``evaluate.judge_only=true`` records the decoding the stored answers were made with."""

from __future__ import annotations

import json

import pytest

from simpo_exp.config import ConfigError
from tests.test_evaluate import ALPACA
from tests.test_evaluate_lmeval import evaluate_sweep, fake_run


def test_a_failed_start_binds_nothing_and_judge_only_records_the_stored_decoding(tmp_path, compose, caplog):
    run = fake_run(tmp_path / "run", [], compose, weights=True)
    prompts = tmp_path / "alpaca_eval.json"
    prompts.write_text(json.dumps(ALPACA))
    args = ["benchmark=alpacaeval2", f"benchmarks.alpacaeval2.prompts_path={prompts}", "evaluate.device=cpu"]
    args += ["benchmarks.alpacaeval2.max_prompts=2", "evaluate.model_card=false"]
    out = run / "eval" / "alpacaeval2"

    # vLLM is not installed: the command fails after writing the manifest, before any answer
    with pytest.raises(
        ConfigError, match=r"^benchmarks.alpacaeval2.decoding.backend=vllm needs vLLM.*decoding.backend=hf"
    ):
        evaluate_sweep(run, *args, "benchmarks.alpacaeval2.decoding.backend=vllm")
    assert (out / "shards" / "trained-manifest.json").exists() and not list(out.glob("shards/trained-0*"))

    # the corrected command is not refused
    short = "benchmarks.alpacaeval2.decoding.max_new_tokens=4"
    (record,) = evaluate_sweep(run, *args, "benchmarks.alpacaeval2.decoding.backend=hf", short)
    assert record["decoding"]["max_new_tokens"] == 4 and record["metrics"]["n"] == 2
    stored = json.loads((out / "shards" / "trained-manifest.json").read_text())["decoding"]
    assert stored["backend"] == "hf" and stored["max_new_tokens"] == 4

    # once answers exist, other settings are refused; judge_only reads them and records how they were made
    with pytest.raises(ConfigError, match="decoding.max_new_tokens: stored 4, now "):
        evaluate_sweep(run, *args, "benchmarks.alpacaeval2.decoding.backend=hf")
    other = f"benchmarks.alpacaeval2.prompts_path={tmp_path / 'other.json'}"  # the prompts' hash: said in words
    (tmp_path / "other.json").write_text(json.dumps(ALPACA[::-1]))
    with pytest.raises(ConfigError, match=r"\(prompts: another set \(prompts_path, its file, or max_prompts\)\)"):
        evaluate_sweep(run, *args, "benchmarks.alpacaeval2.decoding.backend=hf", short, other)
    with caplog.at_level("WARNING", logger="simpo_exp.evaluate.run"):
        (record,) = evaluate_sweep(run, *args, "evaluate.judge_only=true")
    saved = json.loads((out / "results.json").read_text())
    assert record["decoding"] == saved["decoding"] == stored
    # the command's own decoding goes unused: said, naming the key
    assert "judges the stored trained answers as they were made" in caplog.text
    assert "decoding.max_new_tokens: stored 4, now " in caplog.text
    assert saved["decoding"]["max_new_tokens"] == 4 and saved["decoding"]["temperature"] == 0
    # the cut answers' note names the limit they were made with, not the command's 4096; no batch size recorded
    assert record["metrics"]["cut_at_max_new_tokens"] == 2 and "reached max_new_tokens=4 (" in " ".join(record["notes"])
    assert "batch_size" not in saved["decoding"] and "batch_size" not in record["notes"][0]
    # a manifest that does not read back is named, under judge_only too (it failed there in a JSONDecodeError)
    from simpo_exp.inference.files import DamagedFile

    (out / "shards" / "trained-manifest.json").write_text('{"weights": ')
    with pytest.raises(DamagedFile, match="trained-manifest.json does not read back"):
        evaluate_sweep(run, *args, "evaluate.judge_only=true")


def test_a_copied_run_reuses_its_stored_answers_and_an_older_manifest_is_upgraded(tmp_path, compose):
    """Stored answers are bound to the weights' content, not the model directory's path and file times: a run
    directory copied elsewhere judges its stored answers (judge_only), and a manifest written the older way
    (path and times) for the same files is given their hash instead of being refused."""
    import shutil

    from simpo_exp.evaluate.run import _legacy_weights_id
    from simpo_exp.evaluate.runs import load_run_config, trained_policy

    run = fake_run(tmp_path / "run", [], compose, weights=True)
    prompts = tmp_path / "alpaca_eval.json"
    prompts.write_text(json.dumps(ALPACA))
    args = ["benchmark=alpacaeval2", f"benchmarks.alpacaeval2.prompts_path={prompts}", "evaluate.device=cpu"]
    args += ["benchmarks.alpacaeval2.max_prompts=2", "evaluate.model_card=false"]
    args += ["benchmarks.alpacaeval2.decoding.backend=hf", "benchmarks.alpacaeval2.decoding.max_new_tokens=4"]
    (first,) = evaluate_sweep(run, *args)
    # answers that ran into max_new_tokens=4 are counted and said (they are judged as cut)
    stored = [json.loads(line) for f in sorted((run / "eval" / "alpacaeval2" / "shards").glob("trained-0*.jsonl"))
              for line in f.read_text().splitlines()]  # fmt: skip
    cut = sum(not row["finished"] for row in stored)
    assert len(stored) == 2 and first["metrics"]["cut_at_max_new_tokens"] == cut == 2  # 4 tokens: none ends
    assert (f"{cut} of 2 answers reached" in " ".join(first["notes"])) == (cut > 0)
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, copy)
    for f in (copy / "model").iterdir():  # as a copy without preserved times would leave them
        f.touch()
    (again,) = evaluate_sweep(copy, *args, "evaluate.judge_only=true")
    assert again["metrics"] == first["metrics"]
    manifest = copy / "eval" / "alpacaeval2" / "shards" / "trained-manifest.json"
    stored = json.loads(manifest.read_text())
    assert set(stored["weights"]) == {"sha256"}

    legacy = _legacy_weights_id(trained_policy(load_run_config(copy), copy, "cpu"))
    manifest.write_text(json.dumps({**stored, "weights": legacy}))
    (third,) = evaluate_sweep(copy, *args)
    assert third["metrics"] == first["metrics"] and json.loads(manifest.read_text())["weights"] == stored["weights"]
    # answers of another chat template, fixed in model/ after they were made: the same weights, other prompts
    (copy / "model" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match=r"tokenizer.files: stored '[0-9a-f]+', now '[0-9a-f]+'"):
        evaluate_sweep(copy, *args)
    (copy / "model" / "chat_template.jinja").unlink()
    stored = json.loads(manifest.read_text())
    # answers of the model loaded in another dtype (evaluate once loaded float32 runs as their bf16 model.dtype)
    manifest.write_text(json.dumps({**stored, "model_dtype": "bfloat16"}))
    with pytest.raises(ConfigError, match="model_dtype: stored 'bfloat16', now 'float32'"):
        evaluate_sweep(copy, *args)
    # answers a GPU made: a float32 model samples in bf16 there (the manifest said float32 and nothing else)
    assert stored["mixed_precision"] == "no"  # on this CPU: the weights' own float32
    manifest.write_text(json.dumps({**stored, "mixed_precision": "bf16"}))
    with pytest.raises(ConfigError, match="mixed_precision: stored 'bf16', now 'no'"):
        evaluate_sweep(copy, *args)


def test_answers_stored_for_a_smoke_test_serve_the_larger_command_as_a_fresh_run_would_make_them(tmp_path, compose):
    """``max_prompts=3`` first (a smoke test), then ``max_prompts=4``: the complete shard is kept, the shard the
    smaller set cut short is made again whole, and every answer equals a fresh ``max_prompts=4`` run's. Fewer
    prompts than stored are served where they end on a shard's end; inside a shard they are refused, saying why."""
    import shutil

    run = fake_run(tmp_path / "run", [], compose, weights=True)
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh)
    prompts = tmp_path / "alpaca_eval.json"
    prompts.write_text(json.dumps(ALPACA))
    args = ["benchmark=alpacaeval2", f"benchmarks.alpacaeval2.prompts_path={prompts}", "evaluate.device=cpu"]
    args += ["evaluate.model_card=false", "benchmarks.alpacaeval2.decoding.backend=hf"]
    args += ["benchmarks.alpacaeval2.decoding.max_new_tokens=4", "benchmarks.alpacaeval2.shard_size=2"]
    shards = run / "eval" / "alpacaeval2" / "shards"

    (record,) = evaluate_sweep(run, *args, "benchmarks.alpacaeval2.max_prompts=3")
    assert record["metrics"]["n"] == 3 and len((shards / "trained-00001.jsonl").read_text().splitlines()) == 1
    first_shard = (shards / "trained-00000.jsonl").stat().st_mtime_ns
    (record,) = evaluate_sweep(run, *args, "benchmarks.alpacaeval2.max_prompts=4")
    assert record["metrics"]["n"] == 4 and (shards / "trained-00000.jsonl").stat().st_mtime_ns == first_shard
    evaluate_sweep(fresh, *args, "benchmarks.alpacaeval2.max_prompts=4")
    for name in ("trained-00000.jsonl", "trained-00001.jsonl"):
        made = fresh / "eval" / "alpacaeval2" / "shards" / name
        assert (shards / name).read_text() == made.read_text(), name
    assert (
        json.loads((shards / "trained-manifest.json").read_text())["prompts"]
        == json.loads((fresh / "eval" / "alpacaeval2" / "shards" / "trained-manifest.json").read_text())["prompts"]
    )

    (record,) = evaluate_sweep(run, *args, "benchmarks.alpacaeval2.max_prompts=2")  # the first shard, as stored
    assert record["metrics"]["n"] == 2 and (shards / "trained-00000.jsonl").stat().st_mtime_ns == first_shard
    with pytest.raises(ConfigError, match=r"answers were made for 4 prompts; the first 1 end inside a shard of 2"):
        evaluate_sweep(run, *args, "benchmarks.alpacaeval2.max_prompts=1")


@pytest.mark.parametrize("chat_format", ["simpo_repo", "generation_prompt"])
def test_a_run_trained_with_the_official_chat_format_is_prompted_as_it_was_trained(
    tmp_path, compose, monkeypatch, chat_format
):
    """dataset.chat_format=simpo_repo trains every prompt with an empty system turn first where the template has a
    system branch (zephyr-7b-sft-full's: the Mistral Base recipe); its official AlpacaEval template writes that turn
    too. The evaluate stage prompted without it, a format the model was neither trained nor officially judged on."""
    from transformers import AutoTokenizer

    from simpo_exp.inference.sampling import HFSampler
    from tests.test_data import SYSTEM_TEMPLATE

    run = fake_run(tmp_path / "run", [f"dataset.chat_format={chat_format}"], compose, weights=True)
    tok = AutoTokenizer.from_pretrained(run / "model")
    tok.chat_template = SYSTEM_TEMPLATE
    tok.save_pretrained(run / "model")
    seen, sample = [], HFSampler.sample
    monkeypatch.setattr(
        HFSampler, "sample", lambda self, prompts, *a: seen.extend(prompts) or sample(self, prompts, *a)
    )
    prompts = tmp_path / "alpaca_eval.json"
    prompts.write_text(json.dumps(ALPACA))
    args = ["benchmark=alpacaeval2", f"benchmarks.alpacaeval2.prompts_path={prompts}", "evaluate.device=cpu"]
    args += ["benchmarks.alpacaeval2.max_prompts=1", "evaluate.model_card=false"]
    evaluate_sweep(
        run, *args, "benchmarks.alpacaeval2.decoding.backend=hf", "benchmarks.alpacaeval2.decoding.max_new_tokens=2"
    )
    system = "<|system|>\n<|eos|>\n" if chat_format == "simpo_repo" else ""
    assert tok.decode(seen[0]) == f"<|bos|>{system}<|user|>\n{ALPACA[0]['instruction']}<|eos|>\n<|assistant|>\n"


def test_a_failed_evaluation_leaves_no_earlier_result_and_judge_only_serves_fewer_stored_prompts(tmp_path, compose):
    """A re-evaluation whose judge failed left the earlier evaluation's results.json (another judge, other prompts)
    in use: compare and the model card showed it beside the new answers. And judge_only refused a smaller
    ``max_prompts`` ending on a shard's end, which a plain run serves, advising to delete the stored answers."""
    from http.server import ThreadingHTTPServer

    from simpo_exp.evaluate.judge import JudgeError
    from simpo_exp.inference.results import read_results
    from tests.runs import free_port
    from tests.test_evaluate import FakeJudge
    from tests.test_evaluate_judging import serve

    run = fake_run(tmp_path / "run", [], compose, weights=True)
    prompts = tmp_path / "alpaca_eval.json"
    prompts.write_text(json.dumps(ALPACA))
    key = "benchmarks.alpacaeval2"
    args = ["benchmark=alpacaeval2", f"{key}.prompts_path={prompts}", "evaluate.device=cpu", f"{key}.shard_size=2"]
    args += [f"{key}.decoding.backend=hf", f"{key}.decoding.max_new_tokens=4", f"{key}.judge.kind=openai"]
    args += [f"{key}.judge.model=fake-judge", f"{key}.judge.max_retries=0", f"{key}.judge.timeout_s=5"]
    server, url = serve(FakeJudge)
    try:
        (first,) = evaluate_sweep(run, *args, f"{key}.judge.base_url={url}", f"{key}.max_prompts=2")
        assert first["metrics"]["n"] == 2 and read_results(run)
        closed = ThreadingHTTPServer(("127.0.0.1", free_port()), FakeJudge)  # a port nothing answers on
        down = f"http://127.0.0.1:{closed.server_address[1]}/v1"
        closed.server_close()
        with pytest.raises(JudgeError):
            evaluate_sweep(run, *args, f"{key}.judge.base_url={down}", f"{key}.max_prompts=4")
        assert read_results(run) == {}  # the 2-prompt result is not shown beside the 4 answers
        assert "win_rate" not in (run / "model" / "README.md").read_text()
        out = run / "eval" / "alpacaeval2"
        assert json.loads((out / "results.previous.json").read_text())["metrics"]["n"] == 2  # kept, not lost

        (again,) = evaluate_sweep(run, *args, f"{key}.judge.base_url={url}", f"{key}.max_prompts=4")
        assert again["metrics"]["n"] == 4 and read_results(run)["bench/alpacaeval2/n"] == 4
        judge_only = [*args, f"{key}.judge.base_url={url}", "evaluate.judge_only=true"]
        (fewer,) = evaluate_sweep(run, *judge_only, f"{key}.max_prompts=2")  # the first shard of the 4 answers
        assert fewer["metrics"]["n"] == 2
        with pytest.raises(ConfigError, match="judges stored answers only") as refused:
            evaluate_sweep(run, *judge_only, f"{key}.max_prompts=6")
        assert "delete" not in str(refused.value)
    finally:
        server.shutdown()


def test_arena_hard_prompts_go_without_the_training_pipelines_empty_system_turn(tmp_path, compose, monkeypatch):
    """A run trained with dataset.chat_format=simpo_repo (an empty system turn first, as SimPO's Mistral-Base
    recipe) answered Arena-Hard's questions behind that system turn too; arena-hard-auto sends the user turn alone
    (SimPO's api configs name no system prompt). AlpacaEval keeps it: SimPO's own AlpacaEval templates write it."""
    import simpo_exp.inference.sampling as sampling
    from tests.test_evaluate_inputs import answer, questions

    rendered = []
    real = sampling.prompt_token_ids

    def recording(tokenizer, prompts, chat_format="generation_prompt"):
        rendered.append(chat_format)
        return real(tokenizer, prompts, chat_format)

    monkeypatch.setattr(sampling, "prompt_token_ids", recording)
    run = fake_run(tmp_path / "run", ["dataset.chat_format=simpo_repo"], compose, weights=True)
    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps(ALPACA))
    refs = tmp_path / "gpt-4-0314.jsonl"
    refs.write_text("".join(json.dumps(answer(f"q{i}")) + "\n" for i in range(2)))
    args = ["benchmark=[alpacaeval2,arena-hard]", "evaluate.device=cpu", "evaluate.model_card=false"]
    args += [f"benchmarks.alpacaeval2.prompts_path={alpaca}", "benchmarks.alpacaeval2.max_prompts=1"]
    args += [
        f"benchmarks.arena-hard.prompts_path={questions(tmp_path, n=2)}",
        f"benchmarks.arena-hard.reference_path={refs}",
    ]
    args += ["benchmarks.alpacaeval2.decoding.max_new_tokens=2", "benchmarks.arena-hard.decoding.max_new_tokens=2"]
    args += ["benchmarks.alpacaeval2.decoding.backend=hf", "benchmarks.arena-hard.decoding.backend=hf"]
    evaluate_sweep(run, *args)
    assert rendered == ["simpo_repo", "generation_prompt"]
    manifest = run / "eval" / "arena-hard" / "shards" / "trained-manifest.json"
    assert json.loads(manifest.read_text())["chat_format"] == "generation_prompt"


def test_answers_made_in_larger_batches_serve_a_run_resumed_with_smaller_ones(tmp_path):
    """decoding.batch_size is how many prompts go at once, not what is answered: a run killed for memory and resumed
    with a smaller batch keeps its stored answers (it was refused, "decoding.batch_size: stored 16, now 8")."""
    from simpo_exp.evaluate.run import _check_manifest

    path = tmp_path / "trained-manifest.json"
    made = {"weights": {"sha256": "x"}, "prompts": "p", "decoding": {"temperature": 0.0, "batch_size": 16}}
    path.write_text(json.dumps(made))
    now = {**made, "decoding": {"temperature": 0.0, "batch_size": 8}}
    _check_manifest(path, now, has_answers=True)  # not refused


def test_answers_sampled_by_the_hf_backend_are_bound_to_their_batch_size(tmp_path):
    """One random stream per shard, drawn batch after batch: at temperature 0.5 every one of 8 answers differed
    between batch sizes 8 and 1, and a resume with another batch mixed the two samples under one recorded decoding.
    Greedy answers, and vLLM's (seeded per request), do not depend on it."""
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.run import _check_manifest
    from simpo_exp.inference.results import answer_decoding

    sampled = {"backend": "hf", "temperature": 0.5, "batch_size": 8, "vllm_gpu_memory_utilization": 0.9}
    assert answer_decoding(sampled) == {"backend": "hf", "temperature": 0.5, "batch_size": 8}
    assert "batch_size" not in answer_decoding(sampled | {"backend": "vllm"})
    assert "batch_size" not in answer_decoding(sampled | {"temperature": 0.0})
    path = tmp_path / "trained-manifest.json"
    made = {"weights": {"sha256": "x"}, "prompts": "p", "decoding": answer_decoding(sampled)}
    path.write_text(json.dumps(made))
    with pytest.raises(ConfigError, match="batch_size"):
        _check_manifest(path, {**made, "decoding": answer_decoding(sampled | {"batch_size": 4})}, has_answers=True)
    _check_manifest(path, made, has_answers=True)  # the same sampled command keeps its answers
    assert json.loads(path.read_text())["decoding"]["batch_size"] == 8
    older = {**made, "decoding": {"backend": "hf", "temperature": 0.5}}  # made before the batch size was recorded
    path.write_text(json.dumps(older))
    _check_manifest(path, {**made, "decoding": answer_decoding(sampled | {"batch_size": 4})}, has_answers=True)


def test_answers_cut_at_max_new_tokens_are_counted_and_older_ones_count_as_finished():
    """Answers stored before ``finished`` was recorded have no flag: counted finished, as the docstring says, not
    as cut (a rerun judging old answers would have called every one of them cut)."""
    from types import SimpleNamespace

    from simpo_exp.evaluate.run import _count_cut

    gens = [{"finished": False}, {"finished": True}, {}, {"finished": False}]
    ctx = {"decoding": {"max_new_tokens": 64}, "benchmark": SimpleNamespace(name="alpaca_eval")}
    metrics = {}
    (note,) = _count_cut(metrics, gens, ctx)
    assert metrics["cut_at_max_new_tokens"] == 2 and note.startswith("2 of 4 answers reached max_new_tokens=64")
    assert _count_cut(metrics, [{}, {"finished": True}], ctx) == [] and metrics["cut_at_max_new_tokens"] == 0
