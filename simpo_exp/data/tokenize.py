"""Render pairs through the chat template, tokenise, truncate, and flag unusable rows.

The chat template writes the special tokens, so text is tokenised with ``add_special_tokens=False``: a
tokenizer never gets to add a second BOS. A template that writes no BOS (Mistral-Instruct's in the
official recipe, zephyr-7b-sft-full's) gets one put in front of the prompt where the tokenizer has a
BOS token, as the official SimPO trainer and TRL do: every sequence starts with exactly one. The prompt is the
conversation rendered with the generation prompt; a response's text is what the full
conversation adds after that prefix (so it ends with the template's end-of-turn token).

Truncation: a prompt longer than ``max_prompt_length`` tokens is dropped (cutting it would cut
the instruction or the BOS); each response is cut to ``max_length - len(prompt)`` tokens, which
is at least one token because the config requires ``max_prompt_length < max_length``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from datasets import Dataset, Features, Value

# This file's hash goes into the map() cache fingerprint: datasets hashes ``_tokenise_batch`` by
# name, so without it an edited rule would silently reuse results cached before the edit.
CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

# Declared, not inferred: a map batch in which every row was already dropped holds only empty
# id lists, which would be typed list<null> and make the next batch's ids uncastable.
TOKEN_FEATURES = {
    "prompt_input_ids": [Value("int64")],
    "chosen_input_ids": [Value("int64")],
    "rejected_input_ids": [Value("int64")],
    "chosen_truncated": Value("bool"),
    "rejected_truncated": Value("bool"),
    "drop_reason": Value("string"),
}


def render(tokenizer, prompt: list[dict], response: str) -> tuple[str, str]:
    """Return (prompt text, response text) as the chat template writes them."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt_text):
        return prompt_text, None
    return prompt_text, full[len(prompt_text) :]


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """A rendered prompt's ids starting with the tokenizer's BOS: one put in front where the chat template wrote
    none (and the tokenizer has one), as the model was pre-trained with it; training and sampling alike."""
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def _tokenise_batch(batch: dict, tokenizer, max_length: int, max_prompt_length: int, code_version: str = "") -> dict:
    n = len(batch["prompt"])
    out = {
        k: []
        for k in (
            "prompt_input_ids",
            "chosen_input_ids",
            "rejected_input_ids",
            "chosen_truncated",
            "rejected_truncated",
            "drop_reason",
        )
    }
    prompts, chosens, rejecteds, reasons = [], [], [], []
    for i in range(n):
        reason = batch["drop_reason"][i]
        p_text = c_text = r_text = ""
        if not reason:
            try:
                p_text, c_text = render(tokenizer, batch["prompt"][i], batch["chosen"][i])
                _, r_text = render(tokenizer, batch["prompt"][i], batch["rejected"][i])
            except Exception as e:  # e.g. a template that refuses a system turn or non-alternating roles
                reason = f"chat template error: {str(e).splitlines()[0][:80]}"
        if not reason and (c_text is None or r_text is None):
            reason = "chat template does not extend the prompt"
        prompts.append(p_text or "")
        chosens.append(c_text or "")
        rejecteds.append(r_text or "")
        reasons.append(reason)
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    p_ids, c_ids, r_ids = enc(prompts), enc(chosens), enc(rejecteds)
    p_ids = [with_bos(tokenizer, ids) if text else ids for ids, text in zip(p_ids, prompts)]
    for i in range(n):
        reason = reasons[i]
        if not reason and len(p_ids[i]) > max_prompt_length:
            reason = "prompt too long"
        if not reason and (not c_ids[i] or not r_ids[i]):
            reason = "response has no tokens"
        budget = max_length - len(p_ids[i])
        if not reason and budget < 1:  # unreachable while max_prompt_length < max_length
            reason = "response truncated to nothing"
        c, r = (c_ids[i][: max(budget, 0)], r_ids[i][: max(budget, 0)])
        if not reason and c == r:
            reason = "identical after truncation"
        out["prompt_input_ids"].append(p_ids[i])
        out["chosen_input_ids"].append(c)
        out["rejected_input_ids"].append(r)
        out["chosen_truncated"].append(len(c) < len(c_ids[i]))
        out["rejected_truncated"].append(len(r) < len(r_ids[i]))
        out["drop_reason"].append(reason)
    return out


def tokenise(ds: Dataset, tokenizer, max_length: int, max_prompt_length: int, num_proc: int | None = None) -> Dataset:
    """Add token-id columns and update ``drop_reason``; keeps the text columns for reports."""
    return ds.map(
        _tokenise_batch,
        batched=True,
        batch_size=256,
        fn_kwargs=dict(
            tokenizer=tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, code_version=CODE_VERSION
        ),
        features=Features({**ds.features, **TOKEN_FEATURES}),
        num_proc=num_proc,
        desc="tokenising",
    )
