"""Arena-Hard judged as arena-hard-auto (v0.1) judges it, and its score: win rate against the baseline.

The facts below are arena-hard-auto's (lmarena/arena-hard-auto: ``config/judge_config.yaml``,
``gen_judgment.py``, ``show_result.py`` of v0.1, the version the SimPO paper reports); the code is ours.

- Judge prompt: its system prompt (the judge answers the question itself first, then compares) and
  its user template with the question and the two answers as assistant A and B, verbatim below.
- Two games per question: game 1 shows the baseline's answer as A and the model's as B, game 2 the
  other way round. Greedy judge replies of at most ``judge.max_tokens`` (4096) tokens.
- Verdict: the labels ``[[...]]`` in the reply (regex ``\\[\\[([AB<>=]+)\\]\\]``). One distinct label is
  the verdict; none: the judge is asked to finish with a label (``judge.label_attempts`` replies in all,
  2 in v0.1, joined by newlines in ``judgment``); several different labels: no verdict. A game without
  a verdict stores ``score: null`` and adds no battle; results count these games.
- Battles: a slight verdict (``A>B``, ``B>A``) is one battle, a strong one (``A>>B``, ``B>>A``)
  ``judge.strong_weight`` battles (3), a tie ``A=B`` one tied battle.
- Score: a Bradley-Terry fit over the battles (its logistic regression counts a tie as half a win for
  each side) turned into the predicted win rate of the model against the baseline, in percent; the
  interval is the 2.5 and 97.5 percentiles of bootstrap refits (100 rounds, seed 42).

With two players the fit has a closed form. BT gives P(model beats baseline) = 1 / (1 + exp(r_b - r_m))
= p, a single free number; the log-likelihood of battle outcomes s_i (1 win, 1/2 tie, 0 loss) is
sum_i s_i log p + (1 - s_i) log(1 - p), which is largest at p = sum_i s_i / N: the win rate is the
battles' mean outcome (ties half, strong verdicts counted ``strong_weight`` times). The bootstrap here
resamples questions, not single battles as arena-hard-auto does: the battles of one question come
from the same two answers, so resampling them apart would understate the spread.

Judgments go to ``model_judgment/<judge model>/<model>.jsonl`` in arena-hard-auto's format
(``question_id``, ``model``, ``judge``, ``games: [{user_prompt, judgment, score}, x2]``), which its
``show_result.py`` reads. Each judgment is appended to that file as soon as its two games are judged
(arena-hard-auto's ``gen_judgment.py`` appends too), and the file is rewritten in question order at the
end. A stored judgment is reused when its judge and both prompts (question and answers) are unchanged,
so a judging that was killed or stopped by a failing endpoint resumes: a re-run asks again only what a kill
caught in flight (the first game of a question whose second was not in), and a finished one asks nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from simpo_exp.evaluate.judge import (
    EMPTY_REPLY,
    UNJUDGED_GAMES,
    JudgeError,
    PairwiseJudge,
    RequestRefused,
    accepted_lines,
    accepts,
    judge_file_name,
    unjudged_note,
)
from simpo_exp.inference.files import write_jsonl
from simpo_exp.rundir import read_jsonl as read_lines

SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your "
    "job is to evaluate which assistant's answer is better.\n\nBegin your evaluation by generating your own "
    "answer to the prompt. You must provide your answers before judging any answers.\n\nWhen evaluating the "
    "assistants' answers, compare both assistants' answers with your answer. You must identify and correct any "
    "mistakes or inaccurate information.\n\nThen consider if the assistant's answers are helpful, relevant, and "
    "concise. Helpful means the answer correctly responds to the prompt or follows the instructions. Note when "
    "user prompt has any ambiguity or more than one interpretation, it is more helpful and appropriate to ask "
    "for clarifications or more information from the user than providing an answer based on assumptions. "
    "Relevant means all parts of the response closely connect or are appropriate to what is being asked. "
    "Concise means the response is clear and not verbose or excessive.\n\nThen consider the creativity and "
    "novelty of the assistant's answers when needed. Finally, identify any missing important information in "
    "the assistants' answers that would be beneficial to include when responding to the user prompt.\n\nAfter "
    "providing your explanation, you must output only one of the following choices as your final verdict with "
    "a label:\n\n1. Assistant A is significantly better: [[A>>B]]\n2. Assistant A is slightly better: "
    "[[A>B]]\n3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: [[B>A]]\n5. Assistant B "
    'is significantly better: [[B>>A]]\n\nExample output: "My final verdict is tie: [[A=B]]".'
)
USER = (
    "<|User Prompt|>\n{question}\n\n<|The Start of Assistant A's Answer|>\n{a}\n<|The End of Assistant A's "
    "Answer|>\n\n<|The Start of Assistant B's Answer|>\n{b}\n<|The End of Assistant B's Answer|>"
)
CONTINUE = "continue your judgment and finish by outputting a final verdict label"
LABEL = re.compile(r"\[\[([AB<>=]+)\]\]")
# label -> (assistant A's outcome: 1 win, 0.5 tie, 0 loss; strong verdict); mirrored spellings as show_result v2 has
OUTCOME = {
    "A>>B": (1.0, True),
    "A>B": (1.0, False),
    "A=B": (0.5, False),
    "B>A": (0.0, False),
    "B>>A": (0.0, True),
    "B<<A": (1.0, True),
    "B<A": (1.0, False),
    "B=A": (0.5, False),
    "A<B": (0.0, False),
    "A<<B": (0.0, True),
}
METHOD = (
    "arena-hard-auto v0.1 score: its judge prompt, two games per question (positions swapped), strong verdicts "
    "weighted {w}, Bradley-Terry win rate against {baseline} in percent (closed form for two players: the "
    "battles' mean outcome, ties half); 95% interval from {rounds} bootstrap rounds over questions (seed {seed}; "
    "arena-hard-auto resamples single battles, whose intervals are narrower: not comparable with its leaderboard's)"
)


def parse_label(judgment: str) -> tuple[str | None, bool]:
    """(verdict label or None, whether to ask again): no label asks again, two different labels give none."""
    labels = set(LABEL.findall(judgment))
    if len(labels) == 1:
        label = labels.pop()
        return (label if label in OUTCOME else None), False
    return None, not labels


def user_prompt(question: str, a: str, b: str) -> str:
    return USER.format(question=question, a=a, b=b)


class ArenaHardJudge(PairwiseJudge):
    """Two games per question on an OpenAI-compatible endpoint, each a judgment record of arena-hard-auto."""

    def game(self, question: str, a: str, b: str, started: dict | None = None) -> dict:
        """One game: the judge's reply, asked again to finish (``CONTINUE``) while it gives no label, up to
        ``label_attempts`` replies. A game stopped after a reply without a label (the endpoint failed, or refused,
        on the request to finish) is returned, or attached to the ``JudgeError`` as ``game``, with its ``replies``;
        given back as ``started``, it goes on from them instead of paying for them again."""
        prompt = user_prompt(question, a, b)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        replies = list(started.get("replies") or []) if started and started.get("user_prompt") == prompt else []
        for reply in replies:
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": CONTINUE}]
        judgment = "".join("\n" + reply for reply in replies)
        label, again = parse_label(judgment)

        def unfinished(error: str) -> dict:  # no verdict now; the next run asks again, from the replies it has
            game = {"user_prompt": prompt, "judgment": judgment, "score": None, "error": error}
            return {**game, "replies": replies} if replies else game

        while again and len(replies) < self.j.label_attempts:
            try:
                reply = self.chat(messages, self.j.max_tokens)
            except RequestRefused as e:  # no verdict (arena-hard-auto's "$ERROR$"), asked again by the next run
                return unfinished(str(e))
            except JudgeError as e:
                if replies:
                    e.game = unfinished(str(e))
                raise
            if not reply.strip():  # the endpoint's failure, not a judgment: no verdict now, asked again next run
                return unfinished(EMPTY_REPLY)
            replies.append(reply)
            judgment += "\n" + reply
            label, again = parse_label(judgment)
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": CONTINUE}]
        # no label after every reply allowed: the replies kept, so that a later run under a larger label_attempts
        # goes on from them (``to_continue``) instead of reusing the game as judged without a verdict
        return {"user_prompt": prompt, "judgment": judgment, "score": label, **({"replies": replies} if again else {})}

    def judgment(self, prompt: dict, model_text: str, model_id: str, kept: list | None = None) -> dict:
        """Both games of a question; ``kept``: games of an earlier judgment of it with a reply (its other game got
        none), reused instead of paying for them again."""
        q, base = prompt["instruction"], prompt["reference"]
        games, orders = list(kept or [None, None]), [(base, model_text), (model_text, base)]  # game 2: swapped
        line = {"question_id": prompt["id"], "model": model_id, "judge": self.j.model, "games": games}
        try:
            for i, (a, b) in enumerate(orders):
                # not asked, stopped after a reply (``game``), or out of replies with no label under a smaller
                # label_attempts than this command's
                if games[i] is None or unanswered(games[i]) or to_continue(games[i], self.j.label_attempts):
                    games[i] = self.game(q, a, b, games[i])
        except JudgeError as e:
            error = JudgeError(f"judging question_id={prompt['id']!r}: {e}")
            games[i] = getattr(e, "game", None) or games[i]  # a reply of the game that failed is kept too
            if any(games):  # a game paid for is written, the other marked unanswered: the next run asks it alone
                unasked = {"judgment": "", "score": None, "error": str(e)}
                line["games"] = [
                    g or {"user_prompt": user_prompt(q, a, b), **unasked} for g, (a, b) in zip(games, orders)
                ]
                error.partial = line
            raise error from e
        return line

    def judge_all(self, prompts: list[dict], texts: list[str], model_id: str, path: Path) -> list[dict]:
        """Judgments in question order, each appended to ``path`` as it finishes; stored ones reused."""
        stored, kept = stored_judgments(path, prompts, texts, self.j.model, self.j.label_attempts)
        answered = any(g for games in kept.values() for g in games)  # a first game's reply, its second refused
        return self.judge_lines(
            lambda p, t: self.judgment(p, t, model_id, kept.get(p["id"])),
            prompts,
            texts,
            path,
            stored,
            again=set(kept),
            answered=answered,
        )


def kept_aside(path: Path) -> Path:
    """Where the judgments of ``path`` (``model_judgment/<judge>/<model>.jsonl``) that this command does not use are
    kept: beside ``model_judgment/``, whose every ``*.jsonl`` line arena-hard-auto's show_result.py reads."""
    return path.parent.parent.parent / "model_judgment_kept" / path.parent.name / path.name


def stored_judgments(
    path: Path, prompts: list[dict], texts: list[str], judge: str, label_attempts: int | None = None
) -> tuple[dict, dict]:
    """(``{question_id: judgment}`` still valid: same judge, same question and answers in both games, no game the
    endpoint refused; ``{question_id: [game or None, game or None]}``: the games with a reply of the judgments
    whose other game was refused, so that only that one is asked again, and the games stopped after a reply without
    a label, which go on from it). The others (questions past a smaller ``max_prompts``, another baseline's
    answers, another judge, whole or half judged), paid for, are moved to ``kept_aside`` and come back when their
    command does."""
    expected = {}
    for p, text in zip(prompts, texts):
        q, base = p["instruction"], p["reference"]
        expected[p["id"]] = [user_prompt(q, base, text), user_prompt(q, text, base)]

    def same(r: dict) -> bool:  # this judge, on this question and these answers
        return r["judge"] == judge and [g["user_prompt"] for g in r["games"]] == expected.get(r["question_id"])

    def valid(r: dict) -> bool:  # a game out of replies with no label goes on where label_attempts allows more
        return same(r) and not refused(r) and not any(to_continue(g, label_attempts) for g in r["games"])

    aside, others = kept_aside(path), []
    # the lines kept aside before (valid again or not), then the file's own, which win
    rows = accepted_lines([*read_lines(aside), *read_lines(path)], "question_id", valid, others)
    kept, half = {}, {}  # a judgment of this command's set is in ``others`` only when a game of it got no reply
    for r in others:
        if accepts(same, r) and r["question_id"] not in rows:
            kept[r["question_id"]] = [None if unanswered(g) and not g.get("replies") else g for g in r["games"]]
            half[r["question_id"]] = r  # kept aside too until its other game is judged, so that a kill loses nothing
    others = [r for r in others if not accepts(same, r)] + list(half.values())
    # a kill between any two writes loses none: aside first holds both what it held and what goes there now, then
    # the judgments file, then aside only what stays aside
    before = read_lines(aside)
    if others:
        write_jsonl(aside, [*before, *others])
    write_jsonl(path, list(rows.values()))
    if others:
        write_jsonl(aside, others)
    elif aside.exists():  # what it held is in the judgments file now
        aside.unlink()
    return rows, kept


def to_continue(game, label_attempts: int | None) -> bool:
    """Whether a game that used every reply it was allowed without giving a label may go on: ``label_attempts``
    allows more replies than it has."""
    if not isinstance(game, dict) or label_attempts is None or game.get("score") is not None or game.get("error"):
        return False
    replies = game.get("replies") or []
    return bool(replies) and len(replies) < label_attempts and parse_label(game.get("judgment") or "")[1]


def refused(row: dict) -> bool:
    """Whether a game of the judgment got no reply to judge by; such a judgment is asked again (that game alone)."""
    return any(unanswered(g) for g in row["games"])


def unanswered(game) -> bool:
    """Whether a game got no reply to judge by: the endpoint refused it or replied with no text (a line stored
    before empty replies were marked included)."""
    return isinstance(game, dict) and bool(game.get("error") or not str(game.get("judgment") or "").strip())


def question_outcomes(row: dict, weight: int) -> tuple[float, int, int]:
    """(the model's summed battle outcomes, battles, games without a verdict) of one judgment record."""
    points, battles, missing = 0.0, 0, 0
    for model_is_a, game in zip((False, True), row["games"]):
        if game.get("score") not in OUTCOME:
            missing += 1
            continue
        a_outcome, strong = OUTCOME[game["score"]]
        n = weight if strong else 1
        points += n * (a_outcome if model_is_a else 1.0 - a_outcome)
        battles += n
    return points, battles, missing


def arena_score(rows: list[dict], weight: int, rounds: int, seed: int) -> dict:
    """Win rate against the baseline (percent) with its bootstrap interval, and the battle counts."""
    per_q = np.array([question_outcomes(r, weight) for r in rows], dtype=float).reshape(-1, 3)
    missing = int(per_q[:, 2].sum())
    judged = per_q[per_q[:, 1] > 0]
    out = {"battles": int(judged[:, 1].sum()), "unparseable_games": missing, "judged_games": 2 * len(rows) - missing}
    if not len(judged):
        return {**out, "win_rate": None, "win_rate_ci_low": None, "win_rate_ci_high": None}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(judged), size=(rounds, len(judged)))
    boot = 100.0 * judged[idx, 0].sum(axis=1) / judged[idx, 1].sum(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {
        **out,
        "win_rate": 100.0 * float(judged[:, 0].sum() / judged[:, 1].sum()),
        "win_rate_ci_low": float(low),
        "win_rate_ci_high": float(high),
    }


def judge_arena_hard(b, prompts: list[dict], texts: list[str], model_id: str, baseline: str, out: Path) -> dict:
    """Judge the answers as arena-hard-auto does; returns the runner's metrics, notes and method record."""
    j = b.judge
    path = Path(out) / "model_judgment" / judge_file_name(j.model) / f"{model_id}.jsonl"
    rows = ArenaHardJudge(j, f"benchmarks.{b.name}").judge_all(prompts, texts, model_id, path)
    metrics = arena_score(rows, j.strong_weight, j.bootstrap_rounds, j.bootstrap_seed)
    notes = []
    errors = [g["error"] for r in rows for g in r["games"] if g.get("error")]
    metrics["unparseable_games"] -= len(errors)  # the judge's word, apart from the requests the endpoint failed
    metrics[UNJUDGED_GAMES] = len(errors)
    if metrics["unparseable_games"]:
        notes.append(
            f"{metrics['unparseable_games']} of {2 * len(rows)} judge replies gave no single verdict label "
            f"after {j.label_attempts} tries (score null in {path}); those games add no battles"
        )
    if errors:
        notes.append(unjudged_note(len(errors), 2 * len(rows), "games", errors))
    method = METHOD.format(w=j.strong_weight, baseline=baseline, rounds=j.bootstrap_rounds, seed=j.bootstrap_seed)
    return {"metrics": metrics, "notes": notes, "win_rate_method": method, "judgments_path": str(path)}
