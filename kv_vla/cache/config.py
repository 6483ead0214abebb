"""Configuration of the chunked episode KV cache.

One validated dataclass carries every knob the runtime (and the ROS node's live parameters) may
change. Validation names the field and the allowed values so a refused parameter update can be
reported to the operator verbatim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kv_vla.cache.positions import check_mode


@dataclass
class EpisodeCacheConfig:
    """Knobs of :class:`kv_vla.cache.EpisodeCache`.

    Attributes:
        policy: eviction policy name, a key of ``kv_vla.cache.policies.POLICIES``.
        chunk_size: tokens per chunk (default: the tokens of one control step).
        recent_chunks: newest complete chunks that are never evicted (forced to 0 by ``none``).
        sink_tokens: first tokens after the pinned prefix that are never evicted (StreamingLLM).
        max_tokens: hard budget of kept tokens between forward calls, or None for no budget. It must
            leave room for the pinned prefix, the sinks, the recent chunks and one open chunk; that
            is checked once the prefix is known (``pin_prefix``).
        gate_threshold: chunks whose utility is under this value are evicted (``gated`` policy).
        seed: seeds the ``random`` policy and the default (untrained) gate.
        probe_queries: newest queries per forward whose attention mass the attention probe
            measures (SnapKV's observation window); only used when the probe is enabled.
        positions: ``"episode"`` (kept tokens keep their episode positions; position ids grow with
            the episode) or ``"cache"`` (StreamingLLM: positions within the cache, bounded; RoPE
            models only). See :mod:`kv_vla.cache.positions`. A change applies from the next episode.
        extra: free-form options for extensions (e.g. low-precision storage), validated by them.
    """

    policy: str = "full"
    chunk_size: int = 16
    recent_chunks: int = 2
    sink_tokens: int = 0
    max_tokens: int | None = None
    gate_threshold: float = 0.5
    seed: int = 0
    probe_queries: int = 16
    positions: str = "episode"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> EpisodeCacheConfig:
        """Raise ValueError naming the offending field and its allowed values; return self."""
        from kv_vla.cache.policies import POLICIES

        if self.policy not in POLICIES:
            raise ValueError(f"policy: unknown policy {self.policy!r}; allowed values: {sorted(POLICIES)}")
        _check_int("chunk_size", self.chunk_size, minimum=1)
        _check_int("recent_chunks", self.recent_chunks, minimum=0)
        _check_int("sink_tokens", self.sink_tokens, minimum=0)
        _check_int("seed", self.seed, minimum=None)
        _check_int("probe_queries", self.probe_queries, minimum=1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1, none_ok=True)
        if isinstance(self.gate_threshold, bool) or not isinstance(self.gate_threshold, (int, float)):
            raise ValueError(
                f"gate_threshold: must be a number in [0, 1]; got {self.gate_threshold!r} (allowed values: [0, 1])"
            )
        if not 0.0 <= float(self.gate_threshold) <= 1.0:
            raise ValueError(f"gate_threshold: {self.gate_threshold} is outside the allowed values [0, 1]")
        check_mode(self.positions)
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra: must be a dict; got {type(self.extra).__name__}")
        POLICIES[self.policy].validate_config(self)
        return self

    def replace(self, **changes: Any) -> EpisodeCacheConfig:
        """Return a validated copy with ``changes`` applied (unknown field names raise ValueError)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown cache option; allowed fields: {sorted(names)}")
        return dataclasses.replace(self, **changes)  # __post_init__ validates

    @property
    def effective_recent_chunks(self) -> int:
        """Recent chunks the policy really protects (``none`` forces 0)."""
        return self.recent_chunks if _policy_class(self.policy).keeps_recent else 0

    @property
    def effective_sink_tokens(self) -> int:
        """Sink tokens the policy really protects (``full``, ``none`` and ``window`` force 0)."""
        return self.sink_tokens if _policy_class(self.policy).uses_sinks else 0

    def min_budget(self, pinned_tokens: int) -> int:
        """Smallest ``max_tokens`` that can hold the prefix, sinks, recent chunks and an open chunk."""
        return (
            pinned_tokens + self.effective_sink_tokens + (self.effective_recent_chunks + 1) * self.chunk_size
        )

    def check_budget(self, pinned_tokens: int) -> None:
        """Raise ValueError if ``max_tokens`` cannot hold what must never be evicted."""
        if self.max_tokens is None:
            return
        need = self.min_budget(pinned_tokens)
        if self.max_tokens < need:
            raise ValueError(
                f"max_tokens: {self.max_tokens} is smaller than what is never evicted "
                f"({pinned_tokens} pinned prefix + {self.effective_sink_tokens} sink tokens + recent chunks and the "
                f"open chunk); allowed values: None or an int >= {need}"
            )


def _policy_class(policy: str) -> type:
    from kv_vla.cache.policies import POLICIES

    return POLICIES[policy]


def _check_int(name: str, value: Any, minimum: int | None, none_ok: bool = False) -> None:
    allowed = (
        "any integer" if minimum is None else f"an integer >= {minimum}" + (" or None" if none_ok else "")
    )
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be {allowed}; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: {value} is not allowed; allowed values: {allowed}")
