"""From a prompt's scored responses to one preference pair, and the report on all of them.

Every prompt either yields a pair or is dropped with one reason, counted in the report:
- "all responses identical": nothing to prefer (the official recipe drops these too);
- "fewer than 2 distinct non-empty responses": empty answers are never chosen nor rejected (nor, under
  ``binarise.drop_unfinished``, answers cut at ``generate.max_new_tokens``: "fewer than 2 distinct finished responses");
- "fewer than 2 responses with a finite score": a reward model that overflowed (NaN or inf, as float16 can) leaves
  too few responses scored; such responses are never chosen nor rejected;
- "tied scores": no distinct response scores below the best;
- "score gap below binarise.min_gap": the chosen/rejected gap is smaller than asked.
The chosen response is the highest-scored (the first on ties); the rejected one depends on
``binarise.mode`` (see simpo_exp/generate/config.py). The official annotate script (argmax/argmin) keeps a prompt
whose scores all tie, as one answer paired with itself, and may pick an empty answer: both are dropped here.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter

GAP_TOLERANCE = 1e-9


def pick_pair(record: dict, bcfg) -> tuple[tuple[int, int] | None, str]:
    """Return ((chosen index, rejected index), "") or (None, reason)."""
    texts = [r["text"] for r in record["responses"]]
    scores = record["scores"]
    if len(set(texts)) == 1:
        return None, "all responses identical"
    usable = [i for i, t in enumerate(texts) if t.strip()]
    if len({texts[i] for i in usable}) < 2:
        return None, "fewer than 2 distinct non-empty responses"
    if bcfg.drop_unfinished:
        usable = [i for i in usable if record["responses"][i]["finished"]]
        if len({texts[i] for i in usable}) < 2:
            return None, "fewer than 2 distinct finished responses"
    usable = [i for i in usable if math.isfinite(scores[i])]  # a NaN compared as the best, an inf was the best
    if len({texts[i] for i in usable}) < 2:
        return None, "fewer than 2 responses with a finite score"
    best = max(usable, key=lambda i: (scores[i], -i))
    below = [i for i in usable if texts[i] != texts[best] and scores[i] < scores[best]]
    if not below:
        return None, "tied scores"
    # every mode draws its rejected response among those min_gap below the best (a gap that equals min_gap but
    # for floating-point rounding, 1.0 - 0.8 = 0.19999999999999996, counts as reaching it)
    far = [i for i in below if scores[best] - scores[i] >= bcfg.min_gap - GAP_TOLERANCE]
    if not far:
        return None, "score gap below binarise.min_gap"
    if bcfg.mode == "best_worst":
        rejected = min(far, key=lambda i: (scores[i], i))
    elif bcfg.mode == "best_random":
        rejected = random.Random(f"{bcfg.seed}:{record['prompt_id']}").choice(far)
    else:  # min_gap: the closest response that is still min_gap below the best
        rejected = max(far, key=lambda i: (scores[i], -i))
    return (best, rejected), ""


def pair_row(record: dict, chosen: int, rejected: int) -> dict:
    """A row in the ultrafeedback-armorm schema: message lists that `dataset=local` reads."""
    prompt, responses, scores = record["prompt"], record["responses"], record["scores"]
    turn = lambda i: prompt + [{"role": "assistant", "content": responses[i]["text"]}]  # noqa: E731
    return {
        "prompt_id": record["prompt_id"],
        "prompt": prompt[-1]["content"],
        "chosen": turn(chosen),
        "rejected": turn(rejected),
        "score_chosen": scores[chosen],
        "score_rejected": scores[rejected],
        # ended by the end-of-turn token, not cut at generate.max_new_tokens (training cannot tell from the text)
        "chosen_finished": responses[chosen]["finished"],
        "rejected_finished": responses[rejected]["finished"],
        "all_generated_responses": [r["text"] for r in responses],
        "all_rm_scores": scores,
    }


def distribution(values: list[float]) -> dict:
    """Count, mean, spread and quartiles of the finite ``values`` (a non-finite score is counted in the report)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return {"n": 0}
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": min(values),
        "q25": q[0],
        "median": q[1],
        "q75": q[2],
        "max": max(values),
    }


UNDECODABLE = "\ufffd"  # what decoding writes for bytes that are not UTF-8


def binarise(records: list[dict], bcfg) -> tuple[list[dict], dict]:
    """Return (pair rows, report) for scored records in prompt order."""
    rows, dropped, picked = [], Counter(), []
    for record in records:
        pair, reason = pick_pair(record, bcfg)
        if pair is None:
            dropped[reason] += 1
            continue
        rows.append(pair_row(record, *pair))
        picked.append((record, *pair))
    responses = [r for rec in records for r in rec["responses"]]
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    report = {
        "prompts": len(records),
        "pairs_kept": len(rows),
        "prompts_dropped": dict(sorted(dropped.items())),
        "responses": len(responses),
        "responses_hit_max_new_tokens": sum(not r["finished"] for r in responses),
        "non_finite_scores": sum(not math.isfinite(s) for rec in records for s in rec["scores"]),
        "pair_sides_hit_max_new_tokens": sum(
            (not rec["responses"][c]["finished"]) + (not rec["responses"][r]["finished"]) for rec, c, r in picked
        ),
        # sampled bytes that are not UTF-8 (a byte-level model's stray bytes, a character cut at max_new_tokens) are
        # decoded as U+FFFD, whose own tokens training then reads: not what the policy sampled
        "pair_sides_not_utf8": sum(
            (UNDECODABLE in rec["responses"][c]["text"]) + (UNDECODABLE in rec["responses"][r]["text"])
            for rec, c, r in picked
        ),
        "scores": {
            "all": distribution([s for rec in records for s in rec["scores"]]),
            "chosen": distribution([rec["scores"][c] for rec, c, _ in picked]),
            "rejected": distribution([rec["scores"][r] for rec, _, r in picked]),
        },
        "length_tokens": {
            "all": mean([r["n_tokens"] for r in responses]),
            "chosen": mean([rec["responses"][c]["n_tokens"] for rec, c, _ in picked]),
            "rejected": mean([rec["responses"][r]["n_tokens"] for rec, _, r in picked]),
        },
        "chosen_longer_share": mean(
            [float(rec["responses"][c]["n_tokens"] > rec["responses"][r]["n_tokens"]) for rec, c, r in picked]
        ),
    }
    return rows, report
