"""A lockstep reference for low-precision cache policies (``zipvl``, ``gated_tiered``).

Before every forward it takes the cache's decision (which chunks were evicted, which were stored at
low precision in which layer), applies it to its own full-precision copy of the KV (dropping
evicted columns, replacing low-precision chunks by ``dequantize(quantize(...))`` of its own
tensors), and runs the same block through a plain ``DynamicCache`` holding those tensors.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kv_vla.cache import EpisodeCache
from kv_vla.cache.quant import dequantize, quantize_keys, quantize_values
from kv_vla.cache.quant.store import balanced_group

PROMPT = list(range(3, 13))
STEPS, OBS, DECODE = 30, 12, 3
CHUNK = OBS + DECODE


class LockstepReference:
    """Full-precision KV mirror of an :class:`EpisodeCache`, quantised/evicted as the cache decides."""

    def __init__(self, cache: EpisodeCache, bits: int, group: int):
        self.cache, self.bits, self.group = cache, bits, group
        self.keys: list[torch.Tensor] | None = None
        self.values: list[torch.Tensor] | None = None
        self.positions = torch.empty(0, dtype=torch.long)
        self.low: set[tuple[int, int]] = set()  # (layer, chunk index) stored at low precision
        self.max_change = 0.0  # largest |dequantised - original| written into the reference

    def sync(self, kept: torch.Tensor) -> None:
        if self.keys is None:
            return
        index = torch.isin(self.positions, kept).nonzero().squeeze(1)
        assert torch.equal(self.positions[index], kept)
        self.positions = self.positions[index]
        self.keys = [k.index_select(2, index) for k in self.keys]
        self.values = [v.index_select(2, index) for v in self.values]
        for chunk in self.cache.chunks:
            if chunk.evicted:
                continue
            a = int(torch.searchsorted(self.positions, chunk.start))
            b = int(torch.searchsorted(self.positions, chunk.end))
            for layer, bits in enumerate(chunk.meta.get("layer_bits", [])):
                if bits < 16 and (layer, chunk.index) not in self.low:
                    assert bits == self.bits
                    self.low.add((layer, chunk.index))
                    k, v = self.keys[layer], self.values[layer]
                    dk = dequantize(quantize_keys(k[:, :, a:b], bits, balanced_group(b - a, self.group)))
                    dv = dequantize(
                        quantize_values(v[:, :, a:b], bits, balanced_group(v.shape[-1], self.group))
                    )
                    self.max_change = max(self.max_change, float((dk - k[:, :, a:b]).abs().max()))
                    k[:, :, a:b], v[:, :, a:b] = dk, dv

    def forward(self, model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        dc = DynamicCache()
        if self.keys is not None:
            for layer, (k, v) in enumerate(zip(self.keys, self.values)):
                dc.update(k, v, layer)
        out = model(input_ids=ids, position_ids=pos, past_key_values=dc, use_cache=True)
        self.keys = [dc.layers[i].keys for i in range(len(dc.layers))]
        self.values = [dc.layers[i].values for i in range(len(dc.layers))]
        self.positions = torch.cat([self.positions, pos[0]])
        return out.logits


@torch.no_grad()
def run_lockstep(model, cache: EpisodeCache, bits: int, group: int, seed: int = 1, steps: int = STEPS):
    """Drive ``cache`` like the runtime and the reference beside it; returns (max |diff|, logits)."""
    ref = LockstepReference(cache, bits, group)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    worst, all_logits = 0.0, []

    def forward(tokens: list[int]) -> torch.Tensor:
        nonlocal worst
        start = cache.get_seq_length()
        ref.sync(cache.kept_positions())  # kept_positions applies the pending decision first
        ids = torch.tensor([tokens])
        pos = torch.arange(start, start + len(tokens)).unsqueeze(0)
        expected = ref.forward(model, ids, pos)
        got = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits
        worst = max(worst, float((got - expected).abs().max()))
        all_logits.append(got)
        return got

    forward(PROMPT)
    cache.pin_prefix()
    for _ in range(steps):
        logits = forward(torch.randint(0, vocab, (OBS,), generator=gen).tolist())
        for _ in range(DECODE):
            logits = forward([int(logits[0, -1].argmax())])
    return worst, torch.cat(all_logits, dim=1), ref
