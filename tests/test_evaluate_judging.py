"""Judge replies are kept as they arrive: a judging killed between two replies, or given a reply it cannot read,
loses nothing it paid for, and the re-run asks only for what is missing (fake endpoints on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from simpo_exp.inference.files import read_jsonl, write_jsonl
from tests.runs import free_port, run_env
from tests.test_evaluate import ARENA_CASES, FakeJudge

# (instruction, reference answer, the model's answer) for the one-letter judge, which prefers the longer output
ALPACA_CASES = [(f"Say something about {i}.", "r" * (5 + 7 * i), "m" * (30 - 4 * i)) for i in range(6)]

# Judges in a process of its own, so that the test can kill it; argv: the spec file written by `judging_spec`.
CLIENT = """
import json, sys
from pathlib import Path
from simpo_exp.evaluate.arena import judge_arena_hard
from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
from simpo_exp.evaluate.judge import PairwiseJudge

spec = json.loads(Path(sys.argv[1]).read_text())
judge = JudgeConfig(kind="openai", base_url=spec["url"], model="org/fake-judge", max_retries=0, timeout_s=30,
                    concurrency=spec["concurrency"])
if spec["kind"] == "arena_hard":
    b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=judge)
    judge_arena_hard(b, spec["prompts"], spec["texts"], "my-model", "gpt-4-0314", Path(spec["out"]))
else:
    path = Path(spec["out"], "verdicts.jsonl")
    PairwiseJudge(judge, "benchmarks.alpacaeval2").judge(spec["prompts"], spec["texts"], path)
"""


def cases(kind: str) -> tuple[list[dict], list[str]]:
    rows = ARENA_CASES if kind == "arena_hard" else ALPACA_CASES
    prompts = [{"id": f"q{i}", "instruction": q, "reference": r} for i, (q, r, _) in enumerate(rows)]
    return prompts, [m for _, _, m in rows]


def journal(kind: str, out: Path) -> Path:
    """The file the judging appends to."""
    return (
        out / "model_judgment" / "org_fake-judge" / "my-model.jsonl" if kind == "arena_hard" else out / "verdicts.jsonl"
    )


class KillingJudge(FakeJudge):
    """The fake judge until ``replies`` replies are sent; the next request waits until the judging process has
    written ``lines`` lines to ``journal`` and then ends that process with SIGTERM, as a scheduler ends a job."""

    requests: list[dict] = []
    replies, lines, journal, pid = 0, 0, Path("/nonexistent"), 0

    def do_POST(self):  # noqa: N802
        if len(self.requests) < self.replies:
            return super().do_POST()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and written(self.journal) < self.lines:
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGTERM)


def written(path: Path) -> int:
    """Whole lines in ``path`` so far."""
    return path.read_text().count("\n") if path.is_file() else 0


class CountingJudge(FakeJudge):
    requests: list[dict] = []


class OddReplyJudge(FakeJudge):
    """The one-letter judge, which answers a prompt about 3 with a sentence instead of a letter."""

    requests: list[dict] = []

    def content(self, body: dict) -> str:
        return "Output (b) is better." if "about 3." in body["messages"][-1]["content"] else super().content(body)


def serve(handler) -> tuple[ThreadingHTTPServer, str]:
    handler.requests.clear()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def judge_killed_after(kind: str, replies: int, lines: int, out: Path) -> Path:
    """Judge in a child process (one request at a time) that is killed after ``replies`` replies; its journal."""
    KillingJudge.replies, KillingJudge.lines, KillingJudge.journal = replies, lines, journal(kind, out)
    server, url = serve(KillingJudge)
    prompts, texts = cases(kind)
    spec = out / f"{kind}-spec.json"
    spec.write_text(
        json.dumps({"kind": kind, "url": url, "prompts": prompts, "texts": texts, "out": str(out), "concurrency": 1})
    )
    try:
        child = subprocess.Popen([sys.executable, "-c", CLIENT, str(spec)], env=run_env(), stderr=subprocess.PIPE)
        KillingJudge.pid = child.pid
        _, err = child.communicate(timeout=300)
    finally:
        server.shutdown()
    assert child.returncode == -signal.SIGTERM, err.decode()[-2000:]
    assert len(KillingJudge.requests) == replies
    return journal(kind, out)


def test_a_killed_arena_hard_judging_keeps_its_judgments_and_the_rerun_asks_only_the_rest(tmp_path):
    from simpo_exp.evaluate.arena import judge_arena_hard
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig

    # 8 replies: the 4 questions with a label at once, both games each; killed while q4's first game is asked
    path = judge_killed_after("arena_hard", replies=8, lines=4, out=tmp_path)
    kept = read_jsonl(path)  # every line whole: arena-hard-auto's format even before the judging ends
    assert sorted(r["question_id"] for r in kept) == ["q0", "q1", "q2", "q3"]
    assert all(r["judge"] == "org/fake-judge" and len(r["games"]) == 2 for r in kept)

    server, url = serve(CountingJudge)
    try:
        judge = JudgeConfig(kind="openai", base_url=url, model="org/fake-judge", max_retries=0, timeout_s=5)
        b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=judge)
        prompts, texts = cases("arena_hard")
        res = judge_arena_hard(b, prompts, texts, "my-model", "gpt-4-0314", tmp_path)
    finally:
        server.shutdown()
    # only q4 and q5 are asked: two games each, each game asked twice (a label only when asked to finish, or never)
    asked = {r["messages"][1]["content"].split("\n")[1] for r in CountingJudge.requests}
    assert len(CountingJudge.requests) == 8 and asked == {ARENA_CASES[4][0], ARENA_CASES[5][0]}
    assert res["metrics"]["win_rate"] == pytest.approx(100 * 11 / 18)  # as one uninterrupted judging gives
    rows = read_jsonl(path)
    assert [r["question_id"] for r in rows] == [f"q{i}" for i in range(6)]  # rewritten in question order
    assert rows[:4] == sorted(kept, key=lambda r: r["question_id"])


def test_a_killed_alpacaeval_judging_keeps_its_verdicts_and_the_rerun_asks_only_the_rest(tmp_path):
    from simpo_exp.evaluate.config import JudgeConfig
    from simpo_exp.evaluate.judge import PairwiseJudge

    path = judge_killed_after("alpacaeval", replies=3, lines=3, out=tmp_path)
    kept = read_jsonl(path)
    assert sorted(r["id"] for r in kept) == ["q0", "q1", "q2"]

    prompts, texts = cases("alpacaeval")
    server, url = serve(CountingJudge)
    try:
        judge = PairwiseJudge(JudgeConfig(kind="openai", base_url=url, model="org/fake-judge"), "benchmarks.a")
        verdicts = judge.judge(prompts, texts, path)
        assert len(CountingJudge.requests) == 3  # q3, q4, q5 only
        fresh = judge.judge(prompts, texts, tmp_path / "fresh.jsonl")  # one judging from the start
        changed = judge.judge(prompts, [texts[0] + "!", *texts[1:]], path)
    finally:
        server.shutdown()
    # the file: this judging's verdicts in prompt order, after the one for q0's earlier answer (kept, should it return)
    assert verdicts == fresh and [v["id"] for v in read_jsonl(path)] == ["q0", *(f"q{i}" for i in range(6))]
    model_longer = [len(m) > len(r) for _, r, m in ALPACA_CASES]
    assert [v["preference"] == 2.0 for v in verdicts] == model_longer and 0 < sum(model_longer) < 6
    # a changed answer is asked again, nothing else
    assert len(CountingJudge.requests) == 3 + 6 + 1 and changed[1:] == verdicts[1:]


@pytest.mark.parametrize(
    "reply, preference",
    [
        ("a", 2.0),
        (" (b)\n", 1.0),
        ("**A**", 2.0),
        ("Output (a).", 2.0),
        ("Answer: b", 1.0),
        # sentences that merely start with a letter were read as verdicts: "Answer: b" as (a), "A tie." as (a)
        ("Both are equally good.", None),
        ("A tie.", None),
        ("Based on the instruction, (a)", None),
        ("ab", None),
        ("", None),
        ("c", None),  # a third letter (a judge's tie, say) is no side's win
        ("(c)", None),
    ],
)
def test_only_a_reply_that_is_one_letter_is_a_verdict(reply, preference):
    from simpo_exp.evaluate.judge import reply_preference

    assert reply_preference(reply, model_first=True) == preference
    flipped = None if preference is None else 3.0 - preference  # the model's answer shown as (b)
    assert reply_preference(reply, model_first=False) == flipped


def test_stored_verdicts_are_read_again_from_their_replies(tmp_path):
    """A verdict stored with a preference an older reading of its reply got wrong is not carried over."""
    from simpo_exp.evaluate.judge import PairwiseJudge, _sha256

    prompts, texts = cases("alpacaeval")
    from simpo_exp.evaluate.config import JudgeConfig

    j = JudgeConfig(kind="openai", base_url="http://127.0.0.1:9", model="org/fake-judge", max_retries=0, timeout_s=1)
    judge = PairwiseJudge(j, "x")  # nothing is asked: every verdict is stored
    lines = []
    for p, t in zip(prompts, texts):
        model_first, content = judge.judge_prompt(p, t)
        lines.append(
            {"id": p["id"], "judge": "org/fake-judge", "prompt_sha256": _sha256(content), "model_first": model_first}
        )
    lines = [{**line, "reply": "Both are good.", "preference": 1.0} for line in lines]
    write_jsonl(tmp_path / "verdicts.jsonl", lines)
    assert [v["preference"] for v in judge.judge(prompts, texts, tmp_path / "verdicts.jsonl")] == [None] * len(lines)


def test_a_reply_without_a_letter_is_no_verdict_and_the_others_count(tmp_path):
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
    from simpo_exp.evaluate.run import _judge_pairs

    prompts, texts = cases("alpacaeval")
    server, url = serve(OddReplyJudge)
    try:
        judge = JudgeConfig(kind="openai", base_url=url, model="org/fake-judge", max_retries=0, timeout_s=5)
        ctx = {"benchmark": BenchmarkConfig(name="alpacaeval2", kind="alpacaeval", judge=judge), "out": tmp_path}
        info = {"rows": 6, "reference_generator": "gpt4_1106_preview"}
        metrics, notes = _judge_pairs(ctx, prompts, texts, info, "my-model")
        again = _judge_pairs(ctx, prompts, texts, info, "my-model")  # the re-run (judge_only) asks nothing
    finally:
        server.shutdown()
    assert len(OddReplyJudge.requests) == 6 and again == (metrics, notes)
    verdicts = read_jsonl(tmp_path / "verdicts" / "org_fake-judge.jsonl")
    assert [v["preference"] for v in verdicts][3] is None and verdicts[3]["reply"] == "Output (b) is better."
    others = [len(m) > len(r) for i, (_, r, m) in enumerate(ALPACA_CASES) if i != 3]
    assert metrics["win_rate"] == pytest.approx(100 * sum(others) / 5) and metrics["unparseable_verdicts"] == 1
    assert metrics["standard_error"] == pytest.approx(100 * statistics.stdev(others) / 5**0.5)  # over the five too
    assert "1 of 6 judge replies were not 'a' or 'b'" in notes[0]
    pairs = json.loads((tmp_path / "annotations.json").read_text())
    assert [p["instruction"] for p in pairs] == [q for i, (q, _, _) in enumerate(ALPACA_CASES) if i != 3]


def test_each_judge_keeps_its_own_verdicts_so_coming_back_to_one_asks_it_nothing(tmp_path):
    """Judging with another judge model replaced the first one's verdicts.jsonl: coming back to it asked (and paid)
    for every verdict again. A verdicts.jsonl of the single file kept before is moved to its judge's file."""
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
    from simpo_exp.evaluate.run import _judge_pairs, verdicts_path

    prompts, texts = cases("alpacaeval")
    info = {"rows": 6, "reference_generator": "gpt4_1106_preview"}

    class Judge(FakeJudge):
        requests: list[dict] = []

    server, url = serve(Judge)
    try:

        def judged_by(model: str) -> dict:
            judge = JudgeConfig(kind="openai", base_url=url, model=model, max_retries=0, timeout_s=5)
            ctx = {"benchmark": BenchmarkConfig(name="alpacaeval2", kind="alpacaeval", judge=judge), "out": tmp_path}
            return _judge_pairs(ctx, prompts, texts, info, "my-model")[0]

        first = judged_by("org/fake-judge")
        judged_by("other-judge")
        assert len(Judge.requests) == 12
        assert judged_by("org/fake-judge") == first and len(Judge.requests) == 12  # nothing asked again
        # another baseline file (other reference answers), and back: its verdicts were dropped, asked and paid again
        original = [dict(p) for p in prompts]
        for p in prompts:
            p["reference"] = p["reference"] + " (another baseline)"
        judged_by("org/fake-judge")
        assert len(Judge.requests) == 18
        prompts[:] = original
        assert judged_by("org/fake-judge") == first and len(Judge.requests) == 18
    finally:
        server.shutdown()
    assert sorted(p.name for p in (tmp_path / "verdicts").iterdir()) == ["org_fake-judge.jsonl", "other-judge.jsonl"]
    # the older single file: moved to its own judge's name, not read as another judge's
    older = tmp_path / "older"
    older.mkdir()
    (tmp_path / "verdicts" / "other-judge.jsonl").rename(older / "verdicts.jsonl")
    assert verdicts_path(older, "org/fake-judge") == older / "verdicts" / "org_fake-judge.jsonl"
    assert (older / "verdicts" / "other-judge.jsonl").is_file() and not (older / "verdicts.jsonl").exists()


def test_replies_in_flight_at_ctrl_c_are_kept(tmp_path, monkeypatch):
    """Ctrl-C while four requests were in flight: the replies arrived (and were paid for) but only those collected
    before the interrupt were written; the re-run asked for the others again."""
    import threading

    from simpo_exp.evaluate import judge as judge_mod
    from simpo_exp.evaluate.config import JudgeConfig
    from simpo_exp.evaluate.judge import PairwiseJudge

    prompts, texts = cases("alpacaeval")
    release, all_asked, asked, lock = threading.Event(), threading.Event(), set(), threading.Lock()

    def ask(prompt, text):
        with lock:
            asked.add(prompt["id"])
            if len(asked) == len(prompts):
                all_asked.set()
        if prompt["id"] != prompts[0]["id"]:
            release.wait(10)  # still in flight when the interrupt comes
        return {"id": prompt["id"], "judge": "j", "preference": 2.0}

    collect = judge_mod.as_completed

    def interrupted(futures):
        first = next(iter(collect(futures)))
        yield first
        all_asked.wait(10)  # every request in flight (a request not yet started is dropped, as it should be)
        raise KeyboardInterrupt

    monkeypatch.setattr(judge_mod, "as_completed", interrupted)
    j = JudgeConfig(kind="openai", base_url="http://127.0.0.1:9", model="j", concurrency=len(prompts))
    path = tmp_path / "verdicts.jsonl"
    with pytest.raises(KeyboardInterrupt):
        PairwiseJudge(j, "x").judge_lines(ask, prompts, texts, path, {})
    release.set()  # the replies in flight arrive after the interrupt
    deadline = time.time() + 10
    while len(read_jsonl(path)) < len(prompts) and time.time() < deadline:
        time.sleep(0.05)
    assert sorted(r["id"] for r in read_jsonl(path)) == sorted(p["id"] for p in prompts)


class EmptyChoicesJudge(FakeJudge):
    """An endpoint that answers 200 with no reply in it: ``{"choices": []}``."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        self.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"choices": []}')


class GarbledThenFailingJudge(FakeJudge):
    """Answers a page that is no JSON first, then fails (HTTP 500): the last try is what the message reports."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        self.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200 if len(self.requests) == 1 else 500)
        self.end_headers()
        self.wfile.write(b"<html>not json</html>")


def test_a_judge_that_fails_after_a_garbled_reply_is_said_to_fail_not_to_garble(tmp_path):
    from simpo_exp.evaluate.config import JudgeConfig
    from simpo_exp.evaluate.judge import PairwiseJudge, RequestFailed

    server, url = serve(GarbledThenFailingJudge)
    try:
        j = JudgeConfig(kind="openai", base_url=url, model="org/fake-judge", max_retries=1, timeout_s=5)
        judge = PairwiseJudge(j, "alpacaeval2")
        with pytest.raises(RequestFailed, match=r"HTTP 500"):
            judge.chat([{"role": "user", "content": "hi"}], max_tokens=8)
    finally:
        server.shutdown()
    assert "did not answer after 2 tries" in judge.last_failure and "chat completion" not in judge.last_failure


class NullContentJudge(FakeJudge):
    """The one-letter judge, which answers the prompt about 2 with no content at all (null)."""

    requests: list[dict] = []

    def content(self, body: dict) -> str | None:
        return None if "about 2." in body["messages"][-1]["content"] else super().content(body)


def test_an_endpoint_with_no_reply_in_its_answer_is_a_judge_error_and_an_empty_reply_is_asked_again(tmp_path):
    """``{"choices": []}`` crashed the evaluate stage (IndexError: no retry, the sweep's other runs never judged);
    a reply with no text was stored as a verdict-less line for good, its prompt never asked again."""
    from simpo_exp.evaluate.config import JudgeConfig
    from simpo_exp.evaluate.judge import JudgeError, PairwiseJudge

    prompts, texts = cases("alpacaeval")
    server, url = serve(EmptyChoicesJudge)
    try:
        j = JudgeConfig(kind="openai", base_url=url, model="org/fake-judge", max_retries=1, timeout_s=5)
        # it answered, with no chat completion in it: said so, naming the URL to check (not "did not answer")
        with pytest.raises(JudgeError, match=r"replies are no OpenAI chat completion \(2 tries; check alpacaeval2.judge"
                           r".base_url.*IndexError.*point it at an OpenAI-compatible server"):  # fmt: skip
            PairwiseJudge(j, "alpacaeval2").judge(prompts[:1], texts[:1], tmp_path / "a.jsonl")
    finally:
        server.shutdown()
    assert len(EmptyChoicesJudge.requests) == 2  # retried, as for any reply it cannot read

    verdicts = tmp_path / "b.jsonl"
    server, url = serve(NullContentJudge)
    try:
        j = JudgeConfig(kind="openai", base_url=url, model="org/fake-judge", max_retries=0, timeout_s=5)
        first = PairwiseJudge(j, "alpacaeval2").judge(prompts, texts, verdicts)
        assert first[2]["reply"] == "" and first[2]["preference"] is None
        NullContentJudge.requests.clear()
        again = PairwiseJudge(j, "alpacaeval2").judge(prompts, texts, verdicts)
    finally:
        server.shutdown()
    assert [r["messages"][-1]["content"].count("about 2.") for r in NullContentJudge.requests] == [1]
    assert again == first


class SecondGameEmptyOnceJudge(FakeJudge):
    """Arena-Hard's judge, which answers the first question's second game (the model's answer first) with no text
    the first time it is asked."""

    requests: list[dict] = []

    def content(self, body: dict) -> str:
        text = body["messages"][-1]["content"]
        second_game = "<|The Start of Assistant A's Answer|>\n" + "m" * 30 in text
        if "Explain sorting." in text and second_game and not self.emptied:
            self.emptied.append(body)
            return ""
        return super().content(body)

    emptied: list[dict] = []


def test_an_arena_hard_game_without_a_reply_is_asked_again_alone(tmp_path):
    """A question whose second game got no reply was judged again whole: the first game's reply, up to 4096 judge
    tokens, was paid for twice."""
    from simpo_exp.evaluate.arena import judge_arena_hard
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig

    prompts, texts = cases("arena_hard")
    server, url = serve(SecondGameEmptyOnceJudge)
    try:
        j = JudgeConfig(kind="openai", base_url=url, model="org/fake-judge", max_retries=0, timeout_s=5)
        b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=j)
        judge_arena_hard(b, prompts[:1], texts[:1], "my-model", "gpt-4-0314", tmp_path)
        assert len(SecondGameEmptyOnceJudge.requests) == 2 and SecondGameEmptyOnceJudge.emptied
        SecondGameEmptyOnceJudge.requests.clear()
        again = judge_arena_hard(b, prompts[:1], texts[:1], "my-model", "gpt-4-0314", tmp_path)
    finally:
        server.shutdown()
    (asked,) = SecondGameEmptyOnceJudge.requests  # the second game alone
    assert asked["messages"][-1]["content"].index("m" * 30) < asked["messages"][-1]["content"].index("r" * 10)
    assert again["metrics"]["battles"] == 6 and again["metrics"]["win_rate"] == 100.0  # both strong wins
    (line,) = read_jsonl(journal("arena_hard", tmp_path))
    assert [g["score"] for g in line["games"]] == ["B>>A", "A>>B"]


def second_game(body: dict, question: str) -> bool:
    """Whether a request is ``question``'s second game (the model's answer, all 'm's, shown first as A)."""
    text = body["messages"][-1]["content"]
    return question in text and "<|The Start of Assistant A's Answer|>\nm" in text


class FailsOnceJudge(FakeJudge):
    """The fake judge, whose server fails the first time it is sent a request ``fails`` picks: with ``status`` 500
    (that request gets no verdict, the judging goes on), or 429 with a ``Retry-After`` past the judge's
    ``rate_limit_wait_s`` (the judging stops)."""

    requests: list[dict] = []
    failed: list[dict] = []
    status = 500

    def fails(self, body: dict) -> bool:
        raise NotImplementedError

    def respond(self, body: dict) -> None:
        if self.fails(body) and not self.failed:
            self.failed.append(body)
            self.requests.append(body)
            self.send_response(self.status)
            if self.status == 429:
                self.send_header("Retry-After", "60")
            self.end_headers()
            return
        super().respond(body)


class SecondGameFailsOnceJudge(FailsOnceJudge):
    """Arena-Hard's judge, failing on the first question's second game the first time."""

    requests: list[dict] = []
    failed: list[dict] = []

    def fails(self, body: dict) -> bool:
        return second_game(body, "Explain sorting.")


def test_an_arena_hard_first_game_is_kept_when_the_endpoint_fails_on_the_second(tmp_path):
    """The endpoint failed on a question's second game: the judging stopped but threw away the first game's reply,
    paid for (up to 4096 judge tokens), and the re-run asked for it again. (Now a request the endpoint fails on
    costs its game the verdict, not the judging: the first game is written with it, and the re-run asks the second
    alone.)"""
    from simpo_exp.evaluate.arena import judge_arena_hard
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig

    prompts, texts = cases("arena_hard")
    SecondGameFailsOnceJudge.failed.clear()
    server, url = serve(SecondGameFailsOnceJudge)
    try:
        j = JudgeConfig(kind="openai", base_url=url, model="org/fake-judge", max_retries=0, timeout_s=5)
        b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=j)
        first = judge_arena_hard(b, prompts[:1], texts[:1], "my-model", "gpt-4-0314", tmp_path)
        assert [first["metrics"][k] for k in ("judged_games", "unparseable_games", "unjudged_games")] == [1, 0, 1]
        assert len(SecondGameFailsOnceJudge.requests) == 2
        (partial,) = read_jsonl(journal("arena_hard", tmp_path))
        assert partial["games"][0]["score"] == "B>>A" and "HTTP 500" in partial["games"][1]["error"]
        SecondGameFailsOnceJudge.requests.clear()
        again = judge_arena_hard(b, prompts[:1], texts[:1], "my-model", "gpt-4-0314", tmp_path)
    finally:
        server.shutdown()
    (asked,) = SecondGameFailsOnceJudge.requests  # the second game alone
    assert second_game(asked, "Explain sorting.")
    assert again["metrics"]["battles"] == 6 and again["metrics"]["win_rate"] == 100.0
    (line,) = read_jsonl(journal("arena_hard", tmp_path))
    assert [g["score"] for g in line["games"]] == ["B>>A", "A>>B"] and not any("error" in g for g in line["games"])


class FinishFailsOnceJudge(FailsOnceJudge):
    """Arena-Hard's judge on a 'late verdict' question (no label until asked to finish), rate-limited past the
    budget (the judging stops) the first time it is asked to finish."""

    requests: list[dict] = []
    failed: list[dict] = []
    status = 429

    def fails(self, body: dict) -> bool:
        return len(body["messages"]) > 2


def test_a_reply_without_a_label_is_kept_when_the_request_to_finish_fails(tmp_path):
    """The judge replied without a verdict label and the judging stopped on the request to finish (a rate limit past
    its budget; a failed request alike, which no longer stops it): the command stopped as it should but threw that
    reply away, paid for (up to 4096 judge tokens), and the re-run asked the
    game from the start. Now the re-run sends the request to finish alone, with the kept reply in its turns."""
    from simpo_exp.evaluate.arena import CONTINUE, judge_arena_hard
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
    from simpo_exp.evaluate.judge import JudgeError

    prompts = [{"id": "q0", "instruction": "Explain sorting (late verdict).", "reference": "r" * 10}]
    FinishFailsOnceJudge.failed.clear()
    server, url = serve(FinishFailsOnceJudge)
    try:
        j = JudgeConfig(
            kind="openai", base_url=url, model="org/fake-judge", max_retries=0, timeout_s=5, rate_limit_wait_s=1
        )
        b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=j)
        with pytest.raises(JudgeError, match="question_id='q0'.*HTTP 429"):
            judge_arena_hard(b, prompts, ["m" * 30], "my-model", "gpt-4-0314", tmp_path)
        first_reply = FinishFailsOnceJudge.requests[1]["messages"][2]["content"]
        assert len(FinishFailsOnceJudge.requests) == 2 and "Both answers have merits" in first_reply
        (partial,) = read_jsonl(journal("arena_hard", tmp_path))
        game = partial["games"][0]
        assert game["replies"] == [first_reply] and game["score"] is None and "HTTP 429" in game["error"]
        assert "error" in partial["games"][1] and not partial["games"][1]["judgment"]  # the second: not asked
        FinishFailsOnceJudge.requests.clear()
        again = judge_arena_hard(b, prompts, ["m" * 30], "my-model", "gpt-4-0314", tmp_path)
    finally:
        server.shutdown()
    finish, *rest = FinishFailsOnceJudge.requests  # the request to finish, then the second game (and its finish)
    assert [m["role"] for m in finish["messages"]] == ["system", "user", "assistant", "user"]
    assert finish["messages"][2]["content"] == first_reply and finish["messages"][3]["content"] == CONTINUE
    assert len(rest) == 2 and len(rest[0]["messages"]) == 2  # the second game from its start: asked, then finished
    assert again["metrics"]["battles"] == 6 and again["metrics"]["win_rate"] == 100.0
    (line,) = read_jsonl(journal("arena_hard", tmp_path))
    assert [g["score"] for g in line["games"]] == ["B>>A", "A>>B"]
    assert line["games"][0]["judgment"].startswith("\n" + first_reply + "\n")
    assert not any("error" in g or "replies" in g for g in line["games"])


class FailFastSlowElsewhereJudge(FakeJudge):
    """Arena-Hard's judge: a rate limit past the budget (HTTP 429, Retry-After 60 s: the judging stops) on the first
    question's first game once another request has come in; every other request answered after ``delay`` seconds
    (so that it is in flight when the judging stops)."""

    requests: list[dict] = []
    delay = 1.0
    other_in_flight = threading.Event()

    def respond(self, body: dict) -> None:
        if "Explain sorting." in body["messages"][-1]["content"]:
            self.other_in_flight.wait(10)
            self.requests.append(body)
            self.send_response(429)
            self.send_header("Retry-After", "60")
            self.end_headers()
            return
        self.other_in_flight.set()
        time.sleep(self.delay)
        super().respond(body)


def test_once_the_judging_stops_no_new_request_is_sent_and_a_started_question_keeps_its_first_game(tmp_path):
    """The judging stopped on one question while another's first game was in flight: that game's reply arrived and
    its thread went on to send the second game (and label retries), paying for replies no one would keep, while
    the command waited on them (up to timeout_s each). Now the started question writes its first game and stops."""
    from simpo_exp.evaluate.arena import judge_arena_hard
    from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
    from simpo_exp.evaluate.judge import JudgeError

    prompts, texts = cases("arena_hard")
    FailFastSlowElsewhereJudge.other_in_flight.clear()
    server, url = serve(FailFastSlowElsewhereJudge)
    try:
        j = JudgeConfig(
            kind="openai", base_url=url, model="org/fake-judge", max_retries=0, timeout_s=5, concurrency=2,
            rate_limit_wait_s=1,
        )  # fmt: skip
        b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=j)
        with pytest.raises(JudgeError, match="question_id='q0'"):
            judge_arena_hard(b, prompts[:2], texts[:2], "my-model", "gpt-4-0314", tmp_path)
        deadline = time.monotonic() + 10  # q1's first game arrives after the error is raised
        while not read_jsonl(journal("arena_hard", tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2 * FailFastSlowElsewhereJudge.delay)  # time for a second game, were one sent
    finally:
        server.shutdown()
    asked = [r["messages"][-1]["content"] for r in FailFastSlowElsewhereJudge.requests]
    assert len(asked) == 2 and "Explain hashing." in asked[1]  # q0's failed game, q1's first game: nothing after
    (partial,) = read_jsonl(journal("arena_hard", tmp_path))
    assert partial["question_id"] == "q1" and partial["games"][0]["score"] == "B>A"
    assert "stopped before this request was sent" in partial["games"][1]["error"]


def test_a_half_judged_arena_hard_question_outside_a_smaller_max_prompts_keeps_its_judged_game(tmp_path):
    """A question whose first game was judged and whose second was not (the judging stopped) fell outside a later,
    smaller ``max_prompts`` run: its line was dropped instead of kept aside, so the paid-for first game was asked
    again when the larger set came back."""
    from simpo_exp.evaluate.arena import kept_aside, stored_judgments, user_prompt

    prompts, texts = cases("arena_hard")
    path = journal("arena_hard", tmp_path)
    path.parent.mkdir(parents=True)
    q, base = prompts[1]["instruction"], prompts[1]["reference"]
    judged = {"user_prompt": user_prompt(q, base, texts[1]), "judgment": "[[B>A]]", "score": "B>A"}
    unasked = {"user_prompt": user_prompt(q, texts[1], base), "judgment": "", "score": None, "error": "stopped"}
    half = {"question_id": "q1", "model": "my-model", "judge": "org/fake-judge", "games": [judged, unasked]}
    path.write_text(json.dumps(half) + "\n")

    rows, kept = stored_judgments(path, prompts[:1], texts[:1], "org/fake-judge")  # max_prompts=1
    assert rows == {} and kept == {}
    assert [r["question_id"] for r in read_jsonl(kept_aside(path))] == ["q1"]
    rows, kept = stored_judgments(path, prompts[:2], texts[:2], "org/fake-judge")  # the two again
    assert rows == {} and kept == {"q1": [judged, None]}


@pytest.mark.parametrize("killed_before_write", [1, 2])
def test_a_kill_while_the_judgments_are_set_aside_loses_none_of_them(tmp_path, monkeypatch, killed_before_write):
    """A smaller ``max_prompts`` sets the other questions' judgments aside: the judgments file was rewritten without
    them before they were written aside, so a kill between the two writes lost judge replies already paid for."""
    from simpo_exp.evaluate import arena

    path = tmp_path / "model_judgment" / "j" / "m.jsonl"
    prompts = [{"id": f"q{i}", "instruction": f"Q{i}", "reference": "ref"} for i in range(3)]
    texts = [f"answer {i}" for i in range(3)]

    def judged(p, text):
        first, second = (
            arena.user_prompt(p["instruction"], p["reference"], text),
            arena.user_prompt(p["instruction"], text, p["reference"]),
        )
        games = [{"user_prompt": first, "judgment": "[[A>B]]", "score": "A>B"}]
        return {"question_id": p["id"], "model": "m", "judge": "j", "games": games + [
            {"user_prompt": second, "judgment": "[[B>A]]", "score": "B>A"}]}  # fmt: skip

    write_jsonl(path, [judged(p, t) for p, t in zip(prompts, texts)])
    writes, real = [], arena.write_jsonl

    def killed(target, rows):
        writes.append(target)
        if len(writes) == killed_before_write:
            raise KeyboardInterrupt("SIGKILL")  # the process ends here: nothing after it is written
        real(target, rows)

    monkeypatch.setattr(arena, "write_jsonl", killed)
    with pytest.raises(KeyboardInterrupt):
        arena.stored_judgments(path, prompts[:1], texts[:1], "j")  # a max_prompts=1 command
    monkeypatch.setattr(arena, "write_jsonl", real)
    rows, _ = arena.stored_judgments(path, prompts, texts, "j")  # the whole command again
    assert sorted(rows) == ["q0", "q1", "q2"]  # every paid judgment reused, none asked again
    # judgments coming back from aside (max_prompts raised again), the command killed at each of its writes
    for kill_at in (1, 2, 3):
        arena.stored_judgments(path, prompts[:1], texts[:1], "j")  # q1, q2 aside
        writes.clear()

        def killed_at(target, rows, kill_at=kill_at):
            writes.append(target)
            if len(writes) == kill_at:
                raise KeyboardInterrupt("SIGKILL")
            real(target, rows)

        monkeypatch.setattr(arena, "write_jsonl", killed_at)
        with contextlib.suppress(KeyboardInterrupt):
            arena.stored_judgments(path, prompts[:2], texts[:2], "j")  # q1 back, q2 stays aside
        monkeypatch.setattr(arena, "write_jsonl", real)
        rows, _ = arena.stored_judgments(path, prompts, texts, "j")
        assert sorted(rows) == ["q0", "q1", "q2"], kill_at
