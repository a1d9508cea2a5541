"""Config of the evaluate stage: which runs, which benchmarks, how to decode and how to judge.

``conf/evaluate.yaml`` composes the ``benchmark`` group; each option is stored under
``benchmarks.<name>`` (its file says ``# @package benchmarks.<name>``), so ``benchmark=rule`` picks one
and ``benchmark=[rule,alpacaeval2]`` several. The evaluated run's own config (model, chat template,
data, seed) is read back from its ``.hydra/config.yaml``, not composed here.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from simpo_exp.config import DEVICES, ConfigError, _check, _check_choice, _fail, structured

BENCHMARK_KINDS = ("rule", "alpacaeval", "arena_hard", "lm_eval")
JUDGE_KINDS = ("none", "rule", "openai", "alpaca_eval")
# the judges each benchmark kind runs (simpo_exp/evaluate/run.py); lm-eval scores its own tasks
JUDGES_OF = {
    "rule": ("rule",),
    "alpacaeval": ("none", "openai", "alpaca_eval"),
    "arena_hard": ("none", "openai"),
    "lm_eval": ("none",),
}
# What each benchmark kind reads besides name, kind and judge.kind (simpo_exp/evaluate/run.py, lmeval.py,
# arena.py, judge.py). A key outside its kind's list that differs from its default would be recorded and never
# used, so it is refused. Keys of a judge kind the benchmark runs but this config does not choose (judge.base_url
# under judge.kind=none, decoding.vllm_* under the hf backend) are a judge or backend switched off, and pass.
GENERATING = ("max_prompts", "shard_size", "decoding", "by_model")
OPENAI_JUDGE = tuple(
    f"judge.{k}"
    for k in ("base_url", "model", "api_key_env", "timeout_s", "max_retries", "rate_limit_wait_s", "concurrency")
)
ARENA_JUDGE = tuple(f"judge.{k}" for k in ("max_tokens", "label_attempts", "strong_weight", "bootstrap_rounds"))
READS = {
    "rule": GENERATING,
    "alpacaeval": (*GENERATING, "prompts_path", *OPENAI_JUDGE, "judge.annotators_config"),
    "arena_hard": (*GENERATING, "prompts_path", "reference_path", *OPENAI_JUDGE, *ARENA_JUDGE, "judge.bootstrap_seed"),
    # lm-eval decodes as its tasks say; only the batch size goes to it
    "lm_eval": ("tasks", "num_fewshot", "limit", "apply_chat_template", "decoding.batch_size"),
}
UNREAD_HINTS = {
    ("lm_eval", "decoding"): "lm-eval decodes as its tasks say; of decoding.*, only batch_size reaches it",
    ("lm_eval", "max_prompts"): "lm-eval's own cap on prompts is limit",
}
BACKENDS = ("auto", "hf", "vllm")
WANDB = ("auto", "off")


@dataclass
class DecodingConfig:
    backend: str = "auto"  # auto: vLLM where installed and the run's device is a GPU, else transformers' generate
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 4096
    # Extra stop ids; the tokenizer's EOS and the chat template's end-of-turn token always stop.
    stop_token_ids: List[int] = field(default_factory=list)
    seed: int = 0
    batch_size: int = 16  # prompts per generate() call (hf)
    vllm_gpu_memory_utilization: float = 0.9
    vllm_tensor_parallel_size: int = 1


@dataclass
class JudgeConfig:
    # none: generations only | rule: the synthetic task's sort-digits check | openai: pairwise verdicts
    # from an OpenAI-compatible chat endpoint (base_url + model, e.g. a local vLLM server) |
    # alpaca_eval: the alpaca-eval package's own annotators (its API keys, its judge prompts)
    kind: str = "none"
    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # read from the environment, never stored; a local server needs none
    annotators_config: str = "weighted_alpaca_eval_gpt4_turbo"  # kind=alpaca_eval
    timeout_s: float = 60.0
    max_retries: int = 2
    # seconds one request may wait on a rate limit (HTTP 429, or 503 with Retry-After) before the command stops;
    # those waits are not counted as tries
    rate_limit_wait_s: float = 600.0
    concurrency: int = 4
    # arena_hard with kind=openai, as arena-hard-auto v0.1 judges (simpo_exp/evaluate/arena.py): tokens per
    # judge reply, replies per game before a game without a verdict label is given up, battles per strong
    # verdict ([[A>>B]], [[B>>A]]), bootstrap rounds and seed of the win rate's 95% interval
    max_tokens: int = 4096
    label_attempts: int = 2
    strong_weight: int = 3
    bootstrap_rounds: int = 100
    bootstrap_seed: int = 42


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    kind: str = MISSING
    # alpacaeval: a JSON list of {instruction, output, generator, dataset} (alpaca_eval's evaluation set;
    # its `output` is the reference answer); arena_hard: question.jsonl of arena-hard-auto.
    prompts_path: str = ""
    reference_path: str = ""  # arena_hard: the baseline's answers (model_answer/<baseline>.jsonl)
    max_prompts: Optional[int] = None  # the first N prompts only (a smoke test); null: all
    shard_size: int = 64  # prompts per generation shard; a killed run redoes only unfinished shards
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    # Decoding changes per model preset (the run's model.name), where the official configs differ.
    by_model: Dict[str, Any] = field(default_factory=dict)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # lm_eval: lm-evaluation-harness tasks, run on data sets already on this machine
    tasks: List[str] = field(default_factory=list)
    num_fewshot: Optional[int] = None
    limit: Optional[int] = None
    apply_chat_template: bool = True


@dataclass
class EvaluateSection:
    path: str = MISSING  # a run directory or a sweep directory (or any folder of runs)
    judge_only: bool = False  # judge stored generations again (e.g. after the judge endpoint failed)
    device: str = "auto"
    model_card: bool = True  # write <run>/model/README.md with the results
    push_to_hub: bool = False  # upload <run>/model when a token is set (hub_repo, plus the run name in a sweep)
    hub_repo: str = ""
    hub_token_env: str = "HF_TOKEN"
    # auto: add the results to the W&B run the training logged to (its id from <run>/wandb_run.json), in
    # its mode (WANDB_MODE wins; online needs a W&B key); off: results files only
    wandb: str = "auto"


@dataclass
class EvaluateRunConfig:
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    benchmarks: Dict[str, BenchmarkConfig] = field(default_factory=dict)
    output_dir: str = ""  # Hydra's folder of this command (its log); results go into each run's eval/


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateRunConfig)


def decoding_for(b: BenchmarkConfig, model_name: str) -> DecodingConfig:
    """The benchmark's decoding with its ``by_model[model_name]`` changes applied."""
    return dataclasses.replace(b.decoding, **dict(b.by_model.get(model_name) or {}))


def _unread_keys(b: BenchmarkConfig) -> list[tuple[str, Any, Any]]:
    """(key, value, default) of the benchmark's settings that its kind never reads and that differ from the default."""
    reads, fresh = READS[b.kind], BenchmarkConfig(name=b.name, kind=b.kind)
    found = []
    for section in ("", "decoding", "judge"):
        if section in reads:  # the whole section is read
            continue
        node, default = (getattr(b, section), getattr(fresh, section)) if section else (b, fresh)
        for f in dataclasses.fields(node):
            key = f"{section}.{f.name}" if section else f.name
            if key in ("name", "kind", "decoding", "judge", "judge.kind") or key in reads:
                continue
            if getattr(node, f.name) != getattr(default, f.name):
                found.append((key, getattr(node, f.name), getattr(default, f.name)))
    return found


def _validate_decoding(key: str, d: DecodingConfig) -> None:
    """Refuse a decoding value out of range, naming it as ``<key>.<name>``."""
    _check_choice(f"{key}.backend", d.backend, BACKENDS)
    _check(d.temperature >= 0, f"{key}.temperature", d.temperature, "must be >= 0 (0: greedy)")
    _check(0 < d.top_p <= 1, f"{key}.top_p", d.top_p, "must be in (0, 1]")
    for name in ("max_new_tokens", "batch_size", "vllm_tensor_parallel_size"):
        _check(getattr(d, name) >= 1, f"{key}.{name}", getattr(d, name), "must be an integer >= 1")
    _check(
        0 < d.vllm_gpu_memory_utilization <= 1,
        f"{key}.vllm_gpu_memory_utilization",
        d.vllm_gpu_memory_utilization,
        "must be in (0, 1]",
    )


def _validate_benchmark(key: str, b: BenchmarkConfig) -> None:
    _check_choice(f"{key}.kind", b.kind, BENCHMARK_KINDS)
    _check_choice(f"{key}.judge.kind", b.judge.kind, JUDGE_KINDS)
    # a judge the benchmark does not run would be recorded, not used (the rule judge knows only the synthetic task)
    _check_choice(f"{key}.judge.kind", b.judge.kind, JUDGES_OF[b.kind])
    for name, value, default in _unread_keys(b):
        readers = [kind for kind, reads in READS.items() if name in reads or name.split(".")[0] in reads]
        hint = UNREAD_HINTS.get((b.kind, name.split(".")[0]))
        _fail(
            f"{key}.{name}",
            value,
            f"a benchmark of kind {b.kind} never reads it{f' ({hint})' if hint else ''}; kinds that do: "
            f"{', '.join(readers)}. "
            f"Remove it or set it to {default!r}",
        )
    fields = {f.name for f in dataclasses.fields(DecodingConfig)}
    _validate_decoding(f"{key}.decoding", b.decoding)
    _check(b.shard_size >= 1, f"{key}.shard_size", b.shard_size, "must be an integer >= 1")
    for model, change in b.by_model.items():
        unknown = sorted(set(change or {}) - fields)
        if unknown:
            _fail(f"{key}.by_model.{model}", unknown, f"unknown decoding keys; known: {sorted(fields)}")
        _validate_decoding(f"{key}.by_model.{model}", decoding_for(b, model))  # what that model is sampled with
    if b.max_prompts is not None:
        _check(b.max_prompts >= 1, f"{key}.max_prompts", b.max_prompts, "must be >= 1 or null")
    if b.kind in ("alpacaeval", "arena_hard"):
        _check(
            bool(b.prompts_path),
            f"{key}.prompts_path",
            b.prompts_path,
            f"{b.kind} needs a local prompts file (nothing is downloaded)",
        )
    if b.kind == "arena_hard" and b.judge.kind == "openai":
        _check(
            bool(b.reference_path),
            f"{key}.reference_path",
            b.reference_path,
            "judging Arena-Hard needs the baseline's answers file",
        )
    if b.judge.kind == "openai":
        _check(bool(b.judge.base_url), f"{key}.judge.base_url", b.judge.base_url, "judge.kind=openai needs an endpoint")
        _check(
            str(b.judge.base_url).startswith(("http://", "https://")),
            f"{key}.judge.base_url",
            b.judge.base_url,
            "must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)",
        )
        parts = urllib.parse.urlsplit(str(b.judge.base_url))
        if parts.username or parts.password:  # urllib sends nothing then ("the endpoint did not answer"); not echoed
            raise ConfigError(
                f"{key}.judge.base_url holds a user name or password (user:password@host): they are not sent; give the "
                f"key in an environment variable named by {key}.judge.api_key_env"
            )
        _check(bool(b.judge.model), f"{key}.judge.model", b.judge.model, "judge.kind=openai needs a model name")
        _check_env_name(f"{key}.judge.api_key_env", b.judge.api_key_env)
        for name in ("concurrency", "max_tokens", "label_attempts", "strong_weight", "bootstrap_rounds"):
            _check(getattr(b.judge, name) >= 1, f"{key}.judge.{name}", getattr(b.judge, name), "must be >= 1")
        _check(b.judge.max_retries >= 0, f"{key}.judge.max_retries", b.judge.max_retries, "must be >= 0")
        _check(b.judge.timeout_s > 0, f"{key}.judge.timeout_s", b.judge.timeout_s, "must be > 0 seconds")
        wait = b.judge.rate_limit_wait_s
        _check(wait >= 0, f"{key}.judge.rate_limit_wait_s", wait, "must be >= 0 seconds")
    if b.kind == "lm_eval":
        _check(bool(b.tasks), f"{key}.tasks", b.tasks, "name at least one lm-eval task (e.g. [gsm8k])")


def apply_command_line(cfg: DictConfig, given: list[str]) -> None:
    """What the command line says of a benchmark wins over its preset: a ``benchmarks.B.decoding.K`` given there is
    taken out of every ``by_model`` entry of B (a preset's per-model defaults), which replaced it without a word
    (``decoding.temperature=0`` sampled a Mistral-Instruct run at 0.5, and results.json credited the value to
    ``decoding``); a judge endpoint or model given under ``judge.kind=none`` is refused (nothing would judge)."""
    import logging

    from omegaconf import OmegaConf, open_dict

    for override in given:
        key = override.lstrip("+~").split("=", 1)[0]
        if m := re.fullmatch(r"benchmarks\.([^.]+)\.decoding\.(\w+)", key):
            by_model = OmegaConf.select(cfg, f"benchmarks.{m[1]}.by_model", default=None) or {}
            for model, change in by_model.items():
                if isinstance(change, DictConfig) and m[2] in change:
                    logging.getLogger(__name__).info(
                        "%s given: it replaces by_model.%s's %s=%s", key, model, m[2], change[m[2]]
                    )
                    with open_dict(change):
                        change.pop(m[2])
        elif m := re.fullmatch(r"benchmarks\.([^.]+)\.judge\.(base_url|model|api_key_env)", key):
            kind = OmegaConf.select(cfg, f"benchmarks.{m[1]}.judge.kind", default=None)
            if kind in (None, "none"):
                _fail(
                    key,
                    OmegaConf.select(cfg, key, default=None),
                    f"is given but benchmarks.{m[1]}.judge.kind=none: nothing would judge; add "
                    f"benchmarks.{m[1]}.judge.kind=openai",
                )


def _check_env_name(key: str, value: str) -> None:
    """Refuse a value that cannot be an environment variable's name (a key given in its place, ``sk-...``: nothing
    was sent, and the key was written into every record of the command). The value is not echoed."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(value)):
        raise ConfigError(
            f"{key} names the environment variable that holds the key or token (letters, digits, underscores), not "
            "the key itself: export it, e.g. export OPENAI_API_KEY=..., and give its name"
        )


def _check_repo_id(repo: str) -> None:
    """A hub repo id huggingface_hub takes (``user/name``), before any run is evaluated: a bad one failed at the
    push, after the first run's benchmarks, with a traceback, and the sweep's other runs got nothing."""
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo)
    except ImportError:
        return
    except Exception as err:  # HFValidationError: its own words
        raise ConfigError(f"invalid config value evaluate.hub_repo={repo!r}: {str(err).splitlines()[0]}") from err


def to_evaluate_config(cfg: DictConfig) -> EvaluateRunConfig:
    """A composed DictConfig as a validated ``EvaluateRunConfig``; errors name the key."""
    cfg = structured(EvaluateRunConfig, cfg)
    e = cfg.evaluate
    _check(bool(e.path), "evaluate.path", e.path, "give a run or sweep directory: python -m simpo_exp.evaluate DIR")
    _check_choice("evaluate.device", e.device, DEVICES)
    _check_choice("evaluate.wandb", e.wandb, WANDB)
    if e.push_to_hub:
        _check(bool(e.hub_repo), "evaluate.hub_repo", e.hub_repo, "push_to_hub=true needs a repo id (user/name)")
        _check_repo_id(e.hub_repo)
    _check_env_name("evaluate.hub_token_env", e.hub_token_env)
    _check(bool(cfg.benchmarks), "benchmark", None, "choose at least one benchmark (benchmark=rule)")
    for name, b in cfg.benchmarks.items():
        _validate_benchmark(f"benchmarks.{name}", b)
    return cfg
