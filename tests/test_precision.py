"""No update may vanish: with bf16 model weights and the default precision, training moves the weights as
an fp32 run does; pure bf16 (asked for explicitly) loses most of a SimPO-size update, and says so."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from simpo_exp.config import ConfigError, to_config
from tests.conftest import fsdp_on_cpu
from tests.test_run import simpo

# SimPO-size updates: a constant 1e-6 for 12 steps of 4 pairs (the issue measured 30 of 8; 12 already move ~5% of the
# elements in bf16 terms, and pure bf16 keeps under 2% of the fp32 run's change)
RUN = [
    "learning_rate=1e-6",
    "lr_scheduler_type=constant",
    "warmup_ratio=0",
    "max_steps=12",
    "logger=none",
    "hardware=cpu",
    "eval_on_start=false",
    "eval_steps=0",
    "save_steps=0",
    "num_generations=0",
    "logging_steps=4",
    "per_device_train_batch_size=4",
    "dataset.synthetic.num_train=256",
    "dataset.synthetic.num_test=16",
]
SHAPE = ["model.random_init.num_hidden_layers=2"]  # of the saved start; the runs read it from model.path


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory):
    """The tiny model's initial weights saved in bf16, so every run below starts from the same values."""
    from hydra import compose, initialize_config_dir

    from simpo_exp.model import load_model, load_tokenizer
    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["output_dir=/tmp/unused", *RUN, *SHAPE]))
    tok = load_tokenizer(cfg.model)
    path = tmp_path_factory.mktemp("start") / "tiny-bf16"
    load_model(cfg, tok, "sdpa").to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(start_dir, tmp_path_factory):
    out = {}
    for name, extra in {
        "fp32": ["model.dtype=float32"],
        "default": ["model.dtype=bfloat16"],
        "pure": ["model.dtype=bfloat16", "hardware.master_weights=model"],
        "saved_bf16": ["model.dtype=bfloat16", "save_dtype=bfloat16"],  # trained as "default", saved rounded
    }.items():
        run_dir = tmp_path_factory.mktemp(name) / "run"
        res = simpo(*RUN, f"model.path={start_dir}", *extra, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = (run_dir, res.stdout + res.stderr)  # Hydra logs to stdout
    return out


def change(start_dir, run_dir) -> tuple[float, float]:
    """(share of weight elements that differ in bf16, summed absolute change) between start and end."""
    before, after = load_file(start_dir / "model.safetensors"), load_file(run_dir / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = total = moved = 0.0
    for k, w0 in before.items():
        w1 = after[k]
        changed += (w1.to(torch.bfloat16) != w0.to(torch.bfloat16)).sum().item()
        total += w0.numel()
        moved += (w1.double() - w0.double()).abs().sum().item()
    return changed / total, moved


def test_default_precision_keeps_every_update(start_dir, runs):
    share_fp32, moved_fp32 = change(start_dir, runs["fp32"][0])
    share, moved = change(start_dir, runs["default"][0])
    _, moved_pure = change(start_dir, runs["pure"][0])
    print(
        f"\nelements changed (in bf16) / total |dw|: fp32 run {share_fp32:.1%} / {moved_fp32:.4g}; bf16 weights, "
        f"default precision {share:.1%} / {moved:.4g}; pure bf16 total |dw| {moved_pure:.4g}"
    )
    assert share_fp32 > 0.01 and moved_fp32 > 0  # the fp32 run measurably moved its weights
    assert share == pytest.approx(share_fp32, rel=0.03)
    assert moved == pytest.approx(moved_fp32, rel=0.03)


def test_pure_bf16_loses_the_update_and_warns(start_dir, runs):
    _, moved_fp32 = change(start_dir, runs["fp32"][0])
    _, moved = change(start_dir, runs["pure"][0])
    assert moved < 0.2 * moved_fp32  # most of a 1e-6 update rounds away in bf16
    assert "rounds away" in runs["pure"][1] and "hardware.master_weights=fp32" in runs["pure"][1]
    assert "rounds away" not in runs["default"][1]


def test_save_dtype_rounds_the_float32_master_weights_once_on_writing(start_dir, runs):
    """save_dtype=bfloat16: the run trains as the default one (float32 master weights over a bf16 model) and
    writes its weights rounded to bfloat16, element for element the default run's float32 weights rounded, with
    config.json saying bfloat16; the update survives the one rounding (most of it, unlike pure bf16 training)."""
    from transformers import AutoModelForCausalLM

    kept = load_file(runs["default"][0] / "model" / "model.safetensors")
    saved_dir = runs["saved_bf16"][0] / "model"
    saved = load_file(saved_dir / "model.safetensors")
    assert saved.keys() == kept.keys()
    assert {v.dtype for v in kept.values()} == {torch.float32}
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    for name, weight in kept.items():
        assert torch.equal(saved[name], weight.to(torch.bfloat16)), name
    assert json.loads((saved_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((runs["default"][0] / "model" / "config.json").read_text())["dtype"] == "float32"
    assert AutoModelForCausalLM.from_pretrained(saved_dir, dtype="auto").dtype == torch.bfloat16
    share, _ = change(start_dir, runs["default"][0])
    share_saved, _ = change(start_dir, runs["saved_bf16"][0])
    assert share_saved == share > 0.01  # change() compares in bf16: every element the update moved still differs


def test_save_dtype_keeps_a_tied_head_one_matrix_and_the_model_as_it_was(tmp_path):
    """The cast keeps tied names on one tensor (the head is written once, as without a save_dtype) and leaves
    the model in memory in float32."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_exp.model import save_trained

    arch = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    arch.num_attention_heads, arch.num_key_value_heads, arch.tie_word_embeddings = 4, 4, True
    model = LlamaForCausalLM(arch)
    save_trained(model, tmp_path / "as-trained")
    save_trained(model, tmp_path / "half", dtype="float16")
    names = {}
    for folder in ("as-trained", "half"):
        with safe_open(tmp_path / folder / "model.safetensors", "pt") as f:
            names[folder] = set(f.keys())
    assert names["half"] == names["as-trained"] and "lm_head.weight" not in names["half"]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "half", dtype="auto")
    assert loaded.dtype == torch.float16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.half())


@pytest.mark.parametrize("name, weights, autocast", [("default", "float32", None), ("pure", "bfloat16", None)])
def test_dtypes_recorded(runs, name, weights, autocast):
    run_dir = runs[name][0]
    env = json.loads((run_dir / "env.json").read_text())["precision"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert env == {
        "weights_dtype": weights,
        "master_weights_dtype": weights,
        "optimizer_state_dtype": weights,
        "autocast_dtype": autocast,
    }
    assert {k.removeprefix("precision/"): v for k, v in summary.items() if k.startswith("precision/")} == env


def test_lora_adapters_are_float32_on_a_bf16_base(compose):
    pytest.importorskip("peft")
    from simpo_exp.model import load_model, load_tokenizer

    cfg = to_config(compose("hardware=cpu-lora", "model.dtype=bfloat16", "model.random_init.num_hidden_layers=1"))
    model = load_model(cfg, load_tokenizer(cfg.model), "sdpa")
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}


def test_full_fine_tuning_upcasts_only_when_asked(compose):
    from simpo_exp.model import load_model, load_tokenizer

    cfg = to_config(compose("model.dtype=bfloat16", "model.random_init.num_hidden_layers=1"))
    tok = load_tokenizer(cfg.model)
    assert {p.dtype for p in load_model(cfg, tok, "sdpa").parameters()} == {torch.float32}
    cfg = to_config(
        compose("model.dtype=bfloat16", "hardware.master_weights=model", "model.random_init.num_hidden_layers=1")
    )
    assert {p.dtype for p in load_model(cfg, tok, "sdpa").parameters()} == {torch.bfloat16}


def test_a_model_read_from_disk_is_loaded_in_model_dtype_and_float32_weights_are_saved_as_float32(tmp_path, compose):
    """transformers 5 loads a checkpoint in its saved dtype unless told: model.dtype=bfloat16 on a float32 model/
    (a trained run's) under master_weights=model trained in float32, twice the memory asked for. And weights saved
    float32 from a bf16 working copy (DeepSpeed's master copy) must say float32 in config.json, or a loader taking
    "auto" rounds them back to bf16."""
    import json

    from simpo_exp.model import load_model, load_tokenizer, save_trained
    from tests.tiny import save_tiny_llama

    save_tiny_llama(tmp_path / "start")
    overrides = ("model=qwen2.5-0.5b-instruct", f"model.path={tmp_path / 'start'}", "model.chat_template=zephyr")
    cfg = to_config(compose(*overrides, "model.dtype=bfloat16", "hardware.master_weights=model"))
    model = load_model(cfg, load_tokenizer(cfg.model), "sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    master = {k: v.float() for k, v in model.state_dict().items()}
    save_trained(model, tmp_path / "saved", state_dict=master)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["dtype"] == "float32"


def test_deepspeed_under_bf16_gets_the_weights_as_loaded(compose):
    """DeepSpeed keeps its own float32 master copy under bf16/fp16. Upcast before it, a model built partitioned
    (zero3_init_flag, the offload launcher) left ZeRO-3 computing and gathering in float32."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from simpo_exp.model import load_model, load_tokenizer
    from simpo_exp.precision import engine_keeps_master_copy

    engine = lambda kind, mp: SimpleNamespace(distributed_type=kind, mixed_precision=mp)  # noqa: E731
    assert engine_keeps_master_copy(engine(DistributedType.DEEPSPEED, "bf16"))
    assert not engine_keeps_master_copy(engine(DistributedType.DEEPSPEED, "no"))  # no copy: float32 as loaded
    assert not engine_keeps_master_copy(engine(DistributedType.FSDP, "bf16"))
    assert not engine_keeps_master_copy(engine(DistributedType.NO, "bf16"))
    cfg = to_config(compose("model.dtype=bfloat16", "model.random_init.num_hidden_layers=1"))
    kept = load_model(cfg, load_tokenizer(cfg.model), "sdpa", engine_master_copy=True)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}


def test_master_weights_model_under_deepspeed_is_said_to_change_nothing(caplog):
    """DeepSpeed under bf16 keeps float32 masters whatever hardware.master_weights says: =model was accepted and
    unread without a word (FSDP's same case was said), a sweep over it training one run twice."""
    from simpo_exp.precision import prepare_weights

    layer = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with caplog.at_level("WARNING"):
        assert prepare_weights(layer, "model", lora=False, engine_master_copy=True) is layer
    assert "hardware.master_weights=model under DeepSpeed" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        prepare_weights(layer, "fp32", lora=False, engine_master_copy=True)
    assert "master_weights" not in caplog.text and layer.weight.dtype == torch.bfloat16
    with caplog.at_level("WARNING"):  # LoRA: the adapters are float32 anyway, the base frozen; nothing to say
        prepare_weights(layer, "model", lora=True, engine_master_copy=True)
    assert "master_weights" not in caplog.text


@pytest.mark.parametrize("mixed_precision, working", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_deepspeed_under_16_bits_keeps_the_master_copy_and_the_record_says_so(mixed_precision, working):
    """Under bf16 and fp16 alike DeepSpeed casts the module to that dtype and keeps float32 masters and optimizer
    state: the weights go to it as loaded, are saved from its masters, and env.json records its dtypes (fp16 was
    recorded as the float32 weights it was handed)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from simpo_exp.precision import engine_keeps_master_copy, precision_record

    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, mixed_precision=mixed_precision)
    assert engine_keeps_master_copy(deepspeed)
    record = precision_record(torch.nn.Linear(2, 2).to(torch.bfloat16), deepspeed)  # a preset's bf16 weights
    assert record == {
        "weights_dtype": working,
        "master_weights_dtype": "float32",
        "optimizer_state_dtype": "float32",
        "autocast_dtype": None,  # accelerate runs no autocast under DeepSpeed: the cast weights compute in 16 bits
    }


def test_the_dtype_record_reads_the_weights_that_train():
    """DeepSpeed without mixed precision trains and keeps the weights as they are (float32); a LoRA model on a bf16
    base trains float32 adapters, its base frozen: the record names the trained weights' dtype, not the first
    parameter's."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from simpo_exp.precision import precision_record

    plain = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, mixed_precision="no")
    assert precision_record(torch.nn.Linear(2, 2), plain) == {
        "weights_dtype": "float32",
        "master_weights_dtype": "float32",
        "optimizer_state_dtype": "float32",
        "autocast_dtype": None,
    }
    lora = torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16), torch.nn.Linear(8, 8))
    lora[0].requires_grad_(False)
    record = precision_record(lora, SimpleNamespace(distributed_type=DistributedType.NO, mixed_precision="bf16"))
    assert record == {
        "weights_dtype": "float32",
        "master_weights_dtype": "float32",
        "optimizer_state_dtype": "float32",
        "autocast_dtype": "bfloat16",
    }


class _TiedWithBuffers(torch.nn.Module):
    """A bf16 model as DeepSpeed's engine holds it: a head tied to the embedding, a frozen layer, an integer buffer
    and a bf16 one."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(4, 3).to(torch.bfloat16)
        self.head = torch.nn.Linear(3, 4, bias=False).to(torch.bfloat16)
        self.head.weight = self.embed.weight
        self.frozen = torch.nn.Linear(3, 3).to(torch.bfloat16).requires_grad_(False)
        self.register_buffer("steps", torch.tensor([7]))
        self.register_buffer("scale", torch.tensor([1.5], dtype=torch.bfloat16))


def test_the_engines_state_dict_is_its_float32_masters_gathered_once_on_the_main_process(monkeypatch):
    """What a DeepSpeed run saves: each trained weight's float32 master (fetched once for a tied pair, which stays
    one tensor), each frozen weight (gathered where ZeRO-3 partitioned it) and buffer as held, floating ones in
    float32 and integer ones as they are, on the CPU of the main process; None on the others."""
    import contextlib
    from types import SimpleNamespace

    pytest.importorskip("deepspeed")
    import deepspeed.utils

    from simpo_exp.precision import engine_state_dict

    model = _TiedWithBuffers()
    model.frozen.weight.ds_id = 0  # a ZeRO-3-partitioned frozen weight (a LoRA base)
    master = torch.full((4, 3), 0.1234567)  # float32, between bf16 values
    fetched, gathered = [], []

    def fake_master(t):
        fetched.append(t)
        return master if t is model.embed.weight else None

    @contextlib.contextmanager
    def fake_gather(params):
        gathered.append(list(params))
        yield

    monkeypatch.setattr(deepspeed.utils, "safe_get_full_fp32_param", fake_master)
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", fake_gather)
    engine = SimpleNamespace(module=model)
    acc = lambda main: SimpleNamespace(is_main_process=main, unwrap_model=lambda m: m.module)  # noqa: E731
    out = engine_state_dict(acc(True), engine)
    assert list(out) == list(model.state_dict())  # every key, the tied second name too
    assert sum(t is model.embed.weight for t in fetched) == 1 and out["embed.weight"] is out["head.weight"]
    torch.testing.assert_close(out["embed.weight"], master, rtol=0, atol=0)  # the master, not bf16 upcast
    assert {k: v.dtype for k, v in out.items()} == {
        "embed.weight": torch.float32,
        "head.weight": torch.float32,
        "frozen.weight": torch.float32,
        "frozen.bias": torch.float32,
        "steps": torch.int64,
        "scale": torch.float32,
    }
    assert all(v.device.type == "cpu" for v in out.values())
    assert any(len(p) == 1 and p[0] is model.frozen.weight for p in gathered)  # partitioned: gathered first
    torch.testing.assert_close(out["frozen.weight"], model.frozen.weight.float(), rtol=0, atol=0)
    assert engine_state_dict(acc(False), engine) is None


def test_a_lora_models_trained_dtype_and_rounding_share_ignore_its_frozen_base():
    """A bf16 base with float32 adapters trains float32 weights: its record and the pure-bf16 warning read the
    weights that train (the base's half-ULP at 1e-6 is no update lost). The rounding check counts half a unit in
    the last place: bf16 ones take a step of 5e-3 (half-ULP 3.9e-3), not one of 3e-3."""
    from simpo_exp.precision import trainable_dtype, vanishing_fraction

    model = torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16), torch.nn.Linear(8, 8))
    model[0].requires_grad_(False)
    assert trainable_dtype(model) == torch.float32 and vanishing_fraction(model, 1e-6) == 0.0
    ones = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    torch.nn.init.ones_(ones.weight)
    assert vanishing_fraction(ones, 5e-3) == 0.0 and vanishing_fraction(ones, 3e-3) == 1.0


def test_deepspeed_bf16_over_a_float32_lora_base_is_said(caplog):
    """DeepSpeed casts the whole module to bf16 and keeps masters of the trained weights only: a float32 LoRA base
    trained and was saved as its bf16 rounding (model/adapter on the float32 base, another model), unsaid."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from simpo_exp.precision import warn_if_the_engine_rounds_the_base

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)  # the frozen base
    engine = lambda kind, mp: SimpleNamespace(distributed_type=kind, mixed_precision=mp)  # noqa: E731
    with caplog.at_level("WARNING", logger="simpo_exp.precision"):
        assert warn_if_the_engine_rounds_the_base(engine(DistributedType.DEEPSPEED, "bf16"), model)
    assert "casts the frozen LoRA base (2 float32 tensors) to bf16" in caplog.text
    assert not warn_if_the_engine_rounds_the_base(engine(DistributedType.FSDP, "bf16"), model)  # kept as loaded
    assert not warn_if_the_engine_rounds_the_base(engine(DistributedType.DEEPSPEED, "no"), model)
    model[0].to(torch.bfloat16)
    assert not warn_if_the_engine_rounds_the_base(engine(DistributedType.DEEPSPEED, "bf16"), model)


@pytest.mark.parametrize(
    "mixed_precision, param, reduce", [("bf16", "bfloat16", "bfloat16"), ("no", "float32", "float32")]
)
def test_fsdp_records_the_dtypes_its_policy_computes_and_reduces_in(mixed_precision, param, reduce):
    """FSDP's mixed precision is not an autocast: the gathered weights themselves are cast for the forward, and
    the gradients are reduced in the policy's dtype. The record names both (accelerate's policy for bf16: both
    bfloat16; without one, the float32 weights)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from simpo_exp.precision import precision_record

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    fsdp = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        mixed_precision=mixed_precision,
        state=SimpleNamespace(fsdp_plugin=plugin),
    )
    record = precision_record(torch.nn.Linear(2, 2), fsdp)
    assert record["weights_dtype"] == record["master_weights_dtype"] == "float32"
    assert (record["fsdp_param_dtype"], record["fsdp_reduce_dtype"]) == (param, reduce)
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)  # no reduce_dtype: param_dtype
    assert precision_record(torch.nn.Linear(2, 2), fsdp)["fsdp_reduce_dtype"] == "bfloat16"
    plain = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision=mixed_precision)
    assert "fsdp_param_dtype" not in precision_record(torch.nn.Linear(2, 2), plain)


def test_fsdp_hands_back_the_float32_log_probs_it_computed(tmp_path):
    """accelerate's FSDP2 policy under bf16 casts every module's outputs to bfloat16, the root's too, which is
    ResponseLogps: the summed log-probs of the policy and the live reference came back rounded to bf16 (steps of 2
    nats at |x| = 400; a margin of 0.0086 became 0.0). ``keep_fsdp_outputs`` drops that cast and keeps the weights'
    and gradients' dtypes; sharded under the kept policy (bf16 compute, one CPU process), the sums are float32 and
    equal the float32 model's to bf16 compute's rounding, not to the output's."""
    import copy
    import dataclasses
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import fully_shard

    from simpo_exp.data.collate import PairCollator
    from simpo_exp.engine import keep_fsdp_outputs
    from simpo_exp.logps import ResponseLogps
    from tests.test_perf_paths import make_model, random_pairs

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")  # as AcceleratorState does for mixed_precision=bf16
    # older accelerate releases set output_dtype=bf16 here, 1.16 leaves it None: the cast is put back, so the check
    # below holds for every accelerate a user may have
    if plugin.mixed_precision_policy.output_dtype is None:
        plugin.mixed_precision_policy = dataclasses.replace(plugin.mixed_precision_policy, output_dtype=torch.bfloat16)
    assert plugin.mixed_precision_policy.output_dtype == torch.bfloat16
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    keep_fsdp_outputs(accelerator)
    kept = plugin.mixed_precision_policy
    assert kept.output_dtype is None and kept.param_dtype == kept.reduce_dtype == torch.bfloat16
    if fsdp_on_cpu.args[0]:
        pytest.skip(fsdp_on_cpu.kwargs["reason"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        base = make_model(vocab=4000).eval()
        batch = PairCollator(0)(random_pairs(2, vocab=4000, max_prompt=30, max_response=60))
        policy = ResponseLogps(copy.deepcopy(base))
        for layer in policy.model.model.layers:
            fully_shard(layer, mp_policy=kept)
        fully_shard(policy, mp_policy=kept)
        with torch.no_grad():
            plain, sharded = ResponseLogps(base)(**batch).logp_sums, policy(**batch).logp_sums
    finally:
        dist.destroy_process_group()
    assert sharded.dtype == torch.float32
    assert torch.allclose(sharded, plain, rtol=2e-3, atol=0)  # bf16 compute; a bf16 output misses by up to 4e-3


@fsdp_on_cpu
def test_a_live_reference_under_fsdp1_computes_as_the_fsdp1_policy_does(tmp_path):
    """FSDP1's bf16 policy casts the gathered weights to bf16 for the forward; the live reference, an unwrapped
    float32 copy, had only the autocast: its float32 residual stream put the DPO log-ratios at step 0 off zero by
    0.01-0.08 nats on responses of a few hundred tokens. Cast to the policy's dtypes, it computes exactly what the
    wrapped policy does. accelerate's policy cast the buffers to bf16 as well (RoPE's frequencies: positions up to
    1.9 rad off by 2048 at Llama-3's theta, for policy and reference alike): ``keep_fsdp1_buffers`` keeps them
    float32, exact, in both."""
    import copy
    import functools
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from simpo_exp.data.collate import PairCollator
    from simpo_exp.engine import keep_fsdp1_buffers
    from simpo_exp.logps import ResponseLogps
    from simpo_exp.precision import precision_record
    from simpo_exp.reference import in_the_policys_precision, live_reference
    from tests.test_perf_paths import make_model, random_pairs

    plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
    plugin.set_mixed_precision("bf16")  # as AcceleratorState does for mixed_precision=bf16
    assert plugin.mixed_precision_policy.buffer_dtype == torch.bfloat16  # accelerate's, without buffer_autocast
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        state=SimpleNamespace(fsdp_plugin=plugin),
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        mixed_precision="bf16",
    )
    keep_fsdp1_buffers(accelerator)  # as make_accelerator does
    kept = plugin.mixed_precision_policy
    assert (kept.param_dtype, kept.reduce_dtype, kept.buffer_dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        base = make_model(vocab=4000).eval()
        batch = PairCollator(0)(random_pairs(4, vocab=4000, max_prompt=30, max_response=300))
        reference = live_reference(base)
        policy = FullyShardedDataParallel(
            ResponseLogps(copy.deepcopy(base)),
            mixed_precision=plugin.mixed_precision_policy,
            device_id=torch.device("cpu"),
            auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}),
        )
        in_the_policys_precision(reference, policy, accelerator)
        with torch.no_grad():
            with accelerator.autocast():  # what prepare wraps the policy's forward in
                ratios = policy(**batch).logp_sums.float() - reference(**batch).logp_sums.float()
        frequencies = {n: b.detach().clone() for n, b in policy.named_buffers() if n.endswith("inv_freq")}
    finally:
        dist.destroy_process_group()
    assert ratios.tolist() == [0.0] * 8
    exact = {n: b for n, b in base.named_buffers() if n.endswith("inv_freq")}
    assert frequencies and all(f.dtype == torch.float32 for f in frequencies.values())
    assert all(torch.equal(f, next(iter(exact.values()))) for f in frequencies.values())  # one RoPE, all layers
    assert {b.dtype for b in reference.buffers() if b.is_floating_point()} == {torch.float32}
    record = precision_record(base, accelerator)
    assert (record["fsdp_param_dtype"], record["fsdp_buffer_dtype"]) == ("bfloat16", "float32")


def test_fsdp_under_mixed_precision_trains_float32_whatever_master_weights_says(caplog):
    """accelerate upcasts FSDP's trained weights to float32 before sharding whenever mixed_precision is not "no":
    hardware.master_weights=model changed nothing but the memory check (which counted bf16 bytes, half of what
    trains) and the update-size warning (of rounding that never happens). The run now upcasts them first, saying so."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from simpo_exp.precision import upcast_as_fsdp_does

    def bf16_model():
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
        model[1].requires_grad_(False)  # frozen: FSDP leaves it as it is
        return model

    engine = lambda kind, mp: SimpleNamespace(distributed_type=kind, mixed_precision=mp)  # noqa: E731
    for kind, mp in ((DistributedType.MULTI_GPU, "bf16"), (DistributedType.FSDP, "no")):
        model = bf16_model()
        assert upcast_as_fsdp_does(model, engine(kind, mp)) == 0 and model[0].weight.dtype == torch.bfloat16
    model = bf16_model()
    with caplog.at_level("WARNING", logger="simpo_exp.precision"):
        assert upcast_as_fsdp_does(model, engine(DistributedType.FSDP, "bf16")) == 2
    assert [p.dtype for p in model.parameters()] == [torch.float32] * 2 + [torch.bfloat16] * 2
    assert "hardware.master_weights=model under FSDP with mixed_precision=bf16" in caplog.text
    assert upcast_as_fsdp_does(bf16_model(), engine(DistributedType.FSDP, "fp16")) == 2  # fp16's masters: float32 too
    half = bf16_model().half()  # a float16 model under fp16: upcast as bf16's is
    assert upcast_as_fsdp_does(half, engine(DistributedType.FSDP, "fp16")) == 2
    assert [p.dtype for p in half.parameters()] == [torch.float32] * 2 + [torch.float16] * 2


def test_a_live_reference_under_deepspeed_keeps_the_buffers_the_engine_keeps():
    """DeepSpeed 0.19 casts the policy's parameters to bf16 and keeps its float32 buffers (RoPE's inv_freq); the
    live reference was cast whole, buffers included, so its RoPE ran on bf16 frequencies (zero2 logged rewards off
    zero at step 1 with equal weights). The copy now holds what the engine's policy holds, buffer by buffer."""
    import copy
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from simpo_exp.logps import ResponseLogps
    from simpo_exp.reference import in_the_policys_precision, live_reference
    from tests.test_perf_paths import make_model

    base = make_model(vocab=256).eval()
    reference = live_reference(base)

    class Engine(torch.nn.Module):  # what DeepSpeed's engine holds: its module, parameters cast, buffers kept
        def __init__(self, module):
            super().__init__()
            self.module = module
            for p in module.parameters():
                p.data = p.data.to(torch.bfloat16)

    policy = Engine(ResponseLogps(copy.deepcopy(base)))
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, autocast=torch.autocast)
    in_the_policys_precision(reference, policy, accelerator)
    held = dict(policy.named_buffers())
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    inv_freq = [n for n, b in reference.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(dict(reference.named_buffers())[n].dtype == torch.float32 for n in inv_freq)
    assert {n: b.dtype for n, b in reference.named_buffers()} == {
        n.removeprefix("module."): b.dtype for n, b in held.items()
    }
    # an engine that casts its buffers too (DeepSpeed before 0.19) gets a reference that follows it
    for b in policy.buffers():
        b.data = b.data.to(torch.bfloat16) if b.is_floating_point() else b.data
    follower = live_reference(base)
    in_the_policys_precision(follower, policy, accelerator)
    assert all(dict(follower.named_buffers())[n].dtype == torch.bfloat16 for n in inv_freq)


def test_starting_deepspeed_from_float32_weights_is_warned_of_whatever_model_dtype(tmp_path, compose, caplog):
    """DeepSpeed under bf16 casts the model to bf16 before it builds its float32 masters (ZeRO-3's zero3_init at
    loading already): a second-stage run from a trained float32 model/ lost most of the first stage's update with
    no word, model.dtype=float32 included, and the warning for other runs advised just that setting."""
    import logging

    from simpo_exp.config import to_config
    from simpo_exp.model import load_model, load_tokenizer
    from tests.tiny import save_tiny_llama

    path = tmp_path / "model"
    save_tiny_llama(path)  # float32 weights, as a trained run's model/
    cfg = to_config(compose("model=qwen2.5-0.5b-instruct", f"model.path={path}", "model.dtype=float32"))
    with caplog.at_level(logging.WARNING, logger="simpo_exp.model"):
        load_model(cfg, load_tokenizer(cfg.model), "sdpa")
        assert "holds float32 weights" not in caplog.text  # kept as loaded: nothing lost
        load_model(cfg, load_tokenizer(cfg.model), "sdpa", engine_master_copy=True)
    assert "holds float32 weights" in caplog.text and "hardware=fsdp, gpu" in caplog.text


def test_each_job_of_a_sweep_in_one_process_gets_its_own_precision(compose, fresh_state):
    """Hydra's basic launcher (and torchrun's --multirun) runs a sweep's jobs in one process, and accelerate keeps
    one state per process: ``--multirun hardware.mixed_precision=no,bf16`` crashed its second job ("AcceleratorState
    has already been initialized and cannot be changed"). Each job's accelerator is now set up afresh."""
    from simpo_exp.engine import make_accelerator

    first, _ = make_accelerator(to_config(compose("hardware=cpu")))
    assert first.mixed_precision == "no"
    second, _ = make_accelerator(to_config(compose("hardware=cpu", "hardware.mixed_precision=bf16")))
    assert second.mixed_precision == "bf16" and second.device.type == "cpu"


def test_make_accelerator_refuses_what_a_cpu_would_not_honour_and_a_batch_set_for_another_process_count(
    compose, monkeypatch, fresh_state
):
    """check_cpu_settings was tested alone: without its call, fp16 on the CPU trained in float32 while env.json
    recorded float16 (accelerate takes the request and applies no autocast). And the accumulation comes from
    WORLD_SIZE, which a launcher that does not set it left at 1: every step trained on N times the global batch."""
    import accelerate

    from simpo_exp.engine import make_accelerator

    asked = []  # what accelerate is given: hardware.device=cpu must reach it as cpu=True (a GPU box's GPUs unused)

    class Recording(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            asked.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Recording)
    make_accelerator(to_config(compose("hardware=cpu", "hardware.device=cpu")))
    assert asked[-1]["cpu"] is True
    with pytest.raises(ConfigError, match="hardware.mixed_precision=fp16 on the CPU"):
        make_accelerator(to_config(compose("hardware=cpu", "hardware.mixed_precision=fp16")))
    cfg = to_config(compose("hardware=cpu", "hardware.effective_batch_size=8", "per_device_train_batch_size=2"))
    assert make_accelerator(cfg)[1] == 4
    monkeypatch.setattr(Recording, "num_processes", property(lambda self: 4))
    with pytest.raises(ConfigError, match="set for WORLD_SIZE=1 processes, but accelerate runs 4: each step would"):
        make_accelerator(cfg)


def test_auto_precision_is_bf16_only_on_a_gpu_that_has_it(monkeypatch):
    """``hardware.mixed_precision=auto`` had no test: on a V100 or T4 (no bf16) it must not pick bf16."""
    import types

    import torch

    from simpo_exp import engine

    h = lambda device="auto", precision="auto": types.SimpleNamespace(device=device, mixed_precision=precision)  # noqa: E731
    monkeypatch.setattr(
        "simpo_exp.inference.sampling.pick_device", lambda device: torch.device("cuda" if device != "cpu" else "cpu")
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert engine.resolved_precision(h()) == "no" and engine.resolved_precision(h(precision="fp16")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert engine.resolved_precision(h()) == "bf16" and engine.resolved_precision(h("cpu")) == "no"


def test_a_launchers_precision_that_the_run_does_not_use_is_said(compose, monkeypatch, caplog, fresh_state):
    """``accelerate launch --mixed_precision fp16`` reaches the script as ACCELERATE_MIXED_PRECISION, which
    accelerate ignores where the script passes its own: the run went on in hardware.mixed_precision with no word."""
    from simpo_exp.engine import make_accelerator

    with caplog.at_level(logging.WARNING, logger="simpo_exp.engine"):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's default: nothing asked
        make_accelerator(to_config(compose("hardware=cpu")))
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # the launcher's and the run's alike
        make_accelerator(to_config(compose("hardware=cpu", "hardware.mixed_precision=bf16")))
        assert "is not used" not in caplog.text
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        accelerator, _ = make_accelerator(to_config(compose("hardware=cpu")))
    assert accelerator.mixed_precision == "no"  # the run's, as before: now said
    assert "mixed_precision=fp16 (its --mixed_precision or config file) is not used" in caplog.text
    assert "no autocast (hardware.mixed_precision=no); set hardware.mixed_precision=fp16" in caplog.text


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_float32_weights_loaded_in_16_bits_are_warned(compose, tmp_path, caplog, key):
    """A trained run's model/ holds float32 weights; started from in bf16 it loses most of its SimPO-size update.
    Older config.json files record the dtype as ``torch_dtype``."""
    from simpo_exp.config import to_config
    from simpo_exp.model import build_tiny_tokenizer, load_model, saved_dtype
    from tests.tiny import save_tiny_llama

    save_tiny_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} | {key: "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert saved_dtype(tmp_path) == "float32"
    tok = build_tiny_tokenizer()
    with caplog.at_level(logging.WARNING, logger="simpo_exp.model"):
        load_model(to_config(compose(f"model.path={tmp_path}", "model.dtype=bfloat16")), tok, "eager")
    assert "holds float32 weights" in caplog.text and "set model.dtype=float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simpo_exp.model"):
        load_model(to_config(compose(f"model.path={tmp_path}", "model.dtype=float32")), tok, "eager")
    assert "holds float32 weights" not in caplog.text


def test_the_rounding_check_counts_low_precision_weights_by_their_own_unit_in_the_last_place(caplog):
    """The share of trainable weights an update of ``lr`` cannot move: float32 weights beside bf16 ones (norms kept
    in float32) are not in it (they dilute it, and pure bf16's warning stayed silent); a weight's half-ULP is of its
    own binade (1.75 in bf16: 2^-8, not 2^-7); the warning comes over half the weights, naming the way out."""
    from simpo_exp.precision import vanishing_fraction, warn_if_updates_vanish

    ones = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    torch.nn.init.ones_(ones.weight)  # half-ULP of 1.0 in bf16: 2^-8 ~ 3.9e-3
    model = torch.nn.Sequential(ones, torch.nn.Linear(64, 64))  # a float32 layer beside it
    assert vanishing_fraction(model, 1e-3) == 1.0 and vanishing_fraction(model, 5e-3) == 0.0
    wide = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    torch.nn.init.constant_(wide.weight, 1.75)  # half-ULP 2^-8 too, in [1, 2)
    assert vanishing_fraction(wide, 5e-3) == 0.0 and vanishing_fraction(wide, 1e-3) == 1.0
    half = torch.nn.Linear(2, 2, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        half.weight.copy_(torch.tensor([[1.0, 1.0], [1e-4, 1e-4]]))  # half of them cannot take a 1e-3 step
    with caplog.at_level(logging.WARNING, logger="simpo_exp.precision"):
        assert warn_if_updates_vanish(half, 1e-3) == 0.5
        assert "rounds away" not in caplog.text  # over half, not at half
        with torch.no_grad():
            half.weight[1, 0] = 1.0  # three in four: over half
        assert warn_if_updates_vanish(half, 1e-3) == 0.75
    assert "pure torch.bfloat16 training at learning rate 0.001" in caplog.text
    assert "hardware.master_weights=fp32" in caplog.text


def test_an_fsdp1_live_reference_goes_to_the_device_in_fsdp1s_param_dtype(compose):
    """FSDP trains float32 weights; FSDP1 computes them in its mixed precision's param_dtype, and the live copy was
    cast to it only after prepare: a float32 copy (4 bytes a parameter) on every GPU while prepare ran, and the memory
    check priced it so (Mistral-7B on 8x A100-40GB refused at 40.5 GiB, needing 30). It is cast before it is moved;
    the policy stays in float32."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import MixedPrecision

    from simpo_exp.config import to_config
    from simpo_exp.data import PairCollator, build_datasets
    from simpo_exp.layout import BatchLayout
    from simpo_exp.model import build_tiny_tokenizer, load_model
    from simpo_exp.train import make_loaders

    cfg = to_config(compose("loss=dpo", "reference_mode=live", "dataset.synthetic.num_train=16"))
    tok = build_tiny_tokenizer()
    train, test, _ = build_datasets(cfg, tok)
    model = load_model(cfg, tok, "sdpa")
    mixed = MixedPrecision(param_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    plugin = SimpleNamespace(fsdp_version=1, cpu_ram_efficient_loading=False, mixed_precision_policy=mixed)
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"),
        process_index=0, num_processes=1,
    )  # fmt: skip
    splits, collate = {"train": train, "test": test}, PairCollator(tok.pad_token_id)
    _, reference, _, _, _ = make_loaders(cfg, model, splits, collate, accelerator, BatchLayout("none"))
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the policy's own weights untouched
