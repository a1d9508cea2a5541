"""Response log-probs: only response tokens count, padding changes nothing, chunking is exact."""

import pytest
import torch

from simpo_exp.data.collate import PairCollator
from simpo_exp.logps import ResponseLogps
from tests.conftest import fsdp_on_cpu
from tests.test_perf_paths import make_model

PAD = 0


@pytest.fixture(scope="module")
def model():
    return make_model(vocab=50).eval()


def pair(prompt, chosen, rejected):
    return {"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected}


def reference_logps(model, prompt, response):
    """Straightforward: full logits of the unpadded sequence, sum of log p(response tokens)."""
    ids = torch.tensor([prompt + response])
    logp = model(ids).logits.float().log_softmax(-1)[0]
    total = 0.0
    for j, tok in enumerate(response):
        total += logp[len(prompt) + j - 1, tok].item()
    return total, len(response)


def test_matches_full_logits_on_unpadded_sequences(model):
    pairs = [pair([1, 2, 3], [4, 5], [6, 7, 8, 9]), pair([10, 11], [12, 13, 14], [15])]
    batch = PairCollator(PAD)(pairs)
    out = ResponseLogps(model)(**batch)
    rows = [(p["prompt_input_ids"], p["chosen_input_ids"]) for p in pairs] + [
        (p["prompt_input_ids"], p["rejected_input_ids"]) for p in pairs
    ]
    for i, (prompt, response) in enumerate(rows):
        expected_sum, n = reference_logps(model, prompt, response)
        assert out.num_tokens[i].item() == n
        assert out.logp_sums[i].item() == pytest.approx(expected_sum, abs=1e-4)
        assert out.mean_logps[i].item() == pytest.approx(expected_sum / n, abs=1e-5)


def test_padding_and_neighbours_do_not_change_a_pair(model):
    alone = PairCollator(PAD)([pair([1, 2, 3], [4, 5], [6, 7])])
    crowded = PairCollator(PAD)([pair([1, 2, 3], [4, 5], [6, 7]), pair(list(range(1, 30)), [9] * 12, [8] * 3)])
    a = ResponseLogps(model)(**alone).mean_logps
    b = ResponseLogps(model)(**crowded).mean_logps
    assert a[0].item() == pytest.approx(b[0].item(), abs=1e-5)  # chosen
    assert a[1].item() == pytest.approx(b[2].item(), abs=1e-5)  # rejected sits at row B + i


def test_prompt_tokens_are_not_counted(model):
    batch = PairCollator(PAD)([pair([1, 2, 3, 4, 5, 6], [7], [8, 9])])
    assert batch["row_lengths"] == [1, 2]
    out = ResponseLogps(model)(**batch)
    assert out.num_tokens.tolist() == [1, 2]
    # Changing only the prompt's last token changes the log-prob (it conditions the response) ...
    other = PairCollator(PAD)([pair([1, 2, 3, 4, 5, 7], [7], [8, 9])])
    assert ResponseLogps(model)(**other).logp_sums[0].item() != pytest.approx(out.logp_sums[0].item(), abs=1e-6)
    # ... but the count stays the number of response tokens.
    assert ResponseLogps(model)(**other).num_tokens.tolist() == [1, 2]


def test_chunked_head_equals_plain_head_with_gradients(model):
    torch.manual_seed(1)
    pairs = [pair([1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11]), pair([12, 13], [14, 15, 16], [17, 18, 19, 20])]
    batch = PairCollator(PAD)(pairs)
    grads = []
    for chunk in (0, 3):
        model.zero_grad()
        out = ResponseLogps(model, chunk_size=chunk)(**batch)
        out.mean_logps.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if chunk == 0:
            plain = out.mean_logps.detach()
        else:
            chunked = out.mean_logps.detach()
    assert torch.allclose(plain, chunked, atol=1e-6)
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-6)
    model.zero_grad()


def test_softcapping_is_applied(model):
    batch = PairCollator(PAD)([pair([1, 2], [3, 4], [5])])
    wrapped = ResponseLogps(model)
    plain = wrapped(**batch).logp_sums.detach()
    wrapped.softcap = 0.5  # tiny cap: logits squeezed to (-0.5, 0.5) -> log-probs near -log(V)
    capped = wrapped(**batch).logp_sums.detach()
    assert not torch.allclose(plain, capped)
    assert torch.allclose(capped / torch.tensor([2.0, 1.0]), -torch.log(torch.tensor(50.0)), atol=1.0)


def test_scaled_and_softcapped_logits_are_computed_in_float32(model):
    """Under bf16 autocast the head's logits were capped (tanh(x / 30) * 30) and scaled in bf16 before the float32
    log-softmax: about 0.2 nats on a 400-token sum at Gemma 2's cap, against 0.1 when upcast first."""
    wrapped = ResponseLogps(model)
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert wrapped._head(hidden).dtype == torch.bfloat16  # no cap, no scale: the head's own dtype
        wrapped.softcap = 30.0
        capped = wrapped._head(hidden)
        wrapped.softcap, wrapped.scale = None, 0.25
        scaled = wrapped._head(hidden)
        bf16_logits = model.lm_head(hidden)  # the head's own bf16 output, capped below in float32
    assert capped.dtype == scaled.dtype == torch.float32
    assert torch.allclose(capped, torch.tanh(bf16_logits.float() / 30.0) * 30.0, atol=1e-6)


def scaled_model(model_type: str, scale: float, vocab: int = 64):
    """A tiny random model of a family whose forward scales its logits (``logps.LOGIT_SCALES``), the head's weights
    made large so that the scale shows in the log-probs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, num_key_value_heads=2, **shape)
    key = next(k for k in ("logit_scale", "logits_scaling", "lm_head_multiplier") if hasattr(cfg, k))
    setattr(cfg, key, scale)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model


@pytest.mark.parametrize(
    "model_type, scale",
    [("cohere", 0.25), ("cohere2", 0.25), ("granite", 4.0), ("granitemoe", 4.0), ("hyperclovax", 4.0)]
    + [pytest.param("falcon_h1", 0.25, marks=pytest.mark.slow)],  # a Mamba hybrid: 10 s on 2 cores
)
def test_a_family_that_scales_its_logits_is_scored_as_its_forward_scores(model_type, scale):
    """Cohere multiplies its logits by logit_scale, Granite divides them by logits_scaling (HyperCLOVA X multiplies
    by a key of that name), Falcon-H1 multiplies by lm_head_multiplier, all in their forward, which the log-prob path
    does not call: it read the head's logits unscaled, every log-prob at another temperature than the model's."""
    model = scaled_model(model_type, scale)
    pairs = [pair([1, 2, 3], [4, 5], [6, 7, 8]), pair([9, 10], [11, 12, 13], [14])]
    out = ResponseLogps(model)(**PairCollator(PAD)(pairs))
    rows = [(p["prompt_input_ids"], p["chosen_input_ids"]) for p in pairs]
    rows += [(p["prompt_input_ids"], p["rejected_input_ids"]) for p in pairs]
    for i, (prompt, response) in enumerate(rows):
        expected, _ = reference_logps(model, prompt, response)
        assert out.logp_sums[i].item() == pytest.approx(expected, abs=1e-4), (model_type, i)


def test_tie_weights_shares_again_what_the_model_shared_when_wrapped():
    """FSDP2's low-memory loading moves the wrapped model to the meta device (which unties tied embeddings) and
    calls tie_weights(): tied embeddings are one parameter again, and two separate matrices (a checkpoint that
    holds both, loaded untied whatever its config says) stay two."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    def wrapped(tied: bool) -> ResponseLogps:
        shape = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
        cfg = LlamaConfig(**shape, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
        model = AutoModelForCausalLM.from_config(cfg)
        model.config.tie_word_embeddings = True  # the config may say so either way
        return ResponseLogps(model)

    for tied in (True, False):
        policy = wrapped(tied)
        count = len(list(policy.parameters()))
        policy = policy.to("meta")
        head, embed = policy.get_output_embeddings(), policy.get_input_embeddings()
        assert head is policy.model.lm_head and embed is policy.model.model.embed_tokens
        assert head.weight is not embed.weight  # moving to meta made two parameters of the tied one
        policy.tie_weights()
        assert (head.weight is embed.weight) == tied
        assert len(list(policy.parameters())) == count


@fsdp_on_cpu
@pytest.mark.slow
def test_a_head_that_fsdp2_shards_as_its_own_unit_on_two_processes(tmp_path):
    """accelerate's FSDP2 makes the output head a unit of its own (tests/sharded_head.py shards the same way).
    The chunked head (and the fused one, where liger-kernel is installed, on padded and prefix-shared rows) then
    reads its weight once per step instead of calling the head once per chunk, which ran the unit's collectives as
    many times as each process had chunks: with two processes of 3 pairs each and different chunk counts, the step
    finishes, and each process's loss and the averaged gradient of every parameter equal one unsharded process's."""
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests import sharded_head

    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [*cmd, "-m", "tests.sharded_head", str(out)], cwd=Path(__file__).parents[1], env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    results = torch.load(out)
    chunks = [math.ceil(n / sharded_head.CHUNK) for n in results["response_tokens"]]
    assert chunks[0] != chunks[1], chunks  # else a collective per chunk would have gone unnoticed
    heads = [h for h in sharded_head.PACKING if h in results]
    assert heads[0] == "chunked"
    for head in heads:
        policy = sharded_head.policy_for(head)
        losses = []
        for rank in (0, 1):
            loss = sharded_head.step_loss(policy, sharded_head.local_batch(rank, head))
            (loss / 2).backward()  # FSDP averages the processes' gradients
            losses.append(loss.detach())
        torch.testing.assert_close(results[head]["losses"], torch.stack(losses), atol=1e-5, rtol=0)
        for name, param in policy.model.named_parameters():
            got = results[head]["grads"][name]
            torch.testing.assert_close(got, param.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{head} {name}: {m}")


@pytest.mark.parametrize("packing", ["none", "packed", "prefix_shared"])
def test_a_tokenizer_with_no_pad_and_no_eos_token_is_collated(model, packing):
    """The model's tokenizer falls back to EOS for padding; with neither, the pad id is None, and every layout
    fills the (masked) padding with some id instead of stopping set-up with a TypeError."""
    pairs = [pair([1, 2, 3], [4, 5], [6, 7, 8, 9]), pair([10, 11], [12, 13, 14], [15])]
    without = ResponseLogps(model, packing=packing)(**PairCollator(None, packing)(pairs))
    padded = ResponseLogps(model)(**PairCollator(PAD)(pairs))
    torch.testing.assert_close(without.logp_sums, padded.logp_sums, atol=1e-5, rtol=0)
