"""Collate preference pairs into one batch, in one of three layouts (``packing``).

``"none"`` (the default): for B pairs the batch holds 2B rows of ``prompt + response`` (row i is
pair i's chosen, row B+i its rejected), right-padded to the longest row, so one forward pass
serves both.

The packed layouts spend no compute on padding and, with prefix sharing, none on the second copy
of each prompt. Both keep the order of the outputs: sequence slot i is pair i's chosen, B+i its
rejected, whatever the layout.

``"packed"``      each pair as ``prompt chosen prompt rejected``; position ids restart per sequence.
``"prefix_shared"`` each pair as ``prompt chosen rejected``; the rejected tokens' position ids
                  continue from the end of the prompt (the positions a separate pass would give), and
                  attention is causal AND NOT (query in rejected AND key in chosen) (arXiv 2410.20305).

``attention`` says how ``ResponseLogps`` keeps the sequences apart, and so the shape of the batch:

``"segments"`` (the default): all pairs in ONE row without padding; the attention runs per sequence
               (``simpo_exp.logps.segment_attention``), so its cost is sum(L_i^2), not (sum L_i)^2.
``"flex"``     the same one row as ``"segments"``; the attention is one FlexAttention call per layer with a
               block mask (``simpo_exp.logps.flex_block_mask``): no Python loop over sequences (GPU).
``"flash"``    the same one row as ``"segments"``; flash-attn's variable-length kernel takes the sequences'
               boundaries (``cu_seqlens``): no Python loop over sequences (GPU, flash-attn installed).
``"mask"``     one row per pair, right-padded, plus ``attn_groups`` from which ``ResponseLogps``
               builds an explicit 4D mask (works with any attention that takes a 4D mask: sdpa, eager;
               a dense mask costs O(L^2) per row, so pairs are never packed together).

Every batch, in every layout, carries ``input_ids`` and ``attention_mask`` [R, T] (1 = a real token, so its
sum is the number of tokens computed) and the scored response tokens, listed once in row-major order. The
model side picks them out with index operations whose sizes the host knows: boolean indexing, or counting
them on the device, would make the host wait for a GPU to finish its queue before it could go on.

``target_ids``     [M]   each scored response token.
``target_sources`` [M]   the flat index (row * T + column) of the hidden state that predicts it: the previous
                         token, or, for the first rejected token under prefix sharing, the last prompt token.
``target_rows``    [M]   its sequence slot: 0 .. B-1 the chosen responses, B .. 2B-1 the rejected ones.
``row_tokens``     [2B]  scored tokens per sequence slot; ``row_lengths`` the same as plain ints, for the host.

A packed batch carries besides:

``position_ids`` [R, T]  RoPE positions.
``segments``     list of [prompt, chosen, rejected] lengths per pair (plain ints).
``attn_groups``  [R, T]  (``attention="mask"`` only) 0: shared prompt, 1: chosen sequence, 2: rejected
                         sequence, -1: padding. A key is visible to a query when it is not later, not
                         padding, and in group 0 or the query's group.
"""

from __future__ import annotations

import torch

from simpo_exp.layout import BatchLayout


class PairCollator:
    def __init__(self, pad_token_id: int | None, packing: str = "none", attention: str = "segments"):
        BatchLayout(packing, attention)  # checks the values
        # padding is masked out of attention and loss, so any id fills it; a tokenizer with neither a pad nor an
        # EOS token (the model's tokenizer falls back to EOS) gives None
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.packing = packing
        self.attention = attention

    def __call__(self, pairs: list[dict]) -> dict:
        if any(not pair["prompt_input_ids"] for pair in pairs):  # (data loading drops such rows: "empty prompt")
            # padded, the first response token was left unscored, one token short of what a packed layout gives
            raise ValueError("a pair with an empty prompt: its first response token has no context to be scored from")
        if any(not pair["chosen_input_ids"] or not pair["rejected_input_ids"] for pair in pairs):
            # (data loading drops such rows: "response has no tokens"); its mean log-prob would be 0 / 0
            raise ValueError("a pair with an empty chosen or rejected response: it has no token to be scored")
        if self.packing == "none":
            return self._padded(pairs)
        return self._packed(pairs)

    # ------------------------------------------------------------------ the plain layout
    def _padded(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
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
        loss_mask[:, 0] = False  # a token in the first column has no earlier position to predict it
        at = loss_mask.nonzero(as_tuple=True)  # (rows, columns) of the scored tokens
        sources = at[0] * width + at[1] - 1  # the previous position, in the same row
        scored = targets(input_ids, at, sources, at[0], len(rows))
        return {"input_ids": input_ids, "attention_mask": attention_mask, **scored}

    # ------------------------------------------------------------------ packed layouts
    def _pair_pieces(self, pair: dict, i: int, n_pairs: int):
        """The pair's pieces in row order: (tokens, first position, attention group, sequence slot or -1
        for prompt tokens, index of the piece whose last token predicts this piece's first token)."""
        p, c, r = pair["prompt_input_ids"], pair["chosen_input_ids"], pair["rejected_input_ids"]
        if self.packing == "packed":
            return [(p, 0, 1, -1, None), (c, len(p), 1, i, 0), (p, 0, 2, -1, None), (r, len(p), 2, n_pairs + i, 2)]
        # prefix_shared: prompt | chosen | rejected, the rejected continuing the prompt's positions
        return [(p, 0, 0, -1, None), (c, len(p), 1, i, 0), (r, len(p), 2, n_pairs + i, 0)]

    def _packed(self, pairs: list[dict]) -> dict:
        n = len(pairs)
        one_row = self.attention != "mask"  # segments and flex: every pair in one row
        rows = []  # per row: lists of ids, positions, groups, slots, previous-token columns
        for i, pair in enumerate(pairs):
            if one_row and rows:
                row = rows[0]
            else:
                row = {"ids": [], "pos": [], "group": [], "slot": [], "prev": []}
                rows.append(row)
            starts = []
            for tokens, first_pos, group, slot, after in self._pair_pieces(pair, i, n):
                start = len(row["ids"])
                starts.append(start)
                row["ids"] += tokens
                row["pos"] += range(first_pos, first_pos + len(tokens))
                row["group"] += [group] * len(tokens)
                row["slot"] += [slot] * len(tokens)
                # the first token of a response is predicted by the last token of its prompt piece
                prev = list(range(start - 1, start - 1 + len(tokens)))
                if after is not None:
                    prompt_start = starts[after]
                    prev[0] = prompt_start + len(pair["prompt_input_ids"]) - 1
                row["prev"] += prev
        width = max(len(row["ids"]) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        seq_index = torch.full(shape, -1, dtype=torch.long)
        logp_source = torch.zeros(shape, dtype=torch.long)
        groups = torch.full(shape, -1, dtype=torch.long)
        for j, row in enumerate(rows):
            m = len(row["ids"])
            input_ids[j, :m] = torch.tensor(row["ids"])
            attention_mask[j, :m] = 1
            position_ids[j, :m] = torch.tensor(row["pos"])
            seq_index[j, :m] = torch.tensor(row["slot"])
            logp_source[j, :m] = torch.tensor(row["prev"]) + j * width
            groups[j, :m] = torch.tensor(row["group"])
        at = (seq_index >= 0).nonzero(as_tuple=True)  # (rows, columns) of the scored tokens
        # padding positions: increasing, so nothing reads them as a new packed sequence, but never past the batch's
        # largest real position: dynamic and longrope RoPE pick their frequencies from the largest position id, and
        # a row of two or three sequences is wider than any of them (the padded layout's positions stop there too)
        pad = attention_mask == 0
        if pad.any():
            last = position_ids[~pad].max()
            position_ids = torch.where(pad, torch.arange(width).clamp(max=last).expand(shape), position_ids)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            **targets(input_ids, at, logp_source[at], seq_index[at], 2 * n),
            "segments": [
                [len(p["prompt_input_ids"]), len(p["chosen_input_ids"]), len(p["rejected_input_ids"])] for p in pairs
            ],
        }
        if not one_row:
            batch["attn_groups"] = groups
        return batch


def targets(input_ids: torch.Tensor, at: tuple, sources: torch.Tensor, slots: torch.Tensor, count: int) -> dict:
    """A batch's scored tokens (the module docstring's ``target_*`` and ``row_*`` entries), from their places
    ``at`` (rows, columns) in ``input_ids``, the flat index of each one's predicting state, its sequence slot,
    and the number of slots."""
    counts = torch.bincount(slots, minlength=count)
    return {
        "target_ids": input_ids[at],
        "target_sources": sources,
        "target_rows": slots,
        "row_tokens": counts,
        "row_lengths": counts.tolist(),
    }
