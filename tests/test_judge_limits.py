"""A judge endpoint that rate-limits, fails on one prompt alone, replies with no text or with a list of parts; question
files that repeat an id; a judgment file cut inside a multi-byte character; a memory-only decoding setting changed
between a killed generation and its resume (fake endpoints on 127.0.0.1)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
from simpo_exp.evaluate.judge import JudgeError, PairwiseJudge
from tests.test_evaluate import ARENA_CASES, FakeJudge
from tests.test_evaluate_judging import serve
from tests.test_judge_faults import ASKED


class MoodyJudge(FakeJudge):
    """The fake judge, except: the first ``limited`` requests get HTTP 429 with ``Retry-After: retry_after``; a
    prompt holding ``broken`` gets HTTP 500 every time; a prompt holding ``silent`` gets a reply with no text; with
    ``parts``, replies come as a list of text parts."""

    requests: list[dict] = []
    limited, retry_after, broken, silent, parts = 0, "0", "\0", "\0", False
    broken_status = 500  # what a prompt holding ``broken`` gets
    limited_status = 429  # what the first ``limited`` requests get (503 with a Retry-After: busy too)
    failing = 0  # how many requests after the limited ones get HTTP 500

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.requests.append(body)
        text = json.dumps(body)
        limited = cls.limited > 0
        failing = not limited and cls.failing > 0
        status = (
            cls.limited_status if limited else 500 if failing else cls.broken_status if cls.broken in text else None
        )
        if status:
            cls.limited -= limited
            cls.failing -= failing
            self.send_response(status)
            if limited and cls.retry_after is not None:
                self.send_header("Retry-After", cls.retry_after)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "busy"}}')
            return
        content = "" if cls.silent in text else self.content(body)
        if cls.parts:
            content = [{"type": "text", "text": content[:1]}, {"type": "text", "text": content[1:]}]
        reply = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@pytest.fixture
def moody(tmp_path):
    server, url = serve(MoodyJudge)
    MoodyJudge.limited, MoodyJudge.retry_after, MoodyJudge.broken = 0, "0", "\0"
    MoodyJudge.silent, MoodyJudge.parts, MoodyJudge.broken_status, MoodyJudge.requests = "\0", False, 500, []
    MoodyJudge.limited_status, MoodyJudge.failing = 429, 0
    judge = JudgeConfig(kind="openai", base_url=url, model="fake", max_retries=0, timeout_s=5)
    yield SimpleNamespace(judge=judge, out=tmp_path)
    server.shutdown()


def alpaca(moody, n: int = 3, file: str = "v.jsonl"):
    prompts = [{"id": str(i), "instruction": f"Say {i}", "reference": "x"} for i in range(n)]
    return PairwiseJudge(moody.judge, "benchmarks.alpacaeval2").judge(prompts, ["yy"] * n, moody.out / file)


def arena(moody, cases=ARENA_CASES[:2]):
    from simpo_exp.evaluate.arena import judge_arena_hard

    b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=moody.judge)
    prompts = [{"id": f"q{i}", "instruction": q, "reference": r} for i, (q, r, _) in enumerate(cases)]
    return judge_arena_hard(b, prompts, [m for _, _, m in cases], "my-model", "gpt-4-0314", moody.out)


def test_a_rate_limit_is_waited_out_as_the_endpoint_asks_without_spending_the_tries(moody):
    """Three 429s with Retry-After, max_retries=0: the first one ended the benchmark with 'did not answer ...
    start the judge'; the waits are not tries."""
    MoodyJudge.limited = 3
    assert [v["preference"] for v in alpaca(moody)] == [2.0, 2.0, 2.0]
    assert len(MoodyJudge.requests) == 6


def test_a_rate_limit_that_asks_no_wait_is_waited_out_and_ends_at_its_budget(moody):
    """``Retry-After: 0`` (or a date already past) on every request: taken as asked, the request went again at once, the
    wait counted nothing against the budget, and the judging sent about a thousand requests a second for ever. Now
    such an answer waits as one without the header does (1 s, 2 s, ...), within judge.rate_limit_wait_s."""
    moody.judge.rate_limit_wait_s, moody.judge.concurrency = 3.0, 1
    MoodyJudge.limited = 50  # (the code before answered the 51st request, not waiting once)
    with pytest.raises(JudgeError, match=r"stayed rate-limited \(HTTP 429: .*waited 3 s in all, and 4 s more"):
        alpaca(moody, 1)
    assert len(MoodyJudge.requests) == 3  # the first request, and one after each wait (1 s, 2 s)


def test_a_rate_limit_past_its_budget_stops_and_says_it_was_a_rate_limit(moody):
    moody.judge.rate_limit_wait_s = 5.0
    MoodyJudge.limited, MoodyJudge.retry_after = 1, "30"  # a pause past the budget: not waited at all
    with pytest.raises(JudgeError, match=r"stayed rate-limited \(HTTP 429: .*rate_limit_wait_s=5.0.*rate limit to"):
        alpaca(moody, 1)
    assert len(MoodyJudge.requests) == 1


def test_a_prompt_the_endpoint_always_fails_on_costs_its_verdict_and_a_down_endpoint_stops(moody):
    """A proxy that answers one over-long prompt with HTTP 500: every re-run stopped at it, so the benchmark never
    finished. Now that prompt (or game) has no verdict, its line says why, the others are judged, and the next run
    asks it alone again. An endpoint that answers nothing stops the judging: at once where prompts wait after
    FAILED_IN_A_ROW failures with none answered between, else at the end, where nothing was answered at all."""
    from simpo_exp.evaluate.judge import FAILED_IN_A_ROW

    MoodyJudge.broken = "Say 1"
    verdicts = alpaca(moody)
    assert [v["preference"] for v in verdicts] == [2.0, None, 2.0]
    assert "no answer after 1 tries (HTTP 500" in verdicts[1]["error"]
    MoodyJudge.broken, before = "\0", len(MoodyJudge.requests)
    assert [v["preference"] for v in alpaca(moody)] == [2.0, 2.0, 2.0]  # asked again, alone
    assert len(MoodyJudge.requests) == before + 1

    MoodyJudge.broken = "Explain hashing."  # both games of the second question
    res = arena(moody)
    counts = [res["metrics"][k] for k in ("judged_games", "unparseable_games", "unjudged_games")]
    assert counts == [2, 0, 2]  # the endpoint's failures, not the judge's word: counted apart
    assert "2 of 4 games got no reply from the judge endpoint" in res["notes"][0] and "HTTP 500" in res["notes"][0]

    MoodyJudge.broken, MoodyJudge.requests = "Say", []  # every prompt: the endpoint is down
    moody.judge.concurrency = 1
    with pytest.raises(JudgeError, match=rf"{FAILED_IN_A_ROW} requests in a row got no answer.*HTTP 500"):
        alpaca(moody, 8, "down.jsonl")
    assert len(MoodyJudge.requests) == FAILED_IN_A_ROW  # the rest not asked: the next prompt's thread stops
    with pytest.raises(JudgeError, match=r"did not answer after 1 tries \(HTTP 500.*start the judge"):
        alpaca(moody, 2, "down2.jsonl")  # fewer prompts than that: every one failed, none answered


def test_an_arena_game_the_judge_answered_with_no_text_is_asked_again_by_the_next_run(moody):
    """An empty reply was stored as a final game without a label: never asked again, out of the score for good."""
    MoodyJudge.silent = "Explain hashing."
    first = arena(moody)
    assert first["metrics"]["unjudged_games"] == 2 and "replied with no text" in first["notes"][0]
    asked = len(MoodyJudge.requests)
    assert asked == 4  # q0's two games and q1's two, each given up at its empty reply
    MoodyJudge.silent = "\0"
    again = arena(moody)
    assert again["metrics"]["unjudged_games"] == 0 and again["metrics"]["judged_games"] == 4
    assert len(MoodyJudge.requests) == asked + 2  # q1's two games only


def test_a_stored_arena_judgment_with_an_empty_game_is_asked_again(moody):
    """A line stored before empty replies were marked (judgment "\\n", score null, no error): its empty game is
    asked again, its other game reused."""
    first = arena(moody, ARENA_CASES[:1])
    path = moody.out / "model_judgment" / "fake" / "my-model.jsonl"
    line = json.loads(path.read_text())
    line["games"][1].update(judgment="\n", score=None)
    path.write_text(json.dumps(line) + "\n")
    asked = len(MoodyJudge.requests)
    assert arena(moody, ARENA_CASES[:1])["metrics"] == first["metrics"]
    assert len(MoodyJudge.requests) == asked + 1


def test_a_reply_given_as_a_list_of_text_parts_is_read_as_its_text(moody):
    """Some endpoints give message.content as [{"type": "text", "text": ...}]: a TypeError, no item named."""
    MoodyJudge.parts = True
    assert [v["preference"] for v in alpaca(moody)] == [2.0, 2.0, 2.0]  # the longer answer, the model's
    assert arena(moody)["metrics"]["judged_games"] == 4


def test_a_question_file_that_repeats_an_id_is_refused_naming_both_rows(tmp_path):
    """Two files joined: the second 'a' was paired with the first's baseline answer, judged once, counted twice."""
    from simpo_exp.data.sources import DataSourceError
    from simpo_exp.evaluate.benchmarks import arena_prompts

    questions, answers = tmp_path / "question.jsonl", tmp_path / "base.jsonl"
    ids = ["a", "b", "a"]
    questions.write_text(
        "".join(json.dumps({"question_id": q, "turns": [{"content": f"Q{i}"}]}) + "\n" for i, q in enumerate(ids))
    )
    answers.write_text(
        "".join(
            json.dumps({"question_id": q, "model_id": "base", "choices": [{"turns": [{"content": f"ans {q}"}]}]}) + "\n"
            for q in ("a", "b")
        )
    )
    with pytest.raises(DataSourceError, match=r"question.jsonl'.*row 2 repeats question_id 'a' of row 0"):
        arena_prompts(str(questions), str(answers), "benchmarks.arena-hard", None)


def test_a_judgment_file_cut_inside_a_character_resumes_without_its_last_line(tmp_path):
    """A kill in the middle of a multi-byte character (CJK prompts) made the next run die with UnicodeDecodeError."""
    from simpo_exp.inference.files import DamagedFile, read_jsonl
    from simpo_exp.rundir import read_jsonl as read_lines

    path = tmp_path / "v.jsonl"
    whole = json.dumps({"id": "0", "reply": "a"}) + "\n"
    cut = json.dumps({"id": "1", "reply": "排序"}, ensure_ascii=False).encode()
    path.write_bytes(whole.encode() + cut[: cut.index("序".encode()) + 1])
    assert read_lines(path) == [{"id": "0", "reply": "a"}]
    with pytest.raises(DamagedFile, match=r"v.jsonl: not valid UTF-8 at byte"):
        read_jsonl(path)  # a file written whole: damage is named, not skipped


def test_a_lower_vllm_memory_share_resumes_stored_answers(tmp_path):
    """Killed for memory, re-run with a lower vllm_gpu_memory_utilization: refused, asking to delete the answers
    made so far, though the share changes no answer."""
    from simpo_exp.evaluate.run import _check_manifest
    from simpo_exp.inference.files import write_json

    path = tmp_path / "trained-manifest.json"
    decoding = {"temperature": 0.0, "max_new_tokens": 64}
    write_json(path, {"weights": "w", "decoding": {**decoding, "vllm_gpu_memory_utilization": 0.9}})
    _check_manifest(path, {"weights": "w", "decoding": decoding}, has_answers=True)
    with pytest.raises(Exception, match=r"decoding.temperature: stored 0.0, now 0.7"):
        _check_manifest(path, {"weights": "w", "decoding": {**decoding, "temperature": 0.7}}, has_answers=True)


def test_prompts_the_endpoint_failed_are_counted_apart_and_their_win_rates_are_not_ranked(moody, tmp_path):
    """Requests the endpoint refused or failed were counted as replies that were "not 'a' or 'b'", the command
    printed "rank them", and compare ranked the judged part's win rate (4 of 6 verdicts) above full ones, unremarked.
    They are counted as unjudged, said as the endpoint's, and compare notes the runs whose judging waits."""
    from simpo_exp import compare
    from simpo_exp.evaluate.run import _judge_pairs
    from simpo_exp.inference.files import write_json

    MoodyJudge.broken = "Say 1"
    b = BenchmarkConfig(name="alpacaeval2", kind="alpacaeval", judge=moody.judge)
    prompts = [{"id": str(i), "instruction": f"Say {i}", "reference": "x"} for i in range(3)]
    info = {"rows": 805, "reference_generator": "gpt4_turbo"}
    metrics, notes = _judge_pairs({"benchmark": b, "out": moody.out}, prompts, ["yy"] * 3, info, "me")
    assert (metrics["unjudged"], metrics["unparseable_verdicts"], metrics["win_rate"]) == (1, 0, 100.0)
    assert any(n.startswith("1 of 3 prompts got no reply from the judge endpoint") and "HTTP 500" in n for n in notes)
    assert not any("not 'a' or 'b'" in n for n in notes)

    run = tmp_path / "runs" / "0"
    write_json(run / "eval" / "alpacaeval2" / "results.json", {"benchmark": "alpacaeval2", "metrics": metrics})
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("beta: 2.0\n")
    note = compare.awaiting_judge_note(compare.load_runs(tmp_path / "runs"))
    assert note and "refused or failed some requests of 0 alpacaeval2" in note and "do not rank yet" in note
    metrics["unjudged"] = 0
    write_json(run / "eval" / "alpacaeval2" / "results.json", {"benchmark": "alpacaeval2", "metrics": metrics})
    assert compare.awaiting_judge_note(compare.load_runs(tmp_path / "runs")) is None


@pytest.mark.parametrize("status", [500, 400])
def test_a_rerun_asking_only_the_prompts_that_failed_before_judges_on(tmp_path, status):
    """The first run judged most prompts and left a few the endpoint always fails (HTTP 500) or refuses (400); the
    re-run asked those alone, so every request of it failed: after FAILED_IN_A_ROW 500s it stopped as if the endpoint
    were down, after REFUSED_BEFORE_ANY 400s as if it refused a setting, on every re-run, and the benchmark kept no
    results. The earlier answers show the endpoint works: those prompts stay unjudged and the rest stands."""
    from simpo_exp.evaluate.judge import FAILED_IN_A_ROW, REFUSED_BEFORE_ANY

    failing = {f"Say {i}." for i in (1, 4, 7, 10, 13, 16)}  # spread out: never FAILED_IN_A_ROW in a row at first
    assert len(failing) > max(FAILED_IN_A_ROW, REFUSED_BEFORE_ANY)

    class Failing(FakeJudge):
        requests: list = []

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            type(self).requests.append(body)
            if any(f in json.dumps(body) for f in failing):
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b'{"error": {"message": "maximum context length is 8192 tokens"}}')
                return
            reply = json.dumps({"choices": [{"message": {"content": self.content(body)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server, url = serve(Failing)
    try:
        judge = JudgeConfig(kind="openai", base_url=url, model="fake", max_retries=0, timeout_s=5, concurrency=1)
        prompts = [{"id": str(i), "instruction": f"Say {i}.", "reference": "x"} for i in range(18)]
        path = tmp_path / "v.jsonl"
        first = PairwiseJudge(judge, "benchmarks.alpacaeval2").judge(prompts, ["yy"] * 18, path)
        unjudged = {v["id"] for v in first if v.get("error")}
        assert unjudged == {"1", "4", "7", "10", "13", "16"}
        Failing.requests = []
        again = PairwiseJudge(judge, "benchmarks.alpacaeval2").judge(prompts, ["yy"] * 18, path)
        assert len(Failing.requests) == len(failing)  # those alone asked, every one
        assert {v["id"] for v in again if v.get("error")} == unjudged
        assert sum(v["preference"] is not None for v in again) == 18 - len(failing)
    finally:
        server.shutdown()


def test_an_empty_alpacaeval_reply_is_unjudged_not_the_judges_word(moody, tmp_path):
    """An endpoint that answered one prompt with no text: its line was counted in unparseable_verdicts (the judge's
    own answer, never asked again), unjudged stayed 0, and the run was offered for ranking as finished."""
    from simpo_exp.evaluate.run import _judge_pairs

    MoodyJudge.silent = "Say 1"
    prompts = [{"id": str(i), "instruction": f"Say {i}", "reference": "xx"} for i in range(3)]
    b = BenchmarkConfig(name="alpacaeval2", kind="alpacaeval", judge=moody.judge)
    info = {"rows": 3, "reference_generator": "r"}
    metrics, notes = _judge_pairs({"benchmark": b, "out": tmp_path}, prompts, ["yyy"] * 3, info, "me")
    assert metrics["unjudged"] == 1 and metrics["unparseable_verdicts"] == 0, metrics
    assert any("replied with no text" in n for n in notes) and not any("not 'a' or 'b'" in n for n in notes)


def test_an_arena_game_out_of_replies_without_a_label_goes_on_under_more_label_attempts(moody):
    """A game that used every reply label_attempts allowed without a verdict label was stored as judged with no
    verdict, its replies dropped: a re-run with a larger label_attempts reused it as it was and asked nothing. It
    keeps its replies now, and such a re-run asks it to finish from them (one request a game), not from the start."""
    from dataclasses import replace

    cases = [ARENA_CASES[4], ARENA_CASES[0]]  # a label only once the judge is asked to finish; one at once
    moody.judge = replace(moody.judge, label_attempts=1)
    first = arena(moody, cases)
    assert first["metrics"]["unparseable_games"] == 2 and first["metrics"]["judged_games"] == 2
    MoodyJudge.requests = []
    again = arena(moody, cases)  # the same label_attempts: nothing asked again
    assert MoodyJudge.requests == [] and again["metrics"] == first["metrics"]
    moody.judge = replace(moody.judge, label_attempts=2)
    more = arena(moody, cases)
    assert len(MoodyJudge.requests) == 2  # the late question's two games, each once more
    assert all(len(body["messages"]) == 4 for body in MoodyJudge.requests)  # from the stored reply: asked to finish
    assert more["metrics"]["unparseable_games"] == 0 and more["metrics"]["judged_games"] == 4
    # back at label_attempts=1: the finished judgments stay the ones used, not the earlier unfinished copy (still
    # valid at 1, and kept aside), and nothing is asked
    MoodyJudge.requests = []
    moody.judge = replace(moody.judge, label_attempts=1)
    assert arena(moody, cases)["metrics"] == more["metrics"] and MoodyJudge.requests == []


# ----------------------------------------------------------------------------- from a mutation review of judge.py
def test_retry_after_reads_seconds_and_http_dates():
    """An HTTP date asks for the time until it (a 429's pause, and what makes a 503 a rate limit); one past asks for
    none; a value that is neither is no pause asked."""
    import email.utils
    import time
    import urllib.error

    from simpo_exp.evaluate.judge import retry_after

    def error(value):
        return urllib.error.HTTPError("http://x", 429, "busy", {"Retry-After": value}, None)

    assert 28 <= retry_after(error(email.utils.formatdate(time.time() + 30, usegmt=True))) <= 30
    assert retry_after(error(email.utils.formatdate(time.time() - 30, usegmt=True))) == 0.0
    assert retry_after(error("7")) == 7.0 and retry_after(error("soon")) is None


@pytest.mark.parametrize("content", [{"text": "a"}, 5, [{"text": "a"}, "b"]])
def test_a_reply_of_another_shape_is_no_reply_text(content):
    """Stored as a reply, it would be the judge's own word without a verdict, never asked again: TypeError, asked
    again as a failed request."""
    from simpo_exp.evaluate.judge import reply_text

    with pytest.raises(TypeError, match="not text"):
        reply_text(content)


def test_a_503_without_a_pause_asked_costs_one_prompt_not_the_benchmark(moody):
    """A proxy's 503 on one prompt, with no Retry-After: the endpoint's trouble with that prompt, after its tries;
    taken for a rate limit it stopped the whole benchmark once the wait budget ran out."""
    moody.judge.rate_limit_wait_s = 0.5
    MoodyJudge.broken, MoodyJudge.broken_status = "Say 1", 503
    verdicts = alpaca(moody)
    assert [v["preference"] for v in verdicts] == [2.0, None, 2.0]
    assert "no answer after 1 tries (HTTP 503" in verdicts[1]["error"]


def test_prompts_that_failed_before_are_asked_after_the_new_ones(moody):
    """A down endpoint shows as failures on prompts never asked before; asked first, the ones that failed before
    spent their tries on it."""
    import json

    from simpo_exp.evaluate.judge import _sha256

    judge, lines = PairwiseJudge(moody.judge, "benchmarks.alpacaeval2"), []
    for i in ("0", "1"):  # replied with no text (the endpoint's failure): asked again
        model_first, content = judge.judge_prompt({"id": i, "instruction": f"Say {i}", "reference": "x"}, "yy")
        line = {"id": i, "judge": "fake", "prompt_sha256": _sha256(content), "model_first": model_first, "reply": ""}
        lines.append(line)
    (moody.out / "v.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    moody.judge.concurrency = 1
    alpaca(moody, 4)
    asked = [r["messages"][1]["content"].split("## Instruction\n", 1)[1].split("\n", 1)[0] for r in MoodyJudge.requests]
    assert asked == ["Say 2", "Say 3", "Say 0", "Say 1"]


def test_a_rerun_whose_new_prompts_all_fail_keeps_its_stored_verdicts(moody):
    """The endpoint answered before: one or two new prompts failing are unjudged, not the endpoint down."""
    assert [v["preference"] for v in alpaca(moody, 2)] == [2.0, 2.0]
    MoodyJudge.broken = "Say"
    assert [v["preference"] for v in alpaca(moody, 4)] == [2.0, 2.0, None, None]


def test_a_half_written_last_line_is_dropped_before_the_next_verdict_is_appended(tmp_path):
    """A killed run's cut line left in place: the next verdict appended was glued onto it, and lost at the next read."""
    import json

    from simpo_exp.evaluate.judge import stored_lines

    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps({"id": "0", "reply": "a"}) + "\n" + '{"id": "1", "jud')
    assert list(stored_lines(path, "id", lambda r: True)) == ["0"]
    text = path.read_text()
    assert text.endswith("\n") and [json.loads(line)["id"] for line in text.splitlines()] == ["0"]
    # verdicts of another judge prompt (another baseline's, paid for) stay in the file from the first rewrite on: a
    # run killed before its next write keeps them
    path.write_text("".join(json.dumps({"id": i, "judge": j}) + "\n" for i, j in (("0", "m"), ("1", "other"))))
    others = []
    assert list(stored_lines(path, "id", lambda r: r["judge"] == "m", others)) == ["0"]
    assert others == [{"id": "1", "judge": "other"}]
    assert sorted(json.loads(line)["id"] for line in path.read_text().splitlines()) == ["0", "1"]


def _paused_judge(moody, **settings):
    """A pairwise judge whose pauses are recorded, not slept."""
    for key, value in settings.items():
        setattr(moody.judge, key, value)
    judge, pauses = PairwiseJudge(moody.judge, "benchmarks.alpacaeval2"), []
    judge.stopping = SimpleNamespace(is_set=lambda: False, wait=pauses.append)
    return judge, pauses


def test_a_rate_limit_waits_double_up_to_a_minute_and_failed_tries_up_to_eight_seconds(moody):
    """Without a Retry-After a rate-limited request waits 1, 2, 4 ... s, at most a minute each, without spending its
    tries; a failed request waits 1, 2, 4, 8, 8 s between its tries."""
    MoodyJudge.limited, MoodyJudge.retry_after = 8, None
    judge, pauses = _paused_judge(moody, rate_limit_wait_s=10_000)
    assert judge.verdict(ASKED, "yy")["preference"] in (1.0, 2.0)
    assert pauses == [1, 2, 4, 8, 16, 32, 60, 60]
    MoodyJudge.broken = "Say 0"
    judge, pauses = _paused_judge(moody, max_retries=5)
    assert judge.verdict(ASKED, "yy")["preference"] is None and pauses == [1, 2, 4, 8, 8]


def test_rate_limit_waits_spend_no_tries_and_a_503_with_a_retry_after_is_waited_out(moody):
    """Two 429s then one failure, with one retry: the retry is the failure's (the waits took none of them). A 503
    that asks for a pause (Retry-After) is a busy endpoint, waited out as a 429 is, not a failed try."""
    MoodyJudge.limited, MoodyJudge.retry_after, MoodyJudge.failing = 2, None, 1
    judge, pauses = _paused_judge(moody, max_retries=1, rate_limit_wait_s=100)
    assert judge.verdict(ASKED, "yy")["preference"] in (1.0, 2.0)
    assert pauses == [1, 2, 1] and len(MoodyJudge.requests) == 4
    MoodyJudge.limited_status, MoodyJudge.limited, MoodyJudge.retry_after = 503, 1, "3"
    judge, pauses = _paused_judge(moody, max_retries=0, rate_limit_wait_s=100)
    assert judge.verdict(ASKED, "yy")["preference"] in (1.0, 2.0) and pauses == [3.0]


def test_a_reply_of_parts_is_its_text_parts_joined_and_an_unreachable_endpoint_is_told_apart():
    import socket
    import urllib.error

    from simpo_exp.evaluate.judge import reply_text, unreachable_error

    parts = [{"type": "reasoning", "summary": "..."}, {"type": "text", "text": "[[A"}, {"type": "text", "text": ">B]]"}]
    assert reply_text(parts) == "[[A>B]]" and reply_text(None) == "" and reply_text("b") == "b"
    with pytest.raises(TypeError, match="a int, not text"):
        reply_text(3)
    assert unreachable_error(urllib.error.URLError(socket.gaierror(-2, "Name or service not known")))
    assert unreachable_error(urllib.error.URLError(ConnectionRefusedError()))
    assert not unreachable_error(urllib.error.URLError(TimeoutError()))  # an endpoint slow on one request
