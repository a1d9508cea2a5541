"""The trained state's device memory (simpo_exp/memory.py): the per-engine rules by hand, the single-device
figures against what AdamW really allocates, and the set-up check that refuses a run that cannot fit."""

import pytest
import torch

from simpo_exp import memory
from simpo_exp.errors import OutOfMemoryError, out_of_memory
from simpo_exp.memory import Engine, check_fits, state_bytes
from tests.test_perf_paths import make_model
from tests.test_reliability import _tiny_config


def test_full_fine_tuning_takes_sixteen_bytes_per_float32_parameter_and_shards_by_engine():
    model = make_model()
    p = sum(x.numel() for x in model.parameters())
    assert state_bytes(model, Engine())["total"] == 16 * p  # 4 weight + 4 gradient + 8 AdamW moments
    assert state_bytes(model, Engine("fsdp", 4)) == {
        "weights": 4 * p // 4,
        "gradients": 4 * p // 4,
        "optimizer": 8 * p // 4,
        "total": 4 * p // 4 + 4 * p // 4 + 8 * p // 4,
    }
    assert state_bytes(model, Engine("fsdp", 4, offload_optimizer=True, offload_params=True))["total"] == 0
    # DeepSpeed: bf16 weights and gradients, float32 master + moments (12 bytes), sharded by stage, and the step's
    # float32 gradient partition (4 bytes; it was left out: ZeRO-2 came to 2 + 14/N bytes a parameter where
    # DeepSpeed's own estimate_zero2_model_states_mem_needs says 2 + 18/N, and runs it refuses were let through)
    zero = {stage: state_bytes(model, Engine("deepspeed", 8, stage)) for stage in (1, 2, 3)}
    assert zero[1]["total"] == 2 * p + 2 * p + 4 * (p // 8) + 12 * p // 8
    assert zero[2] == {"weights": 2 * p, "gradients": 2 * p // 8 + 4 * (p // 8), "optimizer": 12 * p // 8} | {
        "total": 2 * p + 2 * p // 8 + 4 * (p // 8) + 12 * p // 8
    }
    assert zero[3]["total"] == 2 * p // 8 + 2 * p // 8 + 4 * (p // 8) + 12 * p // 8
    # ZeRO-3 steps its partition a sub-group at a time: one sub-group's float32 gradients at once
    grouped = state_bytes(model, Engine("deepspeed", 8, 3, sub_group_size=100))
    assert grouped["gradients"] == 2 * p // 8 + 4 * 100 and p // 8 > 100
    assert state_bytes(model, Engine("deepspeed", 1, 0))["gradients"] == 2 * p + 4 * p  # no ZeRO: the whole model's
    offload = state_bytes(model, Engine("deepspeed", 8, 3, offload_optimizer=True, offload_params=True))
    # ZeRO-Offload keeps the gradient partitions in CPU RAM with the optimizer (zero3-offload was charged 2 bytes a
    # parameter on the GPU, and a 14B model that fits a 24 GB card under it was refused)
    assert offload == {"weights": 0, "gradients": 0, "optimizer": 0, "total": 0}
    optimizer_only = state_bytes(model, Engine("deepspeed", 8, 2, offload_optimizer=True))
    assert optimizer_only == {"weights": 2 * p, "gradients": 0, "optimizer": 0, "total": 2 * p}
    # DeepSpeed without bf16/fp16: float32 weights are their own master copy; the same total
    assert state_bytes(model, Engine("deepspeed", 8, 3, half_precision=False)) == {
        "weights": 4 * p // 8,
        "gradients": 4 * p // 8,
        "optimizer": 8 * p // 8,
        "total": 16 * p // 8,
    }


def test_a_live_reference_adds_a_frozen_copy_sharded_only_by_fsdp2():
    model = make_model()
    p = sum(x.numel() for x in model.parameters())
    alone = state_bytes(model, Engine(), live_reference=True)
    assert (alone["reference"], alone["total"]) == (4 * p, 20 * p)  # 16 bytes of trained state + a float32 copy
    assert state_bytes(model, Engine("fsdp", 4), live_reference=True)["reference"] == 4 * p // 4
    assert state_bytes(model, Engine("fsdp", 4, fsdp_version=1), live_reference=True)["reference"] == 4 * p
    # FSDP1 under bf16: the copy is cast to its param_dtype before it goes to the device (2 bytes a parameter)
    fsdp1 = Engine("fsdp", 4, fsdp_version=1, reference_bytes=2)
    assert state_bytes(model, fsdp1, live_reference=True)["reference"] == 2 * p
    assert "reference" not in state_bytes(model, Engine())  # reference_mode=cached keeps no copy
    fits = state_bytes(model, Engine())["total"]  # the trained state fits; with the copy it does not
    assert check_fits(model, Engine(), fits, "hardware=gpu on cuda:0")["total"] == fits
    with pytest.raises(OutOfMemoryError) as err:
        check_fits(model, Engine(), fits, "hardware=gpu on cuda:0", live_reference=True)
    assert "optimizer state and live reference alone take" in str(err.value)
    assert "reference_mode=cached" in str(err.value)


def test_a_frozen_bf16_base_counts_its_weights_only():
    model = make_model().to(torch.bfloat16)
    params = list(model.parameters())
    for x in params[1:]:
        x.requires_grad_(False)
    p, t = sum(x.numel() for x in params), params[0].numel()
    assert state_bytes(model, Engine()) == {
        "weights": 2 * p,
        "gradients": 2 * t,
        "optimizer": 4 * t,
        "total": 2 * p + 6 * t,
    }


def test_the_single_device_figures_are_what_adamw_allocates():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (2, 12)), labels=torch.randint(0, 64, (2, 12))).loss.backward()
    optimizer.step()
    grads = sum(x.grad.numel() * x.grad.element_size() for x in model.parameters())
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    need = state_bytes(model, Engine())
    assert (need["gradients"], need["optimizer"]) == (grads, moments)


def test_a_state_larger_than_the_device_is_refused_with_the_presets_that_fit():
    model = make_model()
    need = state_bytes(model, Engine())["total"]
    assert check_fits(model, Engine(), need, "hardware=gpu on cuda:0") == state_bytes(model, Engine())
    with pytest.raises(OutOfMemoryError) as err:
        check_fits(model, Engine(), need // 3, "hardware=gpu on cuda:0")
    message = str(err.value)
    assert "cannot be trained under hardware=gpu on cuda:0" in message
    assert "hardware=gpu-lora" in message and "hardware=zero3-offload" in message
    # 16 bytes per parameter over n processes must fit 80% of a device of a third of it: n = 4
    assert "hardware=fsdp or zero3 over at least 4 such GPUs" in message
    assert "hardware.check_memory=false" in message
    for x in list(model.parameters())[1:]:  # already LoRA-like: not offered again
        x.requires_grad_(False)
    with pytest.raises(OutOfMemoryError) as err:
        check_fits(model, Engine(), 100, "hardware=gpu-lora on cuda:0")
    assert "hardware=gpu-lora (" not in str(err.value) and "zero3-offload" in str(err.value)


def test_the_advice_for_ddp_zero2_and_a_16_bit_model_names_what_fits():
    """DDP on 8 GPUs was told hardware=gpu-lora and zero3-offload alone, not full sharding on the same 8 GPUs
    (offered only where more GPUs were needed); a model still in bf16 (loaded for DeepSpeed's float32 master copy,
    or under master_weights=model) was priced at 8 bytes a parameter under FSDP, half the GPUs it needs: that
    advice followed was refused again. And zero3-offload says how much CPU RAM it takes."""
    model = make_model()
    params = sum(x.numel() for x in model.parameters())
    need = state_bytes(model, Engine("single", 8))["total"]  # 16 bytes a parameter on each of the 8
    with pytest.raises(OutOfMemoryError) as err:
        check_fits(model, Engine("single", 8), need // 3, "hardware=ddp on cuda:0")
    message = str(err.value)
    assert "hardware=ddp-lora" in message and "hardware=gpu-lora" not in message
    assert "hardware=fsdp or zero3 on these 8 GPUs" in message and "it needs 4 or more" in message
    # zero3-offload's CPU RAM a node, as DeepSpeed's own estimate gives it (18 bytes a parameter x its 1.5 buffer)
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu_ram, _, _ = estimate_zero3_model_states_mem_needs(params, 0, num_gpus_per_node=8)
    assert f"about {memory.gib(cpu_ram)} of it a node" in message
    with pytest.raises(OutOfMemoryError) as err:  # ZeRO-3 already: no full-sharding advice on the same GPUs
        check_fits(model, Engine("deepspeed", 8, zero_stage=3), 100, "hardware=zero3 on cuda:0")
    assert "on these 8 GPUs" not in str(err.value)
    with pytest.raises(OutOfMemoryError) as err:  # DDP on exactly as many GPUs as full sharding needs: these
        check_fits(model, Engine("single", 4), need // 3, "hardware=ddp on cuda:0")
    assert "hardware=fsdp or zero3 on these 4 GPUs" in str(err.value) and "over at least" not in str(err.value)
    half = make_model().to(torch.bfloat16)  # as loaded for DeepSpeed under bf16: trained from float32 masters
    capacity = state_bytes(model, Engine())["total"] // 3
    with pytest.raises(OutOfMemoryError) as err:
        check_fits(half, Engine("deepspeed", 1, zero_stage=3, half_precision=True), capacity, "hardware=zero3")
    assert "over at least 4 such GPUs" in str(err.value)  # as for the float32 model, not 2
    assert memory.sharded_fit(half, int(0.8 * capacity)) == memory.sharded_fit(model, int(0.8 * capacity)) == 4


def test_the_set_up_check_counts_a_live_reference_copy(monkeypatch):
    """reference_mode=live keeps a frozen copy of the model on the device: a run whose trained state fits but not
    with that copy passed the set-up check and ran out of memory at its first step."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    model = make_model()
    monkeypatch.setattr(memory, "device_capacity", lambda device: state_bytes(model, Engine())["total"])
    accelerator = SimpleNamespace(
        device=torch.device("cuda", 0), num_processes=1, distributed_type=DistributedType.NO, state=SimpleNamespace()
    )
    hardware = SimpleNamespace(check_memory=True, name="gpu")
    assert "reference" not in memory.check_device_memory(model, accelerator, hardware)
    with pytest.raises(OutOfMemoryError, match="reference_mode=cached"):
        memory.check_device_memory(model, accelerator, hardware, live_reference=True)


def test_set_up_refuses_the_run_before_training(compose, tmp_path, monkeypatch):
    from simpo_exp.train import train

    monkeypatch.setattr(memory, "device_capacity", lambda device: 10_000)  # a device of 10 kB
    with pytest.raises(OutOfMemoryError, match="cannot be trained under hardware=cpu on cpu"):
        train(_tiny_config(compose, tmp_path, "hardware=cpu", "max_steps=1"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused at set-up, no step taken
    # the refusal names hardware.check_memory=false for a run the user knows fits: it trains
    train(_tiny_config(compose, tmp_path, "hardware=cpu", "max_steps=1", "hardware.check_memory=false"))
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_engine_is_read_from_the_launchers_configs():
    import json
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffload, CPUOffloadPolicy, OffloadPolicy

    from tests.conftest import ROOT

    def accelerator(kind, mixed_precision="bf16", **state):
        state = SimpleNamespace(**state)
        return SimpleNamespace(distributed_type=kind, num_processes=8, mixed_precision=mixed_precision, state=state)

    def deepspeed(name, mixed_precision="bf16"):
        config = json.loads((ROOT / "launchers" / name).read_text())
        plugin = SimpleNamespace(zero_stage=config["zero_optimization"]["stage"], deepspeed_config=config)
        return Engine.of(accelerator(DistributedType.DEEPSPEED, mixed_precision, deepspeed_plugin=plugin))

    assert deepspeed("ds_zero2.json") == Engine("deepspeed", 8, 2)
    assert deepspeed("ds_zero3.json") == Engine("deepspeed", 8, 3)
    assert deepspeed("ds_zero3.json", "no") == Engine("deepspeed", 8, 3, half_precision=False)
    assert deepspeed("ds_zero2.json", "fp16") == Engine("deepspeed", 8, 2)  # fp16 halves the working weights too
    assert deepspeed("ds_zero3_offload.json") == Engine("deepspeed", 8, 3, offload_optimizer=True, offload_params=True)
    nvme = json.loads((ROOT / "launchers" / "ds_zero3_offload.json").read_text())
    for key in ("offload_optimizer", "offload_param"):  # ZeRO-Infinity: off the GPU as CPU offload is
        nvme["zero_optimization"][key]["device"] = "nvme"
    plugin = SimpleNamespace(zero_stage=3, deepspeed_config=nvme)
    offloaded = Engine.of(accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin))
    assert offloaded == Engine("deepspeed", 8, 3, offload_optimizer=True, offload_params=True)
    config = json.loads((ROOT / "launchers" / "ds_zero3.json").read_text())
    config["zero_optimization"]["sub_group_size"] = 5e8  # a user's own: as DeepSpeed reads it
    plugin = SimpleNamespace(zero_stage=3, deepspeed_config=config)
    ds = Engine.of(accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin))
    assert ds == Engine("deepspeed", 8, 3, sub_group_size=500_000_000)
    for offload, offloads, version in [
        (CPUOffload(False), False, 1),
        (CPUOffload(True), True, 1),
        (OffloadPolicy(), False, 2),
    ]:
        fsdp = SimpleNamespace(cpu_offload=offload, fsdp_version=version)  # FSDP1's CPUOffload, FSDP2's OffloadPolicy
        assert Engine.of(accelerator(DistributedType.FSDP, fsdp_plugin=fsdp)) == Engine(
            "fsdp", 8, 0, offloads, offloads, fsdp_version=version
        )
    fsdp = SimpleNamespace(cpu_offload=CPUOffloadPolicy(), fsdp_version=2)
    assert Engine.of(accelerator(DistributedType.FSDP, fsdp_plugin=fsdp)).offload_params
    assert Engine.of(accelerator(DistributedType.MULTI_GPU)) == Engine("single", 8)


def test_a_step_out_of_memory_names_the_knobs():
    err = out_of_memory("the training step", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    message = str(err)
    assert "during the training step (CUDA out of memory. Tried to allocate 2.00 GiB)" in message
    for knob in (
        "per_device_train_batch_size",
        "hardware.effective_batch_size",
        "max_length",
        "hardware.gradient_checkpointing=true",
        "hardware.checkpoint_every_n_layers=1",
        "hardware.checkpoint_offload=true",
        "hardware.logps_chunk_size",
        "hardware=fsdp/zero3",
    ):
        assert knob in message, knob


@pytest.mark.parametrize(
    "version, strategy, local, shard_over, gathered",
    [
        (1, "FULL_SHARD", None, 0, False),
        (1, "SHARD_GRAD_OP", None, 0, True),  # the weights stay gathered from each forward to its backward
        (1, "NO_SHARD", None, 1, False),  # DDP's memory: every process holds it all
        (1, "HYBRID_SHARD", "8", 8, False),  # sharded within a node, replicated across the two
        (1, "_HYBRID_SHARD_ZERO2", "8", 8, True),
        (2, "true", None, 0, False),
        (2, "false", None, 0, True),
    ],
)
def test_the_fsdp_strategy_decides_what_a_device_holds(monkeypatch, version, strategy, local, shard_over, gathered):
    """Every FSDP run was priced as fully sharded over all N processes: FSDP1's NO_SHARD (the whole state on each
    GPU, 120 GiB for an 8B model, not 7.5), HYBRID_SHARD over two nodes (sharded over a node's 8, not 16), and the
    weights SHARD_GRAD_OP or FSDP2's reshard_after_forward=False keep gathered in each step (a 32B model on 8x80 GB
    priced at 61 GiB needed about 122) passed the check and ran out of memory. The plugin accelerate builds from the
    launcher's settings is read; FSDP1's live reference is counted in its param_dtype."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    monkeypatch.setenv("LOCAL_WORLD_SIZE", local or "16")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=version, reshard_after_forward=strategy)
    plugin.set_mixed_precision("bf16")
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.FSDP, num_processes=16, mixed_precision="bf16",
        state=SimpleNamespace(fsdp_plugin=plugin),
    )  # fmt: skip
    engine = Engine.of(accelerator)
    assert (engine.shard_over, engine.gathered_bytes > 0) == (shard_over, gathered)
    assert engine.reference_bytes == (2 if version == 1 else 0)
    model = make_model()
    p = sum(x.numel() for x in model.parameters())
    need = state_bytes(model, engine, live_reference=True)
    assert need["weights"] == 4 * p // (shard_over or 16)  # float32 (as FSDP trains them), over the shards
    assert need.get("gathered weights", 0) == (2 * p if gathered else 0)  # bf16, whole
    assert need["reference"] == (2 * p if version == 1 else 4 * p // 16)
