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
    attention 12 * width * visible (query, key) pairs, summed over the attention layers: QK^T and AV
              cost 2 FLOPs per pair and dimension each forward, twice that backward. width = heads *
              head_dim, or where the query-key and value heads differ (multi-head latent attention,
              DeepSeek-V2/V3, Kimi-K2) heads * (qk_head_dim + v_head_dim) / 2. A layer's visible pairs
              follow its kind (the config's ``layer_types``): every earlier token under full attention, the
              last ``sliding_window`` under sliding attention (Gemma-2/3, gpt-oss, Mistral v0.1), the
              chunk's own under chunked attention (Llama 4), none in a layer without softmax attention
              (Qwen3-Next's linear attention, Jamba's Mamba: their token mixing grows linearly with the
              length and is not counted; their weights are in the body)
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
    layers: int  # attention layers that see every earlier token (all of a model's layers, for most)
    attention_width: float  # the mean width of the QK^T and AV products: heads x head_dim for most models
    live_reference: bool = False  # a reference model runs forward in every step (reference_mode=live)
    # attention layers that see a local span: ("window", sliding_window, layers), ("chunk", chunk size, layers)
    local: tuple[tuple[str, int, int], ...] = ()

    def local_pairs(self, batch: dict, packing: str):
        """The visible pairs of a batch summed over the local attention layers (0 where the model has none)."""
        return sum(n * attention_pairs(batch, packing, (kind, size)) for kind, size, n in self.local)

    def step_flops(
        self, tokens: float, response_tokens: float, attention_pairs: float, local_pairs: float = 0.0
    ) -> float:
        """``attention_pairs``: the batch's pairs under full causal attention (``attention_pairs``), counted in each
        of the ``layers``; ``local_pairs``: those of the local layers, summed over them (``local_pairs``)."""
        layer_pairs = self.layers * attention_pairs + local_pairs
        forward = (
            2 * self.body_params * tokens
            + 2 * self.head_params * response_tokens
            + 4 * self.attention_width * layer_pairs
        )
        train_share = self.body_trainable / max(self.body_params, 1)
        backward = (
            (2 + 2 * train_share) * self.body_params * tokens
            + (2 + 2 * self.head_trainable) * self.head_params * response_tokens
            + 8 * self.attention_width * layer_pairs
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
    full, local = attention_layers(config)
    return FlopSpec(
        body_params=body,
        body_trainable=body_trainable,
        head_params=head_params,
        head_trainable=head_trainable / max(head_params, 1),
        layers=full,
        attention_width=heads * attention_head_width(config),
        local=local,
    )


# layer kinds of a config's layer_types with no softmax attention: linear attention (Qwen3-Next's gated DeltaNet,
# MiniMax), state-space mixers (Jamba's and Bamba's Mamba; transformers 5 writes them "linear_attention" too),
# convolutions (LFM2), and Nemotron-H's layers of a feed-forward block alone
NO_SOFTMAX_ATTENTION = frozenset({"linear_attention", "mamba", "conv", "mlp", "moe"})


def attention_layers(config) -> tuple[int, tuple[tuple[str, int, int], ...]]:
    """(layers of full causal attention, local ones as ``FlopSpec.local``) by the config's ``layer_types``. A
    config without them has every layer alike: sliding where it gives a ``sliding_window`` (Mistral v0.1's 4096,
    Phi-3's 2047) and does not switch it off (``use_sliding_window: false``), else full. A kind not known here
    counts as full attention (as "hybrid", Falcon-H1's attention beside a Mamba mixer)."""
    layers = getattr(config, "num_hidden_layers", 0)
    window, chunk = getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    if getattr(config, "model_type", None) == "gpt_neo":  # its "global" and "local" layers (window_size)
        window, types = getattr(config, "window_size", None), getattr(config, "attention_layers", None)
        types = [{"local": "sliding_attention", "global": "full_attention"}.get(t, t) for t in types or ()]
    window = window if isinstance(window, int) and window > 0 else None
    if not isinstance(types, (list, tuple)) or not types:
        if window and getattr(config, "use_sliding_window", True) is not False:
            return 0, (("window", window, layers),)
        return layers, ()
    full, local = 0, {}
    for kind in types:
        if kind == "sliding_attention" and window:
            local[("window", window)] = local.get(("window", window), 0) + 1
        elif kind == "chunked_attention" and isinstance(chunk, int) and chunk > 0:
            local[("chunk", chunk)] = local.get(("chunk", chunk), 0) + 1
        elif kind not in NO_SOFTMAX_ATTENTION:
            full += 1
    return full, tuple((kind, size, n) for (kind, size), n in local.items())


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


def _visible(n: torch.Tensor | int, local: tuple[str, int] | None = None):
    """Visible (query, key) pairs of a causal sequence of ``n`` tokens: n(n+1)/2; under a sliding window of w
    (transformers: a key within the last w positions, the query's own included) min(i+1, w) for the i-th token;
    under chunks of c (Llama 4) the causal pairs inside each chunk."""
    if local is None:
        return _causal(n)
    kind, size = local
    if kind == "window":
        seen = torch.clamp(n, max=size) if isinstance(n, torch.Tensor) else min(n, size)
        return _causal(seen) + (n - seen) * size
    return (n // size) * _causal(size) + _causal(n % size)


def attention_pairs(batch: dict, packing: str, local: tuple[str, int] | None = None) -> int | torch.Tensor:
    """Visible (query, key) pairs of a batch's causal attention, in the layout that is run; ``local``: those of a
    layer that sees a local span, ("window", sliding_window) or ("chunk", size) (``_visible``).

    none / packed: every sequence is ``prompt + response``, causal: L(L+1)/2 pairs. prefix_shared:
    the prompt once, and each response sees the prompt plus its own earlier tokens (the positions, and so the
    window and chunks, of the sequence it stands for). For the padded layout the count is a 0-dim tensor on the
    batch's device (reading it would wait for the device); the packed layouts count from their plain-int
    ``segments``."""
    if packing == "none":
        return _visible(batch["attention_mask"].sum(1), local).sum()
    total = 0
    for p, c, r in batch["segments"]:
        total += _visible(p + c, local) + _visible(p + r, local)
        if packing == "prefix_shared":
            total -= _visible(p, local)
    return int(total)


def matmul_precision(mixed_precision: str, model: torch.nn.Module) -> str:
    """The precision a step's matrix products run in, for the peak they are held against: the autocast's (``bf16``,
    ``fp16``), else that of most of the weights, which then compute in their own dtype (a bf16 model trained with
    ``mixed_precision=no`` under ``master_weights=model``, LoRA on a bf16 base: no MFU was reported for them)."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        sizes[p.dtype] = sizes.get(p.dtype, 0) + full_numel(p)
    most = max(sizes, key=sizes.get) if sizes else None
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(most, mixed_precision)


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
