"""Config of the generate stage: the training schema plus ``generate``, ``scorer`` and ``binarise``.

The generate stage composes the same ``model``, ``dataset``, ``hardware`` and ``logger`` groups as
training (model presets also set training keys, so the schema extends the training one) and adds:

- ``generate`` (conf/generate/*.yaml): how responses are sampled;
- ``scorer`` (conf/scorer/*.yaml): how each response is scored;
- ``binarise``: how a prompt's scored responses become one chosen/rejected pair.

``validate_generate`` checks the new values and raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from simpo_exp.config import (
    DTYPES,
    Config,
    HardwareConfig,
    _check,
    _check_choice,
    _fail,
    home_expanded,
    structured,
    validate,
)

BACKENDS = ("hf", "vllm")
SCORER_KINDS = ("rule", "reward_model")
RULES = ("sort_digits",)
BINARISE_MODES = ("best_worst", "best_random", "min_gap")


@dataclass
class GenerateConfig:
    name: str = MISSING
    backend: str = "hf"  # hf (transformers generate, batched, anywhere) | vllm (GPU, optional extra)
    # One sampling pass over the prompts per seed (the paper: 13, 21, 42, 79, 100); each pass draws
    # samples_per_seed responses per prompt, so a prompt gets len(seeds) * samples_per_seed responses.
    seeds: List[int] = field(default_factory=lambda: [13, 21, 42, 79, 100])
    samples_per_seed: int = 1
    temperature: float = 0.8  # > 0: greedy decoding would give every pass the same response
    top_p: float = 0.95
    max_new_tokens: int = 4096
    # Extra stop ids; the tokenizer's EOS and the chat template's end-of-turn token always stop.
    stop_token_ids: List[int] = field(default_factory=list)
    batch_size: int = 16  # prompts per generate() call (hf backend)
    shard_size: int = 256  # prompts per shard file; a killed run redoes at most the unfinished shards
    vllm_gpu_memory_utilization: float = 0.9
    vllm_tensor_parallel_size: int = 1
    # The splits whose prompts are sampled: [train], or [train, test] for test pairs too (data/test.jsonl, which
    # training then evaluates on instead of holding out dataset.test_size of the train pairs)
    splits: List[str] = field(default_factory=lambda: ["train"])


@dataclass
class ScorerConfig:
    name: str = MISSING
    kind: str = "reward_model"  # reward_model (a sequence-classification model) | rule
    rule: str = "sort_digits"  # kind=rule: the embedded synthetic task's exact check
    path: str = ""  # kind=reward_model: hub id or local directory
    revision: Optional[str] = None
    trust_remote_code: bool = False  # ArmoRM ships its own model class
    dtype: str = "auto"  # auto: bfloat16 on a GPU that has it, float32 otherwise
    chat_template: str = "auto"  # as model.chat_template, for the reward model's tokenizer
    # A head with several outputs and no `score` field: which output is the reward.
    label_index: Optional[int] = None
    batch_size: int = 8
    max_length: int = 4096  # prompt + response tokens given to the reward model

    def __post_init__(self) -> None:
        self.path = home_expanded(self.path)


@dataclass
class BinariseConfig:
    # best_worst: chosen = highest score, rejected = lowest (the paper's);
    # best_random: rejected drawn at random among the lower-scored responses;
    # min_gap: rejected = the highest-scored response at least min_gap below the best (a hard negative).
    mode: str = "best_worst"
    min_gap: float = 0.0  # every mode drops pairs whose score gap is below this (ties always dropped)
    seed: int = 0  # best_random's draw
    # responses that ran into generate.max_new_tokens before their end-of-turn token are neither chosen nor rejected
    # (the official pipeline keeps them: at its 4096 tokens they are rare; training reads a kept one as a finished
    # answer, its turn closed after the cut)
    drop_unfinished: bool = False


@dataclass
class GenerateRunConfig(Config):
    generate: GenerateConfig = MISSING
    scorer: ScorerConfig = MISSING
    binarise: BinariseConfig = field(default_factory=BinariseConfig)


cs = ConfigStore.instance()
cs.store(name="generate_schema", node=GenerateRunConfig)


# The training schema's top-level keys this stage reads; of the groups, model and dataset are read whole, hardware
# for how to sample (HARDWARE_READS), and logger not at all (the stage's record is its report.json).
# (max_length: sampling never reads it, but max_prompt_length must stay below it, and it goes on to the training
# command the stage prints: without it, no prompt longer than the preset's max_length could be sampled)
STAGE_READS = ("seed", "max_prompt_length", "max_length", "output_dir")
GROUPS = ("model", "dataset", "hardware", "logger")
HARDWARE_READS = ("device", "mixed_precision", "attn_implementation", "fused_layers", "master_weights")


def check_overrides(overrides: list[str], model_path: str | None = None) -> None:
    """Refuse a command-line training key (``beta=5``, ``learning_rate=...``): the schema holds them because
    model presets set some, but sampling never reads them, so the stage would run as if it had not been given. So is
    ``seed`` beside a ``model_path``: it seeds a random-init policy's weights alone (``seed=1,2`` gave two copies of
    the same data, and a resume under another seed was taken as the same run)."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "seed" and model_path:
            _fail(
                key,
                value,
                f"seeds a random-init policy's weights alone; the policy here is model.path={model_path!r}, and the "
                "samples are drawn with generate.seeds (one draw per seed: generate.seeds=[0,1,2])",
            )
        name = key.split(".")[1] if key.startswith("hardware.") else None
        if name in HardwareConfig.__dataclass_fields__ and name not in HARDWARE_READS:  # a typo: "no such key" later
            _fail(
                key,
                value,
                "is a training setting; the generate stage samples with "
                + ", ".join(f"hardware.{n}" for n in HARDWARE_READS),
            )
        if key == "dataset.chat_format":  # how training cuts pairs; sampling renders as the official decode.py
            _fail(
                key,
                value,
                "is how training cuts prompt and responses; the generate stage renders each prompt as the official "
                "on-policy decode.py does (its turns with the generation prompt): give it to the training command",
            )
        if (key == "logger" and value != "none") or key.startswith("logger."):
            _fail(key, value, "the generate stage logs nowhere but its folder (report.json, provenance.json)")
        if key in Config.__dataclass_fields__ and key not in STAGE_READS + GROUPS:
            _fail(
                key,
                value,
                "is a training key, which the generate stage does not read (it reads the model, dataset and hardware "
                f"groups, generate.*, scorer.*, binarise.*, and {', '.join(STAGE_READS[:-1])})",
            )


def validate_generate(cfg: GenerateRunConfig) -> GenerateRunConfig:
    """The training checks for the shared groups, then the generate stage's own."""
    validate(cfg)
    g = cfg.generate
    _check_choice("generate.backend", g.backend, BACKENDS)
    _check(len(g.seeds) >= 1, "generate.seeds", g.seeds, "must list at least one seed")
    _check(len(set(g.seeds)) == len(g.seeds), "generate.seeds", g.seeds, "must not repeat a seed")
    _check(g.samples_per_seed >= 1, "generate.samples_per_seed", g.samples_per_seed, "must be >= 1")
    _check(
        g.temperature > 0,
        "generate.temperature",
        g.temperature,
        "must be > 0: greedy decoding (0) gives every pass (generate.seeds) and sample (generate.samples_per_seed) "
        "the same response, and a pair needs two different ones",
    )
    _check(0 < g.top_p <= 1, "generate.top_p", g.top_p, "must be in (0, 1]")
    _check(
        len(g.seeds) * g.samples_per_seed >= 2,
        "generate.seeds",
        g.seeds,
        f"with generate.samples_per_seed={g.samples_per_seed} each prompt gets one response, and a pair needs two: "
        "list more seeds or raise generate.samples_per_seed",
    )
    _check(
        g.splits in (["train"], ["train", "test"]),
        "generate.splits",
        g.splits,
        "must be [train] or [train,test] (training needs the train pairs; the test ones are its held-out evaluation)",
    )
    for key in ("max_new_tokens", "batch_size", "shard_size", "vllm_tensor_parallel_size"):
        _check(getattr(g, key) >= 1, f"generate.{key}", getattr(g, key), "must be an integer >= 1")
    _check(
        0 < g.vllm_gpu_memory_utilization <= 1,
        "generate.vllm_gpu_memory_utilization",
        g.vllm_gpu_memory_utilization,
        "must be in (0, 1]",
    )
    if g.backend == "vllm" and not cfg.model.path:
        _fail(
            "generate.backend",
            g.backend,
            "vllm loads weights from disk: set model.path (a hub id or a run's "
            "model/ directory), or use generate.backend=hf for the built-in tiny model",
        )

    s = cfg.scorer
    _check_choice("scorer.kind", s.kind, SCORER_KINDS)
    if s.kind == "rule":
        _check_choice("scorer.rule", s.rule, RULES)
    else:
        _check(bool(s.path), "scorer.path", s.path, "kind=reward_model needs a hub id or a local reward model")
    _check_choice("scorer.dtype", s.dtype, ("auto",) + DTYPES)
    _check(s.batch_size >= 1, "scorer.batch_size", s.batch_size, "must be >= 1")
    _check(s.max_length >= 2, "scorer.max_length", s.max_length, "must be >= 2")
    if s.label_index is not None:
        _check(s.label_index >= 0, "scorer.label_index", s.label_index, "must be >= 0 or null")
    if s.kind == "rule":  # a reward model's settings: never read
        for key, default in dataclasses.asdict(ScorerConfig(name="default")).items():
            if key not in ("name", "kind", "rule") and getattr(s, key) != default:
                _fail(f"scorer.{key}", getattr(s, key), "is a reward model's setting; scorer.kind=rule reads none")

    b = cfg.binarise
    _check_choice("binarise.mode", b.mode, BINARISE_MODES)
    _check(b.min_gap >= 0, "binarise.min_gap", b.min_gap, "must be >= 0")
    if b.mode != "best_random":
        _check(
            b.seed == 0, "binarise.seed", b.seed, "is best_random's draw; binarise.mode=" + b.mode + " draws nothing"
        )
    if b.mode == "min_gap":
        _check(b.min_gap > 0, "binarise.min_gap", b.min_gap, "must be > 0 with binarise.mode=min_gap")
    return cfg


def to_generate_config(cfg: DictConfig | GenerateRunConfig) -> GenerateRunConfig:
    """A composed (resolved) DictConfig as a validated ``GenerateRunConfig``."""
    if isinstance(cfg, DictConfig):
        cfg = structured(GenerateRunConfig, cfg)
    return validate_generate(cfg)
