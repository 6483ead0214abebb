"""The runtime on a CUDA device (skipped without one): float32 agrees with the CPU and with the
whole-episode forward; bf16 (the CUDA default) runs every step with finite, bounded actions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_vla.cache import EpisodeCacheConfig
from kv_vla.model import CompactVLA, CompactVLAConfig, build_prompt
from kv_vla.runtime import EpisodeRuntime

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
