"""Log-probabilities of response tokens, computed from the model's final hidden states.

``ResponseLogps`` wraps a causal LM. Its forward runs the transformer body once over the
batch, keeps only the hidden states that predict a response token (the batch lists where they
are: ``target_sources``), and applies the output head to those alone: prompt and padding
positions never reach the vocabulary projection. With ``chunk_size`` > 0 the head, log-softmax and gather run in
chunks of that many tokens under activation checkpointing, so peak memory holds one chunk of
logits instead of all of them. Where FSDP2 or ZeRO-3 shards the head, the chunks read its weight instead of
calling it: calling it would gather it and reduce its gradient once per chunk, and the processes' chunk counts
differ (``unsharded``).

With ``packing`` other than ``"none"`` it takes the packed batches of
``simpo_exp.data.collate.PairCollator`` (same ``packing`` and ``attention``), where no compute goes
to padding and, under ``"prefix_shared"``, the prompt is computed once for both responses. The
output is the same either way: one entry per sequence, chosen first (slot i), rejected after (B+i).

- ``attention="segments"``: all pairs sit in one row. The model's attention is routed through
  ``segment_attention`` (registered with transformers' ``AttentionInterface``; the model's own
  attention is kept for any call that does not carry a segment plan), which runs causal SDPA once
  per sequence: chosen = ``prompt chosen``; rejected = ``prompt rejected`` gathered together (its
  prompt-query outputs are dropped, so the prompt's keys and values are computed once and reused).
  No dense mask is built, and SDPA's causal kernels skip the masked half.
- ``attention="flex"`` / ``"flash"``: the same one row and hook, but one kernel call per layer: FlexAttention
  with a block mask (``flex_block_mask``), or flash-attn's ``flash_attn_varlen_func`` over the sequences'
  ``cu_seqlens`` (``flash_seqlens``; ``packed`` only, as its masks are per sequence).
- ``attention="mask"``: one row per pair with an explicit 4D mask (boolean for sdpa, additive for
  eager); works with any attention that takes a 4D mask, at O(L^2) per row.

Being an ``nn.Module`` whose forward does all of this, it can be handed to
``accelerate.prepare`` (DDP/FSDP see the whole computation).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from simpo_exp.layout import (
    BatchLayout,
    attention_window,
    short_window,
    state_beside_attention,
    text_config,
    unscored_family,
)

SEGMENT_ATTENTION_PREFIX = "simpo_segments:"


class SequenceLogps(NamedTuple):
    logp_sums: torch.Tensor  # [N] summed log-probs of each row's response tokens
    num_tokens: torch.Tensor  # [N] response tokens per row
    # Detached float32 diagnostics, summed over each row's response tokens (divide by a token count):
    logit_sums: torch.Tensor  # [N] the logit averaged over the vocabulary
    entropy_sums: torch.Tensor  # [N] the entropy of the next-token distribution
    top1_counts: torch.Tensor  # [N] tokens that are the distribution's most likely one (first on ties)

    @property
    def mean_logps(self) -> torch.Tensor:
        """Length-normalised log-probs: mean over response tokens."""
        return self.logp_sums / self.num_tokens.clamp(min=1)

    @property
    def logit_means(self) -> torch.Tensor:
        """Each row's mean logit over its response positions and the vocabulary."""
        return self.logit_sums / self.num_tokens.clamp(min=1)


STATS_ROWS = 512  # rows per block of token_stats: bounds its [rows, V] float32 temporaries


# The factor some families' ForCausalLM.forward multiplies the head's logits by (transformers 5.24), by model_type.
# ResponseLogps runs the decoder and the head itself, not that forward, so it applies the factor as the forward does;
# without it every log-prob (policy and reference alike) was taken at another temperature than the model samples at.
# A family missing here is caught at set-up (simpo_exp/logps_check.py).
_DIVIDED = ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")
LOGIT_SCALES = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"), lambda c: c.logit_scale),
    **dict.fromkeys((*_DIVIDED, "minicpm3"), lambda c: 1 / c.logits_scaling),  # MiniCPM3 divides the hidden states
    "inkling_text": lambda c: 1 / c.logits_mup_width_multiplier,  # divides the hidden states too
    "falcon_h1": lambda c: c.lm_head_multiplier,
    "hyperclovax": lambda c: c.logits_scaling,  # multiplied, unlike Granite's key of that name
}


# The keys families name the cap their forward squashes the logits to (cap * tanh(logits / cap)) by: Gemma 2/3's,
# RecurrentGemma's, xLSTM's.
FINAL_SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def final_softcap(config) -> float | None:
    """The cap the model's own forward puts on its logits, under whichever key its family names it; None for none."""
    config = text_config(config)
    return next((float(v) for k in FINAL_SOFTCAP_KEYS if (v := getattr(config, k, None))), None)


def logit_scale(config) -> float | None:
    """The factor the model's own forward multiplies its logits by; None where it multiplies by none."""
    config = text_config(config)
    scale = LOGIT_SCALES.get(getattr(config, "model_type", ""), lambda c: None)(config)
    return None if scale is None or float(scale) == 1.0 else float(scale)


@torch.no_grad()
def token_stats(logits: torch.Tensor, logps: torch.Tensor, targets: torch.Tensor):
    r"""Per-token diagnostics from float32 ``logits`` [M, V] and their log-softmax ``logps`` [M, V]:
    the logit averaged over the vocabulary, the entropy :math:`-\sum_v p_v \log p_v`, and whether the
    target is the argmax (first index on ties, as torch.argmax). Detached, float32, each [M];
    computed in blocks of ``STATS_ROWS`` rows so the extra memory stays small."""

    def entropy(lp: torch.Tensor) -> torch.Tensor:
        return -(lp.exp() * lp).nan_to_num_(0.0).sum(-1)  # a -inf logit (p = 0) adds 0, not 0 * -inf

    parts = [
        (lg.mean(-1), entropy(lp), (lg.argmax(-1) == t).float())
        for lg, lp, t in zip(logits.split(STATS_ROWS), logps.split(STATS_ROWS), targets.split(STATS_ROWS))
    ]
    if not parts:
        empty = logits.new_zeros(0)
        return empty, empty, empty
    return tuple(torch.cat(x) for x in zip(*parts))


# ----------------------------------------------------------------------------- segment attention
class SegmentPlanUnused(RuntimeError):
    """The model's decoder layers do not pass attention's keyword arguments on, so a packed layout's segment plan
    never reaches its attention (StableLM's, Falcon's and Nemotron's layers in transformers 5)."""


class SegmentPlan:
    """Which tokens of a packed row attend to which, as a list of causal attention jobs.

    The row is cut into pieces of ``sizes`` tokens (one ``split``, whose backward is one ``cat``). A job
    is a list of piece indices read together as one causal sequence, and ``keep_from``: the job's
    outputs before that index are dropped (under prefix sharing the rejected job re-reads its prompt
    only as keys and values). The jobs' kept outputs, in order, tile the row exactly. ``calls`` counts
    the attention layers that used the plan (a check that the model routed its attention here).
    """

    def __init__(self, segments: list, packing: str):
        self.sizes: list[int] = []
        self.jobs: list[tuple[list[int], int]] = []
        for p, c, r in segments:
            k = len(self.sizes)
            if packing == "packed":  # prompt chosen | prompt rejected
                self.sizes += [p + c, p + r]
                self.jobs += [([k], 0), ([k + 1], 0)]
            elif packing == "prefix_shared":  # prompt | chosen | rejected
                self.sizes += [p, c, r]
                self.jobs += [([k, k + 1], 0), ([k, k + 2], p)]
            else:
                raise ValueError(f"packing={packing!r} has no segment plan")
        self.length = sum(self.sizes)
        self.max_job = max(sum(self.sizes[i] for i in pieces) for pieces, _ in self.jobs)
        self.calls = 0
        self.dropout = 0.0  # the largest attention dropout a layer asked for (layout_auto.plan_unused reads it)
        self.probe = False  # layout_auto.plan_unused: only count the calls, compute nothing
        self.block_mask = None  # set for attention="flex": one FlexAttention call per layer instead of the jobs
        self.flash = None  # set for attention="flash": (cu_seqlens, max_seqlen) for flash-attn's varlen kernel


def _job(pieces: tuple[torch.Tensor, ...], index: list[int]) -> torch.Tensor:
    if len(index) == 1:
        return pieces[index[0]]
    return torch.cat([pieces[i] for i in index], dim=2)


# Opaque to torch.compile (hardware.compile, simpo_exp/compiled.py): traced, each batch's plan would be baked
# into the layer's graph and recompile it every batch; the layer compiles around this call instead.
@torch.compiler.disable
def segment_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    *,
    fallback=None,
    simpo_segments: SegmentPlan | None = None,
    **kwargs,
):
    """Attention over a packed row, one causal SDPA per job of ``simpo_segments``.

    query [1, Hq, T, D], key and value [1, Hkv, T, D]; returns [1, T, Hq, D] as transformers'
    attention functions do. Without a plan it hands the call to the model's own attention.
    """
    if simpo_segments is None:
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    plan = simpo_segments
    if plan.probe:  # whether the plan reaches every layer, and with what dropout: the output is not read
        plan.calls += 1
        plan.dropout = max(plan.dropout, float(dropout or 0.0))
        batch, heads, length = query.shape[:3]  # [B, Hq, T, D]; the value's head size may differ (MLA)
        return value.new_zeros(batch, length, heads, value.shape[-1]), None
    if kwargs.get("s_aux") is not None:  # GPT-OSS's sinks: one more logit in each row's softmax
        raise ValueError(
            "segment attention (and FlexAttention, flash-attn here) does not add the model's attention-sink logits "
            "(s_aux): use packing_attention=mask, or packing=none"
        )
    softcap = kwargs.get("softcap")
    if softcap and plan.block_mask is None and plan.flash is None:
        raise ValueError(
            "segment attention does not implement attention-logit softcapping (Gemma 2): "
            "use packing_attention=flex or mask (with eager attention), or packing=none"
        )
    window = kwargs.get("sliding_window")
    if window and plan.max_job > window:
        raise ValueError(
            f"a packed sequence of {plan.max_job} tokens exceeds the model's sliding window ({window}): "
            "segment attention does not implement sliding windows; use packing=none"
        )
    if query.shape[0] != 1 or query.shape[2] != plan.length:
        raise ValueError(f"segment attention expects one packed row of {plan.length} tokens, got {tuple(query.shape)}")
    plan.calls += 1
    if plan.flash is not None:
        return flash_varlen_attention(query, key, value, plan.flash, scaling, dropout, softcap), None
    gqa = query.shape[1] != key.shape[1]
    if plan.block_mask is not None:
        if dropout:  # flex_attention has no dropout: the run would train without the model's attention dropout
            raise ValueError(
                f"packing_attention='flex' has no attention dropout, and this model trains with {dropout}: keep "
                "disable_dropout=true (the default), or use packing_attention=segments or mask"
            )
        score_mod = softcap_score_mod(softcap, query.device) if softcap else None
        query, key, value = one_dtype(query, key, value)
        out = flex_attention_fn(query.device)(
            query, key, value, block_mask=plan.block_mask, score_mod=score_mod, scale=scaling, enable_gqa=gqa
        )
        return out.transpose(1, 2).contiguous(), None
    qs, ks, vs = (x.split(plan.sizes, dim=2) for x in (query, key, value))
    outs = []
    for index, keep_from in plan.jobs:
        o = F.scaled_dot_product_attention(
            _job(qs, index),
            _job(ks, index),
            _job(vs, index),
            is_causal=True,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=gqa,
        )
        outs.append(o[:, :, keep_from:] if keep_from else o)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


def host_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor built on the host, on ``device`` without making the host wait: to a GPU it is copied from pinned
    memory, in the order of the device's queue (a copy from ordinary memory waits for the queue to empty)."""
    if device.type == "cpu":
        return x
    return (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)


FLEX_BLOCK = 128  # FlexAttention's tile: the block mask says, per (query tile, key tile), none / some / all visible


def flex_block_mask(segments: list, packing: str, device: torch.device, block: int = FLEX_BLOCK):
    """FlexAttention's ``BlockMask`` for a packed row: a key is visible when it is in the query's pair (and,
    under ``packed``, the same sequence), not later in the row, and not a chosen token seen from the rejected
    response (prefix sharing: arXiv 2410.20305). Built once per batch and shared by every layer; the kernel
    skips the tiles the mask rules out, so the cost follows the visible pairs, not the row's length squared.

    The tiles are classified from the row's layout (``flex_tiles``), in time and memory that grow with the
    number of tiles, not of tokens: torch's ``create_block_mask`` evaluates the rule on every (query, key)
    pair, which for a row of 64k tokens is several boolean tensors of 4G entries. The rule itself
    (``mask_mod``) is applied only inside the tiles marked partly visible."""
    from torch.nn.attention.flex_attention import BlockMask

    doc, role = row_groups(segments, packing)
    length = len(doc)
    visible = visibility(host_to_device(doc, device), host_to_device(role, device))
    tables = [host_to_device(x, device) for tiles in flex_tiles(doc, role, block) for x in tile_table(tiles)]
    return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=block, mask_mod=visible, seq_lengths=(length, length))


def row_groups(segments: list, packing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of a packed row: its sequence group (which tokens may see each other) and its role (0 prompt,
    1 chosen, 2 rejected; under ``packed`` every token is 0, as each sequence is a group of its own)."""
    doc, role = [], []
    for i, (p, c, r) in enumerate(segments):
        if packing == "packed":  # prompt chosen | prompt rejected: two sequences
            doc += [2 * i] * (p + c) + [2 * i + 1] * (p + r)
            role += [0] * (2 * p + c + r)
        else:  # prompt | chosen | rejected: one group, rejected blind to chosen
            doc += [i] * (p + c + r)
            role += [0] * p + [1] * c + [2] * r
    return torch.tensor(doc), torch.tensor(role)


def visibility(doc: torch.Tensor, role: torch.Tensor):
    """The rule as FlexAttention's ``mask_mod`` over a row's ``row_groups``: a key is visible from a query in its
    group, not later in the row, and not a chosen token seen from the rejected response."""

    def visible(b, h, q, k):
        return (q >= k) & (doc[q] == doc[k]) & ~((role[q] == 2) & (role[k] == 1))

    return visible


def flex_tiles(doc: torch.Tensor, role: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partly visible, wholly visible) tiles of the visibility rule, boolean [query tiles, key tiles], exact.

    The row is cut into pieces: stretches of one group and one role, cut again at the tile edges. Between two
    pieces the rule is decided by their ends alone: some pair is visible when the groups match, the roles are
    not (rejected, chosen) and the key piece starts no later than the query piece ends; every pair is when,
    besides, the key piece ends no later than the query piece starts. A tile pair is empty when none of its
    piece pairs has a visible pair, full when all of them are all visible. The pieces number the tiles plus
    three per pair, so this costs (tiles + pieces)^2, not length^2. A short last tile is never marked full,
    as torch's own builder leaves it."""
    length = len(doc)
    tiles = -(-length // block)
    cut = torch.ones(length, dtype=torch.bool)
    cut[1:] = (doc[1:] != doc[:-1]) | (role[1:] != role[:-1])
    cut[::block] = True
    starts = cut.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([length])]) - 1
    group, kind, tile = doc[starts], role[starts], starts // block
    allowed = (group[:, None] == group[None, :]) & ~((kind[:, None] == 2) & (kind[None, :] == 1))  # [query, key]
    some = allowed & (starts[None, :] <= ends[:, None])
    every = allowed & (ends[None, :] <= starts[:, None])
    cell = (tile[:, None] * tiles + tile[None, :]).flatten()  # each piece pair's tile pair

    def count(x):
        return torch.zeros(tiles * tiles, dtype=torch.int64).index_add_(0, cell, x.flatten().long()).view(tiles, tiles)

    visible = count(some) > 0
    full = count(~every) == 0  # every piece pair of the tile pair all visible (pieces cover their tiles)
    full &= visible
    if tiles * block != length:
        full[-1, :] = full[:, -1] = False
    return visible & ~full, full


def tile_table(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [query tiles, key tiles] boolean as FlexAttention's (counts, indices) per query tile: the count of
    marked key tiles and their indices first, ascending ([1, 1, ...] for batch and heads)."""
    counts = tiles.sum(1, dtype=torch.int32)
    order = torch.argsort((~tiles).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


def flash_seqlens(segments: list, packing: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """flash-attn's description of a packed row: ``cu_seqlens`` (int32 [S + 1], where each sequence starts,
    then the row's end) and the longest sequence. ``packed`` only: each sequence attends causally within
    itself, which cannot express prefix sharing's rejected-blind-to-chosen mask."""
    if packing != "packed":
        raise ValueError(f"flash-attn's varlen attention serves packing='packed', not {packing!r}")
    lengths = [n for p, c, r in segments for n in (p + c, p + r)]
    starts = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return host_to_device(starts, device), max(lengths)


def flash_varlen_attention(query, key, value, seqlens, scaling, dropout, softcap) -> torch.Tensor:
    """query [1, Hq, T, D], key and value [1, Hkv, T, D] of a packed row through
    ``flash_attn.flash_attn_varlen_func`` (which takes [T, heads, D] and groups query heads itself);
    returns [1, T, Hq, D]. flash-attn runs half precision only: float32 inputs (a run without autocast)
    go in as bfloat16 and come back as float32."""
    from flash_attn import flash_attn_varlen_func

    cu_seqlens, longest = seqlens
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    if q.is_cuda and q.dtype == torch.float32:
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    capped = {"softcap": softcap} if softcap else {}  # flash-attn before 2.6 takes no softcap at all
    out = flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, longest, longest,
        dropout_p=dropout, softmax_scale=scaling, causal=True, **capped,
    )  # fmt: skip
    return out.to(query.dtype)[None]


_COMPILED_FLEX = None
_SOFTCAP_MODS: dict = {}


def softcap_score_mod(softcap: float, device: torch.device):
    """Gemma 2's attention softcap as a FlexAttention ``score_mod``: scores squashed to (-softcap, softcap) before
    the softmax. The cap is a captured 0-d tensor, not a Python float: FlexAttention compiled with dynamic=True
    traced the float as a symbolic one that inductor failed to lower (torch 2.13: "LoweringException: ...
    unbacked_bindings"), so packed Gemma-2 runs under FlexAttention died at their first step. One function per
    cap and device, made once: the compiled kernel is reused, and no step copies the cap to the device."""
    key = (float(softcap), str(device))
    if key not in _SOFTCAP_MODS:
        cap = torch.tensor(float(softcap), device=device)

        def score_mod(score, b, h, q, k):
            return torch.tanh(score / cap) * cap

        _SOFTCAP_MODS[key] = score_mod
    return _SOFTCAP_MODS[key]


def one_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in one dtype, as FlexAttention takes them: autocast's where it is on (the dtype the model's SDPA
    computes in there), else the widest of theirs. Under autocast, with float32 weights (the GPU presets), the
    projections come out bfloat16 but the rotary embedding multiplies query and key by float32 tables: FlexAttention
    got float32 query and key beside a bfloat16 value, which torch before 2.11 refuses ("Expected query, key, and
    value to have the same dtype") and later ones may run in float32 throughout."""
    device = tensors[0].device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def flex_attention_fn(device: torch.device):
    """FlexAttention, compiled on GPUs (its fast kernels are generated by torch.compile); eager elsewhere
    (CPU runs the forward only: torch has no FlexAttention backward on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def install_segment_attention(model: nn.Module) -> str:
    """Route the model's attention through ``segment_attention`` (calls without a plan go to the
    model's own implementation, with its own masks). Returns the registered name. Idempotent."""
    from functools import partial

    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = model.config._attn_implementation
    if current.startswith(SEGMENT_ATTENTION_PREFIX):
        return current
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA, the model's family
    if current == "eager":
        fallback = getattr(sys.modules[type(base).__module__], "eager_attention_forward", None)
    else:
        fallback = ALL_ATTENTION_FUNCTIONS.get(current)
    if fallback is None or current not in ALL_MASK_ATTENTION_FUNCTIONS:
        from simpo_exp.config import ConfigError

        raise ConfigError(
            f"hardware.packing_attention='segments' cannot wrap attn_implementation={current!r}; "
            "use hardware.packing_attention=mask, or hardware.packing=none (the model's own attention)"
        )
    name = f"{SEGMENT_ATTENTION_PREFIX}{type(base).__name__}:{current}"
    AttentionInterface.register(name, partial(segment_attention, fallback=fallback))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    return name


def group_mask(groups: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """4D mask [R, 1, T, T] from ``attn_groups`` [R, T] (see ``simpo_exp.data.collate``): a key is
    visible when it is not later than the query, not padding, and in group 0 or the query's group.
    Every query sees itself (padding rows would otherwise be all-masked, and SDPA would give NaN).
    Boolean (True = attend) when ``dtype`` is None, else additive (0 / dtype's min)."""
    t = groups.shape[1]
    idx = torch.arange(t, device=groups.device)
    q, k = groups[:, :, None], groups[:, None, :]
    allowed = (idx[:, None] >= idx[None, :]) & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(t, dtype=torch.bool, device=groups.device)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=groups.device).masked_fill(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------- sharded heads
def fsdp_unit(module: nn.Module) -> bool:
    """Whether FSDP2 made ``module`` (part of) a unit of its own."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def engine_sharded(head: nn.Module) -> bool:
    """Whether a sharding engine holds ``head``'s weight: FSDP2 (a unit) or DeepSpeed ZeRO-3 (partitioned)."""
    return fsdp_unit(head) or hasattr(getattr(head, "weight", None), "ds_id")


def unsharded(head: nn.Module) -> nn.Module:
    """``head`` with its weight gathered, for reading it without calling the head.

    FSDP2 gathers a unit's weights in the pre-forward hook of its modules, and accelerate makes the output head a
    unit of its own (with the final norm, when it finds one); a forward that reads the weight without calling the
    head would find a shard (a DTensor). ``unshard`` gathers it; the unit's gradient is then reduce-scattered once,
    by FSDP's end-of-backward callback, which runs the post-backward of units whose hooks did not fire. DeepSpeed
    ZeRO-3 gathers a partitioned weight itself when a forward reads it (and registers it with that module)."""
    if fsdp_unit(head):
        head.unshard()  # a no-op when the unit is already gathered
    return head


# ----------------------------------------------------------------------------- the module
def decoder_of(model: nn.Module) -> nn.Module:
    """The model's decoder stack (what ``get_decoder()`` gives), whose output is the hidden states. Llama-4's text
    model gives itself back there (its base model prefix is ``language_model`` and its stack ``model``), and
    ModernBERT-decoder its output head (its attribute ``decoder``): then its ``model``, or its base model."""
    body = model.get_decoder()
    if body is model or body is model.get_output_embeddings():  # ModernBERT-decoder's ``decoder`` is its head
        stack = getattr(model, "model", None)
        return stack if stack is not None else getattr(model, model.base_model_prefix)
    return body


def shared_parameters(model: nn.Module) -> list[list[str]]:
    """The names of each parameter that ``model`` holds under more than one name (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


class ResponseLogps(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        chunk_size: int = 0,
        packing: str = "none",
        attention: str = "segments",
        fused: nn.Module | None = None,
    ):
        super().__init__()
        self.layout = BatchLayout(packing, attention, chunk_size)  # checks the values
        if why := unscored_family(model.config):
            from simpo_exp.config import ConfigError

            raise ConfigError(
                f"model: {why}, which these log-probs (only the response positions reach the head) leave out: its "
                "rewards and loss would be another model's; use a decoder-only LM (Llama, Mistral, Qwen, Gemma, ...)"
            )
        # simpo_exp/fused.py: the head and the loss in one chunked call; forward then returns its FusedPreference
        self.fused = fused
        self.model = model
        self.chunk_size = chunk_size
        self.packing = packing
        self.attention = attention
        self.probe = False  # layout_auto.plan_unused: the segment plan is passed down, no attention computed
        self.probed_dropout: float | None = None  # after a probe: the largest attention dropout a layer asked for
        self.softcap = final_softcap(model.config)
        self.scale = logit_scale(model.config)
        self._shared = shared_parameters(model)  # for tie_weights
        if packing != "none" and state_beside_attention(model.config):  # choose_layout refuses these runs
            raise ValueError(
                f"packing={packing!r} keeps sequences apart in attention only, and this model carries a state along "
                f"the row besides it ({state_beside_attention(model.config)}); use packing=none"
            )
        if packing != "none":
            impl = model.config._attn_implementation or ""
            if attention in ("segments", "flex", "flash"):
                install_segment_attention(model)
            elif impl.startswith("flash") or impl == "flex_attention":
                raise ValueError(
                    f"packing_attention=mask needs an attention that takes a dense 4D mask (sdpa, eager), "
                    f"not {impl!r}; use packing_attention=segments"
                )

    @classmethod
    def for_layout(cls, model: nn.Module, layout: BatchLayout | None = None, fused=None) -> "ResponseLogps":
        return cls(model, **(layout or BatchLayout()).as_dict(), fused=fused)

    # accelerate reads these off the module it prepares: DeepSpeed fills its "auto" bucket sizes from
    # config.hidden_size, FSDP shards per transformer layer by _no_split_modules.
    @property
    def config(self):
        return self.model.config

    @property
    def _no_split_modules(self):
        return getattr(self.model, "_no_split_modules", None)

    # FSDP2's low-memory loading moves the module to the meta device, which unties tied embeddings, and then
    # calls tie_weights() on it; it finds the embeddings (to shard tied ones as one group) through the getters.
    # Without these the input and output embeddings would train and be saved as two different matrices.
    def tie_weights(self, *args, **kwargs) -> None:
        """Share again the parameters the model shared when it was wrapped (as loaded, whatever its config says:
        transformers leaves a checkpoint's two differing matrices untied, and so does this)."""
        for first, *others in self._shared:
            param = self.model.get_parameter(first)
            for name in others:
                owner, _, attr = name.rpartition(".")
                setattr(self.model.get_submodule(owner), attr, param)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        if self.chunk_size and isinstance(head, nn.Linear) and engine_sharded(head):
            # A sharded head called once per chunk would be gathered (ZeRO-3) and its gradient reduced (both
            # engines) once per chunk: as many collectives as the process has chunks, which differ between
            # processes. Read its weight instead: gathered once, its gradient reduced once per step.
            logits = F.linear(hidden, unsharded(head).weight, head.bias)
        else:
            logits = head(hidden)
        if self.scale or self.softcap:  # in float32, as the log-softmax after: a bf16 tanh costs a 400-token
            logits = logits.float()  # sum about 0.2 nats at Gemma 2's cap of 30 (HF's forward caps in bf16)
        if self.scale:  # Cohere, Granite, ...: LOGIT_SCALES
            logits = logits * self.scale
        if self.softcap:  # Gemma 2 caps its logits; skipping this would change every log-prob
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _logps_and_logit_sums(self, hidden: torch.Tensor, targets: torch.Tensor):
        """[M] target log-probs (with gradient) and token_stats' three detached diagnostics."""
        logits = self._head(hidden).float()
        logps = logits.log_softmax(-1)
        chosen = torch.gather(logps, 1, targets[:, None]).squeeze(1)
        return chosen, *token_stats(logits.detach(), logps.detach(), targets)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        target_ids: torch.Tensor,
        target_sources: torch.Tensor,
        target_rows: torch.Tensor,
        row_tokens: torch.Tensor,
        row_lengths: list[int],
        position_ids: torch.Tensor | None = None,
        segments: list | None = None,
        attn_groups: torch.Tensor | None = None,
        sft_tokens: float | None = None,
    ) -> SequenceLogps:
        """The responses' log-probs, for a batch of ``PairCollator`` (its docstring lists the entries); with a
        fused head its loss instead (``sft_tokens``: its NLL term's denominator, objective.batch_loss's; the
        plain head leaves the loss to the caller and ignores it). The scored tokens are picked out by index, with
        sizes known on the host: nothing here waits for a GPU's queue to finish."""
        if self.packing == "none":
            if segments is not None:
                raise ValueError(
                    "a packed batch reached ResponseLogps(packing='none'): give the collator and "
                    "ResponseLogps the same packing"
                )
            body = decoder_of(self.model)
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        else:
            hidden = self._packed_hidden(input_ids, position_ids, segments, attn_groups)
        states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_sources)  # [M, H]
        n = len(row_lengths)
        if self.fused is not None:  # the head and the loss in one chunked call, whatever the layout
            head = self.model.get_output_embeddings()
            if self.scale:  # the head has no bias (fused.fused_head refuses one there): scaling its input is the same
                states = states * self.scale
            return self.fused(head, states, target_ids, target_rows, n, row_tokens, row_lengths, sft_tokens)
        return self._reduce(states, target_ids, target_rows, n, row_tokens)

    def _packed_hidden(self, input_ids, position_ids, segments, attn_groups) -> torch.Tensor:
        if segments is None or position_ids is None:
            raise ValueError(
                f"ResponseLogps(packing={self.packing!r}) needs a batch from "
                f"PairCollator(packing={self.packing!r}); this one is not packed"
            )
        body = decoder_of(self.model)
        if self.attention == "mask":
            if attn_groups is None:
                raise ValueError("packing_attention=mask needs a batch from PairCollator(attention='mask')")
            longest = SegmentPlan(segments, self.packing).max_job  # the longest sequence any token attends over
            if short_window(self.model.config, longest):  # choose_layout refuses these runs; a caller of this class
                raise ValueError(
                    f"a packed sequence of {longest} tokens exceeds the model's sliding window "
                    f"({attention_window(self.model.config)}): the mask attention does not implement "
                    "sliding windows; use packing=none"
                )
            # eager adds the mask to its scores (a float mask), sdpa takes a boolean one; under a segment-attention
            # wrap of this model (its calls without a plan go to the wrapped kernel) the wrapped one decides
            impl = (self.model.config._attn_implementation or "").rsplit(":", 1)[-1]  # "simpo_segments:<cls>:<impl>"
            dtype = self.model.dtype if impl == "eager" else None
            mask = group_mask(attn_groups, dtype)
            return body(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        if attn_groups is not None:
            raise ValueError(f"a batch for packing_attention=mask reached ResponseLogps(attention={self.attention!r})")
        plan = SegmentPlan(segments, self.packing)
        plan.probe = self.probe
        if self.attention == "flex":
            plan.block_mask = flex_block_mask(segments, self.packing, input_ids.device)
        elif self.attention == "flash":
            plan.flash = flash_seqlens(segments, self.packing, input_ids.device)
        if input_ids.shape != (1, plan.length):
            raise ValueError(
                f"packed batch of shape {tuple(input_ids.shape)} does not match its segments ({plan.length} tokens)"
            )
        # A 4D placeholder makes transformers skip its own mask building (which would detect the packed
        # sequences from position_ids and build a T x T mask); segment_attention ignores it.
        placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
        hidden = body(
            input_ids=input_ids,
            attention_mask=placeholder,
            position_ids=position_ids,
            use_cache=False,
            simpo_segments=plan,
        ).last_hidden_state
        self.probed_dropout = plan.dropout if plan.probe else None
        layers = getattr(text_config(self.model.config), "num_hidden_layers", 1)
        if plan.calls < layers:
            raise SegmentPlanUnused(
                f"only {plan.calls} of {layers} attention layers used the segment plan: this model does "
                "not pass attention kwargs through; set hardware.packing=none, or "
                "hardware.packing_attention=mask beside hardware.packing=packed or prefix_shared"
            )
        return hidden

    def _reduce(self, states, targets, rows, n, counts) -> SequenceLogps:
        if self.chunk_size and states.shape[0] > self.chunk_size:
            parts = [
                checkpoint(self._logps_and_logit_sums, s, t, use_reentrant=False)
                for s, t in zip(states.split(self.chunk_size), targets.split(self.chunk_size))
            ]
            per_token = [torch.cat(x) for x in zip(*parts)]
        else:
            per_token = self._logps_and_logit_sums(states, targets)

        def per_row(x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, rows, x)

        logps, *stats = per_token
        return SequenceLogps(per_row(logps), counts, *(per_row(x.detach()) for x in stats))
