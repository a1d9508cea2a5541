"""The GPU paths: bf16 autocast, the packed layouts on CUDA, DeepSpeed ZeRO-3 without a launcher, LoRA.

Skipped where no CUDA device is visible (CI, and the project's own machine). On a GPU machine:
``python -m pytest -q tests/test_gpu.py`` (see benchmarks/RESULTS.md for the commands used there).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from simpo_exp import checkpoint
from simpo_exp.data import PairCollator
from simpo_exp.inference.files import read_jsonl
from simpo_exp.logps import ResponseLogps
from tests.conftest import ROOT
from tests.runs import free_port
from tests.test_run import read_metrics, simpo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RUN = [
    "logger=none",
    "max_steps=6",
    "eval_steps=3",
    "logging_steps=1",
    "save_steps=3",
    "dataset.synthetic.num_train=256",
    "dataset.synthetic.num_test=64",
]


def _model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to("cuda", dtype)


def _random_pairs(longest: int = 60) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(4):
        p, c, r = (
            torch.randint(5, 900, (int(n),), generator=gen).tolist()
            for n in torch.randint(3, longest, (3,), generator=gen)
        )
        pairs.append({"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r})
    return pairs


@pytest.mark.parametrize(
    "packing, attention, longest",
    [
        ("packed", "segments", 60),
        ("prefix_shared", "segments", 60),
        ("packed", "flex", 60),
        ("prefix_shared", "flex", 60),
        ("packed", "flex", 400),  # rows of many 128-token tiles: empty, partial and full ones (flex_tiles)
        ("prefix_shared", "flex", 400),
    ],
)
def test_packed_layouts_match_the_plain_one_on_cuda(packing, attention, longest):
    """float32 on CUDA (SDPA picks its GPU kernels): the same log-probs and gradients as the plain path."""
    pairs = _random_pairs(longest)
    plain = _logps_and_grads(_model(torch.float32), pairs, "none", attention)
    _assert_same(_logps_and_grads(_model(torch.float32), pairs, packing, attention), plain)


def _gemma2(heads: int, kv_heads: int, head_dim: int, softcap: float, final_softcap: float):
    """A two-layer Gemma 2 of the given attention shape, float32 weights on the GPU, eager attention."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=1000, hidden_size=256 * (1 + (head_dim > 32)), intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, attn_logit_softcapping=softcap,
        final_logit_softcapping=final_softcap, sliding_window=4096, query_pre_attn_scalar=head_dim,
        attn_implementation="eager",
    )  # fmt: skip
    return Gemma2ForCausalLM(config).to("cuda", torch.float32)


@pytest.mark.parametrize("packing", ["packed", "prefix_shared"])
def test_gemma2_softcapped_flex_matches_the_plain_eager_layout_on_cuda(packing):
    """Gemma 2 (the paper's gemma-2-9b-it recipe) under compiled FlexAttention with its attention softcap as the
    score_mod, forward and backward, against its own eager attention on the padded layout (float32)."""
    pairs = _random_pairs(400)
    plain = _logps_and_grads(_gemma2(8, 2, 32, 5.0, 10.0), pairs, "none", "segments")
    _assert_same(_logps_and_grads(_gemma2(8, 2, 32, 5.0, 10.0), pairs, packing, "flex"), plain)


def test_gemma2_9b_wide_heads_train_through_packed_flex_in_bf16_on_cuda():
    """Gemma-2-9B's attention (head_dim 256, 16 query heads over 8 key/value heads, softcap 50), which packing=auto
    sends to packed FlexAttention rows on CUDA: its compiled backward at head_dim 256 has failed for shared memory on
    some GPUs (pytorch#133254); one bf16-autocast step, as training runs it, against the padded eager layout's. What
    it holds is that the kernels at this width build and give finite values near the padded path's: its bound (bf16 on
    both sides, about 0.19 at these log-probs) is wider than a mask letting pairs see each other moves them (0.14 on
    the CPU, float32), so the mask itself is held to float32 tolerance by the softcapped test above (width 32)."""
    pairs = _random_pairs(400)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = _logps_and_grads(_gemma2(16, 8, 256, 50.0, 30.0), pairs, "none", "segments")
        logps, grads = _logps_and_grads(_gemma2(16, 8, 256, 50.0, 30.0), pairs, "packed", "flex")
    assert torch.isfinite(logps).all() and all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(logps, plain[0], atol=0.05, rtol=0.02)  # bf16 attention on both sides


def _logps_and_grads(model, pairs: list[dict], packing: str, attention: str):
    """One forward and backward of ``pairs`` laid out as ``packing``: the mean log-probs and every gradient."""
    policy = ResponseLogps(model, packing=packing, attention=attention)
    collate = PairCollator(0, packing=packing, attention=attention)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate(pairs).items()}
    out = policy(**batch)
    out.logp_sums.sum().backward()
    return out.mean_logps.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_same(got, expected):
    """float32 agreement: log-probs within 1e-4, each gradient within 1e-4 + 1e-3 of its size."""
    (logps, grads), (logps_expected, grads_expected) = got, expected
    torch.testing.assert_close(logps, logps_expected, atol=1e-4, rtol=1e-4)
    for name in grads_expected:
        torch.testing.assert_close(grads[name], grads_expected[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("packing", ["packed", "prefix_shared"])
def test_a_packed_flex_step_never_makes_the_host_wait_on_cuda(packing):
    """The loss, its statistics and the backward of packed FlexAttention rows under CUDA's sync debug mode set to
    raise: no value read, data-sized output or blocking copy (the CPU twin: tests/test_host_waits.py)."""
    from simpo_exp.config import Config
    from simpo_exp.objective import batch_loss

    policy = ResponseLogps(_model(torch.float32), packing=packing, attention="flex")
    pinned = PairCollator(0, packing, "flex")(_random_pairs(400))
    batch = {k: v.pin_memory().cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in pinned.items()}
    batch_loss(policy, dict(batch), Config())[0].backward()  # FlexAttention compiled, pinned buffers allocated
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats, _ = batch_loss(policy, dict(batch), Config(sft_weight=0.5))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss) and stats["pairs"] == 4


def test_flash_varlen_matches_the_plain_layout_on_cuda():
    """packed + flash-attn's varlen kernel against the plain float32 path. flash-attn computes in bf16 (the
    hook casts float32 queries, keys and values), so the tolerance is bf16's: log-probs within 5e-2, each
    parameter's gradient within 5% of its norm."""
    pytest.importorskip("flash_attn")
    pairs = _random_pairs()
    plain, g_plain = _logps_and_grads(_model(torch.float32), pairs, "none", "flash")
    fast, g_fast = _logps_and_grads(_model(torch.float32), pairs, "packed", "flash")
    torch.testing.assert_close(fast, plain, atol=5e-2, rtol=0)
    for name in g_plain:
        assert (g_fast[name] - g_plain[name]).norm() <= 0.05 * g_plain[name].norm() + 1e-6, name


def test_partial_and_offloaded_checkpointing_on_cuda():
    """hardware.checkpoint_every_n_layers and hardware.checkpoint_offload on packed FlexAttention rows: the
    gradients of no checkpointing, and the device memory a forward pass leaves for the backward ordered as
    expected: none > every second layer > every layer > every layer offloaded to host memory."""
    from simpo_exp.model import enable_checkpointing

    pairs = _random_pairs(400)
    held, grads = {}, {}
    for name, every, offload in (("none", 0, False), ("every 2", 2, False), ("all", 1, False), ("offload", 1, True)):
        model = _model(torch.float32).train()
        if every:
            enable_checkpointing(model, every, offload)
        policy = ResponseLogps(model, packing="packed", attention="flex")
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in PairCollator(0, "packed", "flex")(pairs).items()}
        policy(**batch)  # FlexAttention's kernels compiled before anything is counted
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = policy(**batch)
        held[name] = torch.cuda.memory_allocated() - before
        out.logp_sums.sum().backward()
        grads[name] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        del model, policy, out
    assert held["none"] > held["every 2"] > held["all"] > held["offload"], held
    for name in ("every 2", "all", "offload"):
        for param in grads["none"]:
            torch.testing.assert_close(grads[name][param], grads["none"][param], atol=1e-4, rtol=1e-3, msg=param)


@pytest.mark.parametrize("packing, attention", [("none", "segments"), ("packed", "flex"), ("prefix_shared", "flex")])
def test_liger_layer_kernels_match_the_plain_path_on_cuda(packing, attention):
    """hardware.fused_layers=liger (Liger's RMSNorm, SwiGLU and rotary kernels) in each GPU layout, float32:
    the log-probs and gradients of the padded path on transformers' own layers."""
    from simpo_exp.fused import fuse_layers, kept_modeling_modules

    pairs = _random_pairs(400)
    plain = _logps_and_grads(_model(torch.float32), pairs, "none", "segments")
    with kept_modeling_modules():  # Liger's rotary embedding is the process's until the block ends
        model = _model(torch.float32)
        fuse_layers(model)
        _assert_same(_logps_and_grads(model, pairs, packing, attention), plain)


def _run(tmp_path, *args, run=None):
    run = run or tmp_path / "run"
    res = simpo(*args, *RUN, f"hydra.run.dir={run}", cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return run, json.loads((run / "summary.json").read_text()), json.loads((run / "env.json").read_text())


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """One ``hardware=gpu`` run (packing=auto, so measured), shared by the preset and resume tests."""
    return _run(tmp_path_factory.mktemp("gpu"), "hardware=gpu")


@pytest.mark.xdist_group("gpu_run")  # one training run for both under --dist loadgroup
def test_gpu_preset_runs_in_bf16_and_reports_mfu_and_memory(gpu_run):
    run, summary, env = gpu_run
    assert env["mixed_precision"] == "bf16" and env["device"].startswith("cuda")
    measured = env["layout_choice"]  # packing=auto on a GPU: the candidates timed on the first batch
    assert measured["rule"] == "measured" and len(measured["candidates"]) >= 3
    assert any(r.get("packing") == env["batch_layout"]["packing"] and "error" not in r for r in measured["candidates"])
    assert summary["train/gpu_max_allocated_gb"] > 0 and torch.isfinite(torch.tensor(summary["train/loss"]))
    assert env["adamw_fused"] is True
    if any(name in env["device_names"][0] for name in ("H100", "H200", "A100")):
        assert 0 < summary["train/mfu"] < 1
        # FlexAttention runs on these: a flex candidate that failed would leave the padded one to win unnoticed
        flex = [r for r in measured["candidates"] if r.get("attention") == "flex"]
        assert flex and all("error" not in r for r in flex), flex
    assert (run / "model" / "model.safetensors").exists()


def test_flex_attention_trains_through_the_loop(tmp_path):
    run, summary, env = _run(
        tmp_path, "hardware=gpu", "hardware.packing=prefix_shared", "hardware.packing_attention=flex"
    )
    assert env["batch_layout"]["attention"] == "flex" and torch.isfinite(torch.tensor(summary["train/loss"]))
    assert summary["precision/weights_dtype"] == "float32" and summary["precision/autocast_dtype"] == "bfloat16"


def test_liger_layer_kernels_train_through_the_loop(tmp_path):
    """hardware.fused_layers=liger in a bf16 run on the GPU preset's layout (packed rows, FlexAttention)."""
    run, summary, env = _run(tmp_path, "hardware=gpu", "hardware.fused_layers=liger", "hardware.measure_layouts=false")
    assert env["fused_layers"] == "liger" and env["batch_layout"]["attention"] == "flex"
    assert torch.isfinite(torch.tensor(summary["train/loss"])) and summary["train/grad_norm"] > 0


def test_compiled_layers_train_through_the_loop(tmp_path):
    """hardware.compile on CUDA (inductor): the run trains, and its compile steps are recorded apart."""
    run, summary, env = _run(tmp_path, "hardware=gpu", "hardware.packing=none", "hardware.compile=true")
    assert summary["train/compile_graphs"] >= 1 and summary["train/compile_warmup_s"] > 0
    assert 1 <= summary["train/compile_warmup_steps"] < 6 and torch.isfinite(torch.tensor(summary["train/loss"]))


@pytest.mark.xdist_group("gpu_run")  # one training run for both under --dist loadgroup
def test_gpu_preset_resumes_with_its_measured_layout(gpu_run, tmp_path):
    """A copy of the shared run, cut back to its step-3 checkpoint, runs again: it resumes there, keeps the
    layout packing=auto measured, and ends where the uninterrupted run ended (bf16 tolerance)."""
    first_run, first, first_env = gpu_run
    run = tmp_path / "run"
    shutil.copytree(first_run, run)
    shutil.rmtree(run / "checkpoints" / "step-000006", ignore_errors=True)
    (run / "finished.json").unlink()  # else the re-run is recognised as finished and skipped
    checkpoint.trim_metrics(run / "metrics.jsonl", 3)  # as a run killed after its step-3 checkpoint left them
    _, resumed, env = _run(tmp_path, "hardware=gpu", run=run)  # from step 3
    assert "resumed from" in (run / "__main__.log").read_text()
    assert env["batch_layout"] == first_env["batch_layout"]
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert resumed["eval/loss"] == pytest.approx(first["eval/loss"], rel=1e-2)  # bf16 kernels need not repeat bitwise


def test_zero3_without_a_launcher(tmp_path):
    pytest.importorskip("deepspeed")
    run, summary, env = _run(
        tmp_path, "hardware=zero3", "hardware.effective_batch_size=null", "gradient_accumulation_steps=2"
    )
    assert env["distributed_type"] == "DEEPSPEED" and env["num_processes"] == 1
    # packing=auto is not measured under a sharded engine: the fixed rule's GPU layout, packed FlexAttention
    assert env["layout_choice"] == {"rule": "fixed", "why": "sharded engine"}
    assert env["batch_layout"]["packing"] == "packed" and env["batch_layout"]["attention"] == "flex"
    assert env["adamw_fused"] is False  # DeepSpeed steps its own partitions
    assert (run / "checkpoints" / "step-000003" / "engine").is_dir()  # written through accelerator.save_state
    assert (run / "model" / "model.safetensors").exists() and summary["train/global_step"] == 6
    # saved from the engine's float32 master copy, not its bf16 working weights (most of the update rounded away)
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(run / "model" / "model.safetensors").values()} == {torch.float32}
    assert json.loads((run / "model" / "config.json").read_text())["dtype"] == "float32"
    if any(name in env["device_names"][0] for name in ("H100", "H200", "A100")):
        assert 0 < summary["train/mfu"] < 1  # counted from the full parameter sizes, not the empty local shards
    assert "trained state per device" in (run / "__main__.log").read_text()  # memory.py read DeepSpeed's plan


def test_fsdp2_takes_the_fixed_gpu_layout_and_steps_adamw_fused(tmp_path):
    """FSDP2 through accelerate launch on one GPU (the engine an 8B run uses on 8): packing=auto is not measured
    under a sharded engine, so the fixed GPU layout, packed rows with FlexAttention, trains through FSDP's DTensor
    weights, and AdamW steps them fused. (tests/test_sharded.py runs FSDP2 on two CPU processes, with neither.)"""
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launchers/fsdp.yaml"]
    launch += ["--num_processes", "1", "--main_process_port", str(free_port())]
    args = ["hardware=fsdp", "hardware.effective_batch_size=null", *RUN, f"hydra.run.dir={run}"]
    res = subprocess.run(
        [*launch, "-m", "simpo_exp", *args], cwd=ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    env = json.loads((run / "env.json").read_text())
    assert env["distributed_type"] == "FSDP" and env["adamw_fused"] is True
    assert env["layout_choice"] == {"rule": "fixed", "why": "sharded engine"}
    assert (env["batch_layout"]["packing"], env["batch_layout"]["attention"]) == ("packed", "flex")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train/global_step"] == 6 and torch.isfinite(torch.tensor(summary["train/loss"]))
    assert (run / "model" / "model.safetensors").exists()


def test_gpu_lora(tmp_path):
    pytest.importorskip("peft")
    run, summary, env = _run(tmp_path, "hardware=gpu-lora")
    assert (run / "model" / "adapter" / "adapter_model.safetensors").exists() and env["mixed_precision"] == "bf16"
    assert (run / "model" / "model.safetensors").exists()  # the adapters merged into the bf16 base


def test_generate_stage_with_vllm(tmp_path):
    """The generate stage's vLLM backend on a tiny saved Llama, scored by a tiny random reward model."""
    pytest.importorskip("vllm")
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from simpo_exp.model import build_tiny_tokenizer
    from tests.test_generate import generate

    tok = build_tiny_tokenizer()
    shape = dict(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    for name, cls, extra in (
        ("policy", LlamaForCausalLM, {}),
        ("rm", LlamaForSequenceClassification, {"num_labels": 1}),
    ):
        cls(LlamaConfig(**shape, **extra)).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "gen"
    res = generate(
        "generate=paper",
        "generate.max_new_tokens=16",
        "dataset.max_train_samples=32",
        "hardware=gpu",
        f"model.path={tmp_path / 'policy'}",
        "scorer=reward-model",
        f"scorer.path={tmp_path / 'rm'}",
        "generate.vllm_gpu_memory_utilization=0.3",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"] == 32 and report["responses"] == 32 * 5 and report["pairs_kept"] >= 1
    records = read_jsonl(next((out / "shards").glob("scored-00000-*.jsonl")))
    assert all(r["n_tokens"] <= 16 for rec in records for r in rec["responses"])
    assert len({r["text"] for r in records[0]["responses"]}) > 1  # five seeds, five different samples
