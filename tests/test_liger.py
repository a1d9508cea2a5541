"""hardware.fused_head=liger: Liger-Kernel's fused-linear preference losses against the project's padded path,
in the padded layout and in the packed ones.

Float32 on CPU (Liger's chunked losses are plain torch; run uncompiled here): on the same batch the fused
path's loss, the gradients of the output head, the embedding, an attention weight and the final norm, the
rewards and every logged statistic equal the padded path's within 1e-5 absolute (+1e-4 relative for
gradients). The statistics Liger cannot produce (entropy, top-1 accuracy) are absent, not zero. Skipped
where liger-kernel is not installed (pip install -e ".[gpu]"); the refusals are tested either way.
"""

import json
import sys

import pytest
import torch
from torch import nn

from simpo_exp.config import ConfigError, to_config
from simpo_exp.data.collate import PairCollator
from simpo_exp.fused import FusedPreference, fused_head, width_groups
from simpo_exp.layout import BatchLayout, choose_layout
from simpo_exp.logps import ResponseLogps
from simpo_exp.objective import batch_loss
from tests.test_perf_paths import make_model, random_pairs

PAD = 0
ATOL, RTOL = 1e-5, 1e-4
ABSENT = ("entropy", "mean_token_accuracy")
CASES = {
    "simpo": ("beta=2.0", "gamma_beta_ratio=0.5", "label_smoothing=0.1", "sft_weight=0.3"),
    "simpo-no-sft": ("beta=2.5", "gamma=1.2"),
    "cpo": ("loss=cpo", "label_smoothing=0.05"),
    "orpo": ("loss=orpo", "beta=0.5"),
    "orpo-nll-0.4": ("loss=orpo", "beta=0.5", "sft_weight=0.4"),  # Liger's ORPO module has no NLL weight
    "orpo-no-nll": ("loss=orpo", "sft_weight=0"),
}


def config(compose, *overrides):
    return to_config(compose("hardware=cpu", "hardware.packing=none", *overrides))


def watched(model) -> dict[str, nn.Parameter]:
    return {
        "lm_head": model.lm_head.weight,
        "lm_head.bias": model.lm_head.bias,
        "embed": model.model.embed_tokens.weight,
        "q_proj": model.model.layers[0].self_attn.q_proj.weight,
        "norm": model.model.norm.weight,
    }


def with_bias(model):
    """The test model with a biased output head, so the fused path's bias correction is exercised."""
    old = model.lm_head
    model.lm_head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.normal_(0, 0.5)
    return model


def run(policy, batch, cfg, sft_tokens=None):
    model = policy.model
    model.zero_grad()
    loss, stats, (rewards, lengths) = batch_loss(policy, dict(batch), cfg, None, sft_tokens)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in watched(model).items()}
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, rewards, lengths, grads


def assert_like_padded(fused, plain, computed_apart=()) -> None:
    """``run``'s results of the fused head against the padded unfused path's: loss, every statistic but the two
    Liger does not compute (and ``computed_apart``, which a layout counts its own way), rewards, lengths and
    gradients (each non-zero)."""
    torch.testing.assert_close(fused[0], plain[0], atol=ATOL, rtol=0)
    assert set(fused[1]) == set(plain[1]) - set(ABSENT)
    for key in set(fused[1]) - set(computed_apart):
        # sums over the batch's pairs (up to ~60 here): float32 keeps ~4e-6 of them, hence the small rtol
        torch.testing.assert_close(fused[1][key], plain[1][key], atol=ATOL, rtol=1e-6, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(fused[2], plain[2], atol=ATOL, rtol=0)  # rewards per response
    torch.testing.assert_close(fused[3], plain[3])  # lengths
    for key, grad in fused[4].items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grad, plain[4][key], atol=ATOL, rtol=RTOL, msg=lambda m: f"grad {key}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_fused_head_equals_the_padded_path(compose, case, monkeypatch):
    pytest.importorskip("liger_kernel")
    cfg = config(compose, "hardware.fused_head=liger", *CASES[case])
    model = with_bias(make_model(vocab=96, seed=3))
    batch = PairCollator(PAD)(random_pairs(5, vocab=96, seed=7))  # uneven lengths: padding in every row
    head = fused_head(cfg, model)
    head.compiled = False  # compiling on a CPU takes long and changes nothing numerically
    fused = run(ResponseLogps(model, fused=head), batch, cfg)
    grads = []  # evaluation: Liger takes no gradients (a backward per call kept head-sized buffers), the same loss
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(1) or real_grad(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(batch_loss(ResponseLogps(model, fused=head), dict(batch), cfg)[0], fused[0])
    monkeypatch.undo()
    assert grads == []
    plain = run(ResponseLogps(model), batch, cfg)
    assert isinstance(ResponseLogps(model, fused=head)(**batch), FusedPreference)
    assert_like_padded(fused, plain)


@pytest.mark.parametrize("nll", [False, True])
def test_fused_orpo_gradient_is_finite_for_an_all_but_memorised_response(nll):
    """Liger's ORPO log odds take log1p(-e^x) of the mean log-prob x: for a response the model has all but
    memorised (x within ~3e-8 of 0 in float32) that is -inf and every gradient of the step NaN. The fused head's
    ORPO takes the unfused path's log odds: finite gradients, and the loss the unfused formula gives."""
    pytest.importorskip("liger_kernel")
    from simpo_exp.fused import ORPOLoss
    from simpo_exp.losses import orpo_loss

    weight = torch.zeros(50, 8)
    weight[0] = 3.0  # token 0's logit 24 against 0 for the others: log-prob -2e-9, 0.0 in float32
    weight = weight.requires_grad_()
    states = torch.ones(2, 6, 8, requires_grad=True)
    targets = torch.zeros(2, 6, dtype=torch.long)
    targets[1] = 3  # the rejected response: an unlikely token
    loss = ORPOLoss(beta=0.1, alpha=0.5, nll=nll, compiled=False)(weight, states, targets)[0]
    loss.backward()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(states.grad).all()
    means = (states @ weight.T).log_softmax(-1).gather(-1, targets[..., None])[..., 0].mean(-1)
    expected = orpo_loss(means[:1], means[1:], 0.1).losses.sum() + (0.5 * -means[0] if nll else 0.0)
    torch.testing.assert_close(loss, expected.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["simpo", "cpo", "orpo", "orpo-nll-0.4"])
def test_the_fused_heads_nll_term_takes_the_steps_denominator(compose, case):
    """In training the NLL term is divided by the optimizer step's chosen tokens per micro-batch
    (train.step_sft_tokens), not the batch's own: the fused head's Liger calls, split by width, weigh it the same."""
    pytest.importorskip("liger_kernel")
    cfg = config(compose, "hardware.fused_head=liger", *CASES[case])
    model = with_bias(make_model(vocab=96, seed=3))
    batch = PairCollator(PAD)(random_pairs(6, vocab=96, seed=9))
    head = fused_head(cfg, model)
    head.compiled, head.split_cost = False, 0  # several Liger calls, each one's alpha rescaled
    plain = run(ResponseLogps(model), batch, cfg, sft_tokens=37.5)
    assert plain[0] != run(ResponseLogps(model), batch, cfg)[0]  # the denominator counts
    assert_like_padded(run(ResponseLogps(model, fused=head), batch, cfg, sft_tokens=37.5), plain)


def test_the_fused_head_scales_the_logits_as_the_model_does(compose):
    """Liger reads the head's weight: a family that scales its logits in its forward (Granite: divided by
    logits_scaling) has its hidden states scaled before the head instead, which its bias-free head makes the same."""
    pytest.importorskip("liger_kernel")
    from tests.test_logps import scaled_model

    cfg = config(compose, "hardware.fused_head=liger")
    model = scaled_model("granite", 4.0, vocab=96)
    batch = PairCollator(PAD)(random_pairs(5, vocab=96, seed=7))
    head = fused_head(cfg, model)
    head.compiled = False
    results = []
    for policy in (ResponseLogps(model, fused=head), ResponseLogps(model)):
        model.zero_grad()
        loss, stats, (rewards, _) = batch_loss(policy, dict(batch), cfg)
        loss.backward()
        results.append((loss.detach(), stats["rewards/margins"], rewards.detach(), model.lm_head.weight.grad.clone()))
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, atol=ATOL, rtol=RTOL)
    with pytest.raises(ConfigError, match="scales its logits and its head has a bias"):
        fused_head(cfg, with_bias(model))


def test_unsupported_methods_and_settings_are_refused_by_name(compose):
    """By config validation, before a model or data set loads (it was refused once the model had loaded)."""
    model = make_model()
    for overrides, words in [
        (("loss=dpo",), "method='dpo'"),
        (("loss=alphapo",), "method='alphapo'"),
        (("loss_type=hinge",), "loss_type='hinge'"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
            config(compose, "hardware.fused_head=liger", *overrides)
    assert fused_head(config(compose), model) is None  # fused_head=none: the project's head
    from transformers import Gemma2Config, Gemma2ForCausalLM  # caps its logits (the gemma-2-9b-it recipe)

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    gemma = Gemma2ForCausalLM(Gemma2Config(**shape, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0))
    with pytest.raises(ConfigError, match="Liger does not cap the logits as this model does"):
        fused_head(config(compose, "hardware.fused_head=liger"), gemma)
    with pytest.raises(ConfigError, match="hardware.fused_head"):
        config(compose, "hardware.fused_head=triton")


def test_a_lora_adapter_on_the_output_head_is_refused_with_the_fused_head(compose):
    """Liger reads the head's weight as one tensor: a LoRA adapter on lm_head never trained (its lora_B stayed 0,
    the loss drifted from the plain head's), and nothing said so."""
    from types import SimpleNamespace

    pytest.importorskip("peft")
    from simpo_exp.model import add_lora

    h = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["lm_head", "q_proj"])
    with pytest.raises(ConfigError, match=r"hardware.fused_head='liger' .* without the LoRA adapter"):
        fused_head(config(compose, "hardware.fused_head=liger"), add_lora(make_model(), h))
    pytest.importorskip("liger_kernel")
    h.lora_target_modules = ["q_proj"]  # adapters elsewhere: the head is the model's own
    assert fused_head(config(compose, "hardware.fused_head=liger"), add_lora(make_model(), h)) is not None


@pytest.mark.parametrize("case", ["simpo", "cpo"])
@pytest.mark.parametrize(
    "layout", [BatchLayout("packed"), BatchLayout("prefix_shared"), BatchLayout("packed", "mask")], ids=str
)
def test_fused_head_in_the_packed_layouts_equals_the_padded_path(compose, case, layout):
    """The packed layouts hand the fused head their response tokens pair by pair (chosen, rejected, next pair);
    it groups them by row, so loss, statistics, rewards and gradients equal the padded unfused path's."""
    pytest.importorskip("liger_kernel")
    cfg = config(compose, "hardware.fused_head=liger", *CASES[case])
    model = with_bias(make_model(vocab=96, seed=3))
    pairs = random_pairs(4, vocab=96, seed=11)
    head = fused_head(cfg, model)
    head.compiled = False
    packed_batch = PairCollator(PAD, layout.packing, layout.attention)(pairs)
    fused = run(ResponseLogps.for_layout(model, layout, fused=head), packed_batch, cfg)
    model.set_attn_implementation("sdpa")  # the packed policy routed the attention through its hook
    plain = run(ResponseLogps(model), PairCollator(PAD)(pairs), cfg)
    assert_like_padded(fused, plain, computed_apart={"tokens"})  # prefix sharing computes each prompt once


def test_width_groups_split_the_pairs_where_it_saves_padding():
    """Widths 10, 2, 9, 3 (pairs 0-3). One call pads all 8 rows to 10: 80 positions. Two calls, {0, 2} at 10 and
    {3, 1} at 3: 40 + 12 = 52, the best of any two; worth a further call costing up to 27 positions, not 28
    (a tie keeps fewer calls). Four calls, one pair each: 20 + 18 + 6 + 4 = 48."""
    assert width_groups([10, 2, 9, 3], split_cost=0, max_calls=2) == [[0, 2], [3, 1]]
    assert width_groups([10, 2, 9, 3], split_cost=27, max_calls=2) == [[0, 2], [3, 1]]
    assert width_groups([10, 2, 9, 3], split_cost=28, max_calls=2) == [[0, 2, 3, 1]]
    assert width_groups([10, 2, 9, 3], split_cost=0, max_calls=4) == [[0], [2], [3], [1]]
    assert width_groups([5, 5, 5], split_cost=0) == [[0, 1, 2]]  # nothing to save: one call
    assert width_groups([7]) == [[0]]


@pytest.mark.parametrize("case", ["simpo-no-sft", "simpo", "cpo"])
@pytest.mark.parametrize("layout", [BatchLayout(), BatchLayout("prefix_shared")], ids=str)
def test_pairs_sent_in_groups_of_similar_width_equal_the_padded_path(compose, layout, case, monkeypatch):
    """Liger pads each call's rows to its longest; the head sends pairs of similar width together, weighs each
    call's loss by its share of the pairs and sums the calls' gradients. Loss, statistics, rewards and gradients
    equal the padded unfused path's, and Liger was called once per group, with no more than the group's width."""
    pytest.importorskip("liger_kernel")
    import simpo_exp.fused as fused_module

    cfg = config(compose, "hardware.fused_head=liger", *CASES[case])  # simpo and cpo: with an NLL term
    model = with_bias(make_model(vocab=96, seed=3))
    pairs = random_pairs(6, vocab=96, seed=5)
    head = fused_head(cfg, model)
    head.compiled, head.split_cost = False, 0  # split wherever a group saves any padding
    planned, widths = [], []
    real_loss = head._loss(False)

    def plan(*args, **kwargs):
        planned.append(width_groups(*args, **kwargs))
        return planned[-1]

    forward = real_loss.forward

    def call(weight, states, labels, bias=None):
        widths.append(states.shape[1])
        return forward(weight, states, labels, bias)

    monkeypatch.setattr(fused_module, "width_groups", plan)
    monkeypatch.setattr(real_loss, "forward", call)  # the module itself is kept: the head sets its alpha per call
    fused = run(ResponseLogps.for_layout(model, layout, fused=head), PairCollator(PAD, layout.packing)(pairs), cfg)
    model.set_attn_implementation("sdpa")
    plain = run(ResponseLogps(model), PairCollator(PAD)(pairs), cfg)

    groups = planned[0]
    assert len(groups) > 1 and sorted(i for g in groups for i in g) == list(range(6))
    assert len(widths) == len(groups) and widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    assert_like_padded(fused, plain, computed_apart={"tokens"})
    with torch.no_grad():  # evaluation: the same groups, no gradients taken
        torch.testing.assert_close(batch_loss(ResponseLogps.for_layout(model, layout, fused=head),
                                              PairCollator(PAD, layout.packing)(pairs), cfg)[0], fused[0])  # fmt: skip


def test_packing_auto_is_the_same_with_and_without_the_fused_head(compose):
    for device, packing in (("cpu", "prefix_shared"), ("cuda", "packed")):
        layouts = [
            choose_layout(to_config(compose("hardware=cpu", "hardware.packing=auto", *head)).hardware, device, config_)
            for head in ((), ("hardware.fused_head=liger",))
            for config_ in [make_model().config]
        ]
        assert layouts[0] == layouts[1] and layouts[0].packing == packing


def test_a_missing_package_says_how_to_install_it(compose, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel now raises ImportError
    cfg = config(compose, "hardware.fused_head=liger")
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[gpu\]"'):
        fused_head(cfg, make_model())


def test_a_fused_run_trains_and_logs_as_the_padded_run(compose, tmp_path):
    """Two short runs from the same seed, the fused head on prefix-shared batches and the project head on padded
    ones: the same losses and eval metrics, step by step; the fused run leaves out the two per-token metrics
    Liger does not compute."""
    pytest.importorskip("liger_kernel")
    from simpo_exp.train import train
    from tests.test_reliability import _tiny_config
    from tests.test_run import read_metrics

    rows = {}
    for head, packing in (("liger", "prefix_shared"), ("none", "none")):
        cfg = _tiny_config(
            compose, tmp_path / head, "hardware=cpu", f"hardware.packing={packing}", f"hardware.fused_head={head}",
            "max_steps=3", "per_device_train_batch_size=4", "sft_weight=0.2",
        )  # fmt: skip
        train(cfg)
        rows[head] = [r for r in read_metrics(tmp_path / head / "run") if "train/loss" in r or "eval/loss" in r]
        env = json.loads((tmp_path / head / "run" / "env.json").read_text())
        assert env["batch_layout"]["packing"] == packing
    assert [r["step"] for r in rows["liger"]] == [r["step"] for r in rows["none"]]
    assert any("train/loss" in r for r in rows["liger"]) and any("eval/loss" in r for r in rows["liger"])
    for fused, plain in zip(rows["liger"], rows["none"]):
        assert not any(k.endswith(("/entropy", "/mean_token_accuracy")) for k in fused)
        for key in ("train/loss", "train/sft_loss", "train/rewards/margins", "eval/loss", "eval/rewards/accuracies"):
            if key in plain:
                assert fused[key] == pytest.approx(plain[key], abs=1e-4), (plain["step"], key)
        assert set(fused) == {k for k in plain if not k.endswith(("/entropy", "/mean_token_accuracy"))}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_fused_head_on_cuda(compose):
    """On a GPU Liger's chunk step runs under torch.compile: float32 equals the padded path (1e-4, as the
    other CUDA paths in tests/test_gpu.py); under bf16 autocast the loss agrees to bf16's 5e-2 and trains."""
    pytest.importorskip("liger_kernel")
    cfg = config(compose, "hardware.fused_head=liger", *CASES["simpo"])
    model = with_bias(make_model(vocab=96, seed=3)).cuda()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in PairCollator(PAD)(random_pairs(5, 96, 7)).items()}
    head = fused_head(cfg, model)  # compiled: the default on CUDA
    fused = run(ResponseLogps(model, fused=head), batch, cfg)
    plain = run(ResponseLogps(model), batch, cfg)
    torch.testing.assert_close(fused[0], plain[0], atol=1e-4, rtol=0)
    for key, grad in fused[4].items():
        torch.testing.assert_close(grad, plain[4][key], atol=1e-4, rtol=1e-3, msg=lambda m: f"grad {key}: {m}")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = run(ResponseLogps(model, fused=head), batch, cfg)
        bf16_plain = run(ResponseLogps(model), batch, cfg)
    torch.testing.assert_close(bf16[0], bf16_plain[0], atol=5e-2, rtol=0)
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in bf16[4].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_head_on_packed_flex_rows_on_cuda(compose):
    """The combination the GPU benchmark times (packed-flex+liger): packed rows under FlexAttention with the
    compiled Liger head, float32, against the padded unfused path (1e-4, as the other CUDA paths). Heads 16 wide:
    compiled FlexAttention on CUDA refuses narrower ones ("embedding dimension ... must be at least 16")."""
    pytest.importorskip("liger_kernel")
    cfg = config(compose, "hardware.fused_head=liger", *CASES["simpo"])
    model = with_bias(make_model(vocab=96, seed=3, head_dim=16)).cuda()
    pairs = random_pairs(5, 96, 7)
    layout = BatchLayout("packed", "flex")
    packed = {k: v.cuda() if torch.is_tensor(v) else v for k, v in PairCollator(PAD, "packed", "flex")(pairs).items()}
    fused = run(ResponseLogps.for_layout(model, layout, fused=fused_head(cfg, model)), packed, cfg)
    model.set_attn_implementation("sdpa")
    padded = {k: v.cuda() for k, v in PairCollator(PAD)(pairs).items()}
    plain = run(ResponseLogps(model), padded, cfg)
    torch.testing.assert_close(fused[0], plain[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(fused[2], plain[2], atol=1e-4, rtol=0)
    for key, grad in fused[4].items():
        torch.testing.assert_close(grad, plain[4][key], atol=1e-4, rtol=1e-3, msg=lambda m: f"grad {key}: {m}")


def test_grouped_calls_under_torch_compile_stop_compiling_after_a_few_graphs(compose):
    """On a GPU Liger compiles its per-pair step, and grouped calls change the calls' sizes from step to step
    (how many pairs, how wide). torch.compile must settle on a few graphs with dynamic sizes, not compile again
    for each call: over twelve steps of six pairs with varied lengths (grouped wherever that saves padding, each
    call with its own NLL weight), at most four graphs, none in the last six steps. On the CPU here, where
    compiling is slow but takes the same path."""
    pytest.importorskip("liger_kernel")
    from torch._dynamo.utils import counters

    cfg = config(compose, "hardware.fused_head=liger", *CASES["simpo"])
    model = make_model(vocab=96, seed=3)
    head = fused_head(cfg, model)
    head.compiled, head.split_cost = True, 0
    policy = ResponseLogps(model, fused=head)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for step in range(12):
        policy(**PairCollator(PAD)(random_pairs(6, vocab=96, seed=step))).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert 0 < graphs[-1] <= 4 and graphs[-1] == graphs[5], graphs


def test_the_fused_heads_gradients_follow_a_scaled_loss(compose):
    """Under gradient accumulation the loop's backward scales the loss (accelerate: by 1/accum). The fused head took
    its gradients in the forward pass: they must be scaled by the gradient reaching its loss, as the padded path's."""
    pytest.importorskip("liger_kernel")
    cfg = config(compose, "hardware.fused_head=liger", *CASES["simpo"])
    model = with_bias(make_model(vocab=96, seed=3))
    batch = PairCollator(PAD)(random_pairs(5, vocab=96, seed=7))
    head = fused_head(cfg, model)
    head.compiled = False
    grads = []
    for policy in (ResponseLogps(model, fused=head), ResponseLogps(model)):
        model.zero_grad()
        (batch_loss(policy, dict(batch), cfg)[0] / 4).backward()
        grads.append({k: p.grad.clone() for k, p in watched(model).items()})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][key], atol=ATOL, rtol=RTOL, msg=lambda m: f"grad {key}: {m}")
