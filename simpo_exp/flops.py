"""Training FLOPs of a step and the device's peak, for model FLOPs utilisation (MFU).

MFU = FLOPs the model needs for the tokens of a step / (step time x peak FLOP/s of the devices).
It counts the work of the layout actually run (a shared prompt counts once under prefix sharing)
and not the recomputation of gradient checkpointing (that would be hardware FLOPs utilisation).

A matrix multiply with a weight of P parameters costs 2P FLOPs per token forward. Backward costs
2P again for the gradient of the input, and 2P more for the weight's own gradient when the weight
trains. So a fully trained dense layer costs 6P per token and a frozen one (LoRA's base model) 4P:

    body      (2 + 2 + 2 * trainable share) * body parameters * tokens computed
    head      the same with the output projection, over response tokens only (prompt positions
              never reach the vocabulary projection, see ``simpo_exp.logps``)
    attention 12 * layers * width * visible (query, key) pairs: QK^T and AV cost 2 FLOPs per pair
              and dimension each forward, twice that backward. width = heads * head_dim, or where the
              query-key and value heads differ (multi-head latent attention, DeepSeek-V2/V3, Kimi-K2)
              heads * (qk_head_dim + v_head_dim) / 2
    reference a live reference model (``reference_mode=live``) runs forward only in every step:
              2P per token in the body, 2P per response token in the head, 4 * layers * width per pair

The input embedding is a lookup and costs nothing. With a frozen embedding (LoRA without gradient
checkpointing) autograd also skips the first layer's input gradients, so the count is high by
about 2P/layers there: a small overstatement of that case's MFU. Peak figures are dense bf16/fp16 tensor-core
throughput from the vendors' data sheets; ``hardware.peak_tflops`` overrides the lookup (and is
the only way to get an MFU on CPU or in fp32). A device's name is matched whole-word against the table ("RTX A1000"
is not an A100).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Dense bf16/fp16 tensor-core TFLOP/s per device, matched against torch.cuda.get_device_name()
# in this order (the first name found in it wins, so "H100 PCIe" is tried before "H100").
PEAK_BF16_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("GH200", 989.4),
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800 PCIe", 756.0),  # before "H800", which its name contains
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),  # before "L4", which its name contains
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


@dataclass(frozen=True)
class FlopSpec:
    """What the FLOP count needs to know of a model (taken before any sharding)."""

    body_params: float  # parameters of the weight matrices and norms that every token goes through (a mixture of
    body_trainable: float  # experts' routed experts at the share of them a token runs)
    head_params: int  # the output projection
    head_trainable: float  # the share of the head's parameters that train (1 or 0; LoRA on lm_head: its adapters')
    layers: int
    attention_width: float  # the mean width of the QK^T and AV products: heads x head_dim for most models
    live_reference: bool = False  # a reference model runs forward in every step (reference_mode=live)

    def step_flops(self, tokens: float, response_tokens: float, attention_pairs: float) -> float:
        forward = (
            2 * self.body_params * tokens
            + 2 * self.head_params * response_tokens
            + 4 * self.layers * self.attention_width * attention_pairs
        )
        train_share = self.body_trainable / max(self.body_params, 1)
        backward = (
            (2 + 2 * train_share) * self.body_params * tokens
            + (2 + 2 * self.head_trainable) * self.head_params * response_tokens
            + 8 * self.layers * self.attention_width * attention_pairs
        )
        return forward + backward + (forward if self.live_reference else 0)


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter: DeepSpeed ZeRO-3 leaves each process an empty local tensor and
    records the full size as ``ds_numel``; an FSDP2 DTensor's ``numel()`` is already the global size."""
    return int(getattr(p, "ds_numel", p.numel()))


def expert_share(config) -> float:
    """The share of its routed experts' weights a mixture-of-experts model runs per token: top-k of E experts
    (``num_experts_per_tok`` of ``num_local_experts``/``num_experts``/``n_routed_experts``), 1 for a dense model.
    A token goes through k experts, not all: counted whole, Mixtral 8x7B's 46.4B parameters stand for 12.6B of
    work per token and its MFU read 3.7x too high (Qwen3-30B-A3B: 11x)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    k = getattr(config, "num_experts_per_tok", None)
    experts = next(
        (
            getattr(config, key)
            for key in ("num_local_experts", "num_experts", "n_routed_experts")
            if getattr(config, key, None)
        ),
        None,
    )
    return min(1.0, k / experts) if isinstance(k, int) and isinstance(experts, int) and k > 0 and experts > 0 else 1.0


def routed_expert(name: str) -> bool:
    """Whether a parameter belongs to a model's routed experts (a module named ``experts``; the shared experts
    (``shared_expert``, ``shared_experts``) and the router, which every token runs, do not)."""
    return "experts" in name.split(".")


def flop_spec(model: torch.nn.Module) -> FlopSpec:
    """FlopSpec of a (possibly peft-wrapped) causal LM, from its parameters and config. A mixture of experts'
    routed experts count at the share of them a token runs (``expert_share``). A multimodal model (Gemma-3 4B-27B)
    counts its language part alone, which a text pair runs: its config's ``text_config``, its decoder's parameters
    (the vision tower and projector left out)."""
    from simpo_exp.layout import text_config
    from simpo_exp.logps import decoder_of

    config = text_config(model.config)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    embed_ids = {id(p) for p in embed.parameters()} if embed is not None else set()
    share = expert_share(config)
    body = body_trainable = 0
    runs = decoder_of(model) if config is not model.config else model
    for name, p in runs.named_parameters():
        if id(p) in head_ids or id(p) in embed_ids:
            continue
        n = full_numel(p) * (share if routed_expert(name) else 1.0)
        body += n
        body_trainable += n if p.requires_grad else 0
    head_params = sum(full_numel(p) for p in head.parameters()) if head is not None else 0
    # LoRA on lm_head: the frozen weight takes no weight gradient, only its adapters do
    head_trainable = sum(full_numel(p) for p in head.parameters() if p.requires_grad) if head is not None else 0
    heads = getattr(config, "num_attention_heads", 0)
    return FlopSpec(
        body_params=body,
        body_trainable=body_trainable,
        head_params=head_params,
        head_trainable=head_trainable / max(head_params, 1),
        layers=getattr(config, "num_hidden_layers", 0),
        attention_width=heads * attention_head_width(config),
    )


def attention_head_width(config) -> float:
    """One head's mean width over QK^T and AV: ``head_dim`` (or hidden size / heads) where queries, keys and values
    are as wide; (qk + v) / 2 where a config gives the value heads a width of their own (``v_head_dim``: multi-head
    latent attention, whose ``head_dim`` is the rotary part alone and whose queries and keys are
    ``qk_nope_head_dim + qk_rope_head_dim`` wide)."""
    heads = getattr(config, "num_attention_heads", 0)
    qk = getattr(config, "qk_head_dim", None)
    if not qk and getattr(config, "qk_nope_head_dim", None) is not None and getattr(config, "qk_rope_head_dim", None):
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    qk = qk or getattr(config, "head_dim", None) or (config.hidden_size // max(heads, 1))
    v = getattr(config, "v_head_dim", None) or qk
    return (qk + v) / 2


def _causal(n: torch.Tensor | int):
    return n * (n + 1) // 2


def attention_pairs(batch: dict, packing: str) -> int | torch.Tensor:
    """Visible (query, key) pairs of a batch's causal attention, in the layout that is run (a sliding window's
    unseen pairs are counted too: the window is not read here; Gemma 3's local layers at 2048 tokens overstate
    the step's FLOPs by about 1.5%).

    none / packed: every sequence is ``prompt + response``, causal: L(L+1)/2 pairs. prefix_shared:
    the prompt once, and each response sees the prompt plus its own earlier tokens. For the padded
    layout the count is a 0-dim tensor on the batch's device (reading it would wait for the device);
    the packed layouts count from their plain-int ``segments``."""
    if packing == "none":
        return _causal(batch["attention_mask"].sum(1)).sum()
    total = 0
    for p, c, r in batch["segments"]:
        total += _causal(p + c) + _causal(p + r)
        if packing == "prefix_shared":
            total -= _causal(p)
    return int(total)


def peak_flops(device: torch.device, mixed_precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (no MFU is then reported)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or mixed_precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    if (
        "MIG" in name
    ):  # a slice of the GPU, whose share of the peak its name does not say: no MFU rather than a wrong one
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if re.search(rf"\b{re.escape(key)}\b", name):
            return tflops * 1e12
    return None
