"""Tiny random decoders and the masked full-attention reference, shared by tests and benchmarks.

The reference is what the cache must equal: one forward over the whole token sequence without a
cache, where each token attends to exactly what the cache held when that token was processed
(the kept positions at the start of its forward, plus the earlier tokens of its own block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gemma")


def tiny_config(
    family: str,
    hidden: int = 32,
    layers: int = 2,
    vocab: int = 96,
    attn: str = "sdpa",
    window: int | None = None,
):
    """A tiny float32 decoder config of ``family`` (GQA: 4 query heads, 2 kv heads); ``window``
    makes every Mistral layer a sliding-window layer."""
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=8192,
        attn_implementation=attn,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=window)
    if family == "gemma":
        return GemmaConfig(**common, head_dim=hidden // 4)
    raise ValueError(f"family: unknown {family!r}; allowed values: {list(FAMILIES)}")


def tiny_model(family: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A seeded tiny random ``*ForCausalLM`` in float32 eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@dataclass
class EpisodeRecord:
    """What happened in a cached episode: every forward's block and what the cache held for it."""

    blocks: list[tuple[int, int]] = field(default_factory=list)  # [start, end) positions per forward
    kept_before: list[torch.Tensor] = field(default_factory=list)  # kept positions at its start
    logits: list[torch.Tensor] = field(default_factory=list)  # [1, n, vocab] per forward
    ids: list[int] = field(default_factory=list)  # every token of the episode


def reference_mask(
    record: EpisodeRecord,
    dtype: torch.dtype = torch.float32,
    window: int | None = None,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive 4-D mask ``[B, 1, N, N]``: row p sees the kept positions of its forward + its block
    prefix; with ``window`` only those within ``window`` of p (a sliding layer); with ``padding``
    (``[B, N]``, 0 = pad) never a pad token."""
    n = record.blocks[-1][1]
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for (start, end), kept in zip(record.blocks, record.kept_before):
        if kept.numel():
            allowed[start:end, kept] = True
        block = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        allowed[start:end, start:end] = block
    if window is not None:
        pos = torch.arange(n)
        allowed &= pos[None, :] > pos[:, None] - window
    allowed = allowed[None, None]
    if padding is not None:
        allowed = allowed & padding.bool()[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask


def reference_masks(model: torch.nn.Module, record: EpisodeRecord, padding: torch.Tensor | None = None):
    """What to pass as ``attention_mask``: one 4-D mask, or one per layer type for hybrid models."""
    from kv_vla.cache.compat import layer_windows, text_config

    cfg = text_config(model.config)
    dtype = next(model.parameters()).dtype
    windows = {w for w in layer_windows(cfg) if w is not None}
    if len(windows) > 1:
        raise ValueError(f"model_config: several sliding windows {sorted(windows)}; the reference takes one")
    full = reference_mask(record, dtype, padding=padding)
    if not windows:
        return full
    sliding = reference_mask(record, dtype, window=windows.pop(), padding=padding)
    if not getattr(cfg, "layer_types", None):
        return sliding  # every layer slides (Mistral-style config)
    return {"full_attention": full, "sliding_attention": sliding}


@torch.no_grad()
def reference_logits(model: torch.nn.Module, record: EpisodeRecord) -> torch.Tensor:
    """Logits ``[1, N, vocab]`` of one uncached forward under :func:`reference_masks`."""
    ids = torch.tensor([record.ids])
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    mask = reference_masks(model, record)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


@torch.no_grad()
def run_episode(
    model: torch.nn.Module,
    cache,
    prompt: Sequence[int],
    steps: int,
    obs_tokens: int,
    decode_tokens: int,
    seed: int = 0,
    on_step=None,
) -> EpisodeRecord:
    """Drive ``cache`` like the runtime: prompt (pinned), then per step an observation block and
    ``decode_tokens`` greedy tokens, each forward with explicit ``position_ids`` from
    ``get_seq_length()``; the record numbers tokens in episode order whatever the position mode."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    record = EpisodeRecord()

    def forward(ids: list[int]) -> torch.Tensor:
        start = len(record.ids)  # episode position of the block (records are kept in episode order)
        kept = cache.kept_positions() if hasattr(cache, "kept_positions") else torch.arange(start)
        record.kept_before.append(kept)
        record.blocks.append((start, start + len(ids)))
        record.ids.extend(ids)
        first = cache.get_seq_length()  # the model's next position id (either position mode)
        pos = torch.arange(first, first + len(ids)).unsqueeze(0)
        mask = cache.attention_mask(len(ids)) if hasattr(cache, "attention_mask") else None  # static storage
        out = model(
            input_ids=torch.tensor([ids]),
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        record.logits.append(out.logits)
        return out.logits

    forward(list(prompt))
    if hasattr(cache, "pin_prefix"):
        cache.pin_prefix()
    for step in range(steps):
        obs = torch.randint(0, vocab, (obs_tokens,), generator=gen).tolist()
        logits = forward(obs)
        for _ in range(decode_tokens):
            logits = forward([int(logits[0, -1].argmax())])
        if on_step is not None:
            on_step(step, cache)
    return record
