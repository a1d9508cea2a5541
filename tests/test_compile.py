"""hardware.compile: compiled layers give the eager path's loss and gradients, compile steps stay out of the
step time, and checkpoints written with compile load without it.

Most checks compile with dynamo's ``aot_eager`` backend (the same graph capture, autograd split and
guards as inductor, without generating code: seconds instead of minutes on a 2-core CPU); one goes
through inductor, the default. Tolerances as tests/test_perf_paths.py (float32, CPU): 1e-5 absolute.
"""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, load_model

from simpo_exp import finished
from simpo_exp.compiled import compile_model, graphs_built
from simpo_exp.config import ConfigError
from simpo_exp.data.collate import PairCollator
from simpo_exp.logps import SEGMENT_ATTENTION_PREFIX, ResponseLogps, install_segment_attention
from simpo_exp.metrics import Window
from tests.test_perf_paths import PAD, assert_same, loss_and_grads, make_model, random_pairs, step_loss
from tests.test_run import read_metrics, simpo


def hardware(backend="aot_eager", checkpointing=False, mode=None):
    return SimpleNamespace(compile_backend=backend, compile_mode=mode, gradient_checkpointing=checkpointing)


def compiled_twin(packing: str, checkpointing: bool, backend: str = "aot_eager", layers: int = 2):
    """An eager model and a compiled copy of the same weights (the segment hook installed first, as set_up does)."""
    eager = make_model(layers=layers, checkpointing=checkpointing)
    twin = make_model(layers=layers, checkpointing=checkpointing)
    segments = packing != "none"
    if segments:
        install_segment_attention(twin)
    assert twin.config._attn_implementation.startswith(SEGMENT_ATTENTION_PREFIX) == segments
    compile_model(twin, hardware(backend, checkpointing))
    return eager, twin


@pytest.mark.parametrize(
    "packing,checkpointing", [("none", False), ("none", True), ("prefix_shared", False), ("prefix_shared", True)]
)
def test_compiled_layers_match_eager_and_do_not_recompile_for_new_lengths(packing, checkpointing):
    """Under checkpointing in the padded layout dynamo gave up on each whole layer (a side effect inside the
    checkpoint's region) and nothing was compiled; this passed only after another case had built graphs
    (dynamo's counters outlive torch._dynamo.reset): each case counts the graphs it builds itself."""
    torch._dynamo.reset()
    before = graphs_built()
    eager, twin = compiled_twin(packing, checkpointing)
    keys = list(eager.state_dict())
    for i in range(3):  # three batches of different lengths
        pairs = random_pairs(3, seed=i)
        assert_same(loss_and_grads(eager, pairs, packing), loss_and_grads(twin, pairs, packing))
        if i == 0:
            after_first = graphs_built()
            assert after_first > before, "nothing was compiled"
    assert graphs_built() == after_first, "new lengths recompiled (dynamic shapes expected)"
    assert list(twin.state_dict()) == keys  # compiled in place: no _orig_mod. prefixes


def test_inductor_matches_eager():
    """The default backend, on one layer and one batch (about a minute of compiling on a 2-core CPU)."""
    torch._dynamo.reset()
    eager, twin = compiled_twin("none", False, backend="inductor", layers=1)
    pairs = random_pairs(2, seed=5)
    assert_same(loss_and_grads(eager, pairs), loss_and_grads(twin, pairs))
    assert graphs_built() > 0


def test_compiled_lora_matches_eager():
    pytest.importorskip("peft")
    from simpo_exp.model import add_lora

    torch._dynamo.reset()
    h = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
    eager, twin = add_lora(make_model(), h), add_lora(make_model(), h)
    twin.load_state_dict(eager.state_dict())  # the same (random) adapters
    keys = list(twin.state_dict())
    compile_model(twin, hardware())
    batch = PairCollator(PAD)(random_pairs(3, seed=1))
    (loss_a, grads_a), (loss_b, grads_b) = (adapter_loss_and_grads(m, batch) for m in (eager, twin))
    assert abs(loss_a - loss_b) <= 1e-5
    assert grads_a.keys() == grads_b.keys() and all("lora_" in name for name in grads_a)
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], atol=1e-5, rtol=1e-4), name
    assert list(twin.state_dict()) == keys


def adapter_loss_and_grads(model, batch):
    loss, _ = step_loss(ResponseLogps(model), batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_model_without_decoder_layers_is_refused():
    with pytest.raises(ConfigError, match="hardware.compile=true: no decoder layers"):
        compile_model(torch.nn.Linear(2, 2), hardware())
    empty = make_model()
    empty.model.layers = torch.nn.ModuleList()  # a decoder with no layer: refused, not an IndexError
    with pytest.raises(ConfigError, match="hardware.compile=true: no decoder layers found in LlamaForCausalLM"):
        compile_model(empty, hardware())


def test_compile_units_split_layers_under_checkpointing():
    """Under gradient checkpointing each layer's attention block and MLP are compiled apart, in every layout: dynamo
    cannot compile a checkpointed region that holds the segment attention's graph break or transformers' side
    effect (the padded layout's whole layers built no graph); layers without them are refused by name."""
    from simpo_exp.compiled import compile_units

    assert len(compile_units(make_model(), True, False)) == 2  # the two layers whole
    assert len(compile_units(make_model(), False, False)) == 2
    for segments in (True, False):
        parts = compile_units(make_model(), segments, True)
        assert [type(p).__name__ for p in parts] == ["LlamaAttention", "LlamaMLP"] * 2
    model = make_model()
    for layer in model.model.layers:
        del layer.mlp
    with pytest.raises(ConfigError, match="needs layers with self_attn and mlp blocks; LlamaDecoderLayer lacks them"):
        compile_units(model, True, True)


def test_compile_mode_and_dynamic_shapes_reach_torch_compile(monkeypatch):
    """hardware.compile_mode reaches each unit's compile (it could be dropped for the default without a word), with
    dynamic shapes and the backend asked; "default" is torch's own default (mode None)."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    assert compile_model(make_model(), hardware(mode="max-autotune-no-cudagraphs")) == 2
    assert calls == [{"dynamic": True, "backend": "aot_eager", "mode": "max-autotune-no-cudagraphs"}] * 2
    calls.clear()
    compile_model(make_model(), hardware("inductor", mode="default"))
    assert calls == [{"dynamic": True, "backend": "inductor", "mode": None}] * 2


def test_a_run_that_keeps_recompiling_is_warned_once(caplog):
    """More than MANY_RECOMPILE_STEPS steps recompiling after the first: one warning, naming the count and the step
    (and the switch when hardware.compile asked for it), not one per later step."""
    import logging

    from simpo_exp.compiled import MANY_RECOMPILE_STEPS, CompileWatch

    assert MANY_RECOMPILE_STEPS == 3
    for asked in (True, False):
        torch._dynamo.reset()
        caplog.clear()
        watch, grow = CompileWatch(asked=asked), torch.compile(lambda x: x + 1, backend="eager", dynamic=False)
        with caplog.at_level(logging.WARNING, logger="simpo_exp.compiled"):
            for step in range(7):
                watch.step_started()
                grow(torch.ones(step + 1))  # static shapes: a new graph each step
                assert watch.step_finished(1.0, step)
        warned = [r.getMessage() for r in caplog.records if "recompiled" in r.getMessage()]
        assert len(warned) == 1 and "recompiled during 4 training steps (the latest: step 4)" in warned[0]
        assert ("hardware.compile=false turns it off" in warned[0]) is asked
        assert watch.totals() == (7.0, 7)


def test_generation_under_compile_runs_eagerly():
    """eager_only: compiled modules run without building graphs (generation's decoding shapes would add graphs,
    counted in train/compile_graphs, and compile time at the end of every compiled run)."""
    import contextlib

    from simpo_exp.compiled import eager_only

    torch._dynamo.reset()
    before = graphs_built()
    tripled = torch.compile(lambda x: x * 3, backend="eager")
    with eager_only(True):
        assert torch.equal(tripled(torch.ones(2)), torch.full((2,), 3.0))
    assert graphs_built() == before
    tripled(torch.ones(2))
    assert graphs_built() > before
    assert isinstance(eager_only(False), contextlib.nullcontext)


def test_bad_compile_keys_name_the_key(compose):
    from simpo_exp.config import to_config

    with pytest.raises(ConfigError, match="hardware.compile_mode='fastest'"):
        to_config(compose("hardware.compile=true", "hardware.compile_mode=fastest"))
    with pytest.raises(ConfigError, match="hardware.compile_mode='max-autotune'.*unless hardware.compile=true"):
        to_config(compose("hardware.compile_mode=max-autotune"))
    with pytest.raises(ConfigError, match="hardware.compile_backend='tensorrt'"):
        to_config(compose("hardware.compile=true", "hardware.compile_backend=tensorrt"))
    for mode in ("reduce-overhead", "max-autotune"):  # a CUDA graph per shape, for layers compiled for any shape
        with pytest.raises(ConfigError, match=f"hardware.compile_mode='{mode}': records a CUDA graph per distinct"):
            to_config(compose("hardware.compile=true", f"hardware.compile_mode={mode}"))
    assert to_config(
        compose("hardware.compile=true", "hardware.compile_mode=max-autotune-no-cudagraphs")
    ).hardware.compile


class OneProcess:
    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def step_stats(tokens: float) -> Window:
    w = Window()
    w.add({k: torch.tensor(v) for k, v in {"loss": 1.0, "pairs": 2.0, "tokens": tokens}.items()})
    return w


def test_window_leaves_compile_steps_out_of_the_speed():
    window = Window()
    window.step_done(step_stats(1000.0), 50.0, timed=False)  # the compile step: 50 s, 1000 tokens
    window.step_done(step_stats(300.0), 1.0)
    window.step_done(step_stats(300.0), 2.0)
    metrics, totals = window.train_report(OneProcess, None, None)
    assert metrics["train/step_time_s"] == 1.5  # the two timed steps only
    assert metrics["train/tokens_per_s"] == 200.0  # their 600 tokens over their 3 s
    assert metrics["train/samples_per_s"] == 4 / 3
    assert totals["tokens"] == 1600.0  # the means still see every step
    assert metrics["train/loss"] == 3.0 / 6.0
    window.step_done(step_stats(10.0), 9.0, timed=False)  # a window of compile steps alone: no speed at all
    metrics, _ = window.train_report(OneProcess, None, None)
    assert not {"train/step_time_s", "train/tokens_per_s", "train/samples_per_s"} & set(metrics)
    assert "train/loss" in metrics


def test_a_run_without_hardware_compile_still_leaves_kernel_builds_out_of_the_speed(compose):
    """On a GPU FlexAttention and Liger's head compile themselves during the first steps (5-15 s each): without
    hardware.compile that time counted as training, in step time, tokens/s and MFU. Every run is watched; one whose
    steps built nothing records no warm-up (its summary as before)."""
    from simpo_exp.compiled import watch_compiles
    from simpo_exp.config import to_config

    cfg = to_config(compose("hardware.compile=false"))
    watch = watch_compiles(cfg, None, None)
    assert not watch.asked
    watch.step_started()
    assert not watch.step_finished(0.5, 1)  # an eager step
    assert watch.summary() == {}
    kernel = torch.compile(lambda x: x * 2 + 1, backend="eager")  # a kernel that compiles itself, as flex's does
    watch.step_started()
    kernel(torch.ones(3))
    assert watch.step_finished(12.0, 2)
    assert watch.summary()["train/compile_warmup_s"] == 12.0 and watch.summary()["train/compile_warmup_steps"] == 1
    other = torch.compile(lambda x: x - 1, backend="eager")  # a second step that builds a kernel: added, not replaced
    watch.step_started()
    other(torch.ones(3))
    assert watch.step_finished(3.0, 3)
    assert (watch.summary()["train/compile_warmup_s"], watch.summary()["train/compile_warmup_steps"]) == (15.0, 2)
    # under hardware.compile a start that built nothing (its graphs cached) still records its warm-up, as none
    from simpo_exp.compiled import CompileWatch

    summary = CompileWatch(asked=True).summary()  # compile_for_run's watch
    assert set(summary) == {"train/compile_warmup_s", "train/compile_warmup_steps", "train/compile_graphs"}
    assert (summary["train/compile_warmup_s"], summary["train/compile_warmup_steps"]) == (0.0, 0)


def test_a_starts_first_step_is_warm_up_on_every_process_where_any_compiled_in_it():
    """Under measured packing=auto the main process built FlexAttention's kernels while measuring, the others in
    their first step, which the main process waited for at the gradients' all-reduce: it timed that step (5-15 s
    in the first window's step time and MFU). The processes agree on a start's first step (one all-gather); later
    steps stay each process's own."""
    from simpo_exp.compiled import CompileWatch

    gathered = []

    def gather(flag):  # this process's flag beside another's that compiled
        gathered.append(float(flag))
        return torch.cat([flag, torch.ones(1)])

    two = SimpleNamespace(num_processes=2, device=torch.device("cpu"), gather=gather)
    watch = CompileWatch(asked=False)
    watch.step_started()
    assert watch.step_finished(12.0, 1, two) and gathered == [0.0]  # built nothing here: warm-up all the same
    assert watch.summary()["train/compile_warmup_steps"] == 1
    watch.step_started()
    assert not watch.step_finished(0.5, 2, two) and gathered == [0.0]  # no collective after the first step
    one = CompileWatch(asked=False)
    one.step_started()
    assert not one.step_finished(0.5, 1, SimpleNamespace(num_processes=1))  # one process: nothing to agree


RUN = [
    "max_steps=4",
    "save_steps=2",
    "eval_steps=0",
    "eval_on_start=false",  # no test here reads an eval: the tiny preset evaluates before step 1 otherwise
    "logging_steps=1",
    "logger=none",
    "num_generations=1",
    "max_new_tokens=4",
    "dataset.synthetic.num_train=32",
    "dataset.synthetic.num_test=8",
    "per_device_train_batch_size=4",
    "gradient_accumulation_steps=1",
    "progress_bar=false",
]


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("compiled") / "run"
    res = simpo(
        *RUN,
        "hardware.compile=true",
        "hardware.compile_backend=aot_eager",
        f"hydra.run.dir={run_dir}",
        cwd=run_dir.parent,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def test_compiled_run_records_its_warmup_apart(compiled_run):
    summary = json.loads((compiled_run / "summary.json").read_text())
    warm = summary["train/compile_warmup_steps"]
    assert 1 <= warm < 4 and summary["train/compile_warmup_s"] > 0 and summary["train/compile_graphs"] > 0
    rows = [r for r in read_metrics(compiled_run) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    untimed = [r["step"] for r in rows if "train/step_time_s" not in r]
    assert untimed[0] == 1 and len(untimed) == warm  # one step a window: the compile steps have no step time
    for r in rows:
        assert ("train/tokens_per_s" in r) == ("train/step_time_s" in r)


def test_compiled_checkpoint_resumes_in_an_eager_run(compiled_run, tmp_path):
    path = compiled_run / "checkpoints" / "step-000002" / "model.safetensors"
    assert not [k for k in load_file(path) if "_orig_mod" in k]
    missing, unexpected = load_model(eager_model_of(compiled_run), path)  # strict: every key as the eager model's
    assert not missing and not unexpected
    eager_dir = tmp_path / "run"
    shutil.copytree(compiled_run, eager_dir)
    (eager_dir / finished.FINISHED).unlink()
    res = simpo(*RUN, "hardware.compile=false", f"hydra.run.dir={eager_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["step"]: r for r in read_metrics(eager_dir) if "train/loss" in r}
    assert "train/step_time_s" not in rows[1]  # the compiled run's rows up to its checkpoint were kept: resumed
    assert all("train/step_time_s" in rows[step] for step in (3, 4))  # eager steps are all timed
    summary = json.loads((eager_dir / "summary.json").read_text())
    # the compiled start's warm-up, carried by its checkpoint: the summary counted this start's alone (none here)
    untimed = [step for step, r in rows.items() if "train/step_time_s" not in r]
    assert summary["train/compile_warmup_steps"] == len(untimed) >= 1 and summary["train/compile_warmup_s"] > 0
    compiled = {r["step"]: r["train/loss"] for r in read_metrics(compiled_run) if "train/loss" in r}
    assert sorted(rows) == [1, 2, 3, 4]
    for step in (3, 4):  # the eager continuation trains on from the compiled run's weights
        assert rows[step]["train/loss"] == pytest.approx(compiled[step], abs=1e-4)


def eager_model_of(run_dir):
    """A fresh eager model of the run's architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run_dir / "model"))


def test_a_skipped_steps_work_counts_in_the_speed_and_the_tokens_not_in_the_means():
    """A step whose gradient was not finite was left out of the window whole: its time counted in step_time_s
    but not its tokens in tokens_per_s, and train/num_tokens (TRL's, every batch processed) lost its tokens."""

    def stats(loss: float, tokens: float) -> Window:
        w = Window()
        sums = {"loss": loss, "pairs": 2.0, "tokens": tokens, "input_tokens": tokens + 20}
        w.add({k: torch.tensor(v) for k, v in sums.items()})
        return w

    window = Window()
    window.step_done(stats(1.0, 300.0), 1.0)
    window.step_done(stats(float("nan"), 100.0), 1.0, skipped=True)
    metrics, totals = window.train_report(OneProcess, None, None)
    assert metrics["train/loss"] == 0.5  # the good step's alone
    assert metrics["train/tokens_per_s"] == 200.0 and metrics["train/samples_per_s"] == 2.0  # both steps' work
    assert totals["input_tokens"] + totals["skipped/input_tokens"] == 440.0
    window.step_done(stats(float("nan"), 100.0), 2.0, skipped=True)  # a window of skipped steps alone
    metrics, _ = window.train_report(OneProcess, None, None)
    assert math.isnan(metrics["train/loss"]) and metrics["train/tokens_per_s"] == 50.0


def test_a_step_that_compiled_and_was_skipped_leaves_its_work_out_of_the_speed():
    """The first step both compiles (its time is left out) and, with a gradient not finite, is skipped (its work
    counts in the speed): the work of a step whose time is left out must be left out too, or the speed figures
    count 1000 tokens done in no time."""
    window = Window()
    window.step_done(step_stats(1000.0), 50.0, timed=False, skipped=True)
    window.step_done(step_stats(300.0), 1.0)
    metrics, totals = window.train_report(OneProcess, None, None)
    assert metrics["train/tokens_per_s"] == 300.0 and metrics["train/step_time_s"] == 1.0
    assert totals["skipped/tokens"] == 1000.0 and totals["tokens"] == 300.0  # num_tokens still counts both


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_compile_under_a_sharded_engine_is_refused_by_name(compose, engine):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from simpo_exp.compiled import compile_for_run
    from simpo_exp.config import ConfigError, to_config

    cfg = to_config(compose("hardware.compile=true", "hardware.compile_backend=eager"))
    accelerator = SimpleNamespace(distributed_type=getattr(DistributedType, engine))
    model = make_model()
    with pytest.raises(ConfigError, match=rf"hardware.compile=true is not supported under {engine}"):
        compile_for_run(cfg, accelerator, model)
