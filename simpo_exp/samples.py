"""What the model writes: greedy completions for a fixed handful of eval prompts.

Numbers say the chosen response became likelier; a reader wants to see the answers move.
Each eval step produces one row per prompt (step, prompt, chosen, rejected, generation, and the
current rewards of chosen and rejected), appended to ``generations.jsonl`` and logged to W&B as a
table by the tracker.
"""

from __future__ import annotations

import torch


def sample_pairs(eval_ds, count: int) -> list[dict]:
    """The first ``count`` eval pairs: the same prompts at every eval, so the rows compare over time."""
    return [eval_ds[i] for i in range(min(count, len(eval_ds)))]


def prompt_text(prompt_messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt_messages)


@torch.no_grad()
def generate(model, tokenizer, pairs: list[dict], max_new_tokens: int, device, synced: bool = False) -> list[str]:
    """Greedy completions of each pair's tokenised prompt (one at a time: no padding questions).
    ``synced``: every process of a sharded model calls this together; all keep stepping until the
    last one is done (transformers' ``synced_gpus``)."""
    was_training = model.training
    model.eval()
    outputs = []
    for pair in pairs:
        ids = torch.tensor([pair["prompt_input_ids"]], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
        )
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    model.train(was_training)
    return outputs


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
