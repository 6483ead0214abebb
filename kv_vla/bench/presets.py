"""Decoder shapes the cache benchmark runs: random Llama models built directly on the device."""

from __future__ import annotations

from typing import Any

import torch


def preset_config(preset: str) -> Any:
    """The decoder shape of a preset: ``small`` (CPU) or ``openvla-7b`` (Llama-2-7B shape, 32064 vocab)."""
    from transformers import LlamaConfig

    if preset == "small":
        return LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=2048,
            max_position_embeddings=65536,
        )
    if preset == "openvla-7b":
        return LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=65536,
        )
    raise ValueError(f"preset: unknown {preset!r}; allowed values: ['small', 'openvla-7b']")


def build_model(preset: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random model of the preset's shape, created directly on ``device`` in ``dtype``.

    Building under ``torch.device(device)`` with the default dtype set avoids materialising a 7B
    model in float32 on the CPU first.
    """
    from transformers import LlamaForCausalLM

    config = preset_config(preset)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()  # parameters were created in `dtype` on `device`; RoPE buffers stay float32
