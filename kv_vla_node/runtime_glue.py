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
    """Load the checkpoint at ``settings.model_path`` into an ``EpisodeRuntime``.

    The cache starts with the node's cache parameters; ``chunk_size`` 0 is the model's tokens per
    control step. An empty ``gate_path`` uses ``<model_path>/gate.safetensors`` when it exists.
    Raises ValueError (the node does not start) for cache parameters no instruction could run with.
    """
    import torch

    from kv_vla import runtime as kv_runtime
    from kv_vla.cache import EpisodeCacheConfig

    model_path = resolve_model_path(settings.model_path)
    gate_path = resolve_model_path(settings.gate_path) if settings.gate_path else None
    if gate_path is None:
        gate_path = kv_runtime.shipped_gate(model_path)
    from kv_vla_node.params import check_cache_change, prompt_layout

    # refuse bad cache parameters before loading anything, with the reason
    EpisodeCacheConfig(**cache_kwargs(settings.cache))
    runtime = kv_runtime.EpisodeRuntime.from_pretrained(
        model_path,
        device=settings.device,
        dtype=getattr(torch, settings.dtype),
        gate_path=gate_path,
        trust_remote_code=settings.trust_remote_code,
    )
    # Every field, so the node's values replace the runtime's defaults (validated, ValueError if not).
    runtime.update_cache_config(**cache_kwargs(settings.cache))
    # A budget that cannot hold even the shortest prompt would refuse every instruction: refuse it
    # now, at startup, instead of logging "ready".
    pinned, step = prompt_layout(runtime, running=False, pinned_tokens=None)
    reason = check_cache_change(settings.cache, {}, pinned, step)
    if reason:
        raise ValueError(f"invalid parameters: {reason}")
    return runtime
