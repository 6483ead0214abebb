"""Numbers behind the low-precision store: quantisation error, bytes per token, ZipVL's ratio p.

``python -m kv_vla.cache.quant.measure`` prints three markdown tables (``--json PATH`` also writes
them): the reconstruction error per bit width against its bound, the bytes one token's keys and
values occupy per layer at each bit width against bf16 and float32, and the per-layer ratio p that
the ``zipvl`` policy chose over an episode of a tiny random Llama (``--steps``). A real model's
ratios come from the runtime (``EpisodeRuntime`` with ``policy="zipvl"``; see the policy's
``ratio_history``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

import torch

from kv_vla.cache.quant.quantize import (
    KEY_AXIS,
    VALUE_AXIS,
    dequantize,
    group_view,
    quantize,
    quantized_nbytes,
)


def error_table(
    tokens: int = 256, head_dim: int = 64, heads: int = 8, group: int = 32, seed: int = 0
) -> list[dict[str, Any]]:
    """Max/mean abs error and max error / bound per bit width, on Gaussian and outlier-heavy KV."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(1, heads, tokens, head_dim, generator=g)
    outlier = torch.randn(1, heads, tokens, head_dim, generator=g)
    chans = torch.randperm(head_dim, generator=g)[:4]
    outlier[..., chans] = outlier[..., chans] * 2 + torch.tensor([15.0, -20.0, 25.0, 10.0])
    rows = []
    for name, x in (("gaussian", gauss), ("outlier channels", outlier)):
        for bits in (8, 4, 2):
            for kind, axis in (
                ("keys/channel", KEY_AXIS),
                ("values/token", VALUE_AXIS),
                ("keys/token", VALUE_AXIS),
            ):
                if (kind == "keys/token") != (name == "outlier channels") and kind != "keys/channel":
                    continue  # Gaussian: keys/channel + values/token; outliers: keys per channel vs per token
                q = quantize(x, bits, group, axis)
                err = (dequantize(q, torch.float32) - x).abs()
                step = q.scale.float()  # stored step per group
                grouped, dim = group_view(err, group, axis)
                ratio = float((grouped.amax(dim, keepdim=True) / (step / 2).clamp(min=1e-12)).max())
                rows.append(
                    {
                        "tensor": name,
                        "layout": kind,
                        "bits": bits,
                        "max_abs_err": float(err.max()),
                        "mean_abs_err": float(err.mean()),
                        "mse": float(err.pow(2).mean()),
                        "max_err_over_half_step": ratio,
                    }
                )
    return rows


def bytes_table(
    head_dim: int, kv_heads: int, chunk: int, group: int = 32, layers: int = 1
) -> list[dict[str, Any]]:
    """Bytes of one token's keys and values (all kv heads, ``layers`` layers), per storage format."""
    from kv_vla.cache.quant.store import balanced_group

    shape = (1, kv_heads, chunk, head_dim)
    rows = [
        {"format": "float32", "bytes_per_token": 2 * kv_heads * head_dim * 4 * layers},
        {"format": "bf16/fp16", "bytes_per_token": 2 * kv_heads * head_dim * 2 * layers},
    ]
    for bits in (8, 4, 2):
        per_chunk = quantized_nbytes(shape, bits, balanced_group(chunk, group), KEY_AXIS) + quantized_nbytes(
            shape, bits, balanced_group(head_dim, group), VALUE_AXIS
        )
        rows.append({"format": f"int{bits} (+fp16 scales)", "bytes_per_token": per_chunk / chunk * layers})
    bf16 = rows[1]["bytes_per_token"]
    for r in rows:
        r["vs_bf16"] = bf16 / r["bytes_per_token"]
        r["vs_fp32"] = rows[0]["bytes_per_token"] / r["bytes_per_token"]
    return rows


@torch.no_grad()
def ratio_episode(
    steps: int = 30, tau: float = 0.9, seed: int = 0, init_std: float = 0.2
) -> list[list[float]]:
    """Per-decision, per-layer ratio p of ``zipvl`` on a random 4-layer Llama episode.

    With the default init (std 0.02) a random model attends almost uniformly and every layer gets
    the same p; ``init_std`` 0.2 gives peaked, layer-specific attention, closer to a trained model.
    """
    from transformers import AutoModelForCausalLM

    from kv_vla.cache import EpisodeCache, EpisodeCacheConfig, disable_attention_probe, enable_attention_probe
    from kv_vla.cache.testing import run_episode, tiny_config

    config = tiny_config("llama", hidden=64, layers=4)
    config.initializer_range = init_std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    cfg = EpisodeCacheConfig(policy="zipvl", chunk_size=20, recent_chunks=2, max_tokens=None, tau=tau)
    cache = EpisodeCache(cfg, model.config)
    enable_attention_probe(model)
    try:
        run_episode(model, cache, list(range(3, 19)), steps, 16, 4, seed=seed)
    finally:
        disable_attention_probe(model)
    cache.maybe_evict()
    return list(cache.policy.ratio_history)


def _markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append(
            "| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--init-std", type=float, default=0.2, help="weight init std of the random Llama")
    parser.add_argument("--json", default=None, help="also write the tables as JSON here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"error": error_table()}
    report["bytes"] = {
        "compact_vla (head_dim 32, 2 kv heads, chunk 20)": bytes_table(32, 2, 20),
        "llama-7b/openvla (head_dim 128, 32 kv heads, chunk 263 = 256 patches + 7 actions)": bytes_table(
            128, 32, 263
        ),
    }
    hist = ratio_episode(args.steps, args.tau, init_std=args.init_std)
    report["ratio_p"] = hist
    print("## quantisation error (8 heads x 256 tokens x 64 dims, group 32)\n")
    print(_markdown(report["error"]))
    for name, rows in report["bytes"].items():
        print(f"\n## bytes per token per layer: {name}\n")
        print(_markdown(rows))
    layers = len(hist[0]) if hist else 0
    print(
        f"\n## zipvl ratio p per layer (tau={args.tau}, random 4-layer Llama, init std {args.init_std}, "
        f"{len(hist)} decisions)\n"
    )
    for li in range(layers):
        ps = [h[li] for h in hist]
        print(f"layer {li}: mean {sum(ps) / len(ps):.3f}  min {min(ps):.3f}  max {max(ps):.3f}")
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
