"""Cache benchmark: step latency and KV memory of every eviction policy, side by side.

One control step = a prefill of ``obs_tokens`` (image + prompt tokens) followed by ``action_tokens``
greedily decoded tokens, each through ``past_key_values=EpisodeCache``. All policies run in one
process and in lockstep (step ``s`` of every policy before step ``s + 1`` of any), so drift of the
machine affects them alike; ratios are taken against ``full`` at the same history length.

Lockstep shares per-process state between policies. On a GPU that matters for latency: cuDNN
attention builds a plan per new key length, and policies whose cache grows (``full``,
``hf_dynamic``, ``zipvl``) meet the same lengths in the same step, so the first stepped pays for all
of them (docs/RESULTS.md). ``isolate=True`` runs each policy in its own
spawned process instead (same seed, so the same weights and tokens); KV bytes are identical either
way.

Each policy runs in every storage of ``storages`` that can hold it (``static`` needs a bounded
policy) and, with ``compile``, also as a compiled step over static storage; a row names its
``storage`` and ``compiled``, and reports the step's memory-bandwidth floor (:mod:`kv_vla.bench.floor`).

Policies other than ``full``/``none`` keep ``keep_steps`` steps of history: ``window``/``sinks``
through ``recent_chunks``, the scored ones (``attention``, ``random``, ``gated``) through a
``max_tokens`` budget of the same size (with 2 protected recent chunks).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from kv_vla.bench.cache_output import format_table, write_json, write_plot  # re-exported
from kv_vla.bench.presets import build_model, preset_config  # re-exported

ALL_POLICIES = ("full", "none", "window", "sinks", "attention", "random", "gated", "zipvl", "gated_tiered")
# not a cache policy: transformers' own DynamicCache, so that a run separates what the episode cache
# costs from what the decoder costs (same tokens, nothing evicted: its KV bytes equal `full`'s)
REFERENCE_POLICY = "hf_dynamic"
PROMPT_TOKENS = 24  # instruction prefix, pinned
SINK_TOKENS = 4


@dataclass
class BenchConfig:
    """Options of one benchmark run (mirrors the CLI)."""

    preset: str = "small"
    obs_tokens: int = 276
    action_tokens: int = 7
    history: list[int] = field(default_factory=lambda: [10, 20, 40, 80, 160])
    policies: list[str] = field(default_factory=lambda: list(ALL_POLICIES))
    device: str = "cpu"
    dtype: str | None = None  # default: float32 on CPU, bfloat16 for openvla-7b
    repeats: int = 3  # timed steps per history point (median)
    keep_steps: int = 8
    seed: int = 0
    isolate: bool = False  # one process per policy (fair GPU latency between growing caches)
    storages: list[str] = field(default_factory=lambda: ["dynamic"])  # kv_vla.cache.storage names
    compile: bool = False  # also run each static-storage policy as a compiled step
    full_reference: bool = True  # add `full` (the unit of *_vs_full); its step grows with history

    def resolved_dtype(self) -> torch.dtype:
        name = self.dtype or ("bfloat16" if self.preset == "openvla-7b" else "float32")
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
        except KeyError:
            raise ValueError(
                f"dtype: {name!r} is not allowed; allowed values: float32, bfloat16, float16"
            ) from None


def policy_config(policy: str, chunk_size: int, keep_steps: int, storage: str = "dynamic") -> Any:
    """The cache configuration each policy runs with (same history budget for all but full/none)."""
    from kv_vla.cache import EpisodeCacheConfig

    budget = PROMPT_TOKENS + SINK_TOKENS + (keep_steps + 1) * chunk_size
    recent = min(2, keep_steps)
    options: dict[str, dict[str, Any]] = {
        "full": dict(max_tokens=None),
        "none": dict(max_tokens=None),
        "window": dict(recent_chunks=keep_steps, max_tokens=None),
        "sinks": dict(recent_chunks=keep_steps, sink_tokens=SINK_TOKENS, max_tokens=None),
        "attention": dict(recent_chunks=recent, sink_tokens=SINK_TOKENS, max_tokens=budget),
        "random": dict(recent_chunks=recent, sink_tokens=SINK_TOKENS, max_tokens=budget),
        "gated": dict(recent_chunks=recent, sink_tokens=SINK_TOKENS, max_tokens=budget, gate_threshold=0.5),
        # ZipVL keeps every token (no budget) and stores the unimportant ones at 4 bits
        "zipvl": dict(recent_chunks=recent, sink_tokens=SINK_TOKENS, max_tokens=None, tau=0.9, low_bits=4),
        "gated_tiered": dict(
            recent_chunks=recent, sink_tokens=SINK_TOKENS, max_tokens=budget, gate_threshold=0.5
        ),
    }
    if policy not in options:
        extra = dict(
            recent_chunks=recent, sink_tokens=SINK_TOKENS, max_tokens=budget
        )  # registered extensions
        return EpisodeCacheConfig(policy=policy, chunk_size=chunk_size, storage=storage, **extra)
    return EpisodeCacheConfig(policy=policy, chunk_size=chunk_size, storage=storage, **options[policy])


def variants(cfg: BenchConfig) -> list[tuple[str, str, bool]]:
    """``(policy, storage, compiled)`` of every runner: each storage that can hold the policy, and a
    compiled static step with ``cfg.compile`` (not for probe-scored policies)."""
    from kv_vla.cache import POLICIES
    from kv_vla.cache.storage import STORAGES, static_refusal

    for s in cfg.storages:
        if s not in STORAGES:
            raise ValueError(f"storage: unknown {s!r}; allowed values: {list(STORAGES)}")
    if cfg.compile and "static" not in cfg.storages:
        raise ValueError("compile: the compiled step runs over static storage; add 'static' to storages")
    chunk = cfg.obs_tokens + cfg.action_tokens
    out = []
    for p in cfg.policies:
        if p == "full":  # the unit of every ratio, whatever storages were asked for
            out.append(("full", "dynamic", False))
        for s in cfg.storages:
            if s == "static" and (
                p == REFERENCE_POLICY or static_refusal(policy_config(p, chunk, cfg.keep_steps)) is not None
            ):
                continue
            out.append((p, s, False))
            if s == "static" and cfg.compile and not POLICIES[p].needs_attention:
                out.append((p, s, True))
    return list(dict.fromkeys(out))


class _Runner:
    """One policy's episode: its cache and its step loop."""

    def __init__(
        self,
        model: torch.nn.Module,
        policy: str,
        cfg: BenchConfig,
        prompt: torch.Tensor,
        storage: str = "dynamic",
        compiled: bool = False,
    ):
        from kv_vla.cache import EpisodeCache

        self.model, self.policy, self.cfg = model, policy, cfg
        self.storage, self.compiled, self.decoder = storage, compiled, None
        self.step_ms: list[float] = []
        self.kv_bytes: list[int] = []  # before each step: bytes held with `len(kv_bytes)-1` steps of history
        self.attn = "sdpa"
        if policy == REFERENCE_POLICY:
            from transformers import DynamicCache

            self.cache = DynamicCache()
            self._forward(prompt)
            return
        chunk = cfg.obs_tokens + cfg.action_tokens
        self.cache = EpisodeCache(policy_config(policy, chunk, cfg.keep_steps, storage), model.config)
        if self.cache.policy.needs_attention:
            self.attn = "kv_vla_probe"
        if compiled:
            from kv_vla.cache.storage.compiled import CompiledDecoder

            self.decoder = CompiledDecoder(model, mode="reduce-overhead" if prompt.is_cuda else None)
        self._forward(prompt)
        self.cache.pin_prefix()

    def _evict(self) -> None:
        if self.policy != REFERENCE_POLICY:
            self.cache.maybe_evict()

    def _held_bytes(self) -> int:
        if self.policy != REFERENCE_POLICY:
            return int(self.cache.stats().kv_bytes)
        return sum(
            t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values)
        )

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        start = self.cache.get_seq_length()
        pos = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
        if self.decoder is not None:
            embeds = self.model.get_input_embeddings()(ids)
            return self.decoder(self.cache, embeds, pos, 1)[:, -1]
        make_mask = getattr(self.cache, "attention_mask", None)  # static storage: a mask over its slots
        mask = make_mask(ids.shape[1], self.model.dtype, ids.device) if make_mask else None
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, obs: torch.Tensor) -> None:
        if self.model.config._attn_implementation != self.attn:
            self.model.set_attn_implementation(self.attn)
        self._evict()
        self.kv_bytes.append(self._held_bytes())
        _sync(obs.device)
        t0 = time.perf_counter()
        logits = self._forward(obs)
        for _ in range(self.cfg.action_tokens):
            logits = self._forward(logits.argmax(-1, keepdim=True))
        self._evict()  # the runtime frees evicted chunks after each step
        _sync(obs.device)
        self.step_ms.append((time.perf_counter() - t0) * 1e3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PolicyTimings:
    """What one policy's run measured: step times and the KV bytes held before each step."""

    policy: str
    step_ms: list[float]
    kv_bytes: list[int]
    storage: str = "dynamic"
    compiled: bool = False
    warmup_s: float = 0.0  # seconds of the compiled step's first calls (compilation)
    bandwidth: float = 0.0  # copy bandwidth measured in the same process (bytes/s)
    weight_bytes: int = 0


def run_bench(
    cfg: BenchConfig, progress: bool = True, on_point: Callable[[dict], None] | None = None
) -> dict:
    """Run every policy (in lockstep, or one process each with ``cfg.isolate``); the JSON-ready report.

    ``on_point`` receives the report so far each time a history point (lockstep) or a policy
    (isolated) is complete. Why: a 7B run at long history can take longer than the session it runs
    in; with the callback writing the report, what was already measured survives a timeout.
    """
    from kv_vla.cache import POLICIES

    for p in cfg.policies:
        if p not in POLICIES and p != REFERENCE_POLICY:
            allowed = [*sorted(POLICIES), REFERENCE_POLICY]
            raise ValueError(f"policies: unknown policy {p!r}; allowed values: {allowed}")
    if cfg.full_reference and "full" not in cfg.policies:
        cfg.policies = ["full", *cfg.policies]
    if not cfg.history or min(cfg.history) < 1:
        raise ValueError("history: allowed values: a non-empty list of integers >= 1")
    dtype = cfg.resolved_dtype()
    device = torch.device(cfg.device)
    if not cfg.isolate:
        measured = _measure(cfg, progress, on_point)
        return _report(cfg, measured, device, dtype, cfg.history)
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fresh CUDA context, allocator and plan cache
    measured = []
    policies = (["full"] if "full" in cfg.policies else []) + [p for p in cfg.policies if p != "full"]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(policies), desc=f"bench cache ({cfg.preset}, {cfg.device}, isolated)", unit="policy"
        )
    for policy in policies:
        one = replace(cfg, policies=[policy], isolate=False)
        with ctx.Pool(1) as pool:
            measured += pool.apply(_measure, (one, False))
        if bar is not None:
            bar.update(1)
        if on_point is not None and len(measured) < len(policies):
            on_point(_report(cfg, measured, device, dtype, cfg.history, complete=False))
    if bar is not None:
        bar.close()
    return _report(cfg, measured, device, dtype, cfg.history)


def _measure(
    cfg: BenchConfig, progress: bool, on_point: Callable[[dict], None] | None = None
) -> list[PolicyTimings]:
    """Step ``cfg.policies`` in lockstep in this process (a spawned worker's entry point too)."""
    from kv_vla.cache.probe import register_probe

    dtype = cfg.resolved_dtype()
    device = torch.device(cfg.device)
    register_probe()
    model = build_model(cfg.preset, cfg.device, dtype, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=gen).to(device)
    from kv_vla.bench.floor import copy_bandwidth

    bandwidth = copy_bandwidth(device)
    runners = [_Runner(model, p, cfg, prompt, s, c) for p, s, c in variants(cfg)]
    total = max(cfg.history) + cfg.repeats
    steps = range(total)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"bench cache ({cfg.preset}, {cfg.device})", unit="step")
    for i in steps:
        obs = torch.randint(0, vocab, (1, cfg.obs_tokens), generator=gen).to(device)
        for runner in runners:
            runner.step(obs)
        if on_point is not None and i + 1 < total and i + 1 in {h + cfg.repeats for h in cfg.history}:
            done = [h for h in cfg.history if h + cfg.repeats <= i + 1]
            on_point(_report(cfg, _timings(runners, model, bandwidth), device, dtype, done))
    return _timings(runners, model, bandwidth)


def _timings(runners: list[_Runner], model: torch.nn.Module, bandwidth: float) -> list[PolicyTimings]:
    from kv_vla.bench.floor import weight_bytes

    weights = weight_bytes(model)
    return [
        PolicyTimings(
            r.policy,
            list(r.step_ms),
            list(r.kv_bytes),
            storage=r.storage,
            compiled=r.compiled,
            warmup_s=sum(r.decoder.warmup_s.values()) if r.decoder is not None else 0.0,
            bandwidth=bandwidth,
            weight_bytes=weights,
        )
        for r in runners
    ]


def _report(
    cfg: BenchConfig,
    timings: list[PolicyTimings],
    device: torch.device,
    dtype: torch.dtype,
    history: list[int],
    complete: bool | None = None,
) -> dict:
    from kv_vla.bench.floor import step_floor_s

    results = []
    full = next((t for t in timings if (t.policy, t.storage, t.compiled) == ("full", "dynamic", False)), None)
    eager = {t.policy: t for t in timings if (t.storage, t.compiled) == ("dynamic", False)}
    p50 = lambda t, h: statistics.median(t.step_ms[h : h + cfg.repeats])  # noqa: E731
    for one in timings:
        for h in sorted(history):
            ms = p50(one, h)
            kv = one.kv_bytes[h]
            floor_ms = 1e3 * step_floor_s(one.weight_bytes, kv, 1 + cfg.action_tokens, one.bandwidth)
            base = eager.get(one.policy)
            results.append(
                {
                    "policy": one.policy,
                    "storage": one.storage,
                    "compiled": one.compiled,
                    "history_steps": h,
                    "step_ms_p50": round(ms, 3),
                    "kv_bytes": int(kv),
                    "latency_ratio_vs_full": round(ms / p50(full, h), 4) if full else None,
                    "latency_ratio_vs_dynamic": round(ms / p50(base, h), 4) if base is not None else None,
                    "kv_ratio_vs_full": round(kv / full.kv_bytes[h], 4) if full else None,
                    "floor_ms": round(floor_ms, 4),
                    "floor_ratio": round(ms / floor_ms, 2),
                    "warmup_s": round(one.warmup_s, 2),
                }
            )
    return {
        "preset": cfg.preset,
        "device": _device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "obs_tokens": cfg.obs_tokens,
        "action_tokens": cfg.action_tokens,
        "keep_steps": cfg.keep_steps,
        "repeats": cfg.repeats,
        "torch": torch.__version__,
        "copy_bandwidth_gb_s": round(timings[0].bandwidth / 1e9, 2),
        "weight_bytes": timings[0].weight_bytes,
        "passes_per_step": 1 + cfg.action_tokens,
        "config": asdict(cfg),
        "complete": sorted(history) == sorted(cfg.history) if complete is None else complete,
        "results": results,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


__all__ = [
    "BenchConfig",
    "build_model",
    "format_table",
    "preset_config",
    "run_bench",
    "write_json",
    "write_plot",
]
