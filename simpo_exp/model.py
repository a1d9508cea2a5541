"""Build the policy model and its tokenizer from the ``model`` config.

``model=tiny`` needs nothing from outside: a byte-level fast tokenizer with a chat template is
built here in code, and a Llama-architecture model is randomly initialised from a config.
Hub presets load with ``from_pretrained``; when their files are neither on disk nor in the
Hugging Face cache and the hub cannot be reached, ``simpo_exp.hub`` says so at once
(instead of transformers' minute of retries) and how to point ``model.path`` at local weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError

from simpo_exp.config import Config, ConfigError, ModelConfig
from simpo_exp.flops import full_numel, routed_expert
from simpo_exp.hub import check_model_available, check_tokenizer_files, unreadable_weights
from simpo_exp.inference.files import readable_as_umask
from simpo_exp.precision import prepare_weights

log = logging.getLogger(__name__)

# The tiny tokenizer's template. The BOS is written by the template, so text is always
# tokenised with add_special_tokens=False (no second BOS). Each turn ends with EOS.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Zephyr-style template: alignment-handbook's default for a tokenizer without one (the official run_simpo.py's),
# with the BOS written out. Its system branch is the handbook's too: under dataset.chat_format=simpo_repo a template
# with one gets an empty system turn first, as the handbook's maybe_insert_system_message gives it.
ZEPHYR_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"zephyr": ZEPHYR_CHAT_TEMPLATE, "tiny": TINY_CHAT_TEMPLATE}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_tokenizer():
    """A byte-level fast tokenizer (256 byte tokens + specials) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )
    return tok


@contextlib.contextmanager
def outside_zero3_init():
    """Build a model as a plain process does, not under DeepSpeed's ``zero.Init`` (which transformers uses for
    every model it builds while a ZeRO-3 config is registered, as accelerate's ``zero3_init_flag`` does): a seeded
    random init drawn partition by partition gives other weights than one process draws, so the same run under
    ZeRO-3 would start elsewhere (and the evaluate stage's rebuilt starting model would not be its start)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers' one record of the registered config
    registered = ref() if ref is not None else None
    if registered is None or not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)


def apply_chat_template_choice(tokenizer, choice: str, mcfg_name: str = "", key: str = "model.chat_template") -> None:
    """Set the tokenizer's chat template from the ``model.chat_template`` setting (``key``: the setting's name, as
    the messages give it: a reward model's is ``scorer.chat_template``)."""
    if choice == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"{key}='auto' but the tokenizer of {mcfg_name!r} has no chat template; "
                f"set {key}=zephyr (or a Jinja template string)"
            )
        return
    if choice in BUILTIN_TEMPLATES:
        tokenizer.chat_template = BUILTIN_TEMPLATES[choice]
    elif "{%" in choice or "{{" in choice:
        tokenizer.chat_template = choice
    else:
        raise ConfigError(
            f"{key}={choice!r}: allowed are 'auto', {', '.join(map(repr, BUILTIN_TEMPLATES))} "
            "or a Jinja template string"
        )


def chat_template_text(tokenizer) -> str:
    """The template a conversation is rendered with: the tokenizer's one, or, where it ships several by name (a
    default and a tool-use one, as Hermes-2-Pro's and Command-R's do), its ``default``, as ``apply_chat_template``
    takes it without tools."""
    template = tokenizer.chat_template or ""
    return template.get("default", "") if isinstance(template, dict) else template


def chat_template_hash(tokenizer) -> str:
    """A short hash of the tokenizer's template(s): several named ones hashed together, in a stable order."""
    template = tokenizer.chat_template or ""
    text = json.dumps(template, sort_keys=True) if isinstance(template, dict) else template
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tokenizer_hash(tokenizer) -> str | None:
    """A short hash of what turns text into ids: a fast tokenizer's whole definition (vocabulary, merges,
    normaliser, pre-tokeniser, added tokens), else its vocabulary, with the special tokens' ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        # without the call-time settings a file may carry (truncation, padding: a tokenizer saved after a padded
        # call holds them, and a call without them clears them in memory) and the format's version
        whole = json.loads(backend.to_str())
        text = json.dumps({k: v for k, v in whole.items() if k not in ("truncation", "padding", "version")})
    except Exception:  # a tokenizer that cannot say: its vocabulary, if it has one
        try:
            text = json.dumps(sorted(tokenizer.get_vocab().items()))
        except Exception:
            return None
    ids = [getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")]
    return hashlib.sha256((text + json.dumps(ids)).encode()).hexdigest()[:12]


def load_tokenizer(mcfg: ModelConfig):
    if not mcfg.path:
        tok = build_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        path = mcfg.tokenizer_path or mcfg.path
        what = "model.tokenizer_path" if mcfg.tokenizer_path else "model.path"
        revision = None if mcfg.tokenizer_path else mcfg.revision  # the model's commit, not another repo's
        if mcfg.tokenizer_path:  # the model's own config too, before the data is tokenised
            check_model_available(mcfg.path, mcfg.revision, trust_remote_code=mcfg.trust_remote_code)
        check_model_available(path, revision, what, mcfg.trust_remote_code)
        check_tokenizer_files(path, what)
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=mcfg.trust_remote_code)
    apply_chat_template_choice(tok, mcfg.chat_template, mcfg.path or mcfg.name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def pick_attention(cfg: Config) -> str:
    """The attention kernel: the model preset's, else the hardware preset's; flash-attn only where installed."""
    wanted = cfg.model.attn_implementation or cfg.hardware.attn_implementation
    if wanted == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            log.warning("flash_attention_2 asked for but flash-attn is not installed; using sdpa")
            return "sdpa"
    return wanted


def saved_dtype(model_dir) -> str | None:
    """The dtype a local model directory's config.json records (``dtype``, or ``torch_dtype`` in older files), where
    it is one this project loads; None for a hub id or an unreadable config."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return dtype if dtype in TORCH_DTYPES else None


def refuse_weights_drawn_at_random(path: str, model, missing: list[str]) -> None:
    """A checkpoint without some of the causal LM's weights loads with those drawn at random (transformers only
    logs it): a reward model (``*ForSequenceClassification``: a ``score`` head, no ``lm_head``) or a bare base
    model trained, sampled or evaluated as a policy with a random output head. A head tied to the
    embedding and buffers are not listed by transformers as missing."""
    if not missing:
        return
    archs = list(getattr(model.config, "architectures", None) or [])
    shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise ConfigError(
        f"invalid config value model.path={path!r}: its checkpoint has no {shown}, which would be drawn at random "
        f"(its config names architectures {archs or 'none'}). The policy must be a causal LM "
        "(*ForCausalLM) with all its weights: a reward model (*ForSequenceClassification) belongs in scorer.path"
    )


def load_model(cfg: Config, tokenizer, attn_implementation: str, engine_master_copy: bool = False):
    """The causal LM: a random Llama of ``model.random_init``'s shape for ``path=""``, else ``from_pretrained``.
    ``engine_master_copy``: the engine (DeepSpeed under bf16/fp16) keeps the float32 master weights, so the model
    stays in ``model.dtype`` (``precision.prepare_weights``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    m = cfg.model
    dtype = TORCH_DTYPES[m.dtype]
    if not m.path:
        arch = m.random_init
        if arch.vocab_size and arch.vocab_size < len(tokenizer):
            raise ConfigError(
                f"model.random_init.vocab_size={arch.vocab_size} is smaller than the tokenizer's "
                f"{len(tokenizer)} tokens; use 0 for the tokenizer's size"
            )
        config = LlamaConfig(
            vocab_size=arch.vocab_size or len(tokenizer),
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_hidden_layers=arch.num_hidden_layers,
            num_attention_heads=arch.num_attention_heads,
            num_key_value_heads=arch.num_key_value_heads,
            max_position_embeddings=arch.max_position_embeddings,
            tie_word_embeddings=arch.tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(cfg.seed)
        with outside_zero3_init():  # the same seeded weights as one process draws; ZeRO-3 partitions them later
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    else:
        check_model_available(m.path, m.revision, trust_remote_code=m.trust_remote_code)
        if saved_dtype(m.path) == "float32" and (m.dtype != "float32" or engine_master_copy):
            # DeepSpeed under bf16/fp16 casts the model it is handed to that dtype before it builds its float32
            # master copy (ZeRO-3's zero3_init already at loading), whatever model.dtype says
            keep = (
                "DeepSpeed under bf16 casts it to bf16 before building its float32 masters, whatever model.dtype; "
                "start from it under FSDP or on one GPU (hardware=fsdp, gpu), which keep it as loaded"
                if engine_master_copy
                else "set model.dtype=float32 to keep it"
            )
            log.warning(
                "model.path=%s holds float32 weights (a trained run's model/ does: SimPO-size updates live below "
                "bf16's resolution), trained here from their rounding to 16 bits, which loses most of that update; %s",
                m.path, keep,
            )  # fmt: skip
        try:
            model, loading = AutoModelForCausalLM.from_pretrained(
                m.path,
                revision=m.revision,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=m.trust_remote_code,
                output_loading_info=True,
            )
        except (OSError, SafetensorError) as e:  # a local directory's weights cut short or missing
            if Path(m.path).is_dir():
                raise unreadable_weights(m.path, e) from e
            raise
        except ValueError as e:  # transformers refuses this kernel for the model (Gemma 2 has no SDPA path)
            if "attention implementation" not in str(e):
                raise
            key = "model.attn_implementation" if m.attn_implementation else "hardware.attn_implementation"
            given = m.attn_implementation or cfg.hardware.attn_implementation
            why = str(e).split(". ")[0]
            fell_back = (
                f" (its {given!r} fell back to it: flash-attn is not installed)" if given != attn_implementation else ""
            )
            raise ConfigError(f"{key}={attn_implementation!r}{fell_back}: {why}; 'eager' runs every model") from e
        refuse_weights_drawn_at_random(m.path, model, loading.get("missing_keys") or [])
    check_vocabulary(model, tokenizer, m)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.hardware.fused_layers == "liger":
        from simpo_exp.fused import fuse_layers

        fuse_layers(model)
    if cfg.hardware.gradient_checkpointing:
        enable_checkpointing(model, cfg.hardware.checkpoint_every_n_layers, cfg.hardware.checkpoint_offload)
    model.config.use_cache = False
    model = prepare_weights(model, cfg.hardware.master_weights, cfg.hardware.lora, engine_master_copy)
    if cfg.hardware.lora:
        model = add_lora(model, cfg.hardware, cfg.model.revision)
        if cfg.disable_dropout and cfg.hardware.lora_dropout > 0:  # TRL's trainers zero it with the model's own
            log.warning(
                "hardware.lora_dropout=%g stays on beside disable_dropout=true, which zeroes only the model's own "
                "dropout: the chosen and rejected responses of a pair get different adapter masks, noise in their "
                "log-prob margin; set hardware.lora_dropout=0 to turn it off too",
                cfg.hardware.lora_dropout,
            )
    return model


def check_vocabulary(model, tokenizer, m: ModelConfig) -> None:
    """A tokenizer with ids past the model's embedding table would fail mid-step ("index out of range")."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        source = f"model.tokenizer_path={m.tokenizer_path!r}" if m.tokenizer_path else f"model.path={m.path!r}"
        raise ConfigError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows; "
            "use the tokenizer the model was trained with"
        )


def check_positions(model, cfg: Config) -> None:
    """Training's ``max_length`` against the positions the model reads: one of learned positions (GPT-2's
    ``n_positions``, OPT's) failed mid-step ("index out of range") on a longer sequence, so that is refused; a rotary
    one reads positions it was never trained on, which is said. (The sampling stages cut their answers there.)"""
    from simpo_exp.inference.sampling import model_positions
    from simpo_exp.layout import text_config

    config = text_config(model.config)
    positions = model_positions(config)
    if positions is None or cfg.max_length <= positions:
        return
    where = f"model.path={cfg.model.path!r}" if cfg.model.path else "model.random_init"
    rotary = any(getattr(config, k, None) is not None for k in ("rope_theta", "rope_parameters", "rope_scaling"))
    if not rotary:
        raise ConfigError(
            f"max_length={cfg.max_length}: {where} has {positions} learned positions, and a longer pair would fail "
            f"in the middle of a step; set max_length to {positions} or less (max_prompt_length below it)"
        )
    log.warning(
        "max_length=%d passes the %d positions %s was trained for: its longer sequences read rotary positions "
        "it has never seen",
        cfg.max_length, positions, where,
    )  # fmt: skip


def enable_checkpointing(model: torch.nn.Module, every_n_layers: int = 1, offload: bool = False) -> None:
    """transformers' activation checkpointing, non-reentrant: a checkpointed decoder layer keeps only its input
    and recomputes its forward pass in the backward one. ``every_n_layers`` > 1 checkpoints layers 0, N, 2N, ...
    and lets the rest keep their activations (the recompute shrinks to 1/N of the forward); ``offload`` holds
    the checkpointed inputs in pinned host memory (``torch.autograd.graph.save_on_cpu``). Gradients are the
    same either way; only memory and time change."""
    # activation_checkpointing_enable from transformers 5.23 (gradient_checkpointing_enable is its deprecated
    # alias); every_n_layers from 5.16 and offload from 5.17 in either.
    enable = getattr(model, "activation_checkpointing_enable", None)
    kwargs_name = "activation_checkpointing_kwargs"
    if enable is None:
        enable, kwargs_name = model.gradient_checkpointing_enable, "gradient_checkpointing_kwargs"
    if offload and not has_accelerator():  # transformers would ask for pinned memory, which needs one
        raise ConfigError(
            "hardware.checkpoint_offload=true needs a GPU: without one the activations are in host memory already"
        )
    options = {}
    if every_n_layers != 1:
        options["every_n_layers"] = every_n_layers
    if offload:
        options["offload"] = True
    accepted = inspect.signature(enable).parameters
    for name, key in (("every_n_layers", "checkpoint_every_n_layers"), ("offload", "checkpoint_offload")):
        if name in options and name not in accepted:
            import transformers

            raise ConfigError(
                f"hardware.{key}={options[name]!r} needs transformers >= 5.17 (installed: {transformers.__version__}); "
                f"upgrade it or leave hardware.{key} at its default"
            )
    enable(**{kwargs_name: {"use_reentrant": False}}, **options)


def has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def checkpointed_layers(model: torch.nn.Module) -> int:
    """How many of the model's decoder layers recompute their forward pass in the backward one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero the model's own dropout for training (``disable_dropout=true``, the default of TRL's trainers and
    the official SimPO trainer). With dropout, a pair's chosen and rejected answers see different random
    masks, and that noise does not cancel in their reward margin, whose true gradient is small.

    Zeroes every dropout module, every float attribute a module reads a dropout probability from while training
    (``attention_dropout`` in transformers' attention modules; ``dropout``, ``activation_dropout`` and
    ``layerdrop`` in OPT's layers; ``hidden_dropout`` in Bloom's), and the same values in the config, which some
    models read at run time (Falcon's ``hidden_dropout``). The config's values are put back for every save
    (``dropout_as_loaded``), so the saved model keeps them. LoRA's adapters are added afterwards, with
    ``hardware.lora_dropout`` (0 by default)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout(name, value):
                setattr(module, name, 0.0)
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    kept = [
        (config, name, value) for config in configs for name, value in vars(config).items() if _is_dropout(name, value)
    ]
    for config, name, _ in kept:
        setattr(config, name, 0.0)
    model._dropout_as_loaded = kept


DROPOUT_WORDS = ("dropout", "pdrop", "layerdrop")  # in the names of dropping probabilities (GPT-2's resid_pdrop)


def is_dropout_name(name: str) -> bool:
    return any(word in name.lower() for word in DROPOUT_WORDS)


def _is_dropout(name: str, value) -> bool:
    """A float attribute that is a probability of dropping (of an activation, an attention weight, a layer)."""
    return type(value) is float and value > 0 and is_dropout_name(name)


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode for the block (a forward without dropout noise, as scores and samples are taken), then
    back in the mode it was in, whatever the block raised."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def dropout_as_loaded(model):
    """The config's dropout values as loaded while the model is saved (``disable_dropout`` zeroed them)."""
    kept = getattr(model, "_dropout_as_loaded", None) or []
    for config, name, value in kept:
        setattr(config, name, value)
    try:
        yield
    finally:
        for config, name, _ in kept:
            setattr(config, name, 0.0)


def save_trained(model: torch.nn.Module, path, state_dict: dict | None = None, dtype: str | None = None) -> None:
    """``save_pretrained`` of a trained model into ``path``, so that ``path`` is a model any tool loads.

    A LoRA model is written twice: its adapter alone in ``path/adapter`` (PEFT's format, to load onto the base
    again, as trained: base in ``model.dtype``, float32 adapters) and, in ``path``, the base with the adapters
    merged into its weights (W + scaling * B A), which the evaluate and generate stages, lm-eval and vLLM load
    as any model. The merge is done and stored in float32, as a full fine-tune's weights are (its float32 master
    copy): at SimPO's learning rates most of an adapter's update is below a bfloat16 weight's resolution, and a
    merge rounded to the base's bfloat16 would lose it. ``state_dict``: the weights gathered off the shards
    under a sharded engine; else the model's own, copied to the CPU. ``dtype`` (``save_dtype``: "bfloat16", ...):
    the floating-point weights are rounded to it once, last (after the merge), and config.json records it;
    None writes them as they are."""
    path = Path(path)
    lora = hasattr(model, "merge_and_unload")
    with dropout_as_loaded(model):
        if lora:
            model.save_pretrained(path / "adapter", state_dict=state_dict)  # PEFT keeps the adapter's entries
            if state_dict is None:
                state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            model, state_dict = merged_lora(model, state_dict)
        if dtype is not None:
            state_dict = cast_floating(state_dict or model.state_dict(), TORCH_DTYPES[dtype])
        stored = {v.dtype for v in (state_dict or {}).values() if v.is_floating_point()}  # save_pretrained empties it
        model.save_pretrained(path, state_dict=state_dict)
    # save_pretrained writes the dtype of the model in memory (a LoRA base's; DeepSpeed's bf16 working copy), not of
    # the weights it wrote (float32: the merge, the engine's master copy); a loader taking "auto" would round them
    if dtype is not None:
        update_json(path / "config.json", dtype=dtype)
    elif lora or stored == {torch.float32}:
        update_json(path / "config.json", dtype="float32")
    readable_as_umask(path)


def cast_floating(state_dict: dict, dtype: torch.dtype) -> dict:
    """``state_dict`` on the CPU with its floating-point tensors in ``dtype`` (integer buffers as they are). Names
    that share one tensor (an output head tied to the embeddings) still share one afterwards, which save_pretrained
    needs to write the matrix once."""
    cast: dict = {}
    out = {}
    for name, value in state_dict.items():
        value = value.detach()
        if not value.is_floating_point():
            out[name] = value.cpu()
            continue
        key = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if key not in cast:
            cast[key] = value.to(device="cpu", dtype=dtype)
        out[name] = cast[key]
    return out


def update_json(path: Path, **changes) -> None:
    """Set ``changes`` in a saved model's JSON file (config.json, generation_config.json), written as
    ``save_pretrained`` writes it; a file not there is started."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(data | changes, indent=2, sort_keys=True) + "\n")


def save_tokenizer(tokenizer, path) -> bool:
    """Save the tokenizer as training used it. Where its chat template writes no BOS and the tokenizer has one,
    training put one in front of every sequence (``data.tokenize.with_bos``), and so do this project's stages; a
    tool that tokenises the rendered template as it is (transformers' ``apply_chat_template(tokenize=True)`` adds
    no special tokens) prompted the saved model without it. The saved template then writes it first (the ids are
    those training used); returns whether it was added."""
    bos, template = tokenizer.bos_token, tokenizer.chat_template
    add = False
    if bos and isinstance(template, str):  # a dict of named templates (tool use beside the default): as it is
        try:
            probe = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
            )
            add = not probe.lstrip().startswith(bos)  # after leading whitespace: written (as with_bos counts it)
        except Exception:  # a template that refuses the probe: saved as it is
            add = False
    if add:
        tokenizer.chat_template = "{{ bos_token }}" + template
    try:
        tokenizer.save_pretrained(path)
    finally:
        tokenizer.chat_template = template
    return add


def ready_to_generate(path, tokenizer) -> None:
    """A saved model's config as a generating tool reads it: ``use_cache`` back on (training turned it off, and a
    plain forward loop then got no cache), and ``generation_config.json``'s end ids with the token the chat template
    ends a turn with (a base model trained with a chat template, Llama 3's ``<|eot_id|>`` beside
    ``<|end_of_text|>``): HF generate and vLLM read them there, and ran past the end of the turn where the project's
    own stages stop (``stop_token_ids``)."""
    from types import SimpleNamespace

    from simpo_exp.inference.sampling import stop_token_ids

    path = Path(path)
    if json.loads((path / "config.json").read_text()).get("use_cache") is False:
        update_json(path / "config.json", use_cache=True)
    generation = path / "generation_config.json"
    had = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    ids = stop_token_ids(tokenizer, [], SimpleNamespace(eos_token_id=had))
    if ids and sorted(had if isinstance(had, list) else [had]) != ids:
        update_json(generation, eos_token_id=ids if len(ids) > 1 else ids[0])


def merged_lora(model, state_dict: dict) -> tuple:
    """(the base model, its state dict in float32 with each LoRA layer merged) from a PEFT model and its full
    ``state_dict`` (keys ``base_model.model.<name>.base_layer.weight`` and the adapters' ``lora_A/B`` or, for an
    embedding, ``lora_embedding_A/B``): W + scaling B A (its transpose for an embedding, whose A is [r, vocab]),
    where scaling is the layer's own (lora_alpha / r, or over sqrt(r) with rsLoRA, per-layer patterns included).
    A base weight left out as a tied copy (a sharded engine's gathered weights) is taken from its twin; a LoRA
    layer whose weights are not all there is an error, never a model saved without its training. Where a merged
    adapter on the output head or the input embeddings made tied weights differ, the base model's config no
    longer ties them: tied, the loaded model would take one for both and lose the other's training."""
    from simpo_exp.logps import shared_parameters

    def base_key(key: str) -> str:
        return key.removeprefix("base_model.model.").replace(".base_layer.", ".")

    layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")}
    state_dict, groups = dict(state_dict), shared_parameters(model)
    for group in groups:  # tied weights: every name present, as the model itself holds them
        there = next((state_dict[n] for n in group if n in state_dict), None)
        state_dict.update({n: there for n in group if n not in state_dict and there is not None})
    merged, done = {}, set()
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        value = value.float() if value.is_floating_point() else value
        name, _, leaf = key.rpartition(".base_layer.")
        if name in layers and leaf == "weight":
            value = value + lora_delta(layers[name], name, state_dict)
            done.add(name)
        merged[base_key(key)] = value
    missing = sorted(set(layers) - done)
    if missing:
        raise RuntimeError(f"LoRA layers not merged (their base weight is not in the saved state): {missing[:5]}")
    base = model.get_base_model()
    for group in groups:
        keys = [base_key(n) for n in group]
        tensors = [merged[k] for k in keys if k in merged]
        if any(not torch.equal(tensors[0], t) for t in tensors[1:]) and getattr(
            base.config, "tie_word_embeddings", False
        ):
            base.config.tie_word_embeddings = False
            log.info("LoRA merge: %s now differ, saved untied", " and ".join(keys))
    return base, merged


def lora_delta(layer, name: str, state_dict: dict) -> torch.Tensor:
    """scaling * B A of one LoRA layer (summed over its active adapters), in float32, laid out as its base weight."""
    delta = 0
    for adapter in layer.active_adapters:
        if f"{name}.lora_embedding_A.{adapter}" in state_dict:  # an embedding: A [r, vocab], B [hidden, r]
            a = state_dict[f"{name}.lora_embedding_A.{adapter}"].float()
            b = state_dict[f"{name}.lora_embedding_B.{adapter}"].float()
            delta = delta + (b @ a).T * layer.scaling[adapter]
            continue
        a = state_dict[f"{name}.lora_A.{adapter}.weight"].float()
        b = state_dict[f"{name}.lora_B.{adapter}.weight"].float()
        d = (b @ a) * layer.scaling[adapter]
        delta = delta + (d.T if getattr(layer, "fan_in_fan_out", False) else d)  # GPT-2's Conv1D: [in, out]
    return delta


def require_peft() -> None:
    """A ConfigError saying how to install PEFT where it is missing (LoRA needs it)."""
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ConfigError("hardware.lora=true needs peft: pip install -e '.[peft]'") from e


def add_lora(model, h, revision: str | None = None):
    """Wrap the model with LoRA adapters (peft); only the adapters train. ``revision``: the base's (model.revision),
    which the saved adapter's config records (PEFT loads the base at ``main`` where it names none)."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    targets = list(h.lora_target_modules)
    if targets == ["all-linear"]:  # PEFT's shorthand (every linear layer but the output head), given as a string
        targets = "all-linear"
    else:  # as PEFT matches them: a module's name, or the end of its dotted path
        matches = [(t, m) for n, m in model.named_modules() for t in targets if n == t or n.endswith("." + t)]
        missing = [t for t in targets if t not in {matched for matched, _ in matches}]
        if missing:
            own = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _adaptable(m)} - {"lm_head"})
            raise ConfigError(
                f"hardware.lora_target_modules: {missing} are not modules of this model; its linear layers are "
                f"named {', '.join(own[:12]) or 'none'} (or use [all-linear])"
            )
        # a target naming a block of layers (a decoder layer, an MLP), which LoRA cannot adapt whole
        target, block = next(((t, m) for t, m in matches if any(m.children())), (None, None))
        if block is not None:
            inside = sorted({n.rsplit(".", 1)[-1] for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(
                f"hardware.lora_target_modules: {target!r} names {type(block).__name__}, a block of layers, which LoRA "
                f"does not adapt whole: name the linear layers inside it ({', '.join(inside) or 'none found'}) or "
                "use [all-linear]"
            )
    config = LoraConfig(
        r=h.lora_r,
        lora_alpha=h.lora_alpha,
        lora_dropout=h.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    # is_activation_checkpointing from transformers 5.23; is_gradient_checkpointing, its deprecated alias, before
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        model.enable_input_require_grads()
    try:
        # bf16/fp16 base: float32 adapters
        wrapped = get_peft_model(model, config, autocast_adapter_dtype=True, revision=revision)
    except ValueError as e:  # a layer type PEFT has no LoRA for
        raise ConfigError(f"hardware.lora_target_modules={targets}: {str(e).splitlines()[0]}") from e
    check_expert_adapters(wrapped, targets)
    return wrapped


def check_expert_adapters(model, targets) -> None:
    """A mixture of experts under LoRA. Adapters on a parameter rather than a linear layer (peft's ParamWrapper:
    transformers 5 keeps each layer's routed experts as fused 3-D weights, which ``all-linear`` wraps in Qwen3-MoE
    and Mixtral, with the router) are refused before training: the merged save has no rule for them, and the run
    failed at its end with nothing loadable saved. Routed experts no adapter covers (Qwen2-MoE and Llama 4 match
    the default targets in their shared expert alone) are said, with their share of the weights."""
    from peft.tuners import lora

    param_wrapper = getattr(lora, "ParamWrapper", None)
    fused = [n for n, m in model.named_modules() if param_wrapper is not None and isinstance(m, param_wrapper)]
    if fused:
        raise ConfigError(
            f"hardware.lora_target_modules={targets}: adapts {len(fused)} fused weight(s) that are not linear "
            f"layers ({fused[0].removeprefix('base_model.model.')}, ...: a mixture of experts' routed experts or "
            "router), which the merged model/ cannot be saved with; name the linear layers to adapt (attention: "
            "[q_proj, k_proj, v_proj, o_proj])"
        )
    weights = [(n, p.numel()) for n, p in model.named_parameters() if "lora_" not in n]
    experts = [(n, size) for n, size in weights if routed_expert(n)]
    if experts and not any(".base_layer." in n for n, _ in experts):
        share = sum(size for _, size in experts) / sum(size for _, size in weights)
        log.warning(
            "LoRA adapts none of this mixture of experts' routed experts (%.0f%% of its weights, left as they are): "
            "the run trains %s alone",
            100 * share,
            ", ".join(sorted({".".join(n.split(".")[-2:]) for n, m in model.named_modules() if hasattr(m, "lora_A")})),
        )


def _adaptable(module) -> bool:
    """A layer LoRA adapts as a linear one: torch's Linear, or GPT-2's Conv1D (a linear layer stored transposed)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def count_parameters(model, trained_only: bool = False) -> int:
    """The model's whole size (or its trained parameters' alone), also where ZeRO-3 has partitioned the weights at
    load (see flops.full_numel)."""
    return sum(full_numel(p) for p in model.parameters() if p.requires_grad or not trained_only)
