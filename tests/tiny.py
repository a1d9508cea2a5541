"""A tiny Llama saved as a hub model is (config.json, safetensors weights, the tiny tokenizer), for the tests that
point model.path, tokenizer_path or scorer.path at a local directory."""

from __future__ import annotations

from pathlib import Path


def save_tiny_llama(path: Path, model_class=None, seed: int = 0, **shape):
    """Save a randomly initialised Llama (``model_class``, LlamaForCausalLM by default; e.g.
    LlamaForSequenceClassification with ``num_labels=1`` for a reward model) of ``shape`` (LlamaConfig keys over a
    one-layer, 32-wide default) and the tiny tokenizer into ``path``; return the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_exp.model import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    default = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    shape = default | {"num_key_value_heads": shape.get("num_attention_heads", 2)} | shape
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    (model_class or LlamaForCausalLM)(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer
