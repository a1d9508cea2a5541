"""The benchmark harness against TRL (benchmarks/bench_trl.py). Every GPU check starts with its loss check:
the first batch's loss from TRL's CPOTrainer and from each of our variants, same weights, float32. Here that
check builds every variant the gpu preset times (on a CPU-sized model), so a broken variant is found before
a device run is spent on it, and each must equal TRL's loss."""

import importlib.util
import sys

import pytest

from tests.conftest import ROOT

pytest.importorskip("trl.experimental.cpo")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_trl", ROOT / "benchmarks" / "bench_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_trl", module)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_presets_variants_build_and_equal_trls_loss():
    bench = load_bench()
    gpu = bench.PRESETS["gpu"]["variants"]
    # flash-attn (packed-flash) and Liger run where installed; +compile variants are covered by test_compile
    runnable = [
        v
        for v in gpu
        if not v.endswith(bench.COMPILE_SUFFIX)
        and (bench.VARIANTS[v]["attention"] != "flash" or importlib.util.find_spec("flash_attn"))
        and (bench.VARIANTS[v].get("fused") != "liger" or importlib.util.find_spec("liger_kernel"))
    ]
    assert {"plain", "prefix-flex", "packed-flex", "plain+chunk1024", "prefix-flex+chunk1024", "prefix"} <= set(
        runnable
    )
    spec = {"preset": "cpu", "overrides": {"batch": 4, "warmup": 0, "steps": 1}, "threads": 1, "variants": runnable}
    check = bench.worker_check(spec)
    assert set(check["ours"]) == set(runnable)
    assert check["trl"] > 0
    for variant, loss in check["ours"].items():
        assert loss == pytest.approx(check["trl"], abs=bench.LOSS_TOLERANCE), variant
