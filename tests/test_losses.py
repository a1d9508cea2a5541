"""The SimPO loss, and the methods built on it (AlphaPO) or beside it (SimPER), against numbers worked out
by hand and, where TRL implements the method, against TRL on the same inputs."""

import math

import pytest
import torch

from simpo_exp.losses import alphapo_loss, nll_loss, simper_loss, simpo_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_sigmoid_loss_matches_hand_computation():
    # beta=2, ratio=0.5 -> gamma=1; z = 2*(-1 - -2) - 1 = 1; loss = log(1 + e^-1)
    out = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma_beta_ratio=0.5)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-2.0)
    assert out.rejected_rewards.item() == pytest.approx(-4.0)


def test_margin_at_gamma_gives_log2():
    # z = 2*(0.5) - 1 = 0 -> -log(sigmoid(0)) = log 2
    out = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma_beta_ratio=0.5)
    assert out.losses.item() == pytest.approx(math.log(2), abs=1e-12)


def test_label_smoothing_mixes_both_directions():
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    out = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.1)
    expected = 0.9 * 0.31326168751822286 + 0.1 * 1.3132616875182228
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)


def test_hinge_loss():
    # z = 1 -> relu(1 - 1) = 0 ; z = 0 -> 1 ; z = 2*(3) - 1 = 5 -> 0 ; z = 2*(-1) - 1 = -3 -> 4
    out = simpo_loss(t(-1.0, -1.0, -1.0, -2.0), t(-2.0, -1.5, -4.0, -1.0), 2.0, 0.5, loss_type="hinge")
    assert out.losses.tolist() == pytest.approx([0.0, 1.0, 0.0, 4.0])


def test_gamma_is_beta_times_ratio():
    # Same ratio, larger beta: z = 10*(0.2) - 10*0.3 = -1 -> log(1 + e)
    out = simpo_loss(t(-1.0), t(-1.2), beta=10.0, gamma_beta_ratio=0.3)
    assert out.losses.item() == pytest.approx(math.log1p(math.e), abs=1e-12)


def test_rewards_are_detached_and_loss_has_gradients():
    c = t(-1.0, -0.5).requires_grad_()
    r = t(-2.0, -0.4).requires_grad_()
    out = simpo_loss(c, r, 2.0, 0.5)
    out.losses.sum().backward()
    assert not out.chosen_rewards.requires_grad
    # d/dc of -log sigmoid(z) = -beta * sigmoid(-z); z = 2*(c - r) - 1
    z = 2 * (c.detach() - r.detach()) - 1
    assert c.grad.tolist() == pytest.approx((-2 * torch.sigmoid(-z)).tolist())
    assert r.grad.tolist() == pytest.approx((2 * torch.sigmoid(-z)).tolist())


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        simpo_loss(t(-1.0), t(-2.0), 2.0, 0.5, loss_type="ipo")


def test_nll_is_token_level_mean():
    # sums -3 over 3 tokens and -5 over 2 tokens -> 8 / 5
    assert nll_loss(t(-3.0, -5.0), torch.tensor([3, 2])).item() == pytest.approx(1.6)


# ----------------------------------------------------------------------------- AlphaPO
def test_alphapo_matches_hand_computation():
    # alpha=0.5: r(-1) = (1 - e^0.5)/0.5 = -1.2974425414, r(-2) = (1 - e^1)/0.5 = -3.4365636569
    # z = 2 * (r_w - r_l) - 2 * 0.5 = 3.2782422310; loss = log(1 + e^-z)
    out = alphapo_loss(t(-1.0), t(-2.0), beta=2.0, gamma_beta_ratio=0.5, alpha=0.5)
    rw, rl = (1 - math.exp(0.5)) / 0.5, (1 - math.exp(1.0)) / 0.5
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-(2 * (rw - rl) - 1))), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.037001383757099146, abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((2 * rw, 2 * rl))
    smoothed = alphapo_loss(t(-1.0), t(-2.0), 2.0, 0.5, 0.5, label_smoothing=0.1)
    z = 2 * (rw - rl) - 1
    assert smoothed.losses.item() == pytest.approx(0.9 * math.log1p(math.exp(-z)) + 0.1 * math.log1p(math.exp(z)))


def test_an_alphapo_reward_past_float32s_range_gives_a_finite_loss():
    """r_alpha's e^(-alpha x) overflows float32 once a mean log-prob is below -88.7/alpha: a rejected reward of
    -inf makes z = +inf, whose loss is 0, but the label-smoothing term 0 x (-log sigma(-inf)) made it NaN."""
    c, r = torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -400.0])  # alpha=0.25: e^100 overflows
    out = alphapo_loss(c, r, 2.0, 0.5, alpha=0.25)
    assert out.rejected_rewards[1].item() == -math.inf and out.losses[1].item() == 0.0
    assert torch.isfinite(out.losses).all()


def test_alphapo_at_alpha_zero_is_simpo_exactly():
    c, r = t(-1.0, -0.3, -2.5, -0.01), t(-2.0, -0.4, -1.0, -3.0)
    for smoothing in (0.0, 0.2):
        a = alphapo_loss(c, r, 2.5, 0.4, alpha=0.0, label_smoothing=smoothing)
        s = simpo_loss(c, r, 2.5, 0.4, label_smoothing=smoothing)
        for x, y in zip(a, s):
            assert torch.equal(x, y)
    # and alpha -> 0 approaches it continuously
    near = alphapo_loss(c, r, 2.5, 0.4, alpha=1e-7)
    assert near.losses.tolist() == pytest.approx(simpo_loss(c, r, 2.5, 0.4).losses.tolist(), rel=1e-5)


def test_alphapo_and_simpo_equal_trl_cpo_on_the_same_inputs():
    """TRL's CPOTrainer.cpo_loss (loss_type="simpo", which loss_type="alphapo" becomes) with its alpha:
    the same losses and rewards on the same mean log-probs."""
    cpo = pytest.importorskip("trl.experimental.cpo")
    from types import SimpleNamespace

    c, r = t(-1.0, -0.3, -2.5, -0.01), t(-2.0, -0.4, -1.0, -3.0)
    for alpha, smoothing in ((0.5, 0.0), (0.25, 0.1), (-0.3, 0.0), (0.0, 0.1)):
        trainer = SimpleNamespace(
            alpha=alpha,
            beta=2.0,
            simpo_gamma=2.0 * 0.5,
            loss_type="simpo",
            label_smoothing=smoothing,
            accelerator=SimpleNamespace(device="cpu"),
        )
        theirs = cpo.CPOTrainer.cpo_loss(trainer, c, r)
        ours = alphapo_loss(c, r, 2.0, 0.5, alpha, smoothing)
        for x, y in zip(ours, theirs):
            assert x.tolist() == pytest.approx(y.tolist(), rel=1e-12, abs=1e-12), (alpha, smoothing)


# ----------------------------------------------------------------------------- SimPER
def test_simper_matches_hand_computation():
    # -e^-0.5 + e^-1 = -0.6065306597 + 0.3678794412
    out = simper_loss(t(-0.5), t(-1.0))
    assert out.losses.item() == pytest.approx(-0.2386512185411911, abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((math.exp(-0.5), math.exp(-1)))


def test_simper_gradients_are_the_inverse_perplexities():
    # dL/d mean_w = -e^{mean_w}, dL/d mean_l = +e^{mean_l}: no beta, no margin to tune
    c, r = t(-0.5, -2.0).requires_grad_(), t(-1.0, -0.1).requires_grad_()
    out = simper_loss(c, r)
    out.losses.sum().backward()
    assert c.grad.tolist() == pytest.approx([-math.exp(-0.5), -math.exp(-2.0)])
    assert r.grad.tolist() == pytest.approx([math.exp(-1.0), math.exp(-0.1)])
    assert not out.chosen_rewards.requires_grad
