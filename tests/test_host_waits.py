"""A training step's loss never makes the host wait for the GPU.

A GPU runs its queue of work while the host goes on queueing more. An operation that needs a device tensor's
value on the host (``.item()``, ``if tensor:``, ``.tolist()``), one whose output size depends on the data
(``nonzero``, boolean indexing, ``bincount``) and a copy from ordinary host memory all make the host wait until
the queue has run out; the GPU then idles while the host queues the next kernels. These tests run the policy's
forward, the loss and the backward on the ``meta`` device, where tensors have shapes but no values, under a
dispatch mode that records each such operation with the line of code that asked for it. None may come from
this project. The libraries' own are allowed and listed: transformers checks whether a padded batch has any
padding, and Liger's backward reads the gradient that reaches its loss.

What the meta device cannot show: whether a non-blocking copy's host memory is pinned (``host_to_device`` pins on
CUDA only; from ordinary memory a GPU copy waits even when asked not to). tests/test_gpu.py runs packed
FlexAttention rows under CUDA's own sync detector; the padded layout and the Liger head cannot run there, as
transformers' and Liger's own waits would trip it.
"""

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import simpo_exp
import simpo_exp.logps
from simpo_exp.config import Config
from simpo_exp.data.collate import PairCollator
from simpo_exp.fused import LigerPreferenceHead
from simpo_exp.logps import ResponseLogps, host_to_device
from simpo_exp.objective import batch_loss
from tests.test_perf_paths import make_model

aten = torch.ops.aten
OURS = Path(simpo_exp.__file__).parent
SIZE_FROM_DATA = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten.unique_dim.default}
ALLOWED = ("transformers/masking_utils.py", "liger_kernel/")  # see the module docstring


def asked_by() -> str:
    """The innermost frame outside torch: the code that asked for the operation."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [
        f
        for f in traceback.extract_stack()[:-1]  # not this function
        if not f.filename.startswith(torch_dir) and f.name not in ("__torch_dispatch__", "made_on_device")
    ]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class HostWaits(TorchDispatchMode):
    """Records (what, where) for every operation on a device tensor that makes the host wait. A value read is
    answered with 0 so that the code can go on (meta tensors have none); a size from data cannot be faked."""

    def __init__(self):
        super().__init__()
        self.waits: list[tuple[str, str]] = []
        self.made = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

    def __enter__(self):
        # torch.tensor(data, device=...) copies from host memory before any dispatch: watched at the call instead
        for name, make in self.made.items():
            setattr(torch, name, self.watched(make))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, make in self.made.items():
            setattr(torch, name, make)
        return super().__exit__(*exc)

    def watched(self, make):
        def made_on_device(*args, device=None, **kwargs):
            if device is not None and torch.device(device).type != "cpu":
                self.waits.append(("blocking copy from the host", asked_by()))
            return make(*args, device=device, **kwargs)

        return made_on_device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type != "cpu" for t in tensors)
        if func is aten._local_scalar_dense.default and on_device:
            self.waits.append(("value read", asked_by()))
            return 0
        if func in SIZE_FROM_DATA and on_device:
            self.waits.append((f"{func} (size from data)", asked_by()))
        if (
            func is aten.index.Tensor
            and on_device
            and any(i is not None and i.dtype == torch.bool for i in args[1] if isinstance(i, torch.Tensor))
        ):
            self.waits.append(("boolean indexing", asked_by()))
        if func is aten._to_copy.default and args[0].device.type == "cpu" and not kwargs.get("non_blocking"):
            if kwargs.get("device") is not None and kwargs["device"].type != "cpu":
                self.waits.append(("blocking copy from the host", asked_by()))
        return func(*args, **kwargs)

    def ours(self) -> list[tuple[str, str]]:
        return [w for w in self.waits if w[1].startswith(str(OURS))]

    def unexplained(self) -> list[tuple[str, str]]:
        return [w for w in self.waits if not w[1].startswith(str(OURS)) and not any(a in w[1] for a in ALLOWED)]


PAIRS = [
    {"prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5], "rejected_input_ids": [6, 7, 8]},
    {"prompt_input_ids": [9, 3], "chosen_input_ids": [4, 5, 9, 9, 9, 9, 9, 9], "rejected_input_ids": [6]},
    {"prompt_input_ids": [7], "chosen_input_ids": [2] * 20, "rejected_input_ids": [5] * 18},
]


def on_meta(batch: dict) -> dict:
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def shape_only_flex(device):
    """FlexAttention refuses meta tensors: an attention of the right shape, with a gradient, stands in."""

    def attend(query, key, value, **kwargs):
        return query * 1.0

    return attend


def step_on_meta(monkeypatch, packing: str, attention: str, chunk: int = 0, fused=None, sft_weight=0.0):
    monkeypatch.setattr(simpo_exp.logps, "flex_attention_fn", shape_only_flex)
    model = make_model(vocab=40).to("meta")
    batch = on_meta(PairCollator(0, packing=packing, attention=attention)(PAIRS))  # the loader's copy: not here
    policy = ResponseLogps(model, chunk_size=chunk, packing=packing, attention=attention, fused=fused)
    cfg = Config(sft_weight=sft_weight)
    waits = HostWaits()
    with waits:
        loss, stats, _ = batch_loss(policy, batch, cfg)
        loss.backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].self_attn.q_proj.weight.grad is not None
    return waits, stats


@pytest.mark.parametrize(
    "packing, attention, chunk",
    [
        ("none", "segments", 0),
        ("none", "segments", 7),
        ("packed", "segments", 0),
        ("prefix_shared", "segments", 7),
        ("packed", "mask", 0),
        ("packed", "flex", 0),
        ("prefix_shared", "flex", 0),
    ],
)
def test_no_layout_makes_the_host_wait(monkeypatch, packing, attention, chunk):
    waits, stats = step_on_meta(monkeypatch, packing, attention, chunk, sft_weight=0.5)
    assert waits.ours() == [] and waits.unexplained() == []
    # the statistics stay where they were made: the loop reads them only when it logs
    assert all(v.device.type in ("meta", "cpu") for v in stats.values())


@pytest.mark.parametrize("packing", ["none", "prefix_shared"])
def test_the_fused_head_plans_its_calls_without_waiting(monkeypatch, packing):
    pytest.importorskip("liger_kernel")
    head = LigerPreferenceHead("simpo", beta=2.0, gamma=1.0, label_smoothing=0.0, sft_weight=0.5)
    head.compiled, head.split_cost = False, 0  # eager Liger; split wherever a call saves padding (3 calls here)
    waits, _ = step_on_meta(monkeypatch, packing, "segments", fused=head, sft_weight=0.5)
    assert waits.ours() == [] and waits.unexplained() == []


def test_the_detector_sees_what_it_looks_for():
    """The checks above could pass by seeing nothing: the old ways of picking the scored tokens are seen."""
    mask = torch.tensor([[False, True, True], [True, False, True]], device="meta")
    ids = torch.zeros(2, 3, dtype=torch.long, device="meta")
    waits = HostWaits()
    with waits:
        with pytest.raises((RuntimeError, NotImplementedError)):  # meta tensors have no data to size it from
            ids[mask]
        float(ids.sum())  # a value read
        torch.ones(3).to("meta")  # a blocking copy from host memory
        torch.tensor([1.0, 2.0], device="meta")  # another
        host_to_device(torch.ones(3), torch.device("meta"))  # ... and the project's way: not one
    whats = [w for w, _ in waits.waits]
    assert whats[0] == "boolean indexing" and whats[1:] == ["value read"] + ["blocking copy from the host"] * 2, whats
    assert all(where.startswith(__file__) for _, where in waits.waits)
