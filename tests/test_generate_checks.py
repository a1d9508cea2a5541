"""The generate stage's pure choices that no end-to-end run pins: the rejected draw of best_random, report.json's
counts, the stop ids and their refusals, the sampling precision on a GPU, the backend picked, and the reward
model's refusals made before sampling (tests from a mutation review of sampling, scoring and binarising)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from simpo_exp.config import ConfigError
from simpo_exp.generate.binarise import binarise, pick_pair
from simpo_exp.generate.config import BinariseConfig
from tests.test_generate import _record, compose_generate, tiny_reward_model  # noqa: F401 (a fixture)


def test_best_random_draws_among_all_far_enough_responses_per_prompt_and_seed():
    """best_random is not min_gap's hard negative (always index 3 here) nor best_worst's (always 1): over seeds it
    draws each of the three, the same one again for a seed, and another prompt with the same scores its own draw."""
    rec = _record(["a", "b", "c", "d"], [0.9, 0.1, 0.5, 0.7])
    drawn = [pick_pair(rec, BinariseConfig("best_random", seed=s))[0][1] for s in range(20)]
    assert set(drawn) == {1, 2, 3}
    assert drawn == [pick_pair(rec, BinariseConfig("best_random", seed=s))[0][1] for s in range(20)]
    per_prompt = [pick_pair({**rec, "prompt_id": f"p{i}"}, BinariseConfig("best_random"))[0][1] for i in range(30)]
    assert len(set(per_prompt)) == 3  # one seed, thirty prompts: not one index for every prompt


def test_the_reports_counts_are_over_prompts_and_responses_and_both_sides_of_a_pair():
    cut_in_dropped = _record(["x", "x"], [1.0, 1.0], "dropped")  # all responses identical: no pair
    cut_in_dropped["responses"][1]["finished"] = False
    kept = _record(["a", "b\ufffd", "c"], [0.9, 0.1, 0.5], "kept")  # the rejected side is not UTF-8
    rows, report = binarise([cut_in_dropped, kept, _record(["y", "z"], [0.5, 0.5], "tied")], BinariseConfig())
    assert (report["prompts"], report["pairs_kept"], report["responses"]) == (3, 1, 7)
    assert report["responses_hit_max_new_tokens"] == 1  # counted in a record that made no pair too
    assert report["pair_sides_not_utf8"] == 1 and rows[0]["rejected"][-1]["content"] == "b\ufffd"


def test_the_sort_rule_orders_numbers_by_value():
    """The rule's prompt pattern takes numbers of several digits (a user's own "sort:" data): sorted as text, "10"
    came before "2" and the right answer scored 1/3."""
    from simpo_exp.inference.scoring import sort_digits_score

    assert sort_digits_score("sort: 10 2 33", "2 10 33") == 1.0
    assert sort_digits_score("sort: 10 2 33", "10 2 33") == pytest.approx(1 / 3)


def test_seed_streams_of_different_parts_do_not_meet():
    """generate.seeds=[1,12]: seed 1's shard 23 and seed 12's shard 3 joined without a separator to one stream.
    The value is pinned too: a resume after an upgrade must sample the shards left with the streams it started with."""
    from simpo_exp.inference.sampling import derive_seed

    assert derive_seed(1, 23) != derive_seed(12, 3)
    assert derive_seed(13, 0) == int.from_bytes(__import__("hashlib").sha256(b"13:0").digest()[:4], "big") >> 1


def test_only_a_special_token_after_an_assistant_turn_stops_sampling():
    """A template that writes a plain newline after each turn has no end-of-turn token: stopping at "\\n" would end
    every answer at its first line, marked finished."""
    from simpo_exp.inference.sampling import end_of_turn_ids, stop_token_ids
    from simpo_exp.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert end_of_turn_ids(tok) == [] and stop_token_ids(tok, []) == [tok.eos_token_id]


def test_stop_ids_must_be_the_tokenizers_own_at_both_ends():
    from simpo_exp.inference.sampling import stop_token_ids
    from simpo_exp.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    for bad in (len(tok), -1):
        with pytest.raises(ConfigError, match=rf"\[{bad}\] not ids of the tokenizer"):
            stop_token_ids(tok, [bad])
    assert len(tok) - 1 in stop_token_ids(tok, [len(tok) - 1]) and 0 in stop_token_ids(tok, [0])


def test_sampling_on_a_gpu_keeps_the_precision_asked_for(monkeypatch):
    """CPU runs always sample in the weights' dtype; on a GPU (no GPU needed to ask) mixed_precision=no keeps the
    weights', fp16 is fp16, auto is bf16 where the GPU has it, and LoRA weights are model.dtype (no fp32 master)."""
    from simpo_exp.inference import sampling

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert [sampling.effective_precision(p, cuda) for p in ("no", "fp16", "bf16", "auto")] == [
        "no",
        "fp16",
        "bf16",
        "bf16",
    ]
    assert sampling.effective_precision("bf16", torch.device("cpu")) == "no"
    hw = lambda **k: SimpleNamespace(  # noqa: E731
        hardware=SimpleNamespace(**{"master_weights": "fp32", "lora": False, "mixed_precision": "no", **k}),
        model=SimpleNamespace(dtype="bfloat16"),
    )
    assert sampling.sampling_dtype(hw(), cuda) == torch.float32  # the fp32 master weights, not autocast
    assert sampling.sampling_dtype(hw(lora=True), cuda) == torch.bfloat16  # LoRA: the base weights' model.dtype
    assert sampling.sampling_dtype(hw(mixed_precision="fp16"), cuda) == torch.float16
    monkeypatch.setattr(sampling, "pick_device", lambda device: cuda)
    from simpo_exp.inference.scoring import reward_model_dtype

    assert reward_model_dtype(compose_generate("scorer=reward-model", "scorer.path=/rm")) == torch.bfloat16
    assert reward_model_dtype(compose_generate("scorer=reward-model", "scorer.path=/rm", "scorer.dtype=float32")) == (
        torch.float32
    )


def test_the_backend_asked_for_is_the_one_that_samples(monkeypatch):
    from simpo_exp.inference import sampling

    monkeypatch.setattr(sampling, "VLLMSampler", lambda cfg, tok, decoding, key, longest: ("vllm", key))
    monkeypatch.setattr(sampling, "HFSampler", lambda cfg, tok, decoding: ("hf", None))
    cfg = compose_generate("generate.backend=vllm", "model.path=/m")
    assert sampling.make_sampler(cfg, None) == ("vllm", "generate.backend")
    bench = SimpleNamespace(backend="vllm")
    assert sampling.make_sampler(compose_generate(), None, bench, "benchmarks.x.decoding.backend") == (
        "vllm",
        "benchmarks.x.decoding.backend",
    )
    assert sampling.make_sampler(compose_generate(), None) == ("hf", None)
    # the longest prompt reaches vLLM, whose context is sized to it
    monkeypatch.setattr(sampling, "VLLMSampler", lambda cfg, tok, decoding, key, longest: longest)
    assert sampling.make_sampler(cfg, None, longest_prompt=17) == 17


def test_a_prompt_exactly_as_long_as_the_models_positions_is_refused():
    from simpo_exp.inference.sampling import HFSampler

    sampler = SimpleNamespace(g=SimpleNamespace(max_new_tokens=8), positions=40, capped=False)
    assert HFSampler._room(sampler, 39) == 1
    with pytest.raises(ConfigError, match="a prompt of 40 tokens fills the model's 40 positions"):
        HFSampler._room(sampler, 40)


def _near_the_positions(model_dir: Path):
    """A greedy sampler of ``model_dir`` (40 positions, max_new_tokens=30) and a short and a long prompt: the short
    one's answer fits, the long one's does not."""
    from simpo_exp.inference.sampling import HFSampler, prompt_token_ids
    from simpo_exp.model import load_tokenizer

    cfg = compose_generate(f"model.path={model_dir}", "generate.max_new_tokens=30")
    tok = load_tokenizer(cfg.model)
    short, long = prompt_token_ids(tok, [[{"role": "user", "content": t}] for t in ["hi", "sort: 3 1 2 5 6 7 8 9 1 2"]])
    assert len(short) + 30 <= 40 < len(long) + 30
    sampler = HFSampler(cfg, tok)
    sampler.g.temperature = 0  # greedy: the same answer alone and batched (left padding)
    return sampler, short, long


def test_a_short_prompt_batched_with_a_long_one_keeps_its_own_room(tmp_path):
    """Near a rotary model's positions each answer stops at its own prompt's limit, as vLLM caps each request: a
    short prompt batched with a long one is not cut where the long one must stop."""
    from simpo_exp.model import build_tiny_tokenizer
    from tests.tiny import save_tiny_llama

    eos = build_tiny_tokenizer().eos_token_id
    save_tiny_llama(tmp_path / "llama", max_position_embeddings=40, eos_token_id=eos, seed=1)
    sampler, short, long = _near_the_positions(tmp_path / "llama")
    assert sampler.rotary
    alone = sampler.sample([short], ["a"], 0)[0][0]
    both = sampler.sample([short, long], ["a", "b"], 0)
    assert alone["n_tokens"] > 40 - len(long)  # the long prompt's room would have cut it
    assert both[0][0] == alone
    assert both[1][0]["n_tokens"] <= 40 - len(long)
    assert both[1][0] == sampler.sample([long], ["b"], 0)[0][0]


def test_learned_positions_stop_every_answer_at_the_batchs_widest_prompt(tmp_path):
    """GPT-2's table of 40 learned positions: a row stopped early is still fed (padding) to the batch's last step,
    so the batch stops where its widest prompt must (past it the table is read out of range)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from simpo_exp.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    shape = dict(n_positions=40, n_embd=32, n_layer=1, n_head=2)
    config = GPT2Config(vocab_size=len(tok), **shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    sampler, short, long = _near_the_positions(tmp_path / "gpt2")
    assert not sampler.rotary
    both = sampler.sample([short, long], ["a", "b"], 0)
    assert max(answer[0]["n_tokens"] for answer in both) <= 40 - len(long)


def test_a_reward_models_label_is_checked_against_its_outputs_before_sampling(tiny_reward_model, tmp_path):  # noqa: F811
    """label_index equal to the number of outputs, and a multi-output model without one, are refused from the
    config; a model with its own code (outputs unknown until it runs) is refused at its first scores, by name,
    not with an IndexError."""
    from transformers import LlamaForSequenceClassification

    from simpo_exp.inference.scoring import RewardModelScorer, check_reward_model
    from tests.tiny import save_tiny_llama

    one = lambda path, label: SimpleNamespace(path=str(path), revision=None, trust_remote_code=False, label_index=label)  # noqa: E731
    with pytest.raises(ConfigError, match="scorer.label_index=1: .* has 1 output"):
        check_reward_model(one(tiny_reward_model, 1))
    rm3 = tmp_path / "rm3"
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_labels=3)
    save_tiny_llama(rm3, LlamaForSequenceClassification, **shape)
    with pytest.raises(ConfigError, match="scorer.label_index=None: .* has 3 outputs; name the one"):
        check_reward_model(one(rm3, None))
    check_reward_model(one(rm3, 2))
    own = SimpleNamespace(s=SimpleNamespace(path="own", label_index=None))
    logits = SimpleNamespace(logits=torch.tensor([[0.1, 0.2, 0.3]]))
    with pytest.raises(ConfigError, match="scorer.label_index=None: 'own' returns 3 outputs"):
        RewardModelScorer._rewards(own, logits, 1)
    own.s.label_index = 3
    with pytest.raises(ConfigError, match=r"scorer.label_index=3: 'own' returns 3 output\(s\) \(0..2\)"):
        RewardModelScorer._rewards(own, logits, 1)
    own.s.label_index = 2
    assert RewardModelScorer._rewards(own, logits, 1) == pytest.approx([0.3])


def test_every_shape_of_prompt_is_rendered_by_the_reward_models_template_before_sampling(tiny_reward_model):  # noqa: F811
    """Only a later prompt has a system turn, which the reward model's template refuses: named before sampling."""
    from transformers import AutoTokenizer

    from simpo_exp.inference.scoring import check_reward_template

    tok = AutoTokenizer.from_pretrained(tiny_reward_model)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    s = SimpleNamespace(path="rm", chat_template="auto")
    user = [{"role": "user", "content": "sort: 2 1"}]
    check_reward_template(tok, s, [user, user])
    with pytest.raises(ConfigError, match=r"roles \['system', 'user', 'assistant'\]"):
        check_reward_template(tok, s, [user, user, [{"role": "system", "content": "x"}, *user]])


def test_a_shard_read_back_must_hold_its_prompts_in_order_each_with_every_response(tmp_path):
    """A shard file of another shard's prompts, in another order, or with more responses than a prompt gets was
    taken as this shard's: its responses paired with other prompts, or extra ones scored into the data set."""
    import json

    from simpo_exp.generate.run import read_shard
    from simpo_exp.inference.files import DamagedFile

    cfg = SimpleNamespace(generate=SimpleNamespace(seeds=[1, 2], samples_per_seed=1))
    prompts = [{"prompt_id": "a"}, {"prompt_id": "b"}]
    path = tmp_path / "responses-00000.jsonl"

    def write(*rows):
        path.write_text("".join(json.dumps({"prompt_id": p, "responses": [{"text": "x"}] * n}) + "\n" for p, n in rows))

    write(("a", 2), ("b", 2))
    assert [r["prompt_id"] for r in read_shard(path, prompts, cfg)] == ["a", "b"]
    write(("b", 2), ("a", 2))
    with pytest.raises(DamagedFile, match="row 1 is prompt 'b', the shard's is 'a'"):
        read_shard(path, prompts, cfg)
    write(("a", 3), ("b", 2))
    with pytest.raises(DamagedFile, match=r"row 1 \(prompt 'a'\) has \{'responses': 3\}, not 2 each"):
        read_shard(path, prompts, cfg)
    write(("a", 2))
    with pytest.raises(DamagedFile, match="it holds 1 prompts, its shard 2"):
        read_shard(path, prompts, cfg)


def test_older_scored_shards_are_taken_only_from_a_scorer_of_the_same_settings(tmp_path):
    """Scored shards named before the scorer's hash was in their names are this scorer's when the old manifest's
    scorer has its settings; another scorer's are left (scored again), not carried into the data set."""
    import json

    from simpo_exp.generate.run import adopt_older_scores, scorer_settings, scorer_tag

    cfg = compose_generate()
    old = tmp_path / "scored-00000.jsonl"
    old.write_text("{}\n")
    (tmp_path / "manifest.json").write_text(json.dumps({"scorer": {**scorer_settings(cfg), "max_length": 7}}))
    adopt_older_scores(tmp_path, cfg)
    assert old.exists() and not (tmp_path / f"scored-00000-{scorer_tag(cfg)}.jsonl").exists()
    (tmp_path / "manifest.json").write_text(json.dumps({"scorer": scorer_settings(cfg)}))
    adopt_older_scores(tmp_path, cfg)
    assert not old.exists() and (tmp_path / f"scored-00000-{scorer_tag(cfg)}.jsonl").read_text() == "{}\n"


def test_a_pair_keeps_the_whole_conversation_it_was_sampled_for():
    """A prompt of several turns (a system turn, an earlier exchange): each side is the whole conversation and its
    answer, the prompt column the last user turn, and every sampled answer is kept beside its score."""
    system, user1 = {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}
    asst1, user2 = {"role": "assistant", "content": "hello"}, {"role": "user", "content": "sort: 2 1"}
    rec = _record(["a", "", "b"], [1.0, 0.5, 0.0])
    rec["prompt"] = [system, user1, asst1, user2]
    (row,), _ = binarise([rec], BinariseConfig())
    assert row["chosen"] == rec["prompt"] + [{"role": "assistant", "content": "a"}]
    assert row["rejected"] == rec["prompt"] + [{"role": "assistant", "content": "b"}]
    assert row["prompt"] == "sort: 2 1"
    assert row["all_generated_responses"] == ["a", "", "b"] and row["all_rm_scores"] == [1.0, 0.5, 0.0]


def test_two_scores_have_their_own_quartiles():
    from simpo_exp.generate.binarise import distribution

    got = distribution([1.0, 3.0])
    assert (got["q25"], got["median"], got["q75"]) == (1.5, 2.0, 2.5) and distribution([4.0])["median"] == 4.0


def test_a_pad_token_that_is_the_bos_or_the_eos_does_not_mark_padding():
    """Padded batches need a pad id no scored row holds: a tokenizer that pads with its BOS or its EOS is scored one
    row at a time (a model of its own code reads each row's reward at the token before its first pad)."""
    from simpo_exp.inference.scoring import RewardModelScorer

    for pad, eos, bos in ((1, 2, 1), (2, 2, 1)):
        fake = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=pad, eos_token_id=eos, bos_token_id=bos))
        assert RewardModelScorer._pad_marks_padding_only(fake) is False


def test_a_reward_model_with_two_outputs_must_name_its_reward():
    from simpo_exp.inference.scoring import check_label_index

    with pytest.raises(ConfigError, match="scorer.label_index=None: 'x' has 2 outputs; name the one"):
        check_label_index(SimpleNamespace(label_index=None, path="x"), 2, "has")
    check_label_index(SimpleNamespace(label_index=None, path="x"), 1, "has")


def test_the_rule_scores_the_last_user_turn():
    """A sort prompt under a system turn: the rule reads the task from the last turn, as its check before sampling
    does (it read the first, and refused the prompts after every answer was sampled)."""
    from simpo_exp.inference.scoring import RuleScorer

    scorer = RuleScorer(SimpleNamespace(scorer=SimpleNamespace(rule="sort_digits")))
    prompt = [{"role": "system", "content": "x"}, {"role": "user", "content": "sort: 2 1"}]
    assert scorer.score([prompt, prompt], ["1 2", "2 1"]) == [1.0, 0.0]


def test_a_reward_models_tokenizer_that_adds_a_bos_gets_none_added_to_the_rendered_text(tiny_reward_model):  # noqa: F811
    """The chat template writes the BOS itself: a tokenizer that also adds one (Llama 3's, ArmoRM's) would give every
    scored row two and shift every reward. The rows are tokenised without special tokens."""
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaForSequenceClassification

    from simpo_exp.inference.scoring import make_scorer, render_for_scoring

    scorer = make_scorer(compose_generate("scorer=reward-model", f"scorer.path={tiny_reward_model}"))
    tok = scorer.tokenizer
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]
    )
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # this tokenizer adds one
    prompt = [{"role": "user", "content": "sort: 2 1"}]
    score = scorer.score([prompt], ["1 2"])[0]
    ids = tok(render_for_scoring(tok, scorer.s, prompt, "1 2"), add_special_tokens=False)["input_ids"]
    model = LlamaForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    with torch.no_grad():
        assert score == pytest.approx(model(torch.tensor([ids])).logits[0, 0].item(), abs=1e-5)


def test_a_template_that_writes_the_pad_token_is_scored_without_padding(tiny_reward_model):  # noqa: F811
    """A chat template that writes the pad token inside a conversation (a turn separator): a padded batch's head
    would stop reading at it, so such a scorer scores unpadded."""
    from simpo_exp.inference.scoring import make_scorer

    scorer = make_scorer(compose_generate("scorer=reward-model", f"scorer.path={tiny_reward_model}"))
    assert scorer._pad_marks_padding_only()
    scorer.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{{ pad_token }}{% endfor %}"
    )
    assert not scorer._pad_marks_padding_only()


# ----------------------------------------------------------------------------- from a mutation review of the stage's
# resume paths (generate/run.py) and its sampling (inference/sampling.py)
def test_a_decoder_that_rewrites_across_the_prompts_end_decodes_the_response_alone():
    """Where the prompt's decoded tail is no prefix of prompt and response decoded together, cutting it off would
    cut into the response's own text: the response is decoded alone."""
    from simpo_exp.inference.sampling import response_text

    class Merging:  # "a" then "b" decode as "X": no text boundary falls between them
        table = {1: "a", 2: "b", 3: "c"}

        def decode(self, ids, **kwargs):
            return "".join(self.table[i] for i in ids).replace("ab", "X")

    tok = Merging()
    assert response_text(tok, [3, 1], [2, 3]) == tok.decode([2, 3]) == "bc"
    assert response_text(tok, [1, 3], [2, 3]) == "bc"  # a prefix: cut after it


def test_a_process_of_a_later_rank_samples_on_the_one_gpu_its_task_sees(monkeypatch):
    """submitit narrows CUDA_VISIBLE_DEVICES to a task's GPU: LOCAL_RANK=3 with one GPU visible is cuda:0, not the
    cuda:3 that does not exist there; with four visible, cuda:3."""
    from simpo_exp.inference.sampling import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("cuda") == pick_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("cuda") == torch.device("cuda", 3)


def test_a_manifest_of_an_older_version_without_a_setting_recorded_since_resumes(tmp_path):
    """A key added to the generate settings after a generation started is no change of it: held against the older
    manifest, an upgrade would refuse the resume and hours of sampling would start over. A key it does hold and
    that changed still refuses."""
    import json

    from simpo_exp.generate.run import _manifest, manifest_differences

    prompts = [{"prompt_id": "a", "input_ids": [1, 2]}]
    now = _manifest(compose_generate(), {}, prompts)
    older = json.loads(json.dumps(now))
    del older["generate"]["stop_token_ids"]
    (tmp_path / "manifest.json").write_text(json.dumps(older))
    assert manifest_differences(tmp_path, now) == []
    older["generate"]["top_p"] = 0.5
    (tmp_path / "manifest.json").write_text(json.dumps(older))
    assert [d.split(":")[0] for d in manifest_differences(tmp_path, now)] == ["generate.top_p"]


def test_each_shard_samples_from_streams_of_its_own():
    """Shard i's seed s draws from derive_seed(s, i): the same stream for every shard would give prompts of every
    shard the same noise."""
    from simpo_exp.generate.run import _sample_shard
    from simpo_exp.inference.sampling import derive_seed

    seeds = []

    class Recorder:
        def sample(self, ids, keys, seed):
            seeds.append(seed)
            return [[{"text": "x"}] for _ in ids]

    cfg = SimpleNamespace(generate=SimpleNamespace(seeds=[13, 21]))
    prompts = [{"prompt_id": "a", "prompt": "p", "input_ids": [1]}]
    _sample_shard(Recorder(), cfg, 0, prompts)
    _sample_shard(Recorder(), cfg, 1, prompts)
    assert seeds == [derive_seed(13, 0), derive_seed(21, 0), derive_seed(13, 1), derive_seed(21, 1)]
    assert len(set(seeds)) == 4


def test_a_scored_shard_with_more_scores_than_responses_is_refused(tmp_path):
    """Too many is as damaged as too few: scores out of line with their responses would be read without a word."""
    import json

    from simpo_exp.generate.run import read_shard
    from simpo_exp.inference.files import DamagedFile

    cfg = SimpleNamespace(generate=SimpleNamespace(seeds=[1], samples_per_seed=3))
    path = tmp_path / "scored-00000-abcdef12.jsonl"
    row = {"prompt_id": "a", "responses": [{"text": "x"}] * 3, "scores": [0.0] * 3}
    path.write_text(json.dumps(row) + "\n")
    assert read_shard(path, [{"prompt_id": "a"}], cfg)[0]["scores"] == [0.0] * 3
    path.write_text(json.dumps({**row, "scores": [0.0] * 4}) + "\n")
    with pytest.raises(DamagedFile, match=r"row 1 \(prompt 'a'\) has \{'scores': 4\}, not 3 each"):
        read_shard(path, [{"prompt_id": "a"}], cfg)


@pytest.fixture
def one_shard(tmp_path, monkeypatch):
    """A shard folder of one prompt under the default settings (rule scorer, 5 seeds of one sample), with its
    responses written; the sampler and scorer the stage would build are stand-ins that record their calls."""
    import json

    from simpo_exp.generate.run import scorer_tag
    from simpo_exp.inference import sampling, scoring

    cfg = compose_generate()
    calls = {"sampled": 0, "scored": 0}

    class Scorer:
        def score(self, prompts, texts):
            calls["scored"] += 1
            return [1.0] * len(texts)

        def close(self):
            pass

    def no_sampler(*args, **kwargs):
        calls["sampled"] += 1
        raise AssertionError("the policy was loaded to sample again")

    monkeypatch.setattr(sampling, "make_sampler", no_sampler)
    monkeypatch.setattr(scoring, "make_scorer", lambda cfg: Scorer())
    shard_dir, prompt = tmp_path / "shards", {"prompt_id": "a", "prompt": "sort: 2 1", "input_ids": [1]}
    shard_dir.mkdir()
    responses = [{"text": "1 2", "seed": s} for s in cfg.generate.seeds]
    row = {"prompt_id": "a", "prompt": "sort: 2 1", "responses": responses}
    (shard_dir / "responses-00000.jsonl").write_text(json.dumps(row) + "\n")
    return SimpleNamespace(cfg=cfg, dir=shard_dir, jobs=[(shard_dir, [[prompt]])], tag=scorer_tag(cfg), calls=calls)


def test_a_scored_shard_whose_responses_were_deleted_is_not_sampled_again(one_shard):
    """responses-*.jsonl deleted to save space once the shard is scored (or older scores adopted): the policy was
    loaded and the shard sampled again."""
    from simpo_exp.generate.run import _process, scored_path

    s = one_shard
    (s.dir / "responses-00000.jsonl").unlink()
    scored_path(s.dir, 0, s.tag).write_text("{}\n")
    _process(s.cfg, s.jobs, 0, 1, s.tag)
    assert s.calls == {"sampled": 0, "scored": 0}


def test_a_scored_shards_record_is_written_before_the_shard(one_shard, monkeypatch):
    """Killed between the two writes, a scored shard without its record reads as scored by no known commit, which the
    moved-commit check lets through: the record goes first, so the shard is then not there and is scored again."""
    from simpo_exp.generate import run
    from simpo_exp.generate.run import _process, scored_path, scored_record_path

    s = one_shard
    write_json = run.write_json

    def killed_after_the_record(path, data):
        write_json(path, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "write_json", killed_after_the_record)
    with pytest.raises(KeyboardInterrupt):
        _process(s.cfg, s.jobs, 0, 1, s.tag)
    assert scored_record_path(s.dir, 0, s.tag).exists() and not scored_path(s.dir, 0, s.tag).exists()
    monkeypatch.setattr(run, "write_json", write_json)
    _process(s.cfg, s.jobs, 0, 1, s.tag)
    assert scored_path(s.dir, 0, s.tag).exists() and s.calls["scored"] == 2


def test_only_shards_scored_by_another_known_commit_are_scored_again(one_shard, monkeypatch):
    """A record naming no commit (written before commits were recorded, or of a local reward model) says nothing of
    the commit: kept; one naming another commit than the one loaded now is scored again."""
    import json

    from simpo_exp.generate import run
    from simpo_exp.generate.run import _process, scored_path, scored_record_path

    s = one_shard
    monkeypatch.setattr(run, "scorer_commit", lambda cfg: "abc")
    jobs = [(s.dir, s.jobs[0][1] * 2)]  # shard 1 (the same prompt) still to score: the scorer is loaded for it
    responses = (s.dir / "responses-00000.jsonl").read_text()
    for record in ({"scorer": "x"}, {"scorer": "x", "commit": "old"}):
        (s.dir / "responses-00001.jsonl").write_text(responses)
        scored_path(s.dir, 0, s.tag).write_text("{}\n")
        scored_record_path(s.dir, 0, s.tag).write_text(json.dumps(record))
        scored_path(s.dir, 1, s.tag).unlink(missing_ok=True)
        _process(s.cfg, jobs, 0, 1, s.tag)
        assert scored_path(s.dir, 1, s.tag).exists()
    assert s.calls["scored"] == 1 + 2  # shard 1 twice, shard 0 once: after its record named another commit
    assert json.loads(scored_path(s.dir, 0, s.tag).read_text())["scores"] == [1.0] * 5
    assert json.loads(scored_record_path(s.dir, 0, s.tag).read_text())["commit"] == "abc"


def test_older_scores_never_replace_a_newer_shard_of_the_same_scorer(tmp_path):
    """An old-name scored shard beside a shard named with the scorer's hash (written since): the newer is kept."""
    import json

    from simpo_exp.generate.run import adopt_older_scores, scored_path, scorer_settings, scorer_tag

    cfg = compose_generate()
    (tmp_path / "manifest.json").write_text(json.dumps({"scorer": scorer_settings(cfg)}))
    (tmp_path / "scored-00000.jsonl").write_text("old\n")
    scored_path(tmp_path, 0, scorer_tag(cfg)).write_text("new\n")
    adopt_older_scores(tmp_path, cfg)
    assert scored_path(tmp_path, 0, scorer_tag(cfg)).read_text() == "new\n"


def test_stage_records_of_another_shape_read_as_unreadable(tmp_path, caplog):
    """A generate manifest, a data folder's provenance.json and a benchmark's results.json edited into a list
    failed with an AttributeError or TypeError (the provenance one at a training run's start): each reads as an
    unreadable record does."""
    import logging

    from simpo_exp.data.sources import provenance
    from simpo_exp.generate.run import manifest_differences
    from simpo_exp.inference.results import load_results

    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert manifest_differences(tmp_path, {"generate": {}}) == ["manifest.json: missing or unreadable"]
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    (tmp_path / "provenance.json").write_text('["a"]')
    with caplog.at_level(logging.WARNING, logger="simpo_exp.data.sources"):
        assert provenance(str(tmp_path)) == {}
    assert "provenance.json: it holds a list, not the generate stage's record" in caplog.text
    (tmp_path / "provenance.json").write_text('{"synthetic_task": null}')
    assert provenance(str(tmp_path))["provenance"]["synthetic_task"] is None
    for bench, text in (("rule", '{"metrics": {}}'), ("alpacaeval2", "[]")):
        (tmp_path / "eval" / bench).mkdir(parents=True)
        (tmp_path / "eval" / bench / "results.json").write_text(text)
    assert load_results(tmp_path) == {"rule": {"metrics": {}}}


def test_the_evaluate_stages_auto_backend_takes_vllm_only_on_the_runs_gpu(monkeypatch):
    """``evaluate.device=cpu`` on a machine with vLLM and a GPU: auto picked vLLM, which ran on the GPU anyway, in the
    float32 a CPU run samples in (twice the memory, another decoding than a GPU run's bf16)."""
    import importlib.util

    from simpo_exp.evaluate.run import _backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    auto = SimpleNamespace(backend="auto")
    run = lambda device: SimpleNamespace(hardware=SimpleNamespace(device=device), model=SimpleNamespace(path="/m"))  # noqa: E731
    assert _backend(auto, run("cpu")) == "hf"
    assert _backend(auto, run("auto")) == "vllm" and _backend(auto, run("cuda")) == "vllm"
    assert _backend(SimpleNamespace(backend="hf"), run("cuda")) == "hf"
