"""hardware.fused_layers=liger: Liger-Kernel's Triton kernels in the decoder layers (simpo_exp/fused.py).

The kernels run on a GPU only (their numbers against the plain path: tests/test_gpu.py). Here: which modules
the option patches in each model family of the presets, that the model's own forward and head are left to the
project, what stays changed for the process and how it is put back, and the named errors."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from simpo_exp.config import ConfigError, to_config
from simpo_exp.fused import fuse_layers, kept_modeling_modules

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


@pytest.fixture
def gpu_pretended(monkeypatch):
    monkeypatch.setattr("simpo_exp.model.has_accelerator", lambda: True)


def patched_forwards(model) -> dict[str, str]:
    """Module name -> the qualified name of the forward bound on that module itself (not its class's)."""
    return {name: vars(m)["forward"].__func__.__qualname__ for name, m in model.named_modules() if "forward" in vars(m)}


@pytest.mark.parametrize(
    "config, mlp",
    [
        (LlamaConfig, "LigerSwiGLUMLP"),  # llama3-8b, deepseek-math-7b, the tiny and random presets
        (MistralConfig, "LigerSwiGLUMLP"),  # mistral-7b, zephyr-7b-sft-full
        (Qwen2Config, "LigerSwiGLUMLP"),  # qwen2.5-0.5b-instruct
        (Gemma2Config, "LigerGEGLUMLP"),  # gemma2-9b-it
    ],
)
def test_each_family_gets_its_norms_mlps_and_rotary_embedding_patched(gpu_pretended, config, mlp):
    model = AutoModelForCausalLM.from_config(config(**SMALL))
    family = sys.modules[type(model).__module__]
    rotary = family.apply_rotary_pos_emb
    with kept_modeling_modules():
        fuse_layers(model)
        patched = patched_forwards(model)
        assert family.apply_rotary_pos_emb.__module__ == "liger_kernel.transformers.rope"
    norms = [n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
    mlps = [f"model.layers.{i}.mlp" for i in range(SMALL["num_hidden_layers"])]
    assert norms and all(patched[n] == "LigerRMSNorm.forward" for n in norms)
    assert all(patched[n] == f"{mlp}.forward" for n in mlps)
    assert set(patched) == set(norms) | set(mlps)  # not the model's forward: the head stays the project's
    # what the option replaced for the whole process is back, and a model built afterwards runs on the CPU
    assert family.apply_rotary_pos_emb is rotary
    fresh = AutoModelForCausalLM.from_config(config(**SMALL))
    assert patched_forwards(fresh) == {}
    assert torch.isfinite(fresh(torch.tensor([[1, 2, 3]])).logits).all()


def test_load_model_patches_the_policy_before_its_lora_adapters(compose, gpu_pretended):
    """The wiring in load_model: the option on the tiny preset, with LoRA on top (the adapters wrap the
    projections the patched MLP calls, so they still train)."""
    from simpo_exp.model import load_model, load_tokenizer

    cfg = to_config(compose("hardware=cpu-lora", "hardware.fused_layers=liger"))
    with kept_modeling_modules():
        model = load_model(cfg, load_tokenizer(cfg.model), "sdpa")
    patched = patched_forwards(model)
    assert sum(f == "LigerSwiGLUMLP.forward" for f in patched.values()) == cfg.model.random_init.num_hidden_layers
    mlp = model.get_base_model().model.layers[0].mlp
    assert type(mlp.gate_proj).__module__.startswith("peft.") and "forward" in vars(mlp)


def test_a_cpu_run_is_refused_by_name(compose):
    from simpo_exp.model import load_model, load_tokenizer

    cfg = to_config(compose("hardware=cpu", "hardware.fused_layers=liger"))
    with kept_modeling_modules(), pytest.raises(ConfigError, match=r"hardware.fused_layers='liger'.*need a GPU"):
        load_model(cfg, load_tokenizer(cfg.model), "sdpa")


def test_a_family_without_liger_kernels_is_refused_by_name(gpu_pretended):
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ConfigError, match=r"no kernels for model type 'gpt2'; use hardware.fused_layers=none"):
        fuse_layers(model)


def test_without_liger_the_error_says_how_to_install(gpu_pretended, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)  # as if not installed
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL))
    with pytest.raises(ConfigError, match=r"needs the liger-kernel package: pip install"):
        fuse_layers(model)


@pytest.mark.parametrize(
    "setting, hidden, says",
    [
        ("hardware.fused_head=liger", "liger_kernel", "hardware.fused_head=liger needs the liger-kernel package"),
        ("hardware=cpu-lora", "peft", "hardware.lora=true needs peft: pip install -e '.[peft]'"),
    ],
)
def test_a_missing_extra_is_refused_before_the_data_and_the_model_load(tmp_path, setting, hidden, says):
    """Without liger-kernel, hardware.fused_head=liger stopped the run with a traceback (exit 1), after the data set
    was built and the model loaded; without peft, a LoRA run loaded the model (every rank, under ddp-lora) first."""
    from tests.test_run import simpo

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(f"import sys\nsys.modules[{hidden!r}] = None\n")
    path = os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])
    run = tmp_path / "run"
    res = simpo(setting, "logger=none", "max_steps=1", f"hydra.run.dir={run}", cwd=tmp_path, env={"PYTHONPATH": path})
    assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "example pair" not in res.stderr + (run / "__main__.log").read_text()  # no data set built, no model


def test_unknown_choice_and_generation_settings(compose):
    from simpo_exp.config import validate
    from simpo_exp.evaluate.runs import for_inference

    with pytest.raises(ConfigError, match=r"hardware.fused_layers.*'triton'"):
        to_config(compose("hardware.fused_layers=triton"))
    # the evaluate stage generates from a trained run's config, perhaps on a CPU: without the training kernels
    cfg = to_config(compose("hardware=gpu", "hardware.fused_layers=liger"))
    assert validate(for_inference(cfg, "cpu")).hardware.fused_layers == "none"


def test_a_family_first_loaded_inside_the_block_is_put_back_too():
    """In a fresh process (a benchmark's shared worker) the model family's module may load only when the first
    model is built, inside the block: what was patched there is put back all the same."""
    code = """
import os
import subprocess
import sys
import simpo_exp.model
from simpo_exp.fused import fuse_layers, kept_modeling_modules
simpo_exp.model.has_accelerator = lambda: True
assert 'transformers.models.mistral.modeling_mistral' not in sys.modules
with kept_modeling_modules():
    from transformers import MistralConfig, MistralForCausalLM
    from transformers.models.mistral import modeling_mistral
    rotary = modeling_mistral.apply_rotary_pos_emb
    fuse_layers(MistralForCausalLM(MistralConfig(%r)))
    assert modeling_mistral.apply_rotary_pos_emb is not rotary
assert modeling_mistral.apply_rotary_pos_emb is rotary
print('put back')
""".replace("%r", ", ".join(f"{k}={v}" for k, v in SMALL.items()))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "put back" in res.stdout, res.stderr[-2000:]


def test_a_jobs_fused_layers_do_not_outlive_it_in_the_sweeps_process(gpu_pretended, monkeypatch, tmp_path):
    """A sweep's jobs may run in one process: after a ``hardware.fused_layers=liger`` job, a ``none`` job built
    its model from Liger's classes and ran Liger's rotary embedding while its records said none. The entry point
    now trains each job inside kept_modeling_modules."""
    import simpo_exp.__main__ as entry
    import simpo_exp.train as train_mod

    family = sys.modules[type(AutoModelForCausalLM.from_config(LlamaConfig(**SMALL))).__module__]
    rotary = family.apply_rotary_pos_emb

    ran = []

    def job(config, stop):  # a job whose model the option patched
        fuse_layers(AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)))
        ran.append(family.apply_rotary_pos_emb.__module__)
        return {"eval/rewards/accuracies": 1.0}

    monkeypatch.setattr(train_mod, "train", job)
    monkeypatch.setattr(sys, "argv", ["simpo_exp", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    with kept_modeling_modules():  # this test's own guard: the process as it was, whatever the entry point does
        entry.main()
        assert ran == ["liger_kernel.transformers.rope"] and family.apply_rotary_pos_emb is rotary
