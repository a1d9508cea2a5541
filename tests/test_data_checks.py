"""The data pipeline's choices no test pinned (from a mutation review of sources, tokenize, report and prompts):
the refusals at one offending sequence, the official cut's EOS and exact fit, the empty system turn of chatml
templates, a system turn a template leaves out, a train split named ``all``, a dropped row at a shard's start,
a JSON-encoded rejected response, blank prompts and ids in the generate stage's prompts, the tokenizer hash a
resume checks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from datasets import Dataset

from simpo_exp.config import ConfigError, DatasetConfig, SourceConfig
from simpo_exp.data import build_datasets, report
from simpo_exp.data.sources import normalise_row, row_finder
from simpo_exp.data.tokenize import _tokenise_batch, prompt_messages
from simpo_exp.model import build_tiny_tokenizer
from tests.test_data import (  # noqa: F401 (the fixtures)
    _private_datasets_cache,
    make_config,
    pairs_of,
    tok,
    triples,
    uf_row,
    write_jsonl,
)

BOS, EOS = 1, 2


def _report(rows: list[tuple], bos: int = BOS, eos: int = EOS, blank: int | None = None, **allow) -> dict:
    """tokenization_report over (prompt, chosen, rejected) id lists, nothing truncated, refusals on; ``blank``: a
    token that decodes to whitespace alone."""
    ds = Dataset.from_dict(
        {
            "prompt_input_ids": [r[0] for r in rows],
            "chosen_input_ids": [r[1] for r in rows],
            "rejected_input_ids": [r[2] for r in rows],
            "chosen_truncated": [False] * len(rows),
            "rejected_truncated": [False] * len(rows),
            "prompt_tokens_moved": [0] * len(rows),
        }
    )
    fake = SimpleNamespace(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=0, bos_token="<s>", chat_template="",
        decode=lambda ids: " " if ids == [blank] else "x", convert_ids_to_tokens=lambda ids: [str(i) for i in ids],
    )  # fmt: skip
    real = report.end_token_ids
    report.end_token_ids = lambda t: {eos}
    try:
        return report.tokenization_report({"train": ds}, fake, DatasetConfig(name="t", **allow))
    finally:
        report.end_token_ids = real


def test_one_sequence_with_two_bos_or_one_response_without_an_end_refuses_the_run():
    good = ([BOS, 5], [6, EOS], [7, EOS])
    _report([good] * 3)
    with pytest.raises(ConfigError, match="1 of 3 train sequences start with two BOS"):
        _report([good, good, ([BOS, BOS, 5], [6, EOS], [7, EOS])])
    with pytest.raises(ConfigError, match="1 untruncated train responses do not end with an EOS"):
        _report([good, good, ([BOS, 5], [6, EOS], [7])])
    # each refusal has its own setting, which lets that one through and not the other
    unended, doubled = ([BOS, 5], [6, EOS], [7]), ([BOS, BOS, 5], [6, EOS], [7, EOS])
    assert _report([good, unended], allow_missing_eos=True)["splits"]["train"]["responses_without_end_token"] == 1
    assert _report([good, doubled], allow_double_bos=True)["splits"]["train"]["pairs"] == 2
    with pytest.raises(ConfigError, match="1 untruncated train responses do not end with an EOS"):
        _report([good, unended], allow_double_bos=True)
    with pytest.raises(ConfigError, match="1 of 2 train sequences start with two BOS"):
        _report([good, doubled], allow_missing_eos=True)


def test_a_split_with_a_repeated_pair_counts_every_pair_it_trains_on():
    good, other = ([BOS, 5], [6, EOS], [7, EOS]), ([BOS, 8], [6, EOS], [7, EOS])
    split = _report([good, other, good])["splits"]["train"]
    assert split["pairs"] == 3 and split["duplicate_pairs"] == 1


def test_end_tokens_are_eos_and_the_turn_ends_not_bos_or_pad_unless_one_is_eos():
    tiny = build_tiny_tokenizer()
    ends = report.end_token_ids(tiny)
    assert tiny.eos_token_id in ends and not {tiny.bos_token_id, tiny.pad_token_id} & ends
    tiny.pad_token = tiny.eos_token  # a pad that is EOS (GPT-2's one token for all three): still an end
    assert tiny.eos_token_id in report.end_token_ids(tiny)


def test_a_bos_that_is_also_eos_after_a_one_token_answer_is_no_double_bos():
    """GPT-2's and Pythia's <|endoftext|> is BOS and EOS: a one-token answer ends with it, and the check reads the
    prompt's first two ids and the answer's first two: two BOS in them, but not at the start."""
    assert not report.doubled_bos([BOS, 5, 6, BOS], BOS) and report.doubled_bos([BOS, BOS, 5], BOS)
    assert not report.doubled_bos([BOS, BOS], None)  # a tokenizer without BOS: nothing to double
    got = _report([([EOS, 5], [6, EOS], [7, EOS])] * 2, bos=EOS, eos=EOS)
    assert got["splits"]["train"]["responses_without_end_token"] == 0


def test_an_end_token_followed_by_many_blank_tokens_still_ends_the_answer():
    """The end is looked for in a response's last 32 tokens first; past them, where every one is blank, the whole
    response is read: an answer whose EOS is followed by 40 blank tokens ends (the run was refused)."""
    got = _report([([BOS, 5], [6, EOS] + [9] * 40, [7, EOS])], blank=9)
    assert got["splits"]["train"]["responses_without_end_token"] == 0
    with pytest.raises(ConfigError, match="1 untruncated train responses do not end with an EOS"):
        _report([([BOS, 5], [6, 8] + [9] * 40, [7, EOS])], blank=9)  # no end before the blanks: none


def test_the_report_holds_the_tokenizer_hash_a_resume_is_checked_against(tmp_path):
    """data_report.json's tokenization.tokenizer_sha256 is what check_same_tokenizer reads: under another key the
    resume on another tokenizer (an added token, the same template) went on unchecked."""
    from simpo_exp.train import check_same_tokenizer

    then = build_tiny_tokenizer()
    got = _report([([BOS, 5], [6, EOS], [7, EOS])])
    assert set(got) >= {"tokenizer_sha256", "chat_template_sha256"}
    from simpo_exp.model import chat_template_hash, tokenizer_hash

    record = {"tokenizer_sha256": tokenizer_hash(then), "chat_template_sha256": chat_template_hash(then)}
    (tmp_path / "data_report.json").write_text(json.dumps({"tokenization": record}))
    check_same_tokenizer(tmp_path, then)
    now = build_tiny_tokenizer()
    now.add_tokens(["<extra>"])
    with pytest.raises(Exception, match="tokenizer_sha256 .* then"):
        check_same_tokenizer(tmp_path, now)


def _simpo_repo(tokenizer, max_length: int, max_prompt_length: int, chosen: str = "1 2 3", rejected: str = "3"):
    batch = {"prompt": [[{"role": "user", "content": "hi"}]], "chosen": [chosen], "rejected": [rejected]}
    batch["drop_reason"] = [None]
    return _tokenise_batch(batch, tokenizer, max_length, max_prompt_length, chat_format="simpo_repo")


def test_the_official_cut_adds_no_second_eos_and_leaves_an_exact_fit_of_a_short_prompt_whole():
    t = build_tiny_tokenizer()
    t.chat_template = "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}{% endfor %}"
    whole = _simpo_repo(t, 4096, 2048)
    chosen = whole["chosen_input_ids"][0]
    assert chosen[-1] == t.eos_token_id and chosen[-2] != t.eos_token_id  # the template's EOS, one
    p, c = len(whole["prompt_input_ids"][0]), len(chosen)
    exact = _simpo_repo(t, p + c, p + 2)  # exactly max_length, the prompt under max_prompt_length: nothing cut
    assert exact["chosen_input_ids"] == whole["chosen_input_ids"] and exact["chosen_truncated"] == [False]


def test_a_chatml_template_gets_the_empty_system_turn_under_simpo_repo():
    """alignment-handbook's rule: a template that mentions 'system' or writes <|im_start|>."""
    t = build_tiny_tokenizer()
    t.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"  # noqa: E501
    )
    user = [{"role": "user", "content": "q"}]
    assert prompt_messages(t, user, "simpo_repo") == [{"role": "system", "content": ""}, *user]
    assert prompt_messages(t, user, "generation_prompt") == user


def test_a_system_turn_the_template_leaves_out_drops_the_pair():
    t = build_tiny_tokenizer()
    t.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    batch = {"prompt": [prompt], "chosen": ["a"], "rejected": ["b"], "drop_reason": [None]}
    out = _tokenise_batch(batch, t, 256, 128)
    assert out["drop_reason"] == ["chat template leaves out the prompt's 'system' turn"]


def test_a_train_split_named_all_without_a_test_split_is_carved_not_read_twice(tmp_path, tok):  # noqa: F811
    root = tmp_path / "all"
    write_jsonl(root / "all.jsonl", [uf_row(*t) for t in triples("all", 20)])
    src = SourceConfig(path=str(root), train_split="all", test_split=None)
    train, test, _ = build_datasets(make_config({"s": src}, test_size=0.25), tok)
    assert (len(train), len(test)) == (15, 5) and not set(pairs_of(train)) & set(pairs_of(test))


def test_the_first_row_of_a_second_shard_is_named_in_that_shard(tmp_path):
    root = tmp_path / "shards"
    rows = [uf_row(*t) for t in triples("shard", 5)]
    write_jsonl(root / "data" / "train-00000-of-00002.jsonl", rows[:3])
    write_jsonl(root / "data" / "train-00001-of-00002.jsonl", rows[3:])
    where = row_finder(SourceConfig(path=str(root), test_split=None), "train")
    assert [where(2), where(3), where(4)] == [
        "data/train-00000-of-00002.jsonl line 3",
        "data/train-00001-of-00002.jsonl line 1",
        "data/train-00001-of-00002.jsonl line 2",
    ]


def test_a_test_split_carved_out_of_train_names_its_rows_in_the_train_file(tmp_path):
    """Dropped test rows of a folder source without a test file were named "row N past its files' rows"."""
    root = tmp_path / "folder"
    rows = [json.dumps(uf_row(*t)) for t in triples("carved", 6)]
    root.mkdir()
    (root / "train.jsonl").write_text("\n".join(rows[:3]) + "\n\n" + "\n".join(rows[3:]) + "\n")
    where = row_finder(SourceConfig(path=str(root), test_split=None), "test")
    assert [where(0), where(3)] == ["train.jsonl line 1", "train.jsonl line 5"]


def test_a_rejected_response_encoded_as_a_message_list_is_dropped():
    encoded = json.dumps([{"role": "assistant", "content": "x"}])
    row = normalise_row({"prompt": "p", "chosen": "ok", "rejected": encoded}, SourceConfig(path="x"))
    assert row["drop_reason"].startswith("message list encoded as a JSON string")


def test_the_generate_stages_prompts_leave_out_blank_ones_and_blank_ids(tmp_path):
    import hashlib

    from simpo_exp.data.prompts import train_prompts

    root = tmp_path / "prompts"
    rows = [
        {"prompt": "   ", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "prompt_id": "", "chosen": "a", "rejected": "b"},
        {"prompt": "r", "prompt_id": "mine", "chosen": "a", "rejected": "b"},
    ]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "test.jsonl", rows[1:])  # read as the test split: no train row carved out
    dcfg = make_config({"s": SourceConfig(path=str(root), test_split=None)}).dataset
    prompts, counts = train_prompts(dcfg)
    assert [p["prompt_id"] for p in prompts] == [hashlib.sha256(b"q").hexdigest(), "mine"]
    assert counts["no prompt"] == 1 and counts["rows"] == 3


def test_a_hash_missing_then_or_now_is_left_unchecked(tmp_path, monkeypatch):
    """A run recorded before the hashes were (an empty ``tokenization``) resumes, and so does one whose hash cannot
    be taken now: only two hashes that were both taken and differ refuse a resume."""
    import simpo_exp.train as train_mod

    tokenizer = build_tiny_tokenizer()
    (tmp_path / "data_report.json").write_text(json.dumps({"tokenization": {}}))
    train_mod.check_same_tokenizer(tmp_path, tokenizer)
    record = {"tokenizer_sha256": "0" * 64, "chat_template_sha256": "1" * 64}  # neither is this tokenizer's
    (tmp_path / "data_report.json").write_text(json.dumps({"tokenization": record}))
    with pytest.raises(Exception, match="chat_template_sha256 1+ then"):
        train_mod.check_same_tokenizer(tmp_path, tokenizer)
    monkeypatch.setattr(train_mod, "chat_template_hash", lambda tokenizer: None)
    monkeypatch.setattr(train_mod, "tokenizer_hash", lambda tokenizer: None)
    train_mod.check_same_tokenizer(tmp_path, tokenizer)


def test_the_report_shows_each_side_of_the_example_and_each_sides_truncation():
    got = _report([([BOS, 5], [6, EOS], [7, 8, EOS])])
    assert "7" in got["example"]["rejected"] and "7" not in got["example"]["chosen"]
    lengths = {side: {"p50": 1, "max": 2} for side in ("prompt", "chosen", "rejected")}
    split = {"bos_per_sequence": {1: 3}, "truncated_share": {"chosen": 0.25, "rejected": 0.5}, "lengths": lengths}
    example = {"rendered_chosen": "p ⟦response⟧ c", "chosen": "6|2", "rejected": "7|2"}
    lines = report.report_lines({"chat_template_sha256": "abc", "splits": {"train": split}, "example": example})
    assert "truncated chosen 25.0%, rejected 50.0%" in lines[1]
    assert lines[-2:] == ["  chosen tokens:   6|2", "  rejected tokens: 7|2"]
