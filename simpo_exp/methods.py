"""The table of methods: everything the framework knows about a preference method, in one entry.

An entry names the method's pure loss function (formula in its docstring, simpo_exp/losses.py), the
log-probs the loss is defined on, whether it needs reference log-probs, the config keys it reads, and
how its TRL-named metrics are defined. Read by config validation (method choice, which keys a method
accepts), the loop (reference log-probs), simpo_exp/objective.py (the loss of a batch and its
statistics), simpo_exp/tracking.py (which metrics a method logs) and the README table (tests check it).

A method's usual ``beta`` (and any other default of its own) lives in ``conf/loss/<name>.yaml``, which
states ``method`` and only what differs from simpo_exp/config.py's defaults. Adding a method: a loss
function in losses.py, an entry here, ``conf/loss/<name>.yaml``, and a hand-computed test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from simpo_exp import losses as L
from simpo_exp.losses import PreferenceLoss


def orpo_stats(chosen_means: torch.Tensor, rejected_means: torch.Tensor) -> dict[str, torch.Tensor]:
    """ORPO's own statistics as TRL's ORPOTrainer logs them, summed over pairs: the log odds ratio and
    log sigmoid of it."""
    log_odds = L.orpo_log_odds(chosen_means, rejected_means)
    return {"log_odds_chosen": log_odds.sum(), "log_odds_ratio": F.logsigmoid(log_odds).sum()}


def keys(*same: str, **renamed: str) -> dict[str, str]:
    """Config key -> loss argument: ``same`` keys pass under their own name, ``renamed`` as given."""
    return {key: key for key in same} | renamed


@dataclass(frozen=True)
class Method:
    loss: Callable[..., PreferenceLoss]
    on: str  # "mean" or "sum": the per-response log-probs (and reference log-probs) the loss takes
    reads: dict[str, str] = field(default_factory=dict)  # config key -> loss argument
    reference: bool = False  # takes reference log-probs (computed once and cached, or a live model)
    lengths: bool = False  # takes the response lengths (after the reference log-probs)
    counterpart: str = ""  # the trainer whose metric definitions it follows (README)
    # Metric rules: what its TRL-named metrics mean (README "Baselines"; tracking.py).
    logps: str = "mean"  # logps/* reports the summed or the mean log-prob
    rewards_on_sums: bool = False  # rewards/* are DPO's on summed log-ratios whatever the loss used
    logits: bool = False  # logs TRL DPO's logits/* (the mean logit over response tokens)
    stats: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None  # from mean log-probs
    extra_metrics: tuple[str, ...] = ()  # the names ``stats`` returns


SIMPO_KEYS = ("beta", "gamma_beta_ratio", "label_smoothing")
DPO_LIKE = dict(reference=True, logps="sum", logits=True)
TABLE: dict[str, Method] = {
    "simpo": Method(
        L.simpo_loss,
        "mean",
        keys(*SIMPO_KEYS, "loss_type"),
        counterpart='official SimPO; TRL `CPOTrainer(loss_type="simpo", cpo_alpha=0)`',
    ),
    "dpo": Method(
        L.dpo_loss,
        "sum",
        keys("beta", "label_smoothing"),
        **DPO_LIKE,
        counterpart='TRL `DPOTrainer(loss_type="sigmoid")`',
    ),
    "ln-dpo": Method(
        L.dpo_loss,
        "mean",
        keys("beta", "label_smoothing"),
        **DPO_LIKE,
        rewards_on_sums=True,
        counterpart='TRL `DPOTrainer(loss_type="sigmoid_norm")`',
    ),
    "ipo": Method(
        L.ipo_loss,
        "mean",
        keys("beta"),
        **DPO_LIKE,
        rewards_on_sums=True,
        counterpart='TRL `DPOTrainer(loss_type="ipo")`',
    ),
    "rdpo": Method(
        L.rdpo_loss,
        "sum",
        keys("beta", rdpo_alpha="alpha"),
        **DPO_LIKE,
        lengths=True,
        counterpart="none (logged as DPO)",
    ),
    "cpo": Method(
        L.cpo_loss,
        "sum",
        keys("beta", "label_smoothing"),
        logps="sum",
        counterpart='TRL `CPOTrainer(loss_type="sigmoid")`',
    ),
    "orpo": Method(
        L.orpo_loss,
        "mean",
        keys("beta"),
        stats=orpo_stats,
        extra_metrics=("log_odds_ratio", "log_odds_chosen"),
        counterpart="TRL `ORPOTrainer`",
    ),
    "alphapo": Method(
        L.alphapo_loss,
        "mean",
        keys(*SIMPO_KEYS, alphapo_alpha="alpha"),
        counterpart='TRL `CPOTrainer(loss_type="alphapo", alpha=...)`',
    ),
    "simper": Method(L.simper_loss, "mean", counterpart="none (official SimPER code)"),
}
METHODS = tuple(TABLE)
REFERENCE_METHODS = tuple(name for name, m in TABLE.items() if m.reference)
# Config keys only some methods read: set away from their default for a method that does not read
# them, config validation refuses them (they would change nothing). Not beta and gamma_beta_ratio, which
# hparams presets set whatever the method; given on the command line, runinfo.refuse_unused judges them.
METHOD_KEYS = tuple(dict.fromkeys(k for m in TABLE.values() for k in m.reads))  # every key some method reads
PRESET_KEYS = ("beta", "gamma_beta_ratio")
OWN_KEYS = tuple(k for k in METHOD_KEYS if k not in PRESET_KEYS)


def readers(key: str) -> tuple[str, ...]:
    """The methods whose loss reads config ``key``."""
    return tuple(name for name, m in TABLE.items() if key in m.reads)


def preference_loss(
    method: str,
    chosen_sums: torch.Tensor,
    rejected_sums: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ref_chosen_sums: torch.Tensor | None = None,
    ref_rejected_sums: torch.Tensor | None = None,
    **settings,
) -> PreferenceLoss:
    """The method's loss on the sums or means its entry names, with the config values it reads from
    ``settings`` (config key -> value; a key left out takes the loss function's default, a key the
    method does not read is not passed). The rewards are those TRL reports: LN-DPO's and IPO's are
    DPO's, on summed log-probs (TRL's ``sigmoid_norm`` and ``ipo`` losses normalise by length, their
    logged rewards do not)."""
    if method not in TABLE:
        raise ValueError(f"method={method!r}: allowed values are {', '.join(map(repr, METHODS))}")
    m = TABLE[method]
    c_len, r_len = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
    per = (lambda x, n: x / n) if m.on == "mean" else (lambda x, n: x)  # noqa: E731
    args = [per(chosen_sums, c_len), per(rejected_sums, r_len)]
    if m.reference:
        if ref_chosen_sums is None or ref_rejected_sums is None:
            raise ValueError(f"method={method!r} needs reference log-probs")
        args += [per(ref_chosen_sums, c_len), per(ref_rejected_sums, r_len)]
    if m.lengths:
        args += [chosen_lengths.float(), rejected_lengths.float()]
    pref = m.loss(*args, **{arg: settings[key] for key, arg in m.reads.items() if key in settings})
    if m.rewards_on_sums:
        beta = settings["beta"]
        pref = pref._replace(
            chosen_rewards=(beta * (chosen_sums - ref_chosen_sums)).detach(),
            rejected_rewards=(beta * (rejected_sums - ref_rejected_sums)).detach(),
        )
    return pref
