"""Composition of the documented commands, and validation before anything loads."""

import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from simpo_exp.config import ConfigError, learning_rate_for_size, resolve_learning_rate, to_config


def test_embedded_default(compose):
    cfg = to_config(compose())
    assert (cfg.model.name, cfg.dataset.name, cfg.hardware.name, cfg.logger.name) == (
        "tiny",
        "synthetic",
        "auto",
        "wandb",
    )
    assert (cfg.beta, cfg.gamma_beta_ratio, cfg.sft_weight, cfg.loss_type) == (2.0, 0.5, 0.0, "sigmoid")
    assert (cfg.warmup_ratio, cfg.lr_scheduler_type) == (0.1, "cosine")
    assert cfg.model.path == ""  # nothing to download
    assert resolve_learning_rate(cfg)[0] == cfg.model.learning_rate


def test_reasoning_on_llama3(compose):
    """python -m simpo_exp model=llama3-8b hparams=reasoning"""
    cfg = to_config(compose("model=llama3-8b", "hparams=reasoning"))
    assert cfg.model.path == "meta-llama/Meta-Llama-3-8B"
    assert (cfg.beta, cfg.gamma_beta_ratio) == (5.0, 0.7)
    assert resolve_learning_rate(cfg) == (3e-7, "learning_rate: the command line or a preset (hparams, experiment)")
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (1, 16)
    # the tiny preset's run length does not leak into a real model's run
    assert cfg.max_steps == -1 and cfg.num_train_epochs == 1.0


def test_top_level_hparams_override(compose):
    cfg = to_config(compose("beta=5", "gamma_beta_ratio=0.3", "sft_weight=0.1", "learning_rate=1e-6"))
    assert (cfg.beta, cfg.gamma_beta_ratio, cfg.sft_weight, cfg.learning_rate) == (5.0, 0.3, 0.1, 1e-6)


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("default", dict(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.0)),
        ("instruct", dict(beta=2.5, gamma_beta_ratio=0.5, sft_weight=0.1)),
        (
            "reasoning",
            dict(
                beta=5.0,
                gamma_beta_ratio=0.7,
                learning_rate=3e-7,
                per_device_train_batch_size=1,
                gradient_accumulation_steps=16,
            ),
        ),
        ("creative", dict(learning_rate=1e-6, lr_scheduler_type="linear")),
        ("weak-prefs", dict(gamma_beta_ratio=0.3)),
        ("strong-prefs", dict(beta=5.0, gamma_beta_ratio=0.7)),
    ],
)
def test_hparams_presets(compose, preset, expected):
    cfg = to_config(compose(f"hparams={preset}"))
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.warmup_ratio == 0.1


@pytest.mark.parametrize(
    "params_b,lr",
    [(0.5, 1e-6), (3.0, 1e-6), (3.5, 1e-6), (7.2, 5e-7), (8.0, 5e-7), (10.0, 5e-7), (13.0, 3e-7), (30.0, 3e-7)]
    + [(35.0, 3e-7), (35.01, 1e-7), (70.0, 1e-7)],  # each band's upper edge its own
)
def test_learning_rate_follows_model_size(params_b, lr):
    assert learning_rate_for_size(params_b) == lr


def test_a_learning_rate_given_beats_the_model_presets_and_the_presets_beats_the_size_rule(compose):
    tiny = to_config(compose())
    assert tiny.model.learning_rate is not None and tiny.model.learning_rate != 5e-4
    assert resolve_learning_rate(to_config(compose("learning_rate=5e-4")))[0] == 5e-4
    assert resolve_learning_rate(tiny) == (tiny.model.learning_rate, f"model preset {tiny.model.name!r}")
    sized = to_config(compose("model.params_b=7", "model.learning_rate=2e-7"))
    assert resolve_learning_rate(sized)[0] == 2e-7


def test_a_model_of_unknown_size_needs_a_learning_rate(compose):
    """A preset without params_b got the rate of a 0B model (1e-6, twice the 7-8B default) without a word."""
    given = ["model=llama3-8b", "model.params_b=null"]
    with pytest.raises(ConfigError, match=r"model.params_b=None: model preset 'llama3-8b' gives no size"):
        to_config(compose(*given))
    assert resolve_learning_rate(to_config(compose(*given, "learning_rate=4e-7")))[0] == 4e-7
    with pytest.raises(ConfigError, match="model.params_b=0.0: must be > 0"):
        to_config(compose("model=llama3-8b", "model.params_b=0"))


@pytest.mark.parametrize(
    "model,lr", [("llama3-8b", 5e-7), ("mistral-7b", 5e-7), ("qwen2.5-0.5b-instruct", 1e-6), ("gemma2-9b-it", 5e-7)]
)
def test_model_presets_feed_the_learning_rate(compose, model, lr):
    cfg = to_config(compose(f"model={model}"))
    value, source = resolve_learning_rate(cfg)
    assert value == lr and "size" in source
    # ... unless the command line sets one
    assert resolve_learning_rate(to_config(compose(f"model={model}", "learning_rate=2e-7")))[0] == 2e-7


# Every preset of every group composes and validates: tests/test_presets.py.


@pytest.mark.parametrize(
    "override,key",
    [
        ("beta=0", "beta"),
        ("beta=-2", "beta"),
        ("gamma_beta_ratio=-0.1", "gamma_beta_ratio"),
        ("learning_rate=0", "learning_rate"),
        ("learning_rate=-1e-6", "learning_rate"),
        ("sft_weight=-0.5", "sft_weight"),
        ("loss_type=ipo", "loss_type"),
        ("label_smoothing=0.7", "label_smoothing"),
        ("label_smoothing=0.5", "label_smoothing"),  # symmetric: its gradient pulls every margin to 0
        ("lr_scheduler_type=exotic", "lr_scheduler_type"),
        ("warmup_ratio=1.5", "warmup_ratio"),
        ("max_prompt_length=256", "max_prompt_length"),  # == max_length of the tiny preset
        ("max_steps=0", "max_steps"),
        ("per_device_train_batch_size=0", "per_device_train_batch_size"),
        ("hardware.device=tpu", "hardware.device"),
        ("hardware.mixed_precision=fp8", "hardware.mixed_precision"),
        ("hardware.collective_timeout=0", "hardware.collective_timeout"),
        ("dataset.sources.synthetic.fraction=0", "dataset.sources.synthetic.fraction"),
        ("model.random_init.num_attention_heads=3", "model.random_init.hidden_size"),
        ("model.random_init.hidden_size=12", "model.random_init.hidden_size"),  # heads of 3: RoPE failed inside
        ("logger.mode=sometimes", "logger.mode"),
        ("save_dtype=int8", "save_dtype"),
        ("adam_beta1=1.5", "adam_beta1"),
        ("adam_beta2=1.0", "adam_beta2"),
        ("adam_epsilon=-1", "adam_epsilon"),
        ("dataset.num_proc=-3", "dataset.num_proc"),
        ("hardware=cpu-lora hardware.lora_alpha=0", "hardware.lora_alpha"),
        # numpy's and datasets' generators refused these deep inside, with a traceback
        ("seed=-1", "seed"),
        ("seed=4294967296", "seed"),
        ("dataset.shuffle_seed=-1", "dataset.shuffle_seed"),
        ("dataset.synthetic.seed=-5", "dataset.synthetic.seed"),
        # torch clips to a norm of 0 by zeroing every gradient, and to a negative one by turning the step uphill
        ("max_grad_norm=0", "max_grad_norm"),
        ("max_grad_norm=-1", "max_grad_norm"),
        ("weight_decay=-0.1", "weight_decay"),
        ("save_total_limit=0", "save_total_limit"),
        ("max_bad_steps=-1", "max_bad_steps"),
        ("dataset.test_size=1", "dataset.test_size"),
        ("dataset.sources.synthetic.test_size=0", "dataset.sources.synthetic.test_size"),
        ("dataset.max_train_samples=0", "dataset.max_train_samples"),
        ("dataset.max_eval_samples=-2", "dataset.max_eval_samples"),
        # cadences: -1 evaluated (and saved) at every step, 0 failed on a division after the whole set-up
        ("eval_steps=-1", "eval_steps"),
        ("save_steps=-1", "save_steps"),
        ("logging_steps=0", "logging_steps"),
        ("max_steps=-1 num_train_epochs=0", "num_train_epochs"),  # one step, finished as if complete
        ("hardware.effective_batch_size=0", "hardware.effective_batch_size"),
        ("hardware.dataloader_num_workers=-1", "hardware.dataloader_num_workers"),
        ("hardware.logps_chunk_size=-1", "hardware.logps_chunk_size"),
        ("hardware=cpu-lora hardware.lora_r=0", "hardware.lora_r"),
        # from a mutation review of config.py: range and choice checks no row reached
        ("logger.init_timeout=0", "logger.init_timeout"),
        ("loss=dpo reference_mode=foo", "reference_mode"),  # else a reference method read it as cached
        ("loss=rdpo rdpo_alpha=-0.1", "rdpo_alpha"),
        ("model.learning_rate=0", "model.learning_rate"),
        ("warmup_ratio=1.0", "warmup_ratio"),  # the whole run warm-up
        ("per_device_eval_batch_size=0", "per_device_eval_batch_size"),
        ("num_generations=-1", "num_generations"),
        ("max_new_tokens=0", "max_new_tokens"),
        ("max_prompt_length=0", "max_prompt_length"),  # prompts cut to nothing
        ("model.random_init.num_hidden_layers=0", "model.random_init.num_hidden_layers"),  # a model of no layers
        ("model.random_init.num_key_value_heads=3", "model.random_init.num_key_value_heads"),
        ("model.random_init.vocab_size=-1", "model.random_init.vocab_size"),
        ("dataset.sources.synthetic.path=''", "dataset.sources.synthetic.path"),
        ("dataset.sources.synthetic.fraction=1.5", "dataset.sources.synthetic.fraction"),
        ("dataset.num_proc=0", "dataset.num_proc"),
        ("dataset.synthetic.num_test=0", "dataset.synthetic.num_train/num_test"),
        ("dataset.synthetic.min_digits=9 dataset.synthetic.max_digits=5", "dataset.synthetic.min_digits"),
        ("hardware.master_weights=foo", "hardware.master_weights"),  # else read as fp32
        ("hardware.packing_attention=foo", "hardware.packing_attention"),
        ("hardware.checkpoint_format=foo", "hardware.checkpoint_format"),
        ("hardware.peak_tflops=0", "hardware.peak_tflops"),
        ("hardware=cpu-lora hardware.lora_dropout=1", "hardware.lora_dropout"),
        ("hardware=cpu-lora hardware.lora_target_modules=[]", "hardware.lora_target_modules"),
        # a nested float that is not finite passed its > 0 check; named by its whole key
        ("hardware.peak_tflops=inf", "hardware.peak_tflops"),
        ("hardware.collective_timeout=inf", "hardware.collective_timeout"),
        ("model.learning_rate=nan", "model.learning_rate"),
        ("dataset.sources.synthetic.fraction=inf", "dataset.sources.synthetic.fraction"),  # three keys down
    ],
)
def test_invalid_values_name_the_key(compose, override, key):
    with pytest.raises(ConfigError) as err:
        to_config(compose(*override.split()))
    message = str(err.value)
    assert f"{key}=" in message
    assert "must" in message or "allowed" in message


def test_settings_nothing_would_read_are_refused(compose):
    """A warm-up under transformers' constant schedule (which has none), and an absolute margin for a method whose
    loss has no margin, ran without them while the model card and summary recorded them."""
    with pytest.raises(ConfigError, match="warmup_ratio=0.1: .*ignored by lr_scheduler_type=constant"):
        to_config(compose("lr_scheduler_type=constant"))
    to_config(compose("lr_scheduler_type=constant", "warmup_ratio=0"))
    to_config(compose("lr_scheduler_type=constant_with_warmup"))
    with pytest.raises(ConfigError, match="gamma=3.0: method='dpo' has no target margin"):
        to_config(compose("loss=dpo", "gamma=3"))
    to_config(compose("loss=simpo", "gamma=3"))


def test_settings_their_context_makes_inert_are_refused_by_name(compose):
    """An adapter's shape without adapters, a random model's shape beside a model read from disk, and hub-only
    model keys on the model built in code each used to run as if never given."""
    with pytest.raises(ConfigError, match="hardware.lora_r=8: has no effect unless hardware.lora=true"):
        to_config(compose("hardware.lora_r=8"))
    with pytest.raises(ConfigError, match=r"hardware.lora_target_modules=\['q_proj'\]: has no effect unless"):
        to_config(compose("hardware.lora_target_modules=[q_proj]"))
    assert to_config(compose("hardware=cpu-lora", "hardware.lora_r=8")).hardware.lora_r == 8
    with pytest.raises(ConfigError, match="model.random_init.hidden_size=64: has no effect with model.path set"):
        to_config(compose("model.path=/some/model", "model.random_init.hidden_size=64"))
    to_config(compose("model.path=/some/model"))
    for override in ("model.revision=main", "model.trust_remote_code=true", "model.tokenizer_path=/some/tokenizer"):
        with pytest.raises(ConfigError, match=override.split("=")[0] + ".*has no effect without model.path"):
            to_config(compose(override))
    to_config(compose("model.path=/some/model", "model.revision=main", "model.tokenizer_path=/some/tokenizer"))
    # each ran as if never given: a sweep over one trained the same run under several names
    for override, says in (
        ("hardware.compile_backend=eager", "has no effect unless hardware.compile=true"),
        ("reference_mode=live", "has no effect: method='simpo' takes no reference log-probs"),
        ("max_new_tokens=8", "has no effect with num_generations=0"),
    ):
        extra = ["num_generations=0"] if override.startswith("max_new") else []
        with pytest.raises(ConfigError, match=f"{override.split('=')[0]}=.*{says}"):
            to_config(compose(override, *extra))
    with pytest.raises(
        ConfigError, match="hardware.packing_attention='flex': has no effect with hardware.packing=none"
    ):
        to_config(compose("hardware.packing=none", "hardware.packing_attention=flex"))
    to_config(compose("hardware.compile=true", "hardware.compile_backend=eager"))
    to_config(compose("loss=dpo", "reference_mode=live"))
    to_config(compose("max_new_tokens=8"))
    to_config(compose("hardware.packing=prefix_shared", "hardware.packing_attention=mask"))


def test_a_synthetic_source_refuses_a_path_or_format_it_would_not_read(compose):
    with pytest.raises(ConfigError, match=r"dataset.sources.synthetic.path='/data/prefs.jsonl': is not read with"):
        to_config(compose("dataset.sources.synthetic.path=/data/prefs.jsonl"))  # the preset says format: synthetic
    with pytest.raises(ConfigError, match=r"dataset.sources.synthetic.format='messages': has no effect with"):
        to_config(compose("dataset.sources.synthetic.format=messages"))
    to_config(compose("dataset.sources.synthetic.format=synthetic"))  # both name the task: fine


def test_a_baseline_method_drops_the_hparams_presets_nll_term(compose):
    """hparams=instruct's SFT term (0.1) carried into `loss=dpo`, which then trained DPO + 0.1 NLL; a baseline's
    own loss decides its NLL weight, and the command line still sets one."""
    assert compose("hparams=instruct").sft_weight == 0.1  # SimPO keeps the preset's
    for method in ("dpo", "ipo", "rdpo", "ln-dpo", "simper", "alphapo"):
        assert compose("hparams=instruct", f"loss={method}").sft_weight == 0.0, method
    assert compose("hparams=instruct", "loss=orpo").sft_weight == 1.0
    assert compose("hparams=instruct", "loss=dpo", "sft_weight=0.2").sft_weight == 0.2
    assert compose("experiment=guide-llama3-8b-instruct", "loss=dpo").sft_weight == 0.0


def test_hinge_with_label_smoothing_is_refused(compose):
    with pytest.raises(ConfigError, match="label_smoothing"):
        to_config(compose("loss_type=hinge", "label_smoothing=0.1"))


def test_unknown_key_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose("betta=5")
    assert "betta" in str(err.value)


def test_unknown_nested_key_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose("model.hidden=5")
    assert "hidden" in str(err.value)


@pytest.mark.parametrize(
    "override, says",
    [
        ("+betta=5", ["betta=5: no such key, so nothing would read it", "did you mean beta?"]),
        ("+hardware.pakcing=none", ["hardware.pakcing='none': no such key", "did you mean hardware.packing?"]),
        ("+hparam=reasoning", ["hparam='reasoning': no such key", "chosen without '+' (group=option)"]),
        ("+model.foo=1", ["model.foo=1: no such key"]),
    ],
)
def test_a_key_added_with_plus_that_nothing_reads_is_refused(compose, override, says):
    """Hydra adds such a key to the composed config, and the run trained as if it had not been given (the run's
    name even carried it)."""
    cfg = compose(override)  # Hydra itself takes it
    with pytest.raises(ConfigError) as err:
        to_config(cfg)
    assert all(text in str(err.value) for text in says), str(err.value)


def test_keys_of_a_new_data_source_are_declared_keys(compose):
    cfg = to_config(compose("dataset=local", "dataset.sources.local.path=/data/prefs.jsonl"))
    assert cfg.dataset.sources["local"].path == "/data/prefs.jsonl"
    with pytest.raises(ConfigError, match=r"dataset.sources.local.prompt_colum='x': .*did you mean .*prompt_column"):
        to_config(compose("dataset=local", "dataset.sources.local.path=/p", "+dataset.sources.local.prompt_colum=x"))


def test_unknown_group_option_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose("model=llama4-1t")
    assert "llama4-1t" in str(err.value)


def test_wrong_type_fails_at_composition(compose):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose("beta=high")
    assert "beta" in str(err.value)


def test_unknown_key_in_a_preset_file_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from simpo_exp.config import Config

    with pytest.raises(ConfigKeyError, match="gama"):
        OmegaConf.merge(OmegaConf.structured(Config), {"gama": 1.0})


def test_random_model_takes_a_larger_vocabulary(compose):
    from simpo_exp.model import load_model, load_tokenizer

    cfg = to_config(compose("model.random_init.vocab_size=1000", "model.random_init.num_hidden_layers=1"))
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg, tok, "sdpa")
    assert model.config.vocab_size == 1000 and model.get_output_embeddings().weight.shape[0] == 1000
    cfg = to_config(compose("model.random_init.vocab_size=100"))
    with pytest.raises(
        ConfigError, match=r"model.random_init.vocab_size=100 is smaller than the tokenizer's 26\d tokens"
    ):
        load_model(cfg, tok, "sdpa")
    cfg = to_config(compose("model=random-750m"))
    assert cfg.model.random_init.vocab_size == 128256 and not cfg.model.path


def test_settings_a_run_would_not_honour_are_refused_by_name(compose):
    """Each used to run as something else (fp16 on the CPU trained in float32 while recording float16; a packed
    layout dropped a sliding window) or to fail mid-run (float16 AdamW turning weights to NaN at the first step,
    FlexAttention's missing CPU backward)."""
    from types import SimpleNamespace

    from simpo_exp.engine import check_cpu_settings
    from simpo_exp.layout import choose_layout

    with pytest.raises(ConfigError, match="hardware.mixed_precision=fp16 on the CPU"):
        check_cpu_settings(to_config(compose("hardware.mixed_precision=fp16")))
    with pytest.raises(ConfigError, match="hardware.attn_implementation=flex_attention trains on a GPU only"):
        check_cpu_settings(to_config(compose("hardware.attn_implementation=flex_attention")))
    check_cpu_settings(to_config(compose("hardware.mixed_precision=bf16")))  # honoured on the CPU
    with pytest.raises(ConfigError, match="model.dtype=float16 with hardware.master_weights=model"):
        to_config(compose("model.dtype=float16", "hardware.master_weights=model"))
    # where it changes nothing (a sweep over it trained one run under two names): LoRA, float32 weights
    with pytest.raises(ConfigError, match=r"master_weights='model': has no effect under hardware.lora=true"):
        to_config(compose("hardware=cpu-lora", "model.dtype=bfloat16", "hardware.master_weights=model"))
    with pytest.raises(ConfigError, match=r"master_weights='model': has no effect with model.dtype=float32"):
        to_config(compose("hardware.master_weights=model"))
    to_config(compose("model.dtype=bfloat16", "hardware.master_weights=model"))  # bfloat16 weights trained as they are
    to_config(compose("model.dtype=float16"))  # float32 master weights: fine

    hardware = to_config(compose("hardware.packing=packed")).hardware
    windowed = SimpleNamespace(sliding_window=8, use_sliding_window=True)
    with pytest.raises(ConfigError, match="sliding window of 8 tokens, shorter than max_length=512"):
        choose_layout(hardware, "cpu", windowed, 512)
    assert choose_layout(hardware, "cpu", windowed, 8).packing == "packed"  # the window covers every sequence
    capped = SimpleNamespace(attn_logit_softcapping=50.0)  # Gemma 2: segment attention has no softcap
    with pytest.raises(ConfigError, match="packing_attention='segments': the model softcaps its attention logits"):
        choose_layout(hardware, "cpu", capped, 512)
    masked = to_config(compose("hardware.packing=prefix_shared", "hardware.packing_attention=mask")).hardware
    assert choose_layout(masked, "cpu", capped, 512).attention == "mask"


def test_the_console_script_finds_its_config_groups(tmp_path):
    """`simpo-exp` (pyproject's console script) failed everywhere: Hydra read the relative config_path against
    the module, 'Primary config module conf not found'."""
    import shutil
    import subprocess

    exe = shutil.which("simpo-exp")
    if exe is None:
        pytest.skip("the package's console script is not installed here")
    res = subprocess.run([exe, "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "name: tiny" in res.stdout, res.stderr[-2000:]


def test_an_hparams_rate_that_replaces_the_embedded_models_own_is_warned_of(compose):
    """hparams=creative on the embedded default trained at 1e-6 instead of model=tiny's 1e-3, without a word: the
    held-out accuracy stayed at chance and a first-hour user concluded nothing learns."""
    from simpo_exp.config import replaced_rate_note

    note = replaced_rate_note(to_config(compose("hparams=creative")))
    assert note is not None and "learning_rate=1e-06" in note and "model=tiny's own rate, 0.001" in note
    assert "randomly initialised" in note
    assert replaced_rate_note(to_config(compose())) is None  # the model's own rate
    assert replaced_rate_note(to_config(compose("learning_rate=5e-4"))) is None  # within ten times
    assert replaced_rate_note(to_config(compose("learning_rate=5e-5"))) is not None  # twenty times below
    assert replaced_rate_note(to_config(compose("model=llama3-8b", "hparams=creative"))) is None  # no rate of its own


def test_a_pretrained_model_at_a_rate_far_above_any_fine_tunes_is_warned_of(compose):
    """+sweep=optuna's learning-rate range is the tiny model's: with experiment=simpo-llama3-8b-instruct it sampled
    3.4e-4 for an 8B model (336 times its recipe's rate) and the run went on unremarked."""
    from simpo_exp.config import large_rate_note

    llama = to_config(compose("experiment=simpo-llama3-8b-instruct"))
    note = large_rate_note(llama, 3.4e-4)
    assert note is not None and "learning_rate=0.00034" in note and "SimPO's recipes use 3e-7 to 1e-6" in note
    assert "hydra.sweeper.params.learning_rate" in note
    assert large_rate_note(llama, 1e-6) is None  # the recipe's
    assert large_rate_note(to_config(compose()), 1e-3) is None  # the embedded model learns at 1e-3
    assert large_rate_note(to_config(compose("model.learning_rate=null")), 5e-2) is None  # built in code: no note
    lora = to_config(compose("experiment=simpo-llama3-8b-instruct", "hardware.lora=true"))
    assert large_rate_note(lora, 5e-5) is None and "LoRA runs use" in large_rate_note(lora, 3e-3)
    saved_tiny = to_config(compose("model.path=/runs/tiny/model"))  # model=tiny's own 1e-3, from a saved folder
    assert large_rate_note(saved_tiny, 1e-3) is None


def test_a_real_model_under_the_tiny_presets_recipe_is_refused(compose):
    """The generate stage's printed command names no model preset where its own command named none: the next round
    trained the sampled policy (an 8B model) under the default preset, tiny, at its 1e-3 and 256 tokens, with no
    word. A saved tiny model passes, and so does a learning rate given."""
    from simpo_exp.config import check_preset_size

    big = to_config(compose("model.path=/runs/R0/model"))
    with pytest.raises(ConfigError, match=r"model.path=/runs/R0/model holds 8.03B parameters, but model=tiny is a "):
        check_preset_size(big, 8_030_000_000)
    check_preset_size(big, 4_000_000)  # a tiny model saved by a run
    check_preset_size(to_config(compose("model.path=/runs/R0/model", "learning_rate=5e-7")), 8_030_000_000)
    check_preset_size(to_config(compose()), 8_030_000_000)  # a random init: built from the preset itself
    # a hub preset's rate comes from its size: a 0.5B preset under a 70B model's path trained it at 0.5B's 1e-6
    small = to_config(compose("model=qwen2.5-0.5b-instruct", "model.path=/models/llama-3-70b"))
    with pytest.raises(ConfigError, match=r"a 0.5B model: the rate for its size \(1e-06\).*give model.params_b"):
        check_preset_size(small, 70_600_000_000)
    check_preset_size(small, 1_500_000_000)  # a 1.5B model under it: within the factor of ten
    with pytest.raises(ConfigError, match="holds 7.6B parameters"):
        check_preset_size(small, 7_600_000_000)  # 15 times its size: past it
    resized = to_config(compose("model=qwen2.5-0.5b-instruct", "model.path=/models/llama-3-70b", "model.params_b=70"))
    check_preset_size(resized, 70_600_000_000)


def test_a_sweep_or_launcher_preset_without_its_plugin_names_the_extra(monkeypatch):
    """Without the sweep extra, +sweep=optuna gave Hydra's bare "Available options in 'hydra/sweeper': basic"."""
    import importlib.util

    from simpo_exp.command_line import missing_plugin

    assert missing_plugin(["+sweep=optuna", "+launcher=local"]) is None  # the test extras hold both
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if "hydra_plugins" in name else real(name))
    assert missing_plugin(["beta=2", "+sweep=optuna"]) == (
        "+sweep=optuna needs Hydra's hydra-optuna-sweeper plugin: pip install -e '.[sweep]'"
    )
    assert "hydra-submitit-launcher" in missing_plugin(["+launcher=slurm"])
    assert missing_plugin(["beta=2"]) is None


def test_llama4s_column_dependent_attention_gets_the_padded_layout(compose):
    """Llama 4 scales the queries of its layers without rotary positions by a temperature that grows with the
    token's column in the row (past floor_scale columns), not with its position_ids: a sequence packed into a row
    past that column was scored by another temperature (3.8e-3 off the padded log-probs, found by hand), and the
    set-up check, on one short pair, did not see it. Such a model runs the padded layout; its chunked layers'
    chunk counts as a window."""
    from transformers import Llama4TextConfig

    from simpo_exp.layout import choose_layout
    from simpo_exp.layout_auto import candidates

    llama4 = Llama4TextConfig(num_hidden_layers=4)  # layer 4 without rotary positions, temperature tuning on
    auto = to_config(compose("hardware.packing=auto")).hardware
    assert choose_layout(auto, "cuda", llama4, 2048).packing == "none"
    assert choose_layout(auto, "cpu", llama4, 2048).packing == "none"
    assert [c.packing for c in candidates("cuda", llama4, 0, 2048)] == ["none"]
    # no_rope_layers flags a layer WITH rotary positions by 1: every layer rotary, no temperature grows, packed is fine
    rotary = Llama4TextConfig(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 1])
    assert choose_layout(auto, "cuda", rotary, 2048).packing == "packed"
    for packing in ("packed", "prefix_shared"):
        hardware = to_config(compose(f"hardware.packing={packing}")).hardware
        with pytest.raises(ConfigError, match="depends on a token's column in the row"):
            choose_layout(hardware, "cpu", llama4, 2048)
    untuned = Llama4TextConfig(num_hidden_layers=4, attn_temperature_tuning=False, attention_chunk_size=4096)
    assert choose_layout(auto, "cuda", untuned, 2048).packing == "packed"
    assert choose_layout(auto, "cuda", untuned, 8192).packing == "none"  # a sequence may outgrow a chunk


def test_a_sweep_or_launcher_preset_in_a_single_run_is_refused(tmp_path):
    """Hydra applies sweepers and launchers to a --multirun only: ``+launcher=slurm`` without it trained one job on
    the login node, and ``+sweep=optuna`` ran one run at the defaults, each exiting 0 with no word. Printing the
    config (--cfg) is not refused."""
    from simpo_exp.command_line import sweep_without_multirun

    for stage in ("simpo_exp", "simpo_exp.generate", "simpo_exp.evaluate"):
        res = subprocess.run(
            [sys.executable, "-m", stage, "+launcher=slurm", "logger=none", f"hydra.run.dir={tmp_path / stage}"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert res.returncode == 2 and "+launcher=slurm applies to a --multirun only" in res.stderr, res.stderr
        assert not (tmp_path / stage).exists()
    assert "+sweep=optuna applies to a --multirun only" in sweep_without_multirun(["+sweep=optuna", "--run"])
    for fine in (
        ["-m", "+sweep=optuna"],
        ["--multirun", "+launcher=local"],
        ["--cfg", "hydra", "+launcher=slurm"],
        ["+sweep=optuna", "--help"],  # prints the app's help, runs nothing: as --cfg
        ["+sweep=optuna", "-h"],
        ["+launcher=slurm", "--hydra-help"],
        ["hydra.mode=MULTIRUN", "+launcher=local", "beta=2,3"],  # Hydra's other way to ask for a multirun
    ):
        assert sweep_without_multirun(fine) is None


def test_a_launcher_under_torchrun_is_refused(monkeypatch):
    """``torchrun --nproc_per_node 2 -m simpo_exp --multirun +launcher=local``: each process submitted the sweep's
    jobs, which inherited the processes' RANK and rendezvous variables (on SLURM: the login node's address)."""
    from simpo_exp.command_line import launcher_under_torchrun

    argv = ["--multirun", "+launcher=local", "beta=2,3"]
    assert launcher_under_torchrun(argv) is None  # one process
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "each of the 2 processes would submit the sweep's jobs" in launcher_under_torchrun(argv)
    assert launcher_under_torchrun(["--multirun", "beta=2,3"]) is None  # a sweep on the processes themselves


def test_processes_an_mpi_launcher_started_without_torchs_ranks_are_refused(monkeypatch, capsys):
    """``mpirun -n 4 python -m simpo_exp``: MPI's ranks alone, so every process took itself for the main one and a
    one-process run (the accumulation for a global batch of 128 was one process's: 512 pairs a step on 4)."""
    from simpo_exp.command_line import refuse_command_line

    monkeypatch.delenv("RANK", raising=False)
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    refuse_command_line(["beta=2"], "config")  # one process: nothing to say
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as stopped:
        refuse_command_line(["beta=2"], "config")
    assert stopped.value.code == 2
    assert "one of several an MPI launcher started (OMPI_COMM_WORLD_SIZE=4)" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")  # torch's ranks given beside MPI's (torchrun under srun): as torchrun says
    refuse_command_line(["beta=2"], "config")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    for value in ("", "x"):  # a variable set to no number (an empty export): no MPI size, no traceback
        monkeypatch.setenv("PMI_SIZE", value)
        refuse_command_line(["beta=2"], "config")


def test_an_accelerate_configs_deepspeed_json_is_found_from_any_directory(tmp_path, monkeypatch):
    """launchers/zero3.yaml names launchers/ds_zero3.json, which accelerate launch passes on as written: launched
    from a scratch directory, accelerate refused it ("Expected a string path to an existing deepspeed config")."""
    from pathlib import Path

    from simpo_exp.engine import launcher_ds_config_beside_the_project

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launchers/ds_zero3.json")
    launcher_ds_config_beside_the_project()
    found = Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    assert found.is_absolute() and found.is_file() and found.parts[-2:] == ("launchers", "ds_zero3.json")
    (tmp_path / "launchers").mkdir()  # the user's own edited copy where the run is launched: theirs, not replaced
    (tmp_path / "launchers" / "ds_zero3.json").write_text("{}")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launchers/ds_zero3.json")
    launcher_ds_config_beside_the_project()
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "launchers/ds_zero3.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "elsewhere/mine.json")  # not the project's: left to say
    launcher_ds_config_beside_the_project()
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "elsewhere/mine.json"


def test_a_task_given_one_gpu_samples_on_it_whatever_its_local_rank(monkeypatch):
    """Under +launcher=slurm each task sees only its own GPU (CUDA_VISIBLE_DEVICES narrowed), as device 0: the
    generate and evaluate stages asked for cuda:LOCAL_RANK, an invalid ordinal on every task but local rank 0."""
    import torch

    from simpo_exp.inference.sampling import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # a node's processes that each see every GPU
    assert pick_device("auto") == torch.device("cuda", 3)


def test_a_swept_key_given_twice_on_the_command_line_is_refused(capsys):
    """``--multirun beta=2,5 beta=10`` ran one job, beta=10 (Hydra takes the last value), the sweep's summary saying
    only "1 jobs". A value given again without a sweep stays Hydra's last-one-wins (a base list of overrides, then
    the run's own)."""
    from simpo_exp.command_line import key_given_twice, refuse_command_line

    assert key_given_twice(["--multirun", "beta=2,5", "+beta=10"]) == (
        "beta is given twice (beta=2,5 and +beta=10): Hydra takes the last value alone, so the sweep would not run "
        "as written; give the key once"
    )
    assert key_given_twice(["hparams=instruct", "hparams=reasoning,creative"]).startswith("hparams is given twice")
    assert key_given_twice(["lr=1e-6", "lr=range(1,3)"]).startswith("lr is given twice")
    for fine in (["beta=2", "beta=5"], ["--config-dir", "c", "-cn", "x", "beta=2,5"], ["~beta", "beta=2,5"], []):
        assert key_given_twice(fine) is None
    with pytest.raises(SystemExit) as stopped:
        refuse_command_line(["--multirun", "beta=2,5", "max_steps=3", "beta=10"], "config")
    assert stopped.value.code == 2 and "error: beta is given twice" in capsys.readouterr().err


def test_an_override_hydras_grammar_cannot_read_is_named_with_what_went_wrong(capsys):
    """``beta= 2`` (the shell splits it into ``beta=`` and ``2``) and ``beta=2,`` were Hydra's grammar errors alone
    ("token recognition error at: '2'"), naming neither the argument nor the key."""
    from simpo_exp.command_line import refuse_command_line, unreadable_override

    assert unreadable_override(["beta=", "2"]).startswith("cannot read the override '2' (Hydra: token recognition")
    assert unreadable_override(["beta=", "2"]).endswith(
        "a space after '='? write beta=2 (or quote a value with spaces)"
    )
    assert unreadable_override(["-m", "beta=2,"]).endswith("a comma at the end: a sweep lists its values as key=a,b,c")
    assert "an override is key=value" in unreadable_override(["hardware.pakcing"])
    readable = (["--cfg", "job", "-cn", "x", "beta=2,5", "~gamma", "+x='a b'"], ["--info", "defaults"], ["beta="])
    for fine in readable:
        assert unreadable_override(fine) is None, fine
    assert unreadable_override(["--info", "beta=3"]) is None and not capsys.readouterr().err  # Hydra's to refuse
    with pytest.raises(SystemExit) as stopped:
        refuse_command_line(["max_steps=3", "beta=2,"], "config")
    assert stopped.value.code == 2 and "error: cannot read the override 'beta=2,'" in capsys.readouterr().err


def test_a_misspelt_key_without_plus_is_named_with_the_key_meant(capsys):
    """``hardware.pakcing=packed`` was Hydra's "Could not override ... To append to your config use
    +hardware.pakcing=packed", advice the run then refused: two commands to learn of a typo."""
    from simpo_exp.command_line import refuse_command_line, undeclared_override

    meant = {
        ("hardware.pakcing=packed", "config"): "no such key hardware.pakcing in this stage's config; did you mean "
        "hardware.packing?",
        ("bet=2", "config"): "no such key bet in this stage's config; did you mean beta?",
        ("hparam=reasoning", "config"): "did you mean hparams?",  # a group's name
        ("dataset.sources.mine.pth=x", "config"): "did you mean dataset.sources.mine.path?",  # any source's name
        ("generate.temprature=1", "generate"): "did you mean generate.temperature?",
        ("benchmarks.rule.judge.knd=x", "evaluate"): "did you mean benchmarks.rule.judge.kind?",
        ("judge.kind=openai", "evaluate"): "benchmarks.<name>.judge.kind (benchmark=<name> chooses one)",
    }
    for (arg, stage), said in meant.items():
        assert undeclared_override([arg], stage).endswith(said), arg
    fine = ["hardware=cpu", "hparams=reasoning", "dataset.sources.mine.path=x", "+bet=2", "~beta", "hydra.run.dir=x"]
    assert undeclared_override([*fine, "model.random_init.hidden_size=8", "logger.project=p"], "config") is None
    with pytest.raises(SystemExit) as stopped:
        refuse_command_line(["max_steps=3", "hardware.pakcing=packed"], "config")
    assert stopped.value.code == 2 and "did you mean hardware.packing?" in capsys.readouterr().err


def test_every_key_of_every_composed_preset_passes_the_misspelt_key_check():
    """No key a stage's presets compose is taken for a misspelling (the schema walk follows sections and
    dictionaries of them)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig

    import simpo_exp.evaluate.config
    import simpo_exp.generate.config  # noqa: F401 (each registers its schema)
    from simpo_exp.command_line import undeclared_override
    from simpo_exp.rundir import CONF_DIR

    def leaves(node, prefix=""):
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none() and len(child):
                yield from leaves(child, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    presets = {"config": ["experiment=simpo-gemma2-9b-it", "hardware=zero3"], "generate": ["scorer=armorm"]}
    presets["evaluate"] = ["benchmark=alpacaeval2", "benchmark=arena-hard", "benchmark=gsm8k"]
    needed = {"generate": ["output_dir=/tmp/x"], "evaluate": ["evaluate.path=/tmp"]}
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for stage, chosen in presets.items():
            for overrides in ([], *([one] for one in chosen)):
                cfg = compose(config_name=stage, overrides=needed.get(stage, []) + overrides)
                keys = list(leaves(cfg))
                assert len(keys) > 40 and not [k for k in keys if undeclared_override([f"{k}=1"], stage)], overrides


def test_two_of_hydras_modes_in_one_command_are_refused_with_what_to_drop(capsys):
    """``--multirun --cfg job`` (a sweep's config, looked at before submitting it) was Hydra's ValueError traceback;
    the short flags, ``--cfg=job`` and an abbreviation argparse takes (``--multi``) count as the long ones."""
    from simpo_exp.command_line import mixed_modes, refuse_command_line, sweep_without_multirun

    message = mixed_modes(["-m", "--cfg", "job", "beta=2,5"])
    assert message.startswith("--multirun and --cfg given: Hydra runs one of") and "drop --multirun" in message
    assert mixed_modes(["--multi", "--cfg=job", "beta=2,5"]) == message
    assert mixed_modes(["--run", "-i"]) == (
        "--run and --info given: Hydra runs one of --run, --multirun, --cfg, --info at a time"
    )
    for one in (["--multirun", "beta=2,5"], ["-c", "job"], ["--cfg=job"], ["beta=2"], []):
        assert mixed_modes(one) is None
    # --cfg=job prints a config and runs nothing: a launcher preset beside it is no single job run here
    assert sweep_without_multirun(["--cfg=job", "+launcher=slurm"]) is None
    assert sweep_without_multirun(["+launcher=slurm"]).endswith("add --multirun")
    with pytest.raises(SystemExit) as stopped:  # every stage's entry point runs the check
        refuse_command_line(["--multirun", "--cfg", "job", "beta=2,5"], "config")
    assert stopped.value.code == 2 and "error: --multirun and --cfg given" in capsys.readouterr().err


def test_a_random_init_vocabulary_of_exactly_the_tokenizers_size_is_accepted(compose):
    from simpo_exp.config import to_config
    from simpo_exp.model import build_tiny_tokenizer, load_model

    tok = build_tiny_tokenizer()
    cfg = to_config(compose(f"model.random_init.vocab_size={len(tok)}", "model.random_init.num_hidden_layers=1"))
    assert load_model(cfg, tok, "eager").get_input_embeddings().num_embeddings == len(tok)


def test_no_data_source_and_no_run_folder_are_refused(compose):
    """Neither can be said on the command line alone (a dataset preset with no source, output_dir: null in a
    preset): both are refused by name instead of failing later in the loader or the writer."""
    cfg = compose()
    cfg.dataset.sources = {}
    with pytest.raises(ConfigError, match="dataset.sources=.*at least one source"):
        to_config(cfg)
    cfg = compose()
    cfg.output_dir = None
    with pytest.raises(ConfigError, match="output_dir=None: must name the run directory"):
        to_config(cfg)


def test_a_keys_declared_default_is_read_through_a_dictionary_of_sections():
    """A resumed run's saved config is compared with the schema's defaults (checkpoint.py): a key of one source of
    dataset.sources has its section's default, a key the schema does not declare, or declares without one, none."""
    from omegaconf import MISSING

    from simpo_exp.config import schema_default

    assert schema_default("dataset.sources.any.fraction") == 1.0
    assert schema_default("dataset.sources.any.test_split") == "test"
    assert schema_default("dataset.chat_format") == "generation_prompt"
    assert schema_default("dataset.nope") is MISSING and schema_default("dataset.sources.any.path") is MISSING
