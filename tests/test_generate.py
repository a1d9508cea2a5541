"""The generate stage (python -m simpo_exp.generate): on-policy pairs, the loop, resume, bad input.

Subprocesses on the embedded default (tiny model, synthetic prompts, rule scorer), plus a tiny random
sequence-classification model saved to a temporary directory for the reward-model path.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simpo_exp.generate.binarise import binarise, pick_pair
from simpo_exp.inference.files import read_jsonl
from simpo_exp.inference.scoring import sort_digits_score
from tests.conftest import CONF
from tests.runs import run_module
from tests.test_run import simpo

SYNTH = ["dataset.synthetic.num_train=1024", "dataset.synthetic.num_test=64"]  # one prompt universe everywhere
SMALL = ["logger=none", "hardware=cpu", *SYNTH]


def generate(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_module("simpo_exp.generate", *SMALL, *args, cwd=cwd, env=env, timeout=timeout)


def compose_generate(*overrides: str):
    from hydra import compose, initialize_config_dir

    from simpo_exp.generate.config import to_generate_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=["output_dir=/tmp/unused", *SMALL, *overrides])
    return to_generate_config(cfg)


def greedy_scores(model_dir: Path, prompts: list[str]) -> list[float]:
    """Rule scores of the model's greedy answers (the stage's own hf sampler at temperature 0)."""
    from simpo_exp.inference.sampling import HFSampler, prompt_token_ids
    from simpo_exp.model import load_tokenizer

    cfg = compose_generate(f"model.path={model_dir}", "generate.max_new_tokens=32", "generate.batch_size=64")
    cfg.generate.temperature = 0  # the samplers decode greedily at 0; the stage itself refuses it
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
    from transformers import LlamaForSequenceClassification

    from tests.tiny import save_tiny_llama

    path = tmp_path_factory.mktemp("rm") / "reward-model"
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=1)
    save_tiny_llama(path, LlamaForSequenceClassification, **shape)
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
    return {
        "prompt_id": pid,
        "prompt": [{"role": "user", "content": "q"}],
        "scores": scores,
        "responses": [{"text": t, "n_tokens": len(t), "finished": True} for t in texts],
    }


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
    assert report["prompts_dropped"] == {
        "all responses identical": 1,
        "fewer than 2 distinct non-empty responses": 1,
        "tied scores": 1,
    }
    assert report["pairs_kept"] == 1 and rows[0]["chosen"][-1] == {"role": "assistant", "content": "a"}
    assert rows[0]["score_chosen"] == 0.9 and rows[0]["score_rejected"] == 0.1


def test_the_reports_lengths_and_score_distributions_are_the_pairs_own():
    """report.json's length bias (chosen_longer_share, each side's mean length) and score quartiles, by hand: three
    prompts whose best-worst pairs have chosen lengths 3, 1, 2 and rejected 1, 1, 5 tokens (one tie)."""
    from simpo_exp.generate.binarise import distribution
    from simpo_exp.generate.config import BinariseConfig

    records = [
        _record(["ccc", "r", "mm"], [0.9, 0.1, 0.5], "p1"),
        _record(["c", "r"], [0.8, 0.2], "p2"),
        _record(["cc", "rrrrr"], [0.7, 0.3], "p3"),
    ]
    _, report = binarise(records, BinariseConfig())
    assert report["length_tokens"] == {"all": 15 / 7, "chosen": 2.0, "rejected": 7 / 3}
    assert report["chosen_longer_share"] == pytest.approx(1 / 3)  # p1 longer; p2 a tie, p3 shorter
    assert report["scores"]["chosen"]["mean"] == pytest.approx(0.8) and report["scores"]["rejected"]["max"] == 0.3
    # quartiles as numpy's default (linear) reads them: [1, 2, 3, 4] -> 1.75, 2.5, 3.25
    four = distribution([4.0, 1.0, 3.0, 2.0])
    assert (four["q25"], four["median"], four["q75"], four["std"]) == (1.75, 2.5, 3.25, pytest.approx(1.25**0.5))


def test_ties_take_the_first_response_and_a_copy_of_the_chosen_text_is_never_rejected():
    """Ties go to the first response on both sides, as SimPO's annotation script's argmax and argmin pick (a rule
    scorer gives 1.0 and 0.0 to many); a second copy of the chosen text, scored a little lower (bf16 batches), is
    not a rejected response: such a pair has no margin to learn. The row keeps each side's own finished flag and
    the scores in the order of the generated responses."""
    from simpo_exp.generate.config import BinariseConfig

    ties = _record(["a", "b", "c", "d"], [0.9, 0.9, 0.1, 0.1])
    assert pick_pair(ties, BinariseConfig("best_worst"))[0] == (0, 2)
    assert pick_pair(ties, BinariseConfig("min_gap", min_gap=0.5))[0] == (0, 2)
    copy = _record(["a", "a", "b"], [0.9, 0.8, 0.1])
    assert pick_pair(copy, BinariseConfig("min_gap"))[0] == (0, 2)
    one_cut = _record(["a", "b", "c"], [0.2, 0.9, 0.5])
    one_cut["responses"][0]["finished"] = False  # the rejected side alone ran into max_new_tokens
    (row,), _ = binarise([one_cut], BinariseConfig())
    assert (row["chosen_finished"], row["rejected_finished"]) == (True, False)
    assert row["all_rm_scores"] == [0.2, 0.9, 0.5] and row["all_generated_responses"] == ["a", "b", "c"]


def test_answers_cut_at_max_new_tokens_are_counted_and_can_be_left_out_of_pairs():
    """A response that ran into generate.max_new_tokens became a chosen or rejected answer with nothing to say so:
    training closes its turn after the cut and reads it as finished. The rows and the report say which sides were
    cut; binarise.drop_unfinished takes them out of the candidates."""
    from simpo_exp.generate.config import BinariseConfig

    rec = _record(["a", "b", "c", "d"], [0.9, 0.1, 0.5, 0.7])
    rec["responses"][0]["finished"] = rec["responses"][1]["finished"] = False  # the best and the worst were cut
    rows, report = binarise([rec], BinariseConfig())
    assert (rows[0]["chosen_finished"], rows[0]["rejected_finished"]) == (False, False)
    assert report["pair_sides_hit_max_new_tokens"] == 2 and report["responses_hit_max_new_tokens"] == 2
    rows, report = binarise([rec], BinariseConfig(drop_unfinished=True))
    assert [rows[0]["chosen"][-1]["content"], rows[0]["rejected"][-1]["content"]] == ["d", "c"]
    assert report["pair_sides_hit_max_new_tokens"] == 0
    rec["responses"][0]["finished"] = True  # the worst alone cut: one side, the rejected one
    rows, report = binarise([rec], BinariseConfig())
    assert (rows[0]["chosen_finished"], rows[0]["rejected_finished"]) == (True, False)
    assert report["pair_sides_hit_max_new_tokens"] == 1
    cut = _record(["a", "b"], [0.9, 0.1])
    cut["responses"][1]["finished"] = False
    assert pick_pair(cut, BinariseConfig(drop_unfinished=True)) == (None, "fewer than 2 distinct finished responses")


def test_pair_sides_with_bytes_that_are_not_utf8_are_counted():
    """A sampled byte that is not UTF-8 is decoded as U+FFFD, which training tokenises as its own three bytes: the
    pair trained on is not what the policy sampled (94% of the embedded default's responses), and nothing said so."""
    from simpo_exp.generate.config import BinariseConfig

    rec = _record(["a\ufffdb", "c", "d\ufffd", "e"], [0.9, 0.1, 0.5, 0.7])
    rows, report = binarise([rec, _record(["x", "y"], [0.2, 0.1])], BinariseConfig())
    assert report["pair_sides_not_utf8"] == 1  # the chosen "a\ufffdb"; "d\ufffd" is in no pair


def test_non_finite_scores_are_never_chosen_nor_rejected_and_are_counted():
    """A reward model that overflows (float16) scores NaN or inf: the report's statistics failed with a traceback
    after every response was sampled and scored (and again on every re-run: the scored shards are kept), a NaN
    first in a record was taken as the best, and an inf was chosen."""
    from simpo_exp.generate.config import BinariseConfig

    nan, inf = float("nan"), float("inf")
    records = [
        _record(["a", "b", "c"], [nan, 0.5, 0.2], "p1"),
        _record(["a", "b", "c"], [0.9, inf, 0.2], "p2"),
        _record(["a", "b"], [0.9, nan], "p3"),
    ]
    assert pick_pair(records[0], BinariseConfig())[0] == (1, 2)
    assert pick_pair(records[1], BinariseConfig())[0] == (0, 2)
    rows, report = binarise(records, BinariseConfig())
    assert report["prompts_dropped"] == {"fewer than 2 responses with a finite score": 1}
    assert report["non_finite_scores"] == 3 and report["pairs_kept"] == 2
    assert report["scores"]["all"]["n"] == 5 and report["scores"]["all"]["max"] == 0.9


def test_generate_samples_the_prompt_training_renders(tmp_path, monkeypatch):
    """A string prompt column beside a longer chosen conversation (a system turn): both stages take the
    conversation's turns; a one-turn chosen: both take the prompt column as one user turn."""
    import datasets

    from simpo_exp.config import DatasetConfig, SourceConfig
    from simpo_exp.data.prompts import train_prompts
    from simpo_exp.data.sources import load_mixture

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    system = {"role": "system", "content": "You sort digits ascending."}

    def row(digits: str, with_system: bool) -> dict:
        user = [system, {"role": "user", "content": f"sort: {digits}"}] if with_system else []
        answers = " ".join(sorted(digits.split())), " ".join(sorted(digits.split(), reverse=True))
        return {
            "prompt": f"sort: {digits}",
            **{k: user + [{"role": "assistant", "content": a}] for k, a in zip(("chosen", "rejected"), answers)},
        }

    rows = [row(f"{i} {i + 3} 1", with_system=i % 4 != 0) for i in range(12)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dcfg = DatasetConfig(name="test", sources={"local": SourceConfig(path=str(data))}, test_size=0.25)
    generated = sorted(json.dumps(p["prompt"]) for p in train_prompts(dcfg)[0])
    trained = sorted(json.dumps(r["prompt"]) for r in load_mixture(dcfg)[0]["train"])
    assert generated == trained and len(generated) == 9
    assert {len(json.loads(p)) for p in generated} == {1, 2}  # both kinds of row made it into the train split
    assert all(json.loads(p)[0] == system for p in generated if len(json.loads(p)) == 2)


def test_a_prompt_met_twice_is_sampled_once_and_counted(tmp_path, monkeypatch):
    """UltraFeedback repeats prompts across its rows; the official recipe samples each unique prompt once."""
    import datasets

    from simpo_exp.config import DatasetConfig, SourceConfig
    from simpo_exp.data.prompts import train_prompts

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    turns = lambda p, a: [{"role": "user", "content": p}, {"role": "assistant", "content": a}]  # noqa: E731
    rows = [{"chosen": turns(f"q{i % 5}", f"a{i}"), "rejected": turns(f"q{i % 5}", f"b{i}")} for i in range(10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    source = SourceConfig(path=str(tmp_path), test_split="test")
    prompts, counts = train_prompts(DatasetConfig(name="test", sources={"local": source}))
    assert sorted(p["prompt"][-1]["content"] for p in prompts) == [f"q{i}" for i in range(5)]
    assert counts["duplicate prompt"] == 5 and counts["rows"] == 10
    # a question asked under a system turn is another prompt, and an empty system turn (the alignment handbook
    # writes one) leaves a prompt training keeps: neither merged nor dropped
    system = lambda text, p, a: [{"role": "system", "content": text}, *turns(p, a)]  # noqa: E731
    more = [{"chosen": system(t, "q0", "a"), "rejected": system(t, "q0", "b")} for t in ("Be brief.", "")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + more))
    prompts, counts = train_prompts(DatasetConfig(name="test", sources={"local": source}))
    under = sorted(p["prompt"][0]["content"] for p in prompts if p["prompt"][0]["role"] == "system")
    assert under == ["", "Be brief."] and counts["duplicate prompt"] == 5 and counts["no prompt"] == 0
    # a blank prompt, which training drops ("empty prompt"), is not sampled either: counted as no prompt
    blank = [{"chosen": turns("   ", "a"), "rejected": turns("   ", "b")}]
    blank.append({"chosen": system("", "", "a"), "rejected": system("", "", "b")})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + blank))
    prompts, counts = train_prompts(DatasetConfig(name="test", sources={"local": source}))
    assert len(prompts) == 5 and counts["no prompt"] == 2


def test_a_prompt_goes_by_its_sources_id_or_the_hubs_rule_for_one(tmp_path, monkeypatch):
    """The hub's UltraFeedback sets carry prompt_id (SHA-256 of the prompt string): a source's own id is kept, so
    generated pairs join back to it; a source without one gets the hub's rule (one user turn) or the message list's
    hash (a system turn too); an id two sources both use for different prompts is not given to both."""
    import datasets

    from simpo_exp.config import DatasetConfig, SourceConfig
    from simpo_exp.data.prompts import prompt_key, train_prompts

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))

    def row(prompt: str, system: bool = False, **extra) -> dict:
        turns = [{"role": "system", "content": "Be brief."}] * system + [{"role": "user", "content": prompt}]
        return {
            "prompt": prompt,
            **extra,
            **{k: turns + [{"role": "assistant", "content": k}] for k in ("chosen", "rejected")},
        }

    files = {
        "hub": [row(f"hub {i}", prompt_id=f"id-{i}") for i in range(4)],
        "plain": [row(f"plain {i}", system=i % 2 == 1) for i in range(4)],
        "numbered": [row(f"numbered {i}", prompt_id=f"id-{i}") for i in range(4)],
    }
    sources = {}
    for name, rows in files.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sources[name] = SourceConfig(path=str(tmp_path / f"{name}.jsonl"))
    prompts, _ = train_prompts(DatasetConfig(name="test", sources=sources, test_size=0.25))  # 3 rows of each
    got = {p["prompt"][-1]["content"]: (p["prompt_id"], p["prompt"]) for p in prompts}
    assert len(prompts) == 9 and len({p["prompt_id"] for p in prompts}) == 9
    for text, (pid, messages) in got.items():
        source, i = text.split()
        if source == "hub":
            assert pid == f"id-{i}"
        elif source == "plain" and len(messages) == 1:
            assert pid == hashlib.sha256(text.encode()).hexdigest()
        elif source == "numbered" and f"hub {i}" not in got:  # the split left its namesake out of the train side
            assert pid == f"id-{i}"
        else:  # a system turn; an id the hub source's prompts went by first
            assert pid == prompt_key(messages) != hashlib.sha256(text.encode()).hexdigest()
    assert {len(m) for t, (_, m) in got.items() if t.startswith("plain")} == {1, 2}  # both kinds made it


def test_the_generate_stage_runs_the_training_checks_of_the_groups_it_shares():
    """The model, dataset and hardware groups are checked as training checks them (a bad model.dtype failed at
    loading, after the prompts were read)."""
    from simpo_exp.config import ConfigError

    with pytest.raises(ConfigError, match="model.dtype='float7'"):
        compose_generate("model.dtype=float7")


def test_a_prompt_two_sources_share_is_sampled_once_and_counted(tmp_path, monkeypatch):
    """A mixture whose sources share prompts (a set and a re-pairing of it): each prompt is sampled once, under the
    id it had first, and the second copy is counted as a duplicate."""
    import datasets

    from simpo_exp.config import DatasetConfig, SourceConfig
    from simpo_exp.data.prompts import train_prompts

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    sources = {}
    for name, own in (("a", "x"), ("b", "y")):
        rows = [{"prompt": text, "chosen": "c", "rejected": "r"} for text in ("shared", own)]
        (tmp_path / name).mkdir()
        for split in ("train", "test"):  # a test file of its own: all rows train
            (tmp_path / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sources[name] = SourceConfig(path=str(tmp_path / name))
    prompts, counts = train_prompts(DatasetConfig(name="test", sources=sources))
    assert sorted(p["prompt"][-1]["content"] for p in prompts) == ["shared", "x", "y"]
    assert counts == {"rows": 4, "duplicate prompt": 1, "no prompt": 0}
    assert len({p["prompt_id"] for p in prompts}) == 3
    # a prompt with a role no template knows is left out and counted, as training drops its row
    human = [{"role": "human", "content": "asked"}]
    (tmp_path / "a" / "train.jsonl").write_text(json.dumps({"prompt": human, "chosen": "c", "rejected": "r"}) + "\n")
    prompts, counts = train_prompts(DatasetConfig(name="test", sources=sources))
    assert counts["unknown role 'human'"] == 1 and len(prompts) == 2


def test_a_multi_turn_prompt_goes_by_its_message_lists_hash():
    """The hub's rule (SHA-256 of the prompt string) is for one user turn; a conversation of several turns goes by
    its whole message list, so two conversations opening with one question do not claim one id."""
    from simpo_exp.data.prompts import prompt_id, prompt_key

    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    assert prompt_id(turns) == prompt_key(turns) != prompt_id(turns[:1])
    assert prompt_id(turns[:1]) == hashlib.sha256(b"q").hexdigest()
    assert prompt_id(turns, given="  ") == prompt_key(turns) and prompt_id(turns, given="id-7") == "id-7"
    # the roles are part of a prompt: a system turn is not a user turn of the same words
    system = [{"role": "system", "content": "x"}, {"role": "user", "content": "q"}]
    assert prompt_key(system) != prompt_key([{"role": "user", "content": "x"}, {"role": "user", "content": "q"}])
    alone = [{"role": "system", "content": "q"}]  # one turn but not a user's: not the hub's plain-text rule
    assert prompt_id(alone) == prompt_key(alone) != prompt_id(turns[:1])


def test_generate_stage_does_not_import_training():
    code = (
        "import sys, simpo_exp.generate.__main__, simpo_exp.generate.run, simpo_exp.inference.scoring; "
        "assert 'simpo_exp.train' not in sys.modules, 'simpo_exp.train imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


# ----------------------------------------------------------------------------- reward model, resume
RM_RUN = [
    "dataset.max_train_samples=9",
    "generate.shard_size=3",
    "generate.max_new_tokens=8",
    "generate.seeds=[1,2,3]",
    "scorer=reward-model",
]


@pytest.fixture(scope="module")
def uninterrupted_generation(tiny_reward_model, tmp_path_factory):
    """One uninterrupted reward-model generation, shared: its outputs are checked below and the resume
    and split tests compare against them."""
    out = tmp_path_factory.mktemp("ref") / "gen"
    res = generate(*RM_RUN, f"scorer.path={tiny_reward_model}", f"hydra.run.dir={out}", cwd=out.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_reward_model_scorer_on_a_local_sequence_classifier(uninterrupted_generation, tiny_reward_model):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = uninterrupted_generation
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert report["prompts"] == 9 and report["responses"] == 27 and len(rows) == report["pairs_kept"] >= 1
    assert report["pairs_kept"] + sum(report["prompts_dropped"].values()) == 9
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert all(r["chosen"][:-1] == r["rejected"][:-1] and r["chosen"][-1]["role"] == "assistant" for r in rows)
    # the recorded score is the reward model's output for the rendered conversation
    tok = AutoTokenizer.from_pretrained(tiny_reward_model)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    ids = tok.apply_chat_template(rows[0]["chosen"], tokenize=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = rm(**ids).logits[0, 0].item()
    assert rows[0]["score_chosen"] == pytest.approx(expected, abs=1e-4)
    provenance = json.loads((out / "data" / "provenance.json").read_text())
    assert provenance["policy"]["fingerprint"]["kind"] == "random-init" and provenance["dataset"]["split"] == "train"
    assert provenance["scorer"]["path"] == str(tiny_reward_model)
    assert "rule" not in provenance["scorer"]  # the rule's setting is not the reward model's: not recorded as if read


def test_killed_generation_resumes_to_the_same_data(uninterrupted_generation, tiny_reward_model, tmp_path):
    out = tmp_path / "gen"
    args = (*RM_RUN, f"scorer.path={tiny_reward_model}", f"hydra.run.dir={out}")
    shutil.copytree(uninterrupted_generation, out)  # a finished run of this command (in another directory)
    # what a kill leaves: the last shard unfinished (a half-written temporary file), no data set yet
    scored = lambda i: next((out / "shards").glob(f"scored-0000{i}-*.jsonl")).name  # noqa: E731 (scorer's hash)
    for name in ("responses-00002.jsonl", scored(2), scored(1)):
        (out / "shards" / name).unlink()
    (out / "shards" / "responses-00002.jsonl.999.tmp").write_text('{"half a li')
    shutil.rmtree(out / "data")
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*-0000[01]*.jsonl")}
    res = generate(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {name: (out / "shards" / name).stat().st_mtime_ns for name in kept} == kept  # finished shards not redone
    assert "3 shards, 1 to sample, 2 to score" in (out / "__main__.log").read_text()
    for rel in ("data/train.jsonl", "shards/responses-00002.jsonl", f"shards/{scored(1)}"):
        assert (out / rel).read_bytes() == (uninterrupted_generation / rel).read_bytes(), rel


def test_a_sweep_of_generations_gives_one_data_set_per_job_and_succeeds(tiny_reward_model, tmp_path):
    """``--multirun generate.temperature=...`` (README): one data set per job, and a sweep whose jobs all wrote theirs
    ends 0. Each was listed as "killed without a record" and the sweep exited 1, as if a training sweep's job had
    left no finished.json (the generate stage's config has a ``method`` too)."""
    sweep = tmp_path / "sweep"
    args = [*SMALL, "dataset.max_train_samples=3", *RM_RUN[1:], f"scorer.path={tiny_reward_model}"]
    args += ["generate.temperature=0.7,0.9", f"hydra.sweep.dir={sweep}"]
    res = run_module("simpo_exp.generate", "--multirun", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "killed" not in res.stderr and "sweep finished: 2 jobs" in res.stdout, res.stderr[-3000:]
    assert len(list(sweep.glob("*/data/train.jsonl"))) == 2


def test_the_test_prompts_give_the_held_out_pairs_training_evaluates_on(
    uninterrupted_generation, tiny_reward_model, tmp_path
):
    """generate.splits=[train,test] samples the test split's prompts too (the published on-policy sets carry a test
    split): their pairs go to data/test.jsonl, and the printed command trains on the folder, evaluating on them
    rather than holding out 5% of the train pairs. Added to a finished train-only generation, nothing of the train
    split is sampled again."""
    out = tmp_path / "gen"
    shutil.copytree(uninterrupted_generation, out)
    args = (*RM_RUN, f"scorer.path={tiny_reward_model}", f"hydra.run.dir={out}", "dataset.max_eval_samples=4")
    res = generate(*args, "generate.splits=[train,test]", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (out / "__main__.log").read_text()
    assert "3 shards, 0 to sample, 0 to score" in log and "2 shards, 2 to sample, 2 to score of the test split" in log
    assert (out / "data" / "train.jsonl").read_bytes() == (uninterrupted_generation / "data/train.jsonl").read_bytes()
    report = json.loads((out / "report.json").read_text())
    test_rows = read_jsonl(out / "data" / "test.jsonl")
    assert report["test"]["prompts"] == 4 and len(test_rows) == report["test"]["pairs_kept"] >= 1
    assert report["samples_per_prompt"] == 3 and report["test"]["source_rows"]["rows"] >= 4  # 3 seeds, 1 sample each
    train_prompts = {json.dumps(r["chosen"][:-1]) for r in read_jsonl(out / "data" / "train.jsonl")}
    assert not train_prompts & {json.dumps(r["chosen"][:-1]) for r in test_rows}  # the test split's own prompts
    assert json.loads((out / "data" / "provenance.json").read_text())["test_pairs"] == len(test_rows)
    command = res.stdout.split("train on it: ")[1].split()
    assert f"dataset.sources.local.path={(out / 'data').resolve()}" in command  # the folder: train.jsonl, test.jsonl
    run = tmp_path / "run"
    small = (
        "max_steps=1",
        "eval_steps=1",
        "logger=none",
        "per_device_train_batch_size=2",
        "per_device_eval_batch_size=2",
    )
    trained = simpo(*command[3:], *small, f"hydra.run.dir={run}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    source = json.loads((run / "data_report.json").read_text())["sources"]["local"]
    assert source["test_rows"] == len(test_rows) and source["train_rows"] == len(train_prompts)  # read, not carved
    res = generate(*args, "generate.splits=[test]", cwd=tmp_path)
    assert res.returncode == 2 and "generate.splits" in res.stderr
    # the test split's responses cut for the scorer are counted and warned of as the train split's are
    res = generate(*args, "generate.splits=[train,test]", "scorer.max_length=24", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    cut = json.loads((out / "report.json").read_text())["test"]["responses_cut_for_the_scorer"]
    assert cut > 0 and f"{cut} of 12 test responses were longer" in (out / "__main__.log").read_text()
    # a re-pairing that keeps no train pair keeps no test split either, even one with pairs left (kept, it sat in
    # data/ without its record); the widest train gap of these scores, as min_gap, leaves the test split's wider
    # (its scores written ten times wider, so the case stands whatever the tiny models score)
    for f in (out / "shards-test").glob("scored-*.jsonl"):
        rows = [{**r, "scores": [10 * x for x in r["scores"]]} for r in read_jsonl(f)]
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gaps = {
        split: [
            max(r["scores"]) - min(r["scores"]) for f in (out / folder).glob("scored-*.jsonl") for r in read_jsonl(f)
        ]
        for split, folder in (("train", "shards"), ("test", "shards-test"))
    }
    gap = max(gaps["train"]) * 1.001 + 1e-6
    assert max(gaps["test"]) > gap, gaps
    res = generate(
        *args, "generate.splits=[train,test]", "scorer.max_length=24", f"binarise.min_gap={gap}", cwd=tmp_path
    )
    assert res.returncode == 2 and "no usable preference pair" in res.stderr, res.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["test"]["pairs_kept"] >= 1
    assert not (out / "data" / "test.jsonl").exists() and not (out / "data" / "train.jsonl").exists()


def test_an_answer_ends_at_its_first_stop_token_padding_of_the_same_id_after_it_uncounted():
    """A batched row is padded after its answer, often with the EOS id (Llama-3's pad fix-up): cut at the last stop
    id, the padding counted as sampled tokens (Arena-Hard's avg_tokens, the report's lengths)."""
    from simpo_exp.inference.sampling import cut_at_stop
    from simpo_exp.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    prompt = tok("sort: 3 1 2", add_special_tokens=False)["input_ids"]
    answer = tok(" 1 2 3", add_special_tokens=False)["input_ids"]
    out = cut_at_stop(tok, prompt, answer + [tok.eos_token_id] * 4, {tok.eos_token_id})
    whole = cut_at_stop(tok, prompt, answer, set())["text"]
    assert out == {"text": whole, "n_tokens": len(answer) + 1, "finished": True}
    assert cut_at_stop(tok, prompt, answer, {tok.eos_token_id})["finished"] is False


def test_each_split_samples_from_streams_of_its_own():
    """The test split's shard i drew the train split's shard i's noise (the same seed), so the held-out responses
    were sampled with the draws of the trained-on ones; the train split keeps the streams it always had."""
    from types import SimpleNamespace

    from simpo_exp.generate.run import _sample_shard
    from simpo_exp.inference.sampling import derive_seed

    class Recorder:
        seeds = []

        def sample(self, ids, keys, seed):
            self.seeds.append(seed)
            return [[{"text": "x"}] for _ in ids]

    cfg = SimpleNamespace(generate=SimpleNamespace(seeds=[13, 21]))
    prompts = [{"prompt_id": "a", "prompt": "p", "input_ids": [1]}]
    for split in ("train", "test"):
        records = _sample_shard(Recorder(), cfg, 0, prompts, split)
        assert [r["seed"] for r in records[0]["responses"]] == [13, 21]
    train, test = Recorder.seeds[:2], Recorder.seeds[2:]
    assert train == [derive_seed(13, 0), derive_seed(21, 0)] and not set(train) & set(test) and len(set(test)) == 2


def test_processes_started_by_hand_need_a_fixed_folder(tmp_path):
    """RANK/WORLD_SIZE by hand (the README's split) with the default folder, ``${now:...}``: processes started a second
    apart sampled into folders of their own, and no data set was written. Refused, naming the folder key."""
    env = {"RANK": "0", "WORLD_SIZE": "2"}
    res = generate("dataset.max_train_samples=3", cwd=tmp_path, env=env)
    assert res.returncode == 2 and "WORLD_SIZE=2 without a fixed hydra.run.dir=" in res.stderr, res.stderr[-2000:]
    res = run_module("simpo_exp.generate", "--multirun", *SMALL, "generate.temperature=0.7,0.9", cwd=tmp_path, env=env)
    assert res.returncode != 0 and "WORLD_SIZE=2 without a fixed hydra.sweep.dir=" in res.stderr, res.stderr[-2000:]
    assert not list(tmp_path.glob("outputs/**/shards"))


@pytest.mark.slow
def test_two_processes_split_the_shards_and_give_the_same_data(uninterrupted_generation, tiny_reward_model, tmp_path):
    out = tmp_path / "gen"
    args = (*RM_RUN, f"scorer.path={tiny_reward_model}", f"hydra.run.dir={out}")
    first = generate(*args, cwd=tmp_path, env={"RANK": "0", "WORLD_SIZE": "2"})  # shards 0 and 2
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (out / "data").exists() and not (out / "shards" / "responses-00001.jsonl").exists()
    second = generate(*args, cwd=tmp_path, env={"RANK": "1", "WORLD_SIZE": "2"})  # shard 1, then the data set
    assert second.returncode == 0, second.stderr[-3000:]
    rel = "data/train.jsonl"
    assert (out / rel).read_bytes() == (uninterrupted_generation / rel).read_bytes()


def test_a_changed_config_does_not_reuse_old_shards(uninterrupted_generation, tiny_reward_model, tmp_path):
    out = tmp_path / "gen"
    shutil.copytree(uninterrupted_generation, out)
    res = generate(
        *RM_RUN, f"scorer.path={tiny_reward_model}", "generate.temperature=0.5", f"hydra.run.dir={out}", cwd=tmp_path
    )
    assert (
        res.returncode == 2
        and "generate.temperature: stored 0.8, now 0.5" in res.stderr
        and "Traceback" not in res.stderr
    )


def test_a_shard_file_that_does_not_hold_its_shard_is_named(uninterrupted_generation, tiny_reward_model, tmp_path):
    """A shard file cut short (the machine down before the disk held its tail) lost its prompts from the data set
    without a word (6 of 9 prompts, exit 0), and an empty one failed in the tokenizer naming nothing."""
    out = tmp_path / "gen"
    args = (*RM_RUN, f"scorer.path={tiny_reward_model}", f"hydra.run.dir={out}")
    scored = lambda i: next((out / "shards").glob(f"scored-0000{i}-*.jsonl"))  # noqa: E731 (scorer's hash)
    first_line = lambda path: path.read_text().split("\n")[0] + "\n"  # noqa: E731
    for damage in ("responses cut", "responses empty", "scores cut"):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(uninterrupted_generation, out)
        shutil.rmtree(out / "data")
        responses = out / "shards" / "responses-00001.jsonl"
        if damage.startswith("responses"):
            scored(1).unlink()
            responses.write_text(first_line(responses) if damage == "responses cut" else "")
            named, says = responses, f"it holds {1 if damage == 'responses cut' else 0} prompts, its shard 3"
        else:
            record = json.loads(first_line(scored(0)))
            record["scores"] = record["scores"][:2]
            scored(0).write_text(json.dumps(record) + "\n" + "".join(scored(0).read_text().splitlines(True)[1:]))
            named, says = scored(0), "row 1 (prompt "
        res = generate(*args, cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (damage, res.stderr[-3000:])
        assert f"{named}: {says}" in res.stderr and "Delete it and re-run" in res.stderr, (damage, res.stderr[-2000:])
        assert not (out / "data").exists()


def test_another_tokenizer_or_template_does_not_resume_the_shards(tiny_reward_model, tmp_path):
    """The manifest recorded the chat-template choice, not what it rendered: a resumed command with another
    model.tokenizer_path (or a template edited in a local model folder) sampled its shards from prompts rendered
    another way, and the data set mixed the two. The prompts' token ids are recorded and compared."""
    from tests.tiny import save_tiny_llama

    policy, other = tmp_path / "policy", tmp_path / "other-tokenizer"
    save_tiny_llama(policy)
    shutil.copytree(policy, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "gen"
    args = ("dataset.max_train_samples=4", "generate.shard_size=2", "generate.max_new_tokens=2", "generate.seeds=[1,2]")
    args = (*args, "scorer=reward-model", f"scorer.path={tiny_reward_model}", f"model.path={policy}")
    args = (*args, f"hydra.run.dir={out}")
    res = generate(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # a real model's answers cut short is said before the sampling, not after hours of it
    log = (out / "__main__.log").read_text()
    assert log.index("generate.max_new_tokens=2 cuts most answers") < log.index("sampled shard 0")
    for name in ("responses-00001.jsonl", *[p.name for p in (out / "shards").glob("scored-00001-*.jsonl")]):
        (out / "shards" / name).unlink()
    res = generate(*args, f"model.tokenizer_path={other}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "prompt_tokens_sha256: stored" in res.stderr
    assert not (out / "shards" / "responses-00001.jsonl").exists()
    res = generate(*args, f"model.tokenizer_path={policy}", cwd=tmp_path)  # the same tokenizer, named: resumes
    assert res.returncode == 0, res.stderr[-3000:]


# ----------------------------------------------------------------------------- bad input
def test_a_manifest_without_shards_binds_nothing(tmp_path):
    """A run that failed before its first shard leaves only manifest.json: the next command replaces it; once a
    shard exists, a different config is refused."""
    from simpo_exp.config import ConfigError
    from simpo_exp.generate.run import check_manifest

    shards = tmp_path / "shards"
    check_manifest(shards, {"generate": {"top_p": 0.5}})
    check_manifest(shards, {"generate": {"top_p": 0.9}})
    assert json.loads((shards / "manifest.json").read_text()) == {"generate": {"top_p": 0.9}}
    (shards / "responses-00000.jsonl.123.tmp").write_text('{"half')  # a killed write is not a shard
    check_manifest(shards, {"generate": {"top_p": 0.7}})
    (shards / "responses-00000.jsonl").write_text("{}\n")
    check_manifest(shards, {"generate": {"top_p": 0.7}})  # the same config resumes
    with pytest.raises(ConfigError, match="other settings \\(generate.top_p: stored 0.7, now 0.9\\)"):
        check_manifest(shards, {"generate": {"top_p": 0.9}})
    (shards / "responses-00000.jsonl").unlink()  # the responses deleted, their scores kept: they still bind
    (shards / "scored-00000-abcd1234.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="other settings"):
        check_manifest(shards, {"generate": {"top_p": 0.9}})
    # the scorer an older manifest recorded binds only its scored shards, which are named by its settings' hash
    check_manifest(shards, {"generate": {"top_p": 0.7}, "scorer": {"path": "/another"}})


def test_a_wrong_scorer_path_fails_before_anything_is_written(tiny_reward_model, tmp_path):
    out = tmp_path / "g"
    args = ("scorer=reward-model", "dataset.max_train_samples=2", "generate.max_new_tokens=2", "generate.seeds=[1,2]")
    res = generate(*args, f"scorer.path={tmp_path / 'typo'}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "shards").exists()
    res = generate(*args, f"scorer.path={tiny_reward_model}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]


def test_missing_prompt_column_is_refused(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(4)))
    res = generate(
        "dataset=local", f"dataset.sources.local.path={data}", f"hydra.run.dir={tmp_path / 'g'}", cwd=tmp_path
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "missing column 'prompt'" in res.stderr and "prompt_column" in res.stderr and "Traceback" not in res.stderr


def test_a_prompt_file_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    """Training names the file and line of a byte that is not UTF-8; the stage's prompt reader crashed on it."""
    data = tmp_path / "prefs.jsonl"
    rows = [json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}).encode() + b"\n" for i in range(4)]
    rows[2] = rows[2].replace(b"q2", b"q\xe92")
    data.write_bytes(b"".join(rows))
    res = generate(
        "dataset=local", f"dataset.sources.local.path={data}", f"hydra.run.dir={tmp_path / 'g'}", cwd=tmp_path
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{data} line 3 holds text that is not UTF-8" in res.stderr


def test_a_local_dataset_without_its_path_is_named(tmp_path):
    """A key with no default left out: the stage names it, without a traceback (so do training and evaluate,
    through the same simpo_exp.config.structured)."""
    res = generate("dataset=local", f"hydra.run.dir={tmp_path / 'g'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "missing config value dataset.sources.local.path" in res.stderr and "Traceback" not in res.stderr


def test_a_model_that_is_not_a_reward_model_is_refused(tmp_path):
    from transformers import LlamaConfig

    causal = tmp_path / "causal-lm"
    LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(causal)
    res = generate(
        "scorer=reward-model",
        f"scorer.path={causal}",
        "dataset.max_train_samples=2",
        "generate.max_new_tokens=2",
        "generate.seeds=[1,2]",
        f"hydra.run.dir={tmp_path / 'g'}",
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "not a reward model" in res.stderr and "LlamaForCausalLM" in res.stderr and "Traceback" not in res.stderr


def test_a_scorer_that_cannot_score_is_refused_before_sampling(tiny_reward_model, tmp_path):
    """The rule on prompts that are not the synthetic task, and a reward model whose tokenizer has no chat template,
    failed only when scoring, after every response was sampled (the expensive part); the latter's message named
    model.chat_template, the policy's, where the reward model's is scorer.chat_template."""
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"write a poem {i}", "chosen": "a", "rejected": "b"}) + "\n"
                            for i in range(8)))  # fmt: skip
    out = tmp_path / "rule"
    res = generate("dataset=local", f"dataset.sources.local.path={data}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "scorer.rule='sort_digits'" in res.stderr and "of dataset=local are not the synthetic task" in res.stderr
    assert not list(out.glob("shards/responses-*.jsonl"))

    bare = tmp_path / "rm"
    shutil.copytree(tiny_reward_model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    (bare / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    out = tmp_path / "rm-run"
    res = generate(*RM_RUN, f"scorer.path={bare}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "scorer.chat_template='auto' but the tokenizer of" in res.stderr and "model.chat_template" not in res.stderr
    assert not list(out.glob("shards/responses-*.jsonl"))
    res = generate(*RM_RUN, f"scorer.path={bare}", "scorer.chat_template=tiny", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]  # the advice given is taken


def test_a_reward_models_chat_template_that_refuses_a_prompt_is_named_before_sampling(tiny_reward_model, tmp_path):
    """A reward model's template that raises (jinja2's TemplateError, "System role not supported") gave a raw
    traceback, after every response was sampled."""
    from simpo_exp.config import ConfigError
    from simpo_exp.inference.scoring import make_scorer

    rm = tmp_path / "rm"
    shutil.copytree(tiny_reward_model, rm)
    (rm / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    system = {"role": "system", "content": "You sort digits ascending."}
    user = lambda i: [system, {"role": "user", "content": f"sort: {i} 1"}]  # noqa: E731
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = [
        {"prompt": "", "chosen": user(i) + answer(f"1 {i}"), "rejected": user(i) + answer(f"{i} 1")} for i in range(8)
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "g"
    args = ("dataset=local", f"dataset.sources.local.path={data}", f"hydra.run.dir={out}")
    res = generate(*RM_RUN, f"scorer.path={rm}", *args, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for named in (f"scorer.path={str(rm)!r}", "scorer.chat_template='auto'", "System role not supported"):
        assert named in res.stderr, res.stderr[-3000:]
    assert not list(out.glob("shards/responses-*.jsonl"))
    scorer = make_scorer(compose_generate("scorer=reward-model", f"scorer.path={rm}"))
    assert len(scorer.score([[{"role": "user", "content": "sort: 2 1"}]], ["1 2"])) == 1
    with pytest.raises(ConfigError, match="roles \\['system', 'user', 'assistant'\\]"):
        scorer.score([[system, {"role": "user", "content": "sort: 2 1"}]], ["1 2"])  # scoring names it too


def test_zero_usable_pairs_names_the_reasons(tmp_path):
    out = tmp_path / "g"
    res = generate(
        "generate.temperature=0.00001",  # as good as greedy: every pass draws the same response
        "generate.seeds=[1,2]",
        "dataset.max_train_samples=3",
        "generate.max_new_tokens=4",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "no usable preference pair" in res.stderr and "'all responses identical': 3" in res.stderr
    assert "Traceback" not in res.stderr and not (out / "data" / "train.jsonl").exists()
    assert json.loads((out / "report.json").read_text())["prompts_dropped"] == {"all responses identical": 3}


def test_bad_generate_value_is_refused_before_anything_loads(tmp_path):
    res = generate("generate.top_p=1.5", f"hydra.run.dir={tmp_path / 'g'}", cwd=tmp_path)
    assert res.returncode == 2 and "generate.top_p=1.5" in res.stderr and "(0, 1]" in res.stderr
    assert not (tmp_path / "g" / "shards").exists()
    res = generate("beta=5", f"hydra.run.dir={tmp_path / 'g'}", cwd=tmp_path)  # sampling never reads it
    assert res.returncode == 2 and "beta='5': is a training key" in res.stderr, res.stderr[-2000:]
    res = generate("+foo=3", f"hydra.run.dir={tmp_path / 'g'}", cwd=tmp_path)  # nothing reads it
    assert res.returncode == 2 and "foo=3: no such key" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "g" / "shards").exists()


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["generate.temperature=0", "generate.samples_per_seed=2"], ["temperature=0", "a pair needs two"]),
        (["generate.temperature=0"], ["generate.temperature=0", "must be > 0: greedy decoding"]),
        (["generate.seeds=[7]"], ["generate.seeds=[7]", "samples_per_seed=1", "a pair needs two"]),
    ],
)
def test_contradictory_generate_settings_are_refused(overrides, named):
    from simpo_exp.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose_generate(*overrides)
    assert all(text in str(err.value) for text in named), str(err.value)
    compose_generate("generate.seeds=[7]", "generate.samples_per_seed=2")  # two responses from one seed: fine


def test_cuda_without_a_cuda_device_is_named(monkeypatch):
    import torch

    from simpo_exp.config import ConfigError
    from simpo_exp.inference.sampling import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="hardware.device=cuda but no CUDA device is visible.*evaluate.device=cpu"):
        pick_device("cuda")
    assert pick_device("auto") == pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_on_cuda_without_one_fails_cleanly_and_binds_nothing(tiny_reward_model, tmp_path):
    """Refused before any shard (or manifest) is written: the next command, even with other generate settings,
    still runs in that directory."""
    out = tmp_path / "g"
    args = ("dataset.max_train_samples=2", "generate.seeds=[1,2]", "scorer=reward-model", f"hydra.run.dir={out}")
    res = generate(
        *args, f"scorer.path={tiny_reward_model}", "hardware.device=cuda", "generate.max_new_tokens=2", cwd=tmp_path
    )
    assert res.returncode == 2 and "no CUDA device is visible" in res.stderr and "Traceback" not in res.stderr
    assert not list((out / "shards").glob("*-00000.jsonl"))
    res = generate(*args, f"scorer.path={tiny_reward_model}", "generate.max_new_tokens=3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]


# ----------------------------------------------------------------------------- the loop
def test_on_policy_loop_generate_binarise_train_and_measure(tmp_path):
    """Round 0 (a short SimPO+SFT run on the synthetic pairs) -> sample 4 answers per train prompt, rule
    scores, best-vs-worst pairs -> a SimPO run on them from round 0's model/ -> the evaluate stage's rule
    benchmark on round 1: greedy answers of round 1 and of round 0 (the model it started from) on the task's 64
    held-out prompts, which the generate stage's provenance.json names. Printed; the direction is a measurement,
    not asserted."""
    round0, gen, round1 = tmp_path / "round0", tmp_path / "gen", tmp_path / "round1"
    train_args = [
        "logger=none",
        "hardware=cpu",
        "eval_steps=0",
        "save_steps=0",
        "num_generations=0",
        "eval_on_start=false",
        "logging_steps=5",
        *SYNTH,
    ]
    res = simpo(*train_args, "max_steps=40", "sft_weight=1", f"hydra.run.dir={round0}", cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    res = generate(
        f"model.path={round0 / 'model'}",
        "dataset.max_train_samples=48",
        "generate.seeds=[13,21,42,79]",
        "generate.max_new_tokens=24",
        "generate.batch_size=48",
        f"hydra.run.dir={gen}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cuts most answers of a chat model" not in res.stderr  # the synthetic task's answers are short
    # the printed next command trains the policy that sampled, not a fresh random init
    hint = f"dataset.sources.local.path={(gen / 'data' / 'train.jsonl').resolve()} model.path={round0 / 'model'}"
    assert hint in res.stdout
    report = json.loads((gen / "report.json").read_text())
    assert report["pairs_kept"] >= 24 and report["scores"]["chosen"]["mean"] > report["scores"]["rejected"]["mean"]
    scores = [s for f in sorted((gen / "shards").glob("scored-*.jsonl")) for r in read_jsonl(f) for s in r["scores"]]
    assert len(scores) == report["responses"] == 48 * 4  # the share of answers the rule scores exact:
    assert report["rule_exact_share"] == sum(s == 1.0 for s in scores) / len(scores)
    provenance = json.loads((gen / "data" / "provenance.json").read_text())
    assert provenance["policy"]["fingerprint"]["kind"] == "local"
    assert provenance["scorer"] == {"name": "rule", "kind": "rule", "rule": "sort_digits"}  # no model keys
    data = gen / "data" / "train.jsonl"
    pairs = read_jsonl(data)  # ids by the hub's rule, as the synthetic source's own: pairs join back to their prompts
    assert all(r["prompt_id"] == hashlib.sha256(r["prompt"].encode()).hexdigest() for r in pairs)
    res = simpo(
        *train_args,
        "dataset=local",
        f"dataset.sources.local.path={data}",
        f"model.path={round0 / 'model'}",
        "max_steps=20",
        "per_device_train_batch_size=8",
        "learning_rate=3e-4",
        "dataset.test_size=0.1",
        f"hydra.run.dir={round1}",
        cwd=tmp_path,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    recorded = json.loads((round1 / "data_report.json").read_text())["sources"]["local"]["provenance"]
    assert recorded["policy"]["fingerprint"] == provenance["policy"]["fingerprint"]  # the run knows its data's origin

    assert provenance["synthetic_task"]["num_test"] == 64  # the task the prompts came from, held-out part included
    res = run_module("simpo_exp.evaluate", str(round1), "benchmark=rule", f"hydra.run.dir={tmp_path / 'ev'}",
                     cwd=tmp_path, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_jsonl(round1 / "eval" / "rule" / "generations.jsonl")
    assert [r["prompt"] for r in rows] == held_out_prompts()  # the task's test split: never sampled, never trained on
    metrics = json.loads((round1 / "eval" / "rule" / "results.json").read_text())["metrics"]
    before = [r["score_baseline"] for r in rows]
    after = [r["score_model"] for r in rows]
    assert before == greedy_scores(round0 / "model", held_out_prompts())  # the baseline is round 0's model
    summary = json.loads((round1 / "summary.json").read_text())
    print(
        f"\non-policy round: {report['pairs_kept']} pairs from {report['prompts']} prompts "
        f"(chosen score {report['scores']['chosen']['mean']:.3f}, "
        f"rejected {report['scores']['rejected']['mean']:.3f}); "
        f"round-1 held-out pair accuracy {summary['eval/rewards/accuracies']:.3f}\n"
        f"rule benchmark on {metrics['n']} held-out prompts: exact {metrics['exact_start']:.1f}% -> "
        f"{metrics['exact']:.1f}%, mean score {metrics['score_start']:.3f} -> {metrics['score']:.3f}, "
        f"win rate over round 0 {metrics['win_rate']:.1f}%"
    )
    assert len(before) == len(after) == 64 and all(0.0 <= s <= 1.0 for s in before + after)
    assert before != after  # the round changed the policy's answers


def test_the_policys_fused_layers_end_with_its_sampling_and_bind_the_shards(monkeypatch, tmp_path):
    """hardware.fused_layers=liger replaces the policy family's layer classes for the whole process (load_model):
    the reward model, often of the policy's family, was then loaded on Liger's kernels too, and a sweep's next job
    built its models on them. They are put back when sampling ends. The kernels decide the samples' rounding (hf
    backend), so they are in the shards' manifest: a resume with other ones is refused; vLLM, which runs its own
    kernels whatever the setting, does not record them."""
    from simpo_exp.config import ConfigError
    from simpo_exp.generate.run import _manifest, _process, check_manifest

    monkeypatch.setattr("simpo_exp.model.has_accelerator", lambda: True)  # the kernels are patched, never run
    from transformers.models.llama import modeling_llama as family  # the tiny policy's (and the scorer's here)

    rotary = family.apply_rotary_pos_emb
    cfg = compose_generate("hardware.fused_layers=liger", "generate.samples_per_seed=1")
    seen = {}

    class PatchedPolicy:  # loads the policy as the hf sampler does (its kernels cannot run on a CPU)
        def __init__(self, cfg, tokenizer, decoding=None, longest_prompt=None):
            from simpo_exp.model import load_model

            self.model = load_model(cfg, tokenizer, "sdpa")
            seen["sampling"] = family.apply_rotary_pos_emb.__module__

        def sample(self, prompts, keys, seed):
            return [[{"text": "12"}] * cfg.generate.samples_per_seed for _ in prompts]

        def close(self):
            pass

    class Scorer:
        def __init__(self, cfg):
            seen["scoring"] = family.apply_rotary_pos_emb.__module__

        def score(self, prompts, texts):
            return [0.0] * len(texts)

        def close(self):
            pass

    monkeypatch.setattr("simpo_exp.inference.sampling.make_sampler", PatchedPolicy)
    monkeypatch.setattr("simpo_exp.inference.scoring.make_scorer", Scorer)
    prompts = [{"prompt_id": "a", "prompt": [{"role": "user", "content": "21"}], "input_ids": [1, 2]}]
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    _process(cfg, [(shard_dir, [prompts])], 0, 1, "rule")
    assert seen == {"sampling": "liger_kernel.transformers.rope", "scoring": rotary.__module__}
    assert family.apply_rotary_pos_emb is rotary
    assert len(read_jsonl(shard_dir / "responses-00000.jsonl")[0]["responses"]) == len(cfg.generate.seeds)

    fused, plain = (_manifest(c, {}, prompts) for c in (cfg, compose_generate()))
    assert (fused["fused_layers"], plain["fused_layers"]) == ("liger", "none")
    check_manifest(shard_dir, fused)  # the manifest of the shards just sampled
    with pytest.raises(ConfigError, match="fused_layers: stored 'liger', now 'none'"):
        check_manifest(shard_dir, plain)
    vllm = compose_generate("generate.backend=vllm", "model.path=/tmp/m", "hardware.fused_layers=liger")
    assert "fused_layers" not in _manifest(vllm, {}, prompts)


def test_the_process_place_is_checked_before_anything_is_written(monkeypatch):
    """RANK and WORLD_SIZE split the shards: a value that is not an integer, a WORLD_SIZE of 0 or a RANK past it
    (which would do no shard, or another process's) is refused by name."""
    from simpo_exp.config import ConfigError
    from simpo_exp.generate.run import process_place

    for rank, world in (("x", "2"), ("0", "0"), ("3", "2"), ("-1", "2")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(ConfigError, match="0 <= RANK < WORLD_SIZE"):
            process_place()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert process_place() == (1, 2)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert process_place() == (0, 1)


def test_the_precision_binds_a_generation_and_greedy_passes_that_cannot_differ_are_refused(tmp_path):
    """The weights' dtype, the autocast and the attention a shard was sampled with are in its manifest: a resumed
    generation in bfloat16 beside float32 shards is refused (a manifest written before they were recorded still
    resumes). Greedy decoding over several passes samples one response several times, then drops every prompt:
    refused before anything is sampled."""
    from simpo_exp.config import ConfigError
    from simpo_exp.generate.run import _manifest, check_manifest

    shards = tmp_path / "shards"
    prompts = [{"prompt_id": "a", "input_ids": [1, 2]}]
    fp32 = _manifest(compose_generate(), {"kind": "random-init"}, prompts)
    bf16 = _manifest(compose_generate("model.dtype=bfloat16"), {"kind": "random-init"}, prompts)
    assert fp32["model_dtype"] == "float32" and bf16["model_dtype"] == "bfloat16"
    check_manifest(shards, fp32)
    (shards / "responses-00000.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="model_dtype: stored 'float32', now 'bfloat16'"):
        check_manifest(shards, bf16)
    older = {k: v for k, v in fp32.items() if k not in ("model_dtype", "mixed_precision", "attention")}
    (shards / "manifest.json").write_text(json.dumps(older))
    check_manifest(shards, fp32)
    # the autocast as it computes on the device, not as configured: on a CPU, auto and no sample alike
    on_cpu = _manifest(compose_generate("hardware=cpu"), {}, prompts)
    assert fp32["mixed_precision"] == on_cpu["mixed_precision"] == "no"
    (shards / "manifest.json").write_text(json.dumps(fp32 | {"mixed_precision": "auto"}))  # as recorded before
    check_manifest(shards, fp32, __import__("torch").device("cpu"))
    # the dtype the sampler runs the weights in: bf16 weights upcast under master_weights=fp32 (the default), as
    # loaded under master_weights=model; a resume that changed it mixed float32 and bfloat16 samples
    upcast = _manifest(compose_generate("model.dtype=bfloat16", "hardware=cpu"), {}, prompts)
    as_loaded = _manifest(
        compose_generate("model.dtype=bfloat16", "hardware=cpu", "hardware.master_weights=model"), {}, prompts
    )
    assert (upcast["sampling_dtype"], as_loaded["sampling_dtype"]) == ("float32", "bfloat16")
    (shards / "manifest.json").write_text(json.dumps(upcast))
    with pytest.raises(ConfigError, match="sampling_dtype: stored 'float32', now 'bfloat16'"):
        check_manifest(shards, as_loaded)

    res = generate("generate.temperature=0", f"hydra.run.dir={tmp_path / 'greedy'}", cwd=tmp_path)
    assert res.returncode == 2 and "generate.temperature=0.0: must be > 0: greedy decoding" in res.stderr
    assert not (tmp_path / "greedy" / "shards").exists()


def test_another_scorer_scores_the_stored_responses_again_without_sampling(
    uninterrupted_generation, tiny_reward_model, tmp_path
):
    """Every scorer.* key was bound to the responses: a scoring that failed for a scorer setting (a label index,
    a dtype, its max_length) could only go on in a new directory, sampling everything again."""
    out = tmp_path / "gen"
    shutil.copytree(uninterrupted_generation, out)
    res = generate(
        *RM_RUN, f"scorer.path={tiny_reward_model}", "scorer.max_length=24", f"hydra.run.dir={out}", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    log = (out / "__main__.log").read_text()
    assert "3 shards, 0 to sample, 3 to score" in log
    report = json.loads((out / "report.json").read_text())
    assert report["responses_cut_for_the_scorer"] > 0  # prompt and response past 24 tokens: scored on their start
    warned = re.search(r"with generate.max_new_tokens=\d+ is past scorer.max_length=24: responses that long", log)
    assert warned and log.index(warned[0]) < log.index("0 to sample")  # said before the work, not only after it
    assert len(list((out / "shards").glob("scored-00000-*.jsonl"))) == 2  # each scorer's scores, apart


def test_new_weights_at_the_scorer_path_score_the_responses_again(tiny_reward_model, tmp_path):
    """Scored shards were named by the scorer's settings alone: after the reward model at scorer.path was
    overwritten, the same command reused the old model's scores ("0 to score") and paired by them."""
    from transformers import LlamaForSequenceClassification

    from tests.tiny import save_tiny_llama

    rm, out = tmp_path / "rm", tmp_path / "gen"
    shutil.copytree(tiny_reward_model, rm)
    args = (*RM_RUN, "dataset.max_train_samples=3", f"scorer.path={rm}", f"hydra.run.dir={out}")
    assert (res := generate(*args, cwd=tmp_path)).returncode == 0, res.stderr[-3000:]
    first = json.loads((out / "data" / "provenance.json").read_text())["scorer"]["fingerprint"]
    assert first["kind"] == "local" and first["path"] == str(rm.resolve()) and len(first["sha256"]) == 64
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=1)
    save_tiny_llama(rm, LlamaForSequenceClassification, seed=1, **shape)  # other weights, the same path
    assert (res := generate(*args, cwd=tmp_path)).returncode == 0, res.stderr[-3000:]
    assert "1 shards, 0 to sample, 1 to score" in (out / "__main__.log").read_text()
    old, new = sorted((out / "shards").glob("scored-00000-*.jsonl"), key=lambda f: f.stat().st_mtime_ns)
    assert read_jsonl(old)[0]["scores"] != read_jsonl(new)[0]["scores"]  # the new model's rewards
    second = json.loads((out / "data" / "provenance.json").read_text())["scorer"]["fingerprint"]
    assert second["sha256"] != first["sha256"]


def test_a_hub_reward_model_moved_between_kill_and_resume_scores_every_shard_with_one_commit(
    tiny_reward_model, tmp_path
):
    """Scored shards are named by a hub reward model's id and revision, not its commit: an unpinned one (scorer=armorm)
    whose main moved between a kill and the resume kept the old commit's scores for the shards scored before the kill
    and scored the rest with the new one; provenance.json named the new commit alone."""
    import types

    from transformers import LlamaForSequenceClassification

    from simpo_exp.config import ConfigError
    from simpo_exp.generate.run import one_commit
    from tests.tiny import save_tiny_llama

    old, new = "a" * 40, "b" * 40
    repo = tmp_path / "hub" / "models--org--tiny-rm"
    shutil.copytree(tiny_reward_model, repo / "snapshots" / old)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=1)
    save_tiny_llama(repo / "snapshots" / new, LlamaForSequenceClassification, seed=1, **shape)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(old)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "gen"
    args = (*RM_RUN, "scorer.path=org/tiny-rm", f"hydra.run.dir={out}")
    assert (res := generate(*args, cwd=tmp_path, env=env)).returncode == 0, res.stderr[-3000:]
    scored = lambda i: next((out / "shards").glob(f"scored-0000{i}-*.jsonl"))  # noqa: E731 (scorer's hash)
    before = read_jsonl(scored(0))
    assert json.loads(scored(0).with_suffix(".json").read_text())["commit"] == old
    for i in (1, 2):  # killed while scoring shard 1
        scored(i).with_suffix(".json").unlink()
        scored(i).unlink()
    (repo / "refs" / "main").write_text(new)  # main moved, as the load of a resumed run online would find it
    assert (res := generate(*args, cwd=tmp_path, env=env)).returncode == 0, res.stderr[-3000:]
    log = (out / "__main__.log").read_text()
    assert "3 shards, 0 to sample, 2 to score" in log and "shards [0] were scored by another commit" in log
    assert {json.loads(scored(i).with_suffix(".json").read_text())["commit"] for i in range(3)} == {new}
    assert read_jsonl(scored(0))[0]["scores"] != before[0]["scores"]  # the new commit's rewards for shard 0 too
    assert json.loads((out / "data" / "provenance.json").read_text())["scorer"]["fingerprint"]["commit"] == new

    # another process that scored its shards with the old commit: two models' rewards are refused, not written
    record = json.loads(scored(1).with_suffix(".json").read_text())
    scored(1).with_suffix(".json").write_text(json.dumps({**record, "commit": old}))
    cfg = types.SimpleNamespace(scorer=types.SimpleNamespace(path="org/tiny-rm", revision=None))
    tag = scored(0).stem.split("-")[-1]
    said = r"different commits of it \(bbbbbbbbbbbb: shards 0, 2; aaaaaaaaaaaa: shards 1\); .* set scorer.revision="
    with pytest.raises(ConfigError, match=said):
        one_commit(cfg, {out / "shards": 3}, tag)


def test_processes_given_different_scorers_are_refused_not_left_waiting_for_each_other(tiny_reward_model, tmp_path):
    """Each process of a split generation scored its own shards under its own scorer and waited for the others'
    under its own: every one exited 0 saying another process would write the data set, and none ever did."""
    from transformers import LlamaForSequenceClassification

    from tests.tiny import save_tiny_llama

    other = tmp_path / "other-rm"
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=1)
    save_tiny_llama(other, LlamaForSequenceClassification, seed=1, **shape)
    out = tmp_path / "gen"
    args = (*RM_RUN, "dataset.max_train_samples=6", f"hydra.run.dir={out}")
    first = generate(*args, f"scorer.path={other}", cwd=tmp_path, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert first.returncode == 0, first.stderr[-3000:]  # shard 1 under the other scorer: waits for shard 0
    (theirs,) = (out / "shards").glob("scored-00001-*.jsonl")
    # started before the other process scored: it scored meanwhile, with another scorer
    os.utime(theirs, (time.time() + 600, time.time() + 600))
    res = generate(*args, f"scorer.path={tiny_reward_model}", cwd=tmp_path, env={"RANK": "0", "WORLD_SIZE": "2"})
    assert res.returncode == 2, res.stderr[-3000:]
    said = re.search(r"with another scorer \((scorer\.path: there '[^,]*', here '[^;]*);", res.stderr)
    assert said and "other-rm'" in said[1] and "reward-model'" in said[1], res.stderr[-2000:]  # their ends: told apart
    said = said[1]
    assert len(list((out / "shards").glob("scored-00000-*.jsonl"))) == 1  # this process's scores are kept
    # from an earlier command (before this one started): said, and the way on named
    os.utime(theirs, (time.time() - 600, time.time() - 600))
    res = generate(*args, f"scorer.path={tiny_reward_model}", cwd=tmp_path, env={"RANK": "0", "WORLD_SIZE": "2"})
    said_by = res.stdout + res.stderr
    assert res.returncode == 0 and "shard 1 is scored by another scorer than this process's (" + said in said_by
    assert "run the command once more with WORLD_SIZE=1" in said_by and not (out / "data").exists()
    res = generate(*args, f"scorer.path={tiny_reward_model}", cwd=tmp_path)  # one process: scores shard 1, writes
    assert res.returncode == 0 and (out / "data" / "train.jsonl").exists(), res.stderr[-3000:]


def test_a_reward_model_with_its_own_code_needs_trust_remote_code_and_its_label_must_exist(tiny_reward_model, tmp_path):
    """ArmoRM-like: a config whose auto_map names its own class. Without trust_remote_code transformers loaded a
    stock LlamaForSequenceClassification, its head drawn at random: every score noise, no error."""
    from types import SimpleNamespace

    from simpo_exp.config import ConfigError
    from simpo_exp.inference.scoring import check_reward_model

    custom = tmp_path / "custom"
    shutil.copytree(tiny_reward_model, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomRewardModel"}
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="scorer.trust_remote_code=False: .* ships its own model class"):
        check_reward_model(SimpleNamespace(path=str(custom), revision=None, trust_remote_code=False, label_index=None))
    with pytest.raises(ConfigError, match="scorer.label_index=3: .* has 1 output"):
        check_reward_model(
            SimpleNamespace(path=str(tiny_reward_model), revision=None, trust_remote_code=False, label_index=3)
        )
    check_reward_model(
        SimpleNamespace(path=str(tiny_reward_model), revision=None, trust_remote_code=False, label_index=0)
    )


# An ArmoRM-shaped reward model with code of its own: it imports a docstring constant transformers 5 removed (as
# ArmoRM's modeling_custom.py does) and returns its reward as ``score``. Its weights are the tiny reward model's
# (model.*, score.weight), so its scores equal that stock classifier's at each row's last token.
OWN_CODE = """
from dataclasses import dataclass

import torch
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.models.llama.modeling_llama import {imported}
from transformers.utils import ModelOutput, add_start_docstrings_to_model_forward


@dataclass
class RewardOutput(ModelOutput):
    score: torch.FloatTensor = None


class OwnRewardModel(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score = torch.nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    @add_start_docstrings_to_model_forward({imported})
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(-1) - 1
        return RewardOutput(score=self.score(hidden[torch.arange(len(hidden)), last]).squeeze(-1))
"""


def own_code_reward_model(tiny_reward_model, folder: Path, imported: str) -> Path:
    shutil.copytree(tiny_reward_model, folder)
    (folder / "modeling_own.py").write_text(OWN_CODE.format(imported=imported))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_own.OwnRewardModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_reward_model_whose_own_code_imports_what_transformers_5_removed_scores(tiny_reward_model, tmp_path):
    """ArmoRM's class imports LLAMA_INPUTS_DOCSTRING, gone from transformers 5: scorer=armorm stopped with an
    ImportError once every response had been sampled. The constant is put back, the class is imported by the
    check before sampling, and the model's own ``score`` output is the reward."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from simpo_exp.config import ConfigError
    from simpo_exp.inference.scoring import make_scorer, render_for_scoring

    own = own_code_reward_model(tiny_reward_model, tmp_path / "armo_shaped", "LLAMA_INPUTS_DOCSTRING")
    overrides = ("scorer=reward-model", f"scorer.path={own}", "scorer.trust_remote_code=true", "scorer.dtype=float32")
    scorer = make_scorer(compose_generate(*overrides, "scorer.batch_size=2"))
    assert type(scorer.model).__name__ == "OwnRewardModel"
    prompts = [[{"role": "user", "content": "sort: 3 1 2"}]] * 2
    responses = ["1 2 3", "3 2 1 0"]
    got = scorer.score(prompts, responses)
    scorer.close()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    stock = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    stock.config.pad_token_id = None
    expected = []
    for prompt, response in zip(prompts, responses):
        ids = tokenizer(render_for_scoring(tokenizer, scorer.s, prompt, response), add_special_tokens=False)
        with torch.no_grad():
            expected.append(stock(input_ids=torch.tensor([ids["input_ids"]])).logits[0, 0].item())
    assert got == pytest.approx(expected, abs=1e-5)
    picked = make_scorer(compose_generate(*overrides, "scorer.label_index=3"))  # not read for a score of its own
    with pytest.raises(ConfigError, match=r"scorer.label_index=3: .* returns a score of its own"):
        picked.score(prompts, responses)
    picked.close()


def test_a_reward_model_whose_own_code_does_not_load_is_named_before_sampling(tiny_reward_model, tmp_path):
    broken = own_code_reward_model(tiny_reward_model, tmp_path / "broken_own_code", "NOT_A_NAME_IN_TRANSFORMERS")
    out = tmp_path / "g"
    args = ("scorer=reward-model", f"scorer.path={broken}", "scorer.trust_remote_code=true")
    res = generate(*args, "dataset.max_train_samples=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"scorer.path={str(broken)!r}: its own model class (modeling_own.OwnRewardModel) does not load" in (
        res.stderr
    )
    assert "NOT_A_NAME_IN_TRANSFORMERS" in res.stderr
    assert not (out / "shards").exists()


def test_every_binarise_mode_draws_within_min_gap_and_a_rounding_gap_reaches_it():
    """best_random drew before the gap filter (half the prompts dropped though each had a response far enough
    below); 1.0 - 0.8 = 0.19999999999999996 fell short of min_gap=0.2."""
    from simpo_exp.generate.config import BinariseConfig

    record = {"prompt_id": "p", "responses": [{"text": t} for t in "abc"], "scores": [1.0, 0.8, 0.9]}
    for seed in range(20):
        bcfg = BinariseConfig(mode="best_random", min_gap=0.2, seed=seed)
        assert pick_pair(record, bcfg) == ((0, 1), "")
    assert pick_pair(record, BinariseConfig(mode="min_gap", min_gap=0.2, seed=0)) == ((0, 1), "")
    assert pick_pair(record, BinariseConfig(mode="best_worst", min_gap=0.25, seed=0)) == (
        None,
        "score gap below binarise.min_gap",
    )


def test_a_rebinarising_that_keeps_no_pair_leaves_no_stale_data_set(
    uninterrupted_generation, tiny_reward_model, tmp_path
):
    """report.json said 0 pairs while data/train.jsonl still held the last command's pairs; the hint named
    sampling and scorers where only binarise.min_gap had dropped them."""
    out = tmp_path / "gen"
    shutil.copytree(uninterrupted_generation, out)
    args = (*RM_RUN, f"scorer.path={tiny_reward_model}", "binarise.mode=min_gap", "binarise.min_gap=100")
    res = generate(*args, f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 2 and "lower binarise.min_gap=100" in res.stderr, res.stderr[-2000:]
    assert not (out / "data" / "train.jsonl").exists() and not (out / "data" / "provenance.json").exists()


def test_an_earlier_commands_test_split_goes_and_a_manifest_changed_meanwhile_writes_no_data_set(
    uninterrupted_generation, tiny_reward_model, tmp_path, monkeypatch
):
    """Re-run with splits=[train] where a [train,test] command ran: its data/test.jsonl stayed beside the new pairs
    and training evaluated on it. And a process whose manifest another process of the generation replaced after
    its last shard still wrote the data set, under its own settings."""
    from simpo_exp.config import ConfigError
    from simpo_exp.generate import run as generate_run

    out = tmp_path / "gen"
    shutil.copytree(uninterrupted_generation, out)
    (out / "data" / "test.jsonl").write_text('{"prompt": "an earlier command\'s"}\n')
    cfg = compose_generate(*RM_RUN, f"scorer.path={tiny_reward_model}", f"output_dir={out}")
    generate_run.generate_data(cfg)  # every shard sampled and scored already: the data set alone is written
    assert not (out / "data" / "test.jsonl").exists() and (out / "data" / "train.jsonl").exists()
    assert "test_pairs" not in json.loads((out / "data" / "provenance.json").read_text())
    shutil.rmtree(out / "data")
    process = generate_run._process

    def another_process_meanwhile(*args, **kwargs):
        process(*args, **kwargs)
        manifest = out / "shards" / "manifest.json"
        recorded = json.loads(manifest.read_text())
        recorded["generate"]["temperature"] = 0.3
        manifest.write_text(json.dumps(recorded))

    monkeypatch.setattr(generate_run, "_process", another_process_meanwhile)
    with pytest.raises(ConfigError, match="another process of this generation wrote its settings there"):
        generate_run.generate_data(cfg)
    assert not (out / "data" / "train.jsonl").exists()


def test_a_rerun_killed_before_its_record_leaves_no_earlier_record_beside_its_pairs(
    uninterrupted_generation, tiny_reward_model, tmp_path, monkeypatch
):
    """Re-run in the same folder with other binarise settings and killed after writing data/train.jsonl: the
    earlier command's provenance.json stayed beside the new pairs, and training recorded its settings as theirs."""
    from simpo_exp.generate import run as generate_run

    out = tmp_path / "gen"
    shutil.copytree(uninterrupted_generation, out)
    before = (out / "data" / "train.jsonl").read_text()
    write_atomic = generate_run.write_atomic

    def killed_at_the_record(path, text):
        if Path(path).name == "provenance.json":
            raise KeyboardInterrupt
        return write_atomic(path, text)

    monkeypatch.setattr(generate_run, "write_atomic", killed_at_the_record)
    other = ("binarise.mode=best_random", f"output_dir={out}")
    cfg = compose_generate(*RM_RUN, f"scorer.path={tiny_reward_model}", *other)
    with pytest.raises(KeyboardInterrupt):
        generate_run.generate_data(cfg)
    assert (out / "data" / "train.jsonl").read_text() != before  # the new pairs are written ...
    assert not (out / "data" / "provenance.json").exists()  # ... and no record says they are the earlier ones


def test_a_policy_whose_answers_all_score_alike_is_told_to_sample_from_a_trained_model(tmp_path):
    """The README's try on the embedded default (a random init: it writes no digits, every rule score 0) ended in
    advice to sample more responses or raise the temperature, which cannot help."""
    args = ("dataset.max_train_samples=4", "generate.max_new_tokens=6", "generate.shard_size=4", "generate.seeds=[1,2]")
    res = generate(*args, f"hydra.run.dir={tmp_path / 'g'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "every one of the 8 responses scored 0.0: the scorer tells none apart" in res.stderr
    assert "model.path=<a trained run>/model" in res.stderr


def test_a_reward_models_pad_id_is_its_tokenizers_so_batched_scores_equal_single_ones(tiny_reward_model, tmp_path):
    """The head reads each row at its last token that is not config.pad_token_id: with another id there than the
    tokenizer pads with, a batched row was read on its padding and its score depended on its batch."""
    from simpo_exp.inference.scoring import make_scorer

    other = tmp_path / "rm"
    shutil.copytree(tiny_reward_model, other)
    config = json.loads((other / "config.json").read_text())
    config["pad_token_id"] = 5  # not the tokenizer's pad
    (other / "config.json").write_text(json.dumps(config))
    prompts = [[{"role": "user", "content": "sort: 3 1 2"}]] * 3
    responses = ["1 2 3", "1 2", "3 2 1 0 0 0 0"]
    scores = {}
    for batch in (1, 3):
        cfg = compose_generate("scorer=reward-model", f"scorer.path={other}", f"scorer.batch_size={batch}")
        scorer = make_scorer(cfg)
        scores[batch] = scorer.score(prompts, responses)
        scorer.close()
    assert scores[1] == pytest.approx(scores[3], abs=1e-5)


def test_a_reward_model_whose_tokenizer_has_no_pad_token_is_read_at_each_rows_last_token(tiny_reward_model, tmp_path):
    """Llama 3's tokenizer has no pad token. Padding with EOS and taking EOS for the pad id, the head took each row's
    own closing EOS for padding and read the token before it; with the model's own pad id left in place, shorter rows
    were read on their padding. Every score now equals an unpadded forward's at the row's last token, whatever the
    batch size (rows of one length are batched together, unpadded). So are rows whose tokenizer pads with a token
    added to it alone (ArmoRM-like: an id past the embedding table, which a padded batch indexed past)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from simpo_exp.inference.scoring import make_scorer, render_for_scoring

    # no pad id anywhere; a pad id in the model's config only; EOS set as the pad token (read one token early)
    for pad, model_pad in (("none", None), ("none", 5), ("eos", None), ("added", None)):
        other = tmp_path / f"rm-{pad}-{model_pad}"
        shutil.copytree(tiny_reward_model, other)
        tokenizer = AutoTokenizer.from_pretrained(other)
        tokenizer.pad_token = tokenizer.eos_token if pad == "eos" else None
        if pad == "added":
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
            assert tokenizer.pad_token_id >= json.loads((other / "config.json").read_text())["vocab_size"]
        tokenizer.save_pretrained(other)
        config = json.loads((other / "config.json").read_text())
        config["pad_token_id"] = model_pad
        (other / "config.json").write_text(json.dumps(config))
        prompts = [[{"role": "user", "content": "sort: 3 1 2"}]] * 4
        responses = ["1 2 3", "1 2", "3 2 1 0 0 0 0", "3 2 1"]  # the first and last of one length
        model = AutoModelForSequenceClassification.from_pretrained(other).eval()
        model.config.pad_token_id = None  # one row alone: read at its last token
        overrides = ("scorer=reward-model", f"scorer.path={other}", "scorer.dtype=float32")
        cfg = compose_generate(*overrides)
        expected = []
        for prompt, response in zip(prompts, responses):
            ids = tokenizer(render_for_scoring(tokenizer, cfg.scorer, prompt, response), add_special_tokens=False)
            assert ids["input_ids"][-1] == tokenizer.eos_token_id  # the row ends with EOS, the old pad
            with torch.no_grad():
                expected.append(model(input_ids=torch.tensor([ids["input_ids"]])).logits[0, 0].item())
        for batch in (1, 3):
            scorer = make_scorer(compose_generate(*overrides, f"scorer.batch_size={batch}"))
            assert scorer.score(prompts, responses) == pytest.approx(expected, abs=1e-5), (pad, model_pad, batch)
            scorer.close()


def test_scored_shards_are_named_by_the_dtype_the_scores_were_computed_in(tiny_reward_model):
    """scorer.dtype=auto entered the shards' name as "auto": bf16 scores from a GPU and float32 ones from a CPU (which
    tie or swap near each other) shared a name and mixed on a resume. The resolved dtype names them, and under bf16
    the batch size too (a bf16 score moves with its batch); float32 scores do not depend on it."""
    from simpo_exp.generate.run import scorer_tag

    def tag(*overrides):
        return scorer_tag(compose_generate("scorer=reward-model", f"scorer.path={tiny_reward_model}", *overrides))

    assert tag("hardware.device=cpu") == tag("hardware.device=cpu", "scorer.dtype=float32")  # auto: float32 here
    assert tag("scorer.dtype=bfloat16") != tag("scorer.dtype=float32")
    assert tag("scorer.dtype=bfloat16", "scorer.batch_size=1") != tag("scorer.dtype=bfloat16", "scorer.batch_size=8")
    assert tag("scorer.dtype=float32", "scorer.batch_size=1") == tag("scorer.dtype=float32", "scorer.batch_size=8")


def test_a_scorer_max_length_past_the_reward_models_positions_is_capped(tmp_path, caplog):
    """A GPT-2-style reward model has n_positions learned positions: scorer.max_length=4096 (the default) gave it
    longer inputs, an IndexError after every response was sampled."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from simpo_exp.inference.scoring import make_scorer
    from simpo_exp.model import build_tiny_tokenizer

    tokenizer, rm = build_tiny_tokenizer(), tmp_path / "gpt2-rm"
    shape = dict(n_positions=32, n_embd=32, n_layer=1, n_head=2, num_labels=1)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), **shape)).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    scorer = make_scorer(compose_generate("scorer=reward-model", f"scorer.path={rm}"))
    assert "scorer.max_length=4096 is more than" in caplog.text and "(32 positions)" in caplog.text
    prompt = [{"role": "user", "content": "sort: " + " ".join("9876543210" * 4)}]
    scores = scorer.score([prompt, prompt], ["0 1 2", "0 1"])
    assert len(scores) == 2 and scorer.cut == [True, True]  # scored on their first 32 tokens
    import torch

    from simpo_exp.inference.scoring import render_for_scoring

    model = GPT2ForSequenceClassification.from_pretrained(rm).eval()
    ids = tokenizer(render_for_scoring(tokenizer, scorer.s, prompt, "0 1 2"), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert scores[0] == pytest.approx(model(torch.tensor([ids[:32]])).logits[0, 0].item(), abs=1e-5)
    assert scorer.score([[{"role": "user", "content": "sort: 2 1"}]], ["1 2"]) and scorer.cut == [False]
    short = [{"role": "user", "content": "sort: 2 1"}]
    fits = len(tokenizer(render_for_scoring(tokenizer, scorer.s, short, "1 2"), add_special_tokens=False)["input_ids"])
    for scorer.max_length, cut in ((fits, False), (fits - 1, True)):  # a text of exactly max_length tokens is whole
        scorer.score([short], ["1 2"])
        assert scorer.cut == [cut]


def test_scored_shards_named_before_the_scorer_hash_are_not_scored_again(
    uninterrupted_generation, tiny_reward_model, tmp_path
):
    """A directory from before scored shards carried the scorer's hash: the same command rescored every shard
    (a full reward-model pass); its old manifest recorded the scorer, which is how they are recognised."""
    from simpo_exp.generate.run import scorer_settings

    out = tmp_path / "gen"
    shutil.copytree(uninterrupted_generation, out)
    args = (*RM_RUN, f"scorer.path={tiny_reward_model}", f"hydra.run.dir={out}")
    for f in (out / "shards").glob("scored-*.jsonl"):
        f.rename(f.with_name(f.name.rsplit("-", 1)[0] + ".jsonl"))  # scored-00000.jsonl, as older runs named them
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    manifest["scorer"] = scorer_settings(compose_generate(*RM_RUN, f"scorer.path={tiny_reward_model}"))
    (out / "shards" / "manifest.json").write_text(json.dumps(manifest))
    res = generate(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 shards, 0 to sample, 0 to score" in (out / "__main__.log").read_text()
    rel = "data/train.jsonl"
    assert (out / rel).read_bytes() == (uninterrupted_generation / rel).read_bytes()


def test_max_train_samples_draws_from_every_source_of_a_mixture(monkeypatch):
    """The cap kept the first prompts that fit: the prompts are a mixture's sources one after another, so a budget run
    (dataset.max_train_samples) sampled the first source alone. They are drawn with dataset.shuffle_seed, as
    training draws its capped test pairs, and kept in their order."""
    import types

    from simpo_exp.generate import run as gen
    from simpo_exp.model import build_tiny_tokenizer

    prompts = [
        {"prompt_id": f"{src}{i}", "prompt": [{"role": "user", "content": "x"}]} for src in "ab" for i in range(50)
    ]
    monkeypatch.setattr(gen, "train_prompts", lambda dcfg: (prompts, {"rows": 100}))
    monkeypatch.setattr(gen, "policy_positions", lambda cfg: None)

    def kept(seed):
        cfg = types.SimpleNamespace(
            max_prompt_length=10, dataset=types.SimpleNamespace(max_train_samples=20, shuffle_seed=seed)
        )
        return [p["prompt_id"] for p in gen._tokenised_prompts(cfg, tokenizer=build_tiny_tokenizer())[0]]

    first = kept(42)
    assert len(first) == 20 and {i[0] for i in first} == {"a", "b"}
    assert first == [p["prompt_id"] for p in prompts if p["prompt_id"] in first]  # in the sources' order
    assert kept(42) == first and kept(7) != first  # the seed's draw: a resumed run samples the same prompts


def test_max_train_samples_counts_the_prompts_that_fit_and_the_cut_is_reported(monkeypatch, caplog):
    """The cap came before the length filter: max_train_samples=20 sampled 5 prompts when 15 were too long, and
    the report's counts did not add up to the source's rows (the cut was not listed). The prompts left out for their
    length were in report.json alone: the log did not say that a share of the prompts was never sampled."""
    import logging
    import types

    from simpo_exp.generate import run as gen
    from simpo_exp.model import build_tiny_tokenizer

    lengths = [3, 50, 4, 60, 5, 10]  # the last as long as max_prompt_length: kept, as training keeps it
    prompts = [{"prompt_id": str(i), "prompt": [{"role": "user", "content": "x" * n}]} for i, n in enumerate(lengths)]
    prompts.insert(1, {"prompt_id": "h", "prompt": [{"role": "human", "content": "yyy"}]})  # a role left out
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "zz"}]
    prompts.insert(2, {"prompt_id": "s", "prompt": system})  # a role the template refuses (Gemma's system turn)
    counts = {"rows": 9, "duplicate prompt": 1, "no prompt": 0}
    monkeypatch.setattr(gen, "train_prompts", lambda dcfg: (prompts, dict(counts)))
    monkeypatch.setattr(gen, "text_token_ids", lambda tok, texts: [[0] * len(t) for t in texts])  # a token a char
    monkeypatch.setattr(gen, "policy_positions", lambda cfg: None)
    cfg = types.SimpleNamespace(
        max_prompt_length=10, dataset=types.SimpleNamespace(max_train_samples=3, shuffle_seed=0)
    )
    tokenizer = build_tiny_tokenizer()  # a template that renders the roles it knows alone (Qwen2.5's, Zephyr's)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with caplog.at_level(logging.WARNING, logger="simpo_exp.generate.run"):
        kept, report = gen._tokenised_prompts(cfg, tokenizer=tokenizer)
    assert "2 of the 6 prompts are longer than max_prompt_length=10 tokens and are not sampled" in caplog.text
    ids = [p["prompt_id"] for p in kept]
    assert len(ids) == 3 and set(ids) < {"0", "2", "4", "5"} and ids == sorted(ids)  # three of the four that fit
    assert report["prompt too long"] == 2 and report["over dataset.max_train_samples"] == 1
    assert report["chat template leaves out the prompt's 'human' turn"] == 1  # sampled, it had no question
    assert report["chat template error: System role not supported"] == 1  # as training drops it, not a traceback
    assert len(kept) + sum(v for k, v in report.items() if k != "rows") == report["rows"]


def printed_train_command(*overrides: str) -> tuple:
    """(config, the training command it prints) of a generate command with ``overrides``, as Hydra runs it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from simpo_exp.generate.config import to_generate_config
    from simpo_exp.generate.run import train_command

    overrides = ["output_dir=/tmp/unused", *overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_generate_config(compose(config_name="generate", overrides=overrides))
        before = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(
            compose(config_name="generate", overrides=overrides, return_hydra_config=True)
        )
        try:
            return cfg, train_command(cfg, "/out/data/train.jsonl")
        finally:
            HydraConfig.instance().cfg = before


def test_the_printed_training_command_keeps_the_model_preset_and_config_dirs(tmp_path):
    """It named only dataset and model.path: a user's own preset (from --config-dir or hydra.searchpath) was not
    found, and a hub preset's learning rate and batch gave way to the tiny default's."""
    mine = tmp_path / "myconf"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "mine.yaml").write_text("name: mine\npath: /models/mine\nlearning_rate: 1e-5\n")
    _, command = printed_train_command("model=mine", f"hydra.searchpath=[file://{mine}]")
    assert command == (
        f"python -m simpo_exp 'hydra.searchpath=[file://{mine}]' model=mine dataset=local "
        "dataset.sources.local.path=/out/data/train.jsonl model.path=/models/mine"
    )


def test_the_printed_training_command_holds_out_the_test_size_given_here():
    """dataset.test_size given to the stage (which never reads it) was left out: the next round held out 5%."""
    _, command = printed_train_command("dataset.test_size=0.2")
    assert command.endswith(" dataset.test_size=0.2") and command.count("test_size") == 1
    assert "test_size" not in printed_train_command()[1]


@pytest.mark.parametrize(
    "overrides",
    [
        ["seed=7", "model.random_init.num_hidden_layers=1", "model.chat_template=zephyr", "max_prompt_length=64"],
        ["model=qwen2.5-0.5b-instruct", "model.revision=abc123", "++model.dtype=float32", "max_prompt_length=900"],
        ["max_length=1024", "max_prompt_length=600"],  # past the tiny preset's max_length of 256
    ],
)
def test_the_printed_training_command_trains_the_policy_that_sampled(compose, overrides):
    """It carried no model.* override, no seed and no max_prompt_length: a random init of another seed or shape, a
    hub model at another revision or chat template was trained instead of the policy that sampled, and training's
    own max_prompt_length dropped the longer prompts sampled. The printed command's overrides, composed as training
    composes them, give the generate command's model, seed (a random init's weights) and max_prompt_length."""
    import dataclasses
    import shlex

    from simpo_exp.config import Config, structured

    gen, command = printed_train_command(*overrides)
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "simpo_exp"]
    train = structured(Config, compose(*words[3:]))
    assert dataclasses.asdict(train.model) == dataclasses.asdict(gen.model)
    assert train.max_prompt_length == gen.max_prompt_length == int(overrides[-1].split("=")[1])
    assert train.max_length == gen.max_length
    if not gen.model.path and "seed=7" in overrides:
        assert train.seed == gen.seed == 7


@pytest.mark.parametrize(
    "override, says",
    [
        ("hardware.packing=packed", "hardware.packing='packed': is a training setting; the generate stage samples"),
        ("hardware.lora=true", "hardware.lora='true': is a training setting"),
        ("logger=wandb", "logger='wandb': the generate stage logs nowhere but its folder"),
        ("logger.project=x", "logger.project='x': the generate stage logs nowhere"),
        # accepted and never read: sampling renders as the official decode.py whatever it says
        ("dataset.chat_format=simpo_repo", "dataset.chat_format='simpo_repo': is how training cuts"),
    ],
)
def test_a_hardware_or_logger_setting_sampling_never_reads_is_refused(override, says):
    """They were accepted, and the stage ran as if they had not been given (no W&B run, no packing)."""
    from simpo_exp.config import ConfigError
    from simpo_exp.generate.config import check_overrides

    with pytest.raises(ConfigError) as err:
        check_overrides(["logger=none", override])
    assert says in str(err.value), str(err.value)
    check_overrides(["logger=none", "hardware=cpu", "hardware.device=cpu", "hardware.master_weights=fp32"])
    check_overrides(["+hardware.pakcing=none"])  # a typo: refused as no such key when the config is read


@pytest.mark.parametrize(
    "override, says",
    [
        ("scorer.max_length=8", "scorer.max_length=8: is a reward model's setting; scorer.kind=rule reads none"),
        ("scorer.path=/rm", "scorer.path='/rm': is a reward model's setting"),
        ("binarise.seed=7", "binarise.seed=7: is best_random's draw; binarise.mode=best_worst draws nothing"),
        ("scorer.batch_size=4", "scorer.batch_size=4: is a reward model's setting"),
    ],
)
def test_a_scorer_or_pairing_setting_nothing_reads_is_refused(override, says):
    """A reward model's keys under the rule scorer, and best_random's seed under another mode, were accepted and the
    data set came out byte-identical (a sweep over binarise.seed wrote N copies of one data set)."""
    from simpo_exp.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose_generate(override)
    assert says in str(err.value), str(err.value)
    compose_generate("binarise.mode=best_random", "binarise.seed=7")


def test_a_seed_beside_a_trained_policy_is_refused_naming_generate_seeds():
    """seed= seeds a random-init policy's weights alone: beside model.path, seed=1 and seed=2 wrote the same data,
    and a resume under another seed was taken as the same run."""
    from simpo_exp.config import ConfigError
    from simpo_exp.generate.config import check_overrides

    with pytest.raises(ConfigError, match=r"seed='2': seeds a random-init policy's weights alone.*generate.seeds"):
        check_overrides(["seed=2"], "/runs/R0/model")
    check_overrides(["seed=2"])  # the random init's weights: read


def test_the_hf_sampler_decodes_with_the_projects_settings_alone(tmp_path):
    """A model's generation_config.json (Qwen2.5-Instruct ships a repetition_penalty) filled in whatever the call
    left at transformers' defaults: greedy answers changed (repetition penalty, no-repeat n-grams, a minimum length),
    and the hf backend sampled another distribution than vllm, whose SamplingParams are explicit. A model with such
    a file now answers as the same model without it."""
    from simpo_exp.inference.sampling import HFSampler, prompt_token_ids
    from simpo_exp.model import load_tokenizer
    from tests.tiny import save_tiny_llama

    answers = {}
    for name, extra in (("plain", None), ("shipped", {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2})):
        path = tmp_path / name
        save_tiny_llama(path, seed=3, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        if extra:
            config = json.loads((path / "generation_config.json").read_text())
            (path / "generation_config.json").write_text(json.dumps({**config, **extra, "min_new_tokens": 6}))
        cfg = compose_generate(f"model.path={path}", "generate.max_new_tokens=12", "hardware.device=cpu")
        cfg.generate.temperature = 0
        tok = load_tokenizer(cfg.model)
        ids = prompt_token_ids(tok, [[{"role": "user", "content": f"sort: {d} 1 2"}] for d in range(4)])
        outs = HFSampler(cfg, tok).sample(ids, ["0", "1", "2", "3"], seed=0)
        answers[name] = [o[0]["text"] for o in outs]
    assert answers["shipped"] == answers["plain"]


def test_the_hf_sampler_asks_for_its_settings_and_keeps_each_prompts_samples_together(tmp_path):
    """generate() is asked for the temperature and top_p given and top_k=0 (left out, transformers truncates to the
    top 50 tokens, unlike vLLM and the official sampling); with samples_per_seed=2 each prompt gets its own two
    answers: at a top_p that keeps only the likeliest token each equals that prompt's greedy answer."""
    from simpo_exp.inference.sampling import HFSampler, prompt_token_ids
    from simpo_exp.model import load_tokenizer
    from tests.tiny import save_tiny_llama

    path = tmp_path / "policy"
    save_tiny_llama(path, seed=3, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    overrides = (f"model.path={path}", "generate.max_new_tokens=8", "hardware.device=cpu")
    cfg = compose_generate(*overrides, "generate.samples_per_seed=2", "generate.temperature=0.7", "generate.top_p=1e-9")
    tok = load_tokenizer(cfg.model)
    ids = prompt_token_ids(tok, [[{"role": "user", "content": f"sort: {d} {9 - d} 5"}] for d in range(4)])
    sampler, asked = HFSampler(cfg, tok), []
    generate = sampler.model.generate
    sampler.model.generate = lambda **kw: asked.append(kw) or generate(**kw)
    sampled = sampler.sample(ids, ["0", "1", "2", "3"], seed=0)
    assert {(kw["temperature"], kw["top_p"], kw["top_k"], kw["num_return_sequences"]) for kw in asked} == {
        (0.7, 1e-9, 0, 2)
    }
    greedy_cfg = compose_generate(*overrides)
    greedy_cfg.generate.temperature = 0
    greedy = [o[0]["text"] for o in HFSampler(greedy_cfg, tok).sample(ids, ["0", "1", "2", "3"], seed=0)]
    assert len(set(greedy)) > 1  # answers that tell the prompts apart
    assert [[o["text"] for o in outs] for outs in sampled] == [[g, g] for g in greedy]
    # fewer prompts than samples each (a last batch of one): its two answers are still its own
    assert [[o["text"] for o in outs] for outs in sampler.sample(ids[:1], ["0"], seed=0)] == [[greedy[0]] * 2]


@pytest.mark.parametrize(
    "override",
    ["generate.max_new_tokens=9", "generate.top_p=0.5", "generate.samples_per_seed=3", "generate.seeds=[1,2]"],
)
def test_every_sampling_setting_binds_the_shards_of_a_resume(override):
    """A resumed generation with other sampling settings would mix answers sampled two ways in one data set: each
    setting is in the shards' manifest, and a change of it is named."""
    from simpo_exp.generate.run import _manifest
    from simpo_exp.inference.files import manifest_changes

    prompts = [{"prompt_id": "a", "input_ids": [1, 2]}]
    before = _manifest(compose_generate(), {}, prompts)
    after = _manifest(compose_generate(override), {}, prompts)
    key = override.split("=")[0]
    assert [c.split(":")[0] for c in manifest_changes(before, after, keys=set(before), stored_only=True)] == [key]


def test_a_reward_models_label_index_picks_its_output_and_names_its_scores(tmp_path):
    """scorer.label_index names which output of a multi-output head is the reward: the score is that output of an
    unpadded forward, and scores of another output are other shards (a resume does not mix them)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

    from simpo_exp.generate.run import scorer_tag
    from simpo_exp.inference.scoring import make_scorer, render_for_scoring
    from tests.tiny import save_tiny_llama

    path = tmp_path / "rm3"
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=3)
    save_tiny_llama(path, LlamaForSequenceClassification, **shape)
    overrides = ("scorer=reward-model", f"scorer.path={path}", "scorer.dtype=float32")
    cfg = compose_generate(*overrides, "scorer.label_index=2")
    prompt, response = [{"role": "user", "content": "sort: 3 1 2"}], "1 2 3"
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
    ids = tokenizer(render_for_scoring(tokenizer, cfg.scorer, prompt, response), add_special_tokens=False)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([ids["input_ids"]])).logits[0]
    scorer = make_scorer(cfg)
    (score,) = scorer.score([prompt], [response])
    scorer.close()
    assert score == pytest.approx(logits[2].item(), abs=1e-5) and abs(logits[2] - logits[0]) > 1e-3
    assert scorer_tag(cfg) != scorer_tag(compose_generate(*overrides, "scorer.label_index=1"))


def test_the_vllm_sampler_asks_for_the_projects_settings_and_gives_the_gpu_back(tmp_path, monkeypatch):
    """vLLM itself needs a GPU (tests/test_gpu.py runs it there); a stand-in module checks, on any machine, what the
    sampler asks of it (one request per prompt, token ids, n samples, a seed per prompt, the stop ids) and reads
    back, and that close() stops the engine's process and runs vLLM's cleanup before the reward model loads."""
    import sys
    import types

    import torch
    from transformers import AutoConfig

    from simpo_exp.config import ConfigError
    from simpo_exp.inference import sampling
    from simpo_exp.inference.sampling import VLLMSampler
    from simpo_exp.model import load_tokenizer
    from tests.tiny import save_tiny_llama

    calls = {"generate": [], "shutdown": 0, "cleanup": 0}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Engine:
        class engine_core:  # noqa: N801 (vLLM's attribute name)
            @staticmethod
            def shutdown():
                calls["shutdown"] += 1

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs
            self.llm_engine = Engine()

        def generate(self, prompts, sampling_params, use_tqdm):
            calls["generate"].append((prompts, sampling_params))
            out = lambda text, ids, reason: types.SimpleNamespace(text=text, token_ids=ids, finish_reason=reason)  # noqa: E731
            ended, cut = out(" a", [*ids(" a"), tokenizer.eos_token_id], "stop"), out(" bcd", ids(" bcd"), "length")
            # a stop id that is no special token: vLLM's text keeps it ("unless the stop tokens are special")
            newline = out(" x\n", [*ids(" x"), stop_newline], "stop")
            bare = out(" y", ids(" y"), "stop")  # ended by EOS, its id not among the token ids
            return [types.SimpleNamespace(outputs=[ended, cut, newline, bare]) for _ in prompts]

    def cleanup_dist_env_and_memory():
        calls["cleanup"] += 1

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    state = types.ModuleType("vllm.distributed.parallel_state")
    state.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", state)

    save_tiny_llama(tmp_path / "policy")
    cfg = compose_generate(
        f"model.path={tmp_path / 'policy'}", "generate.backend=vllm", "generate.samples_per_seed=2",
        "generate.seeds=[7]", "generate.vllm_gpu_memory_utilization=0.5", "generate.max_new_tokens=9",
    )  # fmt: skip
    tokenizer = load_tokenizer(cfg.model)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    (stop_newline,) = ids("\n")
    cfg = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, stop_token_ids=[stop_newline]))
    # on a CPU device it is refused: vLLM would take the GPU anyway, in the float32 a CPU run samples in
    with pytest.raises(ConfigError, match=r"generate.backend=vllm runs on a GPU, and this run's device is cpu"):
        VLLMSampler(cfg, tokenizer)
    assert "llm" not in calls
    monkeypatch.setattr(sampling, "pick_device", lambda device: torch.device("cuda", 0))
    sampler = VLLMSampler(cfg, tokenizer)
    assert calls["llm"]["model"] == str(tmp_path / "policy") and calls["llm"]["gpu_memory_utilization"] == 0.5
    assert calls["llm"]["seed"] == 7
    # a separate tokenizer repo is read at its own head, as load_tokenizer reads it: vLLM read it at the model's
    # revision (tokenizer_revision defaults to revision there), a commit the tokenizer repo does not have
    pinned = dataclasses.replace(cfg.model, revision="0" * 40, tokenizer_path="org/tokenizer")
    VLLMSampler(dataclasses.replace(cfg, model=pinned), tokenizer)
    assert (calls["llm"]["revision"], calls["llm"]["tokenizer_revision"]) == ("0" * 40, "main")
    VLLMSampler(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, revision="v1")), tokenizer)
    assert calls["llm"]["tokenizer_revision"] == "v1"  # the model's own tokenizer: the model's revision
    # vLLM's context: the longest prompt and max_new_tokens, not the model's whole context (whose KV cache a small
    # card may not hold: vLLM then refuses to start); the model's own where they reach its positions
    assert "max_model_len" not in calls["llm"]  # no prompt length given: vLLM's default
    positions = AutoConfig.from_pretrained(tmp_path / "policy").max_position_embeddings
    VLLMSampler(cfg, tokenizer, longest_prompt=positions - 10)
    assert calls["llm"]["max_model_len"] == positions - 1  # 9 new tokens after the longest prompt
    VLLMSampler(cfg, tokenizer, longest_prompt=positions - 9)
    assert "max_model_len" not in calls["llm"]
    # a model whose config transformers cannot read (vLLM's own loader may): vLLM's default, not an error here
    (tmp_path / "no-config").mkdir()
    unread = dataclasses.replace(cfg.model, path=str(tmp_path / "no-config"))
    assert sampling.vllm_max_model_len(unread, 10, 5) is None
    records = sampler.sample([[1, 3, 4], [1, 9]], ["p0", "p1"], seed=11)
    (prompts, params) = calls["generate"][0]
    assert prompts == [{"prompt_token_ids": [1, 3, 4]}, {"prompt_token_ids": [1, 9]}]
    asked = [p.kwargs for p in params]
    g = cfg.generate
    for a in asked:
        assert (a["n"], a["temperature"], a["top_p"], a["max_tokens"]) == (2, g.temperature, g.top_p, 9)
        assert a["stop_token_ids"] == sampler.stop_ids and a["skip_special_tokens"] is True
    # one stream per prompt: a prompt's draws do not depend on its batch (its logits may, vLLM says, outside its
    # batch-invariant mode)
    assert asked[0]["seed"] != asked[1]["seed"]
    ended = {"text": " a", "n_tokens": len(ids(" a")) + 1, "finished": True}
    cut = {"text": " bcd", "n_tokens": len(ids(" bcd")), "finished": False}
    newline = {"text": " x", "n_tokens": len(ids(" x")) + 1, "finished": True}  # as the hf backend cuts it
    bare = {"text": " y", "n_tokens": len(ids(" y")), "finished": True}
    assert records == [[ended, cut, newline, bare]] * 2
    sampler.close()
    assert calls["shutdown"] == 1 and calls["cleanup"] == 1 and not hasattr(sampler, "llm")


def test_sampling_stops_at_the_templates_end_of_turn_and_the_models_own_end_ids():
    """A Gemma-like template ends a turn with a token of its own, not EOS, and a model's generation_config may list
    more end ids: sampling stops at each of them (without, every answer runs to max_new_tokens)."""
    from types import SimpleNamespace

    from simpo_exp.inference.sampling import stop_token_ids
    from simpo_exp.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end != tok.eos_token_id
    stops = stop_token_ids(tok, [], SimpleNamespace(eos_token_id=[tok.eos_token_id, 11]))
    assert stops == sorted({tok.eos_token_id, end, 11})
    assert stop_token_ids(tok, [], SimpleNamespace(eos_token_id=12)) == sorted({tok.eos_token_id, end, 12})


def test_stop_ids_outside_the_tokenizer_are_refused_and_vllm_is_not_bound_by_the_hf_batch(tmp_path):
    """generate.stop_token_ids=[999999] was taken as it was: never sampled, every response ran to max_new_tokens. And
    under backend=vllm, which batches its requests itself, a resume that changed generate.batch_size was refused."""
    from simpo_exp.config import ConfigError
    from simpo_exp.generate.run import _manifest, check_manifest
    from simpo_exp.inference.sampling import stop_token_ids
    from simpo_exp.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    with pytest.raises(ConfigError, match=r"stop_token_ids=\[5, 999999\] .*: \[999999\] not ids of the tokenizer"):
        stop_token_ids(tok, [5, 999999])
    assert 5 in stop_token_ids(tok, [5])
    prompts = [{"prompt_id": "a", "input_ids": [1, 2]}]
    hf = _manifest(compose_generate("generate.batch_size=4"), {}, prompts)["generate"]
    vllm = _manifest(compose_generate("generate.backend=vllm", "model.path=/m", "generate.batch_size=4"), {}, prompts)
    assert hf["batch_size"] == 4 and "batch_size" not in vllm["generate"]
    shards = tmp_path / "shards"  # a vLLM manifest written before, with its batch_size, resumes under another
    check_manifest(shards, {**vllm, "generate": {**vllm["generate"], "batch_size": 16}})
    (shards / "responses-00000.jsonl").write_text("{}\n")
    check_manifest(shards, vllm)


def test_a_response_reads_as_it_does_after_its_prompt():
    """Decoded alone, a SentencePiece response (Mistral's tokenizer strips a text's first space) lost its leading
    space: "\u2581Hi" came out "Hi", training (which tokenises prompt and response together) read the token "H" the
    policy had not sampled, and the vllm backend, which decodes after the prompt, gave " Hi"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from simpo_exp.inference.sampling import response_text

    chars = [*"abcdefghijklmnopqrstuvwxyzHI[]/ ", "\u2581"]
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    vocab["\u2581H"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "H")]))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    prompt = tok("[INST] hi [/INST]", add_special_tokens=False)["input_ids"]
    sampled = [vocab[t] for t in ("\u2581H", "i", "\u2581", "t", "h", "e", "r", "e")]
    text = response_text(tok, prompt, sampled)
    assert text == " Hi there"
    assert tok("[INST] hi [/INST]" + text, add_special_tokens=False)["input_ids"][len(prompt) :] == sampled


def test_a_sampled_answer_keeps_its_spaces_whatever_the_tokenizers_clean_up_flag():
    """Llama-3's tokenizer files set clean_up_tokenization_spaces, which transformers before 5.7 applied to BPE
    decoding too: "x != y" came back "x!= y" (code and maths answers changed before scoring and training); vLLM's
    detokenizer never cleans up. The pre-5.7 behaviour is turned on here by transformers' own override."""
    from simpo_exp.inference.sampling import response_text
    from simpo_exp.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    answer = "if x != y : print ('a') ."
    prompt = tok("[user] hi", add_special_tokens=False)["input_ids"]
    sampled = tok(answer, add_special_tokens=False)["input_ids"]
    tok.clean_up_tokenization_spaces = True
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    assert tok.decode(sampled) != answer  # the flag is live: a plain decode loses the spaces
    assert response_text(tok, prompt, sampled) == answer


def test_the_armorm_scorer_reads_the_papers_long_generations_uncut():
    """The official annotation scores each conversation whole and ArmoRM reads 8192 positions: the default 4096
    cut the longest of generate=paper's answers (up to 4096 new tokens after the prompt) before scoring."""
    cfg = compose_generate("scorer=armorm", "generate=paper", "model=llama3-8b-instruct")
    assert cfg.scorer.max_length == 8192 and cfg.generate.max_new_tokens == 4096
    assert cfg.scorer.path == "RLHFlow/ArmoRM-Llama3-8B-v0.1"


def test_a_prompt_that_fills_the_policys_positions_is_refused_before_sampling(tmp_path):
    """max_prompt_length is the only cut on prompts: one longer than the model's positions stopped the stage when
    its shard came to be sampled, after the shards before it, whose stored settings then refused the lower
    max_prompt_length the error asked for (the sampled work lost). It is refused before anything is sampled."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from simpo_exp.config import ConfigError
    from simpo_exp.generate.run import _tokenised_prompts
    from simpo_exp.model import build_tiny_tokenizer, load_tokenizer

    tok = build_tiny_tokenizer()
    shape = dict(n_positions=24, n_embd=32, n_layer=1, n_head=2, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **shape)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    overrides = ("max_length=4096", "max_prompt_length=3000", "dataset.max_train_samples=4")
    cfg = compose_generate(f"model.path={tmp_path}", *overrides)
    with pytest.raises(ConfigError, match=r"max_prompt_length=3000 lets through a prompt of \d+ tokens, which fills"):
        _tokenised_prompts(cfg, load_tokenizer(cfg.model))
    cfg.max_prompt_length = 20  # prompts over it are dropped and counted; the rest have room
    kept, counts = _tokenised_prompts(cfg, load_tokenizer(cfg.model))
    assert kept and all(len(p["input_ids"]) <= 20 for p in kept) and counts["prompt too long"]


def test_answers_stop_at_the_models_last_position(tmp_path, caplog):
    """max_new_tokens past the model's positions (a benchmark preset's 4096 on a 2048-position model): a model of
    learned positions (GPT-2's) failed with an IndexError once the answers reached them; the answers now stop there,
    counted as cut, and a warning says so."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from simpo_exp.config import ConfigError
    from simpo_exp.inference.sampling import HFSampler, prompt_token_ids
    from simpo_exp.model import build_tiny_tokenizer, load_tokenizer

    tok = build_tiny_tokenizer()
    shape = dict(n_positions=40, n_embd=32, n_layer=1, n_head=2, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **shape)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = compose_generate(f"model.path={tmp_path}", "generate.max_new_tokens=200", "hardware.device=cpu")
    cfg.generate.temperature = 0
    tok = load_tokenizer(cfg.model)
    ids = prompt_token_ids(tok, [[{"role": "user", "content": f"sort: {d} 1 2"}] for d in range(3)])
    width = max(map(len, ids))
    with caplog.at_level("WARNING", logger="simpo_exp.inference.sampling"):
        outs = HFSampler(cfg, tok).sample(ids, ["0", "1", "2"], seed=0)
    assert all(o[0]["n_tokens"] <= 40 - width for o in outs)
    assert "and max_new_tokens=200 pass the model's 40 positions" in caplog.text
    long = [[{"role": "user", "content": "sort: " + " ".join("9" * 40)}]]
    with pytest.raises(ConfigError, match="fills the model's 40 positions"):
        HFSampler(cfg, tok).sample(prompt_token_ids(tok, long), ["0"], seed=0)


def test_the_hub_commit_a_model_was_read_from_is_named(tmp_path, monkeypatch):
    """The hub presets pin no revision, so they follow main (princeton-nlp/Llama-3-Base-8B-SFT's tokenizer files
    changed after the paper's runs): a training run's env.json and the generate stage's fingerprint name the commit
    the local cache holds, which model.revision=<it> repeats."""
    from huggingface_hub import constants

    from simpo_exp.hub import hub_commit

    sha = "c8ea4f8" + "0" * 33
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_commit("org/tiny", None) == hub_commit("org/tiny", "main") == hub_commit("org/tiny", sha) == sha
    assert hub_commit("org/other", None) is None  # not downloaded
    assert hub_commit(str(tmp_path), None) is None  # a local folder


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["generate.backend=sglang"], "generate.backend='sglang': allowed values are 'hf', 'vllm'"),
        (["generate.seeds=[13,13]"], "generate.seeds=[13, 13]: must not repeat a seed"),
        (["generate.seeds=[1,2,3]", "generate.samples_per_seed=0"], "generate.samples_per_seed=0: must be >= 1"),
        (["generate.top_p=0"], "generate.top_p=0.0: must be in (0, 1]"),
        (["generate.splits=[test]"], "generate.splits=['test']: must be [train] or [train,test]"),
        (["generate.shard_size=0"], "generate.shard_size=0: must be an integer >= 1"),
        (["generate.max_new_tokens=0"], "generate.max_new_tokens=0: must be an integer >= 1"),
        (["generate.batch_size=0"], "generate.batch_size=0: must be an integer >= 1"),
        (["generate.vllm_tensor_parallel_size=0"], "generate.vllm_tensor_parallel_size=0: must be an integer >= 1"),
        (["generate.vllm_gpu_memory_utilization=1.5"], "generate.vllm_gpu_memory_utilization=1.5: must be in (0, 1]"),
        (["generate.backend=vllm"], "generate.backend='vllm': vllm loads weights from disk: set model.path"),
        (["scorer.rule=exact_match"], "scorer.rule='exact_match': allowed values are 'sort_digits'"),
        (["scorer.kind=reward_model"], "scorer.path='': kind=reward_model needs a hub id"),
        (["scorer.dtype=float64"], "scorer.dtype='float64': allowed values are 'auto', 'float32'"),
        (["scorer.batch_size=0"], "scorer.batch_size=0: must be >= 1"),
        (["scorer.max_length=1"], "scorer.max_length=1: must be >= 2"),
        (["scorer.label_index=-1"], "scorer.label_index=-1: must be >= 0 or null"),
        (["binarise.min_gap=-1"], "binarise.min_gap=-1.0: must be >= 0"),
        (["binarise.mode=min_gap"], "binarise.min_gap=0.0: must be > 0 with binarise.mode=min_gap"),
    ],
)
def test_each_bad_generate_scorer_or_binarise_value_is_refused_by_its_key(overrides, says):
    """Each of these was a check of its own that no test reached: dropping one let a repeated seed (passes that
    sample alike), an empty scorer path, a shard size of 0 or a negative label index through to the run."""
    from simpo_exp.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose_generate(*overrides)
    assert says in str(err.value), str(err.value)
    # the edges that are allowed
    rm = ("scorer.kind=reward_model", "scorer.path=/rm")  # the rule scorer reads neither key below
    compose_generate("generate.top_p=1", "generate.vllm_gpu_memory_utilization=1", "scorer.max_length=2", *rm)
    compose_generate("generate.splits=[train,test]", "scorer.label_index=0", "binarise.min_gap=0", *rm)
    compose_generate("binarise.mode=min_gap", "binarise.min_gap=0.5", "generate.backend=vllm", "model.path=/tmp/m")


def test_every_hardware_setting_sampling_reads_and_the_stage_keys_it_reads_are_accepted():
    from simpo_exp.config import ConfigError
    from simpo_exp.generate.config import check_overrides

    check_overrides(
        ["hardware.device=cpu", "hardware.mixed_precision=bf16", "hardware.attn_implementation=sdpa"]
        + ["hardware.fused_layers=liger", "hardware.master_weights=fp32"]
        + ["seed=7", "max_prompt_length=256", "max_length=1024", "output_dir=/tmp/x", "logger=none"]
    )
    for override in ("logger.entity=me", "~beta", "+beta=5"):
        with pytest.raises(ConfigError):
            check_overrides([override])


@pytest.mark.parametrize(
    "value",
    ["/data/plain/train.jsonl", "/data/my runs/G1/data", "/s/0_beta=2,seed=1/data", "/data/it's/x", "/data/[1,2]/x"]
    + ["/data/café/x", '/data/say "hi"/x', "/data/a!b#c;d/x", "/data/$HOME/x", "/data/x ", " /data/x"],
)
def test_the_printed_train_command_gives_hydra_each_path_as_it_is(value):
    """The printed "train on it" command quoted a path for Hydra only where it held '=' or ',': a folder with a space
    (split by the shell) or a quote, '!' or a letter past ASCII (Hydra's grammar) gave a command that failed pasted."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from simpo_exp.rundir import shell_override

    (word,) = shlex.split(shell_override("dataset.sources.local.path", value))  # one word in the shell
    parsed = OverridesParser.create().parse_override(word)
    assert parsed.key_or_group == "dataset.sources.local.path" and parsed.value() == value


def test_the_hf_sampler_on_a_gpu_without_flash_attn_takes_sdpa_as_training_does(monkeypatch):
    """hardware.attn_implementation=flash_attention_2 (the GPU presets') on a GPU without flash-attn: training falls
    back to sdpa with a warning; the hf sampler passed flash_attention_2 on, and transformers refused the model."""
    import torch

    import simpo_exp.model
    from simpo_exp.inference import sampling

    asked = []

    def load_model(cfg, tokenizer, attn):
        asked.append(attn)
        raise RuntimeError("stop before the weights go to the (pretended) GPU")

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    monkeypatch.setattr(sampling, "pick_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(simpo_exp.model, "load_model", load_model)
    cfg = compose_generate("hardware.attn_implementation=flash_attention_2")
    with pytest.raises(RuntimeError, match="stop before"):
        sampling.HFSampler(cfg, None)
    assert asked == ["sdpa"]


def test_the_printed_train_command_trains_a_runs_policy_under_that_runs_recipe(tmp_path):
    """The generate stage's printed command named a model preset only where its own command named one: the README's
    loop (generate model.path=<run>/model, no preset) trained the next round under the default preset, tiny, at its
    1e-3 and 256 tokens, whatever the sampled policy was trained with. The run's presets and given learning rate are
    carried now."""
    import yaml

    from simpo_exp.generate.run import policy_run_recipe

    run = tmp_path / "R0"
    (run / ".hydra").mkdir(parents=True)
    runtime = {
        "choices": {"model": "my-llama", "hparams": "instruct", "dataset": "ultrafeedback-binarized"},
        "config_sources": [{"path": str(tmp_path / "my conf"), "schema": "file", "provider": "command-line"}],
    }
    overrides = {"task": ["model=my-llama", "learning_rate=1e-6", "beta=2.5"], "hydra": []}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": runtime, "overrides": overrides}}))
    said = policy_run_recipe(str(run / "model"), ["python -m simpo_exp"])
    assert said == [
        f"--config-dir '{tmp_path / 'my conf'}'",
        "model=my-llama",
        "hparams=instruct",
        "learning_rate=1e-6",
        "beta=2.5",
    ]
    # a recipe's run: the recipe itself, and the run's own keys but its data, model and folder; a key this command
    # gives (max_length here) is this command's
    runtime["choices"] = {"model": "llama3-8b-instruct", "hparams": "default", "experiment": "simpo-x"}
    overrides["task"] = ["experiment=simpo-x", "beta=7", "dataset=ultrafeedback-armorm", "model.revision=abc",
                         "hydra.run.dir=outputs/R0", "+launcher=slurm", "max_length=1024"]  # fmt: skip
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": runtime, "overrides": overrides}}))
    said = policy_run_recipe(str(run / "model"), [f"--config-dir '{tmp_path / 'my conf'}'"], {"max_length"})
    assert said == ["experiment=simpo-x", "beta=7"]
    # the README's own tiny loop: the run's keys carried (its next round trained at the default beta and rate)
    runtime["choices"], runtime["config_sources"] = {"model": "tiny", "hparams": "default"}, []
    overrides["task"] = ["learning_rate=1e-6", "beta=2.5", "model.random_init.hidden_size=48"]
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": runtime, "overrides": overrides}}))
    assert policy_run_recipe(str(run / "model"), []) == ["learning_rate=1e-6", "beta=2.5"]
    runtime["choices"], overrides["task"] = {"model": "tiny", "hparams": "strong-prefs"}, ["hparams=strong-prefs"]
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": runtime, "overrides": overrides}}))
    assert policy_run_recipe(str(run / "model"), []) == ["hparams=strong-prefs"]
    runtime["choices"], overrides["task"] = {"model": "tiny", "hparams": "default"}, []
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": runtime, "overrides": overrides}}))
    assert policy_run_recipe(str(run / "model"), []) == []
    assert policy_run_recipe(str(tmp_path / "weights"), []) == [] and policy_run_recipe(None, []) == []


def test_processes_started_together_with_other_settings_do_not_mix_their_shards(tmp_path, monkeypatch):
    """The README's ``RANK=$i WORLD_SIZE=n ... &``: each process wrote its manifest before any shard bound it, so one
    given another temperature sampled its shards with it, and the last to finish wrote a data set of both whose
    provenance named its own settings alone. A process whose manifest is no longer the folder's writes nothing."""
    from simpo_exp.config import ConfigError
    from simpo_exp.generate.run import _manifest, _process, check_manifest, check_still_bound

    made = []

    class Sampler:
        def __init__(self, cfg, tokenizer, longest_prompt=None):
            made.append(longest_prompt)

        def sample(self, ids, keys, seed):
            return [[{"text": "12", "n_tokens": 2, "finished": True}] for _ in ids]

        def close(self):
            pass

    monkeypatch.setattr("simpo_exp.inference.sampling.make_sampler", Sampler)
    prompts = [{"prompt_id": "a", "prompt": [{"role": "user", "content": "sort: 21"}], "input_ids": [1, 2]}]
    mine, theirs = compose_generate(), compose_generate("generate.temperature=0.3")
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    check_manifest(shard_dir, _manifest(mine, {}, prompts))  # this process starts
    check_manifest(shard_dir, _manifest(theirs, {}, prompts))  # the other, a moment later: no shard binds yet
    bound = lambda folder: check_still_bound(folder, _manifest(mine, {}, prompts))  # noqa: E731
    with pytest.raises(ConfigError, match=r"another process of this generation .*generate.temperature: stored 0.3"):
        _process(mine, [(shard_dir, [prompts, prompts])], 0, 2, "rule", bound)
    assert not list(shard_dir.glob("responses-*"))
    _process(theirs, [(shard_dir, [prompts, prompts])], 1, 2, "rule", bound=lambda f: check_still_bound(
        f, _manifest(theirs, {}, prompts)))  # fmt: skip
    assert (shard_dir / "responses-00001.jsonl").exists()  # the folder's own settings write
    # no prompt over max_prompt_length is sampled: vLLM's context is sized to it (VLLMSampler)
    assert made and set(made) == {mine.max_prompt_length}


@pytest.mark.parametrize("pad", ["eos", "own"])
def test_a_composite_config_reward_models_head_reads_the_pad_id_the_scorer_sets(pad, tmp_path):
    """transformers' sequence-classification heads read the pad id of the text config (get_text_config()), which a
    composite config nests (Gemma3ForSequenceClassification): the scorer set the top-level one, so with the EOS for
    pad every row ending with EOS was read a token early (scores silently off), and with a pad token of its own the
    stage failed after all its sampling (the top-level config has no pad_token_id). Scores equal each row's alone."""
    import torch
    from transformers import Gemma3Config, Gemma3ForSequenceClassification

    from simpo_exp.inference.scoring import make_scorer, render_for_scoring
    from simpo_exp.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    if pad == "eos":
        tok.pad_token = tok.eos_token
    size = len(tok)
    text = dict(vocab_size=size + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=size + 1,
                          boi_token_index=size + 2, eoi_token_index=size + 3, num_labels=1)  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    cfg = compose_generate("scorer=reward-model", f"scorer.path={tmp_path / 'rm'}", "scorer.dtype=float32")
    prompts = [[{"role": "user", "content": "sort: 3 1 2"}]] * 3
    responses = ["1 2 3", "1 2", "3 2 1 0 0 0 0"]
    expected = []
    for prompt, response in zip(prompts, responses):
        ids = tok(render_for_scoring(tok, cfg.scorer, prompt, response), add_special_tokens=False)["input_ids"]
        with torch.no_grad():  # one row alone, read at its last token
            expected.append(model.score(model.model(input_ids=torch.tensor([ids])).last_hidden_state)[0, -1, 0].item())
    scorer = make_scorer(cfg)
    assert scorer.score(prompts, responses) == pytest.approx(expected, abs=1e-5)
    scorer.close()
