"""Build the node's ``EpisodeRuntime`` from its read-only settings (torch is imported lazily here).

The node takes a ``RuntimeFactory`` so a test can wrap the real runtime to inject a fault that the
real parts cannot produce on demand; the default is ``build_runtime``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kv_vla_node.runtime_glue import cache_kwargs


@dataclass
class RuntimeSettings:
    """What a runtime factory needs: the read-only model settings and the cache parameters."""

    model_path: str
    device: str
    dtype: str
    gate_path: str
    cache: dict[str, Any] = field(default_factory=dict)  # node parameter names (params.CACHE_KEYS)
    trust_remote_code: bool = False
    compile: bool = False  # kv_vla.settings "compile": the decoder step compiled over static storage


RuntimeFactory = Callable[[RuntimeSettings], Any]


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
    Raises ValueError (configure fails) for cache parameters no instruction could run with.
    """
    import torch

    from kv_vla import runtime as kv_runtime
    from kv_vla.cache import EpisodeCacheConfig
    from kv_vla_node.params import check_cache_change, prompt_layout

    model_path = resolve_model_path(settings.model_path)
    gate_path = resolve_model_path(settings.gate_path) if settings.gate_path else None
    if gate_path is None:
        gate_path = kv_runtime.shipped_gate(model_path)
    # refuse bad cache parameters before loading anything, with the reason
    EpisodeCacheConfig(**cache_kwargs(settings.cache))
    runtime = kv_runtime.EpisodeRuntime.from_pretrained(
        model_path,
        device=settings.device,
        dtype=getattr(torch, settings.dtype),
        gate_path=gate_path,
        trust_remote_code=settings.trust_remote_code,
    )
    runtime.warn_positions = False  # the node reports out-of-range positions itself (logger, /diagnostics)
    # Every field, so the node's values replace the runtime's defaults (validated, ValueError if not).
    runtime.update_cache_config(**cache_kwargs(settings.cache))
    if settings.compile:
        runtime.set_compile(True)  # ValueError naming the setting when the cache cannot be compiled
        # every shape compiles here, at configure, not in the first episode's control steps
        runtime.warm_up()
    # A budget that cannot hold even the shortest prompt would refuse every instruction: refuse it
    # now, at configure, instead of going active.
    pinned, step = prompt_layout(runtime, running=False, pinned_tokens=None)
    reason = check_cache_change(settings.cache, {}, pinned, step)
    if reason:
        raise ValueError(f"invalid parameters: {reason}")
    return runtime


def policy_names() -> tuple[str, ...] | None:
    """The registered cache policies, or None (no registry check) when the cache room is absent."""
    try:
        from kv_vla.cache import POLICIES
    except ImportError:
        return None
    return tuple(POLICIES)


def runtime_stats(runtime: Any) -> Any:
    """The runtime's cache stats right after a reset (None when it exposes no cache)."""
    cache = getattr(runtime, "cache", None)
    try:
        return cache.stats() if cache is not None else None
    except Exception:
        return None
