"""A judge endpoint that refuses one request, refuses every request, or cuts a reply short; Arena-Hard judgments a
smaller command does not use; AlpacaEval's LC over a full set with replies that gave no verdict."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from simpo_exp.evaluate.arena import judge_arena_hard, kept_aside
from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
from simpo_exp.evaluate.judge import JudgeError, PairwiseJudge
from simpo_exp.inference.files import read_jsonl
from tests.test_evaluate import ARENA_CASES, FakeJudge
from tests.test_evaluate_judging import serve

TOO_LONG = "(too long for the judge)"


class PickyJudge(FakeJudge):
    """The fake judge, except that it answers a prompt holding TOO_LONG with HTTP 400 and its reason (as vLLM and
    OpenAI answer a prompt past the context), every request with ``status`` when one is set, and cuts the first
    ``cut`` replies short (a body shorter than its Content-Length)."""

    requests: list[dict] = []
    authorizations: list[str | None] = []  # each request's Authorization header
    status: int | None = None
    times = -1  # how many requests get ``status`` (-1: every one)
    cut = 0
    code = "context_length_exceeded"  # the error's code in OpenAI's body
    echo = False  # the reply quotes the Authorization header sent (as some gateways do with a refused key)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        type(self).authorizations.append(self.headers.get("Authorization"))
        status = (type(self).times != 0 and type(self).status) or (400 if TOO_LONG in json.dumps(body) else None)
        type(self).times -= type(self).times > 0 and status == type(self).status
        if status:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            said = f"Incorrect API key provided: {self.headers.get('Authorization')}" if type(self).echo else ""
            words = {"message": f"refused ({status}): context of 8192 tokens{said}", "code": type(self).code}
            self.wfile.write(json.dumps({"error": words}).encode())
            return
        reply = json.dumps({"choices": [{"message": {"content": self.content(body)}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply) + (10 if type(self).cut else 0)))
        self.end_headers()
        if type(self).cut:
            type(self).cut -= 1
            self.wfile.write(reply[: len(reply) // 2])
            self.close_connection = True
            return
        self.wfile.write(reply)

    def content(self, body: dict) -> str:
        return "Both are good." if "(no letter)" in json.dumps(body) else super().content(body)


@pytest.fixture
def picky(tmp_path):
    server, url = serve(PickyJudge)
    PickyJudge.status, PickyJudge.cut, PickyJudge.code, PickyJudge.echo = None, 0, "context_length_exceeded", False
    PickyJudge.times, PickyJudge.requests, PickyJudge.authorizations = -1, [], []
    judge = JudgeConfig(kind="openai", base_url=url, model="fake", max_retries=1, timeout_s=5)
    yield SimpleNamespace(judge=judge, out=tmp_path)
    server.shutdown()


def arena(picky, cases, texts=None):
    b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=picky.judge)
    prompts = [{"id": f"q{i}", "instruction": q, "reference": r} for i, (q, r, _) in enumerate(cases)]
    texts = texts or [m for _, _, m in cases]
    return judge_arena_hard(b, prompts, texts, "my-model", "gpt-4-0314", picky.out)


def test_arena_hard_keeps_the_judgments_a_smaller_command_does_not_use(picky):
    """A smoke re-run on fewer questions rewrote the judgment file with those alone: the others, paid for (up to
    4096 tokens a reply), were lost and asked again by the next full command. They are kept beside
    model_judgment/, whose every line arena-hard-auto's show_result.py reads."""
    full = arena(picky, ARENA_CASES)
    asked = len(PickyJudge.requests)
    path = picky.out / "model_judgment" / "fake" / "my-model.jsonl"
    arena(picky, ARENA_CASES[:2])
    assert [r["question_id"] for r in read_jsonl(path)] == ["q0", "q1"]  # the file holds this command's set
    assert sorted(r["question_id"] for r in read_jsonl(kept_aside(path))) == ["q2", "q3", "q4", "q5"]
    assert "model_judgment" not in kept_aside(path).relative_to(picky.out).parts
    assert arena(picky, ARENA_CASES)["metrics"] == full["metrics"] and len(PickyJudge.requests) == asked
    assert not kept_aside(path).exists()


def test_a_request_the_endpoint_refuses_costs_that_prompt_its_verdict_not_the_benchmark(picky):
    """One prompt past the judge's context (HTTP 400) was retried, then stopped the whole benchmark on every re-run,
    with 'did not answer ... start the judge' and without the endpoint's reason."""
    cases = [*ARENA_CASES[:2], (f"Explain stacks {TOO_LONG}.", "r" * 10, "m" * 30)]
    res = arena(picky, cases)
    assert [res["metrics"][k] for k in ("judged_games", "unparseable_games", "unjudged_games")] == [4, 0, 2]
    assert "2 of 6 games got no reply from the judge endpoint" in res["notes"][0]
    assert "context of 8192 tokens" in res["notes"][0]
    assert len(PickyJudge.requests) == 6  # not retried
    arena(picky, cases)
    assert len(PickyJudge.requests) == 8  # the refused question asked again, the others kept

    # the pairwise (AlpacaEval) judge: that prompt has no verdict, its line says why, the next run asks again
    prompts = [
        {"id": str(i), "instruction": f"Say {i}{TOO_LONG if i == 1 else ''}", "reference": "x"} for i in range(3)
    ]
    path = picky.out / "verdicts.jsonl"
    verdicts = PairwiseJudge(picky.judge, "benchmarks.alpacaeval2").judge(prompts, ["yy", "yy", "yy"], path)
    assert [v["preference"] for v in verdicts] == [2.0, None, 2.0]
    assert "context of 8192 tokens" in verdicts[1]["error"]
    before = len(PickyJudge.requests)
    PairwiseJudge(picky.judge, "benchmarks.alpacaeval2").judge(prompts, ["yy", "yy", "yy"], path)
    assert len(PickyJudge.requests) == before + 1


def test_a_refused_key_stops_at_once_with_the_endpoints_words_and_a_cut_reply_is_asked_again(picky, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge = PairwiseJudge(picky.judge, "benchmarks.alpacaeval2")
    PickyJudge.status = 401
    with pytest.raises(JudgeError, match=r"refused the request \(HTTP 401: .*context of 8192.*\$OPENAI_API_KEY\. "):
        judge.chat([{"role": "user", "content": "hi"}], max_tokens=8)
    assert len(PickyJudge.requests) == 1  # a key is not retried
    monkeypatch.setenv("OPENAI_API_KEY", " \n")  # the variable named holds no key (blank): said
    unkeyed = PairwiseJudge(picky.judge, "benchmarks.alpacaeval2")
    with pytest.raises(JudgeError, match=r"the key in \$OPENAI_API_KEY \(not set\)\. "):
        unkeyed.chat([{"role": "user", "content": "hi"}], max_tokens=8)
    del PickyJudge.requests[1:]
    PickyJudge.status, PickyJudge.cut = None, 1
    # an IncompleteRead (not an OSError) ended the command with a traceback, never retried
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "## Output (a)\nx\n\n## Output (b)\ny"}]
    assert judge.chat(prompt, max_tokens=8) in ("a", "b") and len(PickyJudge.requests) == 3


def test_a_used_up_quota_stops_at_once_rather_than_waiting_out_the_rate_limit_budget(picky):
    """OpenAI answers a key with no credit left with HTTP 429 ``insufficient_quota``, which no wait clears: each
    request waited the whole ``rate_limit_wait_s`` (10 minutes by default) and the message said to wait."""
    picky.judge.rate_limit_wait_s = 3
    judge = PairwiseJudge(picky.judge, "benchmarks.alpacaeval2")
    PickyJudge.status, PickyJudge.code = 429, "insufficient_quota"
    with pytest.raises(JudgeError, match=r"quota is used up \(HTTP 429: .*insufficient_quota.*no wait clears it"):
        judge.chat([{"role": "user", "content": "hi"}], max_tokens=8)
    assert len(PickyJudge.requests) == 1


def test_lc_is_computed_over_a_full_set_with_replies_that_gave_no_verdict(picky, monkeypatch):
    """Every one of the 805 instructions judged, one reply not a letter: the LC win rate was withheld as if a
    subset had been judged; alpaca-eval's GLM leaves missing preferences out of its fit itself, and averages its
    predictions over every instruction, so the row without a verdict goes to it, preference None (it had been
    dropped, averaging the instructions' difficulty over another set)."""
    from simpo_exp.evaluate.run import _judge_pairs

    seen = {}

    def lc(rows, file_rows):
        seen.update(rows=len(rows), file_rows=file_rows, none=[r["index"] for r in rows if r["preference"] is None])
        return {"lc_win_rate": None, "lc_standard_error": None}, "stand-in"

    monkeypatch.setattr("simpo_exp.evaluate.run.length_controlled", lc)
    said = {7: " (no letter)"}  # the one reply that is not a letter
    prompts = [{"id": str(i), "instruction": f"Say {i}{said.get(i, '')}", "reference": "xx"} for i in range(805)]
    b = BenchmarkConfig(name="alpacaeval2", kind="alpacaeval", judge=picky.judge)
    info = {"rows": 805, "reference_generator": "gpt4_turbo"}
    metrics, _ = _judge_pairs({"benchmark": b, "out": picky.out}, prompts, ["yyy"] * 805, info, "me")
    assert metrics["unparseable_verdicts"] == 1 and seen == {"rows": 805, "file_rows": 805, "none": [7]}


@pytest.mark.parametrize("kind", ["alpacaeval", "arena_hard"])
def test_an_endpoint_that_refuses_every_request_stops_the_judging(picky, kind):
    """A judge refusing a parameter with HTTP 400 ("Unsupported parameter: max_tokens") was read as each prompt's
    own fault: every one of the 805 prompts was sent, each refused, and the command exited 0 with no verdict."""
    from simpo_exp.evaluate.judge import REFUSED_BEFORE_ANY, JudgeError
    from simpo_exp.evaluate.run import _judge_pairs

    PickyJudge.status, PickyJudge.requests = 400, []
    with pytest.raises(JudgeError, match=r"refused every request so far \(\d+\) and took none"):  # \d: threads
        if kind == "arena_hard":
            arena(picky, ARENA_CASES * 10)
        else:
            b = BenchmarkConfig(name="alpacaeval2", kind="alpacaeval", judge=picky.judge)
            prompts = [{"id": str(i), "instruction": f"Say {i}", "reference": "xx"} for i in range(40)]
            _judge_pairs({"benchmark": b, "out": picky.out}, prompts, ["yyy"] * 40, {"rows": 40}, "me")
    # not all of them: the refusal that tells stops the other threads at once (in flight: one each at most)
    assert len(PickyJudge.requests) <= REFUSED_BEFORE_ANY + picky.judge.concurrency - 1


def test_no_lc_win_rate_where_most_prompts_have_no_verdict(picky, monkeypatch):
    """A judge that refuses every request (HTTP 400 on a parameter it does not take) left all 805 preferences None,
    and alpaca-eval's GLM, fit on its regularising rows alone, still gave an LC win rate (49.7 in the audit's run),
    which the model card published. Past 1% of prompts without a verdict it is withheld, saying why."""
    from simpo_exp.evaluate.run import _judge_pairs

    calls = []
    lc = {"lc_win_rate": 49.7, "lc_standard_error": 1.2}
    monkeypatch.setattr("simpo_exp.evaluate.run.length_controlled", lambda rows, n: calls.append(n) or (lc, None))
    b = BenchmarkConfig(name="alpacaeval2", kind="alpacaeval", judge=picky.judge)
    info = {"rows": 805, "reference_generator": "gpt4_turbo"}
    for unjudged, withheld in ((9, True), (8, False)):  # 8 of 805 is under 1%
        said = {i: " (no letter)" for i in range(unjudged)}
        prompts = [{"id": str(i), "instruction": f"Say {i}{said.get(i, '')}", "reference": "xx"} for i in range(805)]
        out = picky.out / str(unjudged)
        metrics, notes = _judge_pairs({"benchmark": b, "out": out}, prompts, ["yyy"] * 805, info, "me")
        assert metrics["unparseable_verdicts"] == unjudged
        assert (metrics["lc_win_rate"] is None) == withheld and (metrics["lc_win_rate"] == 49.7) != withheld
        assert (metrics["lc_standard_error"] is None) == withheld  # withheld with it
        assert any(f"no LC win rate: {unjudged} of 805 prompts have no verdict" in n for n in notes) == withheld
    assert calls == [805]  # the GLM is not fit where it would read its regularising rows alone


def test_the_withheld_lc_says_a_rerun_brings_back_only_what_the_endpoint_failed(picky, tmp_path):
    """Nine replies without a letter of 805 withheld the LC win rate, and its note said to run the command again to
    ask the judge for those verdicts: a re-run asks none of them (they are the judge's word), so the note stood for
    good with advice that could not help."""
    from simpo_exp.evaluate.judge import lc_missing_note

    note = lc_missing_note(9, 805, 0, tmp_path / "v.jsonl")
    assert "are not asked again" in note and f"from {tmp_path / 'v.jsonl'}" in note and "run the command" not in note
    note = lc_missing_note(12, 805, 12)
    assert "run the command again to ask the judge for the 12 the endpoint refused or failed" in note
    assert "not asked again" not in note
    assert lc_missing_note(8, 805) is None


def test_a_key_the_endpoint_echoes_is_hidden_in_what_is_stored_and_said(picky, monkeypatch):
    """A gateway that quotes the refused key in its reply put it into the stored verdicts, the results' notes, the
    model card a push uploads, and the error printed and kept in error.json."""
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-ZZSECRET")
    picky.judge.api_key_env = "MY_JUDGE_KEY"
    judge = PairwiseJudge(picky.judge, "benchmarks.alpacaeval2")
    PickyJudge.status, PickyJudge.echo = 401, True
    with pytest.raises(JudgeError) as err:
        judge.chat([{"role": "user", "content": "hi"}], max_tokens=8)
    assert "ZZSECRET" not in str(err.value) and "Incorrect API key provided: Bearer <$MY_JUDGE_KEY>" in str(err.value)
    PickyJudge.status = 400  # a refused request: its reason is stored with the prompt
    from simpo_exp.evaluate.judge import RequestRefused

    with pytest.raises(RequestRefused) as err:
        judge.chat([{"role": "user", "content": "hi"}], max_tokens=8)
    assert "ZZSECRET" not in str(err.value)


def test_a_placeholder_key_is_not_masked_in_the_endpoints_words(picky, monkeypatch):
    """A local server's placeholder key ("x", "EMPTY") masked every "x" of the endpoint's reason."""
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    judge = PairwiseJudge(picky.judge, "benchmarks.alpacaeval2")
    assert judge.masked("maximum context exceeds max_tokens") == "maximum context exceeds max_tokens"


# ----------------------------------------------------------------------------- from a mutation review of judge.py
ASKED = {"id": "0", "instruction": "Say 0", "reference": "x"}


def test_a_key_read_with_its_newline_is_sent_without_it_and_never_quoted(picky, monkeypatch):
    """export MY_JUDGE_KEY=$(cat key) keeps the file's newline in some set-ups: no header may hold one, and
    http.client's refusal quoted the key (escaped), which went unmasked into every prompt's stored error, the
    notes and the final message. The request is greedy, of 8 tokens, with the key as a bearer token."""
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-ZZSECRET99\n")
    picky.judge.api_key_env = "MY_JUDGE_KEY"
    judge = PairwiseJudge(picky.judge, "benchmarks.alpacaeval2")
    assert judge.verdict(ASKED, "yy")["preference"] in (1.0, 2.0)
    assert PickyJudge.authorizations == ["Bearer sk-ZZSECRET99"]
    assert PickyJudge.requests[0]["temperature"] == 0 and PickyJudge.requests[0]["max_tokens"] == 8
    assert (
        judge.masked("Invalid header value b'Bearer sk-ZZSECRET99\\n'")
        == "Invalid header value b'Bearer <$MY_JUDGE_KEY>\\n'"
    )
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-ZZSECR\u00e9T")  # quoted as bytes: sk-ZZSECR\xc3\xa9T
    judge = PairwiseJudge(picky.judge, "benchmarks.alpacaeval2")
    assert judge.masked(repr("Bearer sk-ZZSECR\u00e9T".encode())) == "b'Bearer <$MY_JUDGE_KEY>'"


def test_a_key_no_header_can_hold_is_masked_where_the_refusal_quotes_it(picky, monkeypatch):
    """A line break inside the key (two keys pasted together) is refused by http.client before anything is sent, its
    message quoting the header as bytes: the key, escaped, is masked there too."""
    from simpo_exp.evaluate.judge import RequestRefused

    monkeypatch.setenv("MY_JUDGE_KEY", "sk-ZZ\nSECRET99")
    picky.judge.api_key_env, picky.judge.max_retries = "MY_JUDGE_KEY", 0
    with pytest.raises(RequestRefused) as refused:
        PairwiseJudge(picky.judge, "benchmarks.alpacaeval2").chat([{"role": "user", "content": "hi"}], 8)
    assert "SECRET99" not in str(refused.value) and "<$MY_JUDGE_KEY>" in str(refused.value)
    assert PickyJudge.requests == []


def test_a_key_of_eight_characters_is_masked_and_a_shorter_placeholder_is_not(picky, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-1234x")
    assert PairwiseJudge(picky.judge, "k").masked("k sk-1234x") == "k <$OPENAI_API_KEY>"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-123x")
    assert PairwiseJudge(picky.judge, "k").masked("k sk-123x") == "k sk-123x"


@pytest.mark.parametrize("status", [408, 409, 425])
def test_a_request_timeout_or_conflict_is_tried_again_not_taken_for_a_refusal(picky, status):
    """408 and 409 are the endpoint's passing trouble (RETRIED_STATUS): the judging stopped at the first one."""
    PickyJudge.status, PickyJudge.times = status, 1
    judge = PairwiseJudge(picky.judge, "benchmarks.alpacaeval2")
    assert judge.verdict(ASKED, "yy")["preference"] in (1.0, 2.0) and len(PickyJudge.requests) == 2


@pytest.mark.parametrize("status", [413, 422])
def test_a_request_too_large_or_unprocessable_costs_that_prompt_its_verdict(picky, status):
    """413 (a prompt too large for a proxy) and 422 are the request's own fault, as 400 is: that prompt has no verdict
    and says why; the judging goes on (they stopped the whole benchmark)."""
    PickyJudge.status, PickyJudge.times = status, 1
    judge = PairwiseJudge(picky.judge, "benchmarks.alpacaeval2")
    refused = judge.verdict(ASKED, "yy")
    assert refused["preference"] is None and f"HTTP {status}" in refused["error"] and len(PickyJudge.requests) == 1
    assert judge.verdict(ASKED, "yy")["preference"] in (1.0, 2.0)
