r"""Preference losses as pure functions of per-sequence log-probabilities.

Nothing here knows about tokens, models or batches beyond tensors of shape [B]. Notation:
:math:`\log\pi(y)` is a response's summed token log-prob, :math:`\bar\ell(y) = \log\pi(y)/|y|`
its mean, :math:`y_w` the chosen and :math:`y_l` the rejected response, :math:`\sigma` the
logistic function. Each loss returns per-pair losses and the implicit rewards as its method
defines them (detached). Which loss a method uses, on which log-probs and with which config keys is
the table of methods in simpo_exp/methods.py; its ``preference_loss`` hands back the rewards TRL's
trainer reports for the method, so ``rewards/*`` mean what they mean there: for LN-DPO and IPO that is
DPO's :math:`\beta(\log\pi(y) - \log\pi_\text{ref}(y))` on summed log-probs, not the normalised one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor  # [B] per-pair loss
    chosen_rewards: torch.Tensor  # [B] implicit reward of the chosen response (detached)
    rejected_rewards: torch.Tensor  # [B]


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    r"""SimPO (Meng, Xia & Chen 2024, arXiv 2405.14734).

    Inputs are length-normalised log-probabilities, the mean over response tokens
    :math:`\bar{\ell}(y) = \frac{1}{|y|}\sum_t \log \pi(y_t \mid x, y_{<t})`.

    .. math::
        r(y) = \beta\,\bar{\ell}(y), \qquad \gamma = \beta \cdot \text{gamma\_beta\_ratio}

        z = r(y_w) - r(y_l) - \gamma

        \text{sigmoid:}\quad L = -(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)

        \text{hinge:}\quad L = \max(0,\ 1 - z)

    where :math:`\epsilon` is ``label_smoothing`` (conservative SimPO; unused by the hinge).
    Returns per-pair losses and the (detached) rewards :math:`r(y_w), r(y_l)`.
    """
    z = beta * (chosen_logps - rejected_logps) - beta * gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    else:
        raise ValueError(f"loss_type={loss_type!r}: allowed values are 'sigmoid', 'hinge'")
    return PreferenceLoss(losses, beta * chosen_logps.detach(), beta * rejected_logps.detach())


def nll_loss(logp_sums: torch.Tensor, num_tokens: torch.Tensor, tokens: float | None = None) -> torch.Tensor:
    r"""Token-level negative log-likelihood over a batch of responses.

    .. math:: L_\text{SFT} = -\frac{\sum_i \sum_t \log \pi(y_{i,t} \mid x_i, y_{i,<t})}{N}, \qquad
        N = \sum_i |y_i| \text{ (or } \texttt{tokens}\text{)}

    ``logp_sums`` [B] holds each response's summed token log-probs, ``num_tokens`` [B] its length. ``tokens``:
    the denominator N when it is not this batch's own count: in training, the optimizer step's chosen tokens over
    its micro-batches x processes, so that the mean of the micro-batches' losses (what gradient accumulation and
    data parallel average) is the token mean over the whole step, as one big batch gives.
    """
    return -logp_sums.sum() / (num_tokens.sum().clamp(min=1) if tokens is None else max(tokens, 1e-12))


def _sigmoid_with_smoothing(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    loss = -F.logsigmoid(z) * (1 - label_smoothing)
    # no smoothing term at 0: its 0 x inf was NaN where z = +inf (an AlphaPO reward past float32's range)
    return loss - F.logsigmoid(-z) * label_smoothing if label_smoothing else loss


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    r"""DPO (Rafailov et al. 2023), on summed log-probs, with conservative label smoothing.

    .. math::
        r(y) = \beta\,(\log\pi(y) - \log\pi_\text{ref}(y)), \qquad z = r(y_w) - r(y_l)

        L = -(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)

    Pass mean log-probs instead of sums for length-normalised DPO (``ln-dpo``).
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    losses = _sigmoid_with_smoothing(chosen_rewards - rejected_rewards, label_smoothing)
    return PreferenceLoss(losses, chosen_rewards.detach(), rejected_rewards.detach())


def rdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    alpha: float,
) -> PreferenceLoss:
    r"""R-DPO (Park et al. 2024): DPO with a length term, as the SimPO paper writes it.

    .. math::
        L = -\log\sigma\big(\beta\log\tfrac{\pi(y_w)}{\pi_\text{ref}(y_w)}
            - \beta\log\tfrac{\pi(y_l)}{\pi_\text{ref}(y_l)} + \alpha|y_w| - \alpha|y_l|\big)

    Rewards are DPO's, :math:`\beta\log\frac{\pi(y)}{\pi_\text{ref}(y)}`.
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    z = chosen_rewards - rejected_rewards + alpha * (chosen_lengths - rejected_lengths)
    return PreferenceLoss(-F.logsigmoid(z), chosen_rewards.detach(), rejected_rewards.detach())


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    r"""IPO (Azar et al. 2023): squared distance of the log-ratio margin to :math:`1/(2\beta)`.

    .. math::
        h = (\bar\ell(y_w) - \bar\ell_\text{ref}(y_w)) - (\bar\ell(y_l) - \bar\ell_\text{ref}(y_l)),
        \qquad L = \big(h - \tfrac{1}{2\beta}\big)^2

    Inputs are mean (per-token) log-probs, as TRL computes IPO. Rewards:
    :math:`\beta(\bar\ell(y) - \bar\ell_\text{ref}(y))`.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def cpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> PreferenceLoss:
    r"""CPO's preference term (Xu et al. 2024), reference-free on summed log-probs.

    .. math:: L = -(1-\epsilon)\log\sigma(\beta(\log\pi(y_w) - \log\pi(y_l))) - \epsilon\log\sigma(-\ldots)

    CPO adds the NLL of the chosen response (weight 1 in the paper): the ``cpo`` preset sets
    ``sft_weight=1.0``. Rewards: :math:`\beta\log\pi(y)`.
    """
    losses = _sigmoid_with_smoothing(beta * (chosen_logps - rejected_logps), label_smoothing)
    return PreferenceLoss(losses, beta * chosen_logps.detach(), beta * rejected_logps.detach())


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2 (Maechler's two forms, as TRL's ORPO computes it):
    log1p(-e^x) far from 0, log(-expm1(x)) near it. Only x within eps^2 of 0 (a response the model has all but
    memorised) is clamped there, so that x = 0 gives no -inf; the clamp at -1e-6 this replaced cut the term to
    log(1e-6) for a mean log-prob of -1e-8, where the exact value is log(1e-8).

    Each form is given only inputs it is finite on (a harmless stand-in elsewhere): torch.where evaluates both, and
    for x in (-3e-8, 0) float32's e^x is 1, so the unused log1p(-e^x) was -inf and its zeroed gradient times an
    infinite derivative made the whole step's gradient NaN (TRL 1.16's ORPO has that flaw)."""
    x = x.clamp(max=-(torch.finfo(x.dtype).eps ** 2))
    far = x < -math.log(2.0)
    far_x, near_x = torch.where(far, x, -1.0), torch.where(far, -0.5, x)
    return torch.where(far, torch.log1p(-torch.exp(far_x)), torch.log(-torch.expm1(near_x)))


def orpo_log_odds(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    r"""ORPO's log odds ratio of the chosen over the rejected response, from mean log-probs:
    :math:`\log\text{odds}(y) = \bar\ell(y) - \log(1 - e^{\bar\ell(y)})`, returns
    :math:`\log\text{odds}(y_w) - \log\text{odds}(y_l)`."""
    return (chosen_logps - rejected_logps) - (_log1m_exp(chosen_logps) - _log1m_exp(rejected_logps))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float) -> PreferenceLoss:
    r"""ORPO's odds-ratio term (Hong et al. 2024), on mean log-probs; ``beta`` is ORPO's :math:`\lambda`.

    .. math::
        \log\text{odds}(y) = \bar\ell(y) - \log(1 - e^{\bar\ell(y)}), \qquad
        L = -\beta\log\sigma(\log\text{odds}(y_w) - \log\text{odds}(y_l))

    ORPO adds the NLL of the chosen response (weight 1): the ``orpo`` preset sets ``sft_weight=1.0``.
    Rewards: :math:`\beta\,\bar\ell(y)`.
    """
    losses = -beta * F.logsigmoid(orpo_log_odds(chosen_logps, rejected_logps))
    return PreferenceLoss(losses, beta * chosen_logps.detach(), beta * rejected_logps.detach())


def alphapo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    r"""AlphaPO (Gupta et al. 2025, "AlphaPO: Reward shape matters for LLM alignment", arXiv 2501.03884):
    SimPO with the length-normalised reward bent by a shape parameter :math:`\alpha`.

    Inputs are mean log-probs :math:`\bar\ell(y)`, so :math:`e^{\bar\ell(y)} = \pi(y)^{1/|y|}`:

    .. math::
        r_\alpha(y) = \frac{1 - \pi(y)^{-\alpha/|y|}}{\alpha} = \frac{1 - e^{-\alpha\bar\ell(y)}}{\alpha},
        \qquad r_0(y) = \lim_{\alpha\to 0} r_\alpha(y) = \bar\ell(y)

        z = \beta\,(r_\alpha(y_w) - r_\alpha(y_l)) - \gamma, \qquad
        L = -(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)

    with :math:`\gamma = \beta\cdot` ``gamma_beta_ratio`` as in SimPO; :math:`\alpha = 0` is SimPO exactly.
    The reward shape is TRL's ``CPOTrainer(loss_type="alphapo", alpha=...)``. Rewards: :math:`\beta r_\alpha(y)`.
    """
    if alpha == 0:
        chosen, rejected = chosen_logps, rejected_logps
    else:  # (1 - e^{-a x}) / a, as -expm1(-a x) / a: exact near x = 0
        chosen, rejected = -torch.expm1(-alpha * chosen_logps) / alpha, -torch.expm1(-alpha * rejected_logps) / alpha
    z = beta * (chosen - rejected) - beta * gamma_beta_ratio
    return PreferenceLoss(_sigmoid_with_smoothing(z, label_smoothing), beta * chosen.detach(), beta * rejected.detach())


def simper_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> PreferenceLoss:
    r"""SimPER (Xiao et al., ICLR 2025, "SimPER: A Minimalist Approach to Preference Alignment without
    Hyperparameters", arXiv 2502.00883): raise the inverse perplexity of the chosen response, lower the
    rejected one's. No :math:`\beta`, no margin, no reference model.

    Inputs are mean log-probs; :math:`e^{\bar\ell(y)} = 1/\text{PPL}(y)` is the inverse perplexity:

    .. math:: L = -e^{\bar\ell(y_w)} + e^{\bar\ell(y_l)}

    Rewards: the inverse perplexities :math:`e^{\bar\ell(y)}` the loss compares (so the margin is
    :math:`-L`).
    """
    chosen, rejected = chosen_logps.exp(), rejected_logps.exp()
    return PreferenceLoss(rejected - chosen, chosen.detach(), rejected.detach())
