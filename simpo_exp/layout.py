"""The batch layout: how the pairs of a batch are laid out and how attention keeps their sequences apart.

One frozen value, checked when it is made and chosen once per run (``choose_layout``); the collator,
``ResponseLogps``, the FLOP count and ``env.json`` read it.

    packing    none: chosen and rejected rows, padded; packed: every sequence in one row, no padding;
               prefix_shared: prompt | chosen | rejected, the prompt computed once per pair
    attention  (packed layouts) segments: one SDPA call per sequence; flex: one FlexAttention call per
               layer with a block mask (GPU); mask: one row per pair with a dense 4D mask
    chunk_size > 0: the output head and log-softmax run in chunks of this many tokens
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PACKINGS = ("none", "packed", "prefix_shared")
PACKING_ATTENTIONS = ("segments", "mask", "flex")


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

    def as_dict(self) -> dict:
        return asdict(self)


def choose_layout(hardware, device_type: str, model_config) -> BatchLayout:
    """The run's layout from ``hardware.packing`` / ``packing_attention`` / ``logps_chunk_size``.
    ``packing=auto`` picks what was measured fastest per device (benchmarks/RESULTS.md): prefix sharing
    on CPU; the padded layout on GPU (until the GPU layouts are measured) and for models whose attention
    softcaps its logits (Gemma 2), which segment attention does not implement."""
    from simpo_exp.config import ConfigError

    packing = hardware.packing
    if packing == "auto":
        softcap = getattr(model_config, "attn_logit_softcapping", None)
        fused = getattr(hardware, "fused_head", "none") != "none"  # the fused head runs on the padded layout only
        packing = "prefix_shared" if device_type == "cpu" and not softcap and not fused else "none"
    if hardware.packing_attention == "flex" and packing != "none" and device_type != "cuda":
        raise ConfigError(
            f"hardware.packing_attention='flex' trains on a GPU only (torch has no FlexAttention "
            f"backward on {device_type}); use 'segments' here"
        )
    return BatchLayout(packing, hardware.packing_attention, hardware.logps_chunk_size)
