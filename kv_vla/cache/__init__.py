"""kv_vla's chunked episode KV cache: a ``transformers.Cache`` bounded by chunk eviction policies.

Imports torch and transformers only (never rclpy or pybullet).
"""

from kv_vla.cache.chunks import CacheStats, Chunk
from kv_vla.cache.config import EpisodeCacheConfig
from kv_vla.cache.episode_cache import EpisodeCache
from kv_vla.cache.gate import ChunkGate, GateConfig
from kv_vla.cache.policies import POLICIES, ChunkPolicy, PolicyContext, register_policy
from kv_vla.cache.probe import (
    PROBE_IMPLEMENTATION,
    disable_attention_probe,
    enable_attention_probe,
    is_probing,
)
from kv_vla.cache.storage.dynamic import EpisodeLayer

__all__ = [
    "POLICIES",
    "PROBE_IMPLEMENTATION",
    "CacheStats",
    "Chunk",
    "ChunkGate",
    "ChunkPolicy",
    "EpisodeCache",
    "EpisodeCacheConfig",
    "EpisodeLayer",
    "GateConfig",
    "PolicyContext",
    "disable_attention_probe",
    "enable_attention_probe",
    "is_probing",
    "register_policy",
]
