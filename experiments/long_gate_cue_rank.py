"""Does the shipped gate keep the long task's cue? Replays recorded long_cued_reach demonstrations
through the model (teacher-forced chunk summaries) and prints, per episode, the cue chunk's rank
among the chunks before go, as scripts/gate_cue_rank.py does for late_cued_reach.

Usage: ``python experiments/long_gate_cue_rank.py [MODEL] [DATA] [EPISODES]``
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from kv_vla.cache import ChunkGate
from kv_vla.model.compact import CompactVLA
from kv_vla.train.data import load_demonstrations, tokenize_episodes
from kv_vla.train.gate import episode_summaries
from kv_vla_sim.tasks import get_task


def main(argv: list[str]) -> int:
    model_dir = argv[0] if argv else "models/compact-vla"
    data = argv[1] if len(argv) > 1 else "data/long_demos"
    n = int(argv[2]) if len(argv) > 2 else 12
    model = CompactVLA.from_pretrained(model_dir).eval()
    gate = ChunkGate.load(f"{model_dir}/gate.safetensors")
    eps = [e for e in load_demonstrations([data]) if e.task == "long_cued_reach"][:n]
    ranks = []
    for ep in tokenize_episodes(model, eps):
        spec = get_task("long_cued_reach:wait=train").sample(ep.seed)
        with torch.no_grad():
            u = gate(episode_summaries(model, ep, gate.config.summary_keys)).numpy()[: spec.go_step]
        cue = list(range(spec.cue_onset, spec.cue_onset + spec.cue_steps))
        order = list(np.argsort(-u, kind="stable"))
        ranks.append(min(order.index(k) for k in cue))
        print(f"seed {ep.seed}: cue rank {ranks[-1]} of {len(u)} chunks", flush=True)
    print(f"cue in the top 3: {int(np.sum(np.array(ranks) < 3))}/{len(ranks)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
