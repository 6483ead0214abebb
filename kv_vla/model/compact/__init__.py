"""The compact built-in VLA, split by job (LeRobot style): configuration, modeling, projector,
instruction conditioning and the training-time episode forward."""

from kv_vla.model.compact.configuration import CompactVLAConfig
from kv_vla.model.compact.episode import EpisodeOutput
from kv_vla.model.compact.modeling import CompactVLA

__all__ = ["CompactVLA", "CompactVLAConfig", "EpisodeOutput"]
