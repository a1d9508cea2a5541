"""The experiment presets reproduce their sources value for value.

Two families (conf/experiment/):
- ``guide-*``: the three workflows of the SimPO training guide (Orchestra Research's SimPO skill,
  SKILL.md, "Common workflows"), as the guide writes them: fixed per-device batch x accumulation.
- ``simpo-*``: the official princeton-nlp/SimPO ``training_configs/*.yaml`` (the gamma_beta_ratio
  versions). Each file runs per-device batch 2 x accumulation 16 on 4 GPUs; the presets hold that
  global batch of 128 on any device count through ``hardware.effective_batch_size``.
"""

from __future__ import annotations

import jinja2
import pytest

from simpo_exp.config import resolve_gamma, to_config
from simpo_exp.engine import accumulation_steps
from tests.conftest import options
from tests.runs import run_module

# Values a preset does not take from its source keep the project's defaults (simpo_exp/config.py).
DEFAULTS = dict(
    max_length=2048,
    max_prompt_length=1800,
    warmup_ratio=0.1,
    lr_scheduler_type="cosine",
    eval_steps=100,
    logging_steps=10,
    seed=42,
    attn=None,
)

GUIDE = {
    "guide-mistral-7b-base": dict(
        model="mistralai/Mistral-7B-v0.1",
        data="HuggingFaceH4/ultrafeedback_binarized",
        beta=2.0,
        ratio=0.5,
        lr=5e-7,
        sft_weight=0.0,
        batch=1,
        accumulation=8,
        template="zephyr",
    ),
    "guide-llama3-8b-instruct": dict(
        model="meta-llama/Meta-Llama-3-8B-Instruct",
        data="argilla/ultrafeedback-binarized-preferences-cleaned",
        beta=2.5,
        ratio=0.5,
        lr=5e-7,
        sft_weight=0.1,
        batch=2,
        accumulation=4,
        template="auto",
    ),
    "guide-deepseek-math-7b-base": dict(
        model="deepseek-ai/deepseek-math-7b-base",
        data="argilla/distilabel-math-preference-dpo",
        beta=5.0,
        ratio=0.7,
        lr=3e-7,
        sft_weight=0.0,
        batch=1,
        accumulation=16,
        template="zephyr",
    ),
}

OFFICIAL = {
    "simpo-mistral-7b-base": dict(
        model="alignment-handbook/zephyr-7b-sft-full",
        data="HuggingFaceH4/ultrafeedback_binarized",
        splits=("train_prefs", "test_prefs"),
        beta=2.0,
        ratio=0.8,
        lr=3e-7,
        max_length=1024,
        max_prompt_length=512,
        attn="flash_attention_2",
        template="auto",
    ),
    "simpo-mistral-7b-instruct": dict(
        model="mistralai/Mistral-7B-Instruct-v0.2",
        data="princeton-nlp/mistral-instruct-ultrafeedback",
        splits=("train", "test"),
        beta=2.5,
        ratio=0.1,
        lr=5e-7,
        max_length=2048,
        max_prompt_length=1800,
        attn="flash_attention_2",
        template="mistral",
    ),
    "simpo-llama3-8b-base": dict(
        model="princeton-nlp/Llama-3-Base-8B-SFT",
        data="HuggingFaceH4/ultrafeedback_binarized",
        splits=("train_prefs", "test_prefs"),
        beta=2.0,
        ratio=0.5,
        lr=6e-7,
        max_length=2048,
        max_prompt_length=1800,
        attn="flash_attention_2",
        template="auto",
    ),
    "simpo-llama3-8b-instruct": dict(
        model="meta-llama/Meta-Llama-3-8B-Instruct",
        data="princeton-nlp/llama3-ultrafeedback",
        splits=("train", "test"),
        beta=2.5,
        ratio=0.55,
        lr=1e-6,
        max_length=2048,
        max_prompt_length=1800,
        attn="flash_attention_2",
        template="auto",
    ),
    "simpo-llama3-8b-instruct-v2": dict(
        model="meta-llama/Meta-Llama-3-8B-Instruct",
        data="princeton-nlp/llama3-ultrafeedback-armorm",
        splits=("train", "test"),
        beta=10.0,
        ratio=0.3,
        lr=1e-6,
        max_length=2048,
        max_prompt_length=1800,
        attn="flash_attention_2",
        template="auto",
    ),
    "simpo-gemma2-9b-it": dict(
        model="google/gemma-2-9b-it",
        data="princeton-nlp/gemma2-ultrafeedback-armorm",
        splits=("train", "test"),
        beta=10.0,
        ratio=0.5,
        lr=8e-7,
        max_length=2048,
        max_prompt_length=1800,
        attn="eager",
        template="gemma",
    ),
}


def test_every_experiment_preset_is_checked_here():
    assert set(options("experiment")) == set(GUIDE) | set(OFFICIAL)


def the_source(cfg):
    (src,) = cfg.dataset.sources.values()
    return src


@pytest.mark.parametrize("name", sorted(GUIDE))
def test_guide_workflows_as_written(compose, name):
    want = GUIDE[name]
    cfg = to_config(compose(f"experiment={name}"))
    assert cfg.model.path == want["model"] and the_source(cfg).path == want["data"]
    assert (cfg.beta, cfg.gamma, cfg.gamma_beta_ratio) == (want["beta"], None, want["ratio"])
    assert (cfg.method, cfg.loss_type, cfg.sft_weight) == ("simpo", "sigmoid", want["sft_weight"])
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.max_steps) == (want["lr"], 1, -1)
    assert cfg.model.chat_template == want["template"]
    # The guide fixes the per-device batch and the accumulation, whatever the device count.
    assert cfg.per_device_train_batch_size == want["batch"]
    assert cfg.hardware.effective_batch_size is None
    assert [accumulation_steps(cfg, n) for n in (1, 4, 8)] == [want["accumulation"]] * 3
    for key in (
        "max_length",
        "max_prompt_length",
        "warmup_ratio",
        "lr_scheduler_type",
        "eval_steps",
        "logging_steps",
        "seed",
    ):
        assert getattr(cfg, key) == DEFAULTS[key], key  # the guide does not state these
    assert cfg.model.attn_implementation is None


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_training_configs_value_for_value(compose, name):
    want = OFFICIAL[name]
    cfg = to_config(compose(f"experiment={name}"))
    src = the_source(cfg)
    assert cfg.model.path == want["model"]
    assert (src.path, src.format, src.train_split, src.test_split, src.fraction) == (
        want["data"],
        "messages",
        *want["splits"],
        1.0,
    )
    assert (cfg.beta, cfg.gamma, cfg.gamma_beta_ratio) == (want["beta"], None, want["ratio"])
    assert resolve_gamma(cfg) == (want["beta"] * want["ratio"], want["ratio"])
    assert (cfg.method, cfg.loss_type, cfg.sft_weight, cfg.label_smoothing) == ("simpo", "sigmoid", 0.0, 0.0)
    assert cfg.learning_rate == want["lr"]
    assert (cfg.max_length, cfg.max_prompt_length) == (want["max_length"], want["max_prompt_length"])
    assert (cfg.num_train_epochs, cfg.max_steps, cfg.warmup_ratio, cfg.lr_scheduler_type) == (1, -1, 0.1, "cosine")
    assert (cfg.eval_steps, cfg.logging_steps, cfg.seed) == (400, 5, 42)
    assert (cfg.per_device_train_batch_size, cfg.per_device_eval_batch_size) == (2, 4)
    assert cfg.model.attn_implementation == want["attn"]
    assert cfg.hardware.gradient_checkpointing
    # Global batch 128 on any device count; on the files' 4 GPUs that is their accumulation of 16.
    assert cfg.hardware.effective_batch_size == 128
    assert {n: accumulation_steps(cfg, n) for n in (1, 2, 4, 8)} == {1: 64, 2: 32, 4: 16, 8: 8}
    template = cfg.model.chat_template
    assert template == "auto" if want["template"] == "auto" else "{%" in template


def render(template: str, messages: list[dict], **kw) -> str:
    return (
        jinja2.Environment().from_string(template).render(messages=messages, bos_token="<bos>", eos_token="</s>", **kw)
    )


CHAT = [
    {"role": "system", "content": "Be kind. "},
    {"role": "user", "content": " Hi"},
    {"role": "assistant", "content": "Hello! "},
]


def test_gemma_preset_carries_the_official_chat_template(compose):
    cfg = to_config(compose("experiment=simpo-gemma2-9b-it"))
    # The system text (trimmed) joins the first user turn after a blank line; each turn is trimmed at its
    # ends only; assistant turns are role 'model'.
    assert render(cfg.model.chat_template, CHAT) == (
        "<bos><start_of_turn>user\nBe kind.\n\n Hi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    )
    assert render(cfg.model.chat_template, CHAT[:2], add_generation_prompt=True).endswith(
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    # ... and the command line can still replace it.
    assert to_config(compose("experiment=simpo-gemma2-9b-it", "model.chat_template=auto")).model.chat_template == "auto"


def test_mistral_instruct_preset_carries_the_official_scripts_template(compose):
    cfg = to_config(compose("experiment=simpo-mistral-7b-instruct"))
    assert render(cfg.model.chat_template, CHAT) == "[INST] Be kind.\n\n Hi [/INST] Hello! </s>"


def test_recipe_values_yield_to_the_command_line(compose):
    cfg = to_config(compose("experiment=simpo-llama3-8b-instruct-v2", "beta=5", "hardware.effective_batch_size=64"))
    assert (cfg.beta, cfg.gamma_beta_ratio, accumulation_steps(cfg, 1)) == (5.0, 0.3, 32)


def test_cfg_job_resolve_prints_the_resolved_config(tmp_path):
    """``--cfg job --resolve`` prints the whole config, interpolations resolved, and loads nothing."""
    res = run_module(
        "simpo_exp", "experiment=simpo-llama3-8b-base", "--cfg", "job", "--resolve", cwd=tmp_path, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "${" not in res.stdout and "Traceback" not in res.stderr
    for line in (
        "path: princeton-nlp/Llama-3-Base-8B-SFT",
        "learning_rate: 6.0e-07",
        "max_prompt_length: 1800",
        "effective_batch_size: 128",
        "output_dir: null",
    ):
        assert line in res.stdout.splitlines() or f"  {line}" in res.stdout, line
    assert not (tmp_path / "outputs").exists()  # printing the config starts no run
