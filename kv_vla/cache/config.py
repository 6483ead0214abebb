"""Configuration of the chunked episode KV cache.

One flat dataclass carries every cache knob under its one name in :mod:`kv_vla.settings` (defaults
from there too). The cache's own fields are checked here; the policy's options are checked by the
policy's dataclass (kvpress style, looked up in :mod:`kv_vla.cache.registry`, so this module imports
no policy). Options of other policies ride along unread, so switching the policy live needs no
re-mapping. Refusals name the knob and the allowed values, so the node can report them verbatim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kv_vla import settings
from kv_vla.cache.positions import check_mode
from kv_vla.cache.registry import POLICIES

_D = settings.default


@dataclass
class EpisodeCacheConfig:
    """Knobs of :class:`kv_vla.cache.EpisodeCache`; each one's meaning is its ``kv_vla.settings`` help.

    ``chunk_size`` 0 is one control step: ``EpisodeRuntime`` resolves it at every ``reset``
    (:meth:`resolve`); a cache built directly needs it in tokens. ``max_tokens`` 0 or None: no budget.
    The budget must leave room for the pinned prefix, the sinks, the recent chunks and one open
    chunk; that is checked once the prefix is known (``pin_prefix``).
    """

    policy: str = _D("policy")
    chunk_size: int = _D("chunk_size")
    recent_chunks: int = _D("recent_chunks")
    sink_tokens: int = _D("sink_tokens")
    max_tokens: int | None = _D("max_tokens")
    seed: int = _D("seed")
    probe_queries: int = _D("probe_queries")
    positions: str = _D("positions")  # kv_vla.cache.positions
    storage: str = _D("storage")  # kv_vla.cache.storage
    gate_threshold: float = _D("gate_threshold")
    tau: float = _D("tau")
    low_bits: int = _D("low_bits")
    quant_group_size: int = _D("quant_group_size")
    full_threshold: float = _D("full_threshold")

    def __post_init__(self) -> None:
        if self.max_tokens == 0:
            self.max_tokens = None  # one meaning: no budget
        self.validate()

    def validate(self) -> EpisodeCacheConfig:
        """Raise ValueError naming the offending knob and its allowed values; return self."""
        if self.policy not in POLICIES:
            raise ValueError(f"policy: unknown policy {self.policy!r}; allowed values: {sorted(POLICIES)}")
        for name in settings.CACHE_SETTINGS:
            if name == "policy" or (name == "max_tokens" and self.max_tokens is None):
                continue
            reason = settings.check(name, getattr(self, name))
            if reason:
                raise ValueError(reason)
        self.policy_class.check_config(self)
        self.policy_class.from_config(self)  # the policy's dataclass checks its own options
        check_mode(self.positions)
        _check_storage(self)
        return self

    def replace(self, **changes: Any) -> EpisodeCacheConfig:
        """Return a validated copy with ``changes`` applied (unknown names raise ValueError)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown cache option; allowed fields: {sorted(names)}")
        return dataclasses.replace(self, **changes)  # __post_init__ validates

    def resolve(self, step_tokens: int) -> EpisodeCacheConfig:
        """This config with ``chunk_size`` 0 (one control step) replaced by ``step_tokens``."""
        if self.chunk_size != settings.ONE_STEP:
            return self
        return self.replace(chunk_size=int(step_tokens))

    @property
    def policy_class(self) -> Any:
        """The registered class of ``policy``."""
        return POLICIES[self.policy]

    @property
    def effective_recent_chunks(self) -> int:
        """Recent chunks the policy really protects (``none`` forces 0)."""
        return self.recent_chunks if self.policy_class.keeps_recent else 0

    @property
    def effective_sink_tokens(self) -> int:
        """Sink tokens the policy really protects (``full``, ``none`` and ``window`` force 0)."""
        return self.sink_tokens if self.policy_class.uses_sinks else 0

    @property
    def effective_max_tokens(self) -> int | None:
        """The budget the cache enforces (``full`` never evicts, so it has none)."""
        return self.max_tokens if self.policy_class.allows_budget else None

    def min_budget(self, pinned_tokens: int) -> int:
        """Smallest ``max_tokens`` that can hold the prefix, sinks, recent chunks and an open chunk."""
        if self.chunk_size == settings.ONE_STEP:
            raise ValueError("chunk_size: 0 (one control step) must be resolved first (resolve(step_tokens))")
        return (
            pinned_tokens + self.effective_sink_tokens + (self.effective_recent_chunks + 1) * self.chunk_size
        )

    @classmethod
    def evaluated(cls, gate: Any = None) -> EpisodeCacheConfig:
        """The evaluated setting: the ``kv_vla.settings`` defaults, with the settings a trained gate
        was evaluated with (``gate.settings``, from its ``.json``) on top."""
        return cls(**dict(getattr(gate, "settings", None) or {}))

    def check_prompt(self, prompt_tokens: int) -> None:
        """Refuse a prompt the budget cannot hold beside the sinks, recent chunks and open chunk:
        the one limit on instruction length (``max_instruction_chars`` only caps the message)."""
        room = self.prompt_room()
        if room is not None and prompt_tokens > room:
            raise ValueError(
                f"instruction: its prompt is {prompt_tokens} tokens, but max_tokens={self.max_tokens} leaves "
                f"room for {max(room, 0)} beside {self.effective_sink_tokens} sink tokens, "
                f"{self.effective_recent_chunks} recent chunks and the open chunk of {self.chunk_size} "
                "tokens; shorten the instruction or raise max_tokens"
            )

    def prompt_room(self) -> int | None:
        """Most prompt tokens the budget can hold beside the sinks, recent chunks and open chunk."""
        if self.effective_max_tokens is None:
            return None
        return self.effective_max_tokens - self.min_budget(0)

    def check_budget(self, pinned_tokens: int) -> None:
        """Raise ValueError if ``max_tokens`` cannot hold what must never be evicted."""
        budget = self.effective_max_tokens
        if budget is None:
            return
        need = self.min_budget(pinned_tokens)
        if budget < need:
            raise ValueError(
                f"max_tokens: {budget} is smaller than what is never evicted "
                f"({pinned_tokens} pinned prompt + {self.effective_sink_tokens} sink tokens + "
                f"{self.effective_recent_chunks} recent chunks and the open chunk of {self.chunk_size} "
                f"tokens); allowed values: 0 (no budget) or an int >= {need}"
            )


def _check_storage(config: EpisodeCacheConfig) -> None:
    from kv_vla.cache.storage import STORAGES, static_refusal

    if config.storage not in STORAGES:
        raise ValueError(f"storage: unknown storage {config.storage!r}; allowed values: {list(STORAGES)}")
    if config.storage == "static":
        reason = static_refusal(config)
        if reason is not None:
            raise ValueError(reason)


def _check_int(name: str, value: Any, minimum: int | None, none_ok: bool = False) -> None:
    """Refuse a non-integer or one under ``minimum`` (ValueError naming ``name``); for other modules'
    own dataclasses (e.g. ``kv_vla.train.gate``) whose knobs are not cache settings."""
    allowed = (
        "any integer" if minimum is None else f"an integer >= {minimum}" + (" or None" if none_ok else "")
    )
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be {allowed}; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: {value} is not allowed; allowed values: {allowed}")
