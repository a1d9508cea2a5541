"""packing=auto by measurement (simpo_exp/layout_auto.py), and the flash-attn varlen path of the packed layout.

The measurement is checked by its structure (every candidate timed or skipped with a reason, the loss the same
in every layout, the random streams and the data order untouched, a resumed run keeping its recorded layout),
never by timing values. flash-attn cannot be installed here (it builds against CUDA): its plumbing (cu_seqlens,
the reshapes, the attention hook) is checked with a stand-in ``flash_attn`` module whose varlen function is
plain per-sequence SDPA; tests/test_gpu.py compares the real kernel where it is installed.
"""

import contextlib
import importlib.util
import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from simpo_exp import layout_auto
from simpo_exp.config import ConfigError, to_config
from simpo_exp.data.collate import PairCollator
from simpo_exp.layout import BatchLayout, choose_layout
from simpo_exp.logps import ResponseLogps, flash_seqlens
from tests.test_perf_paths import PAD, make_model, random_pairs
from tests.test_run import read_metrics, simpo

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- flash-attn's varlen path
def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
    """flash_attn_varlen_func's contract in plain torch: q [T, Hq, D], k and v [T, Hkv, D], each sequence
    (between consecutive cu_seqlens) causal within itself, query heads grouped over the key heads."""
    assert kw["causal"] is True and kw["dropout_p"] == 0.0 and kw.get("softcap", 0.0) == 0.0  # none: not passed
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    bounds = cu_seqlens_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0] == k.shape[0]
    assert max_seqlen_q == max_seqlen_k == max(b - a for a, b in zip(bounds, bounds[1:]))
    groups = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        qs = q[a:b].transpose(0, 1)
        ks, vs = (x[a:b].repeat_interleave(groups, dim=1).transpose(0, 1) for x in (k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=kw["softmax_scale"])
        outs.append(o.transpose(0, 1))
    reference_varlen.calls += 1
    return torch.cat(outs)


@pytest.fixture
def fake_flash(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = reference_varlen
    reference_varlen.calls = 0
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return reference_varlen


def logps_and_grads(packing, attention, pairs):
    model = make_model()
    policy = ResponseLogps(model, packing=packing, attention=attention)
    out = policy(**PairCollator(PAD, packing=packing, attention=attention)(pairs))
    out.logp_sums.sum().backward()
    return out.logp_sums.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_packed_flash_gives_the_padded_log_probs_and_gradients(fake_flash):
    pairs = random_pairs(5, seed=3)
    plain, g_plain = logps_and_grads("none", "segments", pairs)
    flash, g_flash = logps_and_grads("packed", "flash", pairs)
    assert fake_flash.calls == 2  # one call per layer (make_model: 2 layers), no per-sequence loop
    torch.testing.assert_close(flash, plain, atol=1e-5, rtol=0)
    for name in g_plain:
        torch.testing.assert_close(g_flash[name], g_plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_flash_seqlens_cut_the_row_per_sequence():
    cu, longest = flash_seqlens([[3, 4, 2], [5, 1, 6]], "packed", CPU)
    assert cu.tolist() == [0, 7, 12, 18, 29] and cu.dtype == torch.int32 and longest == 11
    with pytest.raises(ValueError, match="packed"):
        flash_seqlens([[3, 4, 2]], "prefix_shared", CPU)


@pytest.mark.parametrize(
    "packing, device, match",
    [
        ("packed", "cpu", "not on cpu"),
        ("prefix_shared", "cuda", "cannot keep the rejected response from seeing the chosen one"),
        ("packed", "cuda", "needs the flash-attn package"),  # not installed here
    ],
)
def test_flash_config_errors_name_the_key(compose, packing, device, match):
    if "package" in match and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    hw = to_config(compose(f"hardware.packing={packing}", "hardware.packing_attention=flash")).hardware
    with pytest.raises(ConfigError, match=match) as err:
        choose_layout(hw, device, SimpleNamespace())
    assert "hardware.packing_attention='flash'" in str(err.value)


def test_prefix_sharing_cannot_be_built_with_flash():
    with pytest.raises(ValueError, match="prefix"):
        BatchLayout("prefix_shared", "flash")


# ----------------------------------------------------------------------------- the measurement, in-process
def test_measured_only_where_asked(compose):
    hw = lambda *o: to_config(compose(*o)).hardware  # noqa: E731
    assert not layout_auto.measuring(hw(), "cpu")  # the default CPU run keeps the fixed rule
    assert layout_auto.measuring(hw(), "cuda")
    assert layout_auto.measuring(hw("hardware.measure_layouts=true"), "cpu")
    assert not layout_auto.measuring(hw("hardware.measure_layouts=false"), "cuda")
    assert not layout_auto.measuring(hw("hardware.measure_layouts=true", "hardware.packing=none"), "cpu")


def test_an_attention_packing_auto_would_drop_is_refused(compose):
    """Where packing=auto picks the attention with the layout (CUDA, or measuring), a packing_attention
    given beside it ran as if never set."""
    hw = lambda *o: to_config(compose("hardware.packing_attention=mask", *o)).hardware  # noqa: E731
    with pytest.raises(ConfigError, match="hardware.packing_attention='mask' has no effect with hardware.packing=auto"):
        layout_auto.check_auto_attention(hw(), "cuda")
    with pytest.raises(ConfigError, match="has no effect with hardware.packing=auto on cuda: "):  # the fixed rule
        layout_auto.check_auto_attention(hw("hardware.measure_layouts=false"), "cuda")
    with pytest.raises(ConfigError, match="on cpu where layouts are measured"):
        layout_auto.check_auto_attention(hw("hardware.measure_layouts=true"), "cpu")
    layout_auto.check_auto_attention(hw(), "cpu")  # the CPU's fixed rule uses it for prefix sharing
    assert choose_layout(hw(), "cpu", SimpleNamespace()).attention == "mask"
    layout_auto.check_auto_attention(hw("hardware.packing=packed"), "cuda")


def test_candidates_follow_the_device_and_the_model():
    plain = SimpleNamespace()
    names = lambda layouts: [(x.packing, x.attention) for x in layouts]  # noqa: E731
    assert names(layout_auto.candidates("cpu", plain)) == [
        ("none", "segments"),
        ("prefix_shared", "segments"),
        ("packed", "segments"),
    ]
    assert names(layout_auto.candidates("cuda", plain))[:3] == [
        ("none", "segments"),
        ("prefix_shared", "flex"),
        ("packed", "flex"),
    ]
    assert names(layout_auto.candidates("cpu", SimpleNamespace(attn_logit_softcapping=50.0))) == [("none", "segments")]
    short_window = SimpleNamespace(sliding_window=256)
    assert names(layout_auto.candidates("cuda", short_window, max_length=1024)) == [("none", "segments")]
    assert len(layout_auto.candidates("cuda", short_window, max_length=256)) >= 3


def test_every_candidate_timed_with_the_same_loss():
    model = make_model()
    layouts = layout_auto.candidates("cpu", model.config)
    rows = layout_auto.measure(model, layouts, random_pairs(4, seed=1), PAD, CPU, contextlib.nullcontext)
    assert [(r["packing"], r["attention"]) for r in rows] == [(x.packing, x.attention) for x in layouts]
    pairs = random_pairs(4, seed=1)
    with torch.no_grad():  # the mean response-token NLL env.json documents, not a mean over sequences
        out = ResponseLogps(model)(**PairCollator(PAD)(pairs))
    nll = float(-out.logp_sums.sum() / out.num_tokens.sum())
    for r in rows:
        assert len(r["seconds"]) == layout_auto.TIMED_PASSES and r["mean_seconds"] > 0
        assert r["mean_seconds"] == pytest.approx(sum(r["seconds"]) / len(r["seconds"]))  # the warm-up pass left out
        assert r["loss"] == pytest.approx(rows[0]["loss"], abs=1e-5) and r["loss"] == pytest.approx(nll, abs=1e-5)
    assert layout_auto.fastest(rows) in rows
    # the least mean time wins; a candidate that failed is never picked, however short its record
    timed = [{"packing": p, "mean_seconds": t} for p, t in (("none", 0.3), ("packed", 0.1), ("prefix_shared", 0.2))]
    assert layout_auto.fastest(timed)["packing"] == "packed"
    assert layout_auto.fastest([*timed, {"packing": "x", "mean_seconds": 0.0, "error": "oom"}])["packing"] == "packed"
    assert layout_auto.fastest([{"packing": "x", "error": "oom"}]) is None
    assert all(p.grad is None for p in model.parameters())  # gradients dropped, nothing to step


def test_a_resume_keeps_the_recorded_layout_only_where_it_runs_and_with_this_runs_chunk_size():
    """A run measured on a GPU (packed with flex or flash) and resumed on a CPU kept a layout whose first backward
    fails there; a resume that set logps_chunk_size to fit in memory kept the recorded one."""
    packed = {"packing": "packed", "attention": "segments", "chunk_size": 0}
    assert layout_auto.keep_recorded(packed, 256, "cpu") == BatchLayout("packed", "segments", 256)
    for attention in ("flex", "flash"):
        assert layout_auto.keep_recorded({**packed, "attention": attention}, 0, "cpu") is None  # chosen again


def test_a_candidate_out_of_memory_is_skipped(monkeypatch):
    real = layout_auto.time_layout

    def short_of_memory(model, layout, *args):
        if layout.packing == "prefix_shared":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, layout, *args)

    monkeypatch.setattr(layout_auto, "time_layout", short_of_memory)
    model = make_model()
    rows = layout_auto.measure(
        model, layout_auto.candidates("cpu", model.config), random_pairs(3), PAD, CPU, contextlib.nullcontext
    )
    assert rows[1] == {"packing": "prefix_shared", "attention": "segments", "error": "out of memory"}
    assert layout_auto.fastest(rows)["packing"] in ("none", "packed")
    assert "skipped: out of memory" in layout_auto.table(rows)


def test_a_device_error_in_a_candidate_stops_the_measurement(monkeypatch):
    """A candidate that cannot run is skipped; one that broke the device (an illegal memory access leaves the CUDA
    context unusable) is not a layout to skip: every later layout, and the run, would fail without saying why."""
    real = layout_auto.time_layout
    broken = getattr(torch, "AcceleratorError", RuntimeError)

    def breaks_the_device(model, layout, *args):
        if layout.packing == "prefix_shared":
            raise broken("CUDA error: an illegal memory access was encountered")
        return real(model, layout, *args)

    monkeypatch.setattr(layout_auto, "time_layout", breaks_the_device)
    model = make_model()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        layout_auto.measure(
            model, layout_auto.candidates("cpu", model.config), random_pairs(3), PAD, CPU, contextlib.nullcontext
        )
    # out of memory said as a CUDA error (an allocation in a CUDA library): that layout's, skipped as before
    assert not layout_auto.device_broken(broken("CUDA error: out of memory"))
    assert not layout_auto.device_broken(RuntimeError("Expected query, key, and value to have the same dtype"))


def test_measurement_leaves_the_random_stream_and_the_attention_as_they_were():
    model = make_model()
    for layer in model.model.layers:  # attention dropout draws random numbers in every pass
        layer.self_attn.attention_dropout = 0.1
    cfg = SimpleNamespace(hardware=SimpleNamespace(logps_chunk_size=0), max_length=512)
    accelerator = SimpleNamespace(device=CPU, autocast=contextlib.nullcontext)
    pairs = random_pairs(3)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    rows = layout_auto.measure_on_device(cfg, accelerator, model.eval(), pairs, PAD)
    assert torch.equal(torch.get_rng_state(), before) and len(rows) == 3
    assert not model.training and model.config._attn_implementation == "sdpa"
    layout_auto.measure(
        model.train(), layout_auto.candidates("cpu", model.config), pairs, PAD, CPU, contextlib.nullcontext
    )
    assert not torch.equal(torch.get_rng_state(), before)  # without fork_rng the passes would have drawn


def test_a_fused_head_is_measured_in_every_layout_with_its_own_loss(compose, tmp_path):
    """Under hardware.fused_head the candidates are timed with the fused head (its loss is what goes backward),
    and every layout reads the same mean response-token NLL off it as without the fused head."""
    pytest.importorskip("liger_kernel")
    from accelerate.utils import DistributedType

    from simpo_exp.fused import fused_head

    overrides = ("hardware=cpu", "hardware.fused_head=liger", "hardware.measure_layouts=true", "resume=false")
    cfg = to_config(compose(*overrides))
    accelerator = SimpleNamespace(
        device=CPU, num_processes=1, distributed_type=DistributedType.NO, autocast=contextlib.nullcontext
    )
    model, pairs = make_model(), random_pairs(3, seed=2)
    head = fused_head(cfg, model)
    head.compiled = False
    calls = []
    real = head.forward

    def counted(*args):
        calls.append(args[2].shape[0])  # the response tokens handed to the fused head
        return real(*args)

    head.forward = counted
    layout, choice = layout_auto.layout_for_run(cfg, accelerator, model, tmp_path, lambda: pairs, PAD, head)
    assert choice["rule"] == "measured" and len(choice["candidates"]) == 3
    assert all("error" not in r for r in choice["candidates"]), choice
    tokens = sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)
    assert calls == [tokens] * 3 * (1 + layout_auto.TIMED_PASSES)  # every pass of every candidate, fused
    unfused = layout_auto.measure(model, [BatchLayout()], pairs, PAD, CPU, contextlib.nullcontext)[0]
    for row in choice["candidates"]:
        assert row["loss"] == pytest.approx(unfused["loss"], abs=1e-5), row


def test_a_measurement_where_every_candidate_fails_keeps_the_padded_layout(compose, tmp_path, monkeypatch):
    """Not the fixed rule, whose CUDA choice (packed FlexAttention) may be the very candidate that failed."""
    from accelerate.utils import DistributedType

    cfg = to_config(compose("hardware.measure_layouts=true", "resume=false", "hardware.logps_chunk_size=64"))
    accelerator = SimpleNamespace(
        device=CPU, num_processes=1, distributed_type=DistributedType.NO, autocast=contextlib.nullcontext
    )

    def out_of_memory(model, layout, *args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(layout_auto, "time_layout", out_of_memory)
    layout, choice = layout_auto.layout_for_run(cfg, accelerator, make_model(), tmp_path, lambda: random_pairs(3), PAD)
    assert layout == BatchLayout("none", "segments", 64) and choice["rule"] == "measured"
    assert [r["error"] for r in choice["candidates"]] == ["out of memory"] * 3


def tiny_stablelm():
    """A two-layer StableLM: its decoder layers (transformers 5) call attention without the keyword arguments they
    were given, so a segment plan never reaches it."""
    from transformers import StableLmConfig, StableLmForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = StableLmConfig(vocab_size=64, num_key_value_heads=2, hidden_dropout=0.1, **shape)
    return StableLmForCausalLM(config).eval()


@pytest.mark.parametrize("packing", ["packed", "prefix_shared"])
def test_a_model_whose_layers_drop_the_segment_plan_gets_the_padded_layout_under_auto(compose, tmp_path, packing):
    """Without the probe, packing=auto on CPU chose prefix sharing for such a model, and the run died at the
    log-prob check (or its first step) with a traceback; a packing named on the command line is refused by key."""
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(
        device=CPU, num_processes=1, distributed_type=DistributedType.NO, autocast=contextlib.nullcontext
    )
    model = tiny_stablelm()
    original = model.config._attn_implementation
    cfg = to_config(compose("hardware=cpu", "resume=false"))
    state = torch.random.get_rng_state()
    layout, choice = layout_auto.layout_for_run(cfg, accelerator, model.train(), tmp_path, lambda: [], PAD)
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe drew no dropout from the run's stream
    assert layout == BatchLayout("none", "segments", 0), layout
    assert choice["rule"] == "fixed" and "0 of 2 attention layers used the segment plan" in choice["fell_back"]
    assert model.config._attn_implementation == original  # the probe leaves the model's attention as it was
    cfg = to_config(compose("hardware=cpu", "resume=false", f"hardware.packing={packing}"))
    with pytest.raises(ConfigError, match=rf"hardware.packing='{packing}'.*hardware.packing_attention=mask"):
        layout_auto.layout_for_run(cfg, accelerator, model, tmp_path, lambda: [], PAD)
    # the mask attention runs the model's own masks: nothing to probe, and the log-probs are the padded ones
    cfg = to_config(
        compose("hardware=cpu", "resume=false", f"hardware.packing={packing}", "hardware.packing_attention=mask")
    )
    layout, _ = layout_auto.layout_for_run(cfg, accelerator, model.eval(), tmp_path, lambda: [], PAD)
    pairs = random_pairs(3, seed=1)
    logps = {
        lay: ResponseLogps.for_layout(model, lay)(**PairCollator(PAD, lay.packing, lay.attention)(pairs)).logp_sums
        for lay in (layout, BatchLayout())
    }
    torch.testing.assert_close(logps[layout], logps[BatchLayout()], atol=1e-4, rtol=0)


def test_a_model_segment_attention_cannot_wrap_gets_the_padded_layout_under_auto(compose, tmp_path, monkeypatch):
    """A family whose modelling module has no eager_attention_forward for segment attention to wrap (Falcon before
    transformers 5.25): the probe's set-up raised before the probe ran, and packing=auto on CPU exited naming
    hardware.packing_attention, which the user never set. It falls back to the padded layout, as for a model
    whose layers drop the plan (Falcon since 5.25, which has the function but does not pass the plan through)."""
    import transformers.models.falcon.modeling_falcon as falcon
    from accelerate.utils import DistributedType

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, new_decoder_architecture=False)
    config = falcon.FalconConfig(vocab_size=64, alibi=False, attn_implementation="eager", **shape)
    accelerator = SimpleNamespace(
        device=CPU, num_processes=1, distributed_type=DistributedType.NO, autocast=contextlib.nullcontext
    )
    cfg = to_config(compose("hardware=cpu", "resume=false"))
    model = falcon.FalconForCausalLM(config).eval()
    layout, choice = layout_auto.layout_for_run(cfg, accelerator, model, tmp_path / "as-is", lambda: [], PAD)
    assert layout == BatchLayout("none", "segments", 0) and choice["fell_back"]  # either way: padded
    monkeypatch.delattr(falcon, "eager_attention_forward", raising=False)  # a family without one
    model = falcon.FalconForCausalLM(config).eval()
    layout, choice = layout_auto.layout_for_run(cfg, accelerator, model, tmp_path / "without", lambda: [], PAD)
    assert (
        layout == BatchLayout("none", "segments", 0)
        and "cannot wrap attn_implementation='eager'" in (choice["fell_back"])
    )
    assert model.config._attn_implementation == "eager"


def test_the_cuda_rule_unmeasured_probes_its_flex_layout_too(compose, tmp_path):
    """On CUDA with hardware.measure_layouts=false the fixed rule picks packed FlexAttention, which the probe did not
    check (it probed segment attention only): a model whose layers drop the plan died at its first step, told to use
    packing_attention=mask, which packing=auto refuses on CUDA; a model that trains with attention dropout
    (disable_dropout=false) died there too, FlexAttention having none. Both get the padded layout, said why."""
    from accelerate.utils import DistributedType
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = SimpleNamespace(
        device=torch.device("cuda"),
        num_processes=1,
        distributed_type=DistributedType.NO,
        autocast=contextlib.nullcontext,
    )  # a stand-in: the rule reads the device's type, the probe runs where the model is (here the CPU)
    cfg = to_config(compose("hardware=cpu", "resume=false", "hardware.measure_layouts=false"))
    layout, choice = layout_auto.layout_for_run(cfg, cuda, tiny_stablelm(), tmp_path, lambda: [], PAD)
    assert layout == BatchLayout("none", "segments", 0) and "0 of 2 attention layers" in choice["fell_back"]
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    dropping = LlamaForCausalLM(LlamaConfig(attention_dropout=0.1, **shape)).eval()
    state = torch.random.get_rng_state()
    layout, choice = layout_auto.layout_for_run(cfg, cuda, dropping, tmp_path, lambda: [], PAD)
    assert layout == BatchLayout("none", "segments", 0) and not dropping.training
    assert (
        choice["fell_back"]
        == "FlexAttention has no attention dropout, and this model's attention trains with 0.1 (disable_dropout=false)"
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert layout_auto.plan_unused(dropping, BatchLayout("packed", "segments"), PAD) is None  # SDPA has dropout
    plain = LlamaForCausalLM(LlamaConfig(**shape))
    layout, choice = layout_auto.layout_for_run(cfg, cuda, plain, tmp_path, lambda: [], PAD)
    assert layout == BatchLayout("packed", "flex", 0) and choice == {"rule": "fixed"}
    # under FSDP (not measured: the weights are whole on the main process only) the probe runs there; not under
    # ZeRO-3, whose weights are partitioned as they load (ds_id): its fixed rule stands, the first step would say
    fsdp = SimpleNamespace(**vars(cuda) | {"distributed_type": DistributedType.FSDP})
    layout, choice = layout_auto.layout_for_run(cfg, fsdp, tiny_stablelm(), tmp_path, lambda: [], PAD)
    assert layout == BatchLayout("none", "segments", 0) and choice["why"] == "sharded engine" and choice["fell_back"]
    partitioned = tiny_stablelm()
    for p in partitioned.parameters():
        p.ds_id = 0
    zero3 = SimpleNamespace(**vars(cuda) | {"distributed_type": DistributedType.DEEPSPEED})
    layout, choice = layout_auto.layout_for_run(cfg, zero3, partitioned, tmp_path, lambda: [], PAD)
    assert layout == BatchLayout("packed", "flex", 0) and choice == {"rule": "fixed", "why": "sharded engine"}
    cfg = to_config(
        compose("hardware=cpu", "resume=false", "hardware.packing=packed", "hardware.packing_attention=flex")
    )
    with pytest.raises(ConfigError, match=r"trains with 0.1 \(disable_dropout=false\); use .* or disable_dropout=true"):
        layout_auto.layout_for_run(cfg, cuda, dropping, tmp_path, lambda: [], PAD)


def test_the_probe_passes_a_model_whose_attention_takes_the_plan():
    model = make_model()
    for packing in ("packed", "prefix_shared"):
        assert layout_auto.plan_unused(model, BatchLayout(packing, "segments"), PAD) is None
    assert layout_auto.plan_unused(tiny_stablelm(), BatchLayout("none", "segments"), PAD) is None  # nothing packed


# ----------------------------------------------------------------------------- through the training loop
RUN = [
    "max_steps=2",
    "save_steps=1",
    "eval_steps=0",
    "logging_steps=1",
    "logger=none",
    "eval_on_start=false",
    "num_generations=0",
    "dataset.synthetic.num_train=16",
    "dataset.synthetic.num_test=4",
    "per_device_train_batch_size=4",
]


def run(tmp_path, name, *extra):
    run_dir = tmp_path / name
    res = simpo(*RUN, f"hydra.run.dir={run_dir}", *extra, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, json.loads((run_dir / "env.json").read_text())


def first_loss(run_dir):
    return next(r["train/loss"] for r in read_metrics(run_dir) if r.get("step") == 1 and "train/loss" in r)


def test_measured_run_picks_a_candidate_and_a_resume_keeps_it(tmp_path):
    run_dir, env = run(tmp_path, "measured", "hardware.measure_layouts=true")
    choice, chosen = env["layout_choice"], env["batch_layout"]
    assert choice["rule"] == "measured" and choice["batch"]["pairs"] == 4
    rows = choice["candidates"]
    assert [(r["packing"], r["attention"]) for r in rows] == [
        ("none", "segments"),
        ("prefix_shared", "segments"),
        ("packed", "segments"),
    ]
    assert all(len(r["seconds"]) == 2 and r["loss"] == pytest.approx(rows[0]["loss"], abs=1e-5) for r in rows)
    assert (chosen["packing"], chosen["attention"]) in [(r["packing"], r["attention"]) for r in rows]

    # the measurement left the weights, the data order and the random streams alone: step 1's loss is the
    # padded run's (the same first batch, the same weights)
    padded_dir, padded_env = run(tmp_path, "padded", "hardware.packing=none", "max_steps=1")
    assert padded_env["layout_choice"] == {"rule": "configured"}
    assert first_loss(run_dir) == pytest.approx(first_loss(padded_dir), abs=1e-5)

    # a resume reads the layout back instead of measuring again: record another candidate and see it kept
    other = next(r for r in rows if r["packing"] != chosen["packing"])
    env["batch_layout"] = {"packing": other["packing"], "attention": other["attention"], "chunk_size": 0}
    (run_dir / "env.json").write_text(json.dumps(env))
    (run_dir / "finished.json").unlink()  # else the re-run is recognised as finished and skipped
    _, resumed = run(tmp_path, "measured", "hardware.measure_layouts=true")
    assert "resumed from" in (run_dir / "__main__.log").read_text()
    assert resumed["batch_layout"]["packing"] == other["packing"]
    assert resumed["layout_choice"]["rule"] == "recorded at the first start"
    assert resumed["layout_choice"]["first_start"]["candidates"] == rows


def test_a_candidate_the_model_cannot_run_is_skipped_with_its_reason_but_the_padded_layouts_error_is_raised(
    monkeypatch,
):
    """A packed candidate the model cannot run (a ValueError, a kernel package missing or of another version) is a
    row with the first line of its reason; the padded layout is the model's own attention, whose error was taken for
    a layout to skip: the run then picked a packed one, or failed at its first step without the reason."""
    errors = {"packed": ValueError("window too short\nmore"), "prefix_shared": ImportError("no flash_attn")}
    real = layout_auto.time_layout

    def some_fail(model, layout, *args):
        if layout.packing in errors:
            raise errors[layout.packing]
        return real(model, layout, *args)

    monkeypatch.setattr(layout_auto, "time_layout", some_fail)
    model = make_model()
    layouts = layout_auto.candidates("cpu", model.config)
    rows = {
        r["packing"]: r for r in layout_auto.measure(model, layouts, random_pairs(3), PAD, CPU, contextlib.nullcontext)
    }
    assert rows["packed"]["error"] == "ValueError: window too short"
    assert rows["prefix_shared"]["error"] == "ImportError: no flash_attn"
    assert layout_auto.fastest(list(rows.values()))["packing"] == "none"
    assert "skipped: ValueError: window too short" in layout_auto.table(list(rows.values()))
    errors = {"none": RuntimeError("own attention broke")}
    with pytest.raises(RuntimeError, match="own attention broke"):
        layout_auto.measure(model, layouts, random_pairs(3), PAD, CPU, contextlib.nullcontext)


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_a_sharded_engine_is_never_measured(compose, tmp_path, engine):
    """Under FSDP or ZeRO-3 a process holds shards of the weights (ZeRO-3's are empty): timing the layouts on them
    is timing nothing, even with measure_layouts=true."""
    from accelerate.utils import DistributedType

    cfg = to_config(compose("hardware.measure_layouts=true", "resume=false"))
    accelerator = SimpleNamespace(
        device=CPU, num_processes=1, distributed_type=getattr(DistributedType, engine), autocast=contextlib.nullcontext
    )
    never = lambda: pytest.fail("measured under a sharded engine")  # noqa: E731
    _, choice = layout_auto.layout_for_run(cfg, accelerator, make_model(), tmp_path, never, PAD)
    assert choice == {"rule": "fixed", "why": "sharded engine"}


def test_a_recorded_layout_is_kept_only_where_the_run_has_a_checkpoint(tmp_path):
    """env.json without a checkpoint (a first start that failed early, a folder reused for another model) is no run
    to resume: its layout, measured for that start, is measured again."""
    from tests.test_checkpoint_checks import _saved

    recorded = {"packing": "packed", "attention": "segments", "chunk_size": 0}
    (tmp_path / "env.json").write_text(json.dumps({"batch_layout": recorded, "layout_choice": {"rule": "measured"}}))
    assert layout_auto.recorded_layout(tmp_path) is None
    _saved(tmp_path, torch.nn.Linear(2, 2), step=1)
    assert layout_auto.recorded_layout(tmp_path) == {"batch_layout": recorded, "layout_choice": {"rule": "measured"}}
