"""benchmark=gsm8k through lm-evaluation-harness, with a stand-in lm_eval module that records how it was called:
the model path reaches lm-eval whole (sweep job directories hold commas), the hub is off during the call, and the
printed compare hint names a metric the results hold."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import yaml

import simpo_exp.config  # noqa: F401  (stores the training schema the runs' configs are composed with)
from tests.conftest import CONF

RESULTS = {  # lm-eval's results for one task: "<metric>,<filter>" keys, with their standard errors
    "gsm8k": {
        # a sample count in the results (lm-eval 0.4.13's sample_len; "samples" in others), first: it was ranked on
        # as a score; 0.4.8 leaves it out of the results it returns, and its n-samples counts (below)
        "sample_len": 99,
        "alias": "gsm8k",
        "exact_match,strict-match": 0.25,
        "exact_match_stderr,strict-match": 0.1,
        "exact_match,flexible-extract": 0.5,
        "exact_match_stderr,flexible-extract": "N/A",  # lm-eval's text where it computed none
    }
}


@pytest.fixture
def lm_eval_calls(monkeypatch) -> list[dict]:
    """A stand-in ``lm_eval`` module; each call's arguments, with the hub's offline flags as the call saw them."""
    import datasets.config
    import huggingface_hub.constants

    calls = []

    def simple_evaluate(**kwargs):
        hub, data = huggingface_hub.constants, datasets.config
        offline = {"hub": hub.HF_HUB_OFFLINE, "datasets": data.HF_HUB_OFFLINE, "is_offline": hub.is_offline_mode()}
        calls.append({**kwargs, "offline": offline})
        n_samples = {"gsm8k": {"original": 1319, "effective": kwargs["limit"] or 1319}}  # lm-eval's own count
        return {"results": RESULTS, "versions": {"gsm8k": 3}, "n-shot": {"gsm8k": 5}, "n-samples": n_samples}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    # as in a process started without HF_HUB_OFFLINE: both libraries read it once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return calls


def fake_run(path: Path, overrides: list[str], compose, weights: bool = False) -> Path:
    """A run directory as training leaves it, as far as the evaluate stage reads it: its config and ``model/``, with
    the weights of a small random Llama and the tiny tokenizer when ``weights`` (lm-eval, stood in, loads none)."""
    import yaml
    from omegaconf import OmegaConf

    cfg = compose(*overrides)
    (path / ".hydra").mkdir(parents=True)
    saved = {s: OmegaConf.to_container(cfg[s], resolve=True) for s in ("model", "dataset", "hardware", "logger")}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**saved, "seed": 1}))
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if weights:
        save_small_model(path / "model")
    else:
        (path / "model").mkdir()
        (path / "model" / "config.json").write_text("{}\n")
    (path / "finished.json").write_text("{}\n")  # written last by a run that finished
    return path


def save_small_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_exp.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **shape)).save_pretrained(path)
    tok.save_pretrained(path)


def evaluate_sweep(sweep: Path, *overrides: str) -> list[dict]:
    from hydra import compose, initialize_config_dir

    from simpo_exp.evaluate.config import to_evaluate_config
    from simpo_exp.evaluate.run import evaluate_all

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[f"evaluate.path={sweep}", "output_dir=/tmp/unused", "evaluate.wandb=off", *overrides],
        )
    return evaluate_all(to_evaluate_config(cfg))


def test_gsm8k_gets_the_whole_model_path_offline_and_the_hint_names_a_recorded_metric(
    lm_eval_calls, tmp_path, capsys, compose
):
    import datasets.config
    import huggingface_hub.constants

    from simpo_exp.compare import load_runs, runs_table

    sweep = tmp_path / "sweep"
    runs = [
        fake_run(sweep / "0_beta=2,gamma_beta_ratio=0.3", ["beta=2", "gamma_beta_ratio=0.3"], compose),
        fake_run(sweep / "1_beta=5,gamma_beta_ratio=0.3", ["beta=5", "gamma_beta_ratio=0.3"], compose),
    ]
    records = evaluate_sweep(
        sweep, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2", "benchmarks.gsm8k.apply_chat_template=true"
    )
    # the model path whole, in the dtype the stage's own sampler uses (the saved float32 weights on a CPU)
    args = [{"pretrained": str((r / "model").resolve()), "dtype": "float32"} for r in runs]
    assert [c["model_args"] for c in lm_eval_calls] == args
    assert all(c["offline"] == {"hub": True, "datasets": True, "is_offline": True} for c in lm_eval_calls)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # put back
    assert lm_eval_calls[0]["tasks"] == ["gsm8k"] and lm_eval_calls[0]["limit"] == 2
    # the few-shot format given, not left to lm-eval's default (one user turn before 0.4.13, turns since), and recorded
    assert lm_eval_calls[0]["fewshot_as_multiturn"] is True and records[0]["lm_eval"]["fewshot_as_multiturn"] is True
    metrics = records[0]["metrics"]
    assert metrics == {
        "gsm8k/exact_match:strict-match": 0.25,
        "gsm8k/exact_match:flexible-extract": 0.5,
        "gsm8k/exact_match_stderr:strict-match": 0.1,  # after the scores: the first score is what runs rank by
        "gsm8k/n": 2.0,
    }
    assert list(metrics)[:2] == ["gsm8k/exact_match:strict-match", "gsm8k/exact_match:flexible-extract"]
    assert records[0]["decoding"] is None and records[0]["lm_eval"]["limit"] == 2  # what lm-eval ran with
    assert records[0]["lm_eval"]["dtype"] == "float32" and records[0]["lm_eval"]["device"] == "cpu"
    assert any("limit=2" in n for n in records[0]["notes"]) and lm_eval_calls[0]["batch_size"] == 16
    saved = json.loads((runs[0] / "eval" / "gsm8k" / "lm_eval_results.json").read_text())
    assert saved["results"] == RESULTS and saved["n-samples"]["gsm8k"] == {"original": 1319, "effective": 2}

    hint = capsys.readouterr().out.split("rank them: ", 1)[1].strip()
    assert hint == f"python -m simpo_exp.compare {sweep} --metric bench/gsm8k/gsm8k/exact_match:strict-match"
    metric = hint.split("--metric ", 1)[1]
    assert [row[metric] for row in runs_table(load_runs(sweep), metric)] == [0.25, 0.25]  # compare knows it


def test_a_task_lm_eval_does_not_know_is_refused_by_name_before_the_model_loads(
    lm_eval_calls, tmp_path, compose, monkeypatch
):
    from simpo_exp.config import ConfigError

    tasks = types.SimpleNamespace(TaskManager=lambda: types.SimpleNamespace(all_tasks=["gsm8k", "arc_easy"]))
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks)
    run = fake_run(tmp_path / "run", [], compose)
    with pytest.raises(ConfigError, match=r"benchmarks.gsm8k.tasks=\['gsm8kk'\]: lm-eval has no task \['gsm8kk'\]"):
        evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.tasks=[gsm8kk]")
    assert lm_eval_calls == []
    # behind another benchmark: refused before that one generates (the typo came at the lm-eval benchmark's turn,
    # after the first had answered and been judged on the first run, and the sweep's other runs got nothing)
    with pytest.raises(ConfigError, match=r"lm-eval has no task \['gsm8kk'\]"):
        evaluate_sweep(run, "benchmark=[rule,gsm8k]", "benchmarks.gsm8k.tasks=[gsm8kk]")
    assert not (run / "eval" / "rule").exists()


def test_a_task_whose_data_set_is_not_cached_is_refused_before_any_run_is_evaluated(
    lm_eval_calls, tmp_path, compose, monkeypatch
):
    """The missing data set was found at the lm-eval benchmark's turn: after every run had answered (and been judged)
    for the benchmarks before it. lm-eval's tasks are now built once at the start, with the hub off."""
    import huggingface_hub.constants

    from simpo_exp.data.sources import DataSourceError

    built = []

    def get_task_dict(names, given):
        assert given is manager  # the index check_tasks built, not a second one (it reads every task's YAML)
        built.append((list(names), huggingface_hub.constants.HF_HUB_OFFLINE))
        if "gsm8k" in names:  # what datasets says for a data set neither cached nor reachable
            raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")
        return {}

    manager = types.SimpleNamespace(all_tasks=["gsm8k", "arc_easy"])
    tasks = types.SimpleNamespace(TaskManager=lambda: manager, get_task_dict=get_task_dict)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks)
    run = fake_run(tmp_path / "run", [], compose)
    with pytest.raises(DataSourceError, match=r"benchmarks.gsm8k.tasks=\['gsm8k'\]: a task's data set is not on th"):
        evaluate_sweep(run, "benchmark=[rule,gsm8k]")
    assert built == [(["gsm8k"], True)] and huggingface_hub.constants.HF_HUB_OFFLINE is False  # hub off for it alone
    assert not (run / "eval" / "rule").exists() and lm_eval_calls == []
    (record,) = evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.tasks=[arc_easy]", "benchmarks.gsm8k.limit=2")
    assert built[-1] == (["arc_easy"], True) and len(lm_eval_calls) == 1  # a cached task's data: evaluated


def test_a_finished_lm_eval_is_not_run_again_for_the_same_weights_and_settings(lm_eval_calls, tmp_path, compose):
    """lm-eval has no resume: the same command scored every task of every run again."""
    run = fake_run(tmp_path / "run", [], compose)
    (first,) = evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    (again,) = evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    assert len(lm_eval_calls) == 1 and again["metrics"] == first["metrics"]
    evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=3")  # other settings: evaluated again
    assert len(lm_eval_calls) == 2 and lm_eval_calls[1]["limit"] == 3


def test_a_chat_template_fixed_in_the_model_folder_evaluates_again(lm_eval_calls, tmp_path, compose):
    """The results were bound to the weights' hash alone: a chat template fixed in model/ (apply_chat_template
    renders with it) kept the scores of the old one. A record written before the tokenizer was recorded is kept."""
    run = fake_run(tmp_path / "run", [], compose, weights=True)
    args = ("benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    (first,) = evaluate_sweep(run, *args)
    assert first["made_with"]["tokenizer"]["files"]
    (run / "model" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (again,) = evaluate_sweep(run, *args)
    assert len(lm_eval_calls) == 2 and again["made_with"]["tokenizer"] != first["made_with"]["tokenizer"]
    results = run / "eval" / "gsm8k" / "results.json"
    older = json.loads(results.read_text())
    del older["made_with"]["tokenizer"]
    results.write_text(json.dumps(older))
    evaluate_sweep(run, *args)
    assert len(lm_eval_calls) == 2  # kept: an older record is not held to a key it could not have
    results.write_text(json.dumps(older | {"metrics": {}}))  # made with all the same, but no score in it
    evaluate_sweep(run, *args)
    assert len(lm_eval_calls) == 3  # evaluated again, not kept empty for good


def test_another_lm_eval_version_evaluates_again(lm_eval_calls, tmp_path, compose, monkeypatch):
    """Scores of lm-eval 0.4.5 were kept after an upgrade to 0.4.13 (whose few-shot format and task versions may
    differ) and stamped with the new version."""
    import simpo_exp.evaluate.run as run_mod

    real = run_mod._versions
    run = fake_run(tmp_path / "run", [], compose)
    monkeypatch.setattr(run_mod, "_versions", lambda: {**real(), "lm-eval": "0.4.5"})
    evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    monkeypatch.setattr(run_mod, "_versions", lambda: {**real(), "lm-eval": "0.4.13"})
    (again,) = evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    assert len(lm_eval_calls) == 2 and again["made_with"]["lm_eval_version"] == "0.4.13"


def test_an_lm_eval_without_the_few_shot_format_setting_is_refused(tmp_path, compose, monkeypatch):
    from simpo_exp.config import ConfigError

    def simple_evaluate(model, model_args, tasks, num_fewshot, limit, device, batch_size, apply_chat_template):
        raise AssertionError("not to be called")

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    run = fake_run(tmp_path / "run", [], compose)
    with pytest.raises(ConfigError, match=r"benchmarks.gsm8k.apply_chat_template=true needs lm-eval >= 0.4.3"):
        evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2", "benchmarks.gsm8k.apply_chat_template=true")


def test_on_a_gpu_lm_eval_loads_the_model_in_the_autocast_the_run_trained_in(monkeypatch):
    """lm-eval's default dtype ("auto") loaded the saved float32 master weights as float32 on a GPU."""
    import torch

    from simpo_exp.evaluate import lmeval

    def policy(mixed_precision: str, device: str = "auto", dtype: str = "float32", master: str = "fp32"):
        return types.SimpleNamespace(
            model=types.SimpleNamespace(dtype=dtype),
            hardware=types.SimpleNamespace(
                mixed_precision=mixed_precision, device=device, master_weights=master, lora=False
            ),
        )

    monkeypatch.setattr(lmeval, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert lmeval.lm_eval_dtype(policy("auto")) == "bfloat16" and lmeval.lm_eval_device(policy("auto")) == "cuda"
    assert lmeval.lm_eval_dtype(policy("no")) == "float32" and lmeval.lm_eval_dtype(policy("fp16")) == "float16"
    assert lmeval.lm_eval_dtype(policy("auto", device="cpu")) == "float32"  # evaluate.device=cpu on a GPU machine
    assert lmeval.lm_eval_dtype(policy("auto", dtype="auto")) == "auto"
    # bf16 weights upcast for training (master_weights=fp32) sample in float32 where nothing autocasts, as the
    # evaluate stage's own sampler does; lm-eval was given them in bf16
    assert lmeval.lm_eval_dtype(policy("no", dtype="bfloat16")) == "float32"
    assert lmeval.lm_eval_dtype(policy("no", dtype="bfloat16", master="model")) == "bfloat16"


def test_a_task_group_is_ranked_by_its_own_score_not_its_first_subtask():
    """lm-eval lists a group's subtasks before the group: ``tasks=[mmlu]`` ranked a sweep on its first subtask's
    100 abstract-algebra questions."""
    from simpo_exp.evaluate.lmeval import _flat_metrics

    results = {
        "mmlu_abstract_algebra": {"acc,none": 0.3, "acc_stderr,none": 0.04},
        "mmlu_anatomy": {"acc,none": 0.5},
        "mmlu": {"acc,none": 0.45, "alias": "mmlu"},
    }
    ranked = ["mmlu/acc:none", "mmlu_abstract_algebra/acc:none", "mmlu_anatomy/acc:none"]
    assert list(_flat_metrics(results, ["mmlu"])) == [*ranked, "mmlu_abstract_algebra/acc_stderr:none"]
    # the number of samples scored, under either name lm-eval has given it: a count, after the scores
    results["mmlu_abstract_algebra"]["samples"], results["mmlu_anatomy"]["sample_len"] = 100, 135
    counts = {k: v for k, v in _flat_metrics(results, ["mmlu"]).items() if k.endswith("/n")}
    assert counts == {"mmlu_abstract_algebra/n": 100.0, "mmlu_anatomy/n": 135.0}
    # lm-eval 0.4.8 takes the count out of the results it returns: n-samples's effective count (under a limit)
    del results["mmlu_abstract_algebra"]["samples"], results["mmlu_anatomy"]["sample_len"]
    n_samples = {t: {"original": 100, "effective": 10} for t in ("mmlu_abstract_algebra", "mmlu_anatomy", "other")}
    counts = {k: v for k, v in _flat_metrics(results, ["mmlu"], n_samples).items() if k.endswith("/n")}
    assert counts == {"mmlu_abstract_algebra/n": 10.0, "mmlu_anatomy/n": 10.0}


def test_judge_only_runs_no_lm_eval(lm_eval_calls, tmp_path, compose):
    """evaluate.judge_only=true judges stored answers without sampling; for lm-eval it ran the whole model."""
    from simpo_exp.config import ConfigError

    run = fake_run(tmp_path / "run", [], compose)
    with pytest.raises(ConfigError, match="evaluate.judge_only=true, but benchmarks.gsm8k"):
        evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2", "evaluate.judge_only=true")
    assert lm_eval_calls == []
    evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    (kept,) = evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2", "evaluate.judge_only=true")
    assert len(lm_eval_calls) == 1 and kept["metrics"]["gsm8k/exact_match:strict-match"] == 0.25  # kept as stored


def test_a_failed_lm_eval_leaves_no_result_of_other_settings(lm_eval_calls, tmp_path, compose, monkeypatch):
    """A re-evaluation with other settings that failed (out of memory, a task's data missing) left the earlier
    settings' results.json in place: compare and the model card showed those scores as the run's."""
    from simpo_exp.inference.results import read_results

    run = fake_run(tmp_path / "run", [], compose)
    evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")

    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=broken))
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=3")
    assert read_results(run) == {}
    previous = run / "eval" / "gsm8k" / "results.previous.json"
    assert json.loads(previous.read_text())["lm_eval"]["limit"] == 2  # kept, not lost


def test_kept_lm_eval_scores_stay_kept_on_every_later_run(lm_eval_calls, tmp_path, compose):
    """The record a kept evaluation writes again must still say what it was made with: else the third identical
    command scored every task again."""
    run = fake_run(tmp_path / "run", [], compose)
    for _ in range(3):
        (rec,) = evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    assert len(lm_eval_calls) == 1 and rec["lm_eval"]["limit"] == 2 and rec["made_with"]["limit"] == 2


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("benchmarks.gsm8k.num_fewshot=3", "num_fewshot", 3),
        ("benchmarks.gsm8k.apply_chat_template=true", "apply_chat_template", True),
    ],
)
def test_lm_eval_scores_of_other_few_shot_settings_are_not_kept(lm_eval_calls, tmp_path, compose, override, key, value):
    """The number of few-shot examples and the chat template move lm-eval's score: scores made with others are
    not taken as this command's."""
    run = fake_run(tmp_path / "run", [], compose)
    evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    (rec,) = evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2", override)
    assert len(lm_eval_calls) == 2 and lm_eval_calls[1][key] == value and rec["lm_eval"][key] == value


def test_lm_eval_scores_of_the_model_loaded_in_another_dtype_are_not_kept(
    lm_eval_calls, tmp_path, compose, monkeypatch
):
    """The same weights evaluated on a GPU (bf16) and on a CPU (float32) give other scores: neither is kept for the
    other."""
    from simpo_exp.evaluate import lmeval

    run = fake_run(tmp_path / "run", [], compose)
    evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    monkeypatch.setattr(lmeval, "lm_eval_dtype", lambda policy_cfg: "bfloat16")
    (rec,) = evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    assert len(lm_eval_calls) == 2 and lm_eval_calls[1]["model_args"]["dtype"] == "bfloat16"


def test_a_task_whose_data_set_is_not_cached_is_named_and_the_hub_settings_are_put_back(
    lm_eval_calls, tmp_path, compose, monkeypatch
):
    """lm-eval ends in the datasets library's error where a task's data is not in the cache: the stage says which
    tasks and what to do; and the environment it switched offline is as it was."""
    import os

    from simpo_exp.data.sources import DataSourceError

    def uncached(**kwargs):
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=uncached))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run = fake_run(tmp_path / "run", [], compose)
    with pytest.raises(DataSourceError, match=r"benchmarks.gsm8k.tasks=\['gsm8k'\]: a task's data set is not on this"):
        evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    assert "HF_DATASETS_OFFLINE" not in os.environ and "HF_HUB_OFFLINE" not in os.environ


def test_a_run_of_a_model_with_its_own_code_is_loaded_by_lm_eval_with_it(lm_eval_calls, tmp_path, compose):
    """The answer samplers pass the run's ``model.trust_remote_code``; lm-eval was not given it, and its loader
    refuses such a model by default: a traceback at the lm-eval benchmark after the others had run."""
    run = fake_run(tmp_path / "run", ["model.trust_remote_code=true"], compose)
    evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    assert lm_eval_calls[0]["model_args"]["trust_remote_code"] is True


def test_a_run_named_from_the_home_folder_is_pushed_as_itself(lm_eval_calls, tmp_path, compose, monkeypatch, capsys):
    """evaluate.path=~/runs/one found the run, but the push's check of one run or a sweep read the path literally,
    found no run there, and pushed the single run to a sweep job's repo (``me/simpo-one``)."""
    from tests.test_evaluate import fake_hub

    created, _, _ = fake_hub(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    run = fake_run(tmp_path / "runs" / "one", [], compose)
    push = (
        "evaluate.push_to_hub=true",
        "evaluate.hub_repo=me/simpo",
        "evaluate.hub_token_env=SIMPO_EXP_TEST_PUSH_TOKEN",
    )
    evaluate_sweep(run, "evaluate.path='~/runs/one'", "benchmark=gsm8k", "benchmarks.gsm8k.limit=2", *push)
    assert created == [("me/simpo", True)] and f"pushed {run / 'model'} -> " in capsys.readouterr().out


def test_a_run_config_of_another_shape_is_named_not_a_traceback(tmp_path):
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.runs import load_run_config

    path = tmp_path / ".hydra" / "config.yaml"
    path.parent.mkdir()
    for text in ("- a\n", "model: [1]\n", "model: [unclosed\n", "seed: abc\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"cannot read the run's config {path}"):
            load_run_config(tmp_path)


def test_each_evaluated_run_sends_its_own_benchmarks_to_wandb_as_asked(lm_eval_calls, tmp_path, compose, monkeypatch):
    """evaluate.wandb decides whether results go to W&B at all; each run sends the benchmarks evaluated on it now,
    saying whether it trained with W&B (a run that did resumes its W&B run, one that did not gets one)."""
    from simpo_exp.evaluate import wandb_log

    sent = []
    monkeypatch.setattr(wandb_log, "log_results", lambda run_dir, done, timeout, trained_with_wandb: sent.append(
        (Path(run_dir).name, done, trained_with_wandb)
    ))  # fmt: skip
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0_a", ["logger=wandb"], compose)
    fake_run(sweep / "1_b", ["logger=none"], compose)
    evaluate_sweep(sweep, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")  # evaluate.wandb=off
    assert sent == []
    evaluate_sweep(sweep, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2", "evaluate.wandb=auto")
    assert sent == [("0_a", ["gsm8k"], True), ("1_b", ["gsm8k"], False)]


def test_a_judge_failure_on_one_run_lets_the_others_finish_then_fails_the_stage(
    lm_eval_calls, tmp_path, compose, monkeypatch, capsys
):
    """The judge failing on the first run of a sweep: the later runs are still evaluated and sent, and only then
    does the stage fail, naming the failure once (checked before only by the slow fixture of a judge that is down)."""
    import simpo_exp.evaluate.run as stage
    from simpo_exp.evaluate import wandb_log
    from simpo_exp.evaluate.judge import JudgeError

    sent, evaluate_benchmark = [], stage.evaluate_benchmark

    def judge_down_on_the_first(run_dir, *args, **kwargs):
        if run_dir.name == "0_a":
            raise JudgeError("the judge at http://127.0.0.1:9/v1 did not answer")
        return evaluate_benchmark(run_dir, *args, **kwargs)

    monkeypatch.setattr(stage, "evaluate_benchmark", judge_down_on_the_first)
    monkeypatch.setattr(wandb_log, "log_results", lambda run_dir, done, *_, **__: sent.append((run_dir.name, done)))
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0_a", [], compose)
    fake_run(sweep / "1_b", [], compose)
    with pytest.raises(JudgeError, match=r"^the judge at http://127.0.0.1:9/v1 did not answer$"):
        evaluate_sweep(sweep, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2", "evaluate.wandb=auto")
    assert (sweep / "1_b" / "eval" / "gsm8k" / "results.json").is_file()
    assert not (sweep / "0_a" / "eval" / "gsm8k" / "results.json").exists() and len(lm_eval_calls) == 1
    assert sent == [("1_b", ["gsm8k"])]  # the failed run has nothing new to send
    out = capsys.readouterr().out
    assert f"0_a  gsm8k: judging failed, answers and verdicts so far kept in {sweep / '0_a' / 'eval' / 'gsm8k'}" in out
    assert "1_b  gsm8k: " in out and "rank them" not in out


def test_runs_without_a_trained_model_are_skipped_and_said_and_an_unwritable_one_refused_first(
    lm_eval_calls, tmp_path, compose, capsys
):
    """A sweep's run that failed or is still running (no finished.json) is named as skipped, the others evaluated;
    and a run whose eval/ cannot be written is refused before any run is evaluated, not after the first ones."""
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.run import _runs_to_evaluate

    sweep = tmp_path / "sweep"
    runs = [fake_run(sweep / f"{i}_x", [], compose) for i in range(3)]
    (runs[1] / "finished.json").unlink()
    assert _runs_to_evaluate(str(sweep)) == ([runs[0], runs[2]], [runs[1]])
    records = evaluate_sweep(sweep, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    assert f"skipped {runs[1]}: no trained model" in capsys.readouterr().out
    assert [Path(r["run_dir"]).name for r in records] == ["0_x", "2_x"]
    shutil.rmtree(runs[0] / "eval")
    (runs[2] / "eval").rename(runs[2] / "eval.kept")
    (runs[2] / "eval").write_text("a file where the folder belongs")
    with pytest.raises(ConfigError, match=f"{runs[2] / 'eval'} cannot be written"):
        evaluate_sweep(sweep, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    assert not (runs[0] / "eval" / "gsm8k").exists()  # refused before the first run was evaluated


def test_a_run_trained_into_another_output_dir_is_found_by_its_hydra_folder(tmp_path, compose):
    """output_dir=... moves a run's records and model out of its Hydra folder: the Hydra folder is the run (its
    config), the model is looked for where the records went; the records folder alone is refused by name."""
    from simpo_exp.config import ConfigError
    from simpo_exp.evaluate.run import _runs_to_evaluate

    folder, out = tmp_path / "hydra_run", tmp_path / "out"
    fake_run(out, [], compose)  # the model and finished.json where output_dir put them
    shutil.move(str(out / ".hydra"), str(folder / ".hydra"))
    config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text()) | {"output_dir": str(out)}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    assert _runs_to_evaluate(str(folder)) == ([folder], [])
    with pytest.raises(ConfigError, match="holds a trained model but not the run's config"):
        _runs_to_evaluate(str(out))


def test_the_trained_model_is_the_policy_with_its_own_tokenizer_and_template(tmp_path, compose):
    """model/ holds the tokenizer and chat template the run trained with (saved beside the weights): the run's
    separate model.tokenizer_path, hub revision or model.chat_template must not replace them."""
    from simpo_exp.config import to_config
    from simpo_exp.evaluate.runs import trained_policy

    cfg = to_config(
        compose("model.path=/m", "model.tokenizer_path=/t", "model.chat_template=chatml", "model.revision=abc")
    )
    model = trained_policy(cfg, tmp_path, "cpu").model
    assert (model.tokenizer_path, model.chat_template, model.revision) == ("", "auto", None)
    assert model.path == str((tmp_path / "model").resolve())


def test_the_gsm8k_preset_runs_the_papers_plain_text_five_shot(lm_eval_calls, tmp_path, compose):
    """The SimPO paper's downstream GSM8K (5-shot, the Open LLM Leaderboard v1 protocol) used no chat template; the
    preset ran the model's template with the examples as turns, a score of another format, unsaid."""
    run = fake_run(tmp_path / "run", [], compose)
    (rec,) = evaluate_sweep(run, "benchmark=gsm8k", "benchmarks.gsm8k.limit=2")
    call = lm_eval_calls[0]
    assert call["apply_chat_template"] is False and call["num_fewshot"] == 5 and "fewshot_as_multiturn" not in call
    assert rec["lm_eval"]["apply_chat_template"] is False and rec["lm_eval"]["fewshot_as_multiturn"] is False
