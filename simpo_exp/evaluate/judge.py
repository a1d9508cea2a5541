"""Judges: the sort-digits rule, a pairwise judge behind an OpenAI-compatible endpoint, alpaca-eval's own.

Every judge gives, per prompt, a preference in alpaca-eval's encoding: 1 when the baseline's answer
(output_1) is better, 2 when the evaluated model's (output_2) is, 1.5 for a tie. The win rate is the
mean of ``preference - 1`` in percent, so a tie counts half (AlpacaEval's and Arena-Hard's convention).

The pairwise prompt shows the instruction and the two answers as (a) and (b); which answer is (a)
is decided per prompt by a seeded coin (``derive_seed(prompt id)``), so a judge that favours one
position does not favour either model. The judge must reply with the letter of the better answer;
any other reply is kept as no verdict (preference null), left out of the win rate and counted.

Every judge reply is paid for, so each finished verdict (or Arena-Hard judgment) is appended to a JSONL
file the moment it arrives: a judging killed or stopped by a failing endpoint keeps what it got, and a
re-run reuses the lines made by the same judge model for the same prompt and answers, asking only for
the rest.

Length-controlled win rate (AlpacaEval 2's LC) is alpaca-eval's own GLM
(``alpaca_eval.metrics.glm_winrate.get_length_controlled_winrate``): computed when the package is
installed and the full evaluation set was judged; otherwise null, and the results say why.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from simpo_exp.config import ConfigError
from simpo_exp.inference.files import append_jsonl, write_jsonl
from simpo_exp.inference.sampling import derive_seed
from simpo_exp.inference.scoring import sort_digits_score
from simpo_exp.rundir import read_jsonl as read_lines

log = logging.getLogger(__name__)
ALPACA_EVAL_ROWS = 805
SYSTEM = "You are a careful judge of answers to instructions. You reply with one letter and nothing else."
TEMPLATE = (
    "Which of the two outputs follows the instruction better: more helpful, correct and complete?\n\n"
    "## Instruction\n{instruction}\n\n## Output (a)\n{a}\n\n## Output (b)\n{b}\n\n"
    "Reply with the single letter of the better output: a or b."
)


class JudgeError(ConfigError):
    """The judge endpoint did not answer; the generations and the verdicts it gave so far are kept. ``partial``: a
    line with the replies this prompt did get (an Arena-Hard question's first game), written before it is raised."""

    partial: dict | None = None


class JudgeStopped(JudgeError):
    """The judging stopped (the endpoint failed on another prompt, or the command was interrupted) before this
    request was sent: nothing more is asked, or paid for."""


class RequestRefused(Exception):
    """The endpoint refused this one request (HTTP 400, 413 or 422: a prompt past the judge's context, say); the
    same request would be refused again, and the other prompts are judged."""


class RequestFailed(RequestRefused):
    """The endpoint gave no answer to this request after every try (an HTTP 500 a proxy gives one over-long prompt,
    say): the prompt gets no verdict now and is asked again by the next run, and the other prompts are judged. Every
    re-run stopped at such a prompt, so the benchmark never finished."""


REFUSED_REQUEST = (400, 413, 422)  # the request's own fault: that prompt gets no verdict, the others go on
# ... unless every request is refused: that many refused, none taken, and it is a setting, not a prompt: stopped
REFUSED_BEFORE_ANY = 5
RETRIED_STATUS = (408, 409, 425, 429)  # a client error that passes: asked again, as a server error is
# a busy endpoint, not a broken one: 429, or 503 with a Retry-After; waited out (the pause it asks for, else one
# that doubles up to a minute) within judge.rate_limit_wait_s, without counting as a try
RATE_LIMITED = 429
EMPTY_REPLY = "the judge endpoint replied with no text"  # no verdict: asked again by the next run
# requests that got no answer after their tries, one after another with none answered between: the endpoint is down
# (or overloaded), not failing on a prompt or two; the judging stops instead of spending every prompt's tries
FAILED_IN_A_ROW = 3


# the requests the judge endpoint refused or failed, apart from the replies that gave no verdict (AlpacaEval's
# prompts, Arena-Hard's games): asked again by the next run
UNJUDGED, UNJUDGED_GAMES = "unjudged", "unjudged_games"


def unjudged_note(failed: int, total: int, what: str, errors: list[str]) -> str:
    """The note on requests the endpoint refused or failed: how many, why the first, what the figures then are."""
    return (
        f"{failed} of {total} {what} got no reply from the judge endpoint, which refused or failed the request "
        f"({errors[0]}); the win rate is of the others alone until a re-run of the same command asks them again"
    )


def awaiting_judge(metrics: dict) -> bool:
    """Whether a benchmark's results leave requests the endpoint refused or failed, to ask again."""
    return bool(metrics.get(UNJUDGED) or metrics.get(UNJUDGED_GAMES))


def unreachable_error(e: Exception) -> bool:
    """Whether a request failed before reaching any endpoint (nothing listens on the port, the host is unknown): every
    request would fail alike, so the judging stops, where an endpoint's failure on one request costs its verdict."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    return isinstance(reason, (ConnectionRefusedError, socket.gaierror))


def _http_error(e: urllib.error.HTTPError) -> str:
    """``HTTP 400: <the endpoint's own words>``: its body says why (a context length, an unknown model)."""
    try:
        body = e.read().decode(errors="replace").strip()
    except Exception:
        body = ""
    return f"HTTP {e.code}: {body[:300] or e.reason}"


def retry_after(e: urllib.error.HTTPError) -> float | None:
    """The seconds an HTTP error's ``Retry-After`` header asks for (a number or an HTTP date); None without one."""
    value = (e.headers.get("Retry-After") if e.headers is not None else None) or ""
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def reply_text(content) -> str:
    """A chat reply's text: a string as it is, None as "", a list of parts (some APIs) as its text parts joined;
    anything else is a reply it cannot read (TypeError: asked again)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(part["text"] for part in content if isinstance(part.get("text"), str))
    raise TypeError(f"the reply's message content is a {type(content).__name__}, not text")


def win_rate(preferences: list[float]) -> float | None:
    """Percent, ties half; None when nothing was judged."""
    return 100.0 * sum(p - 1.0 for p in preferences) / len(preferences) if preferences else None


def standard_error(preferences: list[float]) -> float | None:
    """The win rate's standard error, in percent, as alpaca-eval reports it (``standard_error``): the sample
    standard deviation of the preferences (n - 1) over the square root of their number. None below two verdicts."""
    n = len(preferences)
    if n < 2:
        return None
    mean = sum(preferences) / n
    return 100.0 * math.sqrt(sum((p - mean) ** 2 for p in preferences) / (n - 1) / n)


# The whole reply must name one output: "a", "(b)", "**A**", "Output (a).", "Answer: b". A sentence that merely
# starts with one of the letters ("Both are good", "A tie", "Based on this, (a)") is no verdict.
_LETTER = re.compile(r"^\W*(?:(?:output|answer)\s*:?\s*)?\(?([ab])\)?\W*$", re.IGNORECASE)


def reply_preference(reply: str, model_first: bool) -> float | None:
    """alpaca-eval's preference from a pairwise judge's reply: 2.0 when it names the model's output, 1.0 when it
    names the baseline's, None when the reply is not just one letter."""
    match = _LETTER.match(reply or "")
    if match is None:
        return None
    return 2.0 if (match.group(1).lower() == "a") == model_first else 1.0


def rule_preferences(prompts: list[dict], model_texts: list[str], baseline_texts: list[str]) -> list[dict]:
    rows = []
    for p, out, base in zip(prompts, model_texts, baseline_texts):
        s_model, s_base = sort_digits_score(p["instruction"], out), sort_digits_score(p["instruction"], base)
        pref = 2.0 if s_model > s_base else 1.0 if s_model < s_base else 1.5
        rows.append({"id": p["id"], "score_model": s_model, "score_baseline": s_base, "preference": pref})
    return rows


class PairwiseJudge:
    """Verdicts from ``{base_url}/chat/completions`` (any OpenAI-compatible server, e.g. vLLM's)."""

    def __init__(self, j, key: str):
        self.j, self.key = j, key
        self.url = j.base_url.rstrip("/") + "/chat/completions"
        # a key read from a file keeps its newline (export KEY=$(cat key), some tools): no header may hold one, and
        # http.client's refusal quoted the key escaped ("...\\n'"), which masked() did not find
        self.api_key = os.environ.get(j.api_key_env, "").strip()
        if not self.api_key and j.api_key_env != "OPENAI_API_KEY":  # named for this judge, and not there
            log.warning("%s.judge.api_key_env: $%s is not set; the judge is asked without a key", key, j.api_key_env)
        self.stopping = threading.Event()  # set when the judging stops: no request is sent after it
        self.taken, self.refused, self.counting = 0, 0, threading.Lock()  # requests answered and refused
        self.failed_in_a_row = 0  # requests that got no answer after their tries since the last one answered
        self.last_failure: str | None = None  # why the last of them got none: the message the judging stops with
        # a re-run asks the prompts an earlier run got no answer for, those alone where the rest were answered: the
        # endpoint's answers stored then tell a setting it refuses from these prompts' own refusals, and such a
        # prompt failing again says nothing of the endpoint being down (judge_lines sets both)
        self.answered_before = False
        self.asking = threading.local()  # .again: this thread's request is a prompt that got no answer before

    def masked(self, text: str) -> str:
        """An endpoint's words with the key this judge sent hidden: a proxy or gateway that echoes a refused key in its
        reply put it into the stored verdicts, the results' notes and the model card a push uploads."""
        # a placeholder key of a local server ("x", "EMPTY") is no secret, and masking it garbled the words
        if len(self.api_key) < 8:
            return text
        for form in (self.api_key, repr(self.api_key.encode())[2:-1]):  # as sent, and as bytes are quoted
            text = text.replace(form, f"<${self.j.api_key_env}>")
        return text

    def _ask(self, content: str) -> str:
        return self.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}], max_tokens=8)

    def chat(self, messages: list[dict], max_tokens: int) -> str:
        """The endpoint's reply to ``messages`` (greedy), with ``max_retries`` more tries when it does not answer."""
        body = json.dumps({"model": self.j.model, "temperature": 0, "max_tokens": max_tokens, "messages": messages})
        headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
        }
        last, where = None, f"{self.key}.judge.base_url={self.j.base_url!r}"
        attempt, waited, waits, limited, unreachable = 0, 0.0, 0, False, False
        garbled = False  # it answered, but not with a chat completion (the last try's)
        while True:
            if self.stopping.is_set():
                raise JudgeStopped(f"{where}: the judging stopped before this request was sent")
            try:
                req = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.j.timeout_s) as resp:
                    reply = reply_text(json.loads(resp.read())["choices"][0]["message"]["content"])
                with self.counting:
                    self.taken += 1
                    self.failed_in_a_row = 0
                return reply
            except urllib.error.HTTPError as e:
                asked, said = retry_after(e), self.masked(_http_error(e))  # (the body can be read once)
                if e.code == RATE_LIMITED and "insufficient_quota" in said:  # OpenAI's word for no credit left
                    raise JudgeError(
                        f"{where}: the judge endpoint's quota is used up ({said}): no wait clears it; add credit or "
                        f"use another key in ${self.j.api_key_env}. The generations and the verdicts so far are kept; "
                        "re-run the same command with evaluate.judge_only=true"
                    ) from e
                if e.code == RATE_LIMITED or (e.code == 503 and asked is not None):
                    # a wait under a second asked ("Retry-After: 0", a date already past) counts as none asked: taken
                    # as asked, the request went again at once, the wait counted nothing, and it never ended
                    pause = asked if asked is not None and asked >= 1 else min(2.0**waits, 60.0)
                    if waited + pause <= self.j.rate_limit_wait_s:
                        self.stopping.wait(pause)  # cut short when the judging stops
                        waited, waits = waited + pause, waits + 1
                        continue
                    last = (
                        f"{said}; waited {waited:.0f} s in all, and {pause:.0f} s more would pass "
                        f"{self.key}.judge.rate_limit_wait_s={self.j.rate_limit_wait_s}"
                    )
                    limited = True
                    break
                if e.code in REFUSED_REQUEST:
                    with self.counting:  # (the count read here: threads refused at once count on after it)
                        self.refused += 1
                        refused = self.refused
                        alike = self.taken == 0 and not self.answered_before and refused >= REFUSED_BEFORE_ANY
                    if alike:  # not one prompt's fault: the rest would be refused too, each a prompt without verdict
                        raise JudgeError(
                            f"{where}: the judge endpoint refused every request so far ({refused}) and took "
                            f"none ({said}): a setting it does not take, not a prompt's length; check "
                            f"{self.key}.judge.model and what the endpoint accepts (this judge sends temperature 0 and "
                            f"max_tokens={max_tokens}). The generations and the verdicts so far are kept; re-run the "
                            "same command with evaluate.judge_only=true"
                        ) from e
                    raise RequestRefused(said) from e
                if 400 <= e.code < 500 and e.code not in RETRIED_STATUS:  # a key, a model name, a URL: every prompt
                    raise JudgeError(
                        f"{where}: the judge endpoint refused the request ({said}); check "
                        f"{self.key}.judge.model, the URL and the key in ${self.j.api_key_env}"
                        + ("" if self.api_key else " (not set)")
                        + ". The generations and the verdicts so far are kept; re-run the same command with "
                        "evaluate.judge_only=true"
                    ) from e
                last, unreachable, garbled = said, False, False
            # no reply it can read: a failed or cut-short request, a body that is not JSON, no choices[0].message
            except (urllib.error.URLError, http.client.HTTPException, OSError, LookupError, ValueError, TypeError) as e:
                last, unreachable = self.masked(f"{type(e).__name__}: {e}"), unreachable_error(e)
                garbled = isinstance(e, (LookupError, ValueError, TypeError)) and not isinstance(e, OSError)
            if attempt >= self.j.max_retries:
                break
            self.stopping.wait(min(2**attempt, 8))
            attempt += 1
        slow = "TimeoutError" in last or "timed out" in last
        message = (
            f"{where}: "
            + (
                "the judge endpoint stayed rate-limited"
                if limited
                else f"the judge endpoint's replies are no OpenAI chat completion ({attempt + 1} tries; check "
                f"{self.key}.judge.base_url, which ends where /chat/completions is appended, usually in /v1)"
                if garbled
                else f"the judge endpoint did not answer after {attempt + 1} tries"
            )
            + f" ({last}). The generations and the verdicts so far are kept; "
            + (
                f"a judge that writes long replies may need a longer {self.key}.judge.timeout_s={self.j.timeout_s}; "
                if slow
                else "wait for its rate limit to pass (or raise the budget) and "
                if limited
                else "point it at an OpenAI-compatible server and "
                if garbled
                else "start the judge (or see its log: it answered none of these) and "
            )
            + "re-run the same command with evaluate.judge_only=true"
        )
        if limited or unreachable:  # the endpoint's limit, or no endpoint: not this request's fault, every one fails
            raise JudgeError(message)
        if not getattr(self.asking, "again", False):
            with self.counting:
                self.failed_in_a_row += 1
                self.last_failure = message
        raise RequestFailed(f"no answer after {attempt + 1} tries ({last})")

    def judge_prompt(self, prompt: dict, model_text: str) -> tuple[bool, str]:
        """(whether the model's answer is shown first, as (a); the judge prompt)."""
        model_first = derive_seed("judge-order", prompt["id"]) % 2 == 0
        a, b = (model_text, prompt["reference"]) if model_first else (prompt["reference"], model_text)
        return model_first, TEMPLATE.format(instruction=prompt["instruction"], a=a, b=b)

    def verdict(self, prompt: dict, model_text: str) -> dict:
        """One verdict line; a reply that is not 'a' or 'b' gives preference None (no verdict)."""
        model_first, content = self.judge_prompt(prompt, model_text)
        try:
            reply, refused = self._ask(content), {}
        except RequestRefused as e:  # no verdict, the endpoint's words kept; an empty reply is asked again next run
            reply, refused = "", {"error": str(e)}
        except JudgeError as e:
            raise JudgeError(f"judging prompt id={prompt['id']!r}: {e}") from e
        if not refused and not reply.strip():  # the endpoint's failure, not the judge's word: counted as unjudged
            refused = {"error": EMPTY_REPLY}
        return {
            "id": prompt["id"],
            "judge": self.j.model,
            "prompt_sha256": _sha256(content),
            "model_first": model_first,
            "reply": reply,
            "preference": reply_preference(reply, model_first),
            **refused,
        }

    def judge(self, prompts: list[dict], model_texts: list[str], path: Path) -> list[dict]:
        """Verdicts in prompt order, each appended to ``path`` as it arrives; stored ones of the same judge for the
        same judge prompt are reused."""
        expected = {p["id"]: _sha256(self.judge_prompt(p, t)[1]) for p, t in zip(prompts, model_texts)}
        others: list[dict] = []  # verdicts on other judge prompts (another baseline file): kept for its return
        stored = stored_lines(
            path,
            "id",
            lambda r: r.get("judge") == self.j.model and expected.get(r.get("id")) == r["prompt_sha256"],
            others,
        )
        # the stored reply is read again, so a line an older reading of replies got wrong is not carried over; an
        # empty reply (an endpoint that answered with no text) is the endpoint's failure, not a verdict: asked again
        again = {k for k, r in stored.items() if not str(r.get("reply") or "").strip()}
        stored = {
            k: {**r, "preference": reply_preference(r.get("reply", ""), r["model_first"])}
            for k, r in stored.items()
            if k not in again
        }
        return self.judge_lines(self.verdict, prompts, model_texts, path, stored, others, again)

    def judge_lines(
        self,
        ask: Callable,
        prompts: list[dict],
        texts: list[str],
        path: Path,
        stored: dict,
        keep: list = (),
        again: set = frozenset(),
        answered: bool = False,
    ) -> list[dict]:
        """One line per prompt, in prompt order: the ``stored`` one, else ``ask(prompt, text)``, ``concurrency`` at a
        time, each appended to ``path`` as it finishes; ``path`` is rewritten in prompt order at the end. When the
        endpoint fails or the command is interrupted, the prompts not started are dropped, the replies in flight
        still written as they arrive, and the error raised. ``again``: the prompts an earlier run got no answer for
        (refused, failed, empty): asked last, and their failing again does not count towards the endpoint being down.
        ``answered``: the endpoint answered an earlier run (besides the ``stored`` lines, a question's first game)."""
        pool, error, done, lock = ThreadPoolExecutor(self.j.concurrency), None, dict(stored), threading.Lock()
        self.stopping.clear()
        self.failed_in_a_row, self.last_failure = 0, None
        self.answered_before = answered or bool(stored)

        def ask_and_keep(prompt: dict, text: str) -> dict:
            self.asking.again = prompt["id"] in again
            with self.counting:
                down = self.failed_in_a_row >= FAILED_IN_A_ROW
            if down:  # this prompt waited: stop, not spend its tries (checked here, not by the thread reading the
                # results, which under load fell behind while this one went on asking)
                self.stopping.set()
                raise JudgeError(
                    f"{self.failed_in_a_row} requests in a row got no answer, none answered between; the last: "
                    f"{self.last_failure}"
                )
            try:
                line = ask(prompt, text)
            except JudgeError as e:  # the replies it did get (a question's first game) are kept all the same
                self.stopping.set()  # every request would fail alike: the other threads send none from now on,
                # before the thread reading the results gets to this one
                if e.partial is not None:
                    with lock:
                        append_jsonl(path, e.partial)
                raise
            with lock:  # written by the thread that got it: a reply in flight at Ctrl-C is kept as it arrives
                append_jsonl(path, line)
            return line

        # the prompts that got no answer before go last: those never asked come first, while a run of failures still
        # tells an endpoint gone down
        order = sorted((p["id"] in again, i) for i, p in enumerate(prompts) if p["id"] not in done)
        futures = {pool.submit(ask_and_keep, prompts[i], texts[i]): prompts[i]["id"] for _, i in order}
        try:
            for fut in as_completed(futures):
                if fut.cancelled():
                    continue
                try:
                    done[futures[fut]] = fut.result()
                except JudgeError as e:
                    # the reason, not another thread's "stopped before this request was sent" read before it
                    error = e if error is None or (stopped_only(error) and not stopped_only(e)) else error
                    self.stopping.set()
                    for other in futures:
                        other.cancel()
        finally:  # Ctrl-C included: nothing more is asked (not even a started question's second game, or a retry);
            # the replies in flight still arrive and are written
            self.stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
        if error:
            raise error
        if self.last_failure and not self.taken and not self.answered_before:  # it answered nothing, now or before
            raise JudgeError(self.last_failure)
        rows = [done[p["id"]] for p in prompts]
        write_jsonl(path, [*keep, *rows])  # ``keep``: lines of other prompts, left in the file before this judging's
        return rows


def stopped_only(error: BaseException | None) -> bool:
    """Whether ``error`` says only that the judging had stopped before its request (``JudgeStopped``, also where a
    prompt's or question's error wraps it), not why it stopped."""
    while error is not None:
        if isinstance(error, JudgeStopped):
            return True
        error = error.__cause__
    return False


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def judge_file_name(model: str) -> str:
    """A judge model's name as a file or folder name (``org/model`` -> ``org_model``), where its verdicts are kept."""
    return model.replace("/", "_")


def stored_lines(path: Path, key: str, valid: Callable[[dict], bool], others: list | None = None) -> dict[str, dict]:
    """``{line[key]: line}`` of the lines of ``path`` that ``valid`` accepts (the last one per key). The file is
    rewritten with only those: a half-written last line (a killed process) and lines of another judge, prompt or
    answer are dropped; given ``others``, the whole lines ``valid`` does not accept are kept in the file and put
    there (a verdict for another baseline, paid for, and read again when that baseline comes back)."""
    path = Path(path)
    rows = accepted_lines(read_lines(path), key, valid, others)
    if path.exists():
        write_jsonl(path, [*(others or []), *rows.values()])
    return rows


def accepted_lines(lines: list, key: str, valid: Callable[[dict], bool], others: list | None = None) -> dict:
    """``{line[key]: line}`` of the ``lines`` that ``valid`` accepts (the last one per key); given ``others``, the
    other whole lines are appended to it."""
    rows = {}
    for r in lines:
        if isinstance(r, dict) and isinstance(r.get(key), str) and accepts(valid, r):
            rows[r[key]] = r
        elif others is not None and isinstance(r, dict):
            others.append(r)
    return rows


def accepts(valid: Callable[[dict], bool], row: dict) -> bool:
    try:
        return bool(valid(row))
    except (KeyError, TypeError, AttributeError):  # a line of another shape
        return False


def annotations(
    prompts: list[dict],
    model_texts: list[str],
    verdicts: list[dict],
    generator: str,
    reference_generator: str,
    annotator: str,
) -> list[dict]:
    """Every pair in alpaca-eval's annotation format (the input of its win-rate functions); a prompt without a
    verdict has preference None, as alpaca-eval keeps its own annotators' missing preferences (NaN)."""
    return [
        {
            "index": int(p["id"]) if p["id"].isdigit() else i,
            "instruction": p["instruction"],
            "output_1": p["reference"],
            "output_2": out,
            "generator_1": reference_generator,
            "generator_2": generator,
            "annotator": annotator,
            "preference": v["preference"],
        }
        for i, (p, out, v) in enumerate(zip(prompts, model_texts, verdicts))
    ]


NO_LC = {"lc_win_rate": None, "lc_standard_error": None}  # LC not measured (the reason goes to the notes)


def length_controlled(rows: list[dict], file_rows: int) -> tuple[dict, str | None]:
    """AlpacaEval 2's LC win rate and its standard error via alpaca-eval itself (``{"lc_win_rate",
    "lc_standard_error"}``), for ``rows`` judged of a prompts file of ``file_rows`` rows; both None, and why, when
    they cannot be computed here."""
    none = dict(NO_LC)
    if why := lc_subset_note(len(rows), file_rows):
        return none, why
    try:
        from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate
    except ImportError as e:
        return none, f"LC {alpaca_eval_unusable(e)}"
    from huggingface_hub import try_to_load_from_cache

    # Its GLM reads precomputed data from the hub data set tatsu-lab/alpaca_eval: use a cached copy, never download.
    if not isinstance(try_to_load_from_cache("tatsu-lab/alpaca_eval", "df_gamed.csv", repo_type="dataset"), str):
        return none, (
            "LC needs tatsu-lab/alpaca_eval's df_gamed.csv in the Hugging Face cache (alpaca-eval's GLM "
            "reads it; nothing is downloaded here): fetch it once with huggingface-cli download "
            "tatsu-lab/alpaca_eval df_gamed.csv --repo-type dataset"
        )
    try:
        metrics = get_length_controlled_winrate(rows, save_weights_dir=None)
    except Exception as e:  # a GLM failure is reported, the win rate stands
        return none, f"alpaca-eval's LC failed ({type(e).__name__}: {str(e)[:200]})"
    se = metrics.get("lc_standard_error")  # alpaca-eval 0.6 and later
    return {"lc_win_rate": float(metrics["length_controlled_winrate"]), "lc_standard_error": _number(se)}, None


LC_MISSING_SHARE = 0.01  # of the prompts without a verdict, past which no LC win rate is given


def lc_missing_note(missing: int, prompts: int, unjudged: int = 0, path: Path | str = "") -> str | None:
    """Why no LC win rate where more than ``LC_MISSING_SHARE`` of the prompts got no verdict, or None. alpaca-eval's
    GLM leaves those out of its fit and averages its prediction over every prompt: with few or no verdicts the
    fit is its regularising rows (another annotator's, of other models), so the figure no longer reads the model.
    ``unjudged`` of the ``missing``: requests the endpoint refused or failed, which a re-run asks again; the others are
    the judge's replies without a letter, stored as its word, which no re-run asks again."""
    if missing <= LC_MISSING_SHARE * prompts:
        return None
    ways = []
    if unjudged:
        ways.append(f"run the command again to ask the judge for the {unjudged} the endpoint refused or failed")
    if missing - unjudged:
        ways.append(
            f"the {missing - unjudged} replies that were not 'a' or 'b' are the judge's word and are not asked again: "
            f"delete their lines (preference null) from {path or 'the verdicts file'} to ask again, or judge with a "
            "model that answers with the letter alone"
        )
    return (
        f"no LC win rate: {missing} of {prompts} prompts have no verdict (more than {LC_MISSING_SHARE:.0%}), and "
        f"alpaca-eval's GLM fit on the rest would read its regularising rows more than this model; {'; '.join(ways)}"
    )


def lc_subset_note(judged: int, file_rows: int) -> str | None:
    """Why no LC win rate, where ``judged`` of a prompts file's ``file_rows`` rows is not alpaca_eval's whole set (a
    file of another size is not that set, cut or not); None where it is."""
    if judged == file_rows == ALPACA_EVAL_ROWS:
        return None
    why = (
        f"the prompts file has {file_rows} rows, not alpaca_eval's {ALPACA_EVAL_ROWS}"
        if file_rows != ALPACA_EVAL_ROWS
        else f"this evaluation judged {judged} of them (max_prompts)"
    )
    return (
        f"LC is defined on the full {ALPACA_EVAL_ROWS}-instruction set (its GLM uses each instruction's difficulty); "
        + why
    )


def package_annotations_path(out_dir, annotators_config: str) -> Path:
    """Where ``alpaca_eval.evaluate(output_path=out_dir)`` writes its annotations: in a folder named after the
    annotator when ``annotators_config`` is a name, in ``out_dir`` itself when it is a path (one with a "/")."""
    return Path(out_dir) / ("" if "/" in annotators_config else annotators_config) / "annotations.json"


def alpaca_eval_unusable(error: ImportError) -> str:
    """Why alpaca-eval cannot be imported, as the end of a sentence: not installed, or installed and failing on an
    import of its own (0.6.6 imports ``pkg_resources``, which setuptools 81 removed, without depending on
    setuptools: it was called "not installed")."""
    missing = getattr(error, "name", None) or ""
    if missing.split(".")[0] == "alpaca_eval":
        return "needs the alpaca-eval package: pip install -e '.[eval]'"
    hint = "; setuptools 81 removed it: pip install 'setuptools<81'" if missing == "pkg_resources" else ""
    return f"needs alpaca-eval, which is installed but fails to import ({type(error).__name__}: {error}{hint})"


def import_alpaca_eval(b):
    """The alpaca-eval package for benchmark ``b``'s ``judge.kind=alpaca_eval``, or a ConfigError saying why not
    (checked before any answer is generated: ``evaluate.run.check_benchmark_inputs``)."""
    try:
        import alpaca_eval
    except ImportError as e:
        raise ConfigError(f"benchmarks.{b.name}.judge.kind=alpaca_eval {alpaca_eval_unusable(e)}") from e
    return alpaca_eval


def package_judge(b, model_outputs_path, reference_path: str, out_dir) -> dict:
    """alpaca-eval's own evaluation (its annotators, its API keys): LC, WR and avg length from its leaderboard."""
    alpaca_eval = import_alpaca_eval(b)
    board, _ = alpaca_eval.evaluate(
        model_outputs=str(model_outputs_path),
        reference_outputs=reference_path,
        annotators_config=b.judge.annotators_config,
        output_path=str(out_dir),
        is_return_instead_of_print=True,
        precomputed_leaderboard=None,
    )
    row = board.iloc[0]
    return {
        "lc_win_rate": float(row["length_controlled_winrate"]),
        "lc_standard_error": _number(row.get("lc_standard_error")),
        "win_rate": float(row["win_rate"]),
        "standard_error": _number(row.get("standard_error")),
        "avg_length": float(row["avg_length"]),
    }


def _number(value) -> float | None:
    """A finite float of alpaca-eval's figure, or None (a column its version lacks, a NaN of a single verdict)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
