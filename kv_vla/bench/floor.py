"""The memory-bandwidth floor of a decoder step, measured on the machine that runs the bench.

A decoder pass must read every weight it multiplies by (all parameters but the input embedding,
of which only the block's rows are read) and every kept key and value. Divided by the copy
bandwidth of a large tensor in the same process, that is the fastest the pass could be if it were
memory-bound; ``floor_ratio = step time / floor`` says how far a step is from it (a CPU running a
long prefill is compute-bound, so its ratio is large by nature).
"""

from __future__ import annotations

import statistics
import time

import torch


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by ``dst.copy_(src)`` of a ``mib`` MiB tensor (median)."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):  # the first copy touches fresh pages: not timed
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n * 4 / statistics.median(times[1:])


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decoder pass reads: every parameter except the input embedding table."""
    embed = model.get_input_embeddings().weight
    total = 0
    for p in model.parameters():
        if p is not embed or model.get_output_embeddings().weight is embed:  # tied: lm_head reads it
            total += p.numel() * p.element_size()
    return total


def step_floor_s(weights: int, kv_bytes: int, passes: int, bandwidth: float) -> float:
    """Seconds a step of ``passes`` decoder passes needs at least: (weights + kept KV) per pass."""
    return passes * (weights + kv_bytes) / bandwidth


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
