"""Preference losses as pure functions of per-sequence log-probabilities.

Nothing here knows about tokens, models or batches beyond tensors of shape [B].
"""

from __future__ import annotations

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


def nll_loss(logp_sums: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    r"""Token-level negative log-likelihood over a batch of responses.

    .. math:: L_\text{SFT} = -\frac{\sum_i \sum_t \log \pi(y_{i,t} \mid x_i, y_{i,<t})}{\sum_i |y_i|}

    ``logp_sums`` [B] holds each response's summed token log-probs, ``num_tokens`` [B] its length.
    """
    return -logp_sums.sum() / num_tokens.sum().clamp(min=1)
