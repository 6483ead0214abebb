"""How an episode cache's layers hold keys and values, chosen when the cache is built.

``dynamic`` (the default, :class:`kv_vla.cache.episode_cache.EpisodeLayer`): kept columns
concatenated per forward, selected on eviction; works for every policy. ``static``
(:class:`kv_vla.cache.storage.static.StaticLayer`): preallocated slots for a bounded policy, so a
steady-state step allocates no KV tensor and keeps its shapes (for ``torch.compile`` / CUDA graphs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kv_vla.cache.config import EpisodeCacheConfig

STORAGES = ("dynamic", "static")


def token_bound(config: EpisodeCacheConfig, pinned_tokens: int) -> int | None:
    """Most tokens the policy keeps between forwards, or None when it is unbounded.

    ``max_tokens`` bounds any policy; without it, a policy that evicts every chunk outside its
    protected window (``window``, ``sinks``, ``none``) keeps at most what is never evicted.
    """
    from kv_vla.cache.policies import POLICIES

    budget = config.effective_max_tokens  # ``full`` never evicts: a budget does not bound it
    if budget is not None:
        return int(budget)
    if getattr(POLICIES[config.policy], "bounded_by_window", False):
        return config.min_budget(pinned_tokens)
    return None


def capacity(config: EpisodeCacheConfig, pinned_tokens: int) -> int:
    """Slots a static layer preallocates: the bound plus one chunk (a forward's own block).

    A larger block (or a live budget increase) grows the buffers once (``StaticLayer.grows``).
    """
    bound = token_bound(config, pinned_tokens)
    if bound is None:
        raise ValueError(static_refusal(config) or "storage: 'static' needs a bounded policy")
    return bound + config.chunk_size


def static_refusal(config: EpisodeCacheConfig) -> str | None:
    """Why ``storage='static'`` cannot serve ``config`` (a message naming what to change), or None."""
    from kv_vla.cache.policies import POLICIES

    cls = POLICIES[config.policy]
    if getattr(cls, "low_precision", False):
        return (
            f"storage: 'static' is refused for policy {config.policy!r}: it holds chunks as packed "
            "low-bit codes, whose point is fewer bytes than a preallocated full-precision slot "
            "buffer holds; allowed values: storage='dynamic' for this policy"
        )
    if token_bound(config, 0) is None:
        return (
            f"storage: 'static' needs a bounded policy; {config.policy!r} with max_tokens=None keeps an "
            "unbounded number of tokens; allowed values: storage='dynamic', or set max_tokens (or use "
            "window, sinks or none)"
        )
    return None


def layer_class(storage: str) -> type:
    """The layer class of ``storage`` (a name in :data:`STORAGES`)."""
    if storage == "static":
        from kv_vla.cache.storage.static import StaticLayer

        return StaticLayer
    if storage == "dynamic":
        from kv_vla.cache.storage.dynamic import EpisodeLayer

        return EpisodeLayer
    raise ValueError(f"storage: unknown {storage!r}; allowed values: {list(STORAGES)}")
