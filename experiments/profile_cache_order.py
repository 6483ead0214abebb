"""Why lockstep GPU cache benchmarks can mislead: profile one 7B step per cache policy, in a given order.

On an H100 with torch 2.11, the default SDPA backend (cuDNN attention) builds an execution plan the
first time it meets a new (query, key) length, about 1.4 ms of CPU per attention call, 256 calls per
step for a 32-layer model taking 8 forwards. A cache whose length grows every step (``full``,
``hf_dynamic``, ``zipvl``) meets new lengths every step; a bounded one (``gated``, ``window``) meets
the same lengths again and reuses the plans. Run in lockstep, the first of several same-length
policies pays for all of them. This script shows it: it steps the policies in the order given, then
reports the CPU time per operator of one step of each (torch.profiler) and the synchronising calls
(``torch.cuda.set_sync_debug_mode``).

Usage (CUDA only): ``python experiments/profile_cache_order.py full,hf_dynamic,gated [STEPS]``; with one
policy it only prints that policy's step times, which is the isolated measurement.
"""

from __future__ import annotations

import collections
import sys
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from kv_vla.bench.cache_bench import PROMPT_TOKENS, BenchConfig, _Runner, build_model
from kv_vla.cache.probe import register_probe


def main() -> None:
    if len(sys.argv) < 2 or not torch.cuda.is_available():
        sys.exit(__doc__ if len(sys.argv) < 2 else "needs a CUDA device")
    order = sys.argv[1].split(",")
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    register_probe()
    cfg = BenchConfig(preset="openvla-7b", device="cuda", policies=[], history=[8], repeats=1)
    model = build_model("openvla-7b", "cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=gen).cuda()
    runners = {p: _Runner(model, p, cfg, prompt) for p in order}
    for _ in range(steps):
        obs = torch.randint(0, vocab, (1, cfg.obs_tokens), generator=gen).cuda()
        for p in order:
            runners[p].step(obs)
    print("order", order, {p: [round(x) for x in r.step_ms] for p, r in runners.items()})
    if len(order) == 1:
        return
    for p in order:
        obs = torch.randint(0, vocab, (1, cfg.obs_tokens), generator=gen).cuda()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runners[p].step(obs)
        torch.cuda.set_sync_debug_mode(0)
        where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught)
        print(p, "sync warnings", sum(where.values()), where.most_common(8))
    for p in order:
        obs = torch.randint(0, vocab, (1, cfg.obs_tokens), generator=gen).cuda()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runners[p].step(obs)
        print("=====", p, f"{runners[p].step_ms[-1]:.0f} ms")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
