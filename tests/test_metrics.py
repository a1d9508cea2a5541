"""Logged metrics against values worked out by hand, for every method.

Names TRL uses carry the definition TRL's trainer gives them for the method (``logps/*`` summed for
the DPO family and CPO, the per-token mean for SimPO and ORPO; ``rewards/*`` for LN-DPO and IPO on
summed log-ratios; ``logits/*`` only for the DPO family); our own names (``logps_mean/*``,
``logits_response/*``) mean the same for every method. Per-token metrics are divided by token
counts, per-pair ones by the pair count.
"""

import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from simpo_exp.config import Config
from simpo_exp.data.collate import PairCollator
from simpo_exp.logps import ResponseLogps, SequenceLogps
from simpo_exp.methods import METHODS, REFERENCE_METHODS
from simpo_exp.metrics import Window
from simpo_exp.objective import batch_loss, input_tokens
from simpo_exp.tracking import batch_metrics
from tests.test_perf_paths import make_model

PAD = 0
BETA, RATIO, ALPHA, ALPHAPO = 2.0, 0.5, 0.1, 0.3

# Two micro-batches of two pairs each; rows: chosen of pair 0, 1, then rejected of pair 0, 1.
BATCHES = [
    dict(
        sums=[-6.0, -4.0, -10.0, -3.0],
        lens=[3, 2, 5, 1],
        logits=[0.3, 0.4, 1.0, -0.2],
        entropy=[6.0, 2.0, 9.0, 1.5],
        top1=[2, 1, 1, 0],
        ref=[-7.0, -3.0, -9.0, -4.0],
    ),
    dict(
        sums=[-2.0, -9.0, -1.0, -8.0],
        lens=[4, 3, 1, 2],
        logits=[-0.4, 0.9, 0.1, 0.5],
        entropy=[4.0, 3.0, 0.5, 2.5],
        top1=[3, 0, 1, 2],
        ref=[-2.5, -8.0, -1.5, -7.0],
    ),
]


class OneProcess:
    device = torch.device("cpu")

    def reduce(self, x, reduction):
        return x


class Canned(torch.nn.Module):
    """A policy that returns fixed per-sequence numbers."""

    def __init__(self, b):
        super().__init__()
        t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
        self.out = SequenceLogps(t(b["sums"]), torch.tensor(b["lens"]), t(b["logits"]), t(b["entropy"]), t(b["top1"]))

    def forward(self, **batch):
        return self.out


def canned_batch(b):
    ids = torch.ones(4, 12, dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "ref_chosen_logps": torch.tensor(b["ref"][:2], dtype=torch.float64),
        "ref_rejected_logps": torch.tensor(b["ref"][2:], dtype=torch.float64),
    }


def logged(method: str) -> dict:
    cfg = Config(method=method, beta=BETA, gamma_beta_ratio=RATIO, rdpo_alpha=ALPHA, alphapo_alpha=ALPHAPO)
    window = Window()
    for b in BATCHES:
        _, stats, _ = batch_loss(Canned(b), canned_batch(b), cfg)
        window.add(stats)
    means, _ = window.means(OneProcess(), "train")
    return {k.removeprefix("train/"): v for k, v in means.items()}


def softplus(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x)) if x > -30 else -x


def log1m_exp(x):
    return math.log(-math.expm1(x))


def per_pair():
    """(chosen sum, rejected sum, chosen len, rejected len, ref chosen, ref rejected) of every pair."""
    for b in BATCHES:
        s, n, r = b["sums"], b["lens"], b["ref"]
        for i in range(2):
            yield s[i], s[2 + i], n[i], n[2 + i], r[i], r[2 + i]


DPO_FAMILY = ("dpo", "ln-dpo", "ipo", "rdpo")  # by hand, not from the table under test


def expected(method: str) -> dict:
    """Every metric, worked out pair by pair and token by token with plain floats."""
    rows, out = list(per_pair()), {}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rc, rr, losses = [], [], []
    for sc, sr, nc, nr, fc, fr in rows:
        mc, mr = sc / nc, sr / nr
        if method == "simpo":
            c, r = BETA * mc, BETA * mr
            loss = softplus(c - r - BETA * RATIO)
        elif method == "cpo":
            c, r = BETA * sc, BETA * sr
            loss = softplus(c - r)
        elif method == "orpo":
            c, r = BETA * mc, BETA * mr
            loss = BETA * softplus((mc - log1m_exp(mc)) - (mr - log1m_exp(mr)))
        elif method == "alphapo":  # reward beta * (1 - e^(-alpha * mean)) / alpha
            c, r = (BETA * (1 - math.exp(-ALPHAPO * x)) / ALPHAPO for x in (mc, mr))
            loss = softplus(c - r - BETA * RATIO)
        elif method == "simper":  # reward: the inverse perplexity e^mean
            c, r = math.exp(mc), math.exp(mr)
            loss = r - c
        elif method in DPO_FAMILY:  # DPO's reward on summed log-probs (TRL's DPOTrainer)
            c, r = BETA * (sc - fc), BETA * (sr - fr)
            z = {
                "dpo": c - r,
                "rdpo": c - r + ALPHA * (nc - nr),
                "ln-dpo": BETA * ((mc - fc / nc) - (mr - fr / nr)),
            }.get(method)
            loss = softplus(z) if z is not None else ((mc - fc / nc) - (mr - fr / nr) - 1 / (2 * BETA)) ** 2
        else:
            raise AssertionError(f"no hand-computed metrics for method={method!r}: add its formula to expected()")
        rc.append(c), rr.append(r), losses.append(loss)
    summed = method in DPO_FAMILY + ("cpo",)  # logps/* are summed log-probs
    out["loss"] = mean(losses)
    out["rewards/chosen"], out["rewards/rejected"] = mean(rc), mean(rr)
    out["rewards/margins"] = mean([c - r for c, r in zip(rc, rr)])
    out["rewards/accuracies"] = mean([float(c > r) for c, r in zip(rc, rr)])
    out["logps_mean/chosen"] = mean([sc / nc for sc, _, nc, *_ in rows])
    out["logps_mean/rejected"] = mean([sr / nr for _, sr, _, nr, *_ in rows])
    out["logps_mean/accuracies"] = mean([float(sc / nc > sr / nr) for sc, sr, nc, nr, *_ in rows])
    out["logps/chosen"] = mean([sc for sc, *_ in rows]) if summed else out["logps_mean/chosen"]
    out["logps/rejected"] = mean([sr for _, sr, *_ in rows]) if summed else out["logps_mean/rejected"]
    out["length/chosen"] = mean([nc for _, _, nc, *_ in rows])
    out["length/rejected"] = mean([nr for _, _, _, nr, *_ in rows])
    tokens = lambda idx: sum(b["lens"][i] for b in BATCHES for i in idx)  # noqa: E731
    total = lambda key, idx: sum(b[key][i] for b in BATCHES for i in idx)  # noqa: E731
    out["logits_response/chosen"] = total("logits", (0, 1)) / tokens((0, 1))
    out["logits_response/rejected"] = total("logits", (2, 3)) / tokens((2, 3))
    out["entropy"] = total("entropy", range(4)) / tokens(range(4))
    out["mean_token_accuracy"] = total("top1", (0, 1)) / tokens((0, 1))
    out["sft_loss"] = -total("sums", (0, 1)) / tokens((0, 1))  # the window's chosen-token mean, not batch by batch
    if method in DPO_FAMILY:  # TRL's DPOTrainer logs the mean logit over response tokens
        out["logits/chosen"], out["logits/rejected"] = out["logits_response/chosen"], out["logits_response/rejected"]
    if method == "orpo":
        odds = [(sc / nc - log1m_exp(sc / nc)) - (sr / nr - log1m_exp(sr / nr)) for sc, sr, nc, nr, *_ in rows]
        out["log_odds_chosen"] = mean(odds)
        out["log_odds_ratio"] = mean([-softplus(x) for x in odds])
    return out


@pytest.mark.parametrize("method", METHODS)
def test_metrics_match_hand_computed_values(method):
    got, want = logged(method), expected(method)
    assert set(got) == set(want) == set(batch_metrics((method,)))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key  # window sums are float32


@pytest.mark.parametrize("method", ["simpo", "alphapo"])
def test_an_absolute_gamma_is_the_margin_the_loss_reads(method):
    """``gamma`` (TRL's simpo_gamma) replaces gamma_beta_ratio: the loss takes gamma itself as its margin, not
    beta times the default ratio."""
    from simpo_exp.objective import loss_settings

    beta, gamma = 2.5, 1.0
    cfg = Config(method=method, beta=beta, gamma=gamma, alphapo_alpha=ALPHAPO)
    assert loss_settings(cfg)["gamma_beta_ratio"] == pytest.approx(gamma / beta)
    reward = (lambda m: beta * m) if method == "simpo" else (lambda m: beta * (1 - math.exp(-ALPHAPO * m)) / ALPHAPO)
    b = BATCHES[0]
    loss, _, _ = batch_loss(Canned(b), canned_batch(b), cfg)
    s, n = b["sums"], b["lens"]
    want = [softplus(reward(s[i] / n[i]) - reward(s[2 + i] / n[2 + i]) - gamma) for i in range(2)]
    assert float(loss) == pytest.approx(sum(want) / 2, rel=1e-9)


def test_names_mean_one_thing_across_methods():
    """logits/* only where TRL defines it over completion tokens; our own names for every method."""
    for method in METHODS:
        names = batch_metrics((method,))
        assert ("logits/chosen" in names) == (method in REFERENCE_METHODS), method
        assert {"logps_mean/chosen", "logits_response/chosen", "entropy", "mean_token_accuracy"} <= set(names)
        assert ("log_odds_ratio" in names) == (method == "orpo")


def test_pearson_is_the_sample_correlation():
    """eval/length/reward_corr's formula (compare ranks runs by it, nearest zero first)."""
    from simpo_exp.metrics import pearson

    x, y = [-2.0, -1.5, -1.0, -3.0, 0.5], [10.0, 20.0, 30.0, 5.0, 7.0]
    assert pearson(torch.tensor(x), torch.tensor(y)) == pytest.approx(statistics.correlation(x, y), rel=1e-12)
    assert pearson(torch.tensor(x), torch.tensor([y[0]] * 5)) != pearson(torch.tensor(x), torch.tensor(y))
    assert math.isnan(pearson(torch.tensor(x), torch.tensor([3.0] * 5)))  # one length throughout: no correlation


def test_a_skipped_step_counts_in_no_mean_but_its_work_counts_in_the_speed():
    """A non-finite step in a window of several (logging_steps > 1): its loss and rewards would turn the window's
    means to NaN; its tokens were computed, so they count in the speed figures and train/num_tokens."""
    good = Window({"pairs": 2.0, "loss": 1.0, "tokens": 30.0, "input_tokens": 40.0})
    bad = Window({"pairs": 2.0, "loss": float("nan"), "tokens": 20.0, "input_tokens": 26.0})
    window = Window()
    window.step_done(good, 1.0)
    window.step_done(bad, 1.0, skipped=True)
    metrics, totals = window.train_report(OneProcess(), None, None)
    assert metrics["train/loss"] == 0.5 and totals["skipped/input_tokens"] == 26.0
    assert metrics["train/tokens_per_s"] == 25.0  # (30 + 20) tokens in 2 s


def test_the_local_layers_pairs_of_untimed_and_skipped_steps_count_as_their_other_work_does():
    """A sliding-window layer's pairs (``local_pairs``) are work like the full layers' pairs: a compile step's are
    left out of the FLOPs a window's MFU divides by its timed seconds, a skipped step's are in."""
    asked = []
    flops = SimpleNamespace(step_flops=lambda *counts: asked.append(counts) or 1.0)
    work = {"pairs": 1.0, "tokens": 10.0, "length/chosen": 2.0, "length/rejected": 2.0, "attention_pairs": 5.0}
    window = Window()
    window.step_done(Window(work | {"local_pairs": 30.0, "loss": 1.0}), 9.0, timed=False)  # compiled: not timed
    window.step_done(Window(work | {"local_pairs": 10.0, "loss": 1.0}), 1.0)
    window.step_done(Window(work | {"local_pairs": 7.0, "loss": float("nan")}), 1.0, skipped=True)
    one = OneProcess()
    one.num_processes = 1
    window.train_report(one, flops, 1e12)
    assert asked == [(20.0, 8.0, 10.0, 17.0)]  # the timed and the skipped step's work


def test_empty_window_gives_nan_not_an_error():
    means, totals = Window().means(OneProcess(), "eval")
    assert totals == {} and math.isnan(means["eval/entropy"]) and math.isnan(means["eval/loss"])


def test_a_resumed_window_gives_each_process_its_own_sums():
    """A checkpoint keeps every process's open window; resumed on as many processes, each takes its own (the
    next report then sums them as the run would have); on another number, the main process takes them all."""

    saved = [{"pairs": 4.0, "loss": 1.5}, {"pairs": 4.0, "loss": 2.5}]
    rank = lambda i, n: SimpleNamespace(num_processes=n, process_index=i, is_main_process=i == 0)  # noqa: E731
    assert Window.restore(saved, 1.0, 2, rank(1, 2)).local() == {"pairs": 4.0, "loss": 2.5}
    one = Window.restore(saved, 1.0, 2, rank(0, 1))
    assert one.local() == {"pairs": 8.0, "loss": 4.0} and (one.seconds, one.steps) == (1.0, 2)
    assert Window.restore(saved, 1.0, 2, rank(2, 4)).local() == {"pairs": 0.0, "loss": 0.0}  # the same keys
    assert Window.restore({"pairs": 4.0}, 0.0, 0, rank(0, 1)).local() == {"pairs": 4.0}  # an older checkpoint
    assert Window.restore([], 0.0, 0, rank(0, 1)).local() == {}  # a fresh run


def test_a_window_resumed_on_more_processes_reduces_when_it_held_a_skipped_steps_keys():
    """Resumed on 2 processes from 1, the main process took the saved window, holding a skipped step's
    ``skipped/*`` sums, and the other none: at the next report the two stacked different numbers of sums into one
    all-reduce (gloo aborted: "Received data size doesn't match expected size"; NCCL hangs)."""
    import torch.multiprocessing as mp

    from tests.gloo_window import reduce_a_restored_window
    from tests.runs import free_port

    saved = [{"pairs": 4.0, "loss": 2.0, "tokens": 40.0, "skipped/tokens": 12.0, "skipped/pairs": 4.0}]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(reduce_a_restored_window, args=(free_port(), saved, out), nprocs=2, start_method="spawn")
    (_, (means0, totals0)), (_, (means1, totals1)) = sorted(out.get(timeout=60) for _ in range(2))
    assert (
        totals0 == totals1 == {"loss": 4.0, "pairs": 8.0, "skipped/pairs": 4.0, "skipped/tokens": 12.0, "tokens": 60.0}
    )
    assert means0 == means1 and means0["train/loss"] == 0.5


def test_a_step_that_compiled_on_one_process_alone_leaves_every_process_the_same_keys():
    """Each process counts its own compiles (hardware.compile): a recompile on one process alone (a batch shape
    only it saw) put ``untimed/*`` sums in its window only, and the next report's all-reduce stacked different
    numbers of sums (gloo aborted, NCCL hangs). A timed step adds them as zeros; the speed figures are unchanged."""
    step = Window({"pairs": 4.0, "tokens": 40.0, "loss": 2.0})
    compiled, timed = Window(), Window()
    compiled.step_done(step, 9.0, timed=False)
    timed.step_done(step, 0.5, timed=True)
    assert sorted(compiled.sums) == sorted(timed.sums)
    assert timed.local()["untimed/tokens"] == 0.0 and compiled.local()["untimed/tokens"] == 40.0
    assert (compiled.seconds, compiled.steps, timed.seconds, timed.steps) == (0.0, 0, 0.5, 1)


# ----------------------------------------------------------------------------- from a real model
def tiny_model():
    return make_model(vocab=40).eval()


PAIRS = [
    {"prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5], "rejected_input_ids": [6, 7, 8, 9]},
    {"prompt_input_ids": [10, 11], "chosen_input_ids": [12, 13, 14], "rejected_input_ids": [15]},
]


def by_hand(model, prompt, response):
    """(sum of mean logits, sum of entropies, argmax hits) over the response tokens, from full logits."""
    logits = model(torch.tensor([prompt + response])).logits[0].double()
    sums = [0.0, 0.0, 0.0]
    for j, tok in enumerate(response):
        row = logits[len(prompt) + j - 1]
        p = row.softmax(-1)
        sums[0] += row.mean().item()
        sums[1] += -(p * p.log()).sum().item()
        sums[2] += float(int(row.argmax()) == tok)
    return sums


@pytest.mark.parametrize("layout", [dict(), dict(chunk_size=2), dict(packing="prefix_shared")])
def test_response_statistics_match_full_logits(layout):
    model = tiny_model()
    batch = PairCollator(PAD, packing=layout.get("packing", "none"))(PAIRS)
    with torch.no_grad():
        out = ResponseLogps(model, **layout)(**batch)
    responses = [(p["prompt_input_ids"], p["chosen_input_ids"]) for p in PAIRS] + [
        (p["prompt_input_ids"], p["rejected_input_ids"]) for p in PAIRS
    ]
    for i, (prompt, response) in enumerate(responses):
        logit_sum, entropy_sum, hits = by_hand(model, prompt, response)
        assert out.logit_sums[i].item() == pytest.approx(logit_sum, abs=1e-5)
        assert out.entropy_sums[i].item() == pytest.approx(entropy_sum, abs=1e-4)
        assert out.top1_counts[i].item() == hits
        assert not out.entropy_sums.requires_grad


def test_chunked_statistics_keep_gradients_of_log_probs():
    model = tiny_model().train()
    batch = PairCollator(PAD)(PAIRS)
    out = ResponseLogps(model, chunk_size=2)(**batch)
    out.logp_sums.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_input_tokens_count_the_prompt_for_each_response_in_every_layout():
    want = sum(
        2 * len(p["prompt_input_ids"]) + len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in PAIRS
    )  # 12 + 8: TRL counts prompt + response of each sequence, no padding
    for packing in ("none", "packed", "prefix_shared"):
        assert input_tokens(PairCollator(PAD, packing=packing)(PAIRS)).item() == want, packing


def test_a_steps_tokens_are_the_computed_ones_and_mfu_shares_the_work_among_the_processes_peaks():
    """``tokens`` (behind train/tokens_per_s and the FLOPs of train/mfu) counts what the layout computes: under
    prefix sharing each prompt once, 15 for PAIRS, where TRL's input_tokens counts it for each response (20). The
    window's work, summed over the processes, is divided by all their peaks: 8e12 FLOPs in 2 s on 4 devices of
    1e12 FLOP/s each is an MFU of 1.0 (4.0 against one device's peak)."""

    from simpo_exp.metrics import throughput

    batch = PairCollator(PAD, packing="prefix_shared")(PAIRS)
    with torch.no_grad():
        _, stats, _ = batch_loss(ResponseLogps(tiny_model(), packing="prefix_shared"), batch, Config())
    assert stats["tokens"].item() == 15 and stats["input_tokens"].item() == 20
    asked = []
    flops = SimpleNamespace(step_flops=lambda *counts: asked.append(counts) or 8e12)
    four = SimpleNamespace(device=torch.device("cpu"), num_processes=4)
    totals = {"tokens": 100.0, "pairs": 2.0, "length/chosen": 10.0, "length/rejected": 12.0, "attention_pairs": 50.0}
    out = throughput(totals, 2.0, 1, flops, 1e12, four)  # a window restored from before local pairs were summed
    assert out["train/mfu"] == 1.0 and asked == [(100.0, 22.0, 50.0, 0.0)] and out["train/tokens_per_s"] == 50.0
    throughput(totals | {"local_pairs": 30.0}, 2.0, 1, flops, 1e12, four)  # a sliding or chunked layer's pairs
    assert asked[-1] == (100.0, 22.0, 50.0, 30.0)


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_eval_loss_does_not_move_with_the_eval_batch_size(compose, sft_weight):
    """With an NLL term, eval/loss was a pair-weighted mean of per-batch token means, so it changed with
    per_device_eval_batch_size (a setting a resume may change); it is the preference loss's mean plus
    sft_weight x eval/sft_loss, the token mean over the split, as a training step's is over the step."""
    from accelerate import Accelerator

    from simpo_exp.config import to_config
    from simpo_exp.data.collate import PairCollator
    from simpo_exp.data.dealt import Dealt
    from simpo_exp.logps import ResponseLogps
    from simpo_exp.train import evaluate
    from tests.test_perf_paths import make_model, random_pairs

    cfg = to_config(compose("hardware=cpu", f"sft_weight={sft_weight}"))
    policy, pairs, accelerator = ResponseLogps(make_model(seed=2)), random_pairs(7, seed=4), Accelerator(cpu=True)
    runs = [evaluate(policy, Dealt(pairs, PairCollator(0), size), cfg, accelerator) for size in (1, 3, 7)]
    for metrics in runs[1:]:
        assert metrics["eval/loss"] == pytest.approx(runs[0]["eval/loss"], rel=1e-5)
        assert metrics["eval/sft_loss"] == pytest.approx(runs[0]["eval/sft_loss"], rel=1e-5)
    with torch.no_grad():  # one batch of all seven: its own token mean is the split's
        loss, _, _ = batch_loss(policy, PairCollator(0)(pairs), cfg)
    assert runs[-1]["eval/loss"] == pytest.approx(loss.item(), rel=1e-5)
    # a process's repeat batch (the split not dealt evenly) counts nothing: process 1 of 2 holds pairs 1 and 3 and a
    # repeat of pair 1's batch, which counted would weigh pair 1 twice
    dealt = Dealt(pairs[:5], PairCollator(0), 1, 1, 2)
    assert [position for position, _ in dealt] == [1, 3, None]
    alone = evaluate(policy, Dealt([pairs[1], pairs[3]], PairCollator(0), 1), cfg, accelerator)
    with_repeat = evaluate(policy, dealt, cfg, accelerator)
    for key in ("eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"):
        assert with_repeat[key] == pytest.approx(alone[key], rel=1e-6), key
    # eval/length/reward_corr: each response's reward (beta x its mean token log-prob, from the full logits) beside
    # its own length, over the split, whatever the batch size
    model, rewards, lengths = make_model(seed=2).eval(), [], []
    for pair in pairs:
        for side in ("chosen_input_ids", "rejected_input_ids"):
            prompt, response = pair["prompt_input_ids"], pair[side]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].double()
            logp = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).mean().item()
            rewards.append(cfg.beta * logp)
            lengths.append(float(len(response)))
    for metrics in runs:
        assert metrics["eval/length/reward_corr"] == pytest.approx(statistics.correlation(rewards, lengths), abs=1e-5)
