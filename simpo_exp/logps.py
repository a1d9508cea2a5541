"""Log-probabilities of response tokens, computed from the model's final hidden states.

``ResponseLogps`` wraps a causal LM. Its forward runs the transformer body once over the
batch, keeps only the hidden states that predict a response token (``loss_mask`` shifted by
one), and applies the output head to those alone: prompt and padding positions never reach
the vocabulary projection. With ``chunk_size`` > 0 the head, log-softmax and gather run in
chunks of that many tokens under activation checkpointing, so peak memory holds one chunk of
logits instead of all of them.

Being an ``nn.Module`` whose forward does all of this, it can be handed to
``accelerator.prepare`` (DDP/FSDP see the whole computation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class SequenceLogps(NamedTuple):
    logp_sums: torch.Tensor  # [N] summed log-probs of each row's response tokens
    num_tokens: torch.Tensor  # [N] response tokens per row
    logit_means: torch.Tensor  # [N] mean logit over response positions and vocabulary (diagnostic)

    @property
    def mean_logps(self) -> torch.Tensor:
        """Length-normalised log-probs: mean over response tokens."""
        return self.logp_sums / self.num_tokens.clamp(min=1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, computed in float32. [M, V], [M] -> [M]."""
    logits = logits.float()
    return torch.gather(logits.log_softmax(-1), 1, targets[:, None]).squeeze(1)


class ResponseLogps(nn.Module):
    def __init__(self, model: nn.Module, chunk_size: int = 0):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        if self.softcap:  # Gemma 2 caps its logits; skipping this would change every log-prob
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _logps_and_logit_sums(self, hidden: torch.Tensor, targets: torch.Tensor):
        logits = self._head(hidden)
        return token_logps(logits, targets), logits.float().mean(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> SequenceLogps:
        body = self.model.get_decoder()
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # Position t predicts token t+1: shift the targets and their mask left by one.
        predicts = loss_mask[:, 1:].bool()
        targets = input_ids[:, 1:][predicts]  # [M]
        states = hidden[:, :-1][predicts]  # [M, H]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(predicts)[predicts]

        if self.chunk_size and states.shape[0] > self.chunk_size:
            parts = [
                checkpoint(self._logps_and_logit_sums, s, t, use_reentrant=False)
                for s, t in zip(states.split(self.chunk_size), targets.split(self.chunk_size))
            ]
            logps = torch.cat([p[0] for p in parts])
            logit_means = torch.cat([p[1] for p in parts])
        else:
            logps, logit_means = self._logps_and_logit_sums(states, targets)

        n = input_ids.shape[0]
        sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
        counts = predicts.sum(1)
        logit_sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, rows, logit_means.detach())
        return SequenceLogps(sums, counts, logit_sums / counts.clamp(min=1))
