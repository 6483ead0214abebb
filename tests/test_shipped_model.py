"""The shipped checkpoint (models/compact-vla) loads and runs closed-loop episodes in PyBullet.

What is asserted is what the shipped model does reliably: it loads with its trained gate, runs a
memory task end to end under the gated cache and under full history, its actions stay in range,
and the gated cache holds its token budget and a fraction of full history's KV memory. Success
rates of this checkpoint are reported in models/README.md; they are too low (see there) to assert a
positive rate with a safe margin, so no success bound is asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[1] / "models" / "compact-vla"
BUDGET = 240  # tokens: prompt + 2 recent chunks + ~9 gate-chosen chunks, ~25% of a full cued episode

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="no shipped model")


def test_shipped_model_fits_the_size_limit():
    total = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024
    from kv_vla.runtime import shipped_gate

    gate = shipped_gate(MODEL)
    assert gate is not None and gate.with_suffix(".json").exists()


def test_shipped_model_runs_a_memory_task_with_the_gated_cache_within_budget():
    from kv_vla.cache import EpisodeCacheConfig
    from kv_vla.eval.harness import evaluate
    from kv_vla.runtime import EpisodeRuntime, shipped_gate

    def factory(policy: str, **options):
        cfg = EpisodeCacheConfig(policy=policy, **options)
        rt = EpisodeRuntime.from_pretrained(MODEL, cache_config=cfg, gate_path=shipped_gate(MODEL))
        return lambda env: rt

    result = evaluate(
        {
            "gated": factory("gated", recent_chunks=2, max_tokens=BUDGET, gate_threshold=0.5),
            "full": factory("full"),
        },
        tasks=["cued_reach"],
        episodes=2,
        progress=False,
    )
    eps = {(r["policy"], r["seed"]): r for r in result["episodes"]}
    assert len(eps) == 4
    bytes_per_token = 4 * 2 * 2 * 32 * 4  # layers x (k, v) x kv heads x head_dim x fp32
    for seed in (0, 1):
        gated, full = eps[("gated", seed)], eps[("full", seed)]
        assert gated["steps"] >= 35 and full["steps"] >= 35  # the cued wait alone is 33+ steps
        assert gated["peak_kv_bytes"] <= (BUDGET + 20) * bytes_per_token  # budget + the open chunk
        assert gated["peak_kv_bytes"] < 0.4 * full["peak_kv_bytes"]
