"""Scale-out paths that can be checked on a CPU: two processes, submitit sweeps, presets, LoRA."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from simpo_exp.config import ConfigError, to_config
from simpo_exp.tracking import MEASURED_METRICS
from tests.conftest import ROOT as CONF_ROOT
from tests.conftest import options
from tests.runs import free_port
from tests.test_run import read_metrics, simpo

RUN = [
    "hardware=cpu",
    "logger=none",
    "eval_on_start=false",  # the checks read the step-3 and final evals only
    "max_steps=6",
    "eval_steps=3",
    "logging_steps=3",
    "dataset.synthetic.num_train=256",
    "dataset.synthetic.num_test=64",
]


def launch_env(inject: Path | None = None, **extra: str) -> dict:
    """The environment of a run on two CPU processes: offline, one thread each, ``extra`` laid over it.
    ``inject``: a folder put first on PYTHONPATH, whose sitecustomize.py every process loads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    if inject is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(inject), env.get("PYTHONPATH", "")])
    return env


def two_processes(*args: str, cwd: Path, inject: Path | None = None, timeout: int = 900):
    """``python -m simpo_exp ARGS`` on two CPU processes (torchrun; see ``launch_env``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "simpo_exp"]
    env = launch_env(inject)
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_records(before: list[dict], after: list[dict]) -> None:
    """Two runs' metrics.jsonl records equal, record for record, but for the timing and memory figures."""
    assert [r["step"] for r in after] == [r["step"] for r in before]
    for old, new in zip(before, after, strict=True):
        for key, value in old.items():
            if key not in MEASURED_METRICS:
                assert new[key] == value, (old["step"], key)


def assert_same_summary(one_dir: Path, run_dir: Path) -> tuple[dict, dict]:
    """Two runs' final losses, eval metrics and gradient norm equal to 1e-4 relative; returns both summaries."""
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one_dir, run_dir))
    for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen", "train/loss", "train/grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key  # stated tolerance: 1e-4 relative
    return a, b


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """Also the checkpoints sharded engines use (accelerator.save_state on every process): the
    two-process run saves them at steps 2 and 4. Run again with the second process unable to read
    step 4's, both processes resume from step 2 together and end exactly as before."""
    args = [*RUN, "per_device_train_batch_size=8", "save_steps=2", "hardware.checkpoint_format=accelerate"]
    args.append("per_device_eval_batch_size=64")  # one eval batch: the second process only repeats it, uncounted
    args.append("hardware.collective_timeout=120")  # a process left waiting fails the test in 2 minutes, not 15
    args.append(f"hydra.run.dir={tmp_path / 'two'}")
    two = two_processes(*args, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    saved = tmp_path / "two" / "checkpoints" / "step-000004"
    assert (saved / "COMPLETE").exists() and (saved / "engine" / "model.safetensors").exists()
    first = json.loads((tmp_path / "two" / "summary.json").read_text())
    first_logged = read_metrics(tmp_path / "two")
    (tmp_path / "two" / "finished.json").unlink()  # as if killed after step 6: a finished run would be skipped
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(UNREADABLE_ON_RANK_1)
    again = two_processes(*args, cwd=tmp_path, inject=tmp_path / "inject")
    assert again.returncode == 0, again.stderr[-3000:]
    log = (tmp_path / "two" / "__main__.log").read_text()
    assert f"checkpoint {saved} is damaged and skipped: on process 1: {saved} cannot be read" in log, log[-3000:]
    assert f"resumed from {saved.with_name('step-000002')} (step 2)" in log
    resumed = json.loads((tmp_path / "two" / "summary.json").read_text())
    for key, value in first.items():
        if key.startswith(("train/", "eval/")) and key not in MEASURED_METRICS:
            assert resumed[key] == value, key
    # the step-3 report's window began before the resume: each process got its own part of it back
    assert_same_records(first_logged, read_metrics(tmp_path / "two"))
    one = simpo(
        *RUN, "per_device_train_batch_size=16", "per_device_eval_batch_size=64", f"hydra.run.dir={tmp_path / 'one'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert "x 2 processes" in (tmp_path / "two" / "__main__.log").read_text()
    a, b = assert_same_summary(tmp_path / "one", tmp_path / "two")
    assert b["resolved/effective_batch_size"] == a["resolved/effective_batch_size"] == 16
    # only the main process wrote the run's files: one summary, metrics logged once per step
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert steps == [3, 6]


@pytest.mark.slow
def test_two_lora_processes_resume_each_with_its_own_random_draws(tmp_path):
    """LoRA's dropout draws random masks on every process. Resumed from step 2, each process goes on from
    its own generator states (the checkpoint keeps every process's), so every logged record equals the
    uninterrupted run's; with the main process's states restored everywhere, none would."""
    run_dir = tmp_path / "run"
    args = [arg for arg in RUN if not arg.startswith("hardware=")] + ["hardware=cpu-lora", "eval_steps=2"]
    args.append("hardware.lora_dropout=0.05")  # the adapters have none by default
    args += ["logging_steps=2", "per_device_train_batch_size=8", "save_steps=2", f"hydra.run.dir={run_dir}"]
    first = two_processes(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    first_logged = read_metrics(run_dir)
    (run_dir / "finished.json").unlink()  # as if killed after step 4's checkpoint was lost
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    again = two_processes(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000002'} (step 2)" in (run_dir / "__main__.log").read_text()
    assert len(first_logged) >= 4
    assert_same_records(first_logged, read_metrics(run_dir))


# Loaded by every Python process of the resumed run above (PYTHONPATH): the second process cannot read
# the step-4 checkpoint (as where its node's copy is damaged); the first can.
UNREADABLE_ON_RANK_1 = """
import errno, os
if os.environ.get("RANK") == "1":
    import accelerate

    load_state = accelerate.Accelerator.load_state

    def unreadable_step_4(self, input_dir=None, **kwargs):
        if "step-000004" in str(input_dir):
            raise OSError(errno.EIO, "Input/output error", input_dir)
        return load_state(self, input_dir, **kwargs)

    accelerate.Accelerator.load_state = unreadable_step_4
"""


# Loaded by every Python process of the run below (PYTHONPATH): the second process's engine save fails as
# on a full disk, the first's works.
FAIL_ON_RANK_1 = """
import errno, os
if os.environ.get("RANK") == "1":
    import accelerate

    def save_state(self, output_dir=None, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", output_dir)

    accelerate.Accelerator.save_state = save_state
"""


@pytest.mark.slow
def test_a_save_failing_on_one_process_stops_every_process(tmp_path):
    """Sharded checkpoints are written by every process: when one cannot write its part, all of them stop
    (none waits at a collective for it), each says which process failed, and no half-written checkpoint
    is left."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    run_dir = tmp_path / "run"
    args = [*RUN, "max_steps=4", "eval_steps=0", "per_device_train_batch_size=8", "save_steps=2"]
    args += ["hardware.checkpoint_format=accelerate", f"hydra.run.dir={run_dir}"]
    res = two_processes(*args, cwd=tmp_path, inject=tmp_path / "inject", timeout=600)
    assert res.returncode != 0
    step2 = run_dir / "checkpoints" / "step-000002"
    # the failing process says what it could not write; the other names it (each exits 2 with its message)
    assert f"could not write checkpoint {step2} ({step2}.tmp/engine): No space left on device" in res.stderr
    assert f"process 1 of 2 could not write checkpoint {step2}" in res.stderr, res.stderr[-3000:]
    # one record of the failure, the main process's (every process wrote it, the last one's words standing)
    assert json.loads((run_dir / "error.json").read_text())["error"].startswith("process 1 of 2 could not write")
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())
    assert "simpo_exp/" not in res.stderr and not (run_dir / "summary.json").exists()  # no traceback of ours


# Loaded by every Python process of the run below: the second process is given one more override than the first.
ANOTHER_BETA_ON_RANK_1 = """
import os
import sys
from types import SimpleNamespace

if os.environ.get("RANK") == "1":
    sys.argv.append("beta=5")
"""


@pytest.mark.slow
def test_processes_given_different_settings_are_refused_naming_them(tmp_path):
    """Two processes of one run given different settings (here an override that reaches one of them; a sweeper
    drawing values on each would do the same) stop at set-up, every process, with the setting and each
    process's value named, before any step: they would otherwise train one model on a mix of the two."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(ANOTHER_BETA_ON_RANK_1)
    args = [*RUN, "max_steps=1", "eval_steps=0", "per_device_train_batch_size=8", f"hydra.run.dir={tmp_path / 'run'}"]
    res = two_processes(*args, cwd=tmp_path, inject=tmp_path / "inject", timeout=300)
    assert res.returncode != 0
    assert "different settings: beta: process 0 2.0, process 1 5.0" in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# Loaded by every Python process of the run below (PYTHONPATH): the main process takes two minutes to write the
# model (as on a slow disk) while the other waits for it at a collective.
SLOW_MODEL_WRITE_ON_RANK_0 = """
import os
if os.environ.get("RANK") == "0":
    import time

    import simpo_exp.train

    save_final_model = simpo_exp.train.save_final_model

    def slow(*args):
        time.sleep(12)  # past the 5 s timeout, with room for process 1 to reach its wait late
        return save_final_model(*args)

    simpo_exp.train.save_final_model = slow
"""


def test_every_collective_timeout_reaches_the_process_group():
    """accelerate hands init_process_group only the handler fields that differ from its defaults, and its default
    timeout is NCCL's 600 s: hardware.collective_timeout=600 was dropped, so a gloo run waited 1800 s. Each value
    now reaches it (600 within a microsecond)."""
    from simpo_exp.engine import process_group_kwargs

    for seconds in (5.0, 600.0, 1800.0):
        passed = process_group_kwargs(seconds).to_kwargs()
        assert passed["timeout"].total_seconds() == pytest.approx(seconds, abs=1e-5), seconds
        assert passed["backend"] is None  # accelerate picks nccl or gloo, as without the handler


def test_adamw_is_fused_on_a_gpu_except_under_deepspeed():
    """transformers' default (adamw_torch_fused) on CUDA, under DDP and FSDP too; DeepSpeed steps its own
    partitions, and a CPU keeps torch's default."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from simpo_exp.engine import adamw_fused

    def on(device, engine):
        return adamw_fused(SimpleNamespace(device=torch.device(device), distributed_type=engine))

    for engine in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.FSDP):
        assert on("cuda", engine) is True and on("cpu", engine) is None
    assert on("cuda", DistributedType.DEEPSPEED) is None


def test_weight_decay_leaves_biases_and_norm_weights_alone_as_trl_does(compose):
    """AdamW decayed every parameter: an RMSNorm's gain was pulled towards 0, where transformers' Trainer (and so
    TRL) decays the weights alone. One step on zero gradients moves only what is decayed, by lr x weight_decay."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    from simpo_exp.engine import adamw

    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, attention_bias=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = adamw(model, compose("weight_decay=0.1"), 0.5, fused=None)  # torch's default, as on a CPU
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    kept = {n for n in before if n not in decayed}
    assert any("norm" in n for n in kept) and any(n.endswith("bias") for n in kept) and decayed
    for name, p in model.named_parameters():
        factor = 1 - 0.5 * 0.1 if name in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)
    assert len(adamw(model, compose("weight_decay=0"), 0.5, fused=None).param_groups) == 1  # as older checkpoints hold


def test_a_checkpoint_of_one_parameter_group_resumes_into_the_weight_decay_groups(compose):
    """Checkpoints written before weight decay left biases and norms out hold AdamW's state as one group; loaded
    into the two groups it failed, and the run called its intact checkpoints damaged. Each parameter's moments and
    step now go to the group it is in, which keeps its own weight decay."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_exp.checkpoint import _join_optimizer_state, _split_optimizer_state, regrouped
    from simpo_exp.engine import adamw

    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, attention_bias=True))
    before = adamw(model, compose("weight_decay=0"), 0.5, fused=None)  # one group, as the older version built it
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        before.step()
    saved = _join_optimizer_state(*_split_optimizer_state(before.state_dict()))  # as a checkpoint holds it
    after = adamw(model, compose("weight_decay=0.1"), 0.5, fused=None)
    assert len(saved["param_groups"]) == 1 and len(after.param_groups) == 2
    after.load_state_dict(regrouped(saved, after, model))
    assert [g["weight_decay"] for g in after.param_groups] == [0.1, 0.0]
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(after.state[p][key], before.state[p][key], msg=f"{name} {key}")
    assert regrouped(saved, before, model) is saved  # one group into one: as it is


@pytest.mark.slow
def test_a_wait_past_the_collective_timeout_stops_the_run(tmp_path):
    """hardware.collective_timeout reaches the process group: with 5 seconds, the process waiting for the main
    one's slow model write (12 s) gives up after 5 seconds, and the run fails naming the setting (with torch's
    default, 30 minutes on gloo, the write would finish and the run succeed)."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(SLOW_MODEL_WRITE_ON_RANK_0)
    args = [*RUN, "max_steps=1", "eval_steps=0", "per_device_train_batch_size=8", "hardware.collective_timeout=5"]
    res = two_processes(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, inject=tmp_path / "inject")
    assert res.returncode != 0
    assert "hardware.collective_timeout=5.0" in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "run" / "finished.json").exists()


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    res = simpo(
        "--multirun",
        "+launcher=local",
        "beta=2,5",
        *RUN[:-2],
        "max_steps=2",
        "eval_steps=0",
        "dataset.synthetic.num_train=64",
        "dataset.synthetic.num_test=16",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and all((j / "summary.json").exists() for j in jobs)
    assert list((sweep / ".submitit").iterdir())  # really ran through submitit


@pytest.mark.slow
def test_a_submitit_job_of_two_tasks_trains_with_one_of_them_holding_the_folder(tmp_path):
    """The folder lock was taken before the launcher's ranks were exported: each task took itself for the main one,
    the second was refused ("in use by another job") and the first waited for it at the first collective."""
    sweep = tmp_path / "sweep"
    res = simpo(
        "--multirun",
        "+launcher=local",
        "hydra.launcher.tasks_per_node=2",
        "beta=2",
        *RUN[:-2],
        "max_steps=2",
        "eval_steps=0",
        "hardware.collective_timeout=120",
        "dataset.synthetic.num_train=64",
        "dataset.synthetic.num_test=16",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        # submitit draws the tasks' rendezvous port from the job id, in 20000-60000, which overlaps the ports the
        # kernel hands out to other tests' connections: the main task once failed to bind and the other waited 120 s
        env={"MASTER_PORT": str(free_port())},
    )
    logs = "".join(p.read_text(errors="replace") for p in (sweep / ".submitit").rglob("*.err"))
    assert res.returncode == 0, res.stderr[-2000:] + logs[-3000:]
    jobs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert "in use by another job" not in logs and len(jobs) == 1 and (jobs[0] / "summary.json").exists()


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_launcher_presets_compose(compose, launcher):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(
            config_name="config", overrides=[f"+launcher={launcher}", "output_dir=/tmp/x"], return_hydra_config=True
        )
    assert "submitit" in cfg.hydra.launcher._target_


@pytest.mark.parametrize("gpus", [8, 0])
def test_the_slurm_preset_renders_a_job_whose_tasks_each_get_their_cpus(tmp_path, monkeypatch, gpus):
    """The sbatch file submitit writes for ``+launcher=slurm`` (its parameters handed over as hydra-submitit-launcher
    does): one task per GPU (one on a node given none: ``gpus_per_node=0`` once asked for no task), USR2 before the
    time limit, and srun told the tasks' CPU count, which from Slurm 22.05 some releases no longer pass on from the
    job (each task pinned to one core)."""
    import submitit
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    import simpo_exp.runinfo  # noqa: F401  (registers the presets' resolvers, as `python -m simpo_exp` does)
    from tests.conftest import CONF

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")  # submitit's slurm executor looks for it
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = ["+launcher=slurm", "output_dir=/tmp/x", f"hydra.sweep.dir={tmp_path}"]
        overrides += [f"hydra.launcher.gpus_per_node={gpus}"]
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    folder, timeouts = params.pop("submitit_folder"), params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster="slurm", folder=folder, slurm_max_num_timeout=timeouts)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    lines = [f"--ntasks-per-node={max(gpus, 1)}", "--cpus-per-task=12", "--signal=USR2@300"]
    for line in lines + [f"--gpus-per-node={gpus}"] * (gpus > 0):
        assert f"#SBATCH {line}\n" in text, text
    assert text.index("export SRUN_CPUS_PER_TASK=12\n") < text.index("\nsrun "), text
    assert f"#SBATCH --job-name=simpo-{tmp_path.name}\n" in text, text  # the sweep's, not "__main__"


@pytest.mark.parametrize("preset", options("hardware"))
def test_hardware_presets(compose, preset):
    cfg = to_config(compose(f"hardware={preset}"))
    h = cfg.hardware
    if preset in ("ddp", "fsdp", "zero2", "zero3", "zero3-offload", "ddp-lora"):
        assert h.effective_batch_size == 128 and h.mixed_precision == "bf16" and h.gradient_checkpointing
    if preset.startswith("zero"):
        assert h.deepspeed_config and (CONF_ROOT / h.deepspeed_config).exists()
    if preset.endswith("lora"):
        assert h.lora


def test_effective_batch_is_kept_across_device_counts(compose):
    from simpo_exp.engine import accumulation_steps

    cfg = to_config(compose("hardware=ddp", "per_device_train_batch_size=2"))
    assert [accumulation_steps(cfg, n) for n in (1, 2, 4, 8)] == [64, 32, 16, 8]
    cfg = to_config(compose("hardware=ddp", "per_device_train_batch_size=3"))
    with pytest.raises(ConfigError, match="effective_batch_size=128"):
        accumulation_steps(cfg, 8)
    # 2 pairs on each of 3 devices: 21 steps would train on 126 pairs, not the recipe's 128
    cfg = to_config(compose("hardware=ddp", "per_device_train_batch_size=2"))
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size \(2\) x processes \(3\)"):
        accumulation_steps(cfg, 3)


def test_deepspeed_preset_without_deepspeed_says_how_to_install(tmp_path):
    (tmp_path / "inject").mkdir()  # DeepSpeed is in the test extras: this run cannot import it
    (tmp_path / "inject" / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None\n")
    path = os.pathsep.join([str(tmp_path / "inject"), os.environ.get("PYTHONPATH", "")])
    res = simpo(
        "hardware=zero3", "hardware.device=cpu", "hardware.mixed_precision=no", *RUN[1:], cwd=tmp_path,
        env={"PYTHONPATH": path},
    )  # fmt: skip
    assert res.returncode == 2 and "needs DeepSpeed" in res.stderr and ".[gpu]" in res.stderr


def test_lora_trains_adapters_only(tmp_path, compose):
    run = tmp_path / "run"
    overrides = ("hardware=cpu-lora", *RUN[1:], "max_steps=4")
    res = simpo(*overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = load_file(run / "model" / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert json.loads((run / "model" / "adapter" / "adapter_config.json").read_text())["r"] == 16
    merged = load_file(run / "model" / "model.safetensors")  # the base with the adapters merged in
    assert merged and not any("lora_" in k for k in merged)
    # the start weights, drawn again from the run's config and seed: what LoRA does not target (embeddings, norms,
    # head) is as it started, and what it targets moved by the merged adapters
    from simpo_exp.model import load_model, load_tokenizer

    cfg = to_config(compose(*overrides, "hardware.lora=false"))  # the model before the adapters are added
    start = load_model(cfg, load_tokenizer(cfg.model), "sdpa").state_dict()
    targeted = tuple(cfg.hardware.lora_target_modules)
    untouched = [k for k in merged if not any(f".{m}." in k for m in targeted)]
    assert untouched and all(torch.equal(merged[k], start[k]) for k in untouched), untouched
    assert all(not torch.equal(merged[k], start[k]) for k in merged if k not in untouched)


@pytest.mark.parametrize("config", sorted(p.name for p in (CONF_ROOT / "launchers").glob("*.yaml")))
def test_each_launcher_config_forms_one_group_over_two_nodes(config, monkeypatch):
    """What ``accelerate launch --config_file launchers/X.yaml --num_machines 2 --machine_rank 1 ...`` (the sbatch
    script's command on the second node) hands to torchrun: 2 nodes, this one rank 1, 8 processes on it, the first
    node's address. The DeepSpeed configs left accelerate's multi-node launcher at its default, pdsh, which ran
    `deepspeed --hostfile None`: each node trained alone on its 8 GPUs, on 127.0.0.1. And their DeepSpeed plugin
    builds: a `mixed_precision` beside the DeepSpeed file failed every launch as the README writes it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(CONF_ROOT)  # the configs name their DeepSpeed files from the project's root
    line = ["--config_file", f"launchers/{config}", "--num_machines", "2", "--num_processes", "16"]
    line += ["--machine_rank", "1", "--main_process_ip", "gpu-001", "--main_process_port", "29500"]
    args, defaults, from_config = _validate_launch_command(launch_command_parser().parse_args([*line, "-m", "x"]))
    if args.use_deepspeed:  # as accelerate's launch_command and deepspeed_launcher do
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if from_config else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        cmd, env = prepare_deepspeed_cmd_env(args)
        assert cmd is None, cmd  # None: torchrun with the args below
        # what each process then builds: a mixed_precision in the config beside its DeepSpeed file was refused here
        from accelerate.utils import DeepSpeedPlugin

        for key, value in env.items():
            if key.startswith("ACCELERATE_"):
                monkeypatch.setenv(key, value)
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision("bf16")  # the hardware preset's, as the Accelerator passes it on
        assert plugin.deepspeed_config["bf16"]["enabled"] is True
        # the launcher runs the ZeRO stage and offload of the hardware preset of its name (check_engine refuses
        # another at start-up), and ZeRO-3 builds the model partitioned (whole on every process: a 70B's host memory)
        from simpo_exp.engine import zero_layout

        preset = yaml.safe_load((CONF_ROOT / "conf" / "hardware" / config).read_text())
        asked = json.loads((CONF_ROOT / preset["deepspeed_config"]).read_text())
        assert zero_layout(plugin.deepspeed_config) == zero_layout(asked)
        assert plugin.zero3_init_flag is (plugin.zero_stage == 3)
    else:
        for key, value in prepare_multi_gpu_env(args).items():
            if key.startswith(("ACCELERATE_", "FSDP_")):
                monkeypatch.setenv(key, value)
        if args.use_fsdp:  # FSDP2, sharded checkpoints (not the whole model gathered at each save), no offload,
            from accelerate.utils import FullyShardedDataParallelPlugin  # each decoder layer its own unit

            from simpo_exp.memory import fsdp_offloads

            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "SHARDED_STATE_DICT"
            assert not fsdp_offloads(plugin) and "transformer" in plugin.auto_wrap_policy.__name__
    assert (args.use_deepspeed, args.use_fsdp) == (config.startswith("zero"), config == "fsdp.yaml")
    assert args.multi_gpu or args.use_deepspeed or args.use_fsdp  # not one process training alone
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    # launched on one node as the README writes it (no --num_processes): one process for each of its 8 GPUs
    assert yaml.safe_load((CONF_ROOT / "launchers" / config).read_text())["num_processes"] == 8
    assert "gpu-001" in (getattr(args, "master_addr", None), getattr(args, "rdzv_endpoint", "").split(":")[0])


def test_a_submitit_task_gets_its_ranks_and_keeps_a_rendezvous_port_the_user_set(monkeypatch):
    """submitit's own export refuses to run where MASTER_PORT is set (SLURM templates export it): every task then
    took itself for a one-process job. The task's ranks are exported beside the user's port and address, and of the
    node's GPUs listed in CUDA_VISIBLE_DEVICES the task keeps its own."""
    from simpo_exp.runinfo import export_launcher_distributed_env

    task = {"JOB_ID": "77", "NTASKS": "2", "JOB_NUM_NODES": "1", "NODEID": "0", "GLOBALID": "1", "LOCALID": "1"}
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in keys and not k.startswith("SUBMITIT")}
    env |= {f"SUBMITIT_LOCAL_{k}": v for k, v in task.items()} | {"SUBMITIT_EXECUTOR": "local"}
    monkeypatch.setattr(os, "environ", env | {"MASTER_PORT": "31338", "CUDA_VISIBLE_DEVICES": "4,5"})
    export_launcher_distributed_env()
    ranks = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
    assert [os.environ[k] for k in ranks] == ["1", "2", "1", "2", "31338", "5"]
    assert os.environ["MASTER_ADDR"]  # the first node's name
    monkeypatch.setattr(os, "environ", dict(env))  # nothing set: submitit's port, drawn from the job id
    export_launcher_distributed_env()
    assert os.environ["RANK"] == "1" and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_deepspeed_without_a_launcher_gets_a_one_process_group(monkeypatch):
    from simpo_exp.engine import single_process_env

    # a private copy of the environment: the variables set here must not leak into later runs
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in keys})
    os.environ["MASTER_PORT"] = "31337"  # the user's choice is kept
    single_process_env()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"] == "31337"
    os.environ |= {"LOCAL_RANK": "3", "WORLD_SIZE": "8"}  # started by a launcher: nothing is touched
    single_process_env()
    assert os.environ["WORLD_SIZE"] == "8"


def test_engine_checkpoint_needs_the_engine_to_load(tmp_path):
    from simpo_exp.checkpoint import CheckpointError, load

    (tmp_path / "engine").mkdir()
    (tmp_path / "state.json").write_text(json.dumps({"config": {"beta": 2.0}}))
    with pytest.raises(CheckpointError, match="sharded engine.*checkpoint_format=accelerate"):
        load(tmp_path, None, None, None, {"beta": 2.0})


def test_a_sharding_preset_that_would_run_unsharded_is_refused():
    """hardware=fsdp without the FSDP launcher config, or a DeepSpeed preset on the CPU (where accelerate sets
    DeepSpeed aside), trained the whole model per process under the preset's name."""
    from accelerate.utils import DistributedType

    from simpo_exp.engine import check_engine

    fsdp, zero3 = (
        SimpleNamespace(name="fsdp", deepspeed_config=None),
        SimpleNamespace(name="zero3", deepspeed_config="launchers/ds_zero3.json"),
    )
    with pytest.raises(ConfigError, match="hardware=fsdp asks for FSDP, but accelerate set up MULTI_CPU"):
        check_engine(fsdp, DistributedType.MULTI_CPU)
    with pytest.raises(ConfigError, match="hardware=zero3 asks for DEEPSPEED, but accelerate set up NO"):
        check_engine(zero3, DistributedType.NO)
    check_engine(fsdp, DistributedType.FSDP)
    check_engine(zero3, DistributedType.DEEPSPEED)
    check_engine(SimpleNamespace(name="ddp", deepspeed_config=None), DistributedType.NO)  # one process of ddp: fine


def test_a_deepspeed_preset_under_another_presets_launcher_is_refused():
    """hardware=zero2 started with launchers/zero3.yaml ran ZeRO-3 (the launcher's JSON wins) under zero2's name."""
    import json

    from accelerate.utils import DistributedType

    from simpo_exp.engine import check_engine

    root = Path(__file__).resolve().parents[1]
    launcher = lambda name: json.loads((root / "launchers" / f"ds_{name}.json").read_text())  # noqa: E731
    zero2 = SimpleNamespace(name="zero2", deepspeed_config="launchers/ds_zero2.json")
    offload = SimpleNamespace(name="zero3-offload", deepspeed_config="launchers/ds_zero3_offload.json")
    with pytest.raises(ConfigError, match=r"hardware=zero2 asks for DeepSpeed \{'stage': 2.*runs \{'stage': 3"):
        check_engine(zero2, DistributedType.DEEPSPEED, launcher("zero3"))
    with pytest.raises(ConfigError, match="launchers/zero3-offload.yaml"):
        check_engine(offload, DistributedType.DEEPSPEED, launcher("zero3"))
    check_engine(zero2, DistributedType.DEEPSPEED, launcher("zero2"))
    check_engine(offload, DistributedType.DEEPSPEED, launcher("zero3_offload"))


@pytest.mark.parametrize("name", sorted(p.name for p in (CONF_ROOT / "launchers").glob("ds_*.json")))
def test_each_deepspeed_json_is_deepspeeds_own_zero_schema(name):
    """A misspelt ZeRO key (stage3_prefetch_bucket_sizes) is refused by DeepSpeed only when the engine starts, on
    the cluster; and without stage3_gather_16bit_weights_on_model_save a ZeRO-3 run's final save (the whole model
    from its shards) fails after all its training."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = json.loads((CONF_ROOT / "launchers" / name).read_text())["zero_optimization"]
    DeepSpeedZeroConfig(**{k: 10**6 if v == "auto" else v for k, v in zero.items()})  # refuses an unknown key
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_deepspeed_accumulation_or_clipping_fixed_outside_the_run_is_refused(monkeypatch):
    """accelerate launch --gradient_accumulation_steps 4 (or a number in the JSON) made DeepSpeed update every 4
    micro-batches while the loop stepped every 2: one real update logged as two steps, one of them "skipped"; a
    JSON's gradient_clipping clipped at its own norm while the records said max_grad_norm."""
    from accelerate.utils import DeepSpeedPlugin

    from simpo_exp.engine import check_deepspeed_steps

    json_path = str(Path(__file__).resolve().parents[1] / "launchers" / "ds_zero3.json")
    check_deepspeed_steps(DeepSpeedPlugin(hf_ds_config=json_path).deepspeed_config, 2, 0.05)  # "auto": the run's
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # as accelerate launch's flag passes it
    with pytest.raises(ConfigError, match="sets gradient_accumulation_steps=4, but this run accumulates 2"):
        check_deepspeed_steps(DeepSpeedPlugin(hf_ds_config=json_path).deepspeed_config, 2, 0.05)
    check_deepspeed_steps(DeepSpeedPlugin(hf_ds_config=json_path).deepspeed_config, 4, 0.05)  # the same count: fine
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")  # fewer than the run's: refused too
    with pytest.raises(ConfigError, match="sets gradient_accumulation_steps=1, but this run accumulates 4"):
        check_deepspeed_steps(DeepSpeedPlugin(hf_ds_config=json_path).deepspeed_config, 4, 0.05)
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")
    with pytest.raises(ConfigError, match="sets gradient_clipping=1.0, but this run's max_grad_norm=0.05"):
        check_deepspeed_steps(DeepSpeedPlugin(hf_ds_config=json_path).deepspeed_config, 2, 0.05)
    check_deepspeed_steps(DeepSpeedPlugin(hf_ds_config=json_path).deepspeed_config, 2, 1.0)


def test_a_random_init_under_a_zero3_config_draws_the_weights_one_process_draws(compose):
    """accelerate's zero3_init_flag registers the ZeRO-3 config with transformers, which then builds every model
    under deepspeed.zero.Init: a seeded random init drawn partition by partition started a ZeRO-3 run from other
    weights than DDP's (step-1 log-probs -5.532 vs -5.438). Built outside it, the weights are one process's; the
    registration is back afterwards, for the loads that need it."""
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from simpo_exp.model import load_model, load_tokenizer, outside_zero3_init

    cfg = to_config(compose("hardware=cpu", "model.random_init.num_hidden_layers=1"))
    tok = load_tokenizer(cfg.model)
    plain = load_model(cfg, tok, "sdpa").state_dict()
    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with outside_zero3_init():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
        again = load_model(cfg, tok, "sdpa").state_dict()
        assert is_deepspeed_zero3_enabled()
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    assert registered is not None and set(again) == set(plain)
    assert all(torch.equal(again[k], plain[k]) for k in plain)


def test_a_deepspeed_config_whose_settings_the_launchers_config_overrides_is_said(tmp_path, caplog):
    """Under accelerate launch the launcher's DeepSpeed file runs; hardware.deepspeed_config is read for its ZeRO
    stage and offload only: a tuned copy (bucket sizes, live-parameter limits) was accepted and never used."""
    import json

    from accelerate.utils import DistributedType

    from simpo_exp.engine import check_engine

    root = Path(__file__).resolve().parents[1]
    launcher = json.loads((root / "launchers" / "ds_zero3.json").read_text())
    tuned = json.loads(json.dumps(launcher))
    tuned["zero_optimization"] |= {"stage3_max_live_parameters": 1e8, "sub_group_size": 1e8}
    (tmp_path / "mine.json").write_text(json.dumps(tuned))
    mine = SimpleNamespace(name="zero3", deepspeed_config=str(tmp_path / "mine.json"))
    with caplog.at_level("WARNING", logger="simpo_exp.engine"):
        check_engine(mine, DistributedType.DEEPSPEED, launcher)
    assert "zero_optimization.stage3_max_live_parameters=100000000.0 (runs 'unset')" in caplog.text
    assert "zero_optimization.sub_group_size" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="simpo_exp.engine"):
        check_engine(
            SimpleNamespace(name="zero3", deepspeed_config="launchers/ds_zero3.json"),
            DistributedType.DEEPSPEED,
            launcher,
        )
    assert not caplog.text  # the preset's own file under its own launcher
    # what accelerate fills in for "auto" is no setting of the user's; a value the launcher's file changed is said
    running = json.loads(json.dumps(launcher))
    running |= {"bf16": {"enabled": True}, "gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 4}
    zero3 = SimpleNamespace(name="zero3", deepspeed_config="launchers/ds_zero3.json")
    caplog.clear()
    with caplog.at_level("WARNING", logger="simpo_exp.engine"):
        check_engine(zero3, DistributedType.DEEPSPEED, running)
    assert not caplog.text
    running["zero_optimization"]["overlap_comm"] = not launcher["zero_optimization"]["overlap_comm"]
    with caplog.at_level("WARNING", logger="simpo_exp.engine"):
        check_engine(zero3, DistributedType.DEEPSPEED, running)
    overlap = launcher["zero_optimization"]["overlap_comm"]
    assert f"zero_optimization.overlap_comm={overlap!r} (runs {not overlap!r})" in caplog.text


@pytest.mark.slow
def test_processes_started_seconds_apart_share_one_default_run_folder(tmp_path):
    """Each process resolved the default run folder (outputs/runs/${now:...}) at its own start: a rank whose imports
    took a second longer wrote a folder of its own (its config and log), which compare listed as a run "running"
    for good. The folder is now named after the launcher's start, which the processes share."""
    inject = tmp_path / "inject"
    inject.mkdir()
    delay = 'import os, time\nif os.environ.get("RANK") == "1":\n    time.sleep(2.5)\n'  # rank 1 starts later
    (inject / "sitecustomize.py").write_text(delay)
    args = ["hardware=cpu", "logger=none", "max_steps=1", "eval_steps=0", "eval_on_start=false", "num_generations=0"]
    args += ["dataset.synthetic.num_train=32", "dataset.synthetic.num_test=16"]
    res = two_processes(*args, cwd=tmp_path, inject=inject, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (folder,) = (tmp_path / "outputs" / "runs").iterdir()
    assert (folder / "finished.json").is_file()


def test_the_launch_time_is_the_elastic_agents_only_under_one(monkeypatch):
    """The parent's start names the folder only where torch's elastic agent started this process: a process given
    RANK/WORLD_SIZE by hand has a shell for a parent, which may have started days ago."""
    import datetime

    from simpo_exp.runinfo import _process_start, launch_time

    parent = datetime.datetime.fromtimestamp(_process_start(os.getppid())).strftime("%Y%m%d%H%M%S")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    before = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    assert before <= launch_time("%Y%m%d%H%M%S")  # by hand: this process's own time
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launch_time("%Y%m%d%H%M%S") == parent


def test_a_submitit_task_on_a_later_node_keeps_its_own_gpu_and_the_users_address(monkeypatch):
    """On a job of two nodes, a task's global rank is not its local rank: of the node's GPUs listed in
    CUDA_VISIBLE_DEVICES it keeps the one of its local rank; a MASTER_ADDR the user exported is kept, as MASTER_PORT
    is; a list that does not give one GPU per task of the node is left as it is."""
    from simpo_exp.runinfo import export_launcher_distributed_env

    task = {"JOB_ID": "77", "NTASKS": "4", "JOB_NUM_NODES": "2", "NODEID": "1", "GLOBALID": "3", "LOCALID": "1"}
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in keys and not k.startswith("SUBMITIT")}
    env |= {f"SUBMITIT_LOCAL_{k}": v for k, v in task.items()} | {"SUBMITIT_EXECUTOR": "local"}
    mine = {"MASTER_ADDR": "node-a-ib0", "MASTER_PORT": "31338", "CUDA_VISIBLE_DEVICES": "4,5"}
    monkeypatch.setattr(os, "environ", env | mine)
    export_launcher_distributed_env()
    ranks = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    assert [os.environ[k] for k in ranks] == ["3", "4", "1", "2", "node-a-ib0", "31338"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setattr(os, "environ", env | {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})  # not one per task: left as is
    export_launcher_distributed_env()
    assert os.environ["RANK"] == "3" and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
