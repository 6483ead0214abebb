"""Translate the node's parameters into the core's cache config (``kv_vla.cache.EpisodeCacheConfig``).

Kept apart from the node so that the node module stays about ROS and this one about the core API;
loading the runtime is ``runtime_factory``'s job.
"""

from __future__ import annotations

from typing import Any

# node parameter name -> EpisodeCacheConfig field
_FIELD = {
    "cache_policy": "policy",
    "chunk_size": "chunk_size",
    "gate_threshold": "gate_threshold",
    "recent_chunks": "recent_chunks",
    "max_tokens": "max_tokens",
}
# Policies that read ``EpisodeCacheConfig.extra`` (kv_vla.cache.policies.zipvl), and for each the node
# parameters it reads -> their ``extra`` key. Any other policy gets an empty ``extra``.
ZIPVL_POLICIES = ("zipvl", "gated_tiered")
_EXTRA = {
    "zipvl_tau": "tau",
    "zipvl_low_bits": "low_bits",
    "zipvl_group_size": "quant_group_size",
    "tiered_full_threshold": "full_threshold",
}
_POLICY_EXTRA = {
    "zipvl": ("zipvl_tau", "zipvl_low_bits", "zipvl_group_size"),
    "gated_tiered": ("zipvl_low_bits", "zipvl_group_size", "tiered_full_threshold"),
}


def cache_extra(policy: str, node_values: dict[str, Any]) -> dict[str, Any]:
    """``EpisodeCacheConfig.extra`` for ``policy``: its ZipVL options, or ``{}`` for other policies.

    A value missing from ``node_values`` takes the parameter's declared default (= zipvl's default).
    """
    from kv_vla_node.params import SPECS

    names = _POLICY_EXTRA.get(policy, ())
    return {_EXTRA[n]: node_values.get(n, SPECS[n].default) for n in names}


def cache_kwargs(
    node_values: dict[str, Any], step_tokens: int | None = None, active: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Node parameter values -> ``EpisodeCacheConfig`` keyword arguments.

    ``max_tokens`` 0 means unbounded (None), and it is ignored under ``full``; ``chunk_size`` 0 means the tokens of one control step
    (``step_tokens``, the runtime's image + action tokens), or the config's default when unknown.
    When ``node_values`` holds ``cache_policy`` or a ZipVL option, ``extra`` is rebuilt whole for the
    policy of ``{**active, **node_values}`` (``active``: the cache parameters now in force), because
    ``extra`` is replaced, not merged, and another policy must not receive ZipVL's options.
    """
    out: dict[str, Any] = {}
    for name, value in node_values.items():
        if name not in _FIELD:
            continue
        if name == "max_tokens" and value == 0:
            value = None
        if name == "chunk_size" and value == 0:
            if step_tokens is None:
                continue
            value = int(step_tokens)
        out[_FIELD[name]] = value
    merged = {**(active or {}), **node_values}
    if any(n == "cache_policy" or n in _EXTRA for n in node_values) and "cache_policy" in merged:
        out["extra"] = cache_extra(merged["cache_policy"], merged)
    if merged.get("cache_policy") == "full":
        # `full` keeps everything and the cache refuses a budget for it; a budget in the shared YAML
        # (tuned for the bounded policies) must not stop a node started with cache_policy:=full
        out["max_tokens"] = None
    return out


def check_cache_values(
    node_values: dict[str, Any], step_tokens: int | None = None, pinned_tokens: int | None = None
) -> str | None:
    """Why this full set of cache parameters is not a valid ``EpisodeCacheConfig`` (None if it is).

    With ``pinned_tokens`` (the running episode's prompt) the budget is also checked against it, so
    a chunk size or budget that cannot hold the prompt, the recent chunks and the open chunk is
    refused when it is set rather than at the next episode start.
    """
    from kv_vla.cache import EpisodeCacheConfig

    try:
        config = EpisodeCacheConfig(**cache_kwargs(node_values, step_tokens))
    except (ValueError, TypeError) as exc:
        return str(exc)
    if pinned_tokens is not None:
        try:
            config.check_budget(pinned_tokens)
        except ValueError as exc:
            return f"with the running episode's {pinned_tokens}-token prompt: {exc}"
    return None
