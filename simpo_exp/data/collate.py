"""Collate preference pairs into one padded batch: chosen sequences first, then rejected.

For B pairs the batch holds 2B rows of ``prompt + response`` (row i is pair i's chosen,
row B+i its rejected), right-padded to the longest row, so one forward pass serves both.
``loss_mask`` marks the response tokens: this is the only place the mask is built.
"""

from __future__ import annotations

import torch


class PairCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        rows, masks = [], []
        for key in ("chosen_input_ids", "rejected_input_ids"):
            for pair in pairs:
                prompt, response = pair["prompt_input_ids"], pair[key]
                rows.append(prompt + response)
                masks.append([0] * len(prompt) + [1] * len(response))
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, mask) in enumerate(zip(rows, masks)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            loss_mask[i, : len(row)] = torch.tensor(mask, dtype=torch.bool)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
