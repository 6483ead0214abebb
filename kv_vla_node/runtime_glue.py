"""Translate the node's parameters into the core's cache config (``kv_vla.cache.EpisodeCacheConfig``).

Kept apart from the node so that the node module stays about ROS and this one about the core API;
loading the runtime is ``runtime_factory``'s job.
"""

from __future__ import annotations

from typing import Any


def cache_kwargs(
    node_values: dict[str, Any], step_tokens: int | None = None, active: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Node parameter values -> ``EpisodeCacheConfig`` / ``update_cache_config`` keyword arguments.

    The names are the same (``kv_vla.settings``), and so are the meanings (``chunk_size`` 0 = one
    control step, ``max_tokens`` 0 = no budget): this only drops the parameters that are not cache
    knobs. Each policy reads its own options, so nothing is re-mapped when the policy changes.
    ``step_tokens`` and ``active`` are accepted for callers of the older signature and unused.
    """
    from kv_vla_node.params import CACHE_KEYS

    return {k: v for k, v in node_values.items() if k in CACHE_KEYS}
