"""The VLA node's parameters: built from the one settings table (:mod:`kv_vla.settings`), so a
parameter has the name, default, range and meaning it has everywhere else (the cache, the CLI).

``effect`` says when a valid change takes effect:

* ``startup``: read-only, fixed when the node starts (the model is loaded once);
* ``now``: the next control step;
* ``next_episode``: the next episode (a new instruction or a ``~/reset`` call); a cache cannot change
  its chunking or budget in the middle of an episode without invalidating the chunks it holds.

The ZipVL thresholds (``tau``, ``full_threshold``) apply ``now``, like ``gate_threshold``; the storage
format (``low_bits``, ``quant_group_size``) waits for the next episode: demotion is one-way, so a live
change would leave one episode's low-precision chunks in two formats.

:func:`check_cache_change` is the one check of a cache change: the whole resulting set of cache
parameters, against the running episode's prompt (or the shortest prompt while idle), so a change
is refused when it is set, with the reason, and an accepted one cannot fail later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kv_vla import settings

STARTUP, NOW, NEXT_EPISODE = settings.STARTUP, settings.NOW, settings.NEXT_EPISODE
DTYPES = settings.DTYPES
#: the node's parameters, in declaration order (every one a ``kv_vla.settings`` knob)
NAMES: tuple[str, ...] = (
    "model_path",
    "device",
    "dtype",
    "gate_path",
    "compile",
    "trust_remote_code",
    *settings.CACHE_SETTINGS,
    *(s.name for s in settings.SETTINGS_LIST if s.group == settings.NODE),
)
#: the parameters that reach the cache (``EpisodeCacheConfig`` fields, same names)
CACHE_KEYS: tuple[str, ...] = settings.CACHE_SETTINGS
#: an instruction of one word: its prompt is the shortest any episode can have
SHORTEST_INSTRUCTION = settings.SHORTEST_INSTRUCTION


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter as ROS needs it: default, meaning, when a change applies, its range."""

    name: str
    default: Any
    description: str
    effect: str
    low: float | None = None
    high: float | None = None
    step: float | None = None  # IntegerRange step for ints; FloatingPointRange step (0 = continuous)
    choices: tuple[str, ...] | None = None


def _spec(s: settings.Setting) -> ParamSpec:
    low, high, choices, step = s.low, s.high, None, None
    if s.choices is not None and s.type is str:
        choices = tuple(s.choices)
    elif s.choices is not None:  # integer choices: the ROS range spans them, check() picks them
        low, high = min(s.choices), max(s.choices)
    if low is not None:
        step = 1 if s.type is int else 0.0
    return ParamSpec(s.name, s.default, s.help, s.effect, low, high, step, choices)


PARAMS: tuple[ParamSpec, ...] = tuple(_spec(settings.SETTINGS[n]) for n in NAMES)
SPECS: dict[str, ParamSpec] = {p.name: p for p in PARAMS}


def validate(name: str, value: Any, policies: tuple[str, ...] | None = None) -> str | None:
    """Return why ``value`` is invalid for parameter ``name`` (None when it is valid).

    One value at a time, from the settings table; ``policies`` (the registry) checks a policy name.
    """
    if name not in SPECS:
        return None  # not ours (e.g. use_sim_time): rclpy handles it
    if name == "policy" and isinstance(value, str) and policies is not None and value not in policies:
        return f"policy={value!r} is not one of {', '.join(policies)}"
    return settings.check(name, value)


def check_cache_change(
    active: Mapping[str, Any],
    changes: Mapping[str, Any],
    pinned_tokens: int | None = None,
    step_tokens: int | None = None,
) -> str | None:
    """Why applying ``changes`` to the cache parameters ``active`` is refused, or None.

    The whole resulting set is checked: each value, the policy's own options, and (with
    ``pinned_tokens`` and ``step_tokens``, the running episode's prompt and step length, or the
    shortest prompt's while idle) whether the budget can hold the prompt, the sinks, the recent
    chunks and the open chunk. Pure: the node calls it from its on-set-parameters callback.
    """
    from kv_vla.cache import EpisodeCacheConfig

    merged = {k: v for k, v in {**active, **changes}.items() if k in CACHE_KEYS}
    try:
        config = EpisodeCacheConfig(**merged)
        if pinned_tokens is not None and step_tokens is not None:
            config.resolve(step_tokens).check_budget(pinned_tokens)
    except (ValueError, TypeError) as exc:
        where = "" if pinned_tokens is None else f" (with a {pinned_tokens}-token prompt)"
        return f"{exc}{where}"
    return None


def prompt_layout(runtime: Any, running: bool, pinned_tokens: int | None) -> tuple[int | None, int | None]:
    """``(pinned, step)`` tokens to check a change against: the running episode's, else the
    shortest prompt's (``runtime.prompt_layout``); ``(None, None)`` for a runtime without one."""
    layout = getattr(runtime, "prompt_layout", None)
    if not callable(layout):
        return None, None
    if running and pinned_tokens is not None:
        return int(pinned_tokens), int(runtime.step_tokens)
    return layout(SHORTEST_INSTRUCTION)
