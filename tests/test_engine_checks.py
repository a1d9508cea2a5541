"""engine.py's and precision.py's set-up choices that no end-to-end run pins (tests from a mutation review)"""

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from simpo_exp.config import ConfigError, to_config
from tests.conftest import ROOT


@pytest.fixture
def fake_engine(monkeypatch, fresh_state):
    """Swap accelerate's Accelerator for a stand-in of the given engine: what make_accelerator reads of one, for the
    engines (several processes, FSDP, DeepSpeed) this one-process CPU box cannot start. Returns the setter; each
    stand-in built is appended to the list it returns."""
    import accelerate

    built = []

    def use(kind, num_processes=1, state=None):
        def build(**kwargs):
            accelerator = SimpleNamespace(
                asked=kwargs,
                distributed_type=kind,
                num_processes=num_processes,
                device=torch.device("cpu"),
                mixed_precision=kwargs["mixed_precision"],
                state=state() if callable(state) else state,
            )
            built.append(accelerator)
            return accelerator

        monkeypatch.setattr(accelerate, "Accelerator", build)
        return built

    return use


def test_adamw_steps_with_the_configured_betas_epsilon_and_rate(compose):
    """AdamW's betas and epsilon come from adam_beta1, adam_beta2 and adam_epsilon: swapped or left at torch's
    defaults, a run set up as the SimPO paper's (or a sweep over them) would train with other moments than it
    records, in both weight-decay groups."""
    from simpo_exp.engine import adamw

    cfg = to_config(compose("adam_beta1=0.8", "adam_beta2=0.95", "adam_epsilon=1e-7", "weight_decay=0.1"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = adamw(model, cfg, 3e-4, fused=None)
    assert len(optimizer.param_groups) == 2  # decayed weights; biases and norm weights
    for group in optimizer.param_groups:
        assert (group["betas"], group["eps"], group["lr"]) == ((0.8, 0.95), 1e-7, 3e-4)


def test_the_accumulation_counts_every_process_of_the_launch(compose, monkeypatch, fake_engine):
    """hardware.effective_batch_size is the global batch: over WORLD_SIZE=2 processes of 2 pairs each it takes 2
    micro-batches a step. Counted for one process, each step would train on twice the batch asked for."""
    from accelerate.utils import DistributedType

    from simpo_exp.engine import make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    fake_engine(DistributedType.NO, num_processes=2)
    cfg = to_config(compose("hardware=cpu", "hardware.effective_batch_size=8", "per_device_train_batch_size=2"))
    assert make_accelerator(cfg)[1] == 2


def test_the_accelerators_loader_reshuffles_each_epoch_from_the_seed(compose, fresh_state):
    """accelerate's seedable sampler draws epoch e's order from (seed, e) alone: a run resumed at epoch 1 sees the
    order the unstopped run saw there. Without it, the order was the generator's next draw, so a resumed run
    trained on other batches than the run it continues."""
    from torch.utils.data import DataLoader

    from simpo_exp.engine import make_accelerator

    accelerator, _ = make_accelerator(to_config(compose("hardware=cpu")))
    assert accelerator.dataloader_config.use_seedable_sampler is True

    def loader():
        data = DataLoader(range(16), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
        return accelerator.prepare(data)

    def epoch_order(prepared, epoch):
        prepared.set_epoch(epoch)
        return [int(i) for batch in prepared for i in batch]

    unstopped = loader()
    epoch_order(unstopped, 0)
    assert epoch_order(unstopped, 1) == epoch_order(loader(), 1)  # the resumed run's first epoch is 1


def test_deepspeed_clips_at_max_grad_norm_and_refuses_another_accumulation(compose, monkeypatch, fake_engine):
    """DeepSpeed's engine clips (accelerator.clip_grad_norm_ does nothing there): its config's "auto" clipping
    must become max_grad_norm, or it clipped at accelerate's 1.0 while the run recorded 0.3. And a launcher's
    --gradient_accumulation_steps 4 against a run that accumulates 2 made the engine update on its own count while
    the loop scheduled and logged steps by the run's: refused."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from simpo_exp.engine import make_accelerator

    ds_json = str(ROOT / "launchers" / "ds_zero2.json")
    plugin = lambda: DeepSpeedPlugin(hf_ds_config=ds_json)  # noqa: E731  (built when accelerate would: after the env)
    built = fake_engine(DistributedType.DEEPSPEED, state=lambda: SimpleNamespace(deepspeed_plugin=plugin()))
    cfg = to_config(compose("hardware=cpu", "max_grad_norm=0.3", "gradient_accumulation_steps=2"))
    make_accelerator(cfg)
    assert built[-1].state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.3
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # as accelerate launch's flag passes it
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4, but this run accumulates 2"):
        make_accelerator(cfg)


def test_a_launchers_bf16_is_said_unused_by_a_float32_run(compose, monkeypatch, caplog, fresh_state):
    """``accelerate launch --mixed_precision bf16`` on a run whose hardware.mixed_precision is "no" trains in
    float32 (accelerate takes the script's value): the user who asked the launcher for bf16 must be told."""
    from simpo_exp.engine import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level(logging.WARNING, logger="simpo_exp.engine"):
        accelerator, _ = make_accelerator(to_config(compose("hardware=cpu")))
    assert accelerator.mixed_precision == "no"
    assert "mixed_precision=bf16 (its --mixed_precision or config file) is not used" in caplog.text
    assert "set hardware.mixed_precision=bf16 to train in bf16" in caplog.text


def test_an_fsdp_accelerator_gets_its_outputs_kept(compose, monkeypatch, fake_engine):
    """keep_fsdp_outputs stops FSDP2's bf16 policy from rounding ResponseLogps' float32 log-prob sums to bf16 (steps
    of 2 nats): make_accelerator must apply it to the run's accelerator, or every FSDP run's losses and margins are
    quantised."""
    from accelerate.utils import DistributedType

    from simpo_exp import engine

    kept, buffers = [], []
    monkeypatch.setattr(engine, "keep_fsdp_outputs", kept.append)
    monkeypatch.setattr(engine, "keep_fsdp1_buffers", buffers.append)  # FSDP1's RoPE frequencies kept float32
    built = fake_engine(DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    accelerator, _ = engine.make_accelerator(to_config(compose("hardware=cpu")))
    assert kept == buffers == [accelerator] and accelerator is built[-1]


def test_a_launchers_relative_deepspeed_config_is_found_from_another_directory(
    compose, monkeypatch, tmp_path, fresh_state
):
    """launchers/zero3.yaml names its JSON relative to the repository (deepspeed_config_file:
    launchers/ds_zero3.json); launched from any other directory, accelerate refused it as missing. make_accelerator
    points the launcher's variable at the project's file."""
    from simpo_exp.engine import PROJECT_DIR, make_accelerator

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launchers/ds_zero3.json")
    make_accelerator(to_config(compose("hardware=cpu")))
    assert (PROJECT_DIR / "launchers" / "ds_zero3.json").is_file()
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(PROJECT_DIR / "launchers" / "ds_zero3.json")


# -------------------------------------------------------------------------- from a second mutation review of engine.py
def test_the_collective_timeout_reaches_the_accelerators_process_group(compose, fake_engine):
    """hardware.collective_timeout is given to the Accelerator's process group: without it gloo waits 1800 s and
    NCCL 600 s whatever the setting says."""
    from datetime import timedelta

    from accelerate.utils import DistributedType

    from simpo_exp.engine import make_accelerator

    built = fake_engine(DistributedType.NO)
    make_accelerator(to_config(compose("hardware=cpu", "hardware.collective_timeout=120")))
    handlers = built[-1].asked["kwargs_handlers"]
    assert [h.timeout for h in handlers if hasattr(h, "timeout")] == [timedelta(seconds=120)]


def test_a_sharded_preset_started_without_its_launcher_is_refused(compose, fake_engine):
    """hardware=fsdp without accelerate launch's FSDP: the run trained unsharded under the preset's name."""
    from accelerate.utils import DistributedType

    from simpo_exp.engine import make_accelerator

    fake_engine(DistributedType.NO)
    with pytest.raises(ConfigError, match="asks for FSDP"):
        make_accelerator(to_config(compose("hardware=fsdp", "hardware.device=cpu")))


def test_no_launcher_precision_is_no_warning(compose, fake_engine, monkeypatch, caplog):
    from accelerate.utils import DistributedType

    from simpo_exp.engine import make_accelerator

    fake_engine(DistributedType.NO)
    for launcher in (None, "no"):
        if launcher is None:
            monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
        else:
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
        with caplog.at_level(logging.WARNING):
            make_accelerator(to_config(compose("hardware=cpu")))
    assert "is not used" not in caplog.text


def test_the_models_attention_setting_is_the_one_checked_on_the_cpu(compose):
    """model.attn_implementation wins over the hardware preset's: flex_attention there fails at the first backward on
    the CPU, so it is refused up front, by its key; the model's sdpa over the preset's flex_attention trains."""
    from simpo_exp.engine import check_cpu_settings

    with pytest.raises(ConfigError, match="model.attn_implementation=flex_attention trains on a GPU only"):
        check_cpu_settings(to_config(compose("model.attn_implementation=flex_attention")))
    cfg = to_config(compose("model.attn_implementation=sdpa"))
    cfg.hardware.attn_implementation = "flex_attention"
    check_cpu_settings(cfg)


def test_a_launchers_smaller_clipping_is_refused_too():
    """--gradient_clipping 0.5 on a run of max_grad_norm=1.0 clipped harder than the run records."""
    from simpo_exp.engine import check_deepspeed_steps

    with pytest.raises(ConfigError, match="gradient_clipping=0.5"):
        check_deepspeed_steps({"gradient_clipping": 0.5}, 1, 1.0)


def test_checkpoints_go_through_the_engine_only_where_it_shards(compose):
    """checkpoint_format=auto: accelerate's save_state for FSDP and DeepSpeed, this project's safetensors for one
    process and DDP; safetensors asked for under a sharded engine is refused."""
    from accelerate.utils import DistributedType

    from simpo_exp.engine import engine_checkpoints

    cfg = to_config(compose())
    kinds = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.FSDP, DistributedType.DEEPSPEED)
    assert [engine_checkpoints(cfg, SimpleNamespace(distributed_type=k)) for k in kinds] == [False, False, True, True]
    cfg.hardware.checkpoint_format = "accelerate"
    assert engine_checkpoints(cfg, SimpleNamespace(distributed_type=DistributedType.NO))
    cfg.hardware.checkpoint_format = "safetensors"
    with pytest.raises(ConfigError, match="use 'accelerate' or 'auto'"):
        engine_checkpoints(cfg, SimpleNamespace(distributed_type=DistributedType.FSDP))


def test_a_deepspeed_preset_without_a_launcher_builds_its_own_plugin(compose, monkeypatch, fake_engine, tmp_path):
    """``python -m simpo_exp hardware=zero3`` (no accelerate launch) builds the preset's DeepSpeed plugin itself, one
    process; under accelerate launch (ACCELERATE_USE_DEEPSPEED=true) the launcher's runs and none is built here. The
    preset's file is the user's own where it is found from the working directory, else the project's; a missing one
    is named."""
    import json
    import shutil

    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from simpo_exp.engine import deepspeed_config_path, make_accelerator

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the one-process launcher variables it sets go with it
    for key in ("ACCELERATE_USE_DEEPSPEED", "LOCAL_RANK", "RANK", "WORLD_SIZE"):
        os.environ.pop(key, None)
    overrides = ("hardware=zero3", "hardware.device=cpu", "hardware.mixed_precision=no", "max_grad_norm=0.3")
    cfg = to_config(compose(*overrides))
    plugin = lambda: DeepSpeedPlugin(hf_ds_config=str(ROOT / "launchers" / "ds_zero3.json"))  # noqa: E731
    built = fake_engine(DistributedType.DEEPSPEED, state=lambda: SimpleNamespace(deepspeed_plugin=plugin()))
    make_accelerator(cfg)
    assert built[-1].asked["deepspeed_plugin"].zero_stage == 3 and os.environ["WORLD_SIZE"] == "1"
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    make_accelerator(cfg)
    assert built[-1].asked["deepspeed_plugin"] is None
    # a user's own edited copy where the run starts is theirs; a file found nowhere is named
    (tmp_path / "launchers").mkdir()
    shutil.copy(ROOT / "launchers" / "ds_zero3.json", tmp_path / "launchers" / "ds_zero3.json")
    monkeypatch.chdir(tmp_path)
    assert deepspeed_config_path("launchers/ds_zero3.json") == Path("launchers/ds_zero3.json")
    assert deepspeed_config_path("launchers/ds_zero2.json") == ROOT / "launchers" / "ds_zero2.json"
    with pytest.raises(ConfigError, match="hardware.deepspeed_config='nope.json': no such file"):
        deepspeed_config_path("nope.json")
    assert json.loads(Path("launchers/ds_zero3.json").read_text())["zero_optimization"]["stage"] == 3


def test_a_users_own_deepspeed_preset_is_checked_against_the_launcher(monkeypatch):
    """A preset of the user's own name that sets hardware.deepspeed_config is a DeepSpeed preset (not only the
    shipped zero*): started without DeepSpeed, or under a launcher that offloads other than it asks, it is refused."""
    import json

    from accelerate.utils import DistributedType

    from simpo_exp.engine import check_engine

    mine = SimpleNamespace(name="mine", deepspeed_config="launchers/ds_zero3.json")
    with pytest.raises(ConfigError, match="hardware=mine asks for DEEPSPEED, but accelerate set up NO"):
        check_engine(mine, DistributedType.NO)
    offload = SimpleNamespace(name="zero3-offload", deepspeed_config="launchers/ds_zero3_offload.json")
    running = json.loads((ROOT / "launchers" / "ds_zero3_offload.json").read_text())
    del running["zero_optimization"]["offload_param"]  # the optimizer offloaded, the weights not
    with pytest.raises(ConfigError, match="'offload_param': 'cpu'.*runs .*'offload_param': 'none'"):
        check_engine(offload, DistributedType.DEEPSPEED, running)


def test_ddp_keeps_its_gradients_in_its_all_reduce_buckets(compose, fake_engine):
    """accelerate's DDP default (gradient_as_bucket_view=False) keeps each gradient twice on every GPU, once as the
    gradient and once in the reducer's all-reduce bucket: 13.5 GiB more for a 7B model's bf16 gradients, which the
    memory check (weights + gradients + AdamW) did not count. The run asks for the gradients as views of the
    buckets, one copy (tests/test_scale.py's two-process runs match one process with it)."""
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    from simpo_exp.engine import make_accelerator

    built = fake_engine(DistributedType.MULTI_GPU, num_processes=1)
    make_accelerator(to_config(compose("hardware=cpu")))
    (ddp,) = [k for k in built[-1].asked["kwargs_handlers"] if isinstance(k, DistributedDataParallelKwargs)]
    assert ddp.to_kwargs() == {"gradient_as_bucket_view": True}
