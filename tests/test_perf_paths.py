"""The fast paths (packing, prefix sharing, chunked head) give the plain path's loss and gradients.

Tolerances (float32 on CPU): loss and per-sequence log-probs within 1e-5 absolute, every parameter
gradient within 1e-5 absolute + 1e-4 relative of the plain path's. The differences come only from
summation order (different SDPA shapes, fewer/more rows), not from different maths.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from simpo_exp.data.collate import PairCollator
from simpo_exp.logps import ResponseLogps, SegmentPlan, group_mask
from simpo_exp.losses import nll_loss, simpo_loss
from simpo_exp.model import enable_checkpointing

PAD = 0
ATOL, RTOL = 1e-5, 1e-4
BETA, GAMMA_BETA_RATIO, SFT_WEIGHT = 2.0, 0.5, 0.3
FAST_PATHS = [("packed", "segments"), ("prefix_shared", "segments"), ("packed", "mask"), ("prefix_shared", "mask")]


def make_model(vocab=64, attn="sdpa", seed=0, layers=2, checkpointing=False, head_dim=None):
    """A tiny Llama (heads 8 wide unless ``head_dim``: compiled FlexAttention on CUDA needs 16 or more)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        max_position_embeddings=512,
        **({"head_dim": head_dim} if head_dim else {}),
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    if checkpointing:
        enable_checkpointing(model)
    return model.train()  # dropout is 0 in Llama: train mode only exercises the training code paths


def layout_settings(packing: str, attention: str = "segments") -> SimpleNamespace:
    """The hardware settings ``choose_layout`` reads."""
    return SimpleNamespace(packing=packing, packing_attention=attention, logps_chunk_size=0)


# two pairs of unlike lengths: a long prompt with a long chosen and a short rejected response, and the other way round
TWO_PAIRS = [
    {"prompt_input_ids": list(range(5, 15)), "chosen_input_ids": list(range(20, 30)), "rejected_input_ids": [3, 4]},
    {"prompt_input_ids": [6, 7], "chosen_input_ids": list(range(40, 43)), "rejected_input_ids": list(range(44, 50))},
]


def random_pairs(n, vocab=64, seed=0, max_prompt=20, max_response=30):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(1, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    return [
        {
            "prompt_input_ids": seq(1, max_prompt),
            "chosen_input_ids": seq(1, max_response),
            "rejected_input_ids": seq(1, max_response),
        }
        for _ in range(n)
    ]


def step_loss(policy, batch):
    """The training step's loss as simpo_exp.objective.batch_loss builds it (SimPO + weighted NLL)."""
    out = policy(**batch)
    n = out.num_tokens.shape[0] // 2
    pref = simpo_loss(out.mean_logps[:n], out.mean_logps[n:], BETA, GAMMA_BETA_RATIO)
    loss = pref.losses.mean() + SFT_WEIGHT * nll_loss(out.logp_sums[:n], out.num_tokens[:n])
    stats = {
        "rewards/chosen": pref.chosen_rewards.sum(),
        "rewards/rejected": pref.rejected_rewards.sum(),
        "logits/chosen": out.logit_means[:n].sum(),
        "logits/rejected": out.logit_means[n:].sum(),
        "tokens": batch["attention_mask"].sum(),
    }
    return loss, stats


def loss_and_grads(model, pairs, packing="none", attention="segments", chunk_size=0):
    batch = PairCollator(PAD, packing=packing, attention=attention)(pairs)
    policy = ResponseLogps(model, chunk_size=chunk_size, packing=packing, attention=attention)
    model.zero_grad(set_to_none=True)
    loss, stats = step_loss(policy, batch)
    loss.backward()
    out = policy(**batch)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), out.mean_logps.detach(), out.num_tokens, grads, stats


def assert_same(reference, other):
    loss0, logps0, counts0, grads0, _ = reference
    loss1, logps1, counts1, grads1, _ = other
    assert torch.equal(counts0, counts1)
    assert torch.allclose(logps0, logps1, atol=ATOL, rtol=0), (logps0 - logps1).abs().max()
    assert abs(loss0.item() - loss1.item()) <= ATOL
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], atol=ATOL, rtol=RTOL), (
            f"{name}: max diff {(grads0[name] - grads1[name]).abs().max():.2e}"
        )


# ----------------------------------------------------------------------------- layouts
def test_prefix_shared_layout_positions_and_sources():
    pair = {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10, 11, 12]}
    b = PairCollator(PAD, packing="prefix_shared")([pair])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]  # rejected continues from the prompt
    assert b["target_ids"].tolist() == [8, 9, 10, 11, 12] and b["target_rows"].tolist() == [0, 0, 1, 1, 1]
    assert b["target_sources"].tolist() == [2, 3, 2, 5, 6]  # the first rejected token: from the last prompt token
    assert b["row_tokens"].tolist() == b["row_lengths"] == [2, 3]
    assert b["segments"] == [[3, 2, 3]] and b["attention_mask"].sum() == 8


def test_packed_layout_repeats_the_prompt_and_restarts_positions():
    pairs = [
        {"prompt_input_ids": [5, 6], "chosen_input_ids": [8], "rejected_input_ids": [10, 11]},
        {"prompt_input_ids": [7], "chosen_input_ids": [9, 9], "rejected_input_ids": [12]},
    ]
    b = PairCollator(PAD, packing="packed")(pairs)
    assert b["input_ids"].tolist() == [[5, 6, 8, 5, 6, 10, 11, 7, 9, 9, 7, 12]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert b["target_rows"].tolist() == [0, 2, 2, 1, 1, 3]  # slot i chosen, B+i rejected
    assert b["target_ids"].tolist() == [8, 10, 11, 9, 9, 12]
    assert b["target_sources"].tolist() == [1, 4, 5, 7, 8, 10]  # each from its own sequence's previous token
    assert b["row_lengths"] == [1, 2, 2, 1]
    assert SegmentPlan(b["segments"], "packed").length == 12


def test_mask_layout_one_row_per_pair_and_its_mask():
    pairs = [
        {"prompt_input_ids": [5, 6], "chosen_input_ids": [8], "rejected_input_ids": [10]},
        {"prompt_input_ids": [7], "chosen_input_ids": [9], "rejected_input_ids": [12]},
    ]
    b = PairCollator(PAD, packing="prefix_shared", attention="mask")(pairs)
    assert b["input_ids"].shape == (2, 4) and b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    m = group_mask(b["attn_groups"])[0, 0].int().tolist()
    # rows: prompt, prompt, chosen, rejected; the rejected token sees the prompt and itself, not the chosen
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("packing,attention", FAST_PATHS)
def test_fast_paths_match_the_plain_path(packing, attention):
    pairs = random_pairs(5, seed=1)
    reference = loss_and_grads(make_model(), pairs)
    assert_same(reference, loss_and_grads(make_model(), pairs, packing, attention))


def test_mask_path_with_eager_attention():
    pairs = random_pairs(3, seed=2)
    reference = loss_and_grads(make_model(attn="eager"), pairs)
    assert_same(reference, loss_and_grads(make_model(attn="eager"), pairs, "prefix_shared", "mask"))


@pytest.mark.parametrize("packing", ["packed", "prefix_shared"])
def test_segments_with_gradient_checkpointing(packing):
    pairs = random_pairs(3, seed=3)
    reference = loss_and_grads(make_model(checkpointing=True), pairs)
    assert_same(reference, loss_and_grads(make_model(checkpointing=True), pairs, packing, "segments"))


def test_plain_batches_still_work_after_segment_attention_is_installed():
    model = make_model()
    pairs = random_pairs(3, seed=4)
    before = loss_and_grads(model, pairs)
    loss_and_grads(model, pairs, "prefix_shared", "segments")  # installs the segment attention
    assert model.config._attn_implementation.startswith("simpo_segments:")
    assert_same(before, loss_and_grads(model, pairs))  # padded batch: the model's own sdpa with its mask


def test_stats_count_the_tokens_actually_computed():
    pairs = random_pairs(4, seed=5)
    plain = loss_and_grads(make_model(), pairs)[4]
    shared = loss_and_grads(make_model(), pairs, "prefix_shared")[4]
    prompts = sum(len(p["prompt_input_ids"]) for p in pairs)
    assert plain["tokens"].item() == shared["tokens"].item() + prompts  # the prompt is computed once
    for key in plain:
        if key != "tokens":
            assert torch.allclose(plain[key].float(), shared[key].float(), atol=1e-4), key


# ----------------------------------------------------------------------------- large vocabulary
def test_chunked_head_on_a_large_vocabulary():
    vocab = 128_256
    pairs = random_pairs(2, vocab=vocab, seed=6, max_prompt=12, max_response=40)
    model = make_model(vocab=vocab, layers=1)
    reference = loss_and_grads(model, pairs)
    assert_same(reference, loss_and_grads(model, pairs, chunk_size=16))
    assert_same(reference, loss_and_grads(model, pairs, "prefix_shared", "segments", chunk_size=16))


def test_the_chunked_head_takes_the_targets_chunk_by_chunk(monkeypatch):
    """``logps_chunk_size`` bounds the head's memory to one chunk's logits (each chunk recomputed in the backward):
    every batch longer than one chunk goes through it in ceil(targets / chunk) checkpointed pieces, not whole."""
    import math

    from simpo_exp import logps as module

    calls = []
    real = module.checkpoint
    monkeypatch.setattr(module, "checkpoint", lambda fn, s, t, **kw: calls.append(len(t)) or real(fn, s, t, **kw))
    batch = PairCollator(PAD)(random_pairs(2, seed=1))
    targets = batch["target_ids"].numel()
    ResponseLogps(make_model(), chunk_size=16)(**batch)
    assert targets > 32 and sum(calls) == targets and calls[:-1] == [16] * (len(calls) - 1)
    assert len(calls) == math.ceil(targets / 16)
    calls.clear()
    ResponseLogps(make_model())(**batch)  # no chunking asked for: one pass
    assert calls == []


# ----------------------------------------------------------------------------- misuse
def test_mismatched_collator_and_module_fail_clearly():
    model = make_model()
    packed = PairCollator(PAD, packing="prefix_shared")(random_pairs(2))
    with pytest.raises(ValueError, match="same packing"):
        ResponseLogps(model)(**packed)
    plain = PairCollator(PAD)(random_pairs(2))
    with pytest.raises(ValueError, match="not packed"):
        ResponseLogps(model, packing="packed")(**plain)
    with pytest.raises(ValueError, match="packing="):
        PairCollator(PAD, packing="zip")
    # a batch built for the mask attention reaching a segment-attention module says which, not a shape error
    masked = PairCollator(PAD, packing="prefix_shared", attention="mask")(random_pairs(2))
    with pytest.raises(ValueError, match="a batch for packing_attention=mask reached ResponseLogps"):
        ResponseLogps(model, packing="prefix_shared")(**masked)
    # a packed batch whose ids do not span its segments is named as such
    short = dict(packed, input_ids=packed["input_ids"][:, :-1])
    with pytest.raises(ValueError, match="does not match its segments"):
        ResponseLogps(model, packing="prefix_shared")(**short)
    # the mask attention needs a kernel that takes a dense 4D mask: FlexAttention's and flash-attn's do not
    with pytest.raises(ValueError, match="packing_attention=mask needs an attention that takes a dense 4D mask"):
        ResponseLogps(make_model(attn="flex_attention"), packing="packed", attention="mask")
    # the padded layout never reads packing_attention: a GPU-only choice beside packing=none is no error on a CPU
    from simpo_exp.layout import BatchLayout, choose_layout

    for attention in ("flex", "flash"):
        layout = choose_layout(layout_settings("none", attention), "cpu", model.config, 512)
        assert layout == BatchLayout("none", attention, 0)


def test_auto_layout_follows_the_measured_rule_per_device(compose):
    """packing=auto without a measurement: prefix sharing on CPU, packed FlexAttention on CUDA (fastest on an
    H200, benchmarks/RESULTS.md); padded where the packed attentions cannot serve the model: Gemma 2's
    softcapping on CPU (segment attention lacks it), a sliding window shorter than max_length."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig

    from simpo_exp.config import ConfigError, to_config
    from simpo_exp.layout import BatchLayout, choose_layout

    cfg = to_config(compose())
    small = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    gemma = Gemma2ForCausalLM(Gemma2Config(**small))
    assert gemma.config.attn_logit_softcapping and gemma.config.sliding_window == 4096
    assert choose_layout(cfg.hardware, "cpu", gemma.config, 2048).packing == "none"
    masked = to_config(compose("hardware.packing_attention=mask")).hardware  # asked for: it softcaps (was: padded)
    assert choose_layout(masked, "cpu", gemma.config, 2048) == BatchLayout("prefix_shared", "mask", 0)
    assert choose_layout(cfg.hardware, "cuda", gemma.config, 2048) == BatchLayout("packed", "flex", 0)  # flex softcaps
    assert choose_layout(cfg.hardware, "cuda", gemma.config, 8192).packing == "none"  # a window of 4096 < 8192
    llama = LlamaForCausalLM(LlamaConfig(**small)).config
    assert choose_layout(cfg.hardware, "cpu", llama) == BatchLayout("prefix_shared", "segments", 0)
    assert choose_layout(cfg.hardware, "cuda", llama) == BatchLayout("packed", "flex", 0)
    mistral = MistralConfig(**small, sliding_window=1024)
    for device in ("cpu", "cuda"):
        assert choose_layout(cfg.hardware, device, mistral, 2048).packing == "none"
        assert choose_layout(cfg.hardware, device, mistral, 1024).packing != "none"
    fused = to_config(compose("hardware.fused_head=liger")).hardware
    assert choose_layout(fused, "cuda", llama) == BatchLayout("packed", "flex", 0)  # the fused head: any layout
    flex = to_config(compose("hardware.packing=prefix_shared", "hardware.packing_attention=flex")).hardware
    assert choose_layout(flex, "cuda", llama) == BatchLayout("prefix_shared", "flex", 0)
    with pytest.raises(ConfigError, match="packing_attention='flex' trains on a GPU only.*use 'segments' here"):
        choose_layout(flex, "cpu", llama)
    # Gemma 2 on a CPU: the advice was 'segments', which is refused for its softcapping in turn
    with pytest.raises(ConfigError, match="trains on a GPU only.*use 'mask' here \\(segment attention does not"):
        choose_layout(flex, "cpu", gemma.config, 2048)


def test_batch_layout_is_checked_when_made():
    from simpo_exp.layout import BatchLayout

    with pytest.raises(ValueError, match="packing='zip'"):
        BatchLayout("zip")
    with pytest.raises(ValueError, match="attention='dense'"):
        BatchLayout("packed", "dense")
    with pytest.raises(ValueError, match="chunk_size=-1"):
        BatchLayout("none", "segments", -1)
    with pytest.raises(Exception):  # frozen: a layout chosen for a run cannot change under it
        BatchLayout().packing = "packed"


# ----------------------------------------------------------------------------- FlexAttention
# torch has no FlexAttention backward on CPU: here the forward is checked against the plain path in
# float32; tests/test_gpu.py checks losses and gradients on CUDA.
@pytest.mark.parametrize("packing", ["packed", "prefix_shared"])
def test_flex_attention_matches_the_plain_path_forward(packing):
    model = make_model().eval()
    pairs = random_pairs(5, seed=3)
    with torch.no_grad():
        plain = ResponseLogps(model)(**PairCollator(PAD)(pairs))
        flex = ResponseLogps(model, packing=packing, attention="flex")(
            **PairCollator(PAD, packing=packing, attention="flex")(pairs)
        )
    assert torch.equal(plain.num_tokens, flex.num_tokens)
    assert torch.allclose(plain.mean_logps, flex.mean_logps, atol=ATOL, rtol=0), (
        (plain.mean_logps - flex.mean_logps).abs().max()
    )


@pytest.mark.parametrize("autocast", [False, True])
def test_flexattention_gets_query_key_and_value_in_one_dtype(autocast, monkeypatch):
    """Under bf16 autocast with float32 weights (the GPU presets), the rotary embedding hands query and key back in
    float32 beside a bfloat16 value: FlexAttention got three dtypes, which torch before 2.11 refuses. Each goes in
    at autocast's dtype, as the model's SDPA computes there; without autocast, float32 as they are."""
    from simpo_exp import logps

    seen = []

    def recording_flex(device):
        def attend(query, key, value, **kwargs):
            seen.append((query.dtype, key.dtype, value.dtype))
            return query * 1.0

        return attend

    monkeypatch.setattr(logps, "flex_attention_fn", recording_flex)
    model = make_model().eval()
    pairs = random_pairs(3, seed=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ResponseLogps(model, packing="packed", attention="flex")(
            **PairCollator(PAD, packing="packed", attention="flex")(pairs)
        )
    expected = torch.bfloat16 if autocast else torch.float32
    assert seen and set(seen) == {(expected, expected, expected)}


def test_flex_block_mask_is_the_prefix_sharing_mask():
    """The block mask's visible (query, key) pairs are exactly the dense prefix-sharing mask's."""
    from simpo_exp.logps import flex_block_mask

    pairs = random_pairs(3, seed=4, max_prompt=6, max_response=6)
    segments = PairCollator(PAD, packing="prefix_shared")(pairs)["segments"]
    block = flex_block_mask(segments, "prefix_shared", torch.device("cpu"))
    # the mask_mod evaluated on every (q, k) pair against a hand-built mask
    t = sum(p + c + r for p, c, r in segments)
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    got = block.mask_mod(torch.tensor(0), torch.tensor(0), q, k)
    want = torch.zeros(t, t, dtype=torch.bool)
    start = 0
    for p, c, r in segments:
        P, C, R = range(start, start + p), range(start + p, start + p + c), range(start + p + c, start + p + c + r)
        for qi in [*P, *C]:
            for ki in range(start, qi + 1):
                want[qi, ki] = True
        for qi in R:
            for ki in [*P, *range(R.start, qi + 1)]:
                want[qi, ki] = True
        start += p + c + r
    assert torch.equal(got, want)


@pytest.mark.parametrize("packing", ["packed", "prefix_shared"])
def test_flex_tiles_are_exactly_the_dense_rules_tiles(packing):
    """flex_tiles classifies each (query tile, key tile) from the row's pieces, without the length x length mask
    that torch's create_block_mask evaluates: the same empty / partial / full tiles as the dense rule evaluated
    on every pair (a short last tile never full, as torch leaves it), for rows cut into tiles of many sizes."""
    from simpo_exp.logps import flex_tiles, row_groups

    g = torch.Generator().manual_seed(5)
    for i in range(24):  # every other row of pieces of 1 or 2 tokens: tiles of 2 made of them alone
        n = int(torch.randint(1, 6, (1,), generator=g))
        segments = [tuple(int(x) for x in torch.randint(1, 3 if i % 2 else 70, (3,), generator=g)) for _ in range(n)]
        doc, role = row_groups(segments, packing)
        t = len(doc)
        q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
        dense = (q >= k) & (doc[q] == doc[k]) & ~((role[q] == 2) & (role[k] == 1))
        for block in (1, 2, 5, 16, 128):
            tiles = -(-t // block)
            padded = torch.zeros(tiles * block, tiles * block, dtype=torch.int8)
            padded[:t, :t] = dense
            real = torch.zeros_like(padded)
            real[:t, :t] = 1
            shown = padded.view(tiles, block, tiles, block).sum((1, 3))
            size = real.view(tiles, block, tiles, block).sum((1, 3))
            want_full = shown == size
            if tiles * block != t:
                want_full[-1, :] = want_full[:, -1] = False
            partial, full = flex_tiles(doc, role, block)
            assert torch.equal(full, want_full), (segments, block)
            assert torch.equal(partial, (shown > 0) & ~want_full), (segments, block)


def test_the_block_masks_tables_are_torchs_own_query_side_included():
    """Every table FlexAttention's kernels read (per query tile the partly and wholly visible key tiles, and per
    key tile the query tiles, which the backward pass uses) equals what torch's create_block_mask builds from the
    dense rule: counts, and the valid indices in their order. So the GPU kernels, forward and backward, see the
    tables they saw on the H200 (benchmarks/RESULTS.md), with no length x length mask built."""
    from torch.nn.attention.flex_attention import create_block_mask

    from simpo_exp.logps import flex_block_mask, row_groups, visibility

    def tables(mask):
        out = []
        for num, idx in [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")] + [
            ("q_num_blocks", "q_indices"),
            ("full_q_num_blocks", "full_q_indices"),
        ]:
            counts, indices = getattr(mask, num)[0, 0], getattr(mask, idx)[0, 0]
            out.append([indices[i, : int(n)].tolist() for i, n in enumerate(counts)])
        return out

    g = torch.Generator().manual_seed(8)
    for packing in ("packed", "prefix_shared"):
        for _ in range(6):
            n = int(torch.randint(1, 6, (1,), generator=g))
            segments = [tuple(int(x) for x in torch.randint(1, 300, (3,), generator=g)) for _ in range(n)]
            doc, role = row_groups(segments, packing)
            ours = flex_block_mask(segments, packing, torch.device("cpu"))
            theirs = create_block_mask(visibility(doc, role), None, None, len(doc), len(doc), device="cpu")
            assert tables(ours) == tables(theirs), (packing, segments)


def test_compiled_flexattention_honours_the_tiles_as_the_dense_rule_does():
    """The kernel skips the tiles marked empty and applies no rule inside those marked full. torch.compile's
    FlexAttention does so on CPU too (the eager fallback evaluates the rule on every pair, so it cannot see a wrong
    tile): with flex_block_mask's tiles over rows of many 128-token tiles, its output equals the eager, dense one."""
    from torch.nn.attention.flex_attention import flex_attention

    from simpo_exp.logps import flex_block_mask

    compiled = torch.compile(flex_attention, dynamic=True)
    g = torch.Generator().manual_seed(7)
    for packing, segments in [("packed", [(90, 200, 150), (130, 60, 260)]), ("prefix_shared", [(140, 300, 90)] * 3)]:
        block = flex_block_mask(segments, packing, torch.device("cpu"))
        t = block.seq_lengths[0]
        assert block.kv_num_blocks.sum() > 0 and block.full_kv_num_blocks.sum() > 0  # partial and full tiles both
        q, k, v = (torch.randn(1, 2, t, 16, generator=g) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v, block_mask=block), flex_attention(q, k, v, block_mask=block))


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_applies_gemma_softcapping(compiled, monkeypatch):
    """Gemma 2 caps its attention logits: the flex path must give the eager padded path's log-probs. Compiled as
    on a GPU (dynamic shapes), the cap written as a Python float in the score_mod failed to lower in inductor
    (unbacked_bindings), so a packed Gemma-2 run under FlexAttention died at its first step."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from simpo_exp import logps

    if compiled:
        torch._dynamo.reset()
        monkeypatch.setattr(logps, "_COMPILED_FLEX", None)  # a fresh compiled function, dropped afterwards
        gpu_choice = logps.flex_attention_fn
        monkeypatch.setattr(logps, "flex_attention_fn", lambda device: gpu_choice(torch.device("cuda")))
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=PAD,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0,
        sliding_window=512,
        query_pre_attn_scalar=144,  # Gemma-2-27B's scale (144**-0.5), not the head width's: the scale must be passed
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # scores past the cap: the random init's never reach it, and a path without it passed
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(24)
            layer.self_attn.k_proj.weight.mul_(24)
        model.lm_head.weight.mul_(30)
    for seed in (5, 6):  # two batches of other lengths
        pairs = random_pairs(3, seed=seed)
        with torch.no_grad():
            plain = ResponseLogps(model)(**PairCollator(PAD)(pairs))
            flex = ResponseLogps(model, packing="prefix_shared", attention="flex")(
                **PairCollator(PAD, packing="prefix_shared", attention="flex")(pairs)
            )
        assert torch.allclose(plain.mean_logps, flex.mean_logps, atol=ATOL, rtol=0), (
            (plain.mean_logps - flex.mean_logps).abs().max()
        )
    assert (logps._COMPILED_FLEX is not None) == compiled
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    with torch.no_grad():
        uncapped = ResponseLogps(model)(**PairCollator(PAD)(pairs)).mean_logps
    assert (plain.mean_logps - uncapped).abs().max() > 1e-3  # the cap changes these log-probs


def test_compiled_flex_attention_matches_and_does_not_recompile_per_batch(monkeypatch):
    """The GPU path compiles FlexAttention (``flex_attention_fn`` on CUDA: ``torch.compile(..., dynamic=True)``),
    called from inside the compiler-disabled segment attention with a new block mask every batch. Here that
    same compiled function runs the forward on CPU: it gives the plain path's log-probs, and batches of new
    lengths reuse its graphs instead of compiling again (a recompile per batch would cost a GPU run seconds
    a step)."""
    from torch._dynamo.utils import counters

    from simpo_exp import logps

    torch._dynamo.reset()
    monkeypatch.setattr(logps, "_COMPILED_FLEX", None)  # a fresh compiled function, dropped afterwards
    gpu_choice = logps.flex_attention_fn
    monkeypatch.setattr(logps, "flex_attention_fn", lambda device: gpu_choice(torch.device("cuda")))
    model = make_model().eval()
    graphs = []
    for seed in range(5):  # 6 pairs of random lengths each: 150-300 tokens, two or three 128-token blocks
        pairs = random_pairs(6, seed=10 + seed, max_prompt=20, max_response=30)
        with torch.no_grad():
            plain = ResponseLogps(model)(**PairCollator(PAD)(pairs))
            flex = ResponseLogps(model, packing="prefix_shared", attention="flex")(
                **PairCollator(PAD, packing="prefix_shared", attention="flex")(pairs)
            )
        assert torch.allclose(plain.mean_logps, flex.mean_logps, atol=ATOL, rtol=0), seed
        graphs.append(counters["stats"]["unique_graphs"])
    assert logps._COMPILED_FLEX is not None and graphs[0] >= 1  # the compiled function ran
    assert graphs[-1] == graphs[1], graphs  # after the first two batches, no batch compiled again


def test_segments_wrap_the_eager_attention_of_a_lora_model():
    """Under LoRA the model is PEFT's wrapper, whose module has no eager attention of its own: the segment
    attention wraps the model family's (it used to stop the run), and the packed loss is the plain one."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(attn="eager"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # adapters that change the outputs
    pairs = random_pairs(4)
    losses = {}
    for packing in ("none", "packed"):
        batch = PairCollator(PAD, packing=packing, attention="segments")(pairs)
        with torch.no_grad():
            losses[packing] = step_loss(ResponseLogps(model, packing=packing, attention="segments"), batch)[0]
    torch.testing.assert_close(losses["packed"], losses["none"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("packing", ["none", "prefix_shared"])
def test_an_nll_term_accumulated_over_micro_batches_is_the_big_batchs(compose, packing):
    """sft_weight > 0 (CPO, ORPO, SimPO+SFT): 4 micro-batches of 4 pairs, each loss divided by 4 (as accumulation
    and data parallel average them), give the gradient of one batch of the 16 pairs: the NLL term is divided by
    the step's chosen tokens (train.step_sft_tokens), not each micro-batch's own, which weighed a token by its
    micro-batch's size (0.1% off in grad_norm, measured through the loop)."""
    from simpo_exp.config import to_config
    from simpo_exp.objective import batch_loss, chosen_tokens
    from simpo_exp.train import step_sft_tokens

    cfg = to_config(compose("loss=cpo", f"hardware.packing={packing}"))
    assert cfg.sft_weight == 1.0
    model = make_model(seed=3)
    policy = ResponseLogps(model, packing=packing)
    collate = PairCollator(PAD, packing=packing)
    pairs = random_pairs(16, seed=4, max_response=40)
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, reduce=lambda t, reduction: t)

    def grads(batches, tokens):
        model.zero_grad(set_to_none=True)
        for batch in batches:
            loss, stats, _ = batch_loss(policy, batch, cfg, None, tokens)
            (loss / len(batches)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]), stats

    whole, stats = grads([collate(pairs)], None)
    micro = [collate(pairs[i : i + 4]) for i in range(0, 16, 4)]
    assert sum(chosen_tokens(b) for b in micro) == chosen_tokens(collate(pairs)) == stats["length/chosen"]
    accumulated, _ = grads(micro, step_sft_tokens(micro, acc))
    torch.testing.assert_close(accumulated, whole, atol=1e-6, rtol=1e-5)
    # two processes of two micro-batches each, whose gradients data parallel averages: the same (the count is the
    # step's over both processes, a sum their reduce gives each of them)
    halves = (micro[:2], micro[2:])
    step_tokens = torch.tensor([float(sum(chosen_tokens(b) for b in micro))])
    two = SimpleNamespace(device=torch.device("cpu"), num_processes=2, reduce=lambda t, reduction: step_tokens)
    averaged = sum(grads(half, step_sft_tokens(half, two))[0] for half in halves) / 2
    torch.testing.assert_close(averaged, whole, atol=1e-6, rtol=1e-5)
    per_micro_batch, _ = grads(micro, None)  # each micro-batch's own token mean: what was done before
    assert (per_micro_batch - whole).norm() > 1e-3 * whole.norm()


def test_segment_attention_keeps_a_models_own_attention_scale_and_dropout():
    """Every equivalence test used a model whose attention scale is the head width's default: Gemma 2/3 scale by
    query_pre_attn_scalar, and segment attention that dropped the model's scale gave log-probs 0.28 off the padded
    path's. Nor did any test see attention dropout reach the packed layouts (disable_dropout=false trains with it)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    gemma = Gemma3TextConfig(**shape, num_key_value_heads=2, head_dim=16, pad_token_id=PAD, query_pre_attn_scalar=256)
    model = Gemma3ForCausalLM(gemma).eval()
    model.config._attn_implementation = "sdpa"
    pairs = random_pairs(3, seed=1)
    with torch.no_grad():
        plain = ResponseLogps(model)(**PairCollator(PAD)(pairs)).mean_logps
        for packing in ("packed", "prefix_shared"):
            fast = ResponseLogps(model, packing=packing)(**PairCollator(PAD, packing=packing)(pairs)).mean_logps
            assert torch.allclose(plain, fast, atol=ATOL, rtol=0), (packing, (plain - fast).abs().max())

    llama = LlamaConfig(**shape, num_key_value_heads=2, pad_token_id=PAD, attention_dropout=0.5)
    model = AutoModelForCausalLM.from_config(llama, attn_implementation="sdpa").train()
    for packing in ("none", "packed", "prefix_shared"):
        passes = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            with torch.no_grad():
                passes.append(ResponseLogps(model, packing=packing)(**PairCollator(PAD, packing=packing)(pairs)))
        assert (passes[0].mean_logps - passes[1].mean_logps).abs().max() > 1e-4, packing  # dropout drew


def test_a_layer_that_drops_the_segment_plan_or_a_softcap_segment_attention_cannot_apply_is_refused():
    """The guard that every attention layer used the segment plan was tested only where none did (StableLM): one
    layer that drops it attends across the whole packed row, other sequences and later tokens included (0.012 off
    the padded log-probs). And segment attention's softcap refusal had no test through the library's own API."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from simpo_exp.logps import SegmentPlanUnused

    model = make_model().eval()
    attention = model.model.layers[1].self_attn
    forward = attention.forward
    attention.forward = lambda *args, simpo_segments=None, **kwargs: forward(*args, **kwargs)  # drops the plan
    pairs = random_pairs(3, seed=1)
    for packing in ("packed", "prefix_shared"):
        with pytest.raises(SegmentPlanUnused, match="only 1 of 2 attention layers used the segment plan"):
            ResponseLogps(model, packing=packing)(**PairCollator(PAD, packing=packing)(pairs))

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    gemma = Gemma2Config(
        **shape, num_key_value_heads=2, head_dim=8, pad_token_id=PAD, attn_logit_softcapping=1.0, sliding_window=512
    )
    model = Gemma2ForCausalLM(gemma).eval()
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="segment attention does not implement attention-logit softcapping"):
        ResponseLogps(model, packing="packed")(**PairCollator(PAD, packing="packed")(pairs))


@pytest.mark.parametrize("attention", ["segments", "mask"])
def test_packed_attention_refuses_sequences_past_the_sliding_window(attention):
    """Neither packed attention implements a sliding window. choose_layout keeps runs off them, but the class
    itself is the library's API: segment attention refused, the mask attention gave log-probs of a model without
    its window (0.34-0.49 off a windowed Mistral's, found by hand); both now refuse, and a sequence the window
    covers runs."""
    from transformers import MistralConfig, MistralForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = MistralForCausalLM(MistralConfig(**small, num_key_value_heads=2, sliding_window=16, pad_token_id=PAD))
    model.config._attn_implementation = "sdpa"
    pairs = random_pairs(2, max_prompt=20, max_response=30, seed=1)
    for packing in ("packed", "prefix_shared"):
        batch = PairCollator(PAD, packing=packing, attention=attention)(pairs)
        with pytest.raises(ValueError, match=r"exceeds the model's sliding window \(16\)"):
            ResponseLogps(model, packing=packing, attention=attention)(**batch)
    exact = [
        {"prompt_input_ids": list(range(5, 13)), "chosen_input_ids": list(range(20, 28)), "rejected_input_ids": [3]}
    ]
    with torch.no_grad():  # a sequence exactly the window long is covered by it: scored
        ResponseLogps(model, packing="packed", attention=attention)(**PairCollator(PAD, "packed", attention)(exact))
    over = [exact[0] | {"chosen_input_ids": list(range(20, 29))}]  # one token past it: refused
    with pytest.raises(ValueError, match=r"17 tokens exceeds the model's sliding window \(16\)"):
        ResponseLogps(model, packing="packed", attention=attention)(**PairCollator(PAD, "packed", attention)(over))
    short = random_pairs(2, max_prompt=6, max_response=8, seed=1)
    batch = PairCollator(PAD, packing="packed", attention=attention)(short)
    with torch.no_grad():
        packed = ResponseLogps(model, packing="packed", attention=attention)(**batch).mean_logps
        plain = ResponseLogps(model)(**PairCollator(PAD)(short)).mean_logps
    assert torch.allclose(packed, plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("packing, attention", [("none", "segments"), ("packed", "segments"),
                                                ("prefix_shared", "segments"), ("prefix_shared", "mask")])  # fmt: skip
def test_a_pair_with_an_empty_response_is_refused_in_every_layout(packing, attention):
    """Data loading drops a row whose response has no tokens; handed to the collator directly, the packed layouts
    failed with an IndexError and the padded one gave a sequence with no scored token (a mean log-prob of 0 / 0).
    Refused by name, as an empty prompt is; and every sequence keeps its own count of scored tokens."""
    pairs = [
        {"prompt_input_ids": [5, 6], "chosen_input_ids": [8], "rejected_input_ids": [9]},
        {"prompt_input_ids": [7], "chosen_input_ids": [10, 11], "rejected_input_ids": [12, 13, 14]},
    ]
    batch = PairCollator(PAD, packing=packing, attention=attention)(pairs)
    assert batch["row_lengths"] == [1, 2, 1, 3] and batch["row_tokens"].tolist() == [1, 2, 1, 3]
    pairs[1]["rejected_input_ids"] = []
    with pytest.raises(ValueError, match="empty chosen or rejected response"):
        PairCollator(PAD, packing=packing, attention=attention)(pairs)


def test_models_that_carry_a_state_beside_attention_run_the_padded_layout():
    """The packed layouts keep a row's sequences apart in attention only. Falcon-H1 runs a Mamba mixer beside
    attention in every layer, so each layer still made one attention call and the guard on attention calls
    passed: under packing=auto on CPU (prefix_shared) the rejected response's log-probs moved with the chosen
    response's tokens. Such models now take the padded layout under auto and are refused a packed one."""
    from transformers import FalconH1Config, FalconH1ForCausalLM, Gemma2Config

    from simpo_exp import layout_auto
    from simpo_exp.config import ConfigError
    from simpo_exp.layout import choose_layout, state_beside_attention

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    falcon = FalconH1Config(
        **small, num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
        mamba_chunk_size=16, pad_token_id=PAD,
    )  # fmt: skip
    assert state_beside_attention(falcon) and state_beside_attention(SimpleNamespace(layer_types=["linear_attention"]))
    for plain in (LlamaConfig(**small), Gemma2Config(**small), SimpleNamespace(layer_types=["sliding_attention"])):
        assert state_beside_attention(plain) is None
    # plain MLP or MoE blocks listed beside attention carry no state; a Mamba one does
    assert state_beside_attention(SimpleNamespace(layers_block_type=["attention", "mlp", "moe"])) is None
    assert "mamba" in state_beside_attention(SimpleNamespace(layers_block_type=["attention", "mamba"]))
    # a family not listed (a remote-code hybrid) that names Mamba or SSM settings carries one too
    for hybrid in (SimpleNamespace(model_type="my_hybrid", mamba_d_state=16), SimpleNamespace(ssm_state_size=8)):
        assert state_beside_attention(hybrid)
        assert choose_layout(layout_settings("auto"), "cpu", hybrid, 512).packing == "none"
    for device in ("cpu", "cuda"):
        assert choose_layout(layout_settings("auto"), device, falcon, 512).packing == "none"
        assert [c.packing for c in layout_auto.candidates(device, falcon, max_length=512)] == ["none"]
    assert choose_layout(layout_settings("auto"), "cpu", LlamaConfig(**small), 512).packing == "prefix_shared"
    # a multimodal Gemma-3 (how 4B-27B load) keeps its sliding window in text_config, which the rule did not read
    from transformers import Gemma3Config

    gemma3 = Gemma3Config(text_config={"sliding_window": 16, **small, "num_key_value_heads": 2, "head_dim": 8})
    assert choose_layout(layout_settings("auto"), "cpu", gemma3, 512).packing == "none"
    assert [c.packing for c in layout_auto.candidates("cuda", gemma3, max_length=512)] == ["none"]
    # GPT-Neo's local layers attend through window_size, which no rule read
    from transformers import GPTNeoConfig

    neo = GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, window_size=16,
                       attention_types=[[["global", "local"], 1]])  # fmt: skip
    assert choose_layout(layout_settings("auto"), "cpu", neo, 512).packing == "none"
    with pytest.raises(ConfigError, match="attends through a sliding window of 16 tokens, shorter than max_length=512"):
        choose_layout(layout_settings("packed"), "cpu", neo, 512)
    wide = GPTNeoConfig(**{**neo.to_dict(), "window_size": 1024})  # a window no pair of 512 tokens outgrows
    assert choose_layout(layout_settings("auto"), "cpu", wide, 512).packing == "prefix_shared"
    with pytest.raises(ConfigError, match="hardware.packing='packed': the model carries a state .*hybrid"):
        choose_layout(layout_settings("packed"), "cpu", falcon, 512)
    model = FalconH1ForCausalLM(falcon)
    with pytest.raises(ValueError, match="packing='prefix_shared' keeps sequences apart in attention only"):
        ResponseLogps(model, packing="prefix_shared")
    ResponseLogps(model)  # the padded layout runs the model as it is


def test_models_whose_attention_reads_column_distance_are_not_prefix_shared():
    """ALiBi (MPT, Bloom) biases attention by the distance between columns, not by position_ids. In prompt | chosen |
    rejected the rejected response sits len(chosen) columns further from its prompt: packing=auto on CPU picked
    prefix sharing for MPT and (with packing_attention=mask, as the segments error advised) its rejected log-probs
    moved with the chosen response's length. Such models take the padded layout under auto; prefix sharing is
    refused by name."""

    from transformers import BloomConfig, FalconConfig, MptConfig, MptForCausalLM

    from simpo_exp import layout_auto
    from simpo_exp.config import ConfigError
    from simpo_exp.layout import choose_layout, distance_biased

    # weights large enough for attention to matter
    mpt = MptConfig(
        vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=256, pad_token_id=PAD, initializer_range=0.3
    )
    assert distance_biased(mpt) and distance_biased(BloomConfig(vocab_size=64, hidden_size=32, n_head=4))
    # transformers' MPT builds its bias whatever attn_config.alibi says: a config saying False is biased all the same
    assert distance_biased(MptConfig(vocab_size=64, d_model=32, n_heads=4, attn_config={"alibi": False}))
    assert distance_biased(FalconConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, alibi=True))
    for plain in (FalconConfig(vocab_size=64, hidden_size=32, num_attention_heads=4), make_model().config):
        assert distance_biased(plain) is None
    # a family that says ALiBi by its position_embedding_type alone (Jais's config)
    jais = SimpleNamespace(model_type="jais", position_embedding_type="alibi")
    assert distance_biased(jais) == "ALiBi (jais)"
    assert choose_layout(layout_settings("auto", "mask"), "cpu", jais, 256).packing == "none"
    with pytest.raises(ConfigError, match="hardware.packing='prefix_shared': the model biases attention .*ALiBi"):
        choose_layout(layout_settings("prefix_shared", "mask"), "cpu", jais, 256)
    for device in ("cpu", "cuda"):
        assert choose_layout(layout_settings("auto", "mask"), device, mpt, 256).packing == "none"
        assert [c.packing for c in layout_auto.candidates(device, mpt, max_length=256)] == ["none"]
    with pytest.raises(ConfigError, match="hardware.packing='prefix_shared': the model biases attention .*ALiBi"):
        choose_layout(layout_settings("prefix_shared", "mask"), "cpu", mpt, 256)
    assert choose_layout(layout_settings("packed", "mask"), "cpu", mpt, 256).packing == "packed"  # MPT's scores match
    # Bloom and ALiBi Falcon build their bias from the 2D padding mask: packed too failed in their modelling code
    # ("too many values to unpack"); refused by key
    bloom = BloomConfig(vocab_size=64, hidden_size=32, n_head=4)
    falcon = FalconConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, alibi=True)
    for config, attention in ((bloom, "mask"), (falcon, "segments"), (falcon, "mask")):
        with pytest.raises(ConfigError, match=r"packing='packed': the model builds its ALiBi bias from .*2D padding"):
            choose_layout(layout_settings("packed", attention), "cpu", config, 256)
    # why: the same rejected response scored beside a short and a long chosen one
    torch.manual_seed(0)
    model = MptForCausalLM(mpt).eval()
    prompt, rejected = list(range(5, 15)), list(range(20, 40))
    shared = ResponseLogps(model, packing="prefix_shared", attention="mask")
    rejected_means = []
    for chosen in (list(range(40, 43)), list(range(40, 60)) * 3):
        pair = [{"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected}]
        batch = PairCollator(PAD, "prefix_shared", "mask")(pair)
        with torch.no_grad():
            rejected_means.append(float(shared(**batch).mean_logps[1]))
    assert abs(rejected_means[0] - rejected_means[1]) > 1e-2, rejected_means


def test_models_with_attention_sinks_are_packed_only_through_their_own_attention():
    """GPT-OSS adds a learned sink logit to each row's softmax (transformers passes it as ``s_aux``), which segment
    attention and FlexAttention took as a keyword and dropped: packing=auto picked prefix sharing on CPU, and the
    log-probs were another model's (under FSDP, with no set-up check, silently). Now auto keeps the padded layout,
    segment attention refuses the call, and packing_attention=mask (the model's own attention) gives the padded
    layout's log-probs."""

    from transformers import GptOssConfig, GptOssForCausalLM

    from simpo_exp import layout_auto
    from simpo_exp.config import ConfigError
    from simpo_exp.layout import attention_sinks, choose_layout

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)
    config = GptOssConfig(
        **shape, num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=512,
        pad_token_id=PAD, attn_implementation="eager", initializer_range=0.3,
    )  # fmt: skip
    assert attention_sinks(config) and attention_sinks(make_model().config) is None
    for device in ("cpu", "cuda"):
        assert choose_layout(layout_settings("auto"), device, config, 256).packing == "none"
        assert [c.packing for c in layout_auto.candidates(device, config, max_length=256)] == ["none"]
    assert choose_layout(layout_settings("auto", "mask"), "cpu", config, 256).packing == "prefix_shared"
    with pytest.raises(ConfigError, match="packing_attention='segments': the model adds the learned attention sinks"):
        choose_layout(layout_settings("packed"), "cpu", config, 256)
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 2.0)  # sinks that matter (they start at zero)
    pairs = TWO_PAIRS
    means = {}
    for packing, attention in (("none", "segments"), ("packed", "mask"), ("prefix_shared", "mask")):
        batch = PairCollator(PAD, packing, attention)(pairs)
        with torch.no_grad():
            means[packing] = ResponseLogps(model, packing=packing, attention=attention)(**batch).mean_logps
    torch.testing.assert_close(means["packed"], means["none"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(means["prefix_shared"], means["none"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not add the model's attention-sink logits"):
        ResponseLogps(model, packing="packed", attention="segments")(**PairCollator(PAD, "packed", "segments")(pairs))


def test_the_mask_layout_on_an_eager_model_wrapped_for_segments_takes_a_float_mask():
    """One eager model scored through segment attention, then through the mask layout (a caller of ResponseLogps;
    a run does not, layout_auto puts the attention back between candidates): its attention name had become the
    segment wrapper's, so the mask layout handed eager a boolean mask,
    which eager adds to its scores (log-probs 0.02 nats off here)."""
    model = make_model(attn="eager").eval()
    pairs = TWO_PAIRS

    def mean_logps(packing, attention):
        with torch.no_grad():
            batch = PairCollator(PAD, packing, attention)(pairs)
            return ResponseLogps(model, packing=packing, attention=attention)(**batch).mean_logps

    padded = mean_logps("none", "segments")
    torch.testing.assert_close(mean_logps("packed", "segments"), padded)
    assert model.config._attn_implementation.endswith(":eager")  # wrapped
    torch.testing.assert_close(mean_logps("packed", "mask"), padded, rtol=1e-5, atol=1e-5)


def test_mask_rows_padding_positions_stop_at_the_largest_real_one():
    """A mask-layout row holds two or three sequences, so it is wider than any of them; its padding positions ran
    on to the row's width. Dynamic (and longrope) RoPE choose their frequencies from the largest position id: past
    original_max_position_embeddings they scaled every sequence of the batch, which the padded layout did not."""
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    config = LlamaConfig(**small, num_key_value_heads=2, pad_token_id=PAD, max_position_embeddings=24)
    config.rope_parameters = rope
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(1, 64, (n,), generator=g).tolist()  # noqa: E731
    pairs = [
        {"prompt_input_ids": ids(10), "chosen_input_ids": ids(10), "rejected_input_ids": ids(10)},
        {"prompt_input_ids": ids(4), "chosen_input_ids": ids(3), "rejected_input_ids": ids(3)},
    ]  # every sequence within 24 positions; the packed rows are 40 and 13 wide
    with torch.no_grad():
        plain = ResponseLogps(model)(**PairCollator(PAD)(pairs)).logp_sums
        for packing in ("packed", "prefix_shared"):
            batch = PairCollator(PAD, packing=packing, attention="mask")(pairs)
            real = batch["position_ids"][batch["attention_mask"].bool()]
            assert batch["position_ids"].max() == real.max() == 19
            # the short row's padding goes on from its last real position, never back to 0 (a new sequence)
            row, kept = batch["position_ids"][1], batch["attention_mask"][1].bool()
            padding = row[~kept]
            assert padding.numel() and (padding[1:] >= padding[:-1]).all() and padding.min() >= row[kept][-1]
            packed = ResponseLogps(model, packing=packing, attention="mask")(**batch).logp_sums
            assert torch.allclose(packed, plain, atol=ATOL, rtol=0), (packing, (packed - plain).abs().max())


@pytest.mark.parametrize("packing", ["none", "packed", "prefix_shared"])
def test_a_pair_with_an_empty_prompt_is_refused_in_every_layout(packing):
    """Padded, its first response token went unscored (nothing before it to predict it from): one token short of
    the response the packed layouts refused outright."""
    pairs = [{"prompt_input_ids": [], "chosen_input_ids": [4, 5], "rejected_input_ids": [6]}]
    with pytest.raises(ValueError, match="empty prompt"):
        PairCollator(PAD, packing=packing)(pairs)


def test_padding_queries_see_only_themselves_and_a_masked_out_word_adds_no_entropy():
    """The mask attention's padding rows (group -1) see their own position (a row of a packed batch may have no
    group 0 to see, and SDPA gives NaN for an all-masked row) and no response or other padding; a vocabulary entry
    at -inf (probability 0) adds nothing to the entropy, where 0 * -inf would make it NaN."""
    from simpo_exp.logps import token_stats

    groups = torch.tensor([[0, 0, 1, 1, 2, -1, -1]])
    mask = group_mask(groups)[0, 0]
    assert mask.diagonal().all() and not mask[5:, 2:5].any() and not mask[6, 5]
    assert mask[4].tolist() == [True, True, False, False, True, False, False]  # the prompt and itself
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    _, entropy, hit = token_stats(logits, logits.log_softmax(-1), torch.tensor([0]))
    assert entropy.item() == pytest.approx(math.log(2)) and hit.item() == 1.0
    # a tie for the top logit is one hit, the first index's (as torch.argmax): not one for every tied token
    assert token_stats(logits, logits.log_softmax(-1), torch.tensor([1]))[2].item() == 0.0


def test_encoder_decoder_families_decoders_take_the_padded_layout_and_bert_style_heads_are_refused():
    """Two kinds of causal LM the packed layouts or the response head got wrong, found by scoring every family
    transformers ships against its own forward: the decoders of encoder-decoder families (BART, Marian, Pegasus, ...)
    place tokens by their learned positions whatever position_ids say (packed layouts 0.1-15 nats off, and auto picked
    them), and BERT-style decoders run a transform in their output head that the response log-probs leave out."""
    from transformers import BartConfig, BartForCausalLM, BertConfig, BertLMHeadModel

    from simpo_exp import layout_auto
    from simpo_exp.config import ConfigError
    from simpo_exp.layout import choose_layout, positions_ignored

    torch.manual_seed(0)
    bart = BartConfig(vocab_size=64, d_model=32, decoder_layers=1, encoder_layers=1, decoder_attention_heads=2,
                      encoder_attention_heads=2, decoder_ffn_dim=32, encoder_ffn_dim=32, max_position_embeddings=128,
                      pad_token_id=PAD, init_std=0.5)  # fmt: skip
    assert positions_ignored(bart) and positions_ignored(make_model().config) is None
    for device in ("cpu", "cuda"):
        assert choose_layout(layout_settings("auto", "segments"), device, bart, 64).packing == "none"
        assert [c.packing for c in layout_auto.candidates(device, bart, max_length=64)] == ["none"]
    with pytest.raises(ConfigError, match="hardware.packing='packed': the model places tokens by their column"):
        choose_layout(layout_settings("packed", "mask"), "cpu", bart, 64)
    # the refusal stands on a real gap: the packed layout scores this decoder otherwise than the padded one
    model = BartForCausalLM(bart).eval()
    pairs = random_pairs(2, vocab=64, max_prompt=6, max_response=6)
    with torch.no_grad():
        padded = ResponseLogps(model)(**PairCollator(PAD)(pairs)).logp_sums
        packed = ResponseLogps(model, packing="packed", attention="mask")(
            **PairCollator(PAD, packing="packed", attention="mask")(pairs)
        ).logp_sums
    assert not torch.allclose(padded, packed, atol=1e-3)
    bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      is_decoder=True)  # fmt: skip
    with pytest.raises(ConfigError, match="bert's output head transforms the hidden state"):
        ResponseLogps(BertLMHeadModel(bert))
