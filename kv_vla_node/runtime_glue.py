"""Translate the node's parameters into the core's cache config and build the ``EpisodeRuntime``.

Kept apart from the node so that the node module stays about ROS and this one stays about the core
API (``kv_vla.cache.EpisodeCacheConfig``, ``kv_vla.runtime.EpisodeRuntime``); torch is imported here
only, lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kv_vla_node.vla_node import RuntimeSettings

# node parameter name -> EpisodeCacheConfig field
_FIELD = {
    "cache_policy": "policy",
    "chunk_size": "chunk_size",
    "gate_threshold": "gate_threshold",
    "recent_chunks": "recent_chunks",
    "max_tokens": "max_tokens",
}


def cache_kwargs(node_values: dict[str, Any]) -> dict[str, Any]:
    """Node parameter values -> ``EpisodeCacheConfig`` keyword arguments.

    ``max_tokens`` 0 means unbounded (None); ``chunk_size`` 0 means the config's default (the tokens
    of one control step), so the key is left out.
    """
    out: dict[str, Any] = {}
    for name, value in node_values.items():
        if name not in _FIELD:
            continue
        if name == "max_tokens" and value == 0:
            value = None
        if name == "chunk_size" and value == 0:
            from kv_vla.cache import EpisodeCacheConfig

            value = EpisodeCacheConfig.__dataclass_fields__["chunk_size"].default
        out[_FIELD[name]] = value
    return out


def check_cache_values(node_values: dict[str, Any]) -> str | None:
    """Why this full set of cache parameters is not a valid ``EpisodeCacheConfig`` (None if it is)."""
    from kv_vla.cache import EpisodeCacheConfig

    try:
        EpisodeCacheConfig(**cache_kwargs(node_values))
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def resolve_model_path(path: str) -> str:
    """A relative model path is taken from the working directory, else from the kv_vla checkout.

    ``ros2 launch`` starts nodes in an arbitrary directory; the default ``models/compact-vla`` must
    still find the shipped checkpoint of an editable install.
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    repo_copy = Path(__file__).resolve().parents[1] / candidate
    return str(repo_copy if repo_copy.exists() else candidate)


def build_runtime(settings: RuntimeSettings) -> Any:
    """Load the checkpoint at ``settings.model_path`` into an ``EpisodeRuntime``."""
    import torch

    from kv_vla import runtime as kv_runtime
    from kv_vla.cache import EpisodeCacheConfig

    config = EpisodeCacheConfig(**cache_kwargs(settings.cache))
    runtime = kv_runtime.EpisodeRuntime.from_pretrained(
        resolve_model_path(settings.model_path),
        cache_config=config,
        device=settings.device,
        dtype=getattr(torch, settings.dtype),
    )
    if settings.gate_path:
        from kv_vla.cache import ChunkGate

        runtime.set_gate(ChunkGate.load(resolve_model_path(settings.gate_path)))
    return runtime
