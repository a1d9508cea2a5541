"""The table of methods (simpo_exp/methods.py) against everything that depends on it: one conf/loss file
per entry and no other, each composing and validating; the README's table of methods; the config keys
an entry reads; and every entry wired to a loss that runs."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch

from simpo_exp.config import Config, ConfigError, to_config
from simpo_exp.methods import METHODS, OWN_KEYS, REFERENCE_METHODS, TABLE, preference_loss
from simpo_exp.tracking import batch_metrics
from tests.conftest import ROOT, options


def test_every_entry_has_a_loss_preset_and_every_preset_an_entry():
    assert sorted(TABLE) == options("loss")


@pytest.mark.parametrize("name", METHODS)
def test_each_loss_preset_composes_validates_and_names_its_method(compose, name):
    cfg = to_config(compose(f"loss={name}"))
    assert cfg.method == name
    assert (name in REFERENCE_METHODS) == TABLE[name].reference


def test_a_loss_preset_states_its_method_and_no_key_its_method_does_not_read():
    """A preset may set the method's own keys (and beta, sft_weight), never another method's."""
    for name in METHODS:
        text = (ROOT / "conf" / "loss" / f"{name}.yaml").read_text()
        assert re.search(rf"^method: {re.escape(name)}$", text, re.M), name
        for key in OWN_KEYS:
            if re.search(rf"^{key}:", text, re.M):
                assert key in TABLE[name].reads, (name, key)


@pytest.mark.parametrize("name", METHODS)
def test_the_keys_an_entry_reads_are_config_keys_and_loss_arguments(name):
    m = TABLE[name]
    config_keys = {f.name for f in dataclasses.fields(Config)}
    params = inspect.signature(m.loss).parameters
    for key, arg in m.reads.items():
        assert key in config_keys, (name, key)
        assert arg in params, (name, arg)
    assert m.on in ("mean", "sum") and m.logps in ("mean", "sum")
    assert ".. math::" in (m.loss.__doc__ or ""), f"{m.loss.__name__}: formula in the docstring"


@pytest.mark.parametrize("name", METHODS)
def test_each_entry_runs_its_loss_with_gradients(name):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 5, 2])
    sums = (-torch.rand(2, 3, generator=g, dtype=torch.float64) * lengths).requires_grad_()
    refs = -torch.rand(2, 3, generator=g, dtype=torch.float64) * lengths
    settings = dict(
        beta=2.0, gamma_beta_ratio=0.5, loss_type="sigmoid", label_smoothing=0.0, rdpo_alpha=0.1, alphapo_alpha=0.25
    )
    out = preference_loss(name, sums[0], sums[1], lengths, lengths + 1, refs[0], refs[1], **settings)
    assert out.losses.shape == (3,) and torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    assert torch.isfinite(sums.grad).all() and sums.grad.abs().sum() > 0
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("name", METHODS)
def test_metric_rules_come_from_the_entry(name):
    m, names = TABLE[name], batch_metrics((name,))
    assert ("logits/chosen" in names) == m.logits
    assert set(m.extra_metrics) <= set(names)
    if m.stats is not None:
        assert set(m.stats(torch.tensor([-0.5]), torch.tensor([-1.0]))) == set(m.extra_metrics)


@pytest.mark.parametrize(
    "override,key",
    [
        ("alphapo_alpha=0.5", "alphapo_alpha"),  # SimPO does not read AlphaPO's alpha
        ("rdpo_alpha=0.1", "rdpo_alpha"),
    ],
)
def test_a_key_the_method_does_not_read_is_refused_naming_it(compose, override, key):
    with pytest.raises(ConfigError, match=rf"{key}=.*method='simpo' does not read it \(read by"):
        to_config(compose(override))


def test_keys_are_accepted_by_the_methods_that_read_them(compose):
    assert to_config(compose("loss=alphapo", "alphapo_alpha=-0.5")).alphapo_alpha == -0.5
    assert to_config(compose("loss=alphapo", "label_smoothing=0.1")).label_smoothing == 0.1
    assert to_config(compose("loss=simpo", "loss_type=hinge")).loss_type == "hinge"
    for loss, override in (
        ("dpo", "loss_type=hinge"),
        ("orpo", "label_smoothing=0.1"),
        ("simper", "label_smoothing=0.1"),
        ("alphapo", "loss_type=hinge"),
        ("dpo", "alphapo_alpha=0.3"),
    ):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            to_config(compose(f"loss={loss}", override))


@pytest.mark.parametrize("name,loss", [("dpo", "dpo_loss"), ("ln-dpo", "dpo_loss"), ("cpo", "cpo_loss")])
def test_label_smoothing_reaches_the_methods_that_read_it(compose, name, loss):
    """Conservative DPO (and LN-DPO's, CPO's): label_smoothing goes from the config to the loss. Its entry's keys
    left without it, the config refused it (or the loss ran unsmoothed), and no test said so."""
    from simpo_exp import losses

    assert to_config(compose(f"loss={name}", "label_smoothing=0.2")).label_smoothing == 0.2
    sums_c, sums_r = torch.tensor([-6.0, -3.0], dtype=torch.float64), torch.tensor([-10.0, -2.0], dtype=torch.float64)
    lengths, ref_c, ref_r = torch.tensor([3, 2]), sums_c + 1, sums_r - 1
    got = preference_loss(name, sums_c, sums_r, lengths, lengths, ref_c, ref_r, beta=0.1, label_smoothing=0.2)
    plain = preference_loss(name, sums_c, sums_r, lengths, lengths, ref_c, ref_r, beta=0.1)
    per = (lambda x: x / lengths) if name == "ln-dpo" else (lambda x: x)  # LN-DPO: on mean log-probs
    args = (per(sums_c), per(sums_r)) + ((per(ref_c), per(ref_r)) if name != "cpo" else ())
    torch.testing.assert_close(got.losses, getattr(losses, loss)(*args, beta=0.1, label_smoothing=0.2).losses)
    assert not torch.allclose(got.losses, plain.losses)  # the smoothing changed the number


def readme_rows() -> dict[str, list[str]]:
    """The README's table of methods: method name -> its cells."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Baselines", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 5:
            rows[cells[0].strip("`")] = cells
    return rows


def test_readme_table_of_methods_matches_the_table():
    rows = readme_rows()
    assert not set(TABLE) - set(rows), f"README's table of methods has no row for {sorted(set(TABLE) - set(rows))}"
    assert not set(rows) - set(TABLE), (
        f"README's table of methods has rows for no method: {sorted(set(rows) - set(TABLE))}"
    )
    for name, (_, counterpart, logps, _rewards, logits, *_) in rows.items():
        m = TABLE[name]
        assert counterpart == m.counterpart, name
        assert logps == m.logps, name
        assert (logits == "over response tokens") == m.logits, name


def test_the_readmes_lists_of_methods_and_of_their_own_keys_are_whole():
    """The config-group table's ``loss`` row, the baselines' ``loss=...`` line and the keys only some methods read:
    written by hand, they were left behind by a method added to the table."""
    text = (ROOT / "README.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| `loss` |")]
    assert set(re.findall(r"`([a-z-]+)`", row.split("|")[2])) == set(METHODS), row
    (line,) = re.findall(r"`loss=([a-z|-]+)`", text.split("## Baselines", 1)[1])
    assert {"simpo", *line.split("|")} == set(METHODS), line
    sentence = text.split("A key only some methods read", 1)[1].split("is refused", 1)[0]
    assert set(re.findall(r"`([a-z_]+)(?:=[a-z]+)?`", sentence)) >= set(OWN_KEYS), sentence


def test_a_reference_method_without_either_reference_side_or_an_unknown_method_is_named():
    """A DPO-family loss given one reference side alone failed inside the loss (a TypeError on None); an unknown
    method is refused naming it and the allowed ones."""
    s, n = torch.tensor([-3.0, -4.0]), torch.tensor([3, 4])
    for method in REFERENCE_METHODS:
        for ref in ((None, s), (s, None)):
            with pytest.raises(ValueError, match=rf"method='{method}' needs reference log-probs"):
                preference_loss(method, s, s, n, n, *ref, beta=0.1)
    with pytest.raises(ValueError, match=r"method='smipo': allowed values are .*'simpo'"):
        preference_loss("smipo", s, s, n, n, beta=0.1)
