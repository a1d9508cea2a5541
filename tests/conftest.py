import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tests never talk to W&B servers or the HF hub.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
os.environ["NETRC"] = str(ROOT / "tests" / "no-netrc")  # nor a key `wandb login` stored on this machine

# Under pytest-xdist (-n 2) each worker, and every run it starts, gets one thread: two workers then
# share the two cores instead of four threads fighting over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# FSDP on CPU processes (gloo) averages the gradients from torch 2.9 on; before, the run is refused
# (simpo_exp.engine.check_fsdp_reduction), and these tests, run at an older torch, would only say so.
def _fsdp_on_cpu_refused() -> bool:
    from simpo_exp.engine import FSDP_ON_CPU_TORCH, torch_release  # here: a worker sets its threads (above) first

    return torch_release() < FSDP_ON_CPU_TORCH


fsdp_on_cpu = pytest.mark.skipif(_fsdp_on_cpu_refused(), reason="FSDP on CPU processes needs torch 2.9")


@pytest.fixture
def compose():
    """Compose the project's config like `python -m simpo_exp OVERRIDES` would (without running)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=["output_dir=/tmp/unused", *overrides])

    return _compose


@pytest.fixture
def fresh_state():
    """The next test's accelerator as a fresh process's: accelerate keeps one state per process, which a test's
    make_accelerator set up (make_accelerator itself resets it as it starts)."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def _no_sweep_identity_left_behind(monkeypatch):
    """A sweep's identity, which ``SweepSummary.on_multirun_start`` sets in os.environ (tests call it in this
    process), is undone after each test. ``monkeypatch.delenv(name, raising=False)`` on a variable that is not set
    records nothing to undo: the values stayed in the worker, every later run got them, and the first run after them
    started a second fork server (tests/runs.py keys servers by the environment: about 9 s of imports, 600 MB)."""
    from simpo_exp.runinfo import SWEEP_DIR_ENV, SWEEP_ENV, SWEPT_ENV

    for name in (SWEEP_ENV, SWEPT_ENV, SWEEP_DIR_ENV):
        monkeypatch.setenv(name, "")  # recorded as unset before (or its value), so that the undo removes it
        monkeypatch.delenv(name)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# The suite runs in two workers, a file per worker at a time, handed out in this order (pyproject.toml:
# -n 2 --dist loadfile --no-loadscope-reorder). Longest files first (measured in the two-worker suite on
# 2026-12-05, `--durations=0` summed per file, the slow-marked tests left out: generate ~115 s, reliability
# ~110 s, sweeps ~75 s, compile and sharded ~65 s, pitfalls and faults ~55 s, baselines ~45 s, evaluate,
# bad_input and wandb_offline ~30 s), so the short ones fill the gaps at the end.
SLOW_FIRST = (
    "test_gpu.py",  # on a GPU its whole training runs first, in the order given (benchmarks/gpu_check.sh); else skipped
    "test_generate.py",
    "test_reliability.py",
    "test_sweeps.py",
    "test_compile.py",
    "test_sharded.py",
    "test_pitfalls.py",
    "test_faults.py",
    "test_baselines.py",
    "test_evaluate.py",
    "test_bad_input.py",
    "test_wandb_offline.py",
    "test_bench.py",
    "test_compare.py",
    "test_config.py",
    "test_presets.py",
    "test_layout_auto.py",
    "test_data.py",
    "test_fused_layers.py",
    "test_precision.py",
    "test_run.py",
    "test_scale.py",
    "test_lora_model.py",
    "test_liger.py",
    "test_evaluate_judging.py",
    "test_judge_faults.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
