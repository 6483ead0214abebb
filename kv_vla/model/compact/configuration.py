"""Configuration of the compact VLA (:class:`CompactVLAConfig`), flat so ``config.json`` stays readable.

Two settings survive from earlier checkpoints only as accepted spellings: ``film=False`` and
``projector="space_to_depth"`` load as before; a checkpoint that asks for FiLM or another projector
is refused, since this code no longer computes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import LlamaConfig, ResNetConfig, SiglipVisionConfig

try:  # transformers >= 5 spells it PreTrainedConfig; PretrainedConfig stays as an alias
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - older transformers
    from transformers import PretrainedConfig as PreTrainedConfig

from kv_vla.model.text_tokenizer import DEFAULT_WORDS, build_word_list, vocab_size_for

VISION_BACKBONES = ("siglip", "resnet")
ACTION_DECODINGS = ("autoregressive", "parallel")
#: Keys of older ``config.json`` files and the only value each still accepts.
LEGACY_FIXED = {"film": False, "projector": "space_to_depth"}
LEGACY_IGNORED = ("num_keypoints",)


class CompactVLAConfig(PreTrainedConfig):
    """Hyper-parameters of :class:`~kv_vla.model.compact.CompactVLA`.

    The shipped model is ``vision_backbone="resnet"``, ``action_decoding="parallel"``, ``pool=4``,
    ``highlight=True``, ``highlight_slots=2``. The defaults (SigLIP ViT, autoregressive action
    tokens, no highlight) are OpenVLA's layout at toy scale, which the runtime tests drive.
    """

    model_type = "kv_vla_compact"

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        vision_hidden_size: int = 96,
        vision_intermediate_size: int = 256,
        vision_num_layers: int = 2,
        vision_num_heads: int = 4,
        pool: int = 2,
        hidden_size: int = 192,
        intermediate_size: int = 512,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 6,
        num_key_value_heads: int = 2,
        max_position_embeddings: int = 8192,
        rope_theta: float = 10000.0,
        action_dim: int = 4,
        n_action_bins: int = 256,
        words: Sequence[str] | None = None,
        attn_implementation_lm: str = "sdpa",
        vision_backbone: str = "siglip",
        action_decoding: str = "autoregressive",
        highlight: bool = False,
        highlight_slots: int = 1,
        **kwargs: Any,
    ) -> None:
        for key, allowed in LEGACY_FIXED.items():
            value = kwargs.pop(key, allowed)
            if value != allowed:
                raise ValueError(
                    f"CompactVLAConfig: {key}={value!r} is no longer supported (only {allowed!r}); "
                    "load this checkpoint with the kv_vla version that trained it"
                )
        for key in LEGACY_IGNORED:
            kwargs.pop(key, None)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.vision_hidden_size = int(vision_hidden_size)
        self.vision_intermediate_size = int(vision_intermediate_size)
        self.vision_num_layers = int(vision_num_layers)
        self.vision_num_heads = int(vision_num_heads)
        self.pool = int(pool)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.num_key_value_heads = int(num_key_value_heads)
        self.max_position_embeddings = int(max_position_embeddings)
        self.rope_theta = float(rope_theta)
        self.action_dim = int(action_dim)
        self.n_action_bins = int(n_action_bins)
        self.words = build_word_list(DEFAULT_WORDS if words is None else words)
        self.attn_implementation_lm = attn_implementation_lm
        self.vision_backbone = str(vision_backbone)
        self.action_decoding = str(action_decoding)
        self.highlight = bool(highlight)
        self.highlight_slots = int(highlight_slots)
        super().__init__(**kwargs)
        self._check()

    @classmethod
    def tiny(cls, **overrides: Any) -> CompactVLAConfig:
        """A very small configuration for unit tests (same token layout as the default)."""
        kw: dict[str, Any] = dict(
            vision_hidden_size=32,
            vision_intermediate_size=64,
            vision_num_layers=1,
            vision_num_heads=2,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        kw.update(overrides)
        return cls(**kw)

    def _check(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        grid = self.image_size // self.patch_size
        if self.pool < 1 or grid % self.pool:
            raise ValueError(f"pool {self.pool} must divide the patch grid {grid}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {self.action_dim}")
        if self.vision_backbone not in VISION_BACKBONES:
            raise ValueError(
                f"vision_backbone: {self.vision_backbone!r}; allowed values: {list(VISION_BACKBONES)}"
            )
        if self.action_decoding not in ACTION_DECODINGS:
            raise ValueError(
                f"action_decoding: {self.action_decoding!r}; allowed values: {list(ACTION_DECODINGS)}"
            )
        if self.vision_backbone == "resnet" and self.patch_size != 8:
            raise ValueError("vision_backbone 'resnet' downsamples by 8: patch_size must be 8")
        if self.highlight_slots < 1:
            raise ValueError(f"highlight_slots must be >= 1, got {self.highlight_slots}")
        if self.highlight_slots > 1 and not self.highlight:
            raise ValueError("highlight_slots > 1 orders the colour highlight: it needs highlight=True")

    @property
    def text_vocab_size(self) -> int:
        """Vocabulary of the decoder: specials + words + action bins."""
        return vocab_size_for(self.words, self.n_action_bins)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per frame after pooling."""
        return (self.image_size // self.patch_size // self.pool) ** 2

    @property
    def step_tokens(self) -> int:
        """Tokens one control step adds to the cache (the default chunk size)."""
        return self.num_image_tokens + self.action_dim

    def vision_config(self) -> SiglipVisionConfig:
        return SiglipVisionConfig(
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=self.vision_num_layers,
            num_attention_heads=self.vision_num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_use_head=False,
        )

    def resnet_config(self) -> ResNetConfig:
        """A two-stage ResNet with overall stride 8, so it yields the same patch grid as the ViT.

        Why: a convolutional encoder is translation-equivariant, which a policy cloned from a few
        hundred demonstrations needs to localise small cubes at positions it has not seen.
        """
        return ResNetConfig(
            num_channels=3,
            embedding_size=self.vision_hidden_size // 2,
            hidden_sizes=[self.vision_hidden_size // 2, self.vision_hidden_size],
            depths=[1, 1],
            layer_type="basic",
            downsample_in_first_stage=False,
        )

    def text_config(self) -> LlamaConfig:
        cfg = LlamaConfig(
            vocab_size=self.text_vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            tie_word_embeddings=False,
        )
        cfg._attn_implementation = self.attn_implementation_lm
        return cfg
