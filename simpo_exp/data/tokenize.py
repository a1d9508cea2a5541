"""Render pairs through the chat template, tokenise, truncate, and flag unusable rows.

The chat template writes the special tokens, so text is tokenised with ``add_special_tokens=False``: a
tokenizer never gets to add a second BOS. A template that writes no BOS (Mistral-Instruct's in the
official recipe, zephyr-7b-sft-full's) gets one put in front of the prompt where the tokenizer has a
BOS token, as the official SimPO trainer and TRL do: every sequence starts with exactly one. By default
(``dataset.chat_format=generation_prompt``, as TRL) the prompt is the conversation rendered with the generation
prompt; a response's text is what the full conversation adds after that prefix (so it ends with the
template's end-of-turn token). ``simpo_repo`` cuts them as the official SimPO script does (``CHAT_FORMATS``).

Each whole conversation is tokenised in one piece and split after the prompt's ids, so prompt + response
ids are exactly what the tokenizer makes of the conversation, and what a model sampling after the prompt
continues from. Tokenising the response on its own would differ at its start for SentencePiece-style
tokenizers (Llama-2, Mistral: a response encoded alone gets a word-start marker, ``▁``, that it lacks
after the prompt). Where a tokenizer merges the prompt's last token with the response's first, the split
moves back to the last id the prompt and both conversations share (as TRL's DPOTrainer does; the official
trainer and TRL's CPOTrainer move each response's split alone, keeping a prompt per response, so where only one
response merges, the other holds one prompt token more here than there: one prompt per pair is what the shared
prefix layouts compute once); the merged token then counts as response, and the report counts such pairs.

Truncation: a prompt longer than ``max_prompt_length`` tokens is dropped (cutting it would cut
the instruction or the BOS); each response is cut to ``max_length - len(prompt)`` tokens, which
is at least one token because the config requires ``max_prompt_length < max_length``. Under
``chat_format=simpo_repo`` the official trainer's rule instead (``_official_truncation``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from datasets import Dataset, Features, Value

from simpo_exp.config import ConfigError

log = logging.getLogger(__name__)

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
    "prompt_truncated": Value("bool"),
    "prompt_tokens_moved": Value("int64"),
    "drop_reason": Value("string"),
}


# dataset.chat_format: how a pair's prompt and responses are cut out of the chat template's text.
#   generation_prompt  the prompt rendered with the generation prompt (it ends with the assistant turn's header);
#                      a response is what the whole conversation adds after it (TRL's CPOTrainer/DPOTrainer)
#   simpo_repo         as princeton-nlp/SimPO's run_simpo.py: an empty system turn put first where the template
#                      mentions one (alignment-handbook's auto_insert_empty_system_msg, its default), the prompt
#                      rendered without the generation prompt, each response its assistant turn rendered alone
#                      (a leading BOS cut): the turn's header counts as response tokens, in |y| and the reward;
#                      truncated as its trainer truncates (``_official_truncation``: long prompts keep their end)
# (the names: simpo_exp.config.CHAT_FORMATS)


def prompt_messages(tokenizer, prompt: list[dict], chat_format: str = "generation_prompt") -> list[dict]:
    """The prompt's messages as ``chat_format`` renders them: under ``simpo_repo`` an empty system turn first where
    the template mentions one (alignment-handbook's rule), so that sampling and evaluation prompt a model trained
    that way as it was trained (the official AlpacaEval template of the Mistral Base recipe writes it too)."""
    if chat_format != "simpo_repo" or not prompt or prompt[0]["role"] == "system":
        return prompt
    from simpo_exp.model import chat_template_text

    template = chat_template_text(tokenizer)
    mentions = "system" in template or "<|im_start|>" in template
    return [{"role": "system", "content": ""}, *prompt] if mentions else prompt


def _official_parts(tokenizer, prompt: list[dict], response: str) -> tuple[str, str]:
    """``simpo_repo``'s (prompt text, response text): the prompt without the generation prompt, the response its
    assistant turn rendered alone (a BOS its template writes first is cut: the response follows the prompt)."""
    text = tokenizer.apply_chat_template([{"role": "assistant", "content": response}], tokenize=False)
    if tokenizer.bos_token:
        text = text.removeprefix(tokenizer.bos_token)
    return tokenizer.apply_chat_template(prompt_messages(tokenizer, prompt, "simpo_repo"), tokenize=False), text


def check_chat_format(tokenizer, chat_format: str) -> None:
    """Refuse ``simpo_repo`` for a template under which an assistant turn rendered alone is not what it adds to a
    conversation: one that writes a system turn of its own whenever the first message is not one (Llama-3.1's
    dated system turn, Qwen2.5's default one) put that whole turn into every response, counted in |y|, the reward
    and the SFT term, and trained in a place the model never sees it."""
    if chat_format != "simpo_repo":
        return
    probe = [{"role": "user", "content": "Hello"}]
    try:
        prompt_text, response = _official_parts(tokenizer, probe, "Hi")
        whole = tokenizer.apply_chat_template(
            prompt_messages(tokenizer, probe, chat_format) + [{"role": "assistant", "content": "Hi"}], tokenize=False
        )
    except Exception as e:  # Gemma's template names "system" only to refuse it: every row would drop
        refused = f"({type(e).__name__}: {str(e)[:120]})"
        if prompt_messages(tokenizer, probe, chat_format)[0]["role"] == "system":
            raise ConfigError(
                "dataset.chat_format=simpo_repo puts an empty system turn before every prompt whose chat template "
                f"mentions 'system' (alignment-handbook's rule), and this template refuses it {refused}. Use "
                "dataset.chat_format=generation_prompt, or a model.chat_template that takes a system turn "
                "(experiment=simpo-gemma2-9b-it sets the official recipe's)"
            ) from e
        raise ConfigError(  # a template whose roles must alternate from a user turn (Mistral-Instruct's own)
            "dataset.chat_format=simpo_repo renders each response as an assistant turn on its own, as the official "
            f"trainer does, and this chat template refuses a lone assistant turn {refused}. Use "
            "dataset.chat_format=generation_prompt, or a model.chat_template that renders one "
            "(experiment=simpo-mistral-7b-instruct sets the official recipe's)"
        ) from e
    if prompt_text + response != whole:
        raise ConfigError(
            "dataset.chat_format=simpo_repo renders each response as its assistant turn alone, but this chat "
            f"template writes more than the turn when rendering it alone ({response[:120]!r} for the response 'Hi', "
            f"where the conversation adds {whole.removeprefix(prompt_text)[:120]!r}): every response would carry "
            "that text. Use dataset.chat_format=generation_prompt (what the conversation adds after the prompt), "
            "or set model.chat_template to a template without it"
        )


def render(tokenizer, prompt: list[dict], response: str, chat_format: str = "generation_prompt") -> tuple[str, str]:
    """Return (prompt text, response text) as the chat template writes them, cut as ``chat_format`` says."""
    answer = [{"role": "assistant", "content": response}]
    if chat_format == "simpo_repo":
        return _official_parts(tokenizer, prompt, response)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    if not full.startswith(prompt_text):
        return prompt_text, None
    return prompt_text, full[len(prompt_text) :]


def unrendered_role(prompt: list[dict], prompt_text: str | None) -> str | None:
    """The role of a prompt turn whose text the rendered prompt does not hold, or None. Templates render the roles
    they know and skip the others without a word (Qwen2.5's and Zephyr's skip ``User``, ``human``, ``developer``):
    the pair trained without its question. Assistant turns are not checked (reasoning templates cut the thinking
    out of earlier answers), nor tool turns (rendered as JSON by some)."""
    for message in prompt:
        text = message["content"].strip() if isinstance(message.get("content"), str) else ""
        if message.get("role") not in ("assistant", "tool") and text and text not in (prompt_text or ""):
            return message.get("role")
    return None


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """A rendered prompt's ids starting with the tokenizer's BOS: one put in front where the chat template wrote
    none (and the tokenizer has one), as the model was pre-trained with it; training and sampling alike. A BOS the
    template writes after leading whitespace (a hand-written template that opens with a newline) counts as written:
    a second one in front made ``BOS \n BOS``, which the double-BOS guard, looking at the first two ids, let by."""
    bos = tokenizer.bos_token_id
    if bos is None or ids[:1] == [bos]:
        return ids
    lead = 0
    while lead < len(ids) and ids[lead] != bos and not tokenizer.decode(ids[lead : lead + 1]).strip():
        lead += 1
    return ids if ids[lead : lead + 1] == [bos] else [bos, *ids]


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: its named ones (BOS, EOS, pad, additional) and every added token
    marked special. Meta's Llama-3 files mark ``<|eot_id|>`` special in ``added_tokens_decoder`` alone, which
    ``all_special_ids`` leaves out when EOS is ``<|end_of_text|>``."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


def _shared_prefix(prompt: list[int], chosen: list[int], rejected: list[int]) -> int:
    """How many leading prompt ids both whole conversations also start with (all of them, unless a
    tokenizer merged the prompt's last token with the response's first)."""
    n = 0
    for p, c, r in zip(prompt, chosen, rejected):
        if not p == c == r:
            break
        n += 1
    return n


def _official_truncation(
    prompt: list, chosen: list, rejected: list, tokenizer, max_length: int, max_prompt_length: int
):
    """princeton-nlp/SimPO's ``SimPOTrainer.tokenize_row`` (``truncation_mode=keep_end``): EOS put after a response
    that does not end with it; where the prompt and the longer response exceed ``max_length``, the prompt keeps its
    last ``max_prompt_length`` tokens (its BOS may go), and where they still do, both responses are cut to
    ``max_length - max_prompt_length``. Returns (prompt, chosen, rejected, the responses' token budget)."""
    eos = tokenizer.eos_token_id
    if eos is not None:
        chosen, rejected = ([*ids, eos] if ids[-1:] != [eos] else ids for ids in (chosen, rejected))
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        prompt = prompt[-max_prompt_length:]
    budget = max_length - max_prompt_length if len(prompt) + longer > max_length else longer
    return prompt, chosen, rejected, budget


def dated_template(tokenizer) -> str | None:
    """Today's date (``%Y-%m-%d``) where the chat template renders the current date into prompts (``strftime_now``,
    as Llama-3.1 to 3.3 Instruct's do), else None."""
    from simpo_exp.model import chat_template_text

    if "strftime_now" not in chat_template_text(tokenizer):
        return None
    import datetime

    return datetime.date.today().isoformat()


def _tokenise_batch(
    batch: dict,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    code_version: str = "",
    chat_format: str = "generation_prompt",
    rendered_on: str | None = None,  # the day, where the template writes it: in datasets' cache key (dated_template)
) -> dict:
    n = len(batch["prompt"])
    out = {
        k: []
        for k in (
            "prompt_input_ids",
            "chosen_input_ids",
            "rejected_input_ids",
            "chosen_truncated",
            "rejected_truncated",
            "prompt_truncated",
            "prompt_tokens_moved",
            "drop_reason",
        )
    }
    prompts, chosens, rejecteds, reasons = [], [], [], []
    for i in range(n):
        reason = batch["drop_reason"][i]
        p_text = c_text = r_text = ""
        if not reason:
            try:
                p_text, c_text = render(tokenizer, batch["prompt"][i], batch["chosen"][i], chat_format)
                _, r_text = render(tokenizer, batch["prompt"][i], batch["rejected"][i], chat_format)
            except Exception as e:  # e.g. a template that refuses a system turn or non-alternating roles
                reason = f"chat template error: {str(e).splitlines()[0][:80]}"
        if not reason and (role := unrendered_role(batch["prompt"][i], p_text)):
            reason = f"chat template leaves out the prompt's {role!r} turn"
        if not reason and (c_text is None or r_text is None):
            # a generation prompt the conversation does not start its answer with (DeepSeek-R1's adds "<think>\n"):
            # the answer cannot be told from the prompt (TRL cuts at the common prefix, training on another prompt
            # than the model is sampled with)
            reason = "chat template's generation prompt is not how the conversation renders the answer's start"
        prompts.append(p_text or "")
        chosens.append(c_text or "")
        rejecteds.append(r_text or "")
        reasons.append(reason)
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = lambda ids, text: with_bos(tokenizer, ids) if text else ids  # noqa: E731
    p_ids = [bos(ids, t) for ids, t in zip(enc(prompts), prompts)]
    c_full = [bos(ids, p) for ids, p in zip(enc([p + c for p, c in zip(prompts, chosens)]), prompts)]
    r_full = [bos(ids, p) for ids, p in zip(enc([p + r for p, r in zip(prompts, rejecteds)]), prompts)]
    official = chat_format == "simpo_repo"
    for i in range(n):
        reason = reasons[i]
        cut = _shared_prefix(p_ids[i], c_full[i], r_full[i])
        if not reason and cut == 0 and p_ids[i]:
            reason = "prompt and response tokens merge at the boundary"
        prompt, c_ids, r_ids = p_ids[i][:cut], c_full[i][cut:], r_full[i][cut:]
        whole_prompt = len(prompt)
        if official and not reason:
            prompt, c_ids, r_ids, budget = _official_truncation(
                prompt, c_ids, r_ids, tokenizer, max_length, max_prompt_length
            )
        else:
            budget = max_length - len(prompt)
        if not reason and not official and len(prompt) > max_prompt_length:
            reason = "prompt too long"
        if not reason and (not c_ids or not r_ids):
            reason = "response has no tokens"
        if not reason and budget < 1:  # unreachable while max_prompt_length < max_length
            reason = "response truncated to nothing"
        c, r = (c_ids[: max(budget, 0)], r_ids[: max(budget, 0)])
        if not reason and c == r:
            # texts that differ only where the chat template trims them (Llama-3's ``| trim``) render alike uncut
            reason = "identical after truncation" if c_ids != r_ids else "identical once rendered by the chat template"
        out["prompt_input_ids"].append(prompt)
        out["chosen_input_ids"].append(c)
        out["rejected_input_ids"].append(r)
        out["chosen_truncated"].append(len(c) < len(c_ids))
        out["rejected_truncated"].append(len(r) < len(r_ids))
        out["prompt_truncated"].append(len(prompt) < whole_prompt)  # simpo_repo keeps a long prompt's end
        out["prompt_tokens_moved"].append(len(p_ids[i]) - cut)
        out["drop_reason"].append(reason)
    return out


def tokenise(
    ds: Dataset,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    num_proc: int | None = None,
    chat_format: str = "generation_prompt",
) -> Dataset:
    """Add token-id columns and update ``drop_reason``; keeps the text columns for reports."""
    day = dated_template(tokenizer)
    if day:
        log.warning(
            "the chat template writes today's date into every prompt (%s, through strftime_now: Llama-3.1 to 3.3 "
            "Instruct's 'Today Date'): the same data tokenises differently on another day, and the evaluate and "
            "generate stages prompt with their own day's date; give model.chat_template a template without it to "
            "make the prompts the same every day",
            day,
        )
    return ds.map(
        _tokenise_batch,
        batched=True,
        batch_size=256,
        fn_kwargs=dict(
            tokenizer=tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            code_version=CODE_VERSION,
            chat_format=chat_format,
            rendered_on=day,  # a cache of another day's prompts is not this day's
        ),
        features=Features({**ds.features, **TOKEN_FEATURES}),
        num_proc=num_proc,
        desc="tokenising",
    )
