"""The benchmark harness against TRL (benchmarks/bench_trl.py). Every GPU check starts with its loss check:
the first batch's loss from TRL's CPOTrainer and from each of our variants, same weights, float32. Here that
check builds every variant the gpu preset times (on a CPU-sized model), so a broken variant is found before
a device run is spent on it, and each must equal TRL's loss."""

import importlib.util
import sys

import pytest

pytest.importorskip("trl.experimental.cpo")


def row(name, pairs_per_s, peak, mfu=None):
    """A row of a benchmark JSON, as bench_trl.summarise writes it (the figures targets.py reads)."""
    return {"name": name, "pairs_per_s": pairs_per_s, "peak_cuda_mb": peak} | ({"mfu": mfu} if mfu else {})


def run(times, peak):
    """One round of a timed run as a worker returns it: its step times (the warm-up's first), 100 tokens a step."""
    return {"times": times, "tokens": [100.0] * len(times), "peak_cuda_mb": peak} | {
        "peak_rss_mb": 0,
        "rss_before_mb": 0,
    }


def load_bench():
    from benchmarks import bench_trl  # the repository root is on pytest's path (pyproject's pythonpath)

    return bench_trl


def test_the_gpu_presets_variants_build_and_equal_trls_loss():
    bench = load_bench()
    gpu = bench.PRESETS["gpu"]["variants"]
    # flash-attn (packed-flash) and Liger run where installed; +compile variants are covered by test_compile
    settings = {v: bench.variant_settings(v) for v in gpu}
    runnable = [
        v
        for v, s in settings.items()
        if not s["compile"]
        and (s["attention"] != "flash" or importlib.util.find_spec("flash_attn"))
        and (s.get("fused") != "liger" or importlib.util.find_spec("liger_kernel"))
    ]
    assert {"plain", "prefix-flex", "packed-flex", "plain+chunk1024", "prefix-flex+chunk1024", "prefix"} <= set(
        runnable
    )
    assert "packed-flex+nockpt" in runnable
    spec = {"preset": "cpu", "overrides": {"batch": 4, "warmup": 0, "steps": 1}, "threads": 1, "variants": runnable}
    check = bench.worker_check(spec)
    assert set(check["ours"]) == set(runnable)
    assert check["trl"] > 0
    for variant, loss in check["ours"].items():
        assert loss == pytest.approx(check["trl"], abs=bench.LOSS_TOLERANCE), variant
        grad = check["grad_error"][variant]  # None: FlexAttention, which has no backward on a CPU
        assert (grad is None and "flex" in variant) or grad < bench.GRAD_TOLERANCE, (variant, grad)


def test_variant_suffixes_in_any_order():
    bench = load_bench()
    plain = {
        "compile": False,
        "no_checkpointing": False,
        "checkpoint_every_n_layers": 1,
        "checkpoint_offload": False,
        "liger_layers": False,
    }
    assert bench.split_variant("packed-flex+liger") == ("packed-flex+liger", plain)
    both = plain | {"compile": True, "no_checkpointing": True}
    assert bench.split_variant("packed-flex+compile+nockpt") == ("packed-flex", both)
    assert bench.split_variant("plain+liger+nockpt+compile") == ("plain+liger", both)
    assert bench.split_variant("plain+compile+compile")[0] == "plain+compile"  # twice: not a variant
    assert bench.split_variant("plain+ckpt2+ckpt4")[0] == "plain+ckpt2"  # one checkpointing rule at most
    partial = plain | {"checkpoint_every_n_layers": 4, "checkpoint_offload": True}
    assert bench.split_variant("packed-flex+liger+offload+ckpt4") == ("packed-flex+liger", partial)
    fused = plain | {"liger_layers": True, "no_checkpointing": True}
    assert bench.split_variant("packed-flex+liger+liger-layers+nockpt") == ("packed-flex+liger", fused)
    assert bench.variant_settings("prefix+chunk1024+nockpt") == bench.VARIANTS["prefix+chunk1024"] | plain | {
        "no_checkpointing": True,
    }


def test_checkpointing_suffixes_set_our_models_layers():
    bench = load_bench()
    preset = bench.PRESETS["cpu"] | {"gradient_checkpointing": True}
    from simpo_exp.model import build_tiny_tokenizer, checkpointed_layers

    tok = build_tiny_tokenizer()
    layers = preset["model"]["num_hidden_layers"]
    for variant, checkpointed in (("packed", layers), ("packed+nockpt", 0), ("packed+ckpt2", layers // 2)):
        model = bench.build_model(preset, tok)
        bench.make_ours(preset, tok, model, variant)
        assert checkpointed_layers(model) == checkpointed, variant


def test_a_shared_process_reports_each_variant_as_it_finishes():
    """--shared-process (GPU) runs our variants in one process; its driver side, on CPU: each result arrives as its
    variant finishes, and a worker that dies midway leaves the results before it and says why it stopped."""
    bench = load_bench()
    spec = {"preset": "cpu", "overrides": {"batch": 2, "warmup": 1, "steps": 1}, "threads": 1, "impl": "ours_shared"}
    got = []
    variants = ["plain", "prefix", "no-such-variant", "packed"]
    why = bench.run_shared_worker(spec | {"variants": variants}, lambda v, r: got.append((v, r)))
    assert [v for v, _ in got] == ["plain", "prefix"]  # in order, each as it finished; none after the failure
    assert all(len(r["times"]) == 2 and "error" not in r for _, r in got)
    assert why.startswith("shared worker failed")


def test_a_shared_process_is_refused_on_a_cpu(monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(sys, "argv", ["bench_trl.py", "--preset", "cpu", "--shared-process"])
    with pytest.raises(SystemExit, match="--shared-process is for GPU presets"):
        bench.main()


def test_trace_summary_counts_busy_time_kernels_and_waits():
    from benchmarks.profile_trace import busy_us, markdown, trace_summary

    assert busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17  # overlaps counted once
    kernel = {"ph": "X", "cat": "kernel"}
    trace = {
        "traceEvents": [
            kernel | {"name": "gemm", "ts": 0, "dur": 3000},
            kernel | {"name": "gemm", "ts": 1000, "dur": 3000},  # overlaps the first: busy 0-4 ms
            kernel | {"name": "softmax", "ts": 10000, "dur": 1000},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 5000, "dur": 10},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 5000, "dur": 10},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 5},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5},
            {"ph": "i", "cat": "kernel", "name": "marker", "ts": 0},  # not a complete event: ignored
        ]
    }
    s = trace_summary(trace, [0.010, 0.010])  # two steps of 10 ms
    assert s["wall_ms_per_step"] == pytest.approx(10.0) and s["gpu_busy_ms_per_step"] == pytest.approx(2.5)
    assert s["gpu_busy_share"] == pytest.approx(0.25)
    assert (s["kernels_per_step"], s["syncs_per_step"], s["copies_per_step"], s["cpu_ops_per_step"]) == (
        1.5,
        0.5,
        0.5,
        0.5,
    )
    assert [k["name"] for k in s["top_kernels"]] == ["gemm", "softmax"]
    assert s["top_kernels"][0]["ms_per_step"] == pytest.approx(3.0)
    table = markdown({"ours": s, "TRL": {"error": "out of memory"}}, "test")
    assert "| ours | 10.0 | 2.5 | 25% | 2 | 0.5 | 0.5 | 0 |" in table and "| TRL | out of memory |" in table


def test_a_profiled_run_reports_its_steps():
    bench = load_bench()
    spec = {"preset": "cpu", "overrides": {"batch": 2, "warmup": 1, "steps": 2}, "variant": "plain", "profile": True}
    out = bench.worker_ours(spec)
    assert len(out["times"]) == 3
    profile = out["profile"]  # the two steps after the warm-up, on CPU: operators, no kernels
    assert profile["steps"] == 2 and profile["cpu_ops_per_step"] > 100
    assert profile["kernels_per_step"] == 0 and profile["gpu_busy_share"] is None
    assert profile["wall_ms_per_step"] == pytest.approx(1e3 * sum(out["times"][1:]) / 2)
    assert out["compiled"] == [False] * 3 and out["skipped_steps"] == 0  # eager: no step taken for a compiling one


def test_targets_read_the_benchmark_json():
    """benchmarks/targets.py: issue 17's targets against hand-made benchmark results (both batch sizes)."""
    from benchmarks.targets import assess, markdown

    b4 = {
        "config": {"batch": 4},
        "rows": [row("TRL", 10.0, 40000, 0.1), row("plain", 12.0, 30000, 0.2), row("prefix-flex", 25.0, 18000, 0.3)],
        "missing": [],
    }
    got = {t: (m, v) for t, m, v in assess(b4)}
    assert got["batch 4: best pairs/s >= 2.0x TRL"] == ("prefix-flex 2.50x", "met")
    assert got["batch 4: padded >= 1.1x TRL"] == ("plain 1.20x", "met")
    assert got["batch 4: peak memory (fastest) <= 0.5x TRL"] == ("prefix-flex 0.45x", "met")
    # TRL's MFU counts the prompt twice (as TRL runs it), a prefix-shared run's once: said beside the figures
    assert got["batch 4: MFU of the fastest >= 35%"] == (
        "prefix-flex 30.0%, prompt counted once (TRL 10.0% of useful work, prompt counted twice)",
        "missed",
    )
    assert got["batch 4: packing=auto would keep"][0].startswith("prefix_shared (flex)")
    b16 = {
        "config": {"batch": 16},
        "rows": [row("plain+chunk1024", 30.0, 70000, 0.4)],
        "missing": ["TRL"],
        "failures": {"TRL": "out of memory"},
    }
    got = {t: (m, v) for t, m, v in assess(b16)}
    assert got["batch 16: runs in one micro-batch where TRL does not"] == (
        "TRL out of memory; plain+chunk1024 ran",
        "met",
    )
    assert got["batch 16: MFU of the fastest >= 35%"] == ("plain+chunk1024 40.0%", "met")
    assert "packing=auto would keep" not in " ".join(got)  # no plain layout run at batch 16
    assert assess({"config": {"batch": 4}, "rows": [row("TRL", 1.0, 1)], "missing": ["plain"]})[0][2] == "n/a"
    cut_off = {"config": {"batch": 48}, "rows": [row("plain+liger", 5.0, 50000)], "missing": ["TRL"]}  # not a failure
    assert assess(cut_off)[0] == ("batch 48: against TRL", "TRL not measured (not reached)", "n/a")
    assert markdown([b4, b16]).count("\n") == 2 + len(assess(b4)) + len(assess(b16))
    # like with like: our runs with gradient checkpointing against TRL with it, those without (+nockpt) against
    # TRL timed without it too; the +nockpt run (2.40x the checkpointed TRL) is never set against TRL with it
    free = {"config": {"batch": 16}, "missing": []}
    free["rows"] = [row("TRL", 10.0, 40000), row("TRL+nockpt", 12.5, 60000), row("packed-flex+nockpt", 24.0, 30000)]
    free["rows"].append(row("packed-flex", 18.0, 25000))
    got = {t: (m, v) for t, m, v in assess(free)}
    assert got["batch 16: best pairs/s >= 2.0x TRL"] == ("packed-flex 1.80x", "missed")
    assert got["batch 16: peak memory (fastest) <= 0.5x TRL"] == ("packed-flex 0.62x", "missed")
    assert got["batch 16: best pairs/s >= 2.0x TRL, both without checkpointing"] == (
        "packed-flex+nockpt 1.92x",
        "missed",
    )
    assert all("TRL+nockpt" not in m for _, m, _ in assess(free))  # never taken for one of ours
    # TRL without checkpointing in 2 micro-batches a step (--trl-accum 2): the row says so
    accum = free | {"config": free["config"] | {"trl_nockpt_accumulation": 2}}
    got = {t: (m, v) for t, m, v in assess(accum)}
    assert got["batch 16: best pairs/s >= 2.0x TRL, both without checkpointing (TRL in 2 micro-batches a step)"]
    # TRL without checkpointing out of memory (the H200 at batch 16, 2026-12-04): the +nockpt run is read against
    # the checkpointed TRL, the fastest TRL that fits, in a row that says so; the like-with-like row is unchanged
    oom = free | {"rows": [r for r in free["rows"] if r["name"] != "TRL+nockpt"]}
    oom |= {"failures": {"TRL+nockpt": "out of memory"}}
    got = {t: (m, v) for t, m, v in assess(oom)}
    assert got["batch 16: best pairs/s >= 2.0x TRL"] == ("packed-flex 1.80x", "missed")
    FITS = (  # TRL without checkpointing on half the batch, two accumulation steps: not measured, said so
        "batch 16: best pairs/s >= 2.0x TRL's fastest measured that fits one micro-batch "
        "(TRL without checkpointing: out of memory; with accumulation: not measured)"
    )
    assert got[FITS] == (
        "packed-flex+nockpt 2.40x TRL with checkpointing, at 0.75x its peak memory",
        "n/a",  # a reading, not the target: that is like with like
    )
    cut = oom | {"failures": {"TRL+nockpt": "not reached"}}  # cut off, not out of memory: no such reading
    assert not any("fits" in t for t, _, _ in assess(cut))
    # partial checkpointing (+ckpt2: half the layers recomputed) is like neither TRL run: never the "best" either
    free["rows"].append(row("packed-flex+ckpt2", 30.0, 35000))
    got = {t: (m, v) for t, m, v in assess(free)}
    assert got["batch 16: best pairs/s >= 2.0x TRL"] == ("packed-flex 1.80x", "missed")
    # nor is +offload the leanest: its checkpointed inputs sit in host memory, which TRL could offload as well
    free["rows"].append(row("packed-flex+offload", 17.0, 15000))
    got = {t: (m, v) for t, m, v in assess(free)}
    assert got["batch 16: peak memory (leanest) <= 0.5x TRL"] == ("packed-flex 0.62x", "missed")
    # where the file holds the step times, the speed is read step by step on the same batches: TRL's one slow step
    # made a ratio of medians of 1.22x (a target "met") out of equal times
    steps = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    paired = {
        "config": {"batch": 4, "warmup": 0},
        "missing": [],
        "rows": [row("TRL", 4 / 5.5, 1), row("plain", 0.89, 1)],
    }
    paired["runs"] = {"TRL": [{"times": [10.0, *steps[1:]]}], "plain": [{"times": steps}]}
    got = {t: (m, v) for t, m, v in assess(paired)}
    assert got["batch 4: padded >= 1.1x TRL"] == ("plain 1.00x", "missed")


def test_the_side_by_side_table_sets_each_run_against_the_trl_run_of_its_checkpointing(tmp_path):
    """Every row was divided by the checkpointed TRL's, +nockpt rows too, even beside a TRL+nockpt run: the
    recomputation TRL did and they did not was counted as their speed. And the speed is taken step by step on the
    same batches: a ratio of two medians over a few steps moved with one slow step on one side (2.03x TRL on the
    H200 where the paired steps say 1.77x)."""
    from types import SimpleNamespace

    from benchmarks.bench_trl import paired_ratio, report, trl_like

    names = ["TRL", "TRL+nockpt", "plain", "plain+nockpt", "plain+ckpt4"]
    assert [trl_like(n, True) for n in names] == ["TRL", "TRL+nockpt", "TRL", "TRL+nockpt", None]
    assert {trl_like(n, False) for n in names} == {"TRL"}  # a preset without checkpointing: all against TRL
    # options Trainer gives TRL too (checkpoint offload, Liger's layer kernels), TRL timed without them: no reading
    assert {trl_like(n, c) for n in ("plain+offload", "packed-flex+liger-layers") for c in (True, False)} == {None}

    batches = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # each step another batch, of another size
    hiccup = [10.0, *batches[1:]]  # one slow first measured step on TRL's side
    assert paired_ratio([run(batches, 1)], [run(hiccup, 1)], 0) == 1.0  # the ratio of medians says 1.22
    trl = [run([0.0, *hiccup], 100)]
    runs = {"TRL": trl, "TRL+nockpt": [run([0.0, *(t / 1.25 for t in hiccup)], 200)]}
    runs |= {"plain": [run([0.0, *(t / 1.1 for t in batches)], 90)], "plain+ckpt4": [run([0.0, *batches], 120)]}
    runs |= {"plain+nockpt": [run([0.0, *(t / 1.5 for t in batches)], 150)]}
    preset = {"warmup": 1, "batch": 4, "device": "cuda", "gradient_checkpointing": True}
    args = SimpleNamespace(
        json=None, markdown=str(tmp_path / "table.md"), threads=1, shared_process=False, preset="gpu"
    )
    report(args, preset, {}, names, runs, 0.0)
    table = (tmp_path / "table.md").read_text().splitlines()
    cells = {line.split(" | ")[0].removeprefix("| "): line.split(" | ") for line in table[4:]}
    assert cells["plain+nockpt"][3] == "1.20" and cells["plain+nockpt"][6] == "0.75"  # against TRL+nockpt
    assert cells["plain"][3] == "1.10" and cells["plain+ckpt4"][3] == ""  # partial: no TRL like it
    assert cells["plain"][8] == "8 |"  # the steps the medians are taken over


def test_trls_mfu_counts_the_work_of_our_padded_layout_on_the_same_batches(monkeypatch):
    """TRL's MFU column: the same FLOP count as our padded run's, over the same batches in the same order, so the
    two MFUs differ only by step time. With a nominal peak (the CPU has none), our plain run's per-step MFU times
    its step time must equal the TRL formula's at the same times."""
    from simpo_exp import flops

    bench = load_bench()
    monkeypatch.setattr(flops, "peak_flops", lambda *args: 1e12)  # a nominal 1 TFLOP/s
    spec = {"preset": "cpu", "overrides": {"batch": 2, "warmup": 0, "steps": 3}, "threads": 1, "variant": "plain"}
    ours = bench.worker_ours(spec)
    preset, tok, rows = bench.setup(spec)
    pairs = bench.tokenize_like_trl(tok, rows, preset["max_length"])
    theirs = bench.padded_mfu(preset, tok, bench.build_model(preset, tok), pairs, ours["times"])
    assert len(theirs) == len(ours["mfu"]) == 3
    assert theirs == pytest.approx(ours["mfu"], rel=1e-9)
    work = [m * t for m, t in zip(theirs, ours["times"])]
    assert max(work) > 1.01 * min(work)  # each step its own batch's work, not one batch's three times


def test_an_eager_check_compiles_nothing_and_checks_the_eager_twin():
    """--eager-check: the loss check gives a +compile variant its eager twin's loss without compiling anything
    (gpu_check.sh uses it so that no compile warm-up comes before the first timed run)."""
    import torch

    from simpo_exp.compiled import graphs_built

    bench = load_bench()
    torch._dynamo.reset()
    spec = {"preset": "cpu", "overrides": {"batch": 2}, "threads": 1, "variants": ["plain", "plain+compile"]}
    before = graphs_built()
    check = bench.worker_check(spec | {"eager_check": True})
    assert graphs_built() == before
    assert check["ours"]["plain+compile"] == check["ours"]["plain"]
    assert check["ours"]["plain"] == pytest.approx(check["trl"], abs=bench.LOSS_TOLERANCE)


def test_a_liger_layers_variant_in_the_loss_check_leaves_the_others_as_they_were(monkeypatch):
    """+liger-layers patches the model it is given and, for the process, the model family's rotary embedding.
    In the loss check, which shares one model among the variants, it gets a copy, and the family's functions are
    put back after it: the plain variant checked after it still equals TRL. Liger's kernels need a GPU, so a
    stand-in for transformers' Liger integration patches the same two places in a way that changes the loss."""
    from transformers.integrations import liger
    from transformers.models.llama import modeling_llama

    bench = load_bench()
    rotary = modeling_llama.apply_rotary_pos_emb

    def stand_in(model, kernel_config):
        modeling_llama.apply_rotary_pos_emb = lambda q, k, cos, sin, **kw: rotary(2 * q, k, cos, sin, **kw)
        norm = model.model.norm
        norm.forward = lambda x, _forward=type(norm).forward: 3 * _forward(norm, x)

    monkeypatch.setattr(liger, "apply_liger_kernel", stand_in)  # what simpo_exp.fused.fuse_layers calls
    monkeypatch.setattr("simpo_exp.model.has_accelerator", lambda: True)
    spec = {"preset": "cpu", "overrides": {"batch": 2}, "threads": 1, "variants": ["packed+liger-layers", "packed"]}
    check = bench.worker_check(spec)
    assert check["ours"]["packed"] == pytest.approx(check["trl"], abs=bench.LOSS_TOLERANCE)
    assert abs(check["ours"]["packed+liger-layers"] - check["ours"]["packed"]) > 1e-3  # the stand-in did run
    assert modeling_llama.apply_rotary_pos_emb is rotary


def test_liger_layers_variants_are_left_out_on_a_cpu(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(sys, "argv", ["bench_trl.py", "--preset", "cpu", "--variants", "plain,plain+liger-layers"])
    checked = []

    def loss_check(spec, must_succeed=True):  # the first worker: stop there
        checked.append(spec)
        raise SystemExit("stopped at the loss check")

    monkeypatch.setattr(bench, "run_worker", loss_check)
    with pytest.raises(SystemExit, match="stopped at the loss check"):
        bench.main()
    assert checked[0]["variants"] == ["plain"]
    assert "the +liger-layers variants need a GPU and liger-kernel: left out" in capsys.readouterr().out


def test_a_run_with_no_timed_step_is_a_failure_of_its_own_not_of_the_report():
    """A run whose every step past the warm-up compiled had no step to time: the median of nothing raised in the
    report, and the part's whole output (TRL's row and every other) was lost."""
    from benchmarks.bench_trl import NO_TIMED_STEP, keep_run, measured

    runs, failures = {}, {}
    good = {"times": [1.0, 0.5, 0.5], "tokens": [10, 10, 10], "compiled": [True, False, False], "peak_cuda_mb": 1.0}
    compiled = {**good, "compiled": [True, True, True]}
    assert keep_run(runs, failures, "plain", good, warmup=1) is None
    assert keep_run(runs, failures, "plain+compile", compiled, warmup=1) == NO_TIMED_STEP
    assert keep_run(runs, failures, "TRL", {"error": "out of memory"}, warmup=1) == "out of memory"
    assert list(runs) == ["plain"] and failures == {"plain+compile": NO_TIMED_STEP, "TRL": "out of memory"}
    assert measured(runs["plain"][0], "times", 1) == [0.5, 0.5]  # what the report takes the median of


def test_the_check_compares_gradients_not_only_losses(monkeypatch):
    """The check computed the first-batch loss alone: a variant whose backward was lost (its states detached, 2.9x
    'faster' in the review's run) or wrong passed it and would have been timed and published. Its gradient is now
    compared with TRL's, weight by weight; here a loss of the right value with half the gradient is caught."""
    bench = load_bench()
    real = bench.step_loss

    def half_gradient(policy, batch):
        loss, stats = real(policy, batch)
        return loss.detach() + 0.5 * (loss - loss.detach()), stats  # the same value, half the gradient

    spec = {"preset": "cpu", "overrides": {"batch": 4, "warmup": 0, "steps": 1}, "threads": 1, "variants": ["plain"]}
    right = bench.worker_check(spec)
    assert right["grad_error"]["plain"] < bench.GRAD_TOLERANCE / 100
    monkeypatch.setattr(bench, "step_loss", half_gradient)
    wrong = bench.worker_check(spec)
    assert wrong["ours"]["plain"] == pytest.approx(right["ours"]["plain"], abs=1e-6)  # the loss check passes
    assert wrong["grad_error"]["plain"] == pytest.approx(0.5, rel=1e-3)  # the gradient check does not


def test_a_timed_run_that_skipped_an_optimizer_step_is_a_failure():
    """Every step with a non-finite gradient skipped AdamW without a word: shorter steps, and no moments allocated
    (about 9.4 GiB at the GPU preset), a memory figure TRL's always-stepping run cannot be held against."""
    from benchmarks.bench_trl import keep_run

    runs, failures = {}, {}
    ran = {"times": [1.0, 0.5, 0.5], "tokens": [10, 10, 10], "compiled": [False] * 3, "skipped_steps": 3}
    assert "skipped 3 optimizer steps" in keep_run(runs, failures, "packed-flex", ran, warmup=1)
    assert runs == {} and "packed-flex" in failures
    assert keep_run(runs, failures, "plain", {**ran, "skipped_steps": 0}, warmup=1) is None
    assert "skipped 1 optimizer steps" in keep_run(runs, failures, "prefix", {**ran, "skipped_steps": 1}, warmup=1)


def test_the_flex_benchmark_counts_the_visible_pairs_and_pads_without_changing_the_mask():
    """benchmarks/bench_flex.py: its TFLOP/s count the pairs the run's mask lets through (checked against the mask's
    own rule on every query-key pair), and its row padded to whole tiles keeps every real token's keys."""
    import torch

    from benchmarks.bench_flex import block_mask, main, visible_pairs
    from simpo_exp.logps import row_groups, visibility

    segments = [(5, 130, 7), (140, 3, 9), (2, 2, 300)]  # pieces across tile edges, and a tile of one pair only
    for packing in ("packed", "prefix_shared"):
        doc, role = row_groups(segments, packing)
        n = len(doc)
        q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        dense = visibility(doc, role)(0, 0, q, k)
        assert visible_pairs(segments, packing) == int(dense.sum())
        plain = block_mask(segments, packing, torch.device("cpu"), pad=False).to_dense()
        padded = block_mask(segments, packing, torch.device("cpu"), pad=True)
        assert padded.seq_lengths[0] % 128 == 0 and padded.seq_lengths[0] > n
        padded = padded.to_dense()
        tiles = -(-n // 128)
        assert torch.equal(padded[..., :tiles, :tiles], plain)
    rows = main(["--device", "cpu", "--batch", "1", "--heads", "2", "--kv-heads", "1", "--configs", "ours,sdpa-padded"])
    assert [r["config"] for r in rows] == ["ours", "sdpa-padded"] and all(r["forward_ms"] > 0 for r in rows)


def test_trl_in_micro_batches_trains_the_same_steps_as_in_one(tmp_path):
    """``--trl-accum K``: TRL without checkpointing in K micro-batches of batch/K pairs, for a batch it cannot hold in
    one (the H200 at 16 pairs, 2026-12-04). Step i must be the same pairs and, for SimPO's mean loss, the same
    gradient as one micro-batch of the whole batch, or the step-by-step ratio would be set against other work: the
    weights after two steps agree."""

    bench = load_bench()
    spec = {"preset": "cpu", "overrides": {"batch": 4, "warmup": 0, "steps": 2}, "threads": 1}
    preset, tok, rows = bench.setup(spec)
    preset = preset | {"gradient_checkpointing": False}
    trained = []
    for k in (1, 2):
        model = bench.build_model(preset, tok)
        trainer = bench.make_trl_trainer(preset, tok, rows, model, str(tmp_path / str(k)), accumulation=k)
        assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (4 // k, k)
        trainer.train()
        trained.append([p.detach().clone() for p in model.parameters()])
    start = [p.detach() for p in bench.build_model(preset, tok).parameters()]
    moved = max(float((a - s).abs().max()) for a, s in zip(trained[0], start))
    apart = max(float((a - b).abs().max()) for a, b in zip(*trained))
    # AdamW's first steps move each weight by about lr whatever its gradient's size, so a gradient near zero that
    # sums in another order moves a weight by up to a few percent of that (2.7e-5 of 2e-3 seen); other pairs in a
    # step move them apart by about twice what the steps moved (4e-3)
    assert moved > 1e-4 and apart < 0.2 * moved, (moved, apart)
    with pytest.raises(SystemExit, match="--trl-accum 3 does not divide the batch of 4"):
        bench.make_trl_trainer(preset, tok, rows, bench.build_model(preset, tok), str(tmp_path / "3"), accumulation=3)
    assert bench.worker_spec({"trl_accum": 2}, "TRL+nockpt")["accumulation"] == 2
    assert bench.worker_spec({"trl_accum": 2}, "TRL")["accumulation"] == 1  # the checkpointed TRL: one micro-batch


def test_targets_leave_out_a_file_a_killed_part_left_unreadable(tmp_path, monkeypatch, capsys):
    """A part killed while writing its JSON left an empty file, and targets.py stopped at it: no targets table for
    the parts that had finished."""
    import json

    from benchmarks import targets

    good = {"config": {"batch": 16}, "rows": [{"name": "plain", "pairs_per_s": 3.0, "peak_cuda_mb": 9}], "missing": []}
    (tmp_path / "bench-b16.json").write_text(json.dumps(good))
    (tmp_path / "bench-big.json").write_text("")
    monkeypatch.setattr(sys, "argv", ["targets.py", str(tmp_path / "bench-b16.json"), str(tmp_path / "bench-big.json")])
    targets.main()
    out = capsys.readouterr().out
    assert "batch 16" in out and f"unreadable, left out: {tmp_path / 'bench-big.json'} (JSONDecodeError" in out


def test_a_second_sigterm_does_not_cut_the_report_short():
    """``timeout`` signals the benchmark and then its process group: the second SIGTERM's exit, raised inside the
    ``finally`` that writes the report, lost the JSON and the markdown."""
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, load_bench().stop_once)
    try:
        with pytest.raises(SystemExit) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.value.code == 128 + signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # the group's copy, while the report is written: ignored
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_benchmarks_step_flops_count_the_head_over_response_tokens_and_the_layouts_attention():
    """bench_trl's MFU of both sides: the output head's cost falls on response tokens alone (prompt positions never
    reach it), the attention term on the layout's visible (query, key) pairs."""
    from simpo_exp.data import PairCollator
    from simpo_exp.flops import FlopSpec, attention_pairs

    bench = load_bench()
    pairs = [
        {"prompt_input_ids": [5, 6], "chosen_input_ids": [7], "rejected_input_ids": [8, 9]},
        {"prompt_input_ids": [5, 6, 7, 8], "chosen_input_ids": [9, 10, 11], "rejected_input_ids": [12]},
    ]
    batch = PairCollator(0)(pairs)
    head = FlopSpec(0, 0, head_params=1, head_trainable=1, layers=0, attention_width=0)
    assert bench.batch_flops(head, batch, "none") == 6 * (1 + 2 + 3 + 1)  # not 6 x the 22 real tokens
    attention = FlopSpec(0, 0, head_params=0, head_trainable=0, layers=1, attention_width=1)
    shared = PairCollator(0, packing="prefix_shared")(pairs)
    assert bench.batch_flops(attention, shared, "prefix_shared") == 12 * attention_pairs(shared, "prefix_shared")
    assert attention_pairs(shared, "prefix_shared") < attention_pairs(batch, "none")
