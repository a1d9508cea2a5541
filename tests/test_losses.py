"""The SimPO loss against numbers worked out by hand."""

import math

import pytest
import torch

from simpo_exp.losses import nll_loss, simpo_loss


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
