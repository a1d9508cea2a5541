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

Methods with a Liger loss of the same definition: simpo (sigmoid loss), cpo, orpo (Liger's ORPO function, given
the NLL weight its module leaves at 1 and the unfused path's log odds: ``ORPOLoss``). Liger's DPO takes the
reference model's hidden states, not the cached reference log-probs this project uses, so the reference-based
methods stay on the unfused path.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from simpo_exp.logps import final_softcap, host_to_device, logit_scale, unsharded
from simpo_exp.losses import orpo_log_odds

LIGER_METHODS = ("simpo", "cpo", "orpo")
INSTALL_HINT = 'pip install -e ".[gpu]" (or pip install liger-kernel)'


class FusedPreference(NamedTuple):
    loss: torch.Tensor  # [] the preference loss (mean over pairs) + sft_weight * the chosen NLL, with gradient
    logp_means: torch.Tensor  # [2B] each response's mean token log-prob (detached), chosen first
    num_tokens: torch.Tensor  # [2B] response tokens per row
    chosen_rewards: torch.Tensor  # [B] the method's implicit rewards, as Liger returns them (detached)
    rejected_rewards: torch.Tensor  # [B]
    logit_sums: torch.Tensor  # [2] vocabulary-mean logit summed over the chosen, the rejected response tokens


def fused_head_refusal(cfg) -> str | None:
    """Why the method or its settings cannot run on the fused head ``hardware.fused_head`` names (None: they can).
    From the config alone: config validation asks it before anything loads."""
    where = f"hardware.fused_head={cfg.hardware.fused_head!r}"
    if cfg.method not in LIGER_METHODS:
        return (
            f"{where} does not support method={cfg.method!r}: Liger's fused losses match this project's "
            f"definitions for {', '.join(LIGER_METHODS)} only; use hardware.fused_head=none "
            "(hardware.logps_chunk_size bounds the logits' memory for every method)"
        )
    if cfg.method == "simpo" and cfg.loss_type != "sigmoid":
        return f"{where} computes SimPO's sigmoid loss only, not loss_type={cfg.loss_type!r}"
    return None


def fused_head(cfg, model) -> "LigerPreferenceHead | None":
    """The fused head the config asks for (None for ``hardware.fused_head=none``); a ConfigError naming the
    key when the method, its settings or the model cannot run fused. Every batch layout can."""
    from simpo_exp.config import ConfigError, resolve_gamma

    if cfg.hardware.fused_head == "none":
        return None
    where = f"hardware.fused_head={cfg.hardware.fused_head!r}"
    refusal = fused_head_refusal(cfg)
    if refusal:
        raise ConfigError(refusal)
    if final_softcap(model.config):
        raise ConfigError(f"{where}: Liger does not cap the logits as this model does (Gemma 2); use 'none'")
    if logit_scale(model.config) and getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise ConfigError(f"{where}: this model scales its logits and its head has a bias; use 'none'")
    if hasattr(model.get_output_embeddings(), "lora_A"):  # PEFT's LoRA layer in the head's place
        raise ConfigError(
            f"{where} reads the output head's weight as one tensor, without the LoRA adapter "
            "hardware.lora_target_modules puts on it, which would never train: leave the head out of "
            "lora_target_modules, or use hardware.fused_head=none (logps_chunk_size bounds the logits' memory)"
        )
    gamma, _ = resolve_gamma(cfg)
    return LigerPreferenceHead(cfg.method, cfg.beta, gamma, cfg.label_smoothing, cfg.sft_weight)


def liger_losses():
    """``liger_kernel.chunked_loss``, or a ConfigError that says how to install it (an ImportError was taken for a
    crash: a traceback, exit 1)."""
    from simpo_exp.config import ConfigError

    try:
        from liger_kernel import chunked_loss
    except ImportError as e:
        raise ConfigError(f"hardware.fused_head=liger needs the liger-kernel package: {INSTALL_HINT}") from e
    return chunked_loss


# hardware.fused_layers=liger: Liger's kernels for the decoder layers only. Its cross-entropy kernels stay off:
# the head and the loss are the project's (or hardware.fused_head's), and Liger's fused-linear cross entropy would
# replace the model's forward, which the log-prob paths call.
LIGER_LAYER_KERNELS = {
    "rope": True,
    "rms_norm": True,
    "swiglu": True,
    "geglu": True,  # Gemma's MLP
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}


def fuse_layers(model: nn.Module) -> None:
    """``hardware.fused_layers=liger``: each decoder layer's RMSNorms, its gated MLP (SwiGLU; GeGLU for Gemma)
    and its rotary embedding on Liger-Kernel's Triton kernels, through transformers' own Liger integration (what
    ``TrainingArguments(use_liger_kernel=True)`` applies). Each replaces a chain of memory-bound element-wise
    passes by one kernel and keeps fewer activations for the backward pass; the results are the same to the
    precision of the run (``tests/test_gpu.py`` holds them to the plain path's).

    The norms and MLPs are patched on this model's modules; the rotary embedding, a function of the model
    family's module in transformers, and the norm and MLP classes are replaced for the whole process (as
    transformers' Trainer does). ``kept_modeling_modules`` puts them back where a process builds other models
    after this one (benchmarks, tests, a sweep's jobs in one process: the entry point trains each inside one)."""
    from simpo_exp.config import ConfigError
    from simpo_exp.model import has_accelerator

    where = "hardware.fused_layers='liger'"
    if not has_accelerator():
        raise ConfigError(f"{where} runs Triton kernels, which need a GPU; use hardware.fused_layers=none on a CPU")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise ConfigError(f"{where} needs the liger-kernel package: {INSTALL_HINT}") from e
    from transformers.integrations.liger import apply_liger_kernel

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(
            f"{where}: Liger-Kernel has no kernels for model type {model_type!r}; use hardware.fused_layers=none"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
    family = type(base).__module__  # e.g. transformers.models.llama.modeling_llama, which Liger patches
    for kept in _KEPT:
        kept.setdefault(family, dict(vars(sys.modules[family])))
    apply_liger_kernel(model, dict(LIGER_LAYER_KERNELS))


# The open kept_modeling_modules blocks, innermost last: each maps a modeling module's name to its names as
# they were before fuse_layers first patched it inside that block.
_KEPT: list[dict[str, dict]] = []


@contextmanager
def kept_modeling_modules():
    """Put back, on leaving, what ``fuse_layers`` replaced inside the block for the whole process: the module-level
    names (Liger's rotary embedding, norm and MLP classes) of each model family's transformers module it patched.
    A model patched inside keeps its patched modules but calls transformers' rotary embedding again, so patched
    models are built, and done with, inside."""
    kept: dict[str, dict] = {}
    _KEPT.append(kept)
    try:
        yield
    finally:
        _KEPT.remove(kept)
        for name, names in kept.items():
            vars(sys.modules[name]).update(names)


class LigerPreferenceHead(nn.Module):
    """Liger's fused-linear loss of ``method`` with the run's settings. ``compiled``: run Liger's chunk step
    under torch.compile (None: on a GPU only; compiling on a CPU takes tens of seconds and gains nothing)."""

    def __init__(self, method: str, beta: float, gamma: float, label_smoothing: float, sft_weight: float):
        super().__init__()
        self.method, self.beta, self.gamma = method, beta, gamma
        self.label_smoothing, self.sft_weight = label_smoothing, sft_weight
        self.compiled: bool | None = None
        self.split_cost = SPLIT_COST  # width_groups: 0 splits wherever a group saves any padding
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
            else:  # Liger's ORPO module weighs its NLL term 1 and its log(1 - p) is NaN-prone: see ORPOLoss
                loss = ORPOLoss(beta=self.beta, alpha=self.sft_weight, nll=nll, compiled=compiled)
            self._losses[compiled] = loss
        return self._losses[compiled]

    def forward(self, head, states, targets, rows, n: int, counts, sizes: list[int], sft_tokens=None):
        """``states`` [M, H] the hidden states that predict the response tokens ``targets`` [M], each row's in
        order (``rows`` [M] their row, ``counts`` [n] tokens per row, ``sizes`` the same as plain ints, with which
        the calls are planned on the host; rows [0, n/2) chosen, the rest rejected).
        The padded layout hands the rows over one after another; the packed layouts interleave them pair by
        pair, so each token's place in its row is counted in row order (a stable sort of the row indices); the
        states themselves are scattered straight into their rows, never copied into that order.

        Liger pads every row of a call to the call's longest response and runs the head over the padding too.
        So the pairs go to Liger in groups of similar width (``width_groups``), each call's loss weighed by its
        share of the pairs: that is the batch mean, as the pairwise loss is a mean over pairs. Each call's
        gradients are taken at once and added to the first call's (``TakenGradients``), so at most two
        head-sized gradient buffers exist at once (the sum and the current call's), not one per call. An NLL
        term (``sft_weight`` > 0) Liger divides by the call's chosen tokens, not the batch's: each call's
        ``alpha`` is rescaled so that the weighed sum is the batch's term (over ``sft_tokens`` where given, as
        objective.batch_loss divides it)."""
        weight, bias = unsharded(head).weight, getattr(head, "bias", None)
        if weight.numel() == 0:
            raise RuntimeError(
                "hardware.fused_head=liger: the output head's weight is partitioned here (DeepSpeed ZeRO-3 gathers "
                "it only inside the model's forward); the fused head needs it whole: use hardware.fused_head=none "
                "with logps_chunk_size"
            )
        half = n // 2
        widths = [max(sizes[i], sizes[half + i], 1) for i in range(half)]
        groups = width_groups(widths, self.split_cost)
        indices, group_of, slot = group_rows(groups, half, rows.device)
        starts = torch.cumsum(counts, 0) - counts
        order = torch.argsort(rows, stable=True)  # the tokens grouped by row, each row's in order
        pos = torch.empty_like(rows)
        pos[order] = torch.arange(rows.shape[0], device=rows.device) - starts[rows[order]]
        # the tokens grouped by call, each call's in their order; the calls' token counts are known on the host
        by_call = torch.argsort(group_of[rows], stable=True) if len(groups) > 1 else None
        call_tokens = [sum(sizes[i] + sizes[half + i] for i in pairs) for pairs in groups]
        loss_fn = self._loss(states.device.type == "cuda" if self.compiled is None else self.compiled)
        trained = [x for x in (states, weight, bias) if x is not None and x.requires_grad]
        training = torch.is_grad_enabled() and bool(trained)
        # Liger takes gradients only of inputs that require them: in evaluation none do
        leaves = [None if x is None else x.detach().requires_grad_(training and x.requires_grad)
                  for x in (states, weight, bias)]  # fmt: skip
        wrt = [x for x in leaves if x is not None and x.requires_grad]  # the leaves standing for ``trained``
        total, grads = 0.0, None
        chosen, rejected, chosen_rewards, rejected_rewards = torch.zeros(4, half, device=states.device)
        logit_sums = torch.zeros(2, device=states.device)
        for g, (pairs, idx) in enumerate(zip(groups, indices)):
            width, share = max((widths[i] for i in pairs), default=1), len(pairs) / max(half, 1)
            if self.sft_weight > 0 and pairs:  # share x alpha x (NLL sum / the call's chosen tokens)
                over = sum(sizes[:half]) if sft_tokens is None else sft_tokens  # the NLL term's denominator
                loss_fn.alpha = self.sft_weight * sum(sizes[i] for i in pairs) / max(over, 1e-12) / share
            first = sum(call_tokens[:g])
            tokens = slice(None) if by_call is None else by_call[first : first + call_tokens[g]]
            with torch.enable_grad() if training else torch.no_grad():
                s, w, b = leaves
                where = (slot[rows[tokens]], pos[tokens])
                padded = s.new_zeros(2 * len(pairs), width, s.shape[-1]).index_put(where, s[tokens])
                labels = targets.new_full((2 * len(pairs), width), -100).index_put(where, targets[tokens])
                loss, outs = loss_fn(w, padded, labels, b)
                if training:  # the call's gradients, now, so that Liger frees its buffers before the next call
                    grads = accumulate(grads, torch.autograd.grad(loss, wrt), share)
            total = total + share * loss.detach()
            c, r, c_mean, r_mean, _, c_rewards, r_rewards = (x.detach().float() for x in outs[:7])
            chosen[idx], rejected[idx], chosen_rewards[idx], rejected_rewards[idx] = c, r, c_rewards, r_rewards
            # Liger's logit means divide by (pairs * width * vocabulary); padding positions add the bias only.
            cells = len(pairs) * width
            group_sums = torch.stack([c_mean, r_mean]) * cells
            if bias is not None:
                real = torch.stack([counts[idx].sum(), counts[idx + half].sum()])
                group_sums = group_sums - (cells - real) * bias.detach().float().mean()
            logit_sums = logit_sums + group_sums
        if training:
            total = TakenGradients.apply(total, *trained, *grads)
        logps = torch.cat([chosen, rejected])
        if self.method == "cpo":  # Liger returned sums
            logps = logps / counts.clamp(min=1)
        return FusedPreference(total, logps, counts, chosen_rewards, rejected_rewards, logit_sums)


def ORPOLoss(beta: float, alpha: float, nll: bool, compiled: bool) -> nn.Module:
    """Liger's fused-linear ORPO loss, ``alpha`` x NLL(chosen) + the odds-ratio term, with ``alpha`` an attribute
    (rescaled per call as the SimPO and CPO modules' is). Two changes to Liger's: its ORPO module passes no
    ``alpha`` to its preference base, which weighs the NLL term 1, and its log odds take log1p(-e^x), which is
    -inf (a NaN gradient) for a mean log-prob within about 3e-8 of 0 in float32; the log odds here are
    ``losses.orpo_log_odds``, the unfused path's. The rest is Liger's."""
    from liger_kernel.chunked_loss.fused_linear_preference import LigerFusedLinearPreferenceBase
    from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOFunction

    class Function(LigerFusedLinearORPOFunction):
        @classmethod
        def forward(cls, ctx, _input, weight, target, bias, beta, alpha, compiled):
            return LigerFusedLinearPreferenceBase.forward(
                cls=cls, ctx=ctx, _input=_input, weight=weight, target=target, bias=bias, alpha=alpha, beta=beta,
                compute_nll_loss=nll, compiled=compiled,
            )  # fmt: skip

        @staticmethod
        def preference_loss_fn(chosen_logps, rejected_logps, full_target, beta=0.1):
            pairs = full_target.shape[0] // 2  # Liger's per-chunk sums over the whole batch's pairs, as its own
            log_odds = orpo_log_odds(chosen_logps, rejected_logps)
            ratio = F.logsigmoid(log_odds)
            rewards = (beta * chosen_logps, beta * rejected_logps)
            return -beta * ratio.sum() / pairs, *rewards, ratio.sum() / pairs, log_odds.sum() / pairs

        @staticmethod
        def backward(ctx, *grad_output):
            grads = LigerFusedLinearPreferenceBase.backward(ctx, grad_output)[:4]  # input, weight, target, bias
            return *grads, None, None, None

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.beta, self.alpha, self.compiled = beta, alpha, compiled

        def forward(self, weight, _input, target, bias=None):
            return Function.apply(_input, weight, target, bias, self.beta, self.alpha, self.compiled)

    return Loss()


# A further Liger call costs about as much as this many padded positions of the head (its head-sized gradient
# buffer is zeroed, written and summed: about 12 bytes per head weight, against 6 FLOPs per weight and position).
SPLIT_COST = 256
MAX_CALLS = 4


def width_groups(widths: list[int], split_cost: int = SPLIT_COST, max_calls: int = MAX_CALLS) -> list[list[int]]:
    """The pairs (indices into ``widths``, each pair's longer response) split into at most ``max_calls`` groups
    of neighbouring widths that minimise the head's padded positions, 2 x pairs x widest in each group, plus
    ``split_cost`` per extra group (an exact split, by dynamic programming over the pairs sorted widest first).
    Each group lists its pairs widest first; the groups go from the widest to the narrowest."""
    ranked = sorted(range(len(widths)), key=lambda i: -widths[i])
    w = [widths[i] for i in ranked]
    n, inf = len(w), float("inf")
    if n == 0:
        return [[]]
    # cost[k][j]: the first j pairs in k groups; cut[k][j]: where the last of those groups starts
    cost = [[inf] * (n + 1) for _ in range(max_calls + 1)]
    cut = [[0] * (n + 1) for _ in range(max_calls + 1)]
    cost[0][0] = 0
    for k in range(1, max_calls + 1):
        for j in range(1, n + 1):
            for i in range(j):
                c = cost[k - 1][i] + 2 * (j - i) * w[i]
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    calls = min(range(1, max_calls + 1), key=lambda k: cost[k][n] + (k - 1) * split_cost)
    groups, j = [], n
    for k in range(calls, 0, -1):
        i = cut[k][j]
        groups.append(ranked[i:j])
        j = i
    return groups[::-1]


def group_rows(groups: list[list[int]], half: int, device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """For each group its pairs' indices on ``device``; per row (chosen rows first, then rejected) its group and
    its row within the group's call (the group's chosen rows, then its rejected ones, in the group's order)."""
    group_of = torch.empty(2 * half, dtype=torch.long)
    slot = torch.empty(2 * half, dtype=torch.long)
    indices = [torch.tensor(pairs, dtype=torch.long) for pairs in groups]
    for g, idx in enumerate(indices):
        group_of[idx] = group_of[idx + half] = g
        slot[idx] = torch.arange(len(idx))
        slot[idx + half] = slot[idx] + len(idx)
    return [host_to_device(i, device) for i in indices], host_to_device(group_of, device), host_to_device(slot, device)


def accumulate(grads, taken, share: float):
    """``grads`` + ``share`` x ``taken``, in place where it can: the first call's gradients become the sums."""
    if grads is None:
        return list(taken) if share == 1 else [g.mul_(share) for g in taken]
    for acc, g in zip(grads, taken):
        acc.add_(g, alpha=share)
    return grads


class TakenGradients(torch.autograd.Function):
    """A loss whose gradients were taken in the forward pass (Liger's calls): backward hands them on, times the
    gradient that reaches the loss. ``apply(loss, *inputs, *gradients)``, one gradient per input."""

    @staticmethod
    def forward(ctx, loss, *tensors):
        ctx.inputs = len(tensors) // 2
        ctx.save_for_backward(*tensors[ctx.inputs :])
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        # the buffers are this step's own and backward runs once: scaled in place, without a copy
        return None, *(g.mul_(grad_output) for g in ctx.saved_tensors), *([None] * ctx.inputs)
