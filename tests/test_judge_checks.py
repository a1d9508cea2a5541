"""The judge's choices no end-to-end test pinned (from a mutation review of judge.py, arena.py, benchmarks.py): the
position coin, the prompt ids alpaca-eval's index and the resume key are made of, question ids written as numbers
in one file and strings in the other, which stored line wins, and an Arena-Hard re-run whose half-judged questions
fail again."""

from __future__ import annotations

import json

import pytest

from simpo_exp.evaluate.config import BenchmarkConfig, JudgeConfig
from simpo_exp.evaluate.judge import JudgeError, PairwiseJudge, _sha256, accepted_lines, annotations
from simpo_exp.inference.files import read_jsonl, write_jsonl
from tests.test_evaluate import FakeJudge
from tests.test_evaluate_judging import second_game, serve

DEAD = JudgeConfig(kind="openai", base_url="http://127.0.0.1:9", model="fake", max_retries=0, timeout_s=1)


def test_the_model_is_shown_first_for_about_half_the_prompts_and_where_the_prompt_says():
    """A judge that favours a position moves the win rate unless the model's place is drawn per prompt."""
    judge = PairwiseJudge(DEAD, "benchmarks.alpacaeval2")
    firsts = []
    for i in range(32):
        model_first, content = judge.judge_prompt({"id": str(i), "instruction": "q", "reference": "REF"}, "MODEL")
        a = content.split("## Output (a)\n", 1)[1].split("\n\n## Output (b)\n", 1)[0]
        assert a == ("MODEL" if model_first else "REF")
        firsts.append(model_first)
    assert 8 <= sum(firsts) <= 24  # drawn, not one side for all (the draw is fixed: 32 ids, a fixed count)
    assert firsts == [
        judge.judge_prompt({"id": str(i), "instruction": "q", "reference": "R"}, "M")[0] for i in range(32)
    ]


def test_alpaca_prompt_ids_are_the_files_row_numbers_and_alpaca_evals_index(tmp_path):
    from simpo_exp.evaluate.benchmarks import alpaca_prompts

    rows = [{"instruction": f"Say {i}.", "output": f"ref {i}", "generator": "gpt4_1106_preview"} for i in range(3)]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(rows))
    prompts, info = alpaca_prompts(str(path), "benchmarks.alpacaeval2.prompts_path", None)
    assert [p["id"] for p in prompts] == ["0", "1", "2"] and info["rows"] == 3
    verdicts = [{"preference": 2.0}] * 3
    rows_out = annotations(prompts, ["a", "b", "c"], verdicts, "me", "gpt4_1106_preview", "fake")
    assert [r["index"] for r in rows_out] == [0, 1, 2] and rows_out[1]["instruction"] == "Say 1."


@pytest.mark.parametrize("question_id,answer_id", [("0", 0), (0, "0")])
def test_arena_question_ids_as_numbers_in_one_file_and_strings_in_the_other_are_one_question(
    tmp_path, question_id, answer_id
):
    from simpo_exp.evaluate.benchmarks import arena_prompts

    questions, answers = tmp_path / "question.jsonl", tmp_path / "answer.jsonl"
    questions.write_text(json.dumps({"question_id": question_id, "turns": [{"content": "Explain sorting."}]}) + "\n")
    answer = {"question_id": answer_id, "model_id": "gpt-4-0314", "choices": [{"turns": [{"content": "It orders."}]}]}
    answers.write_text(json.dumps(answer) + "\n")
    (prompt,), info = arena_prompts(str(questions), str(answers), "benchmarks.arena-hard", None)
    assert (prompt["id"], prompt["reference"], info["reference_generator"]) == ("0", "It orders.", "gpt-4-0314")


def test_the_last_stored_line_of_a_prompt_wins_and_a_line_of_another_judge_is_asked_again(tmp_path):
    """A re-run appends a fresh verdict after the earlier empty one of the same prompt; killed before its final
    rewrite, the next run read the stale line and paid again. (Nothing is asked here: the endpoint is dead.)"""
    assert accepted_lines([{"id": "0", "v": 1}, {"id": "0", "v": 2}], "id", lambda r: True)["0"]["v"] == 2
    judge = PairwiseJudge(DEAD, "benchmarks.alpacaeval2")
    prompt = {"id": "0", "instruction": "q", "reference": "R"}
    model_first, content = judge.judge_prompt(prompt, "M")
    line = {"id": "0", "judge": "fake", "prompt_sha256": _sha256(content), "model_first": model_first}
    path = tmp_path / "verdicts.jsonl"
    write_jsonl(path, [{**line, "reply": ""}, {**line, "reply": "a"}])
    (verdict,) = judge.judge([prompt], ["M"], path)
    assert verdict["preference"] == (2.0 if model_first else 1.0)
    write_jsonl(path, [{**line, "judge": "other", "reply": "a"}])  # another judge's word: not this one's verdict
    with pytest.raises(JudgeError):  # so it is asked, of an endpoint that is not there
        judge.judge([prompt], ["M"], path)


def test_an_arena_rerun_judges_new_questions_though_the_half_judged_ones_fail_again(tmp_path):
    """The first run left four questions with their second game failed (HTTP 500 every time); the re-run adds three
    questions. Asked first, the four failed in a row and stopped the judging as if the endpoint were down, before
    the new questions; they are asked last and their failing again is not the endpoint's."""
    from simpo_exp.evaluate.arena import judge_arena_hard
    from simpo_exp.evaluate.judge import FAILED_IN_A_ROW

    failing = [f"Explain topic {i}." for i in range(4)]
    assert len(failing) > FAILED_IN_A_ROW

    class SecondGamesFail(FakeJudge):
        requests: list = []
        failed: list = []

        def respond(self, body):
            if any(second_game(body, q) for q in failing):
                self.failed.append(body)
                self.send_response(500)
                self.end_headers()
                return
            super().respond(body)

    prompts = [{"id": f"q{i}", "instruction": f"Explain topic {i}.", "reference": "r" * 10} for i in range(7)]
    texts = ["m" * 30] * 7
    server, url = serve(SecondGamesFail)
    try:
        j = JudgeConfig(kind="openai", base_url=url, model="org/fake-judge", max_retries=0, timeout_s=5, concurrency=1)
        b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=j)
        first = judge_arena_hard(b, prompts[:4], texts[:4], "my-model", "gpt-4-0314", tmp_path)
        assert first["metrics"]["unjudged_games"] == 4
        SecondGamesFail.requests, SecondGamesFail.failed = [], []
        again = judge_arena_hard(b, prompts, texts, "my-model", "gpt-4-0314", tmp_path)
    finally:
        server.shutdown()
    assert again["metrics"]["unjudged_games"] == 4 and again["metrics"]["judged_games"] == 4 + 6
    assert len(SecondGamesFail.failed) == 4 and len(SecondGamesFail.requests) == 6  # the kept games once more, the new
    path = tmp_path / "model_judgment" / "org_fake-judge" / "my-model.jsonl"
    assert len(read_jsonl(path)) == 7


def test_half_judged_questions_whose_second_games_are_refused_on_a_rerun_are_no_refused_setting(tmp_path):
    """Five questions kept half-judged (their first games' replies stored), their second games refused (HTTP 400) on
    the re-run: the endpoint took the first games, so five refusals are five prompts without a verdict, not "every
    request refused, a setting the endpoint does not take"."""
    from simpo_exp.evaluate.arena import judge_arena_hard
    from simpo_exp.evaluate.judge import REFUSED_BEFORE_ANY

    questions = [f"Explain topic {i}." for i in range(REFUSED_BEFORE_ANY)]

    class SecondGamesFail(FakeJudge):
        requests: list = []
        status = 500

        def respond(self, body):
            if any(second_game(body, q) for q in questions):
                self.send_response(self.status)
                self.end_headers()
                return
            super().respond(body)

    prompts = [{"id": f"q{i}", "instruction": q, "reference": "r" * 10} for i, q in enumerate(questions)]
    texts = ["m" * 30] * len(prompts)
    server, url = serve(SecondGamesFail)
    try:
        j = JudgeConfig(kind="openai", base_url=url, model="org/fake-judge", max_retries=0, timeout_s=5, concurrency=1)
        b = BenchmarkConfig(name="arena-hard", kind="arena_hard", judge=j)
        first = judge_arena_hard(b, prompts, texts, "my-model", "gpt-4-0314", tmp_path)
        SecondGamesFail.status = 400
        again = judge_arena_hard(b, prompts, texts, "my-model", "gpt-4-0314", tmp_path)
    finally:
        server.shutdown()
    assert first["metrics"]["unjudged_games"] == again["metrics"]["unjudged_games"] == len(prompts)
    assert again["metrics"]["judged_games"] == len(prompts)  # the first games, kept


def test_a_stored_arena_judgment_of_another_judge_in_the_same_file_is_not_reused(tmp_path):
    """``org/judge`` and ``org_judge`` keep their judgments in one file (``model_judgment/org_judge/``): the other
    judge's verdicts on the same question and answers are not this judge's."""
    from simpo_exp.evaluate.arena import stored_judgments, user_prompt

    prompt, text = {"id": "q0", "instruction": "Explain sorting.", "reference": "r" * 10}, "m" * 30
    games = [user_prompt(prompt["instruction"], "r" * 10, text), user_prompt(prompt["instruction"], text, "r" * 10)]
    line = {"question_id": "q0", "model": "my-model", "judge": "org_judge"}
    line["games"] = [{"user_prompt": g, "judgment": "[[A=B]]", "score": "A=B"} for g in games]
    path = tmp_path / "model_judgment" / "org_judge" / "my-model.jsonl"
    write_jsonl(path, [line])
    assert stored_judgments(path, [prompt], [text], "org_judge")[0] == {"q0": line}  # its own judge's: reused
    assert stored_judgments(path, [prompt], [text], "org/judge")[0] == {}


def test_the_judging_stops_with_its_reason_not_with_a_prompt_stopped_after_it(tmp_path):
    """A prompt whose request found the judging stopped (``JudgeStopped``, wrapped in the prompt's error) finished
    before the prompt that stopped it: the command said only "the judging stopped before this request was sent"."""
    import dataclasses
    import threading
    import time

    from simpo_exp.evaluate.judge import JudgeStopped, stopped_only

    asked = threading.Event()  # both prompts in flight before the first one ends

    def ask(prompt, text):
        if prompt["id"] == "0":
            asked.wait(10)
            try:
                raise JudgeStopped("the judging stopped before this request was sent")
            except JudgeStopped as e:
                raise JudgeError("judging prompt id='0': stopped") from e
        asked.set()
        time.sleep(0.3)
        raise JudgeError("the judge endpoint did not answer after 1 tries")

    judge = PairwiseJudge(dataclasses.replace(DEAD, concurrency=2), "benchmarks.alpacaeval2")
    prompts = [{"id": str(i), "instruction": "q", "reference": "R"} for i in range(2)]
    with pytest.raises(JudgeError, match="did not answer") as err:
        judge.judge_lines(ask, prompts, ["M", "M"], tmp_path / "v.jsonl", {})
    assert not stopped_only(err.value)
