"""Log-prob, fused-layer and reference paths that no end-to-end run pins: flex attention's dropout refusal, the
token statistics over several blocks, the layer count of a multimodal config, Liger's patches put back, and the
reference cache's keys and eval mode (tests from a mutation review of logps.py, fused.py and reference.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from simpo_exp import logps
from simpo_exp.data.collate import PairCollator
from simpo_exp.logps import ResponseLogps
from tests.test_perf_paths import PAD, make_model, random_pairs


def test_flex_attention_refuses_a_model_with_attention_dropout():
    """FlexAttention has no dropout: a run with disable_dropout=false on it trained without attention dropout."""
    model = make_model().train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    batch = PairCollator(PAD, packing="packed", attention="flex")(random_pairs(2, seed=1))
    # (no_grad: on the CPU flex has no backward, which would fail first)
    with torch.no_grad(), pytest.raises(ValueError, match="packing_attention='flex' has no attention dropout"):
        ResponseLogps(model, packing="packed", attention="flex")(**batch)


def test_token_statistics_over_several_blocks_are_those_of_the_whole(monkeypatch):
    """The statistics are taken STATS_ROWS rows at a time; past the first block (512 tokens, any real batch) the
    blocks must be joined, not the first one kept."""
    torch.manual_seed(0)
    logits = torch.randn(7, 11)
    targets = torch.randint(0, 11, (7,))
    whole = logps.token_stats(logits, logits.log_softmax(-1), targets)
    monkeypatch.setattr(logps, "STATS_ROWS", 3)
    blocks = logps.token_stats(logits, logits.log_softmax(-1), targets)
    for a, b in zip(blocks, whole):
        assert a.shape == (7,)
        torch.testing.assert_close(a, b)


def test_the_segment_plan_guard_counts_the_text_models_layers(monkeypatch):
    """A multimodal config (Gemma 3, Mistral 3, Llava) has no num_hidden_layers at the top: the guard that every
    attention layer used the segment plan counted 1 layer and passed when only some did."""
    from simpo_exp.logps import SegmentPlanUnused

    model = make_model().eval()  # 2 layers
    monkeypatch.setattr(logps, "text_config", lambda config: SimpleNamespace(num_hidden_layers=3))
    batch = PairCollator(PAD, packing="packed")(random_pairs(2, seed=1))
    with torch.no_grad(), pytest.raises(SegmentPlanUnused, match="only 2 of 3 attention layers"):
        ResponseLogps(model, packing="packed")(**batch)


def test_two_models_fused_in_one_block_are_both_put_back_and_the_loss_is_never_patched(monkeypatch):
    """The policy and a second model fused in one block: the second call kept the already patched functions as
    the ones to put back, so Liger's rotary embedding and norm stayed for the rest of the process. Liger's
    cross-entropy is never patched in: the project computes its own log-probs."""
    pytest.importorskip("liger_kernel")
    import torch.nn.functional as F
    import transformers.loss.loss_utils as loss_utils
    import transformers.models.llama.modeling_llama as family
    from transformers import AutoModelForCausalLM, LlamaConfig

    from simpo_exp.fused import fuse_layers, kept_modeling_modules

    monkeypatch.setattr("simpo_exp.model.has_accelerator", lambda: True)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = LlamaConfig(**shape, num_key_value_heads=2, head_dim=8)
    rotary, norm, loss = family.apply_rotary_pos_emb, family.LlamaRMSNorm, F.cross_entropy
    with kept_modeling_modules():
        fuse_layers(AutoModelForCausalLM.from_config(config))
        fuse_layers(AutoModelForCausalLM.from_config(config))
        assert F.cross_entropy is loss and loss_utils.nn.functional.cross_entropy is loss
    assert family.apply_rotary_pos_emb is rotary and family.LlamaRMSNorm is norm


def test_the_reference_caches_keys_read_row_boundaries_and_a_weights_end():
    """Responses split otherwise across rows are other data; a weight changed in its second half is another
    model: either kept the cached reference log-probs of the first."""
    from datasets import Dataset

    from simpo_exp.reference import FINGERPRINT_VALUES, data_fingerprint, weights_fingerprint

    rows = {"prompt_input_ids": [[1, 2], [3]], "chosen_input_ids": [[4, 5], [6]], "rejected_input_ids": [[7], [8, 9]]}
    moved = rows | {"chosen_input_ids": [[4], [5, 6]]}
    assert data_fingerprint(Dataset.from_dict(rows)) != data_fingerprint(Dataset.from_dict(moved))
    model = make_model(vocab=512)
    embedding = model.get_input_embeddings().weight
    assert embedding.numel() > 2 * FINGERPRINT_VALUES
    before = weights_fingerprint(model)
    with torch.no_grad():
        embedding[embedding.shape[0] // 2 :] = 0
    assert weights_fingerprint(model) != before


def test_reference_log_probs_are_taken_without_dropout_and_the_policy_trains_on():
    """With disable_dropout=false the reference, cached or live, was scored with dropout on: noisy log-probs that
    differ from a second scoring of the same pairs. Both are the model's in eval mode; the policy trains on."""
    from accelerate import Accelerator
    from datasets import Dataset

    from simpo_exp.reference import live_reference, score

    model = make_model()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    pairs = random_pairs(3, seed=2)
    with torch.no_grad():
        expected = ResponseLogps(model.eval())(**PairCollator(PAD)(pairs)).logp_sums
    model.train()
    reference = live_reference(model)
    with torch.no_grad():
        torch.testing.assert_close(reference(**PairCollator(PAD)(pairs)).logp_sums, expected, atol=1e-5, rtol=0)
    columns = {k: [p[k] for p in pairs] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
    chosen, rejected = score(
        ResponseLogps(model), Dataset.from_dict(columns), PairCollator(PAD), 2, Accelerator(cpu=True)
    )
    torch.testing.assert_close(chosen, expected[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, expected[3:], atol=1e-5, rtol=0)
    assert model.training


def test_a_live_reference_sharing_the_lora_policy_is_scored_without_dropout():
    """``reference_mode=live`` under LoRA scores the policy itself with its adapters off: in eval mode for each
    forward (with disable_dropout=false the policy trains with dropout on, and the reference's numbers were noise,
    another on each call), the policy still training afterwards."""
    peft = pytest.importorskip("peft")

    from simpo_exp.reference import live_reference

    model = make_model(seed=1)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    batch = PairCollator(PAD)(random_pairs(3, seed=2))
    with torch.no_grad(), model.disable_adapter():
        expected = ResponseLogps(model.eval())(**batch).logp_sums
    model.train()
    reference = live_reference(model, share=True)
    first, second = reference(**batch).logp_sums, reference(**batch).logp_sums
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=0)
    assert model.training and not first.requires_grad
