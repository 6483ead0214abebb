"""``attention``: keep the chunks that received the most attention (H2O / SnapKV, per chunk)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kv_vla.cache.chunks import Chunk
from kv_vla.cache.policies.base import ChunkPolicy, PolicyContext


@dataclass
class AttentionPolicy(ChunkPolicy):
    """Utility of a chunk = mean attention mass its tokens have received from the probed queries
    (the newest ``probe_queries`` queries of every forward, averaged over heads and layers, summed
    over forwards: H2O's accumulated score; SnapKV's observation window), re-scored at every
    decision. Over ``max_tokens`` the least-attended chunks go first; without a budget it keeps all.

    Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs";
    Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation".
    A Cache never sees queries, so this needs the attention probe:
    ``kv_vla.cache.enable_attention_probe(model)`` (outputs are unchanged, see ``probe.py``).
    """

    name: ClassVar[str] = "attention"
    needs_attention: ClassVar[bool] = True

    def score(self, candidates: list[Chunk], ctx: PolicyContext) -> list[float]:
        if ctx.attention_mass is None:
            raise RuntimeError(
                "policy 'attention' needs the attention probe: call "
                "kv_vla.cache.enable_attention_probe(model) before running the model"
            )
        scores = [ctx.attention_mass(c) for c in candidates]
        for c, s in zip(candidates, scores):
            c.utility = s
        return scores
