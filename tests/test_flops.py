"""The FLOP count behind train/mfu: hand-computed cases, the layouts' attention masks, and torch's own
FLOP counter on real forward and backward passes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from simpo_exp.data import PairCollator
from simpo_exp.flops import FlopSpec, attention_pairs, flop_spec, peak_flops
from simpo_exp.logps import ResponseLogps, group_mask

PAIRS = [
    {"prompt_input_ids": [5, 6], "chosen_input_ids": [7], "rejected_input_ids": [8, 9]},
    {"prompt_input_ids": [5, 6, 7, 8], "chosen_input_ids": [9, 10, 11], "rejected_input_ids": [12]},
]


def test_attention_pairs_by_hand():
    # pair 1: prompt 2, chosen 1, rejected 2. Separate sequences of 3 and 4 tokens: 6 + 10 pairs.
    # Prefix-shared: prompt 1 + 2, chosen 3 (2 prompt keys + itself), rejected 3 + 4 = 13.
    batch = PairCollator(0, packing="prefix_shared")(PAIRS[:1])
    assert attention_pairs(batch, "prefix_shared") == 13
    assert attention_pairs(PairCollator(0, packing="packed")(PAIRS[:1]), "packed") == 16
    assert attention_pairs(PairCollator(0)(PAIRS[:1]), "none") == 16


@pytest.mark.parametrize("packing", ["packed", "prefix_shared"])
def test_attention_pairs_equal_the_visible_entries_of_the_layout_mask(packing):
    batch = PairCollator(0, packing=packing, attention="mask")(PAIRS)
    mask = group_mask(batch["attn_groups"])[:, 0]  # [R, T, T], True = the query sees the key
    real = batch["attention_mask"].bool()
    visible = (mask & real[:, :, None] & real[:, None, :]).sum()
    assert attention_pairs(batch, packing) == int(visible)
    # the same count from the one-row segment layout
    assert attention_pairs(PairCollator(0, packing=packing)(PAIRS), packing) == int(visible)


def test_local_attention_layers_see_their_window_or_chunk_alone():
    """A sliding-window layer's query sees its last w keys (itself included: transformers' mask), a chunked layer's
    the earlier keys of its chunk; every layer was counted as full causal attention, so a model of local or linear
    attention layers (Gemma-2/3, gpt-oss, Qwen3-Next, Jamba) read an MFU too high, more so the longer its rows."""
    from transformers.masking_utils import chunked_overlay, sliding_window_overlay

    from simpo_exp.flops import _visible

    assert _visible(5, ("window", 2)) == 1 + 2 + 2 + 2 + 2 and _visible(5, ("chunk", 2)) == (1 + 2) * 2 + 1
    assert _visible(2, ("window", 4)) == 3 == _visible(2, ("chunk", 4))  # shorter than its span: all of it
    # against transformers' own masks, counted entry by entry, and through the layouts
    for local, overlay in ((("window", 3), sliding_window_overlay(3)), (("chunk", 3), chunked_overlay(3, [0]))):
        seen = lambda n: sum(bool(overlay(0, 0, q, k)) for q in range(n) for k in range(q + 1))  # noqa: E731
        assert [_visible(n, local) for n in range(9)] == [seen(n) for n in range(9)], local
        assert [int(_visible(torch.tensor(n), local)) for n in range(9)] == [seen(n) for n in range(9)]
        # PAIRS: sequences of 3 and 4, and 7 and 5 tokens; prefix sharing computes each prompt (2, 4) once
        by_hand = seen(3) + seen(4) + seen(7) + seen(5)
        assert attention_pairs(PairCollator(0)(PAIRS), "none", local) == by_hand
        assert attention_pairs(PairCollator(0, packing="packed")(PAIRS), "packed", local) == by_hand
        shared = PairCollator(0, packing="prefix_shared")(PAIRS)
        assert attention_pairs(shared, "prefix_shared", local) == by_hand - seen(2) - seen(4)
    spec = FlopSpec(0, 0, 0, 0, layers=1, attention_width=2, local=(("window", 3, 2), ("chunk", 3, 1)))
    batch = PairCollator(0)(PAIRS)
    window, chunk = (attention_pairs(batch, "none", local) for local in (("window", 3), ("chunk", 3)))
    assert spec.local_pairs(batch, "none") == 2 * window + chunk
    assert spec.step_flops(0, 0, 20, spec.local_pairs(batch, "none")) == 12 * 2 * (20 + 2 * window + chunk)
    # the full layers' pairs counted in each full layer, the local ones already summed over theirs
    assert FlopSpec(0, 0, 0, 0, layers=3, attention_width=2).step_flops(0, 0, 20, 7) == 12 * 2 * (3 * 20 + 7)


@pytest.mark.parametrize(
    "model_type, overrides, full, local",
    [
        ("llama", {}, 32, ()),
        ("gemma2", {}, 13, (("window", 4096, 13),)),  # local and global layers in turn
        ("gemma3_text", {}, 4, (("window", 4096, 22),)),  # five local layers to a global one
        ("gpt_oss", {}, 18, (("window", 128, 18),)),
        ("llama4_text", {}, 12, (("chunk", 8192, 36),)),
        ("qwen3_next", {}, 12, ()),  # 36 layers of linear attention
        ("jamba", {}, 4, ()),  # 28 Mamba layers
        ("mistral", {}, 0, (("window", 4096, 32),)),  # v0.1: every layer, no layer_types
        ("mistral", {"sliding_window": None}, 32, ()),  # v0.2 on
        ("mistral", {"use_sliding_window": False}, 32, ()),  # a window given and switched off (Qwen2's old way)
        (
            "gpt_neo",
            {"attention_types": [[["global", "local", "local"], 1]], "num_layers": 3},
            1,
            (("window", 256, 2),),
        ),
    ],
)
def test_each_layer_kind_is_counted_as_it_attends(model_type, overrides, full, local):
    from transformers import AutoConfig

    from simpo_exp.flops import attention_layers

    assert attention_layers(AutoConfig.for_model(model_type, **overrides)) == (full, local)


def test_step_flops_formula():
    spec = FlopSpec(
        body_params=1000, body_trainable=1000, head_params=200, head_trainable=True, layers=2, attention_width=8
    )
    assert (
        spec.step_flops(tokens=10, response_tokens=4, attention_pairs=20)
        == 6 * 1000 * 10 + 6 * 200 * 4 + 12 * 2 * 8 * 20
    )
    frozen = FlopSpec(1000, 100, 200, False, 2, 8)  # LoRA-like: 10% of the body trains, the head is frozen
    assert frozen.step_flops(10, 4, 0) == (4 * 1000 + 2 * 100) * 10 + 4 * 200 * 4
    # a live reference's forward: 2P a token in the body, 2P a response token in the head, 4 x layers x width a pair
    live = FlopSpec(1000, 1000, 200, True, 2, 8, live_reference=True)
    assert live.step_flops(10, 4, 20) == spec.step_flops(10, 4, 20) + 2 * 1000 * 10 + 2 * 200 * 4 + 4 * 2 * 8 * 20


# the tiny models' shape; eager attention, whose L x L scores torch's FLOP counter sees
SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attn_implementation="eager",
)


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=tie))


def counted_and_expected(model) -> tuple[int, float]:
    """(torch's FLOP counter, the formula) over one forward and backward of a pair of two 35-token sequences (no
    padding). Eager attention computes all L x L scores (no causal saving), so the formula is given L^2 pairs."""
    spec, policy = flop_spec(model), ResponseLogps(model)
    pair = {
        "prompt_input_ids": list(range(3, 23)),
        "chosen_input_ids": list(range(30, 45)),
        "rejected_input_ids": list(range(50, 65)),
    }
    batch = PairCollator(0)([pair])
    with FlopCounterMode(display=False) as counter:
        out = policy(**batch)
        out.logp_sums.sum().backward()
    tokens, response = int(batch["attention_mask"].sum()), int(out.num_tokens.sum())
    return counter.get_total_flops(), spec.step_flops(tokens, response, attention_pairs=2 * 35 * 35)


@pytest.mark.parametrize("lora", [False, True])
def test_formula_matches_torch_flop_counter(lora):
    model = _tiny_llama(tie=False)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        # As under gradient checkpointing. Without it autograd also skips the first layer's input
        # gradients (nothing below them trains): the formula then overcounts by about 1/layers of 2P.
        model.enable_input_require_grads()
    spec = flop_spec(model)
    if lora:
        assert 0 < spec.body_trainable < spec.body_params and not spec.head_trainable
    else:
        assert spec.body_trainable == spec.body_params and spec.head_trainable
    assert spec.head_params == 300 * 64 and spec.layers == 2 and spec.attention_width == 64
    counted, expected = counted_and_expected(model)
    # the formula also counts the norms' few parameters as matmul work; the counter sees matmuls only
    assert counted == pytest.approx(expected, rel=0.01)


def test_a_live_references_forward_is_counted_as_torch_counts_it():
    """reference_mode=live runs a frozen copy forward in every step, inside the timed step: its work was left out
    of the MFU (6 of 8 parts of a fully trained step's, 4 of 6 under LoRA). torch's counter over the policy's
    forward and backward and the reference's forward agrees with the formula; a cached reference is no step's work."""
    from simpo_exp.reference import CachedReference
    from simpo_exp.train import step_work

    model, reference = _tiny_llama(tie=False), _tiny_llama(tie=False)
    spec = step_work(model, reference)
    assert spec.live_reference and spec == FlopSpec(**{**vars(flop_spec(model)), "live_reference": True})
    assert not step_work(model, None).live_reference
    assert not step_work(model, object.__new__(CachedReference)).live_reference
    batch = PairCollator(0)([{"prompt_input_ids": list(range(3, 23)), "chosen_input_ids": list(range(30, 45)),
                              "rejected_input_ids": list(range(50, 65))}])  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        out = ResponseLogps(model)(**batch)
        out.logp_sums.sum().backward()
        with torch.no_grad():
            ResponseLogps(reference)(**batch)
    tokens, response = int(batch["attention_mask"].sum()), int(out.num_tokens.sum())
    assert counter.get_total_flops() == pytest.approx(spec.step_flops(tokens, response, 2 * 35 * 35), rel=0.01)


def test_multi_head_latent_attention_counts_its_query_key_and_value_widths():
    """DeepSeek-V2/V3 and Kimi-K2 (multi-head latent attention) say ``head_dim`` for the rotary part alone (64): the
    attention term took it as the width of QK^T and AV, 2.5x below DeepSeek-V3's (192-wide queries and keys, 128-wide
    values). torch's counter on a tiny one agrees with the formula now."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        **{**SHAPE, "num_key_value_heads": 4}, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = DeepseekV3ForCausalLM(config)
    assert flop_spec(model).attention_width == 4 * (48 + 32) / 2  # heads x (qk + v) / 2, not heads x head_dim (64)
    counted, expected = counted_and_expected(model)
    assert counted == pytest.approx(expected, rel=0.01)
    # a config that gives the two parts of the query-key width alone (no qk_head_dim), and one without value heads
    # of their own
    from types import SimpleNamespace

    from simpo_exp.flops import attention_head_width

    parts = SimpleNamespace(num_attention_heads=4, head_dim=16, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    assert attention_head_width(parts) == (48 + 32) / 2
    assert attention_head_width(SimpleNamespace(num_attention_heads=4, hidden_size=64)) == 16


def test_lora_on_the_output_head_counts_its_frozen_weight_without_a_weight_gradient():
    """With lm_head among LoRA's targets the head was counted as trainable whole (6P a response token, the frozen
    V x H weight included); its weight gradient is its adapters' alone. torch's FLOP counter agrees."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(tie=False), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    model.enable_input_require_grads()
    spec = flop_spec(model)
    assert 0 < spec.head_trainable < 0.1  # the adapters' share: 4 x (64 + 300) of 300 x 64 + that
    counted, expected = counted_and_expected(model)
    assert counted == pytest.approx(expected, rel=0.01)


def test_a_multimodal_models_language_part_is_counted():
    """Gemma-3 4B-27B load as a multimodal model whose sizes are in ``text_config``: the FLOP count (taken at every
    run's set-up) stopped the run with an AttributeError on the top-level config's hidden_size, and its vision tower
    and projector, which a text pair never runs, would have counted as work."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

    text = Gemma3TextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    spec = flop_spec(model)
    # the text config's layer kinds: Gemma-3's first five layers of six are local (sliding window 4096)
    assert (spec.layers, spec.local, spec.attention_width) == (0, (("window", 4096, 2),), 16)
    language = model.model.language_model
    assert spec.body_params == sum(p.numel() for p in language.parameters()) - language.embed_tokens.weight.numel()


def test_tied_head_is_not_counted_twice():
    spec = flop_spec(_tiny_llama(tie=True))
    model = _tiny_llama(tie=True)
    total = sum(p.numel() for p in model.parameters())  # the shared matrix once
    assert spec.body_params + spec.head_params == total


def test_peak_flops_lookup(monkeypatch):
    assert peak_flops(torch.device("cpu"), "no", None) is None
    assert peak_flops(torch.device("cpu"), "no", 2.5) == 2.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0), "bf16", None) == pytest.approx(989.4e12)
    assert peak_flops(torch.device("cuda", 0), "no", None) is None  # fp32 has another peak: no guess
    assert peak_flops(torch.device("cuda", 0), "fp16", None) == pytest.approx(989.4e12)  # fp16's dense peak is bf16's
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda", 0), "bf16", None) == pytest.approx(756e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(torch.device("cuda", 0), "bf16", None) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H800 PCIe")
    assert peak_flops(torch.device("cuda", 0), "bf16", None) == pytest.approx(756e12)  # not the SXM H800's
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3 MIG 1g.10gb")
    assert peak_flops(torch.device("cuda", 0), "bf16", None) is None  # a slice: its share of the peak unknown


def test_weights_that_compute_in_bf16_without_autocast_are_held_against_the_bf16_peak():
    """mixed_precision=no with bf16 weights (master_weights=model, LoRA on a bf16 base): the products run in bf16,
    and no MFU was reported; float32 weights without autocast keep no guess."""
    from simpo_exp.flops import matmul_precision

    model = _tiny_llama(tie=False)
    assert matmul_precision("bf16", model) == "bf16" and matmul_precision("no", model) == "no"
    assert matmul_precision("no", model.to(torch.bfloat16)) == "bf16"
    assert matmul_precision("no", model.to(torch.float16)) == "fp16"
    model.to(torch.bfloat16).lm_head.float()  # a float32 head beside a bf16 body: most of the weights decide
    assert matmul_precision("no", model) == "bf16"
    model.model.float()
    assert matmul_precision("no", model) == "no"
    # by elements, not tensors: LoRA's many small float32 adapters beside a bf16 base
    lora_like = torch.nn.Sequential(torch.nn.Linear(512, 512).bfloat16(), *[torch.nn.Linear(2, 2) for _ in range(4)])
    assert matmul_precision("no", lora_like) == "bf16"


def test_zero3_partitioned_parameters_are_counted_whole():
    """Under DeepSpeed ZeRO-3 each process holds empty local tensors and the full size as ``ds_numel``:
    the FLOP count must come out as for the whole model, not as zero."""
    whole = flop_spec(_tiny_llama(tie=False))
    model = _tiny_llama(tie=False)
    for p in model.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0, dtype=p.dtype)
    assert flop_spec(model) == whole and whole.body_params > 0


def test_a_gpu_whose_name_contains_another_is_matched_by_its_own(monkeypatch):
    """'NVIDIA L40' contains 'L4': it was given the L4's 121 TFLOP/s instead of its own 181."""
    import torch

    from simpo_exp.flops import peak_flops

    for name, tflops in (
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA H200 NVL", 835.0),  # before the SXM H200's 989.4, which its name contains
        ("NVIDIA GB200", 2500.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H800", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A800-SXM4-80GB", 312.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA RTX A1000 6GB Laptop GPU", None),  # contains "A100" but is not one: whole words only
        ("NVIDIA RTX A6000", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda", 0), "bf16", None) == (tflops and tflops * 1e12), name


def test_a_mixture_of_experts_counts_the_experts_a_token_runs():
    """Every expert's weights were counted as work for every token: a tiny Mixtral (8 experts, top 2) came out
    3.5x torch's FLOP counter, and MFU as much too high (Mixtral 8x7B: 3.7x, Qwen3-30B-A3B: 11x)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    # eager experts: matmuls torch's counter sees (a grouped kernel hides them from it)
    config = MixtralConfig(**SHAPE, num_local_experts=8, num_experts_per_tok=2, experts_implementation="eager")
    counted, expected = counted_and_expected(MixtralForCausalLM(config))
    assert counted == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize(
    "make, share",
    [
        (lambda t: t.Qwen3MoeConfig(num_experts=128, num_experts_per_tok=8), 0.0625),
        (lambda t: t.DeepseekV3Config(n_routed_experts=256, num_experts_per_tok=8), 0.03125),
        (lambda t: t.MixtralConfig(num_local_experts=8, num_experts_per_tok=2), 0.25),
        (lambda t: t.LlamaConfig(), 1.0),
    ],
)
def test_each_moe_familys_expert_count_and_its_shared_experts(make, share):
    """Qwen3-MoE and OLMoE name their experts num_experts, DeepSeek n_routed_experts (Mixtral num_local_experts);
    the shared experts every token runs, and the router, count whole: only a module named experts is routed."""
    import transformers

    from simpo_exp.flops import expert_share, routed_expert

    assert expert_share(make(transformers)) == share
    assert routed_expert("model.layers.0.mlp.experts.gate_up_proj")
    assert routed_expert("model.layers.0.block_sparse_moe.experts.3.w1.weight")
    for name in ("mlp.shared_experts.gate_proj.weight", "mlp.shared_expert.up_proj.weight", "mlp.gate.weight"):
        assert not routed_expert(f"model.layers.0.{name}"), name


def test_attention_width_follows_a_head_dim_of_its_own():
    """Gemma 7B's heads are 256 wide with 16 of them over a hidden size of 3072: the attention FLOPs go by
    heads x head_dim (4096), not the hidden size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    small = dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = LlamaForCausalLM(LlamaConfig(**small, num_key_value_heads=4, head_dim=32))
    assert flop_spec(model).attention_width == 128
