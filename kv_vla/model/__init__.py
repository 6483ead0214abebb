"""VLA models the episode runtime drives: the action interface, the compact VLA, adapters, loaders."""

from kv_vla.model.action_tokenizer import (
    ActionTokenizer,
    compute_norm_stats,
    identity_norm_stats,
    normalize_actions,
    unnormalize_actions,
)
from kv_vla.model.base import VLABackbone
from kv_vla.model.compact import CompactVLA, CompactVLAConfig, EpisodeOutput
from kv_vla.model.prompt import build_prompt

__all__ = [
    "ActionTokenizer",
    "CompactVLA",
    "CompactVLAConfig",
    "EpisodeOutput",
    "VLABackbone",
    "build_prompt",
    "compute_norm_stats",
    "identity_norm_stats",
    "normalize_actions",
    "unnormalize_actions",
]
