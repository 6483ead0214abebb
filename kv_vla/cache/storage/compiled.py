"""A causal LM's decoder step over static storage, compiled: ahead of time on CPU, ``torch.compile`` elsewhere.

The episode cache's bookkeeping (decisions, slot choice, the occupancy mask, the timeline) is
Python and stays eager; only the decoder forward is compiled. It runs on a slot writer, a minimal
cache whose ``update`` is an ``index_copy_`` into the static buffers at the reserved slots, so the
traced graph holds tensor ops only and its inputs keep their shapes from step to step: a graph per
block length (e.g. a step's frame block and a one-token decode) and attended span (at most
``SPAN_BUCKETS``), each compiled once. A buffer that
grows (a live budget increase) changes one shape and recompiles once. On CPU each shape is an
AOTInductor package (:func:`aot_compile`); on CUDA ``torch.compile(mode="reduce-overhead")``
captures the step as a CUDA graph (the buffers are static addresses).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class _SlotWriter:
    """What the compiled forward sees as ``past_key_values``: write the block, attend everything."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor, span: int):
        self.keys, self.values, self.index, self.span = keys, values, index, span

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kw: Any
    ):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.index, key_states.to(k.dtype))
        v.index_copy_(2, self.index, value_states.to(v.dtype))
        return k[:, :, : self.span], v[:, :, : self.span]


def _forward(
    lm: torch.nn.Module,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor,
    index: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    span: int,
    n_logits: int,
) -> torch.Tensor:
    out = lm(
        inputs_embeds=embeds,
        position_ids=position_ids,
        attention_mask=mask,
        past_key_values=_SlotWriter(keys, values, index, span),
        use_cache=True,
        logits_to_keep=n_logits,
    )
    return out.logits


class _DecoderStep(torch.nn.Module):
    """:func:`_forward` with its span and logits count fixed: the module ``torch.export`` traces."""

    def __init__(self, lm: torch.nn.Module, span: int, n_logits: int) -> None:
        super().__init__()
        self.lm, self.span, self.n_logits = lm, span, n_logits

    def forward(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        index: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        return _forward(self.lm, embeds, position_ids, mask, index, keys, values, self.span, self.n_logits)


def compile_options(mode: str | None) -> dict[str, Any]:
    """``torch.compile`` keywords: ``mode`` when given (e.g. ``"reduce-overhead"``: CUDA graphs)."""
    return {"mode": mode} if mode is not None else {}


CPU_INDUCTOR_CONFIG: dict[str, Any] = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
}
"""Inductor settings for a CPU compile, applied while each shape compiles (:func:`compiling`).

``freezing`` folds the (inference-only) weights into the graph as constants, which lets inductor
prepack them for oneDNN/MKL (convolutions, linears) and for its own C++ GEMM template, which
``max_autotune`` benchmarks against aten's kernel per matmul shape (it won for the compact VLA's
8-row matmuls on this CPU). Weights changed after compilation are not seen, and each compiled
graph holds its own prepacked copy of them (docs/bench/STATIC.md: RSS). These keys are set on
``torch._inductor.config`` itself: passed as ``torch.compile(options=...)``, ``freezing`` was
silently ignored (torch 2.13: the graph kept its weights as inputs and called ``aten.mm``).
"""


AHEAD_OF_TIME_ON_CPU = True
"""Whether a CPU compile goes through AOTInductor (:func:`aot_compile`: no dynamo on
the call path, about twice the compile time per shape) rather than ``torch.compile``. Tests whose
subject is which shapes compile, not the backend, turn it off for the faster compiles."""


@contextlib.contextmanager
def compiling(device_type: str) -> Iterator[None]:
    """Context for a call that may compile a new shape: :data:`CPU_INDUCTOR_CONFIG` on CPU."""
    if device_type != "cpu":
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(CPU_INDUCTOR_CONFIG):
        yield


def warm_call(fn: Any, *args: Any) -> Any:
    """Call a compiled ``fn`` whose shapes were all compiled before, checking only the guards that
    tell its compiled graphs apart (``skip_guard_eval_unsafe``).

    Why: dynamo re-checks every guard (each weight of the model) on every call, which measured about
    a sixth of the compact VLA's compiled CPU step; here nothing else it guards on changes between
    steps (weights are frozen into the graph, inputs differ only by the shapes that pick a graph).
    """
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        return fn(*args)


def check_compilable(cache: Any) -> None:
    """Raise ValueError when ``cache`` cannot run a compiled step (naming what to change)."""
    if cache.config.storage != "static":
        raise ValueError(
            "compile: the compiled step needs storage='static' (the dynamic storage changes shapes every "
            f"step); got storage={cache.config.storage!r}"
        )
    if getattr(cache.policy, "needs_attention", False):
        raise ValueError(
            f"compile: policy {cache.config.policy!r} reads attention through the probe, which reports from "
            "inside attention and cannot run in a compiled graph; allowed values: compile=False for it"
        )


# ---- ahead of time (CPU) ------------------------------------------------------------------------
# Why: a torch.compile'd call spends about 100 us in dynamo's frame evaluation and the AOT runtime
# wrappers before its kernels run, even with guard checks cut down: about 7% of the compact VLA's
# compiled CPU step, for its two calls (vision, decoder). A loaded AOTInductor package runs the same
# inductor kernels through its C++ runner and checks nothing, so each package holds one shape and
# callers key packages by shape. Packages go to a temporary folder removed when the process exits.

_folder: Path | None = None
_names = itertools.count()
_compiled = 0


def compiled_count() -> int:
    """How many graphs this process compiled ahead of time (what ``torch.compile``'s counters miss)."""
    return _compiled


def _package_path() -> str:
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix="kv_vla_aot_"))
        atexit.register(shutil.rmtree, _folder, ignore_errors=True)
    return str(_folder / f"graph{next(_names)}.pt2")


def aot_compile(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
    """``module`` exported on ``args`` and compiled by AOTInductor for CPU (weights frozen in, as
    :data:`CPU_INDUCTOR_CONFIG`); returns the loaded callable, which takes arguments of exactly
    ``args``' shapes and dtypes and writes the in-place updates ``module`` makes to its inputs."""
    global _compiled
    exported = torch.export.export(module, args)
    with compiling("cpu"):
        path = torch._inductor.aoti_compile_and_package(
            exported, package_path=_package_path(), inductor_configs=dict(CPU_INDUCTOR_CONFIG)
        )
    _compiled += 1
    return torch._inductor.aoti_load_package(path)


class CompiledDecoder:
    """Runs ``lm`` (a HF causal LM) over a static-storage :class:`kv_vla.cache.EpisodeCache`.

    ``warmup_s`` maps each compiled shape ``(block length, span, slots)`` to the seconds its first call
    took (compilation included): the bounded warm-up the runtime reports.
    """

    def __init__(
        self, lm: torch.nn.Module, mode: str | None = None, backend: str = "inductor", ahead_of_time: bool | None = None
    ):
        self.lm = lm
        self.mode = mode
        self._fn = torch.compile(_forward, dynamic=False, backend=backend, **compile_options(mode))
        if ahead_of_time is None:  # on CPU (aot_compile: no dynamo on the call path)
            on_cpu = next(lm.parameters()).device.type == "cpu"
            ahead_of_time = on_cpu and mode is None and backend == "inductor" and AHEAD_OF_TIME_ON_CPU
        self.ahead_of_time = ahead_of_time
        self._graphs: dict[tuple[int, int, int, int], Any] = {}  # (block, span, slots, logits) -> package
        # one graph per (block, span, capacity): a few per block length; several caches share _forward
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.warmup_s: dict[tuple[int, int, int], float] = {}
        self._logits_of: dict[int, int] = {}  # block length -> logits it asked for (what precompile replays)

    def __call__(
        self, cache: Any, embeds: torch.Tensor, position_ids: torch.Tensor, n_logits: int = 1
    ) -> torch.Tensor:
        """Logits ``[B, n_logits, vocab]`` of the block ``embeds``; the cache records the block."""
        check_compilable(cache)
        n = int(embeds.shape[1])
        mask = cache.attention_mask(n, embeds.dtype, embeds.device)
        layers = cache.layers
        if any(layer.keys is None for layer in layers):  # first block (the prompt): sizes the buffers
            out = self.lm(
                inputs_embeds=embeds,
                position_ids=position_ids,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=n_logits,
            )
            return out.logits
        for layer in layers:
            layer.ensure_capacity(layer.keys, layer.values)  # a grown bound: one new shape
        self._logits_of.setdefault(n, n_logits)  # a compiled block length (the prompt runs eager)
        index = layers[0].reserved_slots(embeds.device)
        keys = [layer.keys for layer in layers]
        values = [layer.values for layer in layers]
        span = layers[0].span
        shape = (n, span, layers[0].capacity)
        logits = self._run(shape, n_logits, embeds, position_ids, mask, index, keys, values)
        cache.commit_block(n)
        return logits

    def _run(
        self,
        shape: tuple[int, int, int],
        n_logits: int,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        index: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        """One decoder pass of ``shape`` (block, span, slots); compiles it the first time."""
        inputs = (embeds, position_ids, mask, index, keys, values)
        if self.ahead_of_time:
            key = (*shape, n_logits)
            if key in self._graphs:
                return self._graphs[key](*inputs)
            t0 = time.perf_counter()
            self._graphs[key] = aot_compile(_DecoderStep(self.lm, shape[1], n_logits), inputs)
            self.warmup_s.setdefault(shape, time.perf_counter() - t0)
            return self._graphs[key](*inputs)
        args = (self.lm, *inputs[:4], keys, values, shape[1], n_logits)
        if shape in self.warmup_s:
            return warm_call(self._fn, *args)
        t0 = time.perf_counter()
        with compiling(embeds.device.type):
            logits = self._fn(*args)
        self.warmup_s[shape] = time.perf_counter() - t0
        return logits

    def precompile(self, cache: Any, min_held: int | None = None) -> float:
        """Compile now every attended span that the block lengths seen so far can meet in ``cache``
        with at least ``min_held`` tokens held before a block (default: what it holds now; a shorter
        prompt in a later episode needs ``min_held`` at its length).

        Why: a span compiles the first time a step reaches it, which on a CPU stalls that step for
        seconds, mid-episode. ``cache`` must hold its prompt (its buffers exist). Each shape is
        compiled by one call on the cache's own buffers, writing zeros into free slots only (masked
        out, and overwritten by the block that later takes them); nothing is committed. Returns the
        seconds spent.
        """
        check_compilable(cache)
        layers = cache.layers
        if any(layer.keys is None for layer in layers):
            raise RuntimeError("precompile: the cache holds no buffers yet; cache the prompt first")
        first = layers[0]
        cap = first.capacity
        held = first.held_tokens() if min_held is None else max(0, int(min_held))
        keys = [layer.keys for layer in layers]
        values = [layer.values for layer in layers]
        free_slots = first.free_slots().to(first.keys.device)
        hidden = int(self.lm.get_input_embeddings().weight.shape[-1])
        spent = 0.0
        for n, n_logits in self._logits_of.items():
            if n > free_slots.numel():
                continue
            embeds = torch.zeros(1, n, hidden, dtype=first.keys.dtype, device=first.keys.device)
            positions = torch.arange(n, device=embeds.device)[None]
            index = free_slots[:n]
            # every span a block of n can meet: its highest slot lies in [held + n, cap]
            for span in sorted({first.span_of(high) for high in range(held + n, cap + 1)}):
                if (n, span, cap) in self.warmup_s:
                    continue
                mask = torch.zeros(1, 1, n, span, dtype=embeds.dtype, device=embeds.device)
                self._run((n, span, cap), n_logits, embeds, positions, mask, index, keys, values)
                spent += self.warmup_s[(n, span, cap)]
        return spent
