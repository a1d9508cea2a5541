"""The output head, log-softmax and preference loss fused into one chunked computation (Liger-Kernel).

With ``hardware.fused_head=liger`` the policy never holds the logits of the batch: Liger's fused-linear
preference losses (``liger_kernel.chunked_loss``) take the decoder's last hidden states and the output
head's weight, and compute, one pair at a time, the logits, their log-softmax, the response log-probs and
the loss, with the gradients of the hidden states and the head taken inside the forward pass. Peak memory
holds one pair's logits instead of the batch's. The project's own answer to the same problem, without the
extra package, is ``hardware.logps_chunk_size`` (simpo_exp/logps.py).

Only the hidden states that predict a response token are handed over: ``ResponseLogps`` gathers them, in
any batch layout (padded, packed, prefix-shared), and
this module lays them out as [2B, longest response, H] rows (chosen first, then rejected, as Liger expects),
zeros and label -100 after each response. Liger averages its logits over every position of that tensor;
zero states give zero logits (the head's bias, if any, is taken back out), so the vocabulary-mean logit
summed over the response tokens (``logits_response/*``) is recovered exactly. Liger does not compute the
entropy or the top-1 accuracy of the tokens: a fused run does not log ``entropy`` or ``mean_token_accuracy``.

Methods with a Liger loss of the same definition: simpo (sigmoid loss), cpo, orpo (with sft_weight 0 or 1:
Liger's ORPO weighs its NLL term 1). Liger's DPO takes the reference model's hidden states, not the
cached reference log-probs this project uses, so the reference-based methods stay on the unfused path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from simpo_exp.logps import unsharded

FUSED_HEADS = ("none", "liger")
LIGER_METHODS = ("simpo", "cpo", "orpo")
INSTALL_HINT = 'pip install -e ".[gpu]" (or pip install liger-kernel)'


class FusedPreference(NamedTuple):
    loss: torch.Tensor  # [] the preference loss (mean over pairs) + sft_weight * the chosen NLL, with gradient
    logp_means: torch.Tensor  # [2B] each response's mean token log-prob (detached), chosen first
    num_tokens: torch.Tensor  # [2B] response tokens per row
    chosen_rewards: torch.Tensor  # [B] the method's implicit rewards, as Liger returns them (detached)
    rejected_rewards: torch.Tensor  # [B]
    logit_sums: torch.Tensor  # [2] vocabulary-mean logit summed over the chosen, the rejected response tokens


def fused_head(cfg, model) -> "LigerPreferenceHead | None":
    """The fused head the config asks for (None for ``hardware.fused_head=none``); a ConfigError naming the
    key when the method, its settings or the model cannot run fused. Every batch layout can."""
    from simpo_exp.config import ConfigError, resolve_gamma

    if cfg.hardware.fused_head == "none":
        return None
    where = f"hardware.fused_head={cfg.hardware.fused_head!r}"
    if cfg.method not in LIGER_METHODS:
        raise ConfigError(
            f"{where} does not support method={cfg.method!r}: Liger's fused losses match this project's "
            f"definitions for {', '.join(LIGER_METHODS)} only; use hardware.fused_head=none "
            "(hardware.logps_chunk_size bounds the logits' memory for every method)"
        )
    if cfg.method == "simpo" and cfg.loss_type != "sigmoid":
        raise ConfigError(f"{where} computes SimPO's sigmoid loss only, not loss_type={cfg.loss_type!r}")
    if cfg.method == "orpo" and cfg.sft_weight not in (0.0, 1.0):
        raise ConfigError(f"{where}: Liger's ORPO weighs its NLL term 1 or leaves it out; sft_weight={cfg.sft_weight}")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ConfigError(f"{where}: Liger does not cap the logits as this model does (Gemma 2); use 'none'")
    gamma, _ = resolve_gamma(cfg)
    return LigerPreferenceHead(cfg.method, cfg.beta, gamma, cfg.label_smoothing, cfg.sft_weight)


def liger_losses():
    """``liger_kernel.chunked_loss``, or an ImportError that says how to install it."""
    try:
        from liger_kernel import chunked_loss
    except ImportError as e:
        raise ImportError(f"hardware.fused_head=liger needs the liger-kernel package: {INSTALL_HINT}") from e
    return chunked_loss


class LigerPreferenceHead(nn.Module):
    """Liger's fused-linear loss of ``method`` with the run's settings. ``compiled``: run Liger's chunk step
    under torch.compile (None: on a GPU only; compiling on a CPU takes tens of seconds and gains nothing)."""

    def __init__(self, method: str, beta: float, gamma: float, label_smoothing: float, sft_weight: float):
        super().__init__()
        self.method, self.beta, self.gamma = method, beta, gamma
        self.label_smoothing, self.sft_weight = label_smoothing, sft_weight
        self.compiled: bool | None = None
        self._losses = {}
        liger_losses()  # fail at set-up, not at the first step

    def _loss(self, compiled: bool) -> nn.Module:
        if compiled not in self._losses:
            lib, nll = liger_losses(), self.sft_weight > 0
            if self.method == "simpo":
                kw = dict(gamma=self.gamma, label_smoothing=self.label_smoothing, alpha=self.sft_weight)
                loss = lib.LigerFusedLinearSimPOLoss(beta=self.beta, compute_nll_loss=nll, compiled=compiled, **kw)
            elif self.method == "cpo":  # summed log-probs, as CPO defines its loss
                kw = dict(label_smoothing=self.label_smoothing, alpha=self.sft_weight, average_log_prob=False)
                loss = lib.LigerFusedLinearCPOLoss(beta=self.beta, compute_nll_loss=nll, compiled=compiled, **kw)
            else:
                loss = lib.LigerFusedLinearORPOLoss(beta=self.beta, compute_nll_loss=nll, compiled=compiled)
            self._losses[compiled] = loss
        return self._losses[compiled]

    def forward(self, head: nn.Module, states, targets, rows, n: int, counts) -> FusedPreference:
        """``states`` [M, H] the hidden states that predict the response tokens ``targets`` [M], each row's in
        order (``rows`` [M] their row, ``counts`` [n] tokens per row; rows [0, n/2) chosen, the rest rejected).
        The padded layout hands the rows over one after another; the packed layouts interleave them pair by
        pair, so each token's place in its row is counted in row order (a stable sort of the row indices); the
        states themselves are scattered straight into their rows, never copied into that order."""
        weight, bias = unsharded(head).weight, getattr(head, "bias", None)
        if weight.numel() == 0:
            raise RuntimeError(
                "hardware.fused_head=liger: the output head's weight is partitioned here (DeepSpeed ZeRO-3 gathers "
                "it only inside the model's forward); the fused head needs it whole: use hardware.fused_head=none "
                "with logps_chunk_size"
            )
        width = max(int(counts.max()), 1) if n else 1
        starts = torch.cumsum(counts, 0) - counts
        order = torch.argsort(rows, stable=True)  # the tokens grouped by row, each row's in order
        pos = torch.empty_like(rows)
        pos[order] = torch.arange(rows.shape[0], device=rows.device) - starts[rows[order]]
        padded = states.new_zeros(n, width, states.shape[-1]).index_put((rows, pos), states)
        labels = targets.new_full((n, width), -100).index_put((rows, pos), targets)
        compiled = states.device.type == "cuda" if self.compiled is None else self.compiled
        if not torch.is_grad_enabled():  # evaluation: Liger takes its gradients only of inputs that require them
            weight, padded, bias = weight.detach(), padded.detach(), None if bias is None else bias.detach()
        loss, outs = self._loss(compiled)(weight, padded, labels, bias)
        chosen, rejected, chosen_logit_mean, rejected_logit_mean, _, chosen_rewards, rejected_rewards = outs[:7]
        logps = torch.cat([chosen, rejected]).detach().float()
        if self.method == "cpo":  # Liger returned sums
            logps = logps / counts.clamp(min=1)
        half = n // 2
        # Liger's logit means divide by (pairs * width * vocabulary); padding positions add the bias only.
        pad = torch.stack([half * width - counts[:half].sum(), half * width - counts[half:].sum()])
        logit_sums = torch.stack([chosen_logit_mean, rejected_logit_mean]).detach().float() * half * width
        if bias is not None:
            logit_sums = logit_sums - pad * bias.detach().float().mean()
        return FusedPreference(loss, logps, counts, chosen_rewards.detach(), rejected_rewards.detach(), logit_sums)
