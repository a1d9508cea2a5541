"""Baseline losses against hand-computed values, and the reference log-prob cache."""

import contextlib
import json
import logging
import math
import re
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from simpo_exp.losses import (
    _log1m_exp,
    alphapo_loss,
    cpo_loss,
    dpo_loss,
    ipo_loss,
    orpo_loss,
    rdpo_loss,
    simper_loss,
    simpo_loss,
)
from simpo_exp.methods import preference_loss
from tests.runs import run_module
from tests.test_run import simpo

# a few steps on a small synthetic set, no intermediate evals or W&B: runs whose keys and values are compared
SHORT = [
    "max_steps=3",
    "eval_steps=0",
    "eval_on_start=false",  # only the final eval's numbers and the summary's keys are compared
    "num_generations=0",
    "logger=none",
    "dataset.synthetic.num_train=64",
    "dataset.synthetic.num_test=16",
]


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x):
    return math.log1p(math.exp(-x))  # -log sigmoid(x)


def test_dpo():
    out = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    assert out.losses.item() == pytest.approx(0.5981388693815918, abs=1e-12)  # log(1 + e^-0.2)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.1, -0.1))
    smoothed = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, label_smoothing=0.2)
    assert smoothed.losses.item() == pytest.approx(0.8 * softplus(0.2) + 0.2 * softplus(-0.2), abs=1e-12)


def test_ipo():
    # h = (-1 - -1.5) - (-2 - -1.5) = 1 ; (1 - 1/(2*0.1))^2 = 16
    out = ipo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    assert out.losses.item() == pytest.approx(16.0)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.05, -0.05))


def test_rdpo():
    # z = 0.1*(1) - 0.1*(-1) + 0.05*(10 - 5) = 0.45
    out = rdpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), t(10.0), t(5.0), beta=0.1, alpha=0.05)
    assert out.losses.item() == pytest.approx(0.4932489459974549, abs=1e-12)
    assert out.losses.item() == pytest.approx(softplus(0.45), abs=1e-12)


def test_cpo():
    out = cpo_loss(t(-10.0), t(-12.0), beta=0.1)
    assert out.losses.item() == pytest.approx(0.5981388693815918, abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-1.0, -1.2))


def test_orpo():
    log_odds = 0.5 - (math.log(1 - math.exp(-0.5)) - math.log(1 - math.exp(-1.0)))  # = 0.974077...
    out = orpo_loss(t(-0.5), t(-1.0), beta=0.1)
    assert out.losses.item() == pytest.approx(0.1 * softplus(log_odds), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.0320290, abs=1e-6)
    assert torch.isfinite(orpo_loss(t(-1e-9), t(-1.0), beta=0.1).losses).all()  # mean log-prob -> 0 stays finite


def test_cpo_and_orpo_equal_trl_on_the_same_inputs():
    """TRL 1.16's CPOTrainer.cpo_loss (loss_type="sigmoid", label smoothing too) and ORPOTrainer.odds_ratio_loss on
    the same log-probs: the same losses, rewards and ORPO statistics (TRL's ORPO term is the log-sigmoid its total
    subtracts: ours is its negative). A mean log-prob of -1e-8 is in: a clamp at -1e-6 cut log(1 - e^x) to log(1e-6)
    there, 4.6 below TRL's."""
    from types import SimpleNamespace

    cpo = pytest.importorskip("trl.experimental.cpo")
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    sums_c, sums_r = t(-10.0, -3.5, -40.0, -0.2), t(-12.0, -3.0, -35.0, -9.0)
    for smoothing in (0.0, 0.1):
        trainer = SimpleNamespace(
            beta=0.1,
            loss_type="sigmoid",
            label_smoothing=smoothing,
            alpha=0.0,
            accelerator=SimpleNamespace(device="cpu"),
        )
        theirs = cpo.CPOTrainer.cpo_loss(trainer, sums_c, sums_r)
        for x, y in zip(cpo_loss(sums_c, sums_r, beta=0.1, label_smoothing=smoothing), theirs):
            assert x.tolist() == pytest.approx(y.tolist(), rel=1e-12, abs=1e-12), smoothing
    means_c, means_r = t(-0.5, -1e-8, -2.0, -0.69, -0.7), t(-1.0, -1.0, -0.3, -0.7, -1e-4)
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen, rejected, ratio, log_odds = orpo.ORPOTrainer.odds_ratio_loss(trainer, means_c, means_r)
    ours = orpo_loss(means_c, means_r, beta=0.1)
    # TRL computes in float32 (``.float()``), these in float64
    assert ours.losses.tolist() == pytest.approx((-losses).tolist(), rel=1e-6)
    assert ours.chosen_rewards.tolist() == pytest.approx(chosen.tolist(), rel=1e-6)
    assert ours.rejected_rewards.tolist() == pytest.approx(rejected.tolist(), rel=1e-6)
    from simpo_exp.methods import orpo_stats

    stats = orpo_stats(means_c, means_r)  # summed over pairs; the logging window divides by the pairs
    assert stats["log_odds_chosen"].item() / 5 == pytest.approx(log_odds.item(), rel=1e-6)
    assert stats["log_odds_ratio"].item() / 5 == pytest.approx(ratio.item(), rel=1e-6)


def test_dispatch_feeds_sums_or_means():
    sums_c, sums_r, len_c, len_r = t(-6.0), t(-10.0), torch.tensor([3]), torch.tensor([4])
    ref_c, ref_r = t(-7.0), t(-9.0)
    kw = dict(beta=2.0, gamma_beta_ratio=0.5)
    assert preference_loss("simpo", sums_c, sums_r, len_c, len_r, **kw).losses.item() == pytest.approx(
        simpo_loss(t(-2.0), t(-2.5), 2.0, 0.5).losses.item()
    )
    assert preference_loss("dpo", sums_c, sums_r, len_c, len_r, ref_c, ref_r, beta=0.1).losses.item() == pytest.approx(
        dpo_loss(sums_c, sums_r, ref_c, ref_r, 0.1).losses.item()
    )
    ln = preference_loss("ln-dpo", sums_c, sums_r, len_c, len_r, ref_c, ref_r, beta=2.0).losses.item()
    assert ln == pytest.approx(softplus(2.0 * ((-6 + 7) / 3 - (-10 + 9) / 4)), abs=1e-12)
    alpha = preference_loss("alphapo", sums_c, sums_r, len_c, len_r, **kw, alphapo_alpha=0.5).losses.item()
    assert alpha == pytest.approx(alphapo_loss(t(-2.0), t(-2.5), 2.0, 0.5, 0.5).losses.item(), abs=1e-12)
    per = preference_loss("simper", sums_c, sums_r, len_c, len_r, **kw).losses.item()  # reads neither key
    assert per == pytest.approx(simper_loss(t(-2.0), t(-2.5)).losses.item(), abs=1e-12)
    assert per == pytest.approx(-math.exp(-2.0) + math.exp(-2.5), abs=1e-12)
    with pytest.raises(ValueError, match="reference"):
        preference_loss("dpo", sums_c, sums_r, len_c, len_r, beta=0.1)
    with pytest.raises(ValueError, match="method='kto'"):
        preference_loss("kto", sums_c, sums_r, len_c, len_r, beta=0.1)


def test_the_reference_caches_data_key_reads_the_responses_as_well_as_the_prompts():
    """An on-policy round's pairs have the last round's prompts and new responses: keyed on the prompts alone, they
    would reuse the last round's reference log-probs. Any response token, chosen or rejected, changes the key."""
    from datasets import Dataset

    from simpo_exp.reference import data_fingerprint

    rows = {"prompt_input_ids": [[1, 2], [3]], "chosen_input_ids": [[4, 5], [6]], "rejected_input_ids": [[7], [8, 9]]}
    key = data_fingerprint(Dataset.from_dict(rows))
    swapped = rows | {"chosen_input_ids": rows["rejected_input_ids"], "rejected_input_ids": rows["chosen_input_ids"]}
    one_token = rows | {"rejected_input_ids": [[7], [8, 10]]}
    prompt = rows | {"prompt_input_ids": [[11, 12, 13], [3]]}  # a system prompt, template or cut of the prompts only
    variants = (swapped, one_token, prompt)
    keys = {key, *(data_fingerprint(Dataset.from_dict(v)) for v in variants)}
    assert len(keys) == 4 and data_fingerprint(Dataset.from_dict(dict(rows))) == key


def test_reference_log_probs_scored_on_two_processes_come_back_in_the_splits_order(monkeypatch):
    """The batches are dealt round-robin and gathered in process order (process 0's batches 0, 2, 4, then process
    1's): unsorted, the cached reference log-probs of DPO, IPO and R-DPO went to other pairs on 2+ processes."""
    import accelerate.utils
    from datasets import Dataset

    from simpo_exp.data import PairCollator
    from simpo_exp.logps import ResponseLogps
    from simpo_exp.reference import score
    from tests.test_perf_paths import make_model, random_pairs

    policy, ds, collate = ResponseLogps(make_model(seed=1)), Dataset.from_list(random_pairs(9, seed=2)), PairCollator(0)
    process = lambda i, n: SimpleNamespace(  # noqa: E731
        process_index=i, num_processes=n, device=torch.device("cpu"), autocast=contextlib.nullcontext
    )
    alone = score(policy, ds, collate, 2, process(0, 1))
    shares = []
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: shares.append(mine) or mine)
    score(policy, ds, collate, 2, process(1, 2))  # process 1's share, kept
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: mine + shares[0])  # gathered in rank order
    both = score(policy, ds, collate, 2, process(0, 2))
    assert [p for p, *_ in shares[0]] == [1, 3]  # 9 pairs in batches of 2: process 1 has the second and fourth
    for got, want in zip(both, alone):
        torch.testing.assert_close(got, want)


def test_reference_cache_is_exact_and_keyed(compose, tmp_path, caplog):
    from accelerate import Accelerator

    from simpo_exp.config import to_config
    from simpo_exp.data import PairCollator, build_datasets
    from simpo_exp.layout import BatchLayout
    from simpo_exp.logps import ResponseLogps
    from simpo_exp.model import build_tiny_tokenizer, load_model
    from simpo_exp.reference import CachedReference, cache_path

    cfg = to_config(
        compose(
            "loss=dpo",
            "dataset.synthetic.num_train=32",
            "dataset.synthetic.num_test=8",
            "per_device_eval_batch_size=5",  # the last batch of each split is short
            f"reference_cache_dir={tmp_path}",
        )
    )
    tok = build_tiny_tokenizer()
    train, test, _ = build_datasets(cfg, tok)
    model = load_model(cfg, tok, "sdpa")
    collate = PairCollator(tok.pad_token_id)
    acc = Accelerator(cpu=True)
    reference = CachedReference(cfg, model, {"train": train, "test": test}, collate, acc)
    pairs = [reference.splits["train"][i] for i in (3, 0, 31, 7)]  # any pairs, in any order
    with pytest.raises(RuntimeError, match="not computed yet"):
        reference.collates["train"](pairs)
    reference.fill(ResponseLogps(model), acc)
    path = cache_path(cfg, model, {"train": train, "test": test})
    assert reference.path == path and path.exists()
    # the batch carries each pair's own reference numbers: the model's summed log-probs of that pair
    batch = reference.collates["train"](pairs)
    with torch.no_grad():
        sums = ResponseLogps(model)(**collate(pairs)).logp_sums
    assert batch["ref_chosen_logps"].tolist() == pytest.approx(sums[:4].tolist(), abs=1e-4)
    assert batch["ref_rejected_logps"].tolist() == pytest.approx(sums[4:].tolist(), abs=1e-4)
    assert load_file(path)["train.chosen"].shape == (32,) and load_file(path)["test.rejected"].shape == (8,)
    # a second run reads the file
    stamp = path.stat().st_mtime_ns
    again = CachedReference(cfg, model, {"train": train, "test": test}, collate, acc)
    again.fill(None, acc)  # no scoring: the policy is not used
    assert path.stat().st_mtime_ns == stamp
    assert again.collates["test"].chosen.tolist() == reference.collates["test"].chosen.tolist()
    # a damaged file (cut off) is scored again and rewritten, with a warning naming it
    path.write_bytes(path.read_bytes()[:40])
    damaged = CachedReference(cfg, model, {"train": train, "test": test}, collate, acc)
    with caplog.at_level(logging.WARNING, logger="simpo_exp.reference"):
        damaged.fill(ResponseLogps(model), acc)
    assert f"the reference log-prob cache {path} cannot be read" in caplog.text
    assert damaged.collates["test"].chosen.tolist() == reference.collates["test"].chosen.tolist()
    assert load_file(path)["train.chosen"].shape == (32,)
    # numbers damaged under an intact header (zeroed: a zero reference, DPO rewards of -8 at step 0) were read as
    # they were: the checksum written with them tells, and they are scored again
    data = bytearray(path.read_bytes())
    data[-16:] = bytes(16)
    path.write_bytes(bytes(data))
    caplog.clear()
    zeroed = CachedReference(cfg, model, {"train": train, "test": test}, collate, acc)
    with caplog.at_level(logging.WARNING, logger="simpo_exp.reference"):
        zeroed.fill(ResponseLogps(model), acc)
    assert "do not match the checksum written with them" in caplog.text
    assert zeroed.collates["test"].rejected.tolist() == reference.collates["test"].rejected.tolist()
    # a readable file of other row counts (another tool's, or one cut at write) is refused, naming it: it was indexed
    # as it was (more rows) or failed later on an index (fewer)
    from simpo_exp.reference import write_cache

    write_cache(path, {"train.chosen": -torch.ones(3), "train.rejected": -torch.ones(3),
                       "test.chosen": -torch.ones(8), "test.rejected": -torch.ones(8)})  # fmt: skip
    short = CachedReference(cfg, model, {"train": train, "test": test}, collate, acc)
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(path))}: 3 reference log-probs for the 32 train pairs"):
        short.fill(None, acc)
    # another layout or attention kernel sums the log-probs in another order (under bf16, 0.006-0.05 nats): another
    # key; the padded SDPA path keeps the key it had
    splits = {"train": train, "test": test}
    assert cache_path(cfg, model, splits, layout=BatchLayout()) == path
    assert cache_path(cfg, model, splits, layout=BatchLayout("packed", "segments")) != path
    keys = {cache_path(cfg, model, splits, layout=BatchLayout("packed", a)) for a in ("segments", "mask", "flex")}
    assert len(keys) == 3  # each packed attention kind sums in its own order
    model.config._attn_implementation = "eager"
    assert cache_path(cfg, model, splits) != path
    model.config._attn_implementation = "sdpa"
    # the config computes too (a config.json edited at model.path read the old numbers, ~1 nat apart); what does
    # not change the forward (use_cache, dropout, which the run zeroes) keeps the key
    model.config.rms_norm_eps, eps = 0.1, model.config.rms_norm_eps
    assert cache_path(cfg, model, splits) != path
    model.config.rms_norm_eps = eps
    for key, value in (("rope_parameters", {"rope_type": "default", "rope_theta": 5e5}), ("sliding_window", 8)):
        had, before = hasattr(model.config, key), getattr(model.config, key, None)
        setattr(model.config, key, value)
        assert cache_path(cfg, model, splits) != path, key
        setattr(model.config, key, before) if had else delattr(model.config, key)
    assert cache_path(cfg, model, splits) == path
    # Liger's layer kernels sum otherwise than the eager layers: another key
    cfg.hardware.fused_layers = "liger"
    assert cache_path(cfg, model, splits) != path
    cfg.hardware.fused_layers = "none"
    cfg.hardware.compile = True  # the cache is filled by the prepared policy: its layers compiled, as inductor sums
    assert cache_path(cfg, model, splits) != path
    compiled, backend = cache_path(cfg, model, splits), cfg.hardware.compile_backend
    cfg.hardware.compile_backend = "aot_eager" if backend != "aot_eager" else "inductor"
    assert cache_path(cfg, model, splits) not in (compiled, path)  # another backend, another order of sums
    cfg.hardware.compile, cfg.hardware.compile_backend = False, backend
    # the file stores each split's numbers under its name: one data set under another split name is another entry
    assert cache_path(cfg, model, {"train": test}) != cache_path(cfg, model, {"test": test})
    # the held-out split's pairs, changed at the same length: another key (its reference log-probs are of them)
    edited = test.map(lambda row: {"chosen_input_ids": row["chosen_input_ids"][:-1] + [5]})
    assert cache_path(cfg, model, {"train": train, "test": edited}) != path
    model.config.use_cache, model.config.attention_dropout = not model.config.use_cache, 0.3
    model.config.resid_pdrop = model.config.layerdrop = 0.1  # GPT-2's and OPT's names, which the run zeroes too
    assert cache_path(cfg, model, splits) == path
    from simpo_exp.reference import model_path_key

    assert model_path_key(f"{tmp_path}/") == model_path_key(str(tmp_path)) == str(tmp_path.resolve())
    assert model_path_key("org/model") == "org/model"
    # other data or another starting model -> another key; a change inside the model too (not only its ends)
    assert cache_path(cfg, model, {"train": train.select(range(16)), "test": test}) != path
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    assert cache_path(cfg, model, {"train": train, "test": test}) != path


def test_lora_runs_of_one_base_share_their_reference_cache(compose, tmp_path):
    """The reference is the base (LoRA's B starts at 0): runs of another seed or adapter rank read the same
    cache, though their adapters start from other random A matrices."""
    from simpo_exp.config import to_config
    from simpo_exp.model import build_tiny_tokenizer, load_model
    from simpo_exp.reference import model_fingerprint
    from tests.tiny import save_tiny_llama

    pytest.importorskip("peft")
    save_tiny_llama(tmp_path / "base", num_hidden_layers=2)
    prints = []
    for extra in (["seed=1"], ["seed=2"], ["seed=1", "hardware.lora_r=4"]):
        cfg = to_config(compose("loss=dpo", "hardware=cpu-lora", f"model.path={tmp_path / 'base'}", *extra))
        prints.append(model_fingerprint(cfg, load_model(cfg, build_tiny_tokenizer(), "sdpa")))
    assert prints[0] == prints[1] == prints[2]


def test_a_reference_cache_that_cannot_be_written_costs_only_the_cache(tmp_path, caplog):
    from simpo_exp.reference import write_cache

    (tmp_path / "a-file").write_text("")
    with caplog.at_level(logging.WARNING, logger="simpo_exp.reference"):
        write_cache(tmp_path / "a-file" / "ref-logps-x.safetensors", {"train.chosen": torch.zeros(2)})
    assert "could not cache the reference log-probs" in caplog.text


def test_a_reference_cache_of_values_no_log_prob_sum_takes_is_computed_again(tmp_path, caplog):
    """A checksummed file holding NaN or positive numbers (a float16 overflow written as it was) was read as the
    reference: a sum of log-probs is finite and at most 0, and any other is refused with a warning naming the file
    and its entries."""
    from datasets import Dataset

    from simpo_exp.reference import read_cache, write_cache

    path = tmp_path / "ref-logps-x.safetensors"
    split = {"train": Dataset.from_dict({"x": [1, 2]})}
    write_cache(path, {"train.chosen": torch.tensor([-1.0, -3.0]), "train.rejected": torch.tensor([-2.0, 0.0])})
    assert read_cache(path, split) is not None  # 0 is a sum of log-probs (probability 1)
    write_cache(path, {"train.chosen": torch.tensor([-1.0, float("nan")]), "train.rejected": torch.tensor([-2.0, 0.5])})
    with caplog.at_level(logging.WARNING, logger="simpo_exp.reference"):
        assert read_cache(path, split) is None
    assert f"the reference log-prob cache {path} cannot be read" in caplog.text
    assert "train.chosen, train.rejected hold values that are no sums of log-probs" in caplog.text


def test_the_reference_key_follows_the_transformers_release_line(compose, monkeypatch):
    """A transformers release that changes a family's forward changes its log-probs: the key follows the release
    line (5.25 -> 5.26), not patch releases (5.25.0 -> 5.25.3), and not only the major number."""
    import simpo_exp.reference
    from simpo_exp.config import to_config
    from tests.test_perf_paths import make_model

    cfg, model = to_config(compose("loss=dpo")), make_model()
    keys = {}
    for version in ("5.25.0", "5.25.3", "5.26.0"):
        monkeypatch.setattr(simpo_exp.reference, "transformers_version", lambda v=version: v)
        keys[version] = simpo_exp.reference.model_fingerprint(cfg, model)
    assert keys["5.25.0"] == keys["5.25.3"] != keys["5.26.0"]


@pytest.fixture(scope="module")
def simpo_dpo_sweep(tmp_path_factory):
    """`--multirun loss=simpo,dpo` on SHORT; its dpo job is also the cached-reference run compared below."""
    root = tmp_path_factory.mktemp("baselines")
    sweep = root / "sweep"
    res = simpo(
        "--multirun",
        "loss=simpo,dpo",
        *SHORT,
        f"reference_cache_dir={root / 'cache'}",
        f"hydra.sweep.dir={sweep}",
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep


def test_live_and_cached_reference_give_the_same_run(simpo_dpo_sweep, tmp_path):
    configs = {f.parents[1]: yaml.safe_load(f.read_text()) for f in simpo_dpo_sweep.glob("*/.hydra/config.yaml")}
    (cached,) = [job for job, cfg in configs.items() if cfg["method"] == "dpo"]  # job names are cut short with a hash
    assert configs[cached]["reference_mode"] == "cached"
    live = tmp_path / "live"
    res = simpo("loss=dpo", *SHORT, "reference_mode=live", f"hydra.run.dir={live}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (cached, live))
    for key in ("eval/loss", "eval/rewards/margins", "train/loss", "eval/logps/chosen"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_a_live_reference_under_lora_is_the_policy_with_its_adapters_off(tmp_path):
    """A LoRA run's live reference was a deep copy of the whole model (a second 16 GB base for 8B in bf16); the
    starting model is the policy with its adapters off, so that is the reference now: no copy, no copy counted in
    the memory check, and the same run as the cached reference's."""
    pytest.importorskip("peft")
    runs = {}
    for mode in ("cached", "live"):
        runs[mode] = tmp_path / mode
        args = ["loss=dpo", "hardware=cpu-lora", "learning_rate=1e-3", f"reference_mode={mode}", *SHORT]
        res = simpo(*args, f"reference_cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={runs[mode]}", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    log = (runs["live"] / "__main__.log").read_text()
    assert "live reference: the policy with its LoRA adapters off (no copy of the model)" in log
    assert "reference" not in next(line for line in log.splitlines() if "trained state per device" in line)
    a, b = (json.loads((d / "summary.json").read_text()) for d in runs.values())
    for key in ("eval/loss", "eval/rewards/margins", "train/loss", "eval/logps/chosen", "eval/rewards/chosen"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_a_live_reference_computes_in_the_policys_precision(tmp_path):
    """At step 0 the policy is the reference, so every DPO reward is exactly zero, as it is from a cached reference
    (scored under the run's autocast). The live copy, taken before prepare, ran without the bf16 autocast that
    prepare gives the policy: its log-probs were float32 sums beside the policy's bf16 ones, and the rewards, margins
    and accuracies started off zero by their rounding."""
    run = tmp_path / "live"
    args = ["loss=dpo", "reference_mode=live", "hardware.mixed_precision=bf16", "eval_on_start=true", "max_steps=1"]
    rest = [o for o in SHORT if not o.startswith(("max_steps=", "eval_on_start="))]
    res = simpo(*args, *rest, f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (start,) = [r for r in rows if r.get("step") == 0 and "eval/rewards/margins" in r]
    for key in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins", "eval/rewards/accuracies"):
        assert start[key] == 0.0, (key, start[key])


def test_simpo_and_dpo_sweep_is_comparable(simpo_dpo_sweep):
    sweep = simpo_dpo_sweep

    summaries, methods = [], []
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        summaries.append(json.loads((job / "summary.json").read_text()))
        methods.append(yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["method"])
    assert methods == ["simpo", "dpo"]
    # the same metrics side by side, plus logits/*, which only TRL's DPO defines over response tokens
    only_dpo = {f"{split}/logits/{side}" for split in ("train", "eval") for side in ("chosen", "rejected")}
    assert summaries[1].keys() - summaries[0].keys() == only_dpo
    # and the target margin, which only SimPO's loss has (DPO records none: it would be a value nothing used)
    assert summaries[0].keys() - summaries[1].keys() == {"resolved/gamma", "resolved/gamma_beta_ratio"}


def test_simpo_alphapo_simper_sweep_runs_and_compare_ranks_it(tmp_path):
    """The two methods added through the table run in one sweep with SimPO on the embedded default, and
    the compare command ranks the three by held-out reward accuracy."""
    sweep = tmp_path / "sweep"
    res = simpo(
        "--multirun",
        "loss=simpo,alphapo,simper",
        "logger=none",
        "max_steps=6",  # the checks read the final eval; 6 steps already part the three methods' accuracies
        "eval_steps=0",
        "logging_steps=3",
        "num_generations=0",
        "eval_on_start=false",
        "dataset.synthetic.num_train=128",
        "dataset.synthetic.num_test=32",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ranks_three_methods(sweep)


def ranks_three_methods(sweep):
    """compare's rows and its printed table: the three methods, all done, best held-out accuracy first."""
    from simpo_exp import compare

    runs = compare.load_runs(sweep)
    rows = compare.runs_table(runs)
    assert len(rows) == 3
    assert sorted(r["loss"] for r in rows) == ["alphapo", "simper", "simpo"]
    assert all(r["status"] == "done" for r in rows), rows
    accuracies = [r["eval/rewards/accuracies"] for r in rows]
    assert accuracies == sorted(accuracies, reverse=True) and all(0 <= a <= 1 for a in accuracies)
    out = run_module("simpo_exp.compare", str(sweep), "--no-plots", cwd=sweep.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 runs (3 done," in out.stdout and "ranked by eval/rewards/accuracies" in out.stdout
    lines = out.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["run", "status"])
    header, body = lines[at].split(), [line.split() for line in lines[at + 2 : at + 5]]  # below the "---" rule
    printed = [cells[header.index("loss")] for cells in body]
    assert printed == [r["loss"] for r in rows]  # the printed table, best first, in the ranked order


def test_live_reference_under_zero3_is_refused_by_name(compose):
    """ZeRO-3 partitions the weights at load; a frozen copy of them could not run outside the engine."""
    from accelerate import Accelerator

    from simpo_exp.config import ConfigError, to_config
    from simpo_exp.data import PairCollator, build_datasets
    from simpo_exp.layout import BatchLayout
    from simpo_exp.model import build_tiny_tokenizer, load_model
    from simpo_exp.train import make_loaders

    cfg = to_config(compose("loss=dpo", "reference_mode=live", "dataset.synthetic.num_train=16"))
    tok = build_tiny_tokenizer()
    train, test, _ = build_datasets(cfg, tok)
    model = load_model(cfg, tok, "sdpa")
    splits, collate, layout = {"train": train, "test": test}, PairCollator(tok.pad_token_id), BatchLayout("none")
    make_loaders(cfg, model, splits, collate, Accelerator(cpu=True), layout)  # whole weights: a live copy is fine
    next(model.parameters()).ds_id = 0  # as deepspeed.zero.Init marks a partitioned weight
    with pytest.raises(ConfigError, match="reference_mode=live .* ZeRO-3.*use reference_mode=cached"):
        make_loaders(cfg, model, splits, collate, Accelerator(cpu=True), layout)


def test_a_lora_run_and_a_full_fine_tune_of_one_base_keep_their_own_reference_caches(compose, tmp_path):
    """LoRA computes the reference on its base as loaded (bf16), full fine-tuning on float32 master weights: they
    shared one cache, and whichever ran first decided the other's reference log-probs (0.018 nats apart)."""
    from simpo_exp.config import to_config
    from simpo_exp.model import build_tiny_tokenizer, load_model
    from simpo_exp.reference import model_fingerprint
    from tests.tiny import save_tiny_llama

    pytest.importorskip("peft")
    save_tiny_llama(tmp_path / "base", num_hidden_layers=2)
    prints = []
    for hardware in ("cpu-lora", "cpu", "cpu hardware.master_weights=model"):
        hardware, *more = hardware.split()
        cfg = to_config(
            compose(
                "loss=dpo", f"hardware={hardware}", *more, f"model.path={tmp_path / 'base'}", "model.dtype=bfloat16"
            )
        )
        prints.append(model_fingerprint(cfg, load_model(cfg, build_tiny_tokenizer(), "sdpa")))
    # a full fine-tune on float32 master weights and one on the bf16 weights as loaded: log-probs 0.004 apart
    assert len(set(prints)) == 3


def test_the_reference_cache_key_holds_the_precision_auto_resolves_to(compose, tmp_path):
    """The key held hardware.mixed_precision as written: "auto", bf16 autocast on a GPU and none on a CPU, so a
    GPU run and a CPU run of one model shared a cache of log-probs computed in different precisions (0.025 nats
    apart on 500-token answers of a tiny model). "auto" now enters the key as it resolves: here, on a CPU, as "no"."""
    from simpo_exp.config import to_config
    from simpo_exp.model import build_tiny_tokenizer, load_model
    from simpo_exp.reference import model_fingerprint
    from tests.tiny import save_tiny_llama

    save_tiny_llama(tmp_path / "base", num_hidden_layers=2)
    prints = {}
    for precision in ("auto", "no", "bf16"):
        overrides = ("loss=dpo", "hardware=cpu", "hardware.device=cpu", f"hardware.mixed_precision={precision}")
        cfg = to_config(compose(*overrides, f"model.path={tmp_path / 'base'}"))
        prints[precision] = model_fingerprint(cfg, load_model(cfg, build_tiny_tokenizer(), "sdpa"))
    assert prints["auto"] == prints["no"] != prints["bf16"]

    # FSDP's mixed precision runs the forward in bf16 weights, DDP in float32 ones under the autocast: a DDP run's
    # cache served a later FSDP run of the same model (0.002-0.1 nats a sequence apart), under one key
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    model = load_model(cfg, build_tiny_tokenizer(), "sdpa")  # the bf16 config's
    engine = lambda kind, **state: SimpleNamespace(  # noqa: E731
        distributed_type=kind, mixed_precision="bf16", state=SimpleNamespace(**state)
    )
    ddp, fsdp = engine(DistributedType.MULTI_GPU), engine(DistributedType.FSDP, fsdp_plugin=plugin)
    assert model_fingerprint(cfg, model, ddp) == model_fingerprint(cfg, model) == prints["bf16"]
    assert model_fingerprint(cfg, model, fsdp) != prints["bf16"]
    # FSDP without mixed precision computes the float32 weights as one device does: one cache (test_sharded)
    plain = engine(DistributedType.FSDP, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    assert model_fingerprint(cfg, model, plain) == prints["bf16"]
    # DeepSpeed under bf16 casts float32 weights to bf16 for its forward (after the key is taken): it shared DDP's key
    deepspeed = engine(DistributedType.DEEPSPEED)
    assert model_fingerprint(cfg, model, deepspeed) != prints["bf16"]
    bf16_weights = model.to(torch.bfloat16)  # weights loaded in bf16: DDP and DeepSpeed compute alike
    assert model_fingerprint(cfg, bf16_weights, deepspeed) == model_fingerprint(cfg, bf16_weights, ddp)


@pytest.mark.parametrize("mean_logp", [-3e-8, -1e-8, -1e-12, 0.0])
def test_orpo_gradient_is_finite_for_an_all_but_memorised_response(mean_logp):
    """log(1 - e^x) computed both forms for every x and picked one with torch.where: for x in (-3e-8, 0] float32's
    e^x is 1.0, the unused form log1p(-1) = -inf, and its zeroed gradient times an infinite derivative made the
    step's gradient NaN (the step was skipped; after max_bad_steps the run stopped). TRL 1.16 has the same flaw."""
    for side in range(2):
        x = torch.tensor([mean_logp], requires_grad=True)
        other = torch.tensor([-1.0])
        pair = (x, other) if side == 0 else (other, x)
        orpo_loss(*pair, beta=0.1).losses.sum().backward()
        assert torch.isfinite(x.grad).all(), (side, x.grad)
    y = torch.tensor([-1e-8, -0.5, -1.0, -30.0], dtype=torch.float64)  # values unchanged: both forms, each its side
    expected = torch.tensor(
        [math.log(-math.expm1(v)) if v > -0.69 else math.log1p(-math.exp(v)) for v in y.tolist()], dtype=torch.float64
    )
    assert torch.allclose(_log1m_exp(y), expected, rtol=1e-12, atol=0)


def test_the_architecture_key_reads_a_models_own_code(tmp_path, monkeypatch):
    """A model that ships its own code (``trust_remote_code``, imported under ``transformers_modules``) computes
    what that code says: an edit to it gives another key, as an edit to its config does."""
    import importlib.util
    import sys

    from simpo_exp.reference import architecture_fingerprint
    from tests.test_perf_paths import make_model

    code = tmp_path / "modeling_own.py"

    def own_model(body: str):
        code.write_text(f"import torch\n\nclass OwnModel(torch.nn.Module):\n    {body}\n")
        spec = importlib.util.spec_from_file_location("transformers_modules.own.modeling_own", code)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        model = module.OwnModel()
        model.config = make_model(vocab=50).config
        return model

    first = architecture_fingerprint(own_model("scale = 1.0"))
    assert architecture_fingerprint(own_model("scale = 1.0")) == first
    assert architecture_fingerprint(own_model("scale = 2.0")) != first
