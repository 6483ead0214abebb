"""The runtime on a CUDA device (skipped without one): float32 agrees with the CPU and with the
whole-episode forward; bf16 (the CUDA default) runs every step with finite, bounded actions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kv_vla.cache import EpisodeCacheConfig
from kv_vla.model import CompactVLA, CompactVLAConfig, build_prompt
from kv_vla.runtime import EpisodeRuntime, shipped_gate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
INSTR = "touch the cube that was lit at the start"


def make_model() -> CompactVLA:
    torch.manual_seed(0)
    return CompactVLA(CompactVLAConfig()).eval()


def run(rt: EpisodeRuntime, fr: np.ndarray):
    rt.reset(INSTR)
    out = []
    for f in fr:
        res = rt.step(f)
        out.append(rt.last_action_logits.clone())
    return res, torch.stack(out)


def test_cuda_float32_matches_cpu_and_training_forward():
    fr = np.random.default_rng(0).integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8)
    cfg = EpisodeCacheConfig(policy="full", chunk_size=20)
    _, cpu = run(EpisodeRuntime(make_model(), cfg, device="cpu"), fr)
    model = make_model()
    rt = EpisodeRuntime(model, cfg, device="cuda", dtype=torch.float32)
    _, gpu = run(rt, fr)
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)
    ids = gpu.argmax(-1) + model.action_tokenizer.action_token_begin_idx
    prompt = model.prompt_ids(build_prompt(INSTR))[0]
    with torch.no_grad():
        ref = model.forward_episode([prompt], fr[None], ids[None]).action_logits[0].cpu()
    torch.testing.assert_close(gpu, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("policy", ["full", "window", "gated"])
def test_cuda_bf16_default_runs(policy):
    fr = np.random.default_rng(1).integers(0, 256, size=(30, 64, 64, 3), dtype=np.uint8)
    kw = {"max_tokens": 200} if policy == "gated" else {}
    rt = EpisodeRuntime(make_model(), EpisodeCacheConfig(policy=policy, chunk_size=20, **kw), device="cuda")
    assert rt.dtype == torch.bfloat16
    res, logits = run(rt, fr)
    assert torch.isfinite(logits).all()
    assert np.all(np.abs(res.action) <= 1)
    assert res.cache_stats == rt.cache.stats()
    assert res.timings_ms["total"] > 0


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "compact-vla"


def _shipped_run(device: str, dtype: torch.dtype, fr: np.ndarray):
    cfg = EpisodeCacheConfig(policy="gated", recent_chunks=2, max_tokens=80, gate_threshold=0.0)
    rt = EpisodeRuntime.from_pretrained(
        SHIPPED, cache_config=cfg, device=device, dtype=dtype, gate_path=shipped_gate(SHIPPED)
    )
    rt.update_cache_config(chunk_size=rt.step_tokens)  # as kv-vla eval: one chunk per step
    rt.reset("touch the red cube, then the blue cube")  # the shipped model's two ordered highlights
    logits, kept = [], []
    for f in fr:
        res = rt.step(f)
        logits.append(rt.last_action_logits.float().cpu())
        kept.append({c.index: c.utility for c in rt.cache.chunks if not c.evicted})
        assert res.cache_stats.kept_tokens <= 80
    return torch.stack(logits), kept


def _assert_same_evictions_except_near_ties(gpu: list[dict], cpu: list[dict], atol: float) -> None:
    """The devices keep the same chunks until their first disagreement (after which the episodes
    diverge), and that one may only be a near tie: the chunks the two kept differently have CPU
    utilities within ``atol`` of each other (the gate's float32 rounding differs by device)."""
    for step, (g, c) in enumerate(zip(gpu, cpu, strict=True)):
        if g.keys() == c.keys():
            continue
        differing = (g.keys() ^ c.keys()) & (cpu[step - 1].keys() if step else c.keys())
        utilities = [cpu[step - 1][i] for i in differing] if step else []
        assert utilities and max(utilities) - min(utilities) <= atol, (step, sorted(differing), utilities)
        return


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped model")
def test_cuda_shipped_model_gated_float32_matches_cpu_and_bf16_runs():
    """The shipped checkpoint (ResNet, colour highlights, parallel slots) with its trained gate:
    float32 on CUDA gives the CPU's logits and evicts the same chunks; bf16 stays in budget."""
    fr = np.random.default_rng(2).integers(0, 256, size=(30, 64, 64, 3), dtype=np.uint8)
    cpu, cpu_kept = _shipped_run("cpu", torch.float32, fr)
    gpu, gpu_kept = _shipped_run("cuda", torch.float32, fr)
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)
    _assert_same_evictions_except_near_ties(gpu_kept, cpu_kept, atol=1e-3)
    bf16, _ = _shipped_run("cuda", torch.bfloat16, fr)
    assert torch.isfinite(bf16).all()
    agree = (bf16.argmax(-1) == cpu.argmax(-1)).float().mean().item()
    bins_off = (bf16.argmax(-1) - cpu.argmax(-1)).abs().float().mean().item()
    print(f"bf16 vs float32 action bins: {agree:.1%} equal, mean |diff| {bins_off:.2f} bins")
