"""Judges: the sort-digits rule, a pairwise judge behind an OpenAI-compatible endpoint, alpaca-eval's own.

Every judge gives, per prompt, a preference in alpaca-eval's encoding: 1 when the baseline's answer
(output_1) is better, 2 when the evaluated model's (output_2) is, 1.5 for a tie. The win rate is the
mean of ``preference - 1`` in percent, so a tie counts half (AlpacaEval's and Arena-Hard's convention).

The pairwise prompt shows the instruction and the two answers as (a) and (b); which answer is (a)
is decided per prompt by a seeded coin (``derive_seed(prompt id)``), so a judge that favours one
position does not favour either model. The judge must reply with the letter of the better answer.

Length-controlled win rate (AlpacaEval 2's LC) is alpaca-eval's own GLM
(``alpaca_eval.metrics.glm_winrate.get_length_controlled_winrate``): computed when the package is
installed and the full evaluation set was judged; otherwise null, and the results say why.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from simpo_exp.config import ConfigError
from simpo_exp.inference.sampling import derive_seed
from simpo_exp.inference.scoring import sort_digits_score

log = logging.getLogger(__name__)
ALPACA_EVAL_ROWS = 805
SYSTEM = "You are a careful judge of answers to instructions. You reply with one letter and nothing else."
TEMPLATE = (
    "Which of the two outputs follows the instruction better: more helpful, correct and complete?\n\n"
    "## Instruction\n{instruction}\n\n## Output (a)\n{a}\n\n## Output (b)\n{b}\n\n"
    "Reply with the single letter of the better output: a or b."
)


class JudgeError(ConfigError):
    """The judge could not give verdicts (endpoint down, unreadable replies); generations are kept."""


def win_rate(preferences: list[float]) -> float:
    return 100.0 * sum(p - 1.0 for p in preferences) / len(preferences)


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
        self.api_key = os.environ.get(j.api_key_env, "")

    def _ask(self, content: str) -> str:
        return self.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}], max_tokens=8)

    def chat(self, messages: list[dict], max_tokens: int) -> str:
        """The endpoint's reply to ``messages`` (greedy), with ``max_retries`` more tries when it does not answer."""
        body = json.dumps({"model": self.j.model, "temperature": 0, "max_tokens": max_tokens, "messages": messages})
        headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
        }
        last = None
        for attempt in range(self.j.max_retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.j.timeout_s) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"] or ""
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, ValueError) as e:
                last = e
                if attempt < self.j.max_retries:
                    time.sleep(min(2**attempt, 8))
        raise JudgeError(
            f"{self.key}.judge.base_url={self.j.base_url!r}: the judge endpoint did not answer after "
            f"{self.j.max_retries + 1} tries ({last}). The generations are kept; start the judge and "
            "re-run the same command with evaluate.judge_only=true"
        )

    def verdict(self, prompt: dict, model_text: str) -> dict:
        model_first = derive_seed("judge-order", prompt["id"]) % 2 == 0
        a, b = (model_text, prompt["reference"]) if model_first else (prompt["reference"], model_text)
        reply = self._ask(TEMPLATE.format(instruction=prompt["instruction"], a=a, b=b))
        letter = reply.strip().strip("().*").lower()[:1]
        if letter not in ("a", "b"):
            raise JudgeError(
                f"{self.key}.judge.model={self.j.model!r} replied {reply[:80]!r} for prompt "
                f"{prompt['id']}, not 'a' or 'b'; use a model that follows the judge prompt"
            )
        model_won = (letter == "a") == model_first
        return {"id": prompt["id"], "model_first": model_first, "reply": reply, "preference": 2.0 if model_won else 1.0}

    def judge(self, prompts: list[dict], model_texts: list[str]) -> list[dict]:
        with ThreadPoolExecutor(self.j.concurrency) as pool:
            return list(pool.map(self.verdict, prompts, model_texts))


def annotations(
    prompts: list[dict],
    model_texts: list[str],
    verdicts: list[dict],
    generator: str,
    reference_generator: str,
    annotator: str,
) -> list[dict]:
    """Judged pairs in alpaca-eval's annotation format (the input of its win-rate functions)."""
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


def length_controlled(rows: list[dict], full_set: bool) -> tuple[float | None, str | None]:
    """AlpacaEval 2's LC win rate via alpaca-eval itself; (None, why) when it cannot be computed here."""
    if not full_set:
        return None, (
            f"LC is defined on the full {ALPACA_EVAL_ROWS}-instruction set (its GLM uses each "
            "instruction's difficulty); this evaluation judged a subset"
        )
    try:
        from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate
    except ImportError:
        return None, "LC needs the alpaca-eval package: pip install -e '.[eval]'"
    from huggingface_hub import try_to_load_from_cache

    # Its GLM reads precomputed data from the hub data set tatsu-lab/alpaca_eval: use a cached copy, never download.
    if not isinstance(try_to_load_from_cache("tatsu-lab/alpaca_eval", "df_gamed.csv", repo_type="dataset"), str):
        return None, (
            "LC needs tatsu-lab/alpaca_eval's df_gamed.csv in the Hugging Face cache (alpaca-eval's GLM "
            "reads it; nothing is downloaded here): fetch it once with huggingface-cli download "
            "tatsu-lab/alpaca_eval df_gamed.csv --repo-type dataset"
        )
    try:
        metrics = get_length_controlled_winrate(rows, save_weights_dir=None)
    except Exception as e:  # a GLM failure is reported, the win rate stands
        return None, f"alpaca-eval's LC failed ({type(e).__name__}: {str(e)[:200]})"
    return float(metrics["length_controlled_winrate"]), None


def package_judge(b, model_outputs_path, reference_path: str, out_dir) -> dict:
    """alpaca-eval's own evaluation (its annotators, its API keys): LC, WR and avg length from its leaderboard."""
    try:
        import alpaca_eval
    except ImportError as e:
        raise ConfigError(
            f"benchmarks.{b.name}.judge.kind=alpaca_eval needs the alpaca-eval package: pip install -e '.[eval]'"
        ) from e
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
        "win_rate": float(row["win_rate"]),
        "avg_length": float(row["avg_length"]),
    }
