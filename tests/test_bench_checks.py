"""The benchmark's own arithmetic, which the GPU figures of issue 17 are read through (from a mutation review of
benchmarks/targets.py, bench_trl.py and bench_report.py): a figure exactly at its target, which run each target
row names, the step pairing, the per-run summary, the gradient check and the report's peak memory."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("trl.experimental.cpo")

from tests.test_bench import load_bench, row, run  # noqa: E402


def table(result) -> dict[str, tuple[str, str]]:
    from benchmarks.targets import assess

    return {t: (m, v) for t, m, v in assess(result)}


def test_a_figure_exactly_at_its_target_meets_it():
    """2.0x, 1.1x, 0.5x and 35% are met at the figure itself (every division here is exact in floating point)."""
    from benchmarks.targets import assess

    rows = [row("TRL", 10.0, 40000), row("TRL+nockpt", 10.0, 40000), row("plain", 11.0, 20000, 0.35)]
    rows += [row("packed-flex", 20.0, 20000, 0.35), row("packed-flex+nockpt", 20.0, 20000, 0.35)]
    verdicts = [v for _, _, v in assess({"config": {"batch": 16}, "rows": rows, "missing": []}) if v]
    assert verdicts == ["met"] * 6


def test_the_memory_rows_name_the_fastest_and_the_leanest_run():
    rows = [row("TRL", 10.0, 40000), row("packed-flex", 25.0, 30000), row("plain+chunk1024", 12.0, 16000)]
    got = table({"config": {"batch": 4}, "missing": [], "rows": rows})
    assert got["batch 4: peak memory (leanest) <= 0.5x TRL"] == ("plain+chunk1024 0.40x", "met")
    assert got["batch 4: peak memory (fastest) <= 0.5x TRL"] == ("packed-flex 0.75x", "missed")


def test_the_speed_rows_leave_out_the_warm_up_and_rank_step_by_step():
    """The warm-up steps (compile, allocator) are not paired; the best run is the best step by step against TRL,
    not the highest median pairs/s."""
    warm = {"config": {"batch": 4, "warmup": 3}, "missing": [], "rows": [row("TRL", 1.0, 1), row("plain", 2.0, 1)]}
    warm["runs"] = {"TRL": [{"times": [100.0, 100.0, 100.0, 2.0, 2.0]}], "plain": [{"times": [1.0] * 5}]}
    assert table(warm)["batch 4: padded >= 1.1x TRL"] == ("plain 2.00x", "met")  # 100x with the warm-up paired
    ranked = {"config": {"batch": 4, "warmup": 0}, "missing": []}
    ranked["rows"] = [row("TRL", 4.0, 1), row("packed-flex", 10.0, 1), row("prefix-flex", 5.0, 1)]
    ranked["runs"] = {"TRL": [{"times": [2.0] * 3}], "packed-flex": [{"times": [2.0] * 3}]}
    ranked["runs"]["prefix-flex"] = [{"times": [1.0] * 3}]
    assert table(ranked)["batch 4: best pairs/s >= 2.0x TRL"] == ("prefix-flex 2.00x", "met")


def test_without_trl_auto_keeps_the_fastest_layout():
    got = table({"config": {"batch": 4}, "missing": ["TRL"], "rows": [row("plain", 5.0, 1), row("packed", 8.0, 1)]})
    assert got["batch 4: packing=auto would keep"][0].startswith("packed (segments) (pairs/s: packed 8.00, plain 5.00)")


def test_trl_without_checkpointing_is_never_one_of_ours():
    """TRL+nockpt is popped from the rows: counted as one of ours, the MFU row named it where it beat our runs."""
    rows = [row("TRL", 10.0, 40000), row("TRL+nockpt", 30.0, 60000, 0.5), row("packed-flex+nockpt", 24.0, 30000, 0.4)]
    got = table({"config": {"batch": 16}, "missing": [], "rows": rows})
    assert got["batch 16: MFU of the fastest >= 35%"] == ("packed-flex+nockpt 40.0%", "met")
    # TRL without checkpointing out of memory and no run of ours without it: no "fits" row, and no crash
    oom = {"config": {"batch": 16}, "missing": ["TRL+nockpt"], "failures": {"TRL+nockpt": "out of memory"}}
    oom["rows"] = [row("TRL", 10.0, 40000), row("packed-flex", 18.0, 25000)]
    assert not any("fits" in t for t in table(oom))


def test_the_targets_markdown_file_is_the_printed_table(tmp_path, monkeypatch, capsys):
    """gpu_check.sh sends the printed table to /dev/null and appends the --markdown file to its summary."""
    from benchmarks import targets

    good = {"config": {"batch": 16}, "rows": [row("TRL", 2.0, 9), row("plain", 3.0, 9)], "missing": []}
    (tmp_path / "b16.json").write_text(json.dumps(good))
    out = tmp_path / "t.md"
    monkeypatch.setattr(sys, "argv", ["targets.py", str(tmp_path / "b16.json"), "--markdown", str(out)])
    targets.main()
    printed = capsys.readouterr().out
    assert "batch 16: padded >= 1.1x TRL | plain 1.50x | met" in printed and out.read_text() == printed


def test_steps_pair_by_their_index_past_compiling_steps():
    """A +compile run's compiling step is left out, and its later steps stay set against TRL's same steps (the same
    batches): renumbered, each would meet another batch."""
    from benchmarks.bench_trl import paired_ratio

    ours = [{"times": [1.0, 9.0, 1.0, 1.0], "compiled": [False, True, False, False]}]
    assert paired_ratio(ours, [{"times": [2.0, 2.0, 4.0, 4.0]}], 0) == 4.0


def test_a_runs_summary_takes_measured_steps_peaks_and_rises_over_its_rounds():
    from benchmarks.bench_trl import response_tokens, summarise

    rounds = [
        {"times": [9.0, 1.0, 2.0], "tokens": [100, 100, 400], "mfu": [0.9, 0.2, 0.3]},
        {"times": [9.0, 2.0, 2.0], "tokens": [100, 200, 200], "mfu": [0.9, 0.25, 0.25]},
    ]
    rounds[0] |= {"peak_rss_mb": 500, "rss_before_mb": 300, "peak_cuda_mb": 10}
    rounds[1] |= {"peak_rss_mb": 450, "rss_before_mb": 100, "peak_cuda_mb": 30}
    got = summarise("plain", rounds, warmup=1, batch=4, device="cuda")
    assert (got["steps"], got["median_step_s"], got["pairs_per_s"]) == (4, 2.0, 2.0)
    assert got["resp_tokens_per_s"] == 100.0  # tokens over seconds, step by step: 100, 200, 100, 100
    assert (got["peak_cuda_mb"], got["peak_rss_mb"], got["rss_rise_mb"]) == (30, 500, 350)
    assert got["mfu"] == 0.25  # of the measured steps (0.275 with the warm-up's)
    assert got["round_pairs_per_s"] == [4 / 1.5, 2.0]
    pairs = [{"chosen_input_ids": [1, 2], "rejected_input_ids": [3]}] * 4
    assert response_tokens(pairs, 2) == [6, 6]  # both responses of every pair of a step


def test_a_gradient_on_one_side_only_counts_whole():
    """A variant whose backward never reached some weights scored 0 error where TRL's gradient is all error."""
    import torch

    from benchmarks.bench_trl import gradient_error

    lin = torch.nn.Linear(2, 2)
    ones = [torch.ones_like(p) for p in lin.parameters()]
    assert gradient_error(lin, ones) == 1.0
    for p in lin.parameters():
        p.grad = torch.ones_like(p)
    assert gradient_error(lin, ones) == 0.0 and gradient_error(lin, [None, None]) == float("inf")


def test_the_report_benchmarks_data_and_peak_memory(tmp_path, monkeypatch):
    """bench_report.py: its data set has the shape the report reads (a BOS before every prompt, every response
    closed by the EOS id), and its memory figure is the peak (VmHWM), not the RSS now."""
    from benchmarks import bench_report
    from simpo_exp.data import report

    ds = bench_report.build(20)
    assert all(p[0] == 1 for p in ds["prompt_input_ids"])
    assert all(r[-1] == 2 for side in ("chosen_input_ids", "rejected_input_ids") for r in ds[side])
    block = bytearray(200 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touched: resident
    del block
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    assert bench_report.peak_rss_kib() >= int(status["VmRSS"].split()[0]) + 150_000
    monkeypatch.setattr(report, "end_token_ids", report.end_token_ids)  # measure() replaces both for its process
    monkeypatch.setattr(report, "chat_template_hash", report.chat_template_hash)
    ds.save_to_disk(str(tmp_path / "ds"))
    got = bench_report.measure(str(tmp_path / "ds"))
    assert got["pairs"] == 20 and got["bos_per_sequence"] and got["seconds"] >= 0


def test_a_report_cut_short_keeps_every_row_it_has_and_says_what_is_missing(tmp_path, capsys):
    """A run out of memory and one never reached: the table still has the rows measured, names the others, and the
    JSON carries the step times (targets read the speed step by step from them) and the failures."""
    from types import SimpleNamespace

    from benchmarks.targets import assess

    bench = load_bench()

    batches = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    hiccup = [10.0, *batches[1:]]  # TRL's slow first measured step: 1.34x by the medians, 1.10x step by step
    preset = {"warmup": 1, "batch": 4, "device": "cuda", "gradient_checkpointing": True}
    order = ["TRL", "plain", "packed", "prefix"]

    def reported(runs, failures):
        args = SimpleNamespace(json=str(tmp_path / "b.json"), markdown=str(tmp_path / "b.md"), threads=1)
        args.shared_process, args.preset, args.eager_check = False, "gpu", False
        bench.report(args, preset, {}, order, runs, 0.0, failures)
        return json.loads((tmp_path / "b.json").read_text()), (tmp_path / "b.md").read_text()

    runs = {"TRL": [run([0.0, *hiccup], 100)], "plain": [run([0.0, *(t / 1.1 for t in batches)], 60)]}
    result, table = reported(runs, {"packed": "out of memory"})
    assert "| packed | out of memory |" in table and "| prefix | not reached |" in table
    assert result["missing"] == ["packed", "prefix"] and result["failures"] == {"packed": "out of memory"}
    assert {(t, m) for t, m, _ in assess(result)} >= {("batch 4: padded >= 1.1x TRL", "plain 1.10x")}
    printed = capsys.readouterr().out
    plain = next(line for line in printed.splitlines() if line.startswith("plain "))
    assert plain.split()[1:3] == ["0.98", "1.10"] and "  0.60  " in plain  # pairs/s, x TRL, peak memory x TRL
    result, _ = reported({"plain": runs["plain"]}, {})  # TRL cut off: no comparison, said so
    assert ("batch 4: against TRL", "TRL not measured (not reached)", "n/a") in assess(result)
    result, _ = reported({"plain": runs["plain"]}, {"TRL": "out of memory"})
    assert ("batch 4: runs in one micro-batch where TRL does not", "TRL out of memory; plain ran", "met") in assess(
        result
    )


@pytest.mark.parametrize("loss,grad", [(1 + 2e-4, 0.0), (float("nan"), 0.0), (1.0, float("nan")), (1.0, 2e-3)])
def test_the_loss_check_stops_the_benchmark_before_any_timed_run(monkeypatch, loss, grad):
    """A variant whose first-batch loss or gradient is off TRL's (or not a number) is never timed."""
    bench = load_bench()
    monkeypatch.setattr(sys, "argv", ["bench_trl.py", "--preset", "cpu", "--variants", "plain"])
    timed = []

    def worker(spec, must_succeed=True):
        if spec["impl"] == "check":
            return {"trl": 1.0, "ours": {"plain": loss}, "grad_error": {"plain": grad}, "grad_unchecked": {}}
        timed.append(spec)
        raise AssertionError("timed")

    monkeypatch.setattr(bench, "run_worker", worker)
    with pytest.raises(SystemExit, match=r"loss check failed for \['plain'\]"):
        bench.main()
    assert timed == []


def test_a_benchmark_stopped_by_a_signal_still_writes_what_it_measured(tmp_path, monkeypatch):
    """``timeout`` stops the benchmark with SIGTERM (a SystemExit here): the JSON still holds TRL's row."""
    bench = load_bench()
    out = tmp_path / "b.json"
    monkeypatch.setattr(sys, "argv", ["bench_trl.py", "--preset", "cpu", "--variants", "plain", "--json", str(out)])
    measured = {"times": [1.0] * 4, "tokens": [10.0] * 4, "peak_rss_mb": 1.0, "rss_before_mb": 0.0}

    def worker(spec, must_succeed=True):
        if spec["impl"] == "check":
            return {"trl": 1.0, "ours": {"plain": 1.0}, "grad_error": {"plain": 0.0}, "grad_unchecked": {}}
        if spec["impl"] == "trl":
            return measured
        raise SystemExit(143)  # the signal arrives while our run is timed

    monkeypatch.setattr(bench, "run_worker", worker)
    with pytest.raises(SystemExit):
        bench.main()
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]] == ["TRL"] and result["missing"] == ["plain"]
    # TRL without checkpointing in two micro-batches a step: recorded, for targets' row to say so
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--trl-nockpt", "--trl-accum", "2"])
    with pytest.raises(SystemExit):
        bench.main()
    result = json.loads(out.read_text())
    assert result["config"]["trl_nockpt_accumulation"] == 2 and result["missing"] == ["plain"]


def test_a_tokenisation_that_differs_from_trls_stops_the_check(monkeypatch):
    bench = load_bench()
    real = bench.tokenize_like_trl

    def one_token_short(tok, rows, max_length):
        return [p | {"prompt_input_ids": p["prompt_input_ids"][:-1]} for p in real(tok, rows, max_length)]

    monkeypatch.setattr(bench, "tokenize_like_trl", one_token_short)
    spec = {"preset": "cpu", "overrides": {"batch": 2, "warmup": 0, "steps": 1}, "threads": 1, "variants": ["plain"]}
    with pytest.raises(SystemExit, match=r"token mismatch between TRL and this harness \(chosen, row 0\)"):
        bench.worker_check(spec)


def test_a_run_whose_gradients_are_not_finite_counts_its_skipped_steps(monkeypatch):
    import torch

    bench = load_bench()
    real = bench.step_loss
    monkeypatch.setattr(bench, "step_loss", lambda policy, batch: (real(policy, batch)[0] * torch.nan, {}))
    spec = {"preset": "cpu", "overrides": {"batch": 2, "warmup": 1, "steps": 2}, "variant": "plain"}
    assert bench.worker_ours(spec)["skipped_steps"] == 3


def test_the_tokenizer_hash_benchmark_builds_the_vocabulary_it_is_asked_for(tmp_path, capsys):
    """benchmarks/bench_tokenizer_hash.py: a byte-level BPE tokenizer of exactly --vocab tokens (256 bytes and their
    merges), hashed as a resume hashes it, the figures printed and written with the machine they came from."""
    from benchmarks.bench_tokenizer_hash import build, main
    from simpo_exp.model import tokenizer_hash

    result = main(["--vocab", "300", "--repeats", "2", "--json", str(tmp_path / "out.json")])
    assert (result["vocab"], result["merges"], len(result["seconds"])) == (300, 44, 2)
    assert json.loads((tmp_path / "out.json").read_text())["machine"]["tokenizers"]
    assert "tokenizer_hash over 300 tokens (44 merges" in capsys.readouterr().out
    assert tokenizer_hash(build(300)[0]) == tokenizer_hash(build(300)[0]) != tokenizer_hash(build(301)[0])
