"""Partial and offloaded activation checkpointing (hardware.checkpoint_every_n_layers, hardware.checkpoint_offload;
simpo_exp.model.enable_checkpointing): which layers recompute, and that the gradients do not change."""

import pytest
import torch
import transformers.modeling_utils

from simpo_exp.config import ConfigError, to_config
from simpo_exp.model import checkpointed_layers, enable_checkpointing
from tests.test_layout_auto import run
from tests.test_perf_paths import assert_same, loss_and_grads, make_model, random_pairs

LAYERS = 4


def count_layer_forwards(model) -> list[int]:
    """A counter per decoder layer of its MLP's forward calls (a recomputed layer runs it twice a step). A pre-hook:
    the recompute stops as soon as it has rebuilt the last tensor the backward needs, inside the MLP."""
    counts = [0] * LAYERS
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("packing", ["none", "prefix_shared"])
def test_every_second_layer_recomputes_and_the_gradients_stay(packing):
    pairs = random_pairs(3, seed=11)
    runs = {}
    for name, every in (("none", None), ("all", 1), ("every 2", 2), ("every 3", 3)):
        model = make_model(layers=LAYERS)
        if every is not None:
            enable_checkpointing(model, every_n_layers=every)
        counts = count_layer_forwards(model)
        result = loss_and_grads(model, pairs, packing)
        # loss_and_grads runs forward + backward, then one more forward for the log-probs it returns
        runs[name] = (result, [c - 1 for c in counts], checkpointed_layers(model))
    assert runs["none"][1:] == ([1, 1, 1, 1], 0)
    assert runs["all"][1:] == ([2, 2, 2, 2], 4)
    assert runs["every 2"][1:] == ([2, 1, 2, 1], 2)  # layers 0 and 2 recompute, 1 and 3 keep their activations
    assert runs["every 3"][1:] == ([2, 1, 1, 2], 2)
    for name in ("all", "every 2", "every 3"):
        assert_same(runs["none"][0], runs[name][0])


def test_offload_routes_the_saved_inputs_through_host_memory(monkeypatch):
    """transformers wraps each checkpointed layer in torch's save_on_cpu. Without a GPU the run is refused (by
    name: there is no device memory to spare, and torch has no pinned memory to copy to); here, with a GPU
    pretended, the wrapper copies host to host, so what is checked is that it is entered per checkpointed
    layer and the gradients stay (tests/test_gpu.py measures the device memory it saves)."""
    with pytest.raises(ConfigError, match="hardware.checkpoint_offload=true needs a GPU"):
        enable_checkpointing(make_model(layers=LAYERS), offload=True)
    entered = []

    class Spy(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory, device_type):
            super().__init__(pin_memory=False)

        def __enter__(self):
            entered.append(1)
            return super().__enter__()

    monkeypatch.setattr(transformers.modeling_utils, "save_on_cpu", Spy)
    monkeypatch.setattr("simpo_exp.model.has_accelerator", lambda: True)
    pairs = random_pairs(3, seed=12)
    reference = loss_and_grads(make_model(layers=LAYERS), pairs)
    model = make_model(layers=LAYERS)
    enable_checkpointing(model, every_n_layers=2, offload=True)
    offloaded = loss_and_grads(model, pairs)
    assert len(entered) == 2 * 2  # two checkpointed layers, in the training forward and in the log-prob forward
    assert_same(reference, offloaded)


def test_an_older_transformers_gets_a_named_error(monkeypatch):
    model = make_model(layers=LAYERS)
    monkeypatch.setattr("simpo_exp.model.has_accelerator", lambda: True)

    def old_enable(gradient_checkpointing_kwargs=None):  # transformers < 5.16: no every_n_layers, no offload
        raise AssertionError("should not be called")

    monkeypatch.setattr(model, "activation_checkpointing_enable", None, raising=False)
    monkeypatch.setattr(model, "gradient_checkpointing_enable", old_enable)
    with pytest.raises(ConfigError, match=r"hardware.checkpoint_every_n_layers=2 needs transformers >= 5.17"):
        enable_checkpointing(model, every_n_layers=2)
    with pytest.raises(ConfigError, match=r"hardware.checkpoint_offload=True needs transformers"):
        enable_checkpointing(model, offload=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["hardware=gpu", "hardware.checkpoint_every_n_layers=0"],
            "hardware.checkpoint_every_n_layers=0: must be >= 1",
        ),
        (
            ["hardware=cpu", "hardware.checkpoint_every_n_layers=2"],
            "hardware.checkpoint_every_n_layers=2: has no effect",
        ),
        (["hardware=cpu", "hardware.checkpoint_offload=true"], "hardware.checkpoint_offload=True: has no effect"),
    ],
)
def test_bad_settings_are_named(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_config(compose(*overrides))


def test_a_run_records_its_checkpointed_layers(tmp_path):
    _, env = run(tmp_path, "run", "hardware.gradient_checkpointing=true", "hardware.checkpoint_every_n_layers=2")
    assert env["gradient_checkpointing"] is True and env["checkpoint_offload"] is False
    assert env["checkpointed_layers"] == 2  # the tiny model's 4 layers, every second one


def test_generating_from_a_partially_checkpointed_run_leaves_a_valid_config(compose):
    """The evaluate stage generates from a trained run with its config minus gradient checkpointing; the
    checkpointing knobs go with it, or the config would fail its own checks."""
    from simpo_exp.config import validate
    from simpo_exp.evaluate.runs import for_inference

    cfg = to_config(compose("hardware=gpu", "hardware.checkpoint_every_n_layers=2", "hardware.checkpoint_offload=true"))
    inference = validate(for_inference(cfg, "cpu"))
    assert not inference.hardware.gradient_checkpointing
    assert (inference.hardware.checkpoint_every_n_layers, inference.hardware.checkpoint_offload) == (1, False)


@pytest.mark.parametrize("packing", [pytest.param("none", marks=pytest.mark.slow), "prefix_shared"])
def test_compiled_layers_under_partial_checkpointing_match_eager(packing):
    """hardware.compile with every second layer checkpointed: dynamo sees checkpointed and plain layers side by
    side (one graph for the plain ones, the checkpoint region for the others); loss and gradients stay eager's."""
    from simpo_exp.compiled import compile_model, graphs_built
    from simpo_exp.logps import install_segment_attention
    from tests.test_compile import hardware

    torch._dynamo.reset()
    pairs = random_pairs(3, seed=13)
    eager = make_model(layers=LAYERS)
    twin = make_model(layers=LAYERS)
    enable_checkpointing(twin, every_n_layers=2)
    if packing != "none":
        install_segment_attention(twin)
    compile_model(twin, hardware("aot_eager", checkpointing=True))
    assert checkpointed_layers(twin) == 2
    before = graphs_built()
    assert_same(loss_and_grads(eager, pairs, packing), loss_and_grads(twin, pairs, packing))
    assert graphs_built() > before, "nothing was compiled"
