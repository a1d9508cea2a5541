"""Sample generations (simpo_exp/samples.py): all prompts in one left-padded batch give the same greedy
completions as one prompt at a time, each cut at its own end of sequence."""

from types import SimpleNamespace

import pytest
import torch

from simpo_exp import samples
from simpo_exp.model import build_tiny_tokenizer
from tests.test_perf_paths import make_model


def one_at_a_time(model, tok, prompts, n):
    texts = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def test_batched_completions_equal_one_at_a_time():
    tiny = build_tiny_tokenizer()
    model = make_model(vocab=len(tiny))  # tests/test_perf_paths.py's tiny Llama, in train mode
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, len(tiny), (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    pairs = [{"prompt_input_ids": p} for p in prompts]
    plain = one_at_a_time(model.eval(), tiny, prompts, 12)
    assert samples.generate(model.train(), tiny, pairs, 12, "cpu") == plain
    assert model.training  # the mode it came in with
    # an end of sequence that one completion reaches early: the token it writes third
    first = model.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=3, do_sample=False)[0, -1].item()
    tok = SimpleNamespace(pad_token_id=tiny.pad_token_id, eos_token_id=first, decode=tiny.decode)
    texts = samples.generate(model, tok, pairs, 12, "cpu")
    assert texts == one_at_a_time(model, tok, prompts, 12)
    assert len(texts[1]) < len(plain[1])  # stopped there
    # padded with an ordinary token (one that decode keeps): each completion still ends at its own eos
    tok = SimpleNamespace(pad_token_id=7, eos_token_id=first, decode=tiny.decode)
    assert samples.generate(model, tok, pairs, 12, "cpu") == one_at_a_time(model, tok, prompts, 12)
    assert samples.generate(model, tiny, [], 12, "cpu") == []


def test_the_samples_are_greedy_whatever_the_models_generation_config_says():
    """transformers fills what a generate() call leaves unset from the model's generation_config.json: a model that
    ships a repetition penalty (Qwen2.5-Instruct does) logged penalised samples as "greedy completions", unlike the
    generate and evaluate stages' answers for the same weights. The model keeps its config."""
    from transformers import GenerationConfig

    tiny = build_tiny_tokenizer()
    model = make_model(vocab=len(tiny))
    g = torch.Generator().manual_seed(2)
    pairs = [{"prompt_input_ids": torch.randint(5, len(tiny), (n,), generator=g).tolist()} for n in (4, 9)]
    plain = samples.generate(model, tiny, pairs, 12, "cpu")
    ids = torch.tensor([pairs[0]["prompt_input_ids"]])
    with samples.eval_mode(model):
        first = int(model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1])
        # settings a model may ship, one of which (never the greedy first token) changes these samples for certain
        shipped = GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=2, suppress_tokens=[first])
        model.generation_config = shipped
        own = int(model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1])
    assert own != first  # the model's own settings, applied: the test below can fail
    assert samples.generate(model, tiny, pairs, 12, "cpu") == plain
    assert model.generation_config is shipped


def test_a_lora_models_own_generation_config_survives_its_samples():
    """PEFT's generate copies its wrapper's generation config onto the model inside: the blank one the samples set
    aside the model's for stayed there, and a LoRA run saved it (Llama-3's second stop id, the base's sampling
    defaults and the rest of generation_config.json lost). Every holder gets its own back."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig

    tiny = build_tiny_tokenizer()
    base = make_model(vocab=len(tiny))
    shipped = GenerationConfig(eos_token_id=[5, 6], do_sample=True, temperature=0.6, top_p=0.9)
    base.generation_config = shipped
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))  # as add_lora
    samples.generate(model, tiny, [{"prompt_input_ids": [9, 10, 11]}], 3, "cpu")
    assert model.get_base_model().generation_config is shipped
    assert model.get_base_model().generation_config.eos_token_id == [5, 6]


def test_completions_stop_at_the_templates_end_of_turn_token_and_the_models_eos_ids():
    """As the generate and evaluate stages stop: EOS, the special token the chat template closes an assistant
    turn with (Gemma's <end_of_turn>, Llama-3's <|eot_id|>), and the ids in the model's generation config."""
    tiny = build_tiny_tokenizer()
    tiny.chat_template = tiny.chat_template.replace("+ eos_token", "+ '<|system|>'")  # the turn's own end token
    end_of_turn = tiny.convert_tokens_to_ids("<|system|>")
    model = make_model(vocab=len(tiny))
    model.generation_config.eos_token_id = [5, 6]
    seen = {}
    real = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    model.generate = spy
    samples.generate(model, tiny, [{"prompt_input_ids": [9, 10, 11]}], 4, "cpu")
    assert seen["eos_token_id"] == sorted({tiny.eos_token_id, end_of_turn, 5, 6})


def test_eval_mode_puts_the_model_back_in_its_mode_whatever_the_block_raised():
    from simpo_exp.model import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    for training in (True, False):
        model.train(training)
        with pytest.raises(RuntimeError), eval_mode(model):
            assert not model.training and not model[1].training
            raise RuntimeError("out of memory")
        assert model.training is training and model[1].training is training


def test_a_model_of_learned_positions_is_sampled_and_trained_within_them(caplog):
    """GPT-2 with 40 positions: max_new_tokens=64 after a 30-token prompt failed in the in-training samples with
    "index out of range" (the evaluate stage cut them; these did not), and max_length past the positions failed
    mid-step. Samples stop at the positions; max_length past learned ones is refused, past rotary ones said."""
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from simpo_exp.config import ConfigError
    from simpo_exp.model import check_positions

    tiny = build_tiny_tokenizer()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny), n_positions=40, n_embd=32, n_layer=1, n_head=2))
    prompt = torch.randint(5, 250, (30,)).tolist()
    asked, real = [], gpt2.generate
    gpt2.generate = lambda **kwargs: asked.append(kwargs["max_new_tokens"]) or real(**kwargs)
    (text,) = samples.generate(gpt2, tiny, [{"prompt_input_ids": prompt}], 64, "cpu")
    assert asked == [10] and isinstance(text, str)
    assert samples.generate(gpt2, tiny, [{"prompt_input_ids": prompt + prompt}], 8, "cpu") == [""]  # no room left
    run = lambda n: SimpleNamespace(max_length=n, model=SimpleNamespace(path="/models/small"))  # noqa: E731
    check_positions(gpt2, run(40))
    with pytest.raises(ConfigError, match="max_length=41: model.path='/models/small' has 40 learned positions"):
        check_positions(gpt2, run(41))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32))  # fmt: skip
    with caplog.at_level("WARNING"):
        check_positions(llama, run(64))
    assert "max_length=64 passes the 32 positions" in caplog.text


def test_generation_rows_pair_each_prompt_with_its_own_rewards():
    import torch

    from simpo_exp import samples

    user = lambda t: [{"role": "system", "content": "be brief"}, {"role": "user", "content": t}]  # noqa: E731
    pairs = [
        {"prompt": user("a"), "chosen": "A", "rejected": "x"},
        {"prompt": user("b"), "chosen": "B", "rejected": "y"},
    ]
    rows = samples.generation_rows(7, pairs, ["ga", "gb"], torch.tensor([1.0, 2.0, -1.0, -2.0]))  # chosen, rejected
    assert rows == [
        {"step": 7, "prompt": "system: be brief\nuser: a", "chosen": "A", "rejected": "x", "generation": "ga",
         "reward_chosen": 1.0, "reward_rejected": -1.0},
        {"step": 7, "prompt": "system: be brief\nuser: b", "chosen": "B", "rejected": "y", "generation": "gb",
         "reward_chosen": 2.0, "reward_rejected": -2.0},
    ]  # fmt: skip
    assert samples.sample_pairs(["p0", "p1", "p2"], 5) == ["p0", "p1", "p2"]
    assert samples.sample_pairs(["p0", "p1", "p2"], 2) == ["p0", "p1"]


def test_a_sharded_model_samples_with_every_process_stepping_together():
    """synced=True (FSDP, ZeRO-3): transformers' synced_gpus, or the process whose completions end first leaves the
    collective the others still wait in."""
    from simpo_exp import samples
    from simpo_exp.model import build_tiny_tokenizer
    from tests.test_perf_paths import make_model

    tiny = build_tiny_tokenizer()
    model = make_model(vocab=len(tiny))
    seen, real = [], model.generate
    model.generate = lambda **kw: seen.append(kw["synced_gpus"]) or real(**kw | {"synced_gpus": False})  # no group here
    for synced in (True, False):
        samples.generate(model, tiny, [{"prompt_input_ids": [9, 10, 11]}], 2, "cpu", synced=synced)
    assert seen == [True, False]


@pytest.mark.parametrize("chat_format", ["generation_prompt", "simpo_repo"])
def test_the_samples_prompt_the_model_as_the_generate_and_evaluate_stages_do(chat_format):
    """Under dataset.chat_format=simpo_repo (every simpo-* recipe) the training prompt ends before the assistant
    turn's header, which the responses carry: the in-training samples were decoded from a prompt without it, unlike
    the generate and evaluate stages' prompts, so the model spent its tokens writing the header."""
    from simpo_exp.data.tokenize import _tokenise_batch
    from simpo_exp.inference.sampling import prompt_token_ids
    from simpo_exp.model import ZEPHYR_CHAT_TEMPLATE

    tok = build_tiny_tokenizer()
    tok.chat_template = ZEPHYR_CHAT_TEMPLATE
    prompt = [{"role": "user", "content": "sort 3 1 2"}]
    batch = {"prompt": [prompt], "chosen": ["1 2 3"], "rejected": ["3 2 1"], "drop_reason": [None]}
    row = _tokenise_batch(batch, tok, 256, 128, chat_format=chat_format)
    pair = {"prompt": prompt, "prompt_input_ids": row["prompt_input_ids"][0]}
    model, sent = make_model(vocab=len(tok)), []

    def generate(input_ids, **kwargs):
        sent.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.full((1, 2), tok.eos_token_id)], dim=1)

    model.generate = generate
    samples.generate(model, tok, [pair], 4, "cpu", chat_format=chat_format)
    assert sent == prompt_token_ids(tok, [prompt], chat_format)  # the stages' own prompt
    assert tok.decode(sent[0]).endswith("<|assistant|>\n")


def test_a_sample_is_decoded_after_its_prompt_as_the_generate_stage_decodes():
    """Decoded alone, a SentencePiece tokenizer's answer (Mistral, Llama-2, Gemma) lost its leading space: the
    logged samples read otherwise than the generate stage's answers to the same prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Hello": 3, "▁world": 4, "▁hi": 5, "▁[/INST]": 6}
    spm = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model = make_model(vocab=len(vocab))
    model.generate = lambda **kwargs: torch.tensor([[1, 5, 6, 3, 4, 2]])  # the prompt, then the answer and EOS
    from simpo_exp.inference.sampling import cut_at_stop

    (text,) = samples.generate(model, tok, [{"prompt_input_ids": [1, 5, 6]}], 3, "cpu")
    assert text == " Hello world" == cut_at_stop(tok, [1, 5, 6], [3, 4, 2], {2})["text"]
