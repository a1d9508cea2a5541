"""The batch layout: how the pairs of a batch are laid out and how attention keeps their sequences apart.

One frozen value, checked when it is made and chosen once per run (``choose_layout``); the collator,
``ResponseLogps``, the FLOP count and ``env.json`` read it.

    packing    none: chosen and rejected rows, padded; packed: every sequence in one row, no padding;
               prefix_shared: prompt | chosen | rejected, the prompt computed once per pair
    attention  (packed layouts) segments: one SDPA call per sequence; flex: one FlexAttention call per
               layer with a block mask (GPU); flash: flash-attn's variable-length kernel, one call per
               layer (GPU, packed only: it masks per document and cannot hide chosen from rejected, which
               prefix sharing needs); mask: one row per pair with a dense 4D mask
    chunk_size > 0: the output head and log-softmax run in chunks of this many tokens
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PACKINGS = ("none", "packed", "prefix_shared")
PACKING_ATTENTIONS = ("segments", "mask", "flex", "flash")
FLASH_PREFIX_MESSAGE = (
    "packing_attention='flash' serves packing='packed' only: flash-attn's variable-length kernel masks per "
    "sequence and cannot keep the rejected response from seeing the chosen one, as prefix sharing needs; "
    "use packing_attention='flex' (GPU) or 'segments' with prefix_shared"
)


@dataclass(frozen=True)
class BatchLayout:
    packing: str = "none"
    attention: str = "segments"
    chunk_size: int = 0

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise ValueError(f"packing={self.packing!r}: allowed values are {', '.join(map(repr, PACKINGS))}")
        if self.attention not in PACKING_ATTENTIONS:
            raise ValueError(
                f"attention={self.attention!r}: allowed values are {', '.join(map(repr, PACKING_ATTENTIONS))}"
            )
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size={self.chunk_size}: must be >= 0 (0: no chunks)")
        if self.attention == "flash" and self.packing == "prefix_shared":
            raise ValueError(FLASH_PREFIX_MESSAGE)

    def as_dict(self) -> dict:
        return asdict(self)


def choose_layout(hardware, device_type: str, model_config, max_length: int | None = None) -> BatchLayout:
    """The run's layout from ``hardware.packing`` / ``packing_attention`` / ``logps_chunk_size``, by a fixed
    rule (``simpo_exp.layout_auto`` measures the candidates instead where ``hardware.measure_layouts`` asks,
    by default on one GPU). ``packing=auto`` here picks what measured fastest (benchmarks/RESULTS.md):
    prefix sharing with ``hardware.packing_attention`` on CPU; packed with FlexAttention on CUDA (1.77x TRL's
    pairs/s and 1.70x the padded layout's on an H200, step by step), as the measured candidates do (padded where
    torch predates FlexAttention); a run refuses a ``packing_attention`` given beside ``packing=auto`` on CUDA first
    (``layout_auto.check_auto_attention``). The padded layout for a sliding window
    shorter than ``max_length`` (no packed attention here implements one), and on CPU for models whose
    attention softcaps its logits (Gemma 2), which segment attention does not implement (FlexAttention
    does, and so does ``packing_attention=mask``: prefix-shared then), and for models whose attention is biased by
    the distance between columns (ALiBi: MPT, Bloom), which prefix sharing moves, or by the column itself (Llama 4's
    attention temperature), which every packing moves. The fused head
    (``hardware.fused_head``) runs in every layout and changes nothing here."""
    packing, attention = hardware.packing, hardware.packing_attention
    softcapped = softcaps_attention(model_config)
    stateful = state_beside_attention(model_config)
    by_column = column_dependent(model_config)
    if packing == "auto":
        if padded_only(model_config, max_length):
            packing = "none"
        elif attention_sinks(model_config) and (device_type == "cuda" or attention != "mask"):
            packing = "none"  # neither segment attention nor FlexAttention adds the sinks; the mask, asked for, does
        elif device_type == "cuda":
            packing, attention = "packed", "flex"
        else:  # segment attention cannot softcap (Gemma 2); the mask attention, asked for, runs the model's own
            packing = "none" if softcapped and attention == "segments" else "prefix_shared"
    elif packing != "none" and short_window(model_config, max_length):
        from simpo_exp.config import ConfigError

        raise ConfigError(
            f"hardware.packing={packing!r}: the model attends through a sliding window of "
            f"{attention_window(model_config)} tokens, shorter than max_length={max_length}, which the packed "
            "layouts' attention does not implement (the log-probs would be a model without its window); use "
            "hardware.packing=none or auto"
        )
    elif packing != "none" and stateful:
        from simpo_exp.config import ConfigError

        raise ConfigError(
            f"hardware.packing={packing!r}: the model carries a state along the row besides attention ({stateful}), "
            "and the packed layouts keep sequences apart in attention only (the rejected response would read the "
            "chosen one); use hardware.packing=none or auto"
        )
    elif packing != "none" and attention != "mask" and attention_sinks(model_config):
        from simpo_exp.config import ConfigError

        raise ConfigError(
            f"hardware.packing={packing!r} with hardware.packing_attention={attention!r}: the model adds "
            f"{attention_sinks(model_config)} to its attention, which that attention does not (the log-probs would "
            "be another model's); use hardware.packing_attention=mask (the model's own attention), or "
            "hardware.packing=none or auto"
        )
    elif packing != "none" and (ignored := positions_ignored(model_config)):
        from simpo_exp.config import ConfigError

        raise ConfigError(
            f"hardware.packing={packing!r}: the model places tokens by their column ({ignored}), and the packed "
            "layouts give sequences their positions through position_ids (their log-probs would be another "
            "model's); use hardware.packing=none or auto"
        )
    elif packing != "none" and by_column:
        from simpo_exp.config import ConfigError

        raise ConfigError(
            f"hardware.packing={packing!r}: the model's attention depends on a token's column in the row "
            f"({by_column}), and the packed layouts put sequences at other columns than they have alone (their "
            "log-probs would be another model's); use hardware.packing=none or auto"
        )
    elif packing == "prefix_shared" and distance_biased(model_config):
        from simpo_exp.config import ConfigError

        raise ConfigError(
            f"hardware.packing='prefix_shared': the model biases attention by the distance between columns "
            f"({distance_biased(model_config)}), and in prompt | chosen | rejected the rejected response sits "
            "len(chosen) columns further from its prompt than it does alone (its log-probs would be another "
            "model's); use hardware.packing=none or auto"
        )
    elif packing != "none" and (mask_bias := alibi_from_the_padding_mask(model_config)):
        from simpo_exp.config import ConfigError

        raise ConfigError(
            f"hardware.packing={packing!r}: the model builds its ALiBi bias from the batch's 2D padding mask "
            f"({mask_bias}), which a packed row does not carry (its modelling code fails on the packed layouts' "
            "masks); use hardware.packing=none or auto"
        )
    elif packing != "none" and attention == "segments" and softcapped:
        from simpo_exp.config import ConfigError

        raise ConfigError(
            f"hardware.packing={packing!r} with hardware.packing_attention='segments': the model softcaps its "
            "attention logits (Gemma 2), which segment attention does not implement; use "
            "hardware.packing_attention=mask (or flex on a GPU), or hardware.packing=none or auto"
        )
    check_attention(packing, attention, device_type, softcapped)
    return BatchLayout(packing, attention, hardware.logps_chunk_size)


# Layer types that mix tokens by attention alone (transformers' config.layer_types values); any other type
# (linear_attention, mamba, conv) carries a state along the row.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
# Families whose layers run a recurrent or convolutional token mixer, beside attention or instead of it, whose
# configs say so by no layer_types list (Falcon-H1 runs Mamba beside attention in every layer).
RECURRENT_FAMILIES = {
    "mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "bamba", "zamba", "zamba2", "nemotron_h",
    "granitemoehybrid", "qwen3_next", "lfm2", "lfm2_moe", "recurrent_gemma", "rwkv", "minimax", "kimi_linear",
    "plamo2", "xlstm",
}  # fmt: skip


def state_beside_attention(model_config) -> str | None:
    """What of the model carries a state along its input besides attention (a Mamba or linear-attention mixer,
    a convolution), or None. The packed layouts keep the sequences of a row apart in attention only: through
    such a mixer the rejected response would read the chosen one, so these models run the padded layout."""
    config = text_config(model_config)
    types = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None)
    others = sorted(set(types) - ATTENTION_LAYER_TYPES - {"mlp", "moe"}) if isinstance(types, (list, tuple)) else []
    family = getattr(config, "model_type", None)
    if others:
        return f"its {'/'.join(map(str, others))} layers"
    if family in RECURRENT_FAMILIES or any(str(k).startswith(("mamba_", "ssm_")) for k in vars(config)):
        return f"its recurrent token mixer ({family})"
    return None


# Families whose attention adds learned sink logits to each row's softmax (transformers hands them to the attention
# function as ``s_aux``; the families of transformers 5.25 that do). The packed layouts' attention does not add them
# (segment_attention refuses a call that passes them, for a family not listed here); the mask attention, which runs
# the model's own, does.
SINK_FAMILIES = {
    "gpt_oss", "flint", "granite_swa", "granitemoe_swa", "mimo_v2_flash", "deepseek_v4", "hy_v4", "hy_v4_vl",
    "openai_privacy_filter",
}  # fmt: skip


def attention_sinks(model_config) -> str | None:
    """What of the model's attention the packed layouts leave out (its sink logits), or None."""
    family = getattr(text_config(model_config), "model_type", None)
    return f"the learned attention sinks of {family}" if family in SINK_FAMILIES else None


# Decoder-only causal LMs whose output head runs a transform of its own before the vocabulary projection (BERT's
# cls.predictions.transform, ModernBERT-decoder's lm_head block), which the response log-probs, reading the last
# hidden state into get_output_embeddings(), leave out: 27-188 nats off on a tiny model (electra, rembert: a shape
# error).
HEAD_TRANSFORM_FAMILIES = {
    "bert", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ernie",
    "megatron-bert", "roformer", "big_bird", "roc_bert", "electra", "rembert", "modernbert-decoder", "xmod",
}  # fmt: skip


def unscored_family(model_config) -> str | None:
    """Why the project's response log-probs would not be this model's, or None: an output head with a transform
    of its own before its vocabulary projection (the BERT-style decoders of ``HEAD_TRANSFORM_FAMILIES``)."""
    family = getattr(text_config(model_config), "model_type", None)
    if family in HEAD_TRANSFORM_FAMILIES:
        return f"{family}'s output head transforms the hidden state before its vocabulary projection"
    return None


def positions_ignored(model_config) -> str | None:
    """What of the model places a token by its column rather than by ``position_ids``, or None: the decoders of
    encoder-decoder families used as causal LMs (BART, mBART, Marian, Pegasus, PLBart, Blenderbot, BigBird-Pegasus,
    MVP, TrOCR), whose learned positions the packed layouts' ``position_ids`` do not reach (0.1-15 nats off)."""
    config = text_config(model_config)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "model_type", None) == "trocr":
        return f"the learned positions of {getattr(config, 'model_type', 'this')} decoder, which ignore position_ids"
    return None


def padded_only(model_config, max_length: int | None) -> bool:
    """Whether no packed layout scores this model as it scores a sequence alone: a sliding window that a sequence
    can outgrow (no packed attention here implements one), a state carried along the row besides attention, an
    attention that reads the column in the row (Llama 4's temperature) or the distance between columns (ALiBi,
    which prefix sharing moves). ``packing=auto`` and the measured candidates keep the padded layout for these."""
    return bool(
        short_window(model_config, max_length)
        or state_beside_attention(model_config)
        or column_dependent(model_config)
        or distance_biased(model_config)
        or positions_ignored(model_config)
    )


def column_dependent(model_config) -> str | None:
    """What of the model's attention reads a token's column in the row rather than its ``position_ids``, or None:
    Llama 4's attention temperature in its layers without rotary positions, which grows past ``floor_scale``
    columns. A sequence alone starts at column 0; in a packed row it may start past that, and be scored by another
    temperature, so these models run the padded layout."""
    config = text_config(model_config)
    no_rope = getattr(config, "no_rope_layers", None)
    if getattr(config, "attn_temperature_tuning", False) and isinstance(no_rope, (list, tuple)) and 0 in no_rope:
        return f"the attention temperature of its layers without rotary positions, past {config.floor_scale} columns"
    return None


def distance_biased(model_config) -> str | None:
    """What of the model biases attention by the distance between columns rather than by ``position_ids`` (ALiBi:
    Bloom, MPT, Falcon with ``alibi``), or None. Prefix sharing gives the rejected response positions that follow
    the prompt; such a bias reads the columns between them, the chosen response's, instead."""
    config = text_config(model_config)
    family = getattr(config, "model_type", None)
    # transformers' MPT adds its ALiBi bias whatever attn_config.alibi says (an alibi=False config was prefix shared)
    if family in ("bloom", "mpt") or getattr(config, "alibi", False) is True:
        return f"ALiBi ({family})"
    if getattr(config, "position_embedding_type", None) == "alibi":
        return f"ALiBi ({family})"
    return None


def alibi_from_the_padding_mask(model_config) -> str | None:
    """Which family builds its ALiBi bias from a 2D ``attention_mask`` (Bloom, Falcon with ``alibi``), or None:
    their attention reads the mask's batch and length, which neither packed attention passes (segment attention a
    placeholder, the mask attention a 4D mask). MPT builds its bias from the length alone."""
    config = text_config(model_config)
    family = getattr(config, "model_type", None)
    if family == "bloom" or (family == "falcon" and getattr(config, "alibi", False) is True):
        return f"ALiBi ({family})"
    return None


def softcaps_attention(model_config) -> bool:
    """Whether the model softcaps its attention logits (Gemma 2), which segment attention does not implement."""
    return bool(getattr(text_config(model_config), "attn_logit_softcapping", None))


def text_config(model_config):
    """The config of the model's language part: a multimodal model's ``text_config`` (Gemma-3 4B-27B load as one,
    their sliding window and softcaps in it, not at the top), else the config itself."""
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def attention_window(model_config) -> int | None:
    """The sliding window some of the model's layers attend through, in tokens, or None: ``sliding_window`` (Mistral,
    Gemma 2/3, Qwen2 where ``use_sliding_window``), GPT-Neo's ``window_size`` (its local layers), Llama 4's
    ``attention_chunk_size`` (its chunked layers attend within chunks of the row: a sequence no longer than a chunk
    is within one alone)."""
    config = text_config(model_config)
    if getattr(config, "model_type", None) == "gpt_neo" and "local" in str(getattr(config, "attention_layers", "")):
        return getattr(config, "window_size", None)
    if "chunked_attention" in (getattr(config, "layer_types", None) or ()):  # Llama 4: chunks of the row's columns
        return getattr(config, "attention_chunk_size", None)
    window = getattr(config, "sliding_window", None)
    return window if window and getattr(config, "use_sliding_window", True) else None


def short_window(model_config, max_length: int | None) -> bool:
    """Whether the model attends through a sliding window that a sequence of ``max_length`` tokens (any
    length, when unknown) can outgrow: the packed attentions here do not implement one."""
    window = attention_window(model_config)
    return bool(window) and (max_length is None or window < max_length)


def check_attention(packing: str, attention: str, device_type: str, softcapped: bool = False) -> None:
    """A ConfigError naming ``hardware.packing_attention`` where the packed layout's attention cannot run.
    ``softcapped``: the model softcaps its attention logits, which segment attention does not implement."""
    from simpo_exp.config import ConfigError

    if packing == "none":
        return  # the padded layout runs the model's own attention
    key = f"hardware.packing_attention={attention!r}"
    here = "'mask' here (segment attention does not softcap as this model does)" if softcapped else "'segments' here"
    if attention == "flex" and device_type != "cuda":
        raise ConfigError(
            f"{key} trains on a GPU only (torch has no FlexAttention backward on {device_type}); use {here}"
        )
    if attention != "flash":
        return
    if device_type != "cuda":
        raise ConfigError(f"{key} runs flash-attn's CUDA kernels, not on {device_type}; use {here}")
    if packing == "prefix_shared":
        raise ConfigError(f"{key} with hardware.packing='prefix_shared': {FLASH_PREFIX_MESSAGE}")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(f"{key} needs the flash-attn package (pip install flash-attn), which is not installed")
