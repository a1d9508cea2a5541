"""The generate stage (python -m simpo_exp.generate): on-policy pairs, the loop, resume, bad input.

Subprocesses on the embedded default (tiny model, synthetic prompts, rule scorer), plus a tiny random
sequence-classification model saved to a temporary directory for the reward-model path.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simpo_exp.generate.binarise import binarise, pick_pair
from simpo_exp.generate.scoring import sort_digits_score
from tests.conftest import CONF
from tests.test_run import simpo

SYNTH = ["dataset.synthetic.num_train=1024", "dataset.synthetic.num_test=64"]  # one prompt universe everywhere
SMALL = ["logger=none", "hardware=cpu", *SYNTH]


def generate(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "simpo_exp.generate", *SMALL, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def compose_generate(*overrides: str):
    from hydra import compose, initialize_config_dir

    from simpo_exp.generate.config import to_generate_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=["output_dir=/tmp/unused", *SMALL, *overrides])
    return to_generate_config(cfg)


def greedy_scores(model_dir: Path, prompts: list[str]) -> list[float]:
    """Rule scores of the model's greedy answers (the stage's own hf sampler at temperature 0)."""
    from simpo_exp.generate.sampling import HFSampler, prompt_token_ids
    from simpo_exp.model import load_tokenizer

    cfg = compose_generate(f"model.path={model_dir}", "generate.temperature=0", "generate.seeds=[0]",
                           "generate.max_new_tokens=32", "generate.batch_size=64")
    tok = load_tokenizer(cfg.model)
    sampler = HFSampler(cfg, tok)
    ids = prompt_token_ids(tok, [[{"role": "user", "content": p}] for p in prompts])
    outs = sampler.sample(ids, [str(i) for i in range(len(ids))], seed=0)
    return [sort_digits_score(p, o[0]["text"]) for p, o in zip(prompts, outs)]


def held_out_prompts() -> list[str]:
    from simpo_exp.config import SyntheticConfig
    from simpo_exp.data.synthetic import generate as synthetic

    return [row["prompt"] for row in synthetic(SyntheticConfig(num_train=1024, num_test=64))["test_prefs"]]


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    """A randomly initialised LlamaForSequenceClassification (one output) with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from simpo_exp.model import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("rm") / "reward-model"
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- pure parts
def test_sort_digits_rule_scores_exactly_and_by_position():
    assert sort_digits_score("sort: 3 1 2", "1 2 3") == 1.0
    assert sort_digits_score("sort: 3 1 2", " 1  2 3\n") == 1.0  # whitespace is not an error
    assert sort_digits_score("sort: 3 1 2", "1 3 2") == pytest.approx(1 / 3)
    assert sort_digits_score("sort: 3 1 2", "1 2") == pytest.approx(2 / 3)
    assert sort_digits_score("sort: 3 1 2", "1 2 3 4") == pytest.approx(3 / 4)
    assert sort_digits_score("sort: 3 1 2", "") == 0.0
    from simpo_exp.config import ConfigError

    with pytest.raises(ConfigError, match="scorer.rule"):
        sort_digits_score("write a poem", "roses")


def _record(texts, scores, pid="p"):
    return {"prompt_id": pid, "prompt": [{"role": "user", "content": "q"}], "scores": scores,
            "responses": [{"text": t, "n_tokens": len(t), "finished": True} for t in texts]}


def test_binarise_modes_and_drop_reasons():
    from simpo_exp.generate.config import BinariseConfig

    rec = _record(["a", "b", "c", "d"], [0.9, 0.1, 0.5, 0.7])
    assert pick_pair(rec, BinariseConfig("best_worst"))[0] == (0, 1)
    assert pick_pair(rec, BinariseConfig("min_gap", min_gap=0.3))[0] == (0, 2)  # closest at least 0.3 below
    chosen, rejected = pick_pair(rec, BinariseConfig("best_random", seed=3))[0]
    assert chosen == 0 and rejected in (1, 2, 3)
    assert pick_pair(rec, BinariseConfig("best_worst", min_gap=0.9))[1] == "score gap below binarise.min_gap"
    drops = [_record(["x", "x"], [1.0, 1.0]), _record(["x", " "], [1.0, 0.0]), _record(["x", "y"], [0.5, 0.5])]
    rows, report = binarise(drops + [rec], BinariseConfig())
    assert report["prompts_dropped"] == {"all responses identical": 1, "fewer than 2 distinct non-empty responses": 1,
                                         "tied scores": 1}
    assert report["pairs_kept"] == 1 and rows[0]["chosen"][-1] == {"role": "assistant", "content": "a"}
    assert rows[0]["score_chosen"] == 0.9 and rows[0]["score_rejected"] == 0.1


def test_generate_stage_does_not_import_training():
    code = ("import sys, simpo_exp.generate.__main__, simpo_exp.generate.run, simpo_exp.generate.scoring; "
            "assert 'simpo_exp.train' not in sys.modules, 'simpo_exp.train imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
