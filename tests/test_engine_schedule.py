"""The learning-rate schedule (simpo_exp.engine.lr_schedule) against transformers' get_scheduler, which TRL and the
official SimPO trainer step by, and against hand-computed factors."""

import math
import subprocess
import sys

import pytest
import torch

from simpo_exp.config import SCHEDULERS
from simpo_exp.engine import lr_schedule


def optimizer(lr: float = 1e-6) -> torch.optim.AdamW:
    return torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=lr)


def rates(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (0, 7), (1, 1), (3, 10), (10, 100), (7, 7)])
def test_every_step_is_transformers_rate(kind, warmup, total):
    from transformers import get_scheduler

    theirs = get_scheduler(kind, optimizer(), num_warmup_steps=warmup, num_training_steps=total)
    assert rates(lr_schedule(optimizer(), kind, warmup, total), total + 2) == rates(theirs, total + 2)


def test_the_factors_by_hand():
    """10 steps, 2 of warm-up, at lr 1e-6: 0, 0.5, then the decays over the 8 after."""
    expected = {
        "cosine": [0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)] + [0.0],
        "linear": [0, 0.5] + [(8 - k) / 8 for k in range(8)] + [0.0],
        "constant_with_warmup": [0, 0.5] + [1.0] * 9,
        "constant": [1.0] * 11,
    }
    for kind, factors in expected.items():
        got = rates(lr_schedule(optimizer(1e-6), kind, 2, 10), 11)
        assert got == pytest.approx([1e-6 * f for f in factors], rel=1e-12, abs=1e-20), kind


def test_a_checkpoint_written_by_transformers_schedule_resumes_here():
    """Runs checkpointed before this schedule replaced transformers' hold its state_dict (a partial's empty
    __dict__ among the lambdas): loaded here, the rate goes on where it was."""
    from transformers import get_scheduler

    theirs = get_scheduler("cosine", optimizer(), num_warmup_steps=3, num_training_steps=20)
    rates(theirs, 9)
    ours = lr_schedule(optimizer(), "cosine", 3, 20)
    ours.load_state_dict(theirs.state_dict())
    assert rates(ours, 12) == rates(theirs, 12)


def test_a_run_imports_neither_transformers_trainer_nor_peft():
    """transformers' schedules live beside its Trainer: importing them imported transformers.trainer_utils and
    with it peft (about 2 s of every process's start on a CPU, every sweep job and rank)."""
    probe = (
        "import sys, torch\n"
        "import simpo_exp.train\n"
        "from simpo_exp.engine import lr_schedule\n"
        "lr_schedule(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), 'cosine', 1, 5)\n"
        "print(sorted(m for m in ('peft', 'transformers.trainer_utils', 'transformers.trainer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
