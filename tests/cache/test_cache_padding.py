"""Padded batches stay exact after eviction: padding flags follow the kept columns."""

from __future__ import annotations

import pytest
import torch

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig
from kv_vla.cache.testing import EpisodeRecord, reference_masks, tiny_model

PAD = 3  # row 0 is left-padded by 3 tokens, row 1 is not


@torch.no_grad()
def _padded_episode(model, cache, steps: int = 8, obs: int = 12, decode: int = 3):
    """Prompt + per step an observation and greedy decodes, batch 2, a 2-D mask grown as generate does."""
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 96, (2, 10), generator=gen)
    flags = torch.ones(2, 10, dtype=torch.long)
    flags[0, :PAD] = 0
    record = EpisodeRecord()
    ids = prompt

    def forward(block):
        nonlocal flags
        start = cache.get_seq_length()
        record.kept_before.append(cache.kept_positions())
        record.blocks.append((start, start + block.shape[1]))
        if start:
            flags = torch.cat([flags, torch.ones(2, block.shape[1], dtype=torch.long)], dim=1)
        pos = torch.arange(start, start + block.shape[1]).expand(2, -1)
        out = model(
            input_ids=block, attention_mask=flags, position_ids=pos, past_key_values=cache, use_cache=True
        )
        record.logits.append(out.logits)
        return out.logits

    forward(prompt)
    cache.pin_prefix()
    for _ in range(steps):
        block = torch.randint(0, 96, (2, obs), generator=gen)
        ids = torch.cat([ids, block], dim=1)
        logits = forward(block)
        for _ in range(decode):
            nxt = logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, nxt], dim=1)
            logits = forward(nxt)
    return record, ids, flags


@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 20)])
def test_padded_batch_with_eviction_equals_masked_reference(family, window):
    model = tiny_model(family, window=window)
    cfg = EpisodeCacheConfig(policy="window", chunk_size=15, recent_chunks=1)
    cache = EpisodeCache(cfg, model.config)
    record, ids, flags = _padded_episode(model, cache)
    assert cache.stats().evicted_tokens > 0
    mask = reference_masks(model, record, padding=flags)
    pos = torch.arange(ids.shape[1]).expand(2, -1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    got = torch.cat(record.logits, dim=1)
    # pad queries attend to nothing in either; compare the real tokens (float32, same process: 1e-5)
    assert (got[0, PAD:] - ref[0, PAD:]).abs().max().item() <= 1e-5
    assert (got[1] - ref[1]).abs().max().item() <= 1e-5
    # the bound bites: ignoring the padding flags after eviction is far off
    unpadded = reference_masks(model, record).expand(2, -1, -1, -1)
    with torch.no_grad():
        wrong = model(input_ids=ids, attention_mask=unpadded, position_ids=pos, use_cache=False).logits
    assert (wrong[0, PAD:] - ref[0, PAD:]).abs().max().item() > 1e-3
