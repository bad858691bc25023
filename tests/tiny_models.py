"""Tiny seeded random causal LMs for tests (built from a config; never a download)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def tiny_llama_config(vocab_size: int = 64, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                      kv_heads: int = 2, max_positions: int = 256, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        tie_word_embeddings=False, **extra,
    )


def random_model(config, seed: int, dtype: torch.dtype = torch.float32, init_std: float | None = None) -> torch.nn.Module:
    """A seeded random causal LM built from a config (tests; never a download)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if init_std is not None:
            config.initializer_range = init_std
        model = AutoModelForCausalLM.from_config(config).to(dtype).eval() if not isinstance(config, LlamaConfig) \
            else LlamaForCausalLM(config).to(dtype).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def perturbed_copy(model: torch.nn.Module, noise: float, seed: int) -> torch.nn.Module:
    """A draft that agrees with the target often but not always: the target plus seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    copy = type(model)(model.config).to(next(model.parameters()).dtype).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * noise * p.float().std().clamp(min=1e-3))
    return copy

