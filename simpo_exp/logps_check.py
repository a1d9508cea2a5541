"""The run's log-probs against the model's own forward, once before the first step.

``ResponseLogps`` runs the decoder and the output head itself (to take the head at the response positions alone, to
pack sequences, to chunk the vocabulary), so what a family's own ``forward`` does past ``head(decoder(x))`` (a logit
scale, ``logps.LOGIT_SCALES``; a final softcap; a vocabulary cut) and what a layout assumes of attention (positions
from ``position_ids``) must be done here as well. A table of families cannot keep up with new ones, and a miss gave
every log-prob at another temperature without a word. So one training pair, cut short, is scored in the run's layout
and by the model's own forward (each sequence alone, without padding), and a gap past the tolerance stops the run,
naming both. ``hardware.check_logps=false`` leaves the check out.

    tolerance   mean log-prob per response token: 1e-3 where the run computes in float32, 5e-2 under a 16-bit
                autocast or 16-bit weights (two ways of summing in bf16 differ by rounding, not by a formula)
    record      env.json ``logps_check``: the layout, both pairs of means, the gap and the tolerance
    engines     not under FSDP or DeepSpeed (no process holds whole weights before ``prepare``)
"""

from __future__ import annotations

import math

import torch

from simpo_exp.errors import UserError

KEEP_TOKENS = 32  # of the prompt's end and of each response's start: enough tokens to tell, cheap on any model
TOLERANCE = {"float32": 1e-3, "16-bit": 5e-2}
SIDES = ("chosen_input_ids", "rejected_input_ids")


class LogpsMismatch(UserError, RuntimeError):
    """The run's log-probs are not the model's own."""


def cut(pair: dict) -> dict:
    """The pair with its prompt's last and each response's first ``KEEP_TOKENS`` tokens."""
    return {"prompt_input_ids": list(pair["prompt_input_ids"])[-KEEP_TOKENS:]} | {
        k: list(pair[k])[:KEEP_TOKENS] for k in SIDES
    }


def own_mean_logp(model, prompt: list[int], response: list[int], device) -> float:
    """The mean log-prob of ``response`` after ``prompt`` from the model's own forward (its logits, all of them)."""
    ids = torch.tensor([prompt + response], device=device)
    mask = torch.ones_like(ids)  # every token real, a pad id among them too (XLM reads pads off the ids without one)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
    targets = torch.tensor(response, device=device)[:, None]
    return float(logits.log_softmax(-1).gather(-1, targets).mean())


def precision(model, autocast_dtype) -> str:
    """Which tolerance applies: 16-bit where the autocast or any floating weight is."""
    sixteen = (torch.float16, torch.bfloat16)
    if autocast_dtype in sixteen or any(p.dtype in sixteen for p in model.parameters()):
        return "16-bit"
    return "float32"


@torch.no_grad()
def check_logps(model, layout, pair: dict, pad_token_id: int, device, autocast, autocast_dtype=None) -> dict:
    """Score ``pair`` (cut short) in ``layout`` and by the model's own forward, in eval mode under ``autocast``;
    ``LogpsMismatch`` where the mean log-probs differ past the tolerance, else the record (see the module)."""
    from accelerate.utils import send_to_device

    from simpo_exp.data.collate import PairCollator
    from simpo_exp.logps import ResponseLogps
    from simpo_exp.model import eval_mode

    pair = cut(pair)
    if not pair["prompt_input_ids"] or not all(pair[k] for k in SIDES):
        return {"skipped": "the first pair has an empty prompt or response"}
    policy = ResponseLogps.for_layout(model, layout)
    batch = send_to_device(PairCollator(pad_token_id, layout.packing, layout.attention)([pair]), device)
    with eval_mode(model), autocast():
        ours = [float(x) for x in policy(**batch).mean_logps.float()]
        own = [own_mean_logp(model, pair["prompt_input_ids"], pair[k], device) for k in SIDES]
    gaps = [abs(a - b) for a, b in zip(ours, own)]
    gap = math.nan if any(math.isnan(g) for g in gaps) else max(gaps)  # max() keeps a number met before a NaN
    kind = precision(model, autocast_dtype)
    record = {"layout": layout.as_dict(), "ours": ours, "model": own, "gap": gap, "tolerance": TOLERANCE[kind]}
    if not gap <= TOLERANCE[kind]:  # a NaN gap too
        family = getattr(model.config, "model_type", "?")
        where = (
            "hardware.packing=none shows whether the packed layout is the cause; "
            if layout.packing != "none"
            else "the padded layout runs the model's own attention, so its head is the cause "
            "(logps.LOGIT_SCALES lists the logit factors reproduced); "
        )
        raise LogpsMismatch(
            f"the log-probs this run computes for model_type={family!r} in {layout} are not the model's own: "
            f"mean log-prob per token of the first pair's chosen and rejected responses {ours[0]:.5f}, "
            f"{ours[1]:.5f} here, {own[0]:.5f}, {own[1]:.5f} from the model's forward (gap {gap:.3g}, tolerance "
            f"{TOLERANCE[kind]:g} in {kind}). Every reward and loss would be another model's: {where}"
            "hardware.check_logps=false runs it anyway"
        )
    return record
