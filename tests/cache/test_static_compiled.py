"""The compiled decoder step over static storage equals the eager step, and recompiles only on a
shape change (a grown budget), not per step. The CUDA-graph path runs only where a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compile_counts import compiled_graphs
from numerics import assert_logits_close, assert_same_argmax

from kv_vla.cache import EpisodeCacheConfig
from kv_vla.model import CompactVLA, CompactVLAConfig
from kv_vla.runtime import EpisodeRuntime

INSTR = "touch the red cube"


def _model() -> CompactVLA:
    torch.manual_seed(3)
    model = CompactVLA(CompactVLAConfig.tiny(action_decoding="parallel")).eval()
    with torch.no_grad():
        model.action_queries.normal_(0, 1.0)
    return model


def _config(model: CompactVLA) -> EpisodeCacheConfig:
    step = model.num_image_tokens + model.action_dim
    # window is bounded by its recent chunks: no token budget (the default 80 would not fit three)
    return EpisodeCacheConfig(
        policy="window", chunk_size=step, recent_chunks=3, max_tokens=None, storage="static"
    )


def _episode(
    rt: EpisodeRuntime, frames: np.ndarray, change_at: int, change: dict, on_step=None
) -> torch.Tensor:
    rt.reset(INSTR)
    logits = []
    for i, frame in enumerate(frames):
        if i == change_at:
            rt.update_cache_config(**change)  # a larger bound: the static buffers grow once
        rt.step(frame)
        logits.append(rt.last_action_logits.clone())
        if on_step is not None:
            on_step()
    return torch.stack(logits)


@pytest.mark.slow
def test_compiled_step_equals_eager_and_recompiles_once_per_shape():
    model = _model()
    frames = np.random.default_rng(0).integers(0, 256, size=(24, 64, 64, 3), dtype=np.uint8)
    change = dict(policy="random", max_tokens=_config(model).min_budget(40) + 40, recent_chunks=1)
    eager = _episode(EpisodeRuntime(model, cache_config=_config(model)), frames, 12, change)
    rt = EpisodeRuntime(model, cache_config=_config(model), compile=True)
    graphs: list[int] = []
    shapes: list[int] = []

    def count() -> None:
        graphs.append(compiled_graphs())
        shapes.append(len(rt.warmup_s))

    got = _episode(rt, frames, 12, change, on_step=count)
    assert rt._decoder.ahead_of_time  # on CPU: AOTInductor packages, no dynamo on the call path
    # inductor fuses and reorders float32 reductions: a stated bound, bins equal but for near ties
    assert_logits_close(got, eager)
    assert_same_argmax(got, eager)
    # a decoder graph per (block, span, slots) shape, each compiled once: a new graph only with a new
    # shape (the span filling up, the buffers growing with the budget), never for a known one
    assert all(layer.grows == 1 for layer in rt.cache.layers)
    assert [g - graphs[0] for g in graphs] == [s - shapes[0] for s in shapes]
    assert 2 <= len(rt.warmup_s) <= 2 * 8 and all(t > 0 for t in rt.warmup_s.values())
    assert graphs[-6:] == [graphs[-1]] * 6  # steady state: no compilation


@pytest.mark.slow
def test_warm_up_compiles_every_span_before_the_first_episode(monkeypatch):
    """After ``warm_up`` no step of an episode compiles (a gated cache's span moves up and down as
    the gate evicts), and the zeros it wrote into free slots change no logit."""
    from kv_vla.cache.storage import compiled

    # which shapes compile does not depend on the GEMM autotune, which quadruples each compile
    # (137 s for this test): freezing only here; test_cpu_compile_freezes... checks the config lands
    monkeypatch.setattr(compiled, "CPU_INDUCTOR_CONFIG", {"freezing": True})
    # and torch.compile instead of AOTInductor (23 s instead of 158 s): the spans warmed up are the
    # same for both (CompiledDecoder._run); the test above runs the AOT path
    monkeypatch.setattr(compiled, "AHEAD_OF_TIME_ON_CPU", False)

    model = _model()
    step = model.num_image_tokens + model.action_dim
    cfg = EpisodeCacheConfig(
        policy="gated", chunk_size=step, recent_chunks=1, max_tokens=40 + 5 * step, gate_threshold=0.5,
        storage="static",
    )  # an untrained gate under a 0.5 threshold: evictions before the budget binds, spans vary
    frames = np.random.default_rng(2).integers(0, 256, size=(16, 64, 64, 3), dtype=np.uint8)
    eager = _episode(EpisodeRuntime(model, cache_config=cfg), frames, -1, {})
    rt = EpisodeRuntime(model, cache_config=cfg, compile=True)
    spent = rt.warm_up(INSTR)
    assert spent > 0 and rt.cache is None  # the throwaway episode is gone
    with pytest.raises(RuntimeError, match="reset"):
        rt.step(frames[0])
    shapes, graphs = dict(rt.warmup_s), compiled_graphs()
    got = _episode(rt, frames, -1, {})
    assert rt.warmup_s == shapes, "a step compiled a shape the warm-up did not"
    assert compiled_graphs() == graphs
    assert_logits_close(got, eager)
    assert_same_argmax(got, eager)
    assert EpisodeRuntime(model, cache_config=cfg).warm_up() == 0.0  # eager: nothing to compile


def test_compile_refuses_dynamic_storage_and_probe_policies():
    model = _model()
    step = model.num_image_tokens + model.action_dim
    with pytest.raises(ValueError, match="storage='static'"):
        EpisodeRuntime(model, cache_config=EpisodeCacheConfig(policy="window", chunk_size=step), compile=True)
    rt = EpisodeRuntime(model, cache_config=_config(model), compile=True)
    with pytest.raises(ValueError, match="probe"):
        rt.update_cache_config(policy="attention", max_tokens=400, sink_tokens=0)
    assert rt.cache_config.policy == "window"  # refused: nothing changed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA-graph capture)")
def test_cuda_graph_step_equals_eager_on_gpu():
    model = _model()
    frames = np.random.default_rng(1).integers(0, 256, size=(12, 64, 64, 3), dtype=np.uint8)
    kw = dict(device="cuda", dtype=torch.float32)
    eager = _episode(EpisodeRuntime(model, cache_config=_config(model), **kw), frames, -1, {})
    graph = _episode(EpisodeRuntime(model, cache_config=_config(model), compile=True, **kw), frames, -1, {})
    assert_logits_close(graph.cpu(), eager.cpu())
    assert_same_argmax(graph.cpu(), eager.cpu())


def test_cpu_compile_freezes_weights_into_the_graph():
    """``compiling('cpu')`` must reach inductor: the generated code holds the weights as frozen
    constants (prepacked), not as graph inputs called through ``aten.mm``. Passed as
    ``torch.compile(options={'freezing': True})`` it was silently ignored (torch 2.13)."""
    from torch._inductor.utils import run_and_get_code

    from kv_vla.cache.storage.compiled import compiling

    torch._dynamo.reset()
    layer = torch.nn.Linear(32, 48, bias=False).eval()
    x = torch.randn(8, 32)
    fn = torch.compile(lambda t: torch.relu(layer(t)), dynamic=False)
    with torch.inference_mode(), compiling("cpu"):
        out, code = run_and_get_code(fn, x)
    source = "\n".join(code)
    assert "_frozen_param" in source, "the weight reached the graph as an input: freezing did not apply"
    torch.testing.assert_close(out, torch.relu(layer(x)), rtol=1e-5, atol=1e-6)
