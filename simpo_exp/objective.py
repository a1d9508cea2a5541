"""The loss of a batch of pairs and its statistics.

``batch_loss`` runs the policy (and a live reference model, if any) on a batch, hands the per-response
log-probs to the method's loss (simpo_exp/losses.py) and sums the statistics the loop logs
(simpo_exp/tracking.py names them) over the batch's pairs or response tokens.
"""

from __future__ import annotations

import torch

from simpo_exp.config import Config, resolve_gamma
from simpo_exp.fused import FusedPreference
from simpo_exp.losses import nll_loss
from simpo_exp.methods import TABLE, preference_loss
from simpo_exp.reference import REF_COLUMNS


def batch_loss(policy, batch: dict, cfg: Config, reference=None, sft_tokens: float | None = None):
    """Loss of a batch of pairs, its statistics summed over the batch's pairs (per-token ones over its
    response tokens: tracking.TOKEN_METRICS), and per-response
    (rewards, lengths) for the length diagnostics. ``reference``: a live reference model, for
    reference-based methods run without cached reference log-probs. ``sft_tokens``: the NLL term's
    denominator (``losses.nll_loss``'s ``tokens``; None: the batch's own chosen tokens)."""
    refs = [batch.pop(k) for k in REF_COLUMNS] if REF_COLUMNS[0] in batch else [None, None]
    out = policy(**batch) if sft_tokens is None else policy(**batch, sft_tokens=sft_tokens)
    if isinstance(out, FusedPreference):  # hardware.fused_head: the policy computed the loss itself
        return fused_batch_loss(out, batch, cfg)
    n = out.num_tokens.shape[0] // 2  # rows [0, n) are chosen, [n, 2n) rejected
    if reference is not None:
        with torch.no_grad():
            ref_sums = reference(**batch).logp_sums
        refs = [ref_sums[:n], ref_sums[n:]]
    logps = out.mean_logps
    pref = preference_loss(
        cfg.method,
        out.logp_sums[:n],
        out.logp_sums[n:],
        out.num_tokens[:n],
        out.num_tokens[n:],
        *refs,
        **loss_settings(cfg),
    )
    loss = pref.losses.mean()
    if cfg.sft_weight:
        loss = loss + cfg.sft_weight * nll_loss(out.logp_sums[:n], out.num_tokens[:n], sft_tokens)
    lengths = out.num_tokens.float()
    stats = pair_stats(n, loss, out.logp_sums[:n], pref.chosen_rewards, pref.rejected_rewards, logps, lengths, batch)
    stats |= token_and_method_stats(cfg.method, out, n)
    rewards = torch.cat([pref.chosen_rewards, pref.rejected_rewards])
    return loss, stats, (rewards, lengths)


def pair_stats(n: int, loss, chosen_sums, chosen_rewards, rejected_rewards, means, lengths, batch: dict) -> dict:
    """The statistics every method and head logs, summed over the batch's pairs (``means``: each response's
    mean token log-prob, chosen rows first; ``lengths``: its response tokens); ``sft_loss`` over the chosen
    tokens (``chosen_sums``: each chosen response's summed log-probs), so its logged mean is the token mean of
    the whole logging window or evaluation, whatever the batches were."""
    return {
        "loss": loss.detach() * n,
        "sft_loss": -chosen_sums.detach().sum(),
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "logps_mean/chosen": means[:n].detach().sum(),
        "logps_mean/rejected": means[n:].detach().sum(),
        # pairs whose chosen response has the higher mean log-prob: one definition for every method, where
        # rewards/accuracies follows each method's own reward (compare ranks runs of several methods by this)
        "logps_mean/accuracies": (means[:n] > means[n:]).float().sum(),
        "length/chosen": lengths[:n].sum(),
        "length/rejected": lengths[n:].sum(),
        "pairs": torch.tensor(float(n)),  # counted on the host: a tensor made on a GPU from it would wait for the GPU
        "tokens": batch["attention_mask"].sum().float(),
        "input_tokens": input_tokens(batch),
    }


def fused_batch_loss(out: FusedPreference, batch: dict, cfg: Config):
    """``batch_loss`` for a fused head (simpo_exp/fused.py): the loss and rewards as the fused kernel returned
    them, the statistics made from its per-response log-probs. It computes no per-token entropy or top-1
    accuracy, so those two are absent (not zero)."""
    n = out.num_tokens.shape[0] // 2
    means, lengths = out.logp_means, out.num_tokens.float()
    sums = means * lengths
    stats = pair_stats(n, out.loss, sums[:n], out.chosen_rewards, out.rejected_rewards, means, lengths, batch)
    stats |= method_stats(cfg.method, sums, means, out.logit_sums[0], out.logit_sums[1], n)
    rewards = torch.cat([out.chosen_rewards, out.rejected_rewards])
    return out.loss, stats, (rewards, lengths)


def loss_settings(cfg: Config) -> dict:
    """The config values the run's method reads (its entry in simpo_exp/methods.py), by config key;
    ``gamma_beta_ratio`` as resolved (an absolute ``gamma`` wins)."""
    _, ratio = resolve_gamma(cfg)
    return {key: ratio if key == "gamma_beta_ratio" else getattr(cfg, key) for key in TABLE[cfg.method].reads}


def token_and_method_stats(method: str, out, n: int) -> dict[str, torch.Tensor]:
    """The per-token sums (tracking.TOKEN_METRICS) and the statistics whose definition follows the
    method's TRL trainer (its entry in simpo_exp/methods.py), summed over the batch's pairs or tokens."""
    logits = out.logit_sums[:n].sum(), out.logit_sums[n:].sum()
    stats = method_stats(method, out.logp_sums.detach(), out.mean_logps.detach(), *logits, n)
    return stats | {"entropy": out.entropy_sums.sum(), "mean_token_accuracy": out.top1_counts[:n].sum()}


def method_stats(method: str, sums, means, logits_chosen, logits_rejected, n: int) -> dict[str, torch.Tensor]:
    """The statistics whose definition follows the method's TRL trainer (simpo_exp/methods.py): ``logps/*``
    from the responses' summed or mean log-probs (``sums``, ``means``, chosen rows first), the response
    tokens' summed vocabulary-mean logits, ``logits/*`` where TRL means the same, the method's own."""
    m = TABLE[method]
    logps = sums if m.logps == "sum" else means
    stats = {
        "logps/chosen": logps[:n].sum(),
        "logps/rejected": logps[n:].sum(),
        "logits_response/chosen": logits_chosen,
        "logits_response/rejected": logits_rejected,
    }
    if m.logits:  # TRL's DPO: the same mean over completion tokens
        stats |= {"logits/chosen": logits_chosen, "logits/rejected": logits_rejected}
    if m.stats is not None:
        stats |= m.stats(means[:n], means[n:])
    return stats


def chosen_tokens(batch: dict) -> int:
    """The batch's scored chosen-response tokens (the NLL term's), in any layout, as the host knows them."""
    lengths = batch["row_lengths"]
    return sum(lengths[: len(lengths) // 2])


def input_tokens(batch: dict) -> torch.Tensor:
    """The batch's tokens as TRL's num_tokens counts them: prompt + response of the chosen and of the
    rejected sequence (the prompt twice, even where the layout computes it once), no padding. The packed
    layouts count on the host, from their plain-int ``segments``; the padded one on the batch's device."""
    if batch.get("segments") is not None:
        return torch.tensor(float(sum(2 * p + c + r for p, c, r in batch["segments"])))
    return batch["attention_mask"].sum().float()  # padded layout: one row per sequence
