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


def choose_layout(hardware, device_type: str, model_config) -> BatchLayout:
    """The run's layout from ``hardware.packing`` / ``packing_attention`` / ``logps_chunk_size``, by a fixed
    rule (``simpo_exp.layout_auto`` measures the candidates instead where ``hardware.measure_layouts`` asks,
    by default on GPUs). ``packing=auto`` here: prefix sharing on CPU, where it was measured fastest
    (benchmarks/RESULTS.md); the padded layout on GPU, under a fused head (``hardware.fused_head``), and for
    models whose attention softcaps its logits (Gemma 2), which segment attention does not implement."""
    packing = hardware.packing
    if packing == "auto":
        softcap = getattr(model_config, "attn_logit_softcapping", None)
        fused = getattr(hardware, "fused_head", "none") != "none"  # the fused head runs on the padded layout only
        packing = "prefix_shared" if device_type == "cpu" and not softcap and not fused else "none"
    check_attention(packing, hardware.packing_attention, device_type)
    return BatchLayout(packing, hardware.packing_attention, hardware.logps_chunk_size)


def check_attention(packing: str, attention: str, device_type: str) -> None:
    """A ConfigError naming ``hardware.packing_attention`` where the packed layout's attention cannot run."""
    from simpo_exp.config import ConfigError

    if packing == "none":
        return  # the padded layout runs the model's own attention
    key = f"hardware.packing_attention={attention!r}"
    if attention == "flex" and device_type != "cuda":
        raise ConfigError(
            f"{key} trains on a GPU only (torch has no FlexAttention backward on {device_type}); use 'segments' here"
        )
    if attention != "flash":
        return
    if device_type != "cuda":
        raise ConfigError(f"{key} runs flash-attn's CUDA kernels, not on {device_type}; use 'segments' here")
    if packing == "prefix_shared":
        raise ConfigError(f"{key} with hardware.packing='prefix_shared': {FLASH_PREFIX_MESSAGE}")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(f"{key} needs the flash-attn package (pip install flash-attn), which is not installed")
