"""What the model writes: greedy completions for a fixed handful of eval prompts.

Numbers say the chosen response became likelier; a reader wants to see the answers move.
Each eval step produces one row per prompt (step, prompt, chosen, rejected, generation, and the
current rewards of chosen and rejected), appended to ``generations.jsonl`` and logged to W&B as a
table by the tracker.
"""

from __future__ import annotations

import torch

from simpo_exp.model import eval_mode


def sample_pairs(eval_ds, count: int) -> list[dict]:
    """The first ``count`` eval pairs: the same prompts at every eval, so the rows compare over time."""
    return [eval_ds[i] for i in range(min(count, len(eval_ds)))]


def prompt_text(prompt_messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt_messages)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    pairs: list[dict],
    max_new_tokens: int,
    device,
    synced: bool = False,
    chat_format: str = "generation_prompt",
) -> list[str]:
    """Greedy completions of each pair's tokenised prompt, all prompts in one batch: left-padded, the padding
    masked out (transformers derives the positions from the mask), each completion cut after its first stop
    token: EOS, the chat template's end-of-turn token, the model's own EOS ids (as the generate and evaluate
    stages stop). ``synced``: every process of a sharded model calls this together; all keep stepping until the
    last one is done (transformers' ``synced_gpus``). Under ``chat_format`` ``simpo_repo`` the training prompt ends
    before the assistant turn's header, which its responses carry: the prompt is rendered with the generation
    prompt instead, as the generate and evaluate stages prompt (the model wrote the header itself, out of
    ``max_new_tokens``, and its text led the sample)."""
    if not pairs:
        return []
    if chat_format == "simpo_repo":
        from simpo_exp.inference.sampling import prompt_token_ids

        prompts = prompt_token_ids(tokenizer, [p["prompt"] for p in pairs], chat_format)
    else:
        prompts = [list(p["prompt_input_ids"]) for p in pairs]
    width = max(len(p) for p in prompts)
    from simpo_exp.inference.sampling import model_positions, response_text, stop_token_ids

    positions = model_positions(getattr(model, "config", None))
    if positions is not None and width + max_new_tokens > positions:  # past them a model of learned positions
        max_new_tokens = positions - width  # fails, and a rotary one reads positions it never saw (as evaluate cuts)
        if max_new_tokens <= 0:
            return [""] * len(pairs)
    eos = tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, [], getattr(model, "generation_config", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)  # masked: any id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    from transformers import GenerationConfig

    # greedy as the generate and evaluate stages decode: transformers fills what a call leaves unset from the
    # model's generation_config.json (a repetition_penalty, a no_repeat_ngram_size, a min_new_tokens), so it is
    # set aside for the call and put back, the saved model keeps it: on every module that holds one, since PEFT's
    # generate copies its wrapper's onto the model inside (a LoRA run saved the blank one: Llama-3's stop ids and
    # sampling defaults were lost from its generation_config.json)
    holders = {
        id(m): m
        for m in (model, *model.modules())
        if isinstance(getattr(m, "generation_config", None), GenerationConfig)
    }
    own = {key: m.generation_config for key, m in holders.items()}
    for m in holders.values():
        m.generation_config = GenerationConfig()
    with eval_mode(model):
        try:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad,
                eos_token_id=stops or None,
                synced_gpus=synced,
            )
        finally:
            for key, m in holders.items():
                m.generation_config = own[key]
    texts = []
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        ends = [i for i, t in enumerate(row) if t in stops]
        if ends:  # a finished completion is padded up to the longest one; decode drops a special stop token
            row = row[: ends[0] + 1]
        # after the prompt's last tokens, as the generate stage decodes (alone, a SentencePiece tokenizer's answer
        # lost its leading space)
        texts.append(response_text(tokenizer, prompt, row))
    return texts


def generation_rows(step: int, pairs: list[dict], generations: list[str], rewards: torch.Tensor) -> list[dict]:
    n = len(pairs)
    return [
        {
            "step": step,
            "prompt": prompt_text(p["prompt"]),
            "chosen": p["chosen"],
            "rejected": p["rejected"],
            "generation": g,
            "reward_chosen": float(rewards[i]),
            "reward_rejected": float(rewards[n + i]),
        }
        for i, (p, g) in enumerate(zip(pairs, generations))
    ]
