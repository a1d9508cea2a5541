"""Model and hub loading choices no test pinned (from a mutation review of model.py and hub.py): the offline rule
huggingface_hub follows, the proxy's port, a config.json that is no object, the chat template setting and the one
of several named templates that renders, the tokenizer hash's special ids, the attention kernel a preset picks,
what load_model hands on (the tie of a random model's head, the base's revision to LoRA), and a GPT-2 LoRA merge."""

from __future__ import annotations

import pytest
import torch

from simpo_exp import hub, model
from simpo_exp.config import ConfigError
from simpo_exp.model import build_tiny_tokenizer

PROXIES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")


def test_the_hub_is_offline_by_huggingface_hubs_rule(monkeypatch):
    """HF_HUB_OFFLINE, where set, decides (0 over an inherited TRANSFORMERS_OFFLINE=1 is online: read alone, a
    model the hub would download was said to be missing); else TRANSFORMERS_OFFLINE."""
    for on in (
        {"HF_HUB_OFFLINE": "1"},
        {"TRANSFORMERS_OFFLINE": "yes"},
        {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "1"},
    ):
        for key in hub.OFFLINE_VARIABLES:
            monkeypatch.delenv(key, raising=False)
        for key, value in on.items():
            monkeypatch.setenv(key, value)
        assert hub.offline_setting(), on
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from huggingface_hub import constants

    assert not hub.offline_setting() and not constants._is_true(constants.os.environ.get("HF_HUB_OFFLINE"))


def test_the_hub_is_reached_through_the_proxys_port(monkeypatch):
    for key in PROXIES:
        monkeypatch.delenv(key, raising=False)
        monkeypatch.delenv(key.lower(), raising=False)
    monkeypatch.setenv("ALL_PROXY", "http://p:3128")
    assert hub.hub_address("https://huggingface.co") == ("p", 3128)
    monkeypatch.setenv("HTTPS_PROXY", "http://q")  # no port: the scheme's
    assert hub.hub_address("https://huggingface.co") == ("q", 80)
    monkeypatch.setenv("HTTPS_PROXY", "p:3128")  # written without a scheme, as often: the same proxy
    assert hub.hub_address("https://huggingface.co") == ("p", 3128)


def test_when_nothing_answers_the_offline_reason_names_the_address_and_port(monkeypatch):
    from huggingface_hub import constants

    for key in (*PROXIES, *hub.OFFLINE_VARIABLES):
        monkeypatch.delenv(key, raising=False)
        monkeypatch.delenv(key.lower(), raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")  # a mirror on a port of its own
    assert "nothing answered at 127.0.0.1:1, the hub http://127.0.0.1:1" in hub.why_offline()


def test_a_config_json_that_is_no_object_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(hub.ModelNotFoundError, match="holds a list, not a config"):
        hub.check_model_config(tmp_path)


def test_the_chat_template_setting_and_the_named_template_that_renders():
    tok = build_tiny_tokenizer()
    with pytest.raises(ConfigError, match=r"model.chat_template='zephr': allowed are 'auto', 'zephyr'"):
        model.apply_chat_template_choice(tok, "zephr")
    model.apply_chat_template_choice(tok, "{{ messages[0]['content'] }}")  # a Jinja string of expressions alone
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    tok.chat_template = {"default": "{{ 'A' }}", "tool_use": "{{ 'B' }}"}
    assert model.chat_template_text(tok) == "{{ 'A' }}"


def test_a_tokenizer_of_named_templates_is_saved_as_it_is(tmp_path):
    tok = build_tiny_tokenizer()
    named = {
        "default": "{% for m in messages %}{{ m['content'] }}{% endfor %}",  # writes no BOS
        "tool_use": "{% for m in messages %}{{ m['role'] }}{% endfor %}",
    }
    tok.chat_template = dict(named)
    assert model.save_tokenizer(tok, tmp_path) is False and tok.chat_template == named
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == named


def test_the_tokenizer_hash_holds_the_special_tokens_ids():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert model.tokenizer_hash(a) == model.tokenizer_hash(b)
    b.pad_token = b.eos_token
    assert a.pad_token_id != b.pad_token_id and model.tokenizer_hash(a) != model.tokenizer_hash(b)


def test_a_model_presets_attention_kernel_wins_over_the_hardwares(compose):
    assert model.pick_attention(compose("model=gemma2-9b-it")) == "eager"
    assert model.pick_attention(compose("model=gemma2-9b-it", "model.attn_implementation=null")) == (
        compose().hardware.attn_implementation
    )


def test_load_model_hands_on_the_heads_tie_and_the_bases_revision(compose, monkeypatch):
    tok = build_tiny_tokenizer()
    for tie in (True, False):
        m = model.load_model(compose(f"model.random_init.tie_word_embeddings={tie}"), tok, "eager")
        assert m.config.tie_word_embeddings is tie
        assert (m.lm_head.weight is m.model.embed_tokens.weight) is tie
    seen = {}

    def add_lora(m, h, revision=None):
        seen["revision"] = revision
        return m

    monkeypatch.setattr(model, "add_lora", add_lora)
    model.load_model(compose("hardware.lora=true", "model.revision=abc123"), tok, "eager")
    assert seen == {"revision": "abc123"}  # PEFT records it: the adapter reloads onto that commit, not main


def test_a_gpt2_lora_merge_transposes_conv1d_and_writes_no_adapter_keys(tmp_path):
    """GPT-2's Conv1D holds its weight as [in, out] (peft's fan_in_fan_out): c_proj is square, so a merge without
    the transpose gave a wrong model with no shape error; the merged model/ holds the base's keys alone."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    keys = set(base.state_dict())
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_proj"], fan_in_fan_out=True))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # an adapter that moved
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = lora(input_ids=ids).logits
    model.save_trained(lora, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not [k for k in saved if "lora_" in k] and set(saved) <= keys | {"lm_head.weight"}
    merged = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)


def test_a_tied_heads_second_name_is_left_out_of_a_gathered_state_dict():
    """FSDP gathers a copy of a tied matrix under each of its names, which save_pretrained wrote twice: kept once,
    under its first name (the embeddings), as the model itself saves it; an untied head is kept."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_exp.train import without_tied_copies

    shape = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    tied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    kept = without_tied_copies({k: v.clone() for k, v in tied.state_dict().items()}, tied)
    assert "model.embed_tokens.weight" in kept and "lm_head.weight" not in kept
    assert len(kept) == len(tied.state_dict()) - 1
    untied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    assert set(without_tied_copies(dict(untied.state_dict()), untied)) == set(untied.state_dict())


def test_a_saved_dtype_is_read_only_where_it_is_one_this_project_loads(tmp_path):
    """evaluate loads a trained model in the dtype its config.json records: an unknown one ("auto", a float8 type)
    or a config cut short is no dtype (the run's own is used), not a value set into model.dtype or a traceback."""
    from simpo_exp.model import saved_dtype

    config = tmp_path / "config.json"
    for text, expected in (
        ('{"dtype": "bfloat16"}', "bfloat16"), ('{"torch_dtype": "float32"}', "float32"),
        ('{"dtype": "float8_e4m3fn"}', None), ('{"dtype": "auto"}', None), ('{"dtype": ', None), ("[1, 2]", None),
    ):  # fmt: skip
        config.write_text(text)
        assert saved_dtype(tmp_path) == expected, text


def test_a_cast_to_a_save_dtype_leaves_integer_tensors_exact():
    """save_dtype=bfloat16 rounds the floating-point weights; an integer buffer (ids past 256) cast with them lost
    its exact values."""
    import torch

    from simpo_exp.model import cast_floating

    out = cast_floating({"w": torch.ones(2), "ids": torch.arange(300)}, torch.bfloat16)
    assert out["w"].dtype == torch.bfloat16
    assert out["ids"].dtype == torch.int64 and torch.equal(out["ids"], torch.arange(300))


def test_a_chat_template_that_refuses_the_bos_probe_is_saved_as_it_is(tmp_path):
    """The saved template gets a BOS in front only where it renders a turn without one; a template that refuses the
    probe's turn (a system turn first, say) cannot tell, and is saved unchanged, not with a BOS it may already have."""
    import json

    from simpo_exp.model import build_tiny_tokenizer, save_tokenizer

    tokenizer = build_tiny_tokenizer()
    assert tokenizer.bos_token
    template = "{{ raise_exception('a system turn first') }}"
    tokenizer.chat_template = template
    assert save_tokenizer(tokenizer, tmp_path) is False and tokenizer.chat_template == template
    saved = tmp_path / "chat_template.jinja"
    text = (
        saved.read_text()
        if saved.exists()
        else json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    )
    assert text == template


# ----------------------------------------------------------------------------- from a mutation review of model.py
def test_auto_without_a_template_is_refused_naming_the_setting_it_came_from():
    """A tokenizer with no chat template under 'auto' failed later, naming nothing; a reward model's is its own key."""
    from simpo_exp.model import apply_chat_template_choice

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match=r"^scorer\.chat_template='auto' but the tokenizer of 'rm' has no chat"):
        apply_chat_template_choice(tokenizer, "auto", "rm", key="scorer.chat_template")


def test_a_tokenizer_one_token_past_the_embedding_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_exp.config import ModelConfig
    from simpo_exp.model import check_vocabulary

    tokenizer = build_tiny_tokenizer()
    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) - 1, **shape))
    with pytest.raises(ConfigError, match=f"model.path='/x': the tokenizer has {len(tokenizer)} tokens but"):
        check_vocabulary(small, tokenizer, ModelConfig(name="m", path="/x"))
    check_vocabulary(LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **shape)), tokenizer, ModelConfig())


def test_the_random_model_is_the_seeds_in_its_dtype_without_a_cache(compose):
    """The evaluate stage rebuilds the starting model from the run's config: its weights must be the seed's whatever
    ran before; model.dtype is what it is drawn in; no KV cache is built in training forwards; a vocabulary one token
    short is refused by its own key."""
    from simpo_exp.config import to_config
    from simpo_exp.model import load_model, load_tokenizer

    cfg = to_config(compose("model.dtype=bfloat16", "model.random_init.num_hidden_layers=1"))
    tokenizer = load_tokenizer(cfg.model)
    first = load_model(cfg, tokenizer, "eager")
    torch.manual_seed(123)
    again = load_model(cfg, tokenizer, "eager")
    weights = first.get_input_embeddings().weight
    assert torch.equal(weights, again.get_input_embeddings().weight)
    assert torch.equal(weights, weights.bfloat16().to(weights.dtype))  # drawn in bfloat16 (then held as asked)
    assert first.config.use_cache is False
    cfg.seed += 1
    assert not torch.equal(weights, load_model(cfg, tokenizer, "eager").get_input_embeddings().weight)
    cfg.model.random_init.vocab_size = len(tokenizer) - 1
    with pytest.raises(ConfigError, match="model.random_init.vocab_size="):
        load_model(cfg, tokenizer, "eager")


def test_a_tokenizer_of_its_own_path_is_the_one_loaded_and_a_missing_pad_is_the_eos(tmp_path):
    """model.tokenizer_path was checked but the model's own tokenizer loaded; a saved tokenizer without a pad token
    reached training with pad_token_id None."""
    import json

    from simpo_exp.config import ModelConfig
    from simpo_exp.model import load_tokenizer

    own, other = build_tiny_tokenizer(), build_tiny_tokenizer()
    own.pad_token = None
    other.add_tokens(["<extra>"])
    own.save_pretrained(tmp_path / "m")
    other.save_pretrained(tmp_path / "t")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(other)}))
    loaded = load_tokenizer(ModelConfig(name="m", path=str(tmp_path / "m"), chat_template="zephyr"))
    assert len(loaded) == len(own) and loaded.pad_token == loaded.eos_token
    assert loaded.pad_token_id == loaded.eos_token_id is not None
    mcfg = ModelConfig(name="m", path=str(tmp_path / "m"), tokenizer_path=str(tmp_path / "t"), chat_template="zephyr")
    assert len(load_tokenizer(mcfg)) == len(other) == len(own) + 1
