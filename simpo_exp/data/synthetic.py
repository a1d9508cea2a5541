"""The embedded preference data set: sort the digits.

Each prompt asks to sort a handful of digits; the chosen answer is the sorted list, the rejected
answer is the same list with one adjacent pair of different digits swapped. The preference is a
local pattern (is each digit <= the next?) that a tiny model picks up in a few dozen steps, so a
run on it shows learning within minutes. Rows follow the HuggingFaceH4/ultrafeedback_binarized
schema, with splits ``train_prefs`` and ``test_prefs`` (no test prompt appears in train).
"""

from __future__ import annotations

import hashlib
import random

from simpo_exp.config import ConfigError, SyntheticConfig


def _pair(rng: random.Random, min_digits: int, max_digits: int) -> tuple[str, str, str]:
    while True:
        digits = [rng.randint(0, 9) for _ in range(rng.randint(min_digits, max_digits))]
        answer = sorted(digits)
        swappable = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
        if swappable:
            break
    wrong = list(answer)
    i = rng.choice(swappable)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    show = lambda xs: " ".join(map(str, xs))  # noqa: E731
    return f"sort: {show(digits)}", show(answer), show(wrong)


def _row(prompt: str, chosen: str, rejected: str) -> dict:
    user = {"role": "user", "content": prompt}
    chosen_msgs = [user, {"role": "assistant", "content": chosen}]
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
        "chosen": chosen_msgs,
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "messages": chosen_msgs,
        "score_chosen": 10.0,
        "score_rejected": 1.0,
    }


def generate(cfg: SyntheticConfig) -> dict[str, list[dict]]:
    """Return ``{"train_prefs": rows, "test_prefs": rows}``, the same for the same config."""
    # Distinct prompts there are: digit lists of each length, less the 10 with one repeated digit
    # (nothing to swap). Asking for more would loop forever looking for unseen prompts.
    capacity = sum(10**n - 10 for n in range(cfg.min_digits, cfg.max_digits + 1))
    if cfg.num_train + cfg.num_test > capacity:
        raise ConfigError(
            f"invalid config value dataset.synthetic.num_train+num_test={cfg.num_train + cfg.num_test}: "
            f"digit lists of {cfg.min_digits}..{cfg.max_digits} digits give only {capacity} distinct prompts; "
            "lower num_train/num_test or raise max_digits"
        )
    rng = random.Random(cfg.seed)
    splits: dict[str, list[dict]] = {"test_prefs": [], "train_prefs": []}
    seen: set[str] = set()
    for split, n in (("test_prefs", cfg.num_test), ("train_prefs", cfg.num_train)):
        while len(splits[split]) < n:
            prompt, chosen, rejected = _pair(rng, cfg.min_digits, cfg.max_digits)
            if prompt in seen:
                continue
            seen.add(prompt)
            splits[split].append(_row(prompt, chosen, rejected))
    return splits
