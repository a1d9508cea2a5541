"""Structured configs for a simpo-exp run, and every range check on them.

The dataclasses below are registered in Hydra's ConfigStore, so a misspelled key or a
value of the wrong type is refused while Hydra composes the config. ``validate`` then
checks the values themselves (ranges, allowed choices, cross-field rules) and raises a
``ConfigError`` naming the key and what is allowed, before any data or model loads.

Defaults live here once; the YAML files in ``conf/`` only state what a preset changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from simpo_exp.errors import UserError

LOSS_TYPES = ("sigmoid", "hinge")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
SOURCE_FORMATS = ("auto", "messages", "strings", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
FUSED_KERNELS = ("none", "liger")  # hardware.fused_head and hardware.fused_layers (simpo_exp/fused.py)
PRECISIONS = ("auto", "no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
WANDB_MODES = ("auto", "online", "offline", "disabled")
CHECKPOINT_FORMATS = ("auto", "safetensors", "accelerate")
MASTER_WEIGHTS = ("fp32", "model")
# torch.compile's modes that record no CUDA graphs (the layers are compiled for dynamic shapes: a graph per shape
# would be recorded again for nearly every batch)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager, eager: dynamo without code generation


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


CHAT_FORMATS = ("generation_prompt", "simpo_repo")  # dataset.chat_format (simpo_exp/data/tokenize.py)


@dataclass
class RandomInitConfig:
    """Shape of the randomly initialised Llama-style model built from config when ``model.path`` is
    empty (``model.random_init``). The defaults are ``model=tiny``'s; ``model=random-750m`` sets a
    larger one for measuring GPU paths without a download."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    # 0: the tokenizer's size. Larger gives a real model's head cost (128256 for Llama 3); the rows
    # past the tokenizer's ids are never produced by it.
    vocab_size: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub id or local directory. Empty: a random model of ``random_init``'s shape, built from config.
    path: str = ""
    tokenizer_path: str = ""  # defaults to ``path``
    # size in billions of parameters; feeds the learning-rate default (a run without it, model.learning_rate or
    # learning_rate is refused)
    params_b: Optional[float] = None
    learning_rate: Optional[float] = None  # a model's own recommendation, wins over the size rule
    dtype: str = "float32"  # weights dtype; autocast comes from the hardware group
    attn_implementation: Optional[str] = None  # None: take the hardware group's choice
    # "auto": the tokenizer's own template; "zephyr": the built-in one for base models;
    # anything else containing "{%" is used as a Jinja template.
    chat_template: str = "auto"
    trust_remote_code: bool = False
    revision: Optional[str] = None
    random_init: RandomInitConfig = field(default_factory=RandomInitConfig)

    def __post_init__(self) -> None:
        self.path, self.tokenizer_path = home_expanded(self.path), home_expanded(self.tokenizer_path)


def home_expanded(path):
    """``~/models/x`` as the home folder's: Hydra passes a value on as written, and a shell expands no ``~`` in
    ``model.path=~/...`` (not a variable's name before the ``=``), so the folder was taken for a hub id."""
    import os

    return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path


@dataclass
class SourceConfig:
    """One preference data source: a hub id, a local directory or file, or ``synthetic``."""

    path: str = MISSING
    format: str = "auto"  # auto | messages | strings | synthetic
    train_split: str = "train"
    test_split: Optional[str] = "test"  # None: carve ``test_size`` out of train
    test_size: Optional[float] = None  # the share carved out; None: ``dataset.test_size``
    fraction: float = 1.0  # share of the train split used: its first rows (alignment-handbook's mixer)
    # Column names in the source, for the normalised fields.
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    name: Optional[str] = None  # a hub data set's configuration name
    revision: Optional[str] = None


@dataclass
class SyntheticConfig:
    num_train: int = 4096
    num_test: int = 256
    min_digits: int = 5
    max_digits: int = 10
    seed: int = 1234


@dataclass
class DatasetConfig:
    name: str = MISSING
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    test_size: float = 0.05  # used by sources without a test split
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    shuffle_seed: int = 42
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    num_proc: Optional[int] = None
    # Start-up token checks (see simpo_exp/data/report.py): a prompt with two BOS tokens, or an
    # untruncated response with no end-of-turn token, stops the run unless allowed here.
    allow_double_bos: bool = False
    allow_missing_eos: bool = False
    # How prompt and responses are cut out of the chat template's text (simpo_exp/data/tokenize.py):
    # generation_prompt (TRL's: the assistant header ends the prompt) or simpo_repo (princeton-nlp/SimPO's
    # run_simpo.py: the header starts each response, an empty system turn first where the template has one).
    chat_format: str = "generation_prompt"


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that has it, else no) | no | bf16 | fp16
    # What the optimizer steps under full fine-tuning (simpo_exp/precision.py): fp32 (weights loaded in
    # model.dtype are upcast to float32 and computed under the mixed_precision autocast, as the official
    # recipes run) or model (the weights stay in model.dtype: pure bf16 when model.dtype=bfloat16, where
    # SimPO-size updates round away). LoRA adapters are float32 either way; DeepSpeed keeps its own fp32 copy.
    master_weights: str = "fp32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # Under gradient checkpointing (transformers' activation checkpointing, simpo_exp/model.py): recompute one
    # decoder layer in every N (1: all of them; 2: every second one, the others keep their activations: less
    # recomputed work for more memory), and whether the checkpointed layers' inputs wait in pinned host memory
    # (offload: less GPU memory at long lengths, for a copy each way per layer). Needs transformers >= 5.17.
    checkpoint_every_n_layers: int = 1
    checkpoint_offload: bool = False
    dataloader_num_workers: int = 0
    # Per-device batch x processes x accumulation kept at this value (accumulation derived);
    # None: use gradient_accumulation_steps as given.
    effective_batch_size: Optional[int] = None
    # A DeepSpeed JSON config (launchers/ds_*.json) used when not started by `accelerate launch`.
    deepspeed_config: Optional[str] = None
    # How a batch of pairs is laid out (simpo_exp/data/collate.py, simpo_exp/logps.py):
    # none (padded, chosen and rejected rows), packed (no padding), prefix_shared (the prompt
    # encoded once per pair), or auto: where measure_layouts asks, the fastest of the candidates timed on
    # the run's first batch; else the fastest measured here: prefix_shared on CPU, packed with flex on GPU.
    packing: str = "auto"
    # packing=auto by measurement (simpo_exp/layout_auto.py): null = on CUDA devices, true = on any device,
    # false = never (the fixed rule above). A resumed run keeps the layout its first start recorded.
    measure_layouts: Optional[bool] = None
    # Before the first step, one pair scored in the run's layout and by the model's own forward must agree
    # (simpo_exp/logps_check.py): a family whose forward changes its logits in a way not reproduced here, or a
    # layout its attention does not fit, stops the run rather than train on other log-probs. false: not checked.
    check_logps: bool = True
    # segments (one SDPA call per sequence) | flex (one FlexAttention call per layer, block mask) | mask (4D mask)
    # | flash (flash-attn's variable-length kernel, one call per layer; GPU, packing=packed only)
    packing_attention: str = "segments"
    logps_chunk_size: int = 0  # > 0: log-probs in chunks of this many tokens (large vocabularies)
    # liger: the head, log-softmax and loss fused per pair by Liger-Kernel (simpo_exp/fused.py; simpo, cpo, orpo;
    # any packing; no logits of the whole batch); none: the project's own head (chunked by logps_chunk_size)
    fused_head: str = "none"
    # liger: Liger-Kernel's Triton kernels in the decoder layers (RMSNorm, SwiGLU/GeGLU MLP, rotary embedding;
    # simpo_exp/fused.py), fewer memory-bound passes and less activation memory; GPU only. none: transformers' own.
    fused_layers: str = "none"
    # Batches of pairs of similar length (less padding under packing=none; simpo_exp/data/sampler.py).
    group_by_length: bool = False
    # torch.compile each decoder layer, dynamic shapes (simpo_exp/compiled.py); compile steps are left out of the
    # step time (train/compile_warmup_s). compile_mode: null/default, max-autotune-no-cudagraphs.
    compile: bool = False
    compile_mode: Optional[str] = None
    compile_backend: str = "inductor"
    # Checkpoint files (simpo_exp/checkpoint.py): safetensors (pickle-free, one process writes it),
    # accelerate (accelerator.save_state on every process: what sharded FSDP/DeepSpeed state needs),
    # or auto: accelerate under FSDP and DeepSpeed, safetensors otherwise.
    checkpoint_format: str = "auto"
    # At set-up on a GPU: refuse a run whose weights, gradients and optimizer state alone exceed the device's
    # memory, naming the presets that fit (simpo_exp/memory.py). false: skip the check.
    check_memory: bool = True
    # Seconds a process waits at a step every process takes part in (a collective) before the run fails with a
    # timeout error. Other processes wait there while the main one works alone: preparing the data, checking a
    # checkpoint, writing the model. 1800, as transformers' Trainer (ddp_timeout); torch's NCCL default is 600.
    collective_timeout: float = 1800.0
    # Peak TFLOP/s of one device for train/mfu; None: looked up from the GPU's name (bf16/fp16 runs).
    peak_tflops: Optional[float] = None
    # LoRA adapters (peft) instead of full fine-tuning.
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # what TRL's disable_dropout leaves its adapters with
    lora_target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class LoggerConfig:
    name: str = MISSING
    wandb: bool = False
    project: Optional[str] = None  # None: WANDB_PROJECT where set, else simpo-exp (tracking.wandb_project)
    entity: Optional[str] = None  # None: W&B's own default (WANDB_ENTITY, else the API key's)
    mode: str = "auto"  # auto: online with an API key, offline without
    group: Optional[str] = None  # None: the sweep's name in a multirun
    job_type: str = "train"
    run_name: Optional[str] = None  # None: built from the command-line overrides
    tags: List[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds W&B may take to start before the run goes on without it


@dataclass
class Config:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING

    # --- loss group (placed at the top level) ---
    method: str = "simpo"  # a name in simpo_exp/methods.py's table (one conf/loss/<name>.yaml each)
    rdpo_alpha: float = 0.0  # R-DPO's length weight
    alphapo_alpha: float = 0.0  # AlphaPO's reward shape (0: SimPO's reward)
    reference_mode: str = "cached"  # reference-based methods: "cached" log-probs computed once, or a "live" model
    reference_cache_dir: Optional[str] = None  # None: ~/.cache/simpo_exp/reference

    # --- hparams group (placed at the top level) ---
    loss_type: str = "sigmoid"
    beta: float = 2.0
    gamma_beta_ratio: float = 0.5
    gamma: Optional[float] = None  # absolute target margin (TRL's simpo_gamma); replaces gamma_beta_ratio
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    learning_rate: Optional[float] = None  # None: the model's recommendation, else by size
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0  # AdamW's, on weights only: not on biases or norm weights (as transformers' Trainer)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    disable_dropout: bool = True  # the model's own dropout off while training (TRL's and the official default)
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 16

    # --- run length and cadence ---
    max_steps: int = -1  # > 0 wins over num_train_epochs
    num_train_epochs: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 100  # 0: evaluate only at the end
    eval_on_start: bool = False  # also evaluate before the first step
    num_generations: int = 4  # greedy completions of this many eval prompts at each eval (0: none)
    max_new_tokens: int = 64
    max_length: int = 2048
    max_prompt_length: int = 1800

    # --- checkpoints and failure handling ---
    save_steps: int = 100  # 0: no intermediate checkpoints
    save_total_limit: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
    max_bad_steps: int = 5  # consecutive non-finite steps tolerated (each is skipped)

    seed: int = 42
    # Hydra's job directory (conf/config.yaml: ${hydra:runtime.output_dir}, one per sweep job). Hydra
    # fills it only when a job starts, so `--cfg job --resolve` shows null; a run refuses null.
    output_dir: Optional[str] = "."
    progress_bar: bool = True
    save_model: bool = True
    # dtype of the saved model's weights (model/): null writes them as trained (float32 under the float32 master
    # weights and for a merged LoRA, else the model's dtype); bfloat16 halves the files (an 8B model: 16 GB, not
    # 32), as the SimPO releases on the hub are stored, at the cost of rounding each weight once
    save_dtype: Optional[str] = None


cs = ConfigStore.instance()
cs.store(name="config_schema", node=Config)


# ---------------------------------------------------------------------------
# Learning rate from model size (SimPO guide: 1-3B 5e-7..1e-6, 7-8B 3e-7..5e-7,
# 13-30B 1e-7..3e-7, 70B 5e-8..1e-7). We take the upper end of each band.
LR_BY_SIZE = ((3.5, 1e-6), (10.0, 5e-7), (35.0, 3e-7), (math.inf, 1e-7))


def learning_rate_for_size(params_b: float) -> float:
    for upper, lr in LR_BY_SIZE:
        if params_b <= upper:
            return lr
    raise AssertionError("unreachable")


def resolve_learning_rate(cfg: Config) -> tuple[float, str]:
    """Return (learning rate, where it came from)."""
    if cfg.learning_rate is not None:
        return cfg.learning_rate, "learning_rate: the command line or a preset (hparams, experiment)"
    if cfg.model.learning_rate is not None:
        return cfg.model.learning_rate, f"model preset {cfg.model.name!r}"
    return learning_rate_for_size(cfg.model.params_b), f"model size ({cfg.model.params_b}B)"


LORA_FULL_RATE = 2e-6  # at or below: a full fine-tune's rate (SimPO's recipes: 3e-7 to 1e-6)


def lora_rate_note(cfg: Config, lr: float, source: str) -> str | None:
    """A warning for a LoRA run at a full fine-tune's learning rate, else None. At one rate, LoRA moves a
    weight matrix about an order of magnitude less than a full fine-tune (its adapters start at zero and train
    r of each matrix's directions; 14x on an 8B-size layer at r=16, alpha=32, in a simulation), so the run
    ends cleanly having hardly changed the model."""
    if not cfg.hardware.lora or lr > LORA_FULL_RATE:
        return None
    return (
        f"hardware.lora=true trains at learning_rate={lr:g} (from {source}), a full fine-tune's rate: LoRA's "
        "update at one rate is about an order of magnitude smaller than a full fine-tune's, so the run would hardly "
        "move the model. LoRA preference runs use rates of about 5e-6 to 5e-5: set learning_rate"
    )


# The largest rates a preference fine-tune of a pretrained model is run at: SimPO's recipes train 7-9B models at 3e-7
# to 1e-6 (its authors found 1e-5 already degrades the model); LoRA runs at about 5e-6 to 5e-5. Twenty times these
# is a rate for another purpose (the tiny model's, a +sweep=optuna range left at its default).
LARGEST_FINE_TUNE_RATE = {False: 2e-5, True: 1e-3}  # by hardware.lora


def large_rate_note(cfg: Config, lr: float) -> str | None:
    """A warning for a pretrained model at a learning rate far above any preference fine-tune's, else None: the run
    would end cleanly with a damaged model (an Optuna search with the tiny model's range sampled 3.4e-4 for an 8B
    model, unremarked)."""
    limit = LARGEST_FINE_TUNE_RATE[bool(cfg.hardware.lora)]
    if cfg.model.learning_rate is not None:  # a model preset's own rate (a saved tiny model's 1e-3) is meant
        limit = max(limit, 10 * cfg.model.learning_rate)
    if not cfg.model.path or lr <= limit:
        return None
    kind = "LoRA runs use about 5e-6 to 5e-5" if cfg.hardware.lora else "SimPO's recipes use 3e-7 to 1e-6"
    return (
        f"learning_rate={lr:g} fine-tunes the pretrained model.path={cfg.model.path} at more than {limit:g}: {kind} "
        "(+sweep=optuna's default range is the tiny model's: give hydra.sweeper.params.learning_rate for this one)"
    )


def check_preset_size(cfg: Config, parameters: int) -> None:
    """Refuse a pretrained ``model.path`` ten or more times the size its model preset is for, trained at that
    preset's learning rate (its own, or the size rule's for its ``params_b``: ``model=qwen2.5-0.5b-instruct`` under
    a 70B model's path trained it at 0.5B's 1e-6, ten times the 70B band's): the default preset, ``tiny`` (1e-3,
    256 tokens, for its 4M-parameter random init),
    under a real model's path (the generate stage's printed command with no preset named) fine-tuned an 8B model at
    2000 times its recipe's rate, and the run ended cleanly. A learning rate given (the command line, an hparams
    preset) is the user's choice and passes."""
    size = cfg.model.params_b
    if not cfg.model.path or size is None or cfg.learning_rate is not None:
        return
    if parameters < 10 * size * 1e9:
        return
    lr, _ = resolve_learning_rate(cfg)
    rate = f"its learning rate ({lr:g})" if cfg.model.learning_rate is not None else f"the rate for its size ({lr:g})"
    raise ConfigError(
        f"model.path={cfg.model.path} holds {parameters / 1e9:.3g}B parameters, but model={cfg.model.name} is a "
        f"preset for a {size:g}B model: {rate} and lengths (max_length={cfg.max_length}) are that model's. Name "
        "the model's own preset (model=...; python -m simpo_exp --help lists them), or give model.params_b (the "
        "rate then follows the size) or learning_rate (SimPO's recipes: 3e-7 to 1e-6)"
    )


def replaced_rate_note(cfg: Config) -> str | None:
    """A warning where ``learning_rate`` (an hparams preset, the command line) replaces a model preset's own rate
    ten or more times larger, else None: the embedded model, randomly initialised, learns at 1e-3 and hardly at
    an hparams preset's fine-tuning rate (``hparams=creative``: 1e-6), which reads as "nothing learns"."""
    own, given = cfg.model.learning_rate, cfg.learning_rate
    if own is None or given is None or given * 10 > own:
        return None
    return (
        f"learning_rate={given:g} (an hparams preset or the command line) replaces model={cfg.model.name}'s own "
        f"rate, {own:g}" + (", set for a randomly initialised model" if not cfg.model.path else "") + ": the run "
        "may hardly learn; give learning_rate on the command line to choose"
    )


def resolve_gamma(cfg: Config) -> tuple[float, float]:
    """(gamma, gamma_beta_ratio) as used: an absolute ``gamma`` wins, else gamma = beta * ratio."""
    if cfg.gamma is not None:
        return cfg.gamma, cfg.gamma / cfg.beta
    return cfg.beta * cfg.gamma_beta_ratio, cfg.gamma_beta_ratio


# ---------------------------------------------------------------------------
def _default(schema: type, name: str) -> Any:
    """A dataclass field's default value (made by its factory where it has one)."""
    f = schema.__dataclass_fields__[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def schema_default(dotted: str, schema: type | None = None) -> Any:
    """The declared default of a dotted key of the training config (``dataset.chat_format``), entries of a
    dictionary of sections included (``dataset.sources.<name>.fraction``); ``MISSING`` where it has none or the
    schema does not declare the key."""
    node, parts, i = schema or Config, dotted.split("."), 0
    while i < len(parts):
        fields = getattr(node, "__dataclass_fields__", None)
        if not fields or parts[i] not in fields:
            return MISSING
        if i == len(parts) - 1:
            f = fields[parts[i]]
            has = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            return _default(node, parts[i]) if has else MISSING
        hint = typing.get_type_hints(node)[parts[i]]
        if typing.get_origin(hint) is dict:  # Dict[str, Section]: the next part names an entry
            hint, i = typing.get_args(hint)[1], i + 1
        node, i = hint, i + 1
    return MISSING


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid config value {key}={value!r}: {allowed}")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(key, value, "allowed values are " + ", ".join(repr(c) for c in choices))


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        _fail(key, value, allowed)


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every float anywhere in the config must be finite: ``beta=inf`` passes ``> 0`` checks."""
    items = vars(node).items() if dataclasses.is_dataclass(node) else node.items() if isinstance(node, dict) else ()
    for key, value in items:
        if isinstance(value, float):
            _check(math.isfinite(value), f"{prefix}{key}", value, "must be finite")
        elif dataclasses.is_dataclass(value) or isinstance(value, dict):
            _check_finite(value, f"{prefix}{key}.")


def validate(cfg: Config) -> Config:
    """Check every value of a composed config; raise ConfigError naming the first bad key."""
    _check_finite(cfg)
    _validate_method(cfg)
    _validate_run(cfg)
    _validate_model(cfg.model)
    _validate_dataset(cfg.dataset)
    _validate_hardware(cfg.hardware)
    h = cfg.hardware
    if cfg.model.dtype == "float16" and h.master_weights == "model" and not h.lora and not h.deepspeed_config:
        raise ConfigError(
            "model.dtype=float16 with hardware.master_weights=model: AdamW would update float16 weights in "
            "float16, where its eps (1e-8) is 0, so a weight with a zero gradient becomes NaN at the first step; "
            "use hardware.master_weights=fp32 (float32 weights under autocast) or model.dtype=bfloat16"
        )
    if h.master_weights == "model":  # a sweep over it would train one run under two names where it changes nothing
        _check(
            not h.lora,
            "hardware.master_weights",
            h.master_weights,
            "has no effect under hardware.lora=true (the base weights are frozen and the adapters train in float32)",
        )
        _check(
            cfg.model.dtype != "float32",
            "hardware.master_weights",
            h.master_weights,
            "has no effect with model.dtype=float32 (the weights train in float32 either way)",
        )
    _check_choice("logger.mode", cfg.logger.mode, WANDB_MODES)
    _check(cfg.logger.init_timeout > 0, "logger.init_timeout", cfg.logger.init_timeout, "must be > 0 seconds")
    return cfg


def _validate_method(cfg: Config) -> None:
    """The method and its hyper-parameters (the table of methods says which keys each reads)."""
    from simpo_exp.methods import METHODS, OWN_KEYS, TABLE, readers

    _check_choice("method", cfg.method, METHODS)
    _check_choice("reference_mode", cfg.reference_mode, ("cached", "live"))
    if cfg.method in TABLE and not TABLE[cfg.method].reference:  # a sweep over it trains one run under two names
        _check(
            cfg.reference_mode == _default(Config, "reference_mode"),
            "reference_mode",
            cfg.reference_mode,
            f"has no effect: method={cfg.method!r} takes no reference log-probs",
        )
    _check(cfg.rdpo_alpha >= 0, "rdpo_alpha", cfg.rdpo_alpha, "must be >= 0")
    _check_choice("loss_type", cfg.loss_type, LOSS_TYPES)
    for key in OWN_KEYS:  # a key the method's loss does not read would change nothing
        default = _default(Config, key)
        if getattr(cfg, key) != default and key not in TABLE[cfg.method].reads:
            _fail(
                key,
                getattr(cfg, key),
                f"method={cfg.method!r} does not read it (read by {', '.join(readers(key))}); set it to {default!r}",
            )
    _check(cfg.beta > 0, "beta", cfg.beta, "must be > 0")
    _check(cfg.gamma_beta_ratio >= 0, "gamma_beta_ratio", cfg.gamma_beta_ratio, "must be >= 0")
    if cfg.gamma is not None:
        _check(cfg.gamma >= 0, "gamma", cfg.gamma, "must be >= 0 (or null to use gamma_beta_ratio)")
        margin = readers("gamma_beta_ratio")
        _check(
            cfg.method in margin,
            "gamma",
            cfg.gamma,
            f"method={cfg.method!r} has no target margin (read by {', '.join(margin)}); leave gamma null",
        )
    _check(0 <= cfg.label_smoothing < 0.5, "label_smoothing", cfg.label_smoothing, "must be in [0, 0.5)")
    if cfg.loss_type == "hinge" and cfg.label_smoothing > 0:
        _fail("label_smoothing", cfg.label_smoothing, "the hinge loss ignores label smoothing; set it to 0")
    _check(cfg.sft_weight >= 0, "sft_weight", cfg.sft_weight, "must be >= 0")
    if cfg.hardware.fused_head != "none":  # refused here, before a model or data set loads
        from simpo_exp.fused import fused_head_refusal

        refusal = fused_head_refusal(cfg)
        if refusal:
            raise ConfigError(refusal)


def _validate_run(cfg: Config) -> None:
    """Optimiser, batch, run length, cadence and lengths."""
    if cfg.learning_rate is not None:
        _check(cfg.learning_rate > 0, "learning_rate", cfg.learning_rate, "must be > 0 (or null for the size rule)")
    if cfg.model.learning_rate is not None:
        _check(cfg.model.learning_rate > 0, "model.learning_rate", cfg.model.learning_rate, "must be > 0")
    _check_choice("lr_scheduler_type", cfg.lr_scheduler_type, SCHEDULERS)
    if cfg.save_dtype is not None:
        _check_choice("save_dtype", cfg.save_dtype, DTYPES)
    _check(0 <= cfg.warmup_ratio < 1, "warmup_ratio", cfg.warmup_ratio, "must be in [0, 1)")
    if cfg.lr_scheduler_type == "constant":  # transformers' constant schedule has no warm-up
        _check(
            cfg.warmup_ratio == 0,
            "warmup_ratio",
            cfg.warmup_ratio,
            "is ignored by lr_scheduler_type=constant; use constant_with_warmup, or warmup_ratio=0",
        )
    _check(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(cfg, key) < 1, key, getattr(cfg, key), "must be in [0, 1)")
    _check(cfg.adam_epsilon > 0, "adam_epsilon", cfg.adam_epsilon, "must be > 0")
    _check(cfg.max_grad_norm > 0, "max_grad_norm", cfg.max_grad_norm, "must be > 0")
    for key in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
    ):
        _check(getattr(cfg, key) >= 1, key, getattr(cfg, key), "must be an integer >= 1")
    _check(cfg.save_steps >= 0, "save_steps", cfg.save_steps, "must be >= 0 (0: no intermediate checkpoints)")
    _check(cfg.save_total_limit >= 1, "save_total_limit", cfg.save_total_limit, "must be >= 1")
    # numpy's and datasets' generators take seeds in [0, 2**32): another fails deep inside them
    for key, seed in (
        ("seed", cfg.seed),
        ("dataset.shuffle_seed", cfg.dataset.shuffle_seed),
        ("dataset.synthetic.seed", cfg.dataset.synthetic.seed),
    ):
        _check(0 <= seed < 2**32, key, seed, "must be in [0, 2**32)")
    _check(cfg.max_bad_steps >= 0, "max_bad_steps", cfg.max_bad_steps, "must be >= 0")
    _check(cfg.num_generations >= 0, "num_generations", cfg.num_generations, "must be >= 0 (0: no samples)")
    _check(cfg.max_new_tokens >= 1, "max_new_tokens", cfg.max_new_tokens, "must be >= 1")
    if cfg.num_generations == 0:
        _check(
            cfg.max_new_tokens == _default(Config, "max_new_tokens"),
            "max_new_tokens",
            cfg.max_new_tokens,
            "has no effect with num_generations=0 (no samples are generated)",
        )
    _check(cfg.eval_steps >= 0, "eval_steps", cfg.eval_steps, "must be >= 0 (0: only at the end)")
    _check(
        cfg.max_steps == -1 or cfg.max_steps >= 1,
        "max_steps",
        cfg.max_steps,
        "must be >= 1, or -1 to use num_train_epochs",
    )
    if cfg.max_steps == -1:
        _check(cfg.num_train_epochs > 0, "num_train_epochs", cfg.num_train_epochs, "must be > 0 when max_steps is -1")
    _check(
        cfg.output_dir is not None,
        "output_dir",
        cfg.output_dir,
        "must name the run directory (Hydra sets it to the job directory when a run starts)",
    )
    _check(cfg.max_length >= 2, "max_length", cfg.max_length, "must be >= 2")
    _check(
        1 <= cfg.max_prompt_length < cfg.max_length,
        "max_prompt_length",
        cfg.max_prompt_length,
        f"must be >= 1 and < max_length ({cfg.max_length}), or responses are truncated to nothing",
    )


def _validate_model(m: ModelConfig) -> None:
    _check_choice("model.dtype", m.dtype, DTYPES)
    if m.attn_implementation is not None:
        _check_choice("model.attn_implementation", m.attn_implementation, ATTN_IMPLEMENTATIONS)
    if m.params_b is not None:
        _check(m.params_b > 0, "model.params_b", m.params_b, "must be > 0 (billions of parameters) or null")
    if m.path:  # a model read from disk or the hub has its own shape
        for name, value in vars(m.random_init).items():
            _check(
                value == _default(RandomInitConfig, name),
                f"model.random_init.{name}",
                value,
                "has no effect with model.path set (its shape comes from model.path's config.json)",
            )
    else:  # the embedded model's tokenizer is built in code: nothing is read from the hub
        for name, allowed in (("tokenizer_path", ""), ("revision", None), ("trust_remote_code", False)):
            _check(
                getattr(m, name) == allowed,
                f"model.{name}",
                getattr(m, name),
                "has no effect without model.path (the model and tokenizer are built in code)",
            )
    if not m.path:
        r, key = m.random_init, "model.random_init"
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            _check(getattr(r, name) >= 1, f"{key}.{name}", getattr(r, name), "must be >= 1")
        _check(
            r.hidden_size % r.num_attention_heads == 0,
            f"{key}.hidden_size",
            r.hidden_size,
            f"must be divisible by {key}.num_attention_heads ({r.num_attention_heads})",
        )
        _check(  # rotary embeddings turn pairs of a head's dimensions: an odd one failed at the first forward
            r.hidden_size // r.num_attention_heads % 2 == 0,
            f"{key}.hidden_size",
            r.hidden_size,
            f"must give an even head size (rotary embeddings turn pairs of dimensions); over "
            f"{r.num_attention_heads} heads it gives {r.hidden_size // r.num_attention_heads}",
        )
        _check(
            r.num_attention_heads % r.num_key_value_heads == 0,
            f"{key}.num_key_value_heads",
            r.num_key_value_heads,
            f"must divide {key}.num_attention_heads",
        )
        _check(r.vocab_size >= 0, f"{key}.vocab_size", r.vocab_size, "must be >= 0 (0: the tokenizer's size)")


def _validate_dataset(d: DatasetConfig) -> None:
    if not d.sources:
        _fail("dataset.sources", {}, "at least one source is needed")
    for name, src in d.sources.items():
        key = f"dataset.sources.{name}"
        _check(
            bool(src.path),
            f"{key}.path",
            src.path,
            "must name a hub data set, a local file or directory, or 'synthetic'",
        )
        _check_choice(f"{key}.format", src.format, SOURCE_FORMATS)
        # the synthetic task makes its own rows: a path beside format=synthetic, or a format beside
        # path=synthetic, would be read by nothing
        if src.format == "synthetic":
            _check(
                src.path == "synthetic",
                f"{key}.path",
                src.path,
                f"is not read with {key}.format=synthetic (the task makes its own rows); set path: synthetic, "
                "or give the file's format (auto, messages, strings)",
            )
        elif src.path == "synthetic":
            _check(
                src.format == "auto",
                f"{key}.format",
                src.format,
                f"has no effect with {key}.path=synthetic (the task makes its own rows); use format: auto or synthetic",
            )
        _check(0 < src.fraction <= 1, f"{key}.fraction", src.fraction, "must be in (0, 1]")
        if src.test_size is not None:
            _check(0 < src.test_size < 1, f"{key}.test_size", src.test_size, "must be in (0, 1) or null")
    _check(0 < d.test_size < 1, "dataset.test_size", d.test_size, "must be in (0, 1)")
    _check_choice("dataset.chat_format", d.chat_format, CHAT_FORMATS)
    if d.num_proc is not None:
        _check(d.num_proc >= 1, "dataset.num_proc", d.num_proc, "must be >= 1 or null (one process)")
    for key in ("max_train_samples", "max_eval_samples"):
        v = getattr(d, key)
        if v is not None:
            _check(v >= 1, f"dataset.{key}", v, "must be >= 1 or null")
    s = d.synthetic
    _check(
        s.num_train >= 1 and s.num_test >= 1,
        "dataset.synthetic.num_train/num_test",
        (s.num_train, s.num_test),
        "must both be >= 1",
    )
    _check(
        2 <= s.min_digits <= s.max_digits,
        "dataset.synthetic.min_digits",
        s.min_digits,
        f"must be >= 2 and <= dataset.synthetic.max_digits ({s.max_digits})",
    )


def _validate_hardware(h: HardwareConfig) -> None:
    from simpo_exp.layout import PACKING_ATTENTIONS, PACKINGS

    _check_choice("hardware.device", h.device, DEVICES)
    _check_choice("hardware.mixed_precision", h.mixed_precision, PRECISIONS)
    _check_choice("hardware.master_weights", h.master_weights, MASTER_WEIGHTS)
    _check_choice("hardware.attn_implementation", h.attn_implementation, ATTN_IMPLEMENTATIONS)
    _check_choice("hardware.packing", h.packing, ("auto",) + tuple(PACKINGS))
    _check_choice("hardware.packing_attention", h.packing_attention, tuple(PACKING_ATTENTIONS))
    _check(h.logps_chunk_size >= 0, "hardware.logps_chunk_size", h.logps_chunk_size, "must be >= 0 (0: no chunks)")
    _check_choice("hardware.fused_head", h.fused_head, FUSED_KERNELS)
    _check_choice("hardware.fused_layers", h.fused_layers, FUSED_KERNELS)
    _check_choice("hardware.checkpoint_format", h.checkpoint_format, CHECKPOINT_FORMATS)
    n = h.checkpoint_every_n_layers
    _check(n >= 1, "hardware.checkpoint_every_n_layers", n, "must be >= 1 (1: every layer)")
    if not h.gradient_checkpointing:
        inert = "has no effect unless hardware.gradient_checkpointing=true"
        _check(n == 1, "hardware.checkpoint_every_n_layers", n, inert)
        _check(not h.checkpoint_offload, "hardware.checkpoint_offload", h.checkpoint_offload, inert)
    if h.compile_mode is not None:
        _check(h.compile, "hardware.compile_mode", h.compile_mode, "has no effect unless hardware.compile=true")
        _check(
            h.compile_mode not in ("reduce-overhead", "max-autotune"),
            "hardware.compile_mode",
            h.compile_mode,
            "records a CUDA graph per distinct shape, and the layers are compiled for dynamic shapes: nearly every "
            "batch (packed rows rarely repeat a length) would record a new graph, slower and growing in memory; "
            "use default or max-autotune-no-cudagraphs",
        )
        _check_choice("hardware.compile_mode", h.compile_mode, COMPILE_MODES)
    _check_choice("hardware.compile_backend", h.compile_backend, COMPILE_BACKENDS)
    if not h.compile:
        _check(
            h.compile_backend == _default(HardwareConfig, "compile_backend"),
            "hardware.compile_backend",
            h.compile_backend,
            "has no effect unless hardware.compile=true",
        )
    if h.packing == "none":  # the padded layout runs the model's own attention
        _check(
            h.packing_attention == _default(HardwareConfig, "packing_attention"),
            "hardware.packing_attention",
            h.packing_attention,
            "has no effect with hardware.packing=none (the padded layout runs the model's own attention)",
        )
    if h.peak_tflops is not None:
        _check(h.peak_tflops > 0, "hardware.peak_tflops", h.peak_tflops, "must be > 0 or null (looked up)")
    if h.effective_batch_size is not None:
        _check(
            h.effective_batch_size >= 1, "hardware.effective_batch_size", h.effective_batch_size, "must be >= 1 or null"
        )
    if not h.lora:  # the adapter's shape is read only when there are adapters
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
            _check(
                getattr(h, key) == _default(HardwareConfig, key),
                f"hardware.{key}",
                getattr(h, key),
                "has no effect unless hardware.lora=true",
            )
    if h.lora:
        _check(h.lora_r >= 1, "hardware.lora_r", h.lora_r, "must be >= 1")
        _check(h.lora_alpha > 0, "hardware.lora_alpha", h.lora_alpha, "must be > 0 (0: the adapters add nothing)")
        _check(0 <= h.lora_dropout < 1, "hardware.lora_dropout", h.lora_dropout, "must be in [0, 1)")
        _check(bool(h.lora_target_modules), "hardware.lora_target_modules", h.lora_target_modules, "must name modules")
    _check(h.dataloader_num_workers >= 0, "hardware.dataloader_num_workers", h.dataloader_num_workers, "must be >= 0")
    _check(h.collective_timeout > 0, "hardware.collective_timeout", h.collective_timeout, "must be > 0 seconds")


def to_config(cfg: DictConfig | Config) -> Config:
    """Turn a composed (already resolved) DictConfig into a validated ``Config`` object."""
    if isinstance(cfg, DictConfig):
        cfg = structured(Config, cfg)
    cfg = validate(cfg)
    if cfg.learning_rate is None and cfg.model.learning_rate is None and cfg.model.params_b is None:
        _fail(
            "model.params_b",
            None,
            f"model preset {cfg.model.name!r} gives no size, and nothing sets the learning rate, whose default "
            "follows the size: set model.params_b=<billions of parameters> (7-8B: 5e-7) or learning_rate=...",
        )
    return cfg


def undeclared_keys(node: DictConfig, prefix: str = ""):
    """(dotted key, the keys its level declares) for each key of a composed config that its schema does not
    declare. Hydra adds any key given with '+' (``+betta=5``, ``+hardware.pakcing=none``) to the config, and the
    dataclass would carry it as an attribute that nothing reads."""
    kind = OmegaConf.get_type(node)
    declared = list(kind.__dataclass_fields__) if dataclasses.is_dataclass(kind) else None
    for key in node.keys():
        if not prefix and key == "hydra":  # Hydra's own node, in a config composed with return_hydra_config
            continue
        if declared is not None and key not in declared:
            yield f"{prefix}{key}", declared
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            yield from undeclared_keys(child, f"{prefix}{key}.")


def structured(schema: type, cfg: DictConfig):
    """A stage's composed config as an instance of its ``schema`` dataclass. A key that has no default and was
    not given (``dataset=local`` without ``dataset.sources.local.path``) is a ConfigError naming it."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        for key, declared in undeclared_keys(merged):
            parent, _, name = key.rpartition(".")
            close = difflib.get_close_matches(name, declared, n=1)
            hints = [f"did you mean {parent + '.' if parent else ''}{close[0]}?"] if close else []
            hints += [] if parent else ["a config group is chosen without '+' (group=option)"]
            value = OmegaConf.select(merged, key, throw_on_resolution_failure=False)
            _fail(key, value, "; ".join(["no such key, so nothing would read it (added with '+'?)", *hints]))
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as err:
        key = err.full_key or "?"
        if key == "evaluate.path":  # the evaluate stage's one positional argument
            raise ConfigError(
                "missing config value evaluate.path: give a run or sweep directory, "
                "python -m simpo_exp.evaluate RUN_OR_SWEEP_DIR benchmark=..."
            ) from None
        hint = " (a local file: nothing is downloaded)" if key.endswith("path") else ""
        raise ConfigError(
            f"missing config value {key}: it has no default, give it on the command line ({key}=...){hint}"
        ) from None
