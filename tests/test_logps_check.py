"""The set-up check of the run's log-probs against the model's own forward (simpo_exp/logps_check.py)."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM, MptConfig, MptForCausalLM

from simpo_exp.layout import BatchLayout
from simpo_exp.logps_check import KEEP_TOKENS, LogpsMismatch, check_logps
from tests.test_perf_paths import PAD, make_model

PAIR = {
    "prompt_input_ids": list(range(5, 50)),  # longer than KEEP_TOKENS: cut to its end
    "chosen_input_ids": list(range(10, 30)),
    "rejected_input_ids": list(range(30, 62)) + [7] * 8,
}
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize(
    "layout",
    [
        BatchLayout("none"),
        BatchLayout("packed", "segments"),
        BatchLayout("prefix_shared", "segments"),
        BatchLayout("packed", "mask"),
        BatchLayout("prefix_shared", "mask", chunk_size=16),
    ],
    ids=str,
)
def test_every_cpu_layout_gives_the_models_own_log_probs(layout):
    model = make_model()
    record = check_logps(model, layout, PAIR, PAD, "cpu", nullcontext)
    assert record["gap"] < 1e-5 and record["tolerance"] == 1e-3, record
    assert model.training  # put back in the mode it came in


def test_a_family_whose_logit_factor_is_not_reproduced_stops_the_run(monkeypatch):
    """Cohere multiplies its logits by logit_scale (0.0625 by default); without that entry in LOGIT_SCALES every
    log-prob was taken at 16 times the temperature, silently. A family the table misses is now named at set-up."""
    import simpo_exp.logps as logps

    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(**SMALL, num_key_value_heads=2, pad_token_id=PAD)).train()
    assert check_logps(model, BatchLayout("prefix_shared"), PAIR, PAD, "cpu", nullcontext)["gap"] < 1e-5
    monkeypatch.setattr(logps, "LOGIT_SCALES", {k: v for k, v in logps.LOGIT_SCALES.items() if k != "cohere"})
    for layout in (BatchLayout("none"), BatchLayout("packed")):
        with pytest.raises(LogpsMismatch, match=r"model_type='cohere'.*hardware.check_logps=false") as caught:
            check_logps(model, layout, PAIR, PAD, "cpu", nullcontext)
        assert ("its head is the cause" in str(caught.value)) == (layout.packing == "none")


def test_a_layout_the_models_attention_does_not_fit_is_caught_too():
    """MPT's ALiBi reads the distance between columns, which prefix sharing moves (choose_layout refuses it by
    name; the check catches such a case where no rule knows it)."""
    mpt = MptConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=256, initializer_range=0.3)
    torch.manual_seed(0)
    model = MptForCausalLM(mpt)
    assert check_logps(model, BatchLayout("packed", "mask"), PAIR, PAD, "cpu", nullcontext)["gap"] < 1e-5
    with pytest.raises(LogpsMismatch, match="model_type='mpt'"):
        check_logps(model, BatchLayout("prefix_shared", "mask"), PAIR, PAD, "cpu", nullcontext)


def test_16_bit_weights_take_the_16_bit_tolerance_and_an_empty_response_is_not_checked():
    model = make_model().to(torch.bfloat16)
    record = check_logps(model, BatchLayout("packed"), PAIR, PAD, "cpu", nullcontext)
    assert record["tolerance"] == 5e-2 and record["gap"] <= 5e-2
    assert "skipped" in check_logps(
        model, BatchLayout("none"), PAIR | {"chosen_input_ids": []}, PAD, "cpu", nullcontext
    )
    assert KEEP_TOKENS < len(PAIR["prompt_input_ids"])


def test_each_familys_logit_factor_is_read_from_its_own_key():
    """The factor under each family's own key and direction (multiplied or divided), read without building a model:
    the slow test that builds each family was the only one to catch a family's entry removed."""
    from simpo_exp.logps import logit_scale

    assert logit_scale(SimpleNamespace(model_type="cohere_compass_text", logit_scale=0.25)) == 0.25
    assert logit_scale(SimpleNamespace(model_type="cohere_compass_text", logit_scale=None)) is None
    assert logit_scale(SimpleNamespace(model_type="inkling_text", logits_mup_width_multiplier=4.0)) == 0.25
    assert logit_scale(SimpleNamespace(model_type="falcon_h1", lm_head_multiplier=0.25)) == 0.25
    assert logit_scale(SimpleNamespace(model_type="granite", logits_scaling=4.0)) == 0.25
    assert logit_scale(SimpleNamespace(model_type="minicpm3", logits_scaling=4.0)) == 0.25
    assert logit_scale(SimpleNamespace(model_type="hyperclovax", logits_scaling=4.0)) == 4.0
    assert logit_scale(SimpleNamespace(model_type="llama")) is None


def test_llama4s_text_model_is_scored_through_its_decoder_stack():
    """Llama4ForCausalLM.get_decoder() gives the model itself back (its base prefix is language_model, its stack
    model): ResponseLogps failed with "no attribute 'last_hidden_state'"."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from simpo_exp.logps import decoder_of

    config = Llama4TextConfig(**SMALL, intermediate_size_mlp=64, num_key_value_heads=2, head_dim=8, num_local_experts=2)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config)
    assert model.get_decoder() is model and decoder_of(model) is model.model
    assert check_logps(model, BatchLayout("none"), PAIR, PAD, "cpu", nullcontext)["gap"] < 1e-5


def test_final_softcaps_under_each_familys_key_and_inside_a_text_config():
    """ResponseLogps read the final softcap as Gemma 2 names it alone: RecurrentGemma's logits_soft_cap and xLSTM's
    output_logit_soft_cap were skipped (every log-prob another model's), and so was a multimodal Gemma's, whose cap
    sits in its text_config."""
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config

    from simpo_exp.logps import final_softcap

    xlstm = AutoConfig.for_model(
        "xlstm", vocab_size=64, hidden_size=32, embedding_dim=32, num_blocks=1, num_heads=4, output_logit_soft_cap=2.0
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(xlstm)
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)  # logits past the cap, where it changes them
    assert check_logps(model, BatchLayout("none"), PAIR, PAD, "cpu", nullcontext)["gap"] < 1e-5
    assert final_softcap(SimpleNamespace(model_type="recurrent_gemma", logits_soft_cap=30.0)) == 30.0
    assert final_softcap(Gemma3Config(text_config={"final_logit_softcapping": 2.0})) == 2.0
    assert final_softcap(make_model().config) is None


def off_by(monkeypatch, shifts: dict) -> None:
    """The model's own mean log-prob of the chosen (0) or rejected (1) response, shifted by ``shifts``."""
    import simpo_exp.logps_check as check

    real, calls = check.own_mean_logp, iter(range(2))
    monkeypatch.setattr(check, "own_mean_logp", lambda *a: real(*a) + shifts.get(next(calls), 0.0))


@pytest.mark.parametrize(
    "shifts", [{0: float("nan")}, {1: float("nan")}, {1: 0.5}], ids=["nan-chosen", "nan-rejected", "rejected-only"]
)
def test_a_nan_or_a_rejected_only_gap_stops_the_run(monkeypatch, shifts):
    """The gap is the larger of the two responses', and a NaN one (a log-prob gone NaN) is a mismatch too, on either
    side (Python's max() kept a number met before a NaN: a NaN on the rejected side passed)."""
    off_by(monkeypatch, shifts)
    with pytest.raises(LogpsMismatch, match="model_type='llama'"):
        check_logps(make_model(), BatchLayout("none"), PAIR, PAD, "cpu", nullcontext)


def test_a_16_bit_autocast_over_float32_weights_takes_the_16_bit_tolerance():
    """The GPU presets: float32 weights under a bf16 autocast, where two ways of summing differ by bf16's rounding."""
    model = make_model()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    record = check_logps(model, BatchLayout("packed"), PAIR, PAD, "cpu", autocast, torch.bfloat16)
    assert record["tolerance"] == 5e-2 and record["gap"] <= 5e-2
    assert check_logps(model, BatchLayout("packed"), PAIR, PAD, "cpu", nullcontext, None)["tolerance"] == 1e-3


def test_a_model_with_dropout_on_is_checked_without_it():
    """disable_dropout=false: the model trains with dropout, and the check must not compare two noisy forwards."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=PAD, attention_dropout=0.5)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()
    record = check_logps(model, BatchLayout("none"), PAIR, PAD, "cpu", nullcontext)
    assert record["gap"] < 1e-5 and model.training


def test_a_16_bit_model_with_some_float32_weights_gets_the_16_bit_tolerance_and_its_own_logps_in_float32():
    """float32 norms or LoRA adapters beside bf16 weights compute in bf16 all the same (the float32 tolerance gave a
    false mismatch); the model's own reference log-probs are taken from float32 logits."""
    from simpo_exp.logps_check import own_mean_logp, precision

    mixed = make_model(seed=3).to(torch.bfloat16)
    mixed.model.norm.float()
    assert precision(mixed, None) == "16-bit" and precision(make_model(), None) == "float32"
    assert precision(make_model(), torch.bfloat16) == "16-bit"
    model = make_model(seed=3).to(torch.bfloat16)
    prompt, response = [3, 4, 5], [6, 7, 8, 9]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, 2:-1].float()
    want = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).mean().item()
    assert own_mean_logp(model, prompt, response, "cpu") == pytest.approx(want, abs=1e-6)
