"""``torchrun --nproc_per_node 2 -m tests.sharded_head OUT``: one training step of ``ResponseLogps`` under FSDP2 on
two gloo processes, with the output head sharded as a unit of its own, as accelerate does (tests/test_logps.py).

Each process takes its own pairs, with a different number of response tokens, so the chunked head runs a different
number of chunks on each. For the chunked head (``logps_chunk_size``) and the fused one (Liger, where installed; on
padded rows and on prefix-shared ones) the main process writes the loss of each process and every parameter's
gathered gradient to OUT (``torch.save``). A head that ran a collective per chunk would leave the processes at
different collectives: gloo then fails, or waits out the process group's timeout.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from simpo_exp.data.collate import PairCollator
from simpo_exp.logps import ResponseLogps
from tests.test_perf_paths import make_model, random_pairs
from tests.test_perf_paths import step_loss as training_step_loss

PAD, VOCAB, CHUNK = 0, 96, 8
PAIRS = random_pairs(6, vocab=VOCAB, seed=7)  # pairs 0-2 for process 0, 3-5 for process 1


PACKING = {"chunked": "none", "fused": "none", "fused-prefix": "prefix_shared"}  # each head's batch layout


def local_batch(rank: int, head: str = "chunked") -> dict:
    return PairCollator(PAD, PACKING[head])(PAIRS[3 * rank : 3 * rank + 3])


def policy_for(head: str) -> ResponseLogps:
    model = make_model(vocab=VOCAB, seed=3)  # untied embeddings, as Llama 3 and Mistral
    if head == "chunked":
        return ResponseLogps(model, chunk_size=CHUNK)
    from simpo_exp.fused import LigerPreferenceHead

    fused = LigerPreferenceHead("simpo", beta=2.0, gamma=1.0, label_smoothing=0.0, sft_weight=0.0)
    fused.compiled = False
    # on prefix-shared rows the pairs go to Liger in groups of similar width, their gradients taken call by call
    if head == "fused-prefix":
        fused.split_cost = 0
    return ResponseLogps(model, packing=PACKING[head], fused=fused)


def step_loss(policy: ResponseLogps, batch: dict) -> torch.Tensor:
    """The fused head's loss, or (chunked) the SimPO + NLL step loss of tests/test_perf_paths.py."""
    if policy.fused is not None:
        return policy(**batch).loss
    return training_step_loss(policy, batch)[0]


def shard_as_accelerate_does(policy: ResponseLogps) -> None:
    """accelerate 1.15's FSDP2 units for an untied model: each decoder layer, the input embedding, the output head
    (resharded only after backward), then the rest at the root."""
    model = policy.model
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.model.embed_tokens)
    fully_shard([model.lm_head], reshard_after_forward=False)
    fully_shard(policy)


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    heads = ["chunked"]
    try:
        import liger_kernel  # noqa: F401

        heads += ["fused", "fused-prefix"]
    except ImportError:
        pass
    results = {}
    for head in heads:
        policy = policy_for(head)
        shard_as_accelerate_does(policy)
        batch = local_batch(rank, head)
        loss = step_loss(policy, batch)
        loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in policy.model.named_parameters()}
        losses = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(losses, loss.detach())
        results[head] = {"losses": torch.stack(losses), "grads": grads}
    tokens = torch.tensor(sum(local_batch(rank)["row_lengths"]))
    counts = [torch.zeros((), dtype=tokens.dtype) for _ in range(2)]
    dist.all_gather(counts, tokens)
    results["response_tokens"] = [int(c) for c in counts]
    if rank == 0:
        torch.save(results, out)
    # both processes leave together: rank 1 tearing gloo down while rank 0 still saved sometimes aborted it at
    # exit ("terminate called without an active exception") after the results were written: 4 of 23 runs
    # failed so without this barrier, none of 32 with it
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    main(sys.argv[1])
    # and leave without the interpreter's teardown, where gloo's threads still aborted one process in a full suite
    # run on two loaded cores (once, with the barrier): the results are written and the group is gone by now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
