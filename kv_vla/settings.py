"""Every cache and runtime knob, declared once: name, type, default, allowed values, when a change
takes effect, and what it does.

``EpisodeCacheConfig`` and the cache policies' option fields take their defaults from here; the ROS
node's parameters (``kv_vla_node/params.py``) are built from it; ``config/kv_vla.yaml``, the launch
arguments, the ``kv-vla`` CLI flags and the node README's parameter table are checked against it by
``tests/test_settings.py``. So a knob has one spelling and one default everywhere (a CLI flag is the
name with ``-`` for ``_``).

Defaults are the evaluated setting (models/README.md): the ``gated`` cache, ``gate_threshold`` 0, an
80-token budget, 2 recent chunks, one control step per chunk. A trained gate's file carries the
settings it was evaluated with (``gate.json``'s ``settings``, :meth:`kv_vla.cache.EpisodeCacheConfig.evaluated`); they apply when that gate is
used unless a setting is given explicitly.

Torch-free and ROS-free, so the CLI's ``--help`` and the node's parameter table stay cheap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

STARTUP, NOW, NEXT_EPISODE = "startup", "now", "next_episode"
#: ``chunk_size`` 0: one control step (image + action tokens, plus the prompt on OpenVLA's layout);
#: the only spelling of that default, resolved once per episode by ``EpisodeRuntime.reset``.
ONE_STEP = 0
#: a one-word instruction: the shortest prompt an episode can pin (an empty one is refused)
SHORTEST_INSTRUCTION = "go"
DTYPES = ("float32", "float16", "bfloat16")
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")

# groups: "cache" = an EpisodeCacheConfig field the cache itself reads; "policy" = an option field of
# the policies in ``policies``; "runtime" = loading the model; "node" = the ROS node only.
CACHE, POLICY, RUNTIME, NODE = "cache", "policy", "runtime", "node"


@dataclass(frozen=True)
class Setting:
    """One knob. ``low``/``high`` bound numbers (``low_open``: the low end is excluded)."""

    name: str
    type: type
    default: Any
    effect: str
    help: str
    group: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[Any, ...] | None = None
    policies: tuple[str, ...] = ()  # policy knobs: the policies whose dataclass has this field

    @property
    def allowed(self) -> str:
        """The allowed values in words (for refusals, help and docs)."""
        if self.choices is not None:
            return ", ".join(str(c) for c in self.choices)
        if self.low is None or self.high is None:
            return "a bool" if self.type is bool else f"a {self.type.__name__}"
        if self.type is int:
            return f"an integer in [{int(self.low)}, {int(self.high)}]"
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not allowed (``"name: ..."``), or None when it is."""
        bad = f"{self.name}: {value!r} is not allowed; allowed values: {self.allowed}"
        if self.type is bool:
            return None if isinstance(value, bool) else bad
        if isinstance(value, bool):
            return bad
        if self.type is int and not isinstance(value, int):
            return bad
        if self.type is float and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            return bad
        if self.type is str and not isinstance(value, str):
            return bad
        if self.choices is not None and value not in self.choices:
            return bad
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return bad
        if self.high is not None and value > self.high:
            return bad
        if self.name == "device" and not _DEVICE_RE.match(value):
            return bad
        if self.name == "model_path" and not value:
            return f"model_path: must not be empty; allowed values: {self.allowed}"
        return None


ZIPVL_POLICIES = ("zipvl", "gated_tiered")

SETTINGS_LIST: tuple[Setting, ...] = (
    # ---- loading (read once)
    Setting("model_path", str, "models/compact-vla", STARTUP, "checkpoint folder (relative: the working directory, else the kv_vla checkout)", RUNTIME),
    Setting("gate_path", str, "", STARTUP, "chunk-gate weights; empty = the gate saved beside the model (MODEL/gate.safetensors), if any", RUNTIME),
    Setting("device", str, "cpu", STARTUP, "torch device: cpu, cuda, cuda:N or mps", RUNTIME),
    Setting("dtype", str, "float32", STARTUP, "model dtype", RUNTIME, choices=DTYPES),
    Setting("compile", bool, False, STARTUP, "compile the step (AOTInductor packages on CPU, a CUDA graph on GPU), every shape at startup (about 190 s for the compact model on one CPU core); needs storage static and a bounded policy that reads no attention", RUNTIME),
    Setting("trust_remote_code", bool, False, STARTUP, "run Python code shipped in a model folder (OpenVLA's auto_map); off: such a folder is refused", RUNTIME),
    # ---- the cache (EpisodeCacheConfig)
    Setting("policy", str, "gated", NEXT_EPISODE, "KV eviction policy, a key of kv_vla.cache.POLICIES", CACHE),
    Setting("chunk_size", int, ONE_STEP, NEXT_EPISODE, "tokens per cache chunk; 0 = the tokens of one control step (resolved at each episode start)", CACHE, 0, 65536),
    Setting("recent_chunks", int, 2, NEXT_EPISODE, "newest complete chunks that are never evicted (policy none forces 0)", CACHE, 0, 4096),
    Setting("sink_tokens", int, 0, NEXT_EPISODE, "first tokens after the prompt that are never evicted (StreamingLLM; policy sinks needs >= 1)", CACHE, 0, 65536),
    Setting("max_tokens", int, 80, NEXT_EPISODE, "KV token budget, prompt included; 0 = no budget; ignored by full (never evicts). Also bounds the instruction: its prompt must fit beside the recent chunks and the open chunk", CACHE, 0, 10_000_000),
    Setting("seed", int, 0, NEXT_EPISODE, "seeds the random policy and an untrained gate", CACHE, 0, 2**31 - 1),
    Setting("probe_queries", int, 16, NEXT_EPISODE, "newest queries per forward whose attention the attention probe measures (attention, zipvl)", CACHE, 1, 65536),
    Setting("positions", str, "episode", NEXT_EPISODE, "position ids: episode (kept tokens keep their episode positions; ids grow with the episode) or cache (StreamingLLM: positions within the cache, bounded however long the episode; RoPE models only)", CACHE, choices=("episode", "cache")),
    Setting("storage", str, "dynamic", NEXT_EPISODE, "KV storage: dynamic (tensors grow and are re-selected) or static (preallocated slots for a bounded policy: steady-state steps allocate nothing and keep their shapes)", CACHE, choices=("dynamic", "static")),
    # ---- policy options (fields of the policy dataclasses in kv_vla/cache/policies/)
    Setting("gate_threshold", float, 0.0, NOW, "gated, gated_tiered: evict a chunk whose utility is below this (0: the budget alone decides, lowest utility first)", POLICY, 0.0, 1.0, policies=("gated", "gated_tiered")),
    Setting("tau", float, 0.9, NOW, "zipvl: share of the newest attention whose chunks stay at full precision", POLICY, 0.0, 1.0, low_open=True, policies=("zipvl",)),
    Setting("low_bits", int, 4, NEXT_EPISODE, "zipvl, gated_tiered: bits of low-precision chunks", POLICY, choices=(2, 4, 8), policies=ZIPVL_POLICIES),
    Setting("quant_group_size", int, 32, NEXT_EPISODE, "zipvl, gated_tiered: quantisation group size (tokens or channels)", POLICY, 1, 65536, policies=ZIPVL_POLICIES),
    Setting("full_threshold", float, 0.75, NOW, "gated_tiered: chunks with utility >= this stay at full precision (>= gate_threshold)", POLICY, 0.0, 1.0, policies=("gated_tiered",)),
    # ---- the ROS node
    Setting("autostart", bool, True, STARTUP, "configure and activate at start-up; false: wait for a lifecycle manager", NODE),
    Setting("step_mode", str, "event", STARTUP, "event: step when a new frame arrives; timer: step at control_rate_hz", NODE, choices=("event", "timer")),
    Setting("control_rate_hz", float, 0.0, NOW, "event mode: at most this many steps/s (0 = as fast as frames come); timer mode: the timer's rate (> 0)", NODE, 0.0, 1000.0),
    Setting("image_reliability", str, "reliable", STARTUP, "QoS reliability of the image subscriptions (a reliable one does not match a best-effort camera)", NODE, choices=("reliable", "best_effort")),
    Setting("image_depth", int, 5, STARTUP, "QoS keep-last depth of the image subscriptions; the node still steps on the newest frame only", NODE, 1, 100),
    Setting("max_future_stamp_s", float, 0.5, NOW, "frames stamped further ahead of the node clock are refused", NODE, 0.0, 1e9),
    Setting("max_image_age_s", float, 1.0, NOW, "frames older than this are skipped; no valid frame for this long while active: one hold action", NODE, 0.001, 3600.0),
    Setting("action_clip", float, 1.0, NOW, "every action component is clipped to [-action_clip, action_clip]", NODE, 0.0, 1.0),
    Setting("dry_run", bool, False, NOW, "compute actions and diagnostics but publish no action", NODE),
    Setting("twist_scale", float, 0.05, NOW, "action_twist.linear = (dx, dy, dz) x twist_scale", NODE, 0.0, 10.0),
    Setting("max_image_pixels", int, 4_194_304, NOW, "frames with more pixels (width x height) are refused", NODE, 1, 268_435_456),
    Setting("max_instruction_chars", int, 1000, NOW, "longer messages are refused before tokenising; the binding limit is max_tokens (the prompt must fit the budget)", NODE, 1, 100_000),
)  # fmt: skip
SETTINGS: dict[str, Setting] = {s.name: s for s in SETTINGS_LIST}
CACHE_FIELDS: tuple[str, ...] = tuple(s.name for s in SETTINGS_LIST if s.group == CACHE)
POLICY_OPTIONS: tuple[str, ...] = tuple(s.name for s in SETTINGS_LIST if s.group == POLICY)
#: every knob that ends up in ``EpisodeCacheConfig`` (its fields, in this order)
CACHE_SETTINGS: tuple[str, ...] = CACHE_FIELDS + POLICY_OPTIONS


def default(name: str) -> Any:
    """The declared default of ``name`` (KeyError for an unknown knob)."""
    return SETTINGS[name].default


def check(name: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for knob ``name``; None when it is (or the knob is not ours)."""
    setting = SETTINGS.get(name)
    return None if setting is None else setting.check(value)


def defaults(names: Iterable[str] | None = None) -> dict[str, Any]:
    """``{name: default}`` for ``names`` (all knobs when None)."""
    return {n: SETTINGS[n].default for n in (SETTINGS if names is None else names)}


def flag(name: str) -> str:
    """The CLI flag of knob ``name`` (``chunk_size`` -> ``--chunk-size``)."""
    return "--" + name.replace("_", "-")


def add_flags(parser: Any, names: Iterable[str], default_none: bool = True) -> None:
    """Add ``--name`` flags for ``names`` to an argparse parser, typed and described from the table.

    With ``default_none`` a flag left out is None ("not given"), so only given knobs override the
    model's (or its gate's) evaluated settings; the help still names the declared default.
    """
    for name in names:
        s = SETTINGS[name]
        kwargs: dict[str, Any] = {"help": f"{s.help} (default: {s.default!r}; takes effect: {s.effect})"}
        if s.type is bool:
            kwargs["action"] = "store_true"
            kwargs["default"] = None if default_none else s.default
        else:
            kwargs["type"] = s.type
            kwargs["default"] = None if default_none else s.default
            if s.choices is not None:
                kwargs["choices"] = list(s.choices)
        parser.add_argument(flag(name), dest=name, **kwargs)


def given(args: Any, names: Iterable[str]) -> dict[str, Any]:
    """The knobs of ``names`` given on the command line (flags added with ``add_flags``)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def markdown_table(names: Iterable[str]) -> str:
    """A Markdown table of ``names`` (name, default, allowed values, takes effect, what it does)."""
    rows = [
        "| parameter | default | allowed values | takes effect | what it does |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in names:
        s = SETTINGS[name]
        shown = "true" if s.default is True else "false" if s.default is False else s.default
        value = f'`"{shown}"`' if s.type is str and shown == "" else f"`{shown}`"
        rows.append(f"| `{name}` | {value} | {s.allowed} | {s.effect} | {s.help} |")
    return "\n".join(rows)
