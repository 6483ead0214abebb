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

Policies other than ``full``/``none`` keep ``keep_steps`` steps of history: ``window``/``sinks``
through ``recent_chunks``, the scored ones (``attention``, ``random``, ``gated``) through a
``max_tokens`` budget of the same size (with 2 protected recent chunks).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kv_vla.atomic import atomic_write, atomic_write_json

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

    def resolved_dtype(self) -> torch.dtype:
        name = self.dtype or ("bfloat16" if self.preset == "openvla-7b" else "float32")
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
        except KeyError:
            raise ValueError(
                f"dtype: {name!r} is not allowed; allowed values: float32, bfloat16, float16"
            ) from None


def preset_config(preset: str) -> Any:
    """The decoder shape of a preset: ``small`` (CPU) or ``openvla-7b`` (Llama-2-7B shape, 32064 vocab)."""
    from transformers import LlamaConfig

    if preset == "small":
        return LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=2048,
            max_position_embeddings=65536,
        )
    if preset == "openvla-7b":
        return LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=65536,
        )
    raise ValueError(f"preset: unknown {preset!r}; allowed values: ['small', 'openvla-7b']")


def build_model(preset: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random model of the preset's shape, created directly on ``device`` in ``dtype``.

    Building under ``torch.device(device)`` with the default dtype set avoids materialising a 7B
    model in float32 on the CPU first.
    """
    from transformers import LlamaForCausalLM

    config = preset_config(preset)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()  # parameters were created in `dtype` on `device`; RoPE buffers stay float32


def policy_config(policy: str, chunk_size: int, keep_steps: int) -> Any:
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
        return EpisodeCacheConfig(policy=policy, chunk_size=chunk_size, **extra)
    return EpisodeCacheConfig(policy=policy, chunk_size=chunk_size, **options[policy])


class _Runner:
    """One policy's episode: its cache and its step loop."""

    def __init__(self, model: torch.nn.Module, policy: str, cfg: BenchConfig, prompt: torch.Tensor):
        from kv_vla.cache import EpisodeCache

        self.model, self.policy, self.cfg = model, policy, cfg
        self.step_ms: list[float] = []
        self.kv_bytes: list[int] = []  # before each step: bytes held with `len(kv_bytes)-1` steps of history
        self.attn = "sdpa"
        if policy == REFERENCE_POLICY:
            from transformers import DynamicCache

            self.cache = DynamicCache()
            self._forward(prompt)
            return
        chunk = cfg.obs_tokens + cfg.action_tokens
        self.cache = EpisodeCache(policy_config(policy, chunk, cfg.keep_steps), model.config)
        if self.cache.policy.needs_attention:
            self.attn = "kv_vla_probe"
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
        out = self.model(
            input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True, logits_to_keep=1
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
    if "full" not in cfg.policies:
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
    policies = ["full", *[p for p in cfg.policies if p != "full"]]
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
    runners = [_Runner(model, p, cfg, prompt) for p in cfg.policies]
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
            on_point(_report(cfg, _timings(runners), device, dtype, done))
    return _timings(runners)


def _timings(runners: list[_Runner]) -> list[PolicyTimings]:
    return [PolicyTimings(r.policy, list(r.step_ms), list(r.kv_bytes)) for r in runners]


def _report(
    cfg: BenchConfig,
    timings: list[PolicyTimings],
    device: torch.device,
    dtype: torch.dtype,
    history: list[int],
    complete: bool | None = None,
) -> dict:
    results = []
    full = next(t for t in timings if t.policy == "full")
    for one in timings:
        for h in sorted(history):
            ms = statistics.median(one.step_ms[h : h + cfg.repeats])
            full_ms = statistics.median(full.step_ms[h : h + cfg.repeats])
            kv = one.kv_bytes[h]
            results.append(
                {
                    "policy": one.policy,
                    "history_steps": h,
                    "step_ms_p50": round(ms, 3),
                    "kv_bytes": int(kv),
                    "latency_ratio_vs_full": round(ms / full_ms, 4),
                    "kv_ratio_vs_full": round(kv / full.kv_bytes[h], 4),
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
        "config": asdict(cfg),
        "complete": sorted(history) == sorted(cfg.history) if complete is None else complete,
        "results": results,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def format_table(report: dict) -> str:
    """A fixed-width table of the report (also pasted into the README)."""
    head = f"{'policy':<10} {'history':>7} {'step ms p50':>11} {'KV MiB':>10} {'latency/full':>12} {'KV/full':>8}"
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        lines.append(
            f"{r['policy']:<10} {r['history_steps']:>7} {r['step_ms_p50']:>11.2f} {r['kv_bytes'] / 2**20:>10.2f} "
            f"{r['latency_ratio_vs_full']:>12.3f} {r['kv_ratio_vs_full']:>8.3f}"
        )
    return "\n".join(lines)


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Write the report atomically (:func:`kv_vla.atomic.atomic_write_json`); returns the path."""
    atomic_write_json(path, report)
    return Path(path)


def write_plot(report: dict, path: str | os.PathLike) -> Path | None:
    """Latency and KV memory against history, one line per policy (PNG; None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in dict.fromkeys(r["policy"] for r in report["results"]):
        rows = [r for r in report["results"] if r["policy"] == policy]
        hs = [r["history_steps"] for r in rows]
        ax_t.plot(hs, [r["step_ms_p50"] for r in rows], marker="o", label=policy)
        ax_m.plot(hs, [r["kv_bytes"] / 2**20 for r in rows], marker="o", label=policy)
    for ax, ylabel in ((ax_t, "step latency p50 (ms)"), (ax_m, "KV cache held (MiB)")):
        ax.set_xlabel("history (control steps)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=8)
    fig.suptitle(f"kv_vla cache bench: {report['preset']} on {report['device']} ({report['dtype']})")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
