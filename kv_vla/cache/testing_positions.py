"""References for ``cache`` positions (StreamingLLM re-indexing), shared by tests and benchmarks.

In ``cache`` mode a forward sees the kept tokens at positions ``0..n-1`` and its own block after
them. Two references, each independent of :class:`kv_vla.cache.EpisodeCache`:

* :func:`kept_sequence_logits`: one uncached forward of just the kept token ids followed by the
  block, at positions ``0..``. A kept token's layer-0 key and value depend only on its id and
  position, so this is exact for a **one-layer** model; in deeper layers a kept token carries the
  context it was computed with (which may since have been evicted), so no single forward is.
* :func:`replay_logits`: any depth. It replays the episode with a plain ``DynamicCache`` built per
  forward from every kept token's recorded per-layer key and value, each key moved from the
  position it was computed at to its new column by a float64 complex rotation with the model's own
  ``rotary_emb.inv_freq``.
"""

from __future__ import annotations

import torch

from kv_vla.cache.testing import EpisodeRecord


@torch.no_grad()
def kept_sequence_logits(model: torch.nn.Module, record: EpisodeRecord) -> list[torch.Tensor]:
    """Per forward, the logits ``[1, block, vocab]`` of ``ids[kept] + block`` at positions ``0..``."""
    out = []
    for (start, end), kept in zip(record.blocks, record.kept_before):
        ids = [record.ids[int(p)] for p in kept] + record.ids[start:end]
        pos = torch.arange(len(ids)).unsqueeze(0)
        logits = model(input_ids=torch.tensor([ids]), position_ids=pos, use_cache=False).logits
        out.append(logits[:, len(kept) :])
    return out


def _inv_freq(model: torch.nn.Module) -> torch.Tensor:
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module.inv_freq.detach().double().cpu()
    raise ValueError("model: no rotary embedding module found")


def _move(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``keys [B, H, n, D]`` by ``delta [n]`` positions: rotate-half pairs as complex numbers."""
    k = keys.double()
    half = k.shape[-1] // 2
    z = torch.complex(k[..., :half], k[..., half:])
    angle = delta.double()[:, None] * inv_freq
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).to(keys.dtype)


@torch.no_grad()
def replay_logits(model: torch.nn.Module, record: EpisodeRecord) -> list[torch.Tensor]:
    """Per forward, the logits of its block with the kept tokens re-indexed to ``0..n-1`` (any depth)."""
    from transformers import DynamicCache

    inv_freq = _inv_freq(model)
    n_layers = model.config.get_text_config().num_hidden_layers
    held: dict[int, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}  # token -> (pos, per layer)
    out = []
    for (start, end), kept in zip(record.blocks, record.kept_before):
        cache = DynamicCache(config=model.config)
        n = int(kept.numel())
        if n:
            origin = torch.tensor([held[int(t)][0] for t in kept])
            delta = torch.arange(n) - origin
            for layer in range(n_layers):
                k = torch.cat([held[int(t)][1][layer][0] for t in kept], dim=2)
                v = torch.cat([held[int(t)][1][layer][1] for t in kept], dim=2)
                cache.update(_move(k, delta, inv_freq), v, layer)
        pos = torch.arange(n, n + end - start).unsqueeze(0)
        ids = torch.tensor([record.ids[start:end]])
        out.append(model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits)
        for i, token in enumerate(range(start, end)):
            per_layer = [
                (
                    cache.layers[layer].keys[:, :, n + i : n + i + 1],
                    cache.layers[layer].values[:, :, n + i : n + i + 1],
                )
                for layer in range(n_layers)
            ]
            held[token] = (n + i, per_layer)
    return out
