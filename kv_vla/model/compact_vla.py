"""The compact built-in VLA: a tiny SigLIP vision encoder, an MLP projector and a Llama decoder.

It follows OpenVLA's recipe at toy scale so that everything downstream (episode cache, runtime,
ROS node) is exercised on a real vision-language-action model that trains on a CPU:

* vision: ``SiglipVisionModel`` on 64x64 frames, patch 8 -> 8x8 = 64 patch features;
* projector: 2x2 space-to-depth pooling (64 -> 16 tokens, nothing averaged away, so small cues
  such as a lit lamp survive) followed by LayerNorm + 2-layer MLP into the decoder width;
* decoder: ``LlamaForCausalLM`` (GQA) whose vocabulary is a small word vocabulary followed by the
  256 OpenVLA action tokens (the last 256 ids).

Token layout of an episode (what the cache holds and what :meth:`CompactVLA.forward_episode`
trains on)::

    <s> In : What action should the robot take to {instruction} ? Out :     <- pinned prompt prefix
    [img_1 ... img_N] [act_1 ... act_D]                                     <- control step 1
    [img_1 ... img_N] [act_1 ... act_D]                                     <- control step 2 ...

with ``N = num_image_tokens`` (16 by default) and ``D = action_dim`` (4). Action token ``d`` of a
step is predicted from the logits at the position just before it (the last image token for
``d = 0``). One control step is ``N + D`` tokens, the default cache chunk size.

With ``action_decoding="parallel"`` (OpenVLA-OFT's parallel decoding, Kim et al. 2025) the ``D``
action slots are learned query embeddings instead of the previous action's tokens, and action ``d``
is read from the logits *at* slot ``d``: one forward per control step instead of ``D + 1``, and no
ground-truth action ever enters the context. The latter matters for a policy with episode history:
with teacher-forced action tokens in the past, "repeat the previous action" explains most labels
of straight-line expert motion, so the model learns to copy instead of to look (the copycat problem
of behaviour cloning with history, Wen et al. 2020), and fails once its own actions drift.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    ResNetConfig,
    ResNetModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

try:  # transformers >= 5 spells it PreTrainedConfig; PretrainedConfig stays as an alias
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - older transformers
    from transformers import PretrainedConfig as PreTrainedConfig

from kv_vla.model.action_tokenizer import ActionTokenizer, identity_norm_stats
from kv_vla.model.base import PromptEmbeddingMixin
from kv_vla.model.image import frames_to_pixel_values
from kv_vla.model.prompt import PROMPT_TEMPLATE
from kv_vla.model.text_tokenizer import DEFAULT_WORDS, build_text_tokenizer, build_word_list, vocab_size_for

NORM_STATS_FILE = "norm_stats.json"
VISION_BACKBONES = ("siglip", "resnet")
ACTION_DECODINGS = ("autoregressive", "parallel")
PROJECTORS = ("space_to_depth", "spatial_softmax")
DEFAULT_UNNORM_KEY = "kv_vla_sim"
FILM_WORD_STD = 0.25  # init std of the FiLM word table (see CompactVLA.__init__)
HIGHLIGHT_PARAMS = 7  # colour direction w (3), threshold b (1), per-channel gain a (3)
HIGHLIGHT_INIT_STD = 0.1
WORD_ORDER_DECAY = 0.5  # per word, of the ordered reads' weights (word_order_weights)


class CompactVLAConfig(PreTrainedConfig):
    """Hyper-parameters of :class:`CompactVLA` (flat, so ``config.json`` stays readable)."""

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
        projector: str = "space_to_depth",
        num_keypoints: int = 32,
        film: bool = False,
        highlight: bool = False,
        highlight_slots: int = 1,
        **kwargs: Any,
    ) -> None:
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
        self.projector = str(projector)
        self.num_keypoints = int(num_keypoints)
        self.film = bool(film)
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
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector: {self.projector!r}; allowed values: {list(PROJECTORS)}")
        if self.num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {self.num_keypoints}")
        if self.vision_backbone == "resnet" and self.patch_size != 8:
            raise ValueError("vision_backbone 'resnet' downsamples by 8: patch_size must be 8")
        if self.highlight_slots < 1:
            raise ValueError(f"highlight_slots must be >= 1, got {self.highlight_slots}")
        if self.highlight_slots > 1 and (self.film or not self.highlight):
            raise ValueError(
                "highlight_slots > 1 orders the colour highlight: it needs highlight=True and "
                "film=False (FiLM reads the single bag of words)"
            )

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

        Why offer it: a convolutional encoder is translation-equivariant, which matters when the
        policy is cloned from a few hundred demonstrations and must localise small cubes it has
        never seen at those positions; a from-scratch ViT memorises the training layouts instead.
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


class SpatialSoftmaxProjector(nn.Module):
    """Patch grid ``[B, g*g, C]`` -> ``[B, N, D]`` through learned keypoints (spatial softmax).

    Each of ``K`` keypoint channels is a softmax over the grid; its expected ``(x, y)`` (continuous,
    finer than the grid) and the softmax-weighted feature under it (what is there: which colour,
    lit or not) describe one thing in the scene. Levine et al. 2016 ("End-to-End Training of Deep
    Visuomotor Policies") introduced it; robomimic and Diffusion Policy use it on ResNet features.
    Why here: behaviour cloning from a few hundred layouts per task must map *where* a small cube
    is to a motion direction, and coordinates make that a smooth function that generalises to
    unseen layouts, where a flattened feature map lets a small model memorise layouts instead.
    A mean-pooled global feature rides along for scene-wide state (the go lamp). The concatenation
    goes through LayerNorm and a 2-layer MLP into ``N`` decoder tokens.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: int, n_tokens: int, n_keypoints: int) -> None:
        super().__init__()
        self.grid, self.n_tokens, self.out_dim = grid, n_tokens, out_dim
        feat = 16
        self.keypoints = nn.Linear(in_dim, n_keypoints)
        self.values = nn.Linear(in_dim, feat)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        axis = torch.linspace(-1.0, 1.0, grid)
        ys, xs = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("coords", torch.stack([xs.reshape(-1), ys.reshape(-1)], -1), persistent=False)
        cat = n_keypoints * (2 + feat) + in_dim
        self.norm = nn.LayerNorm(cat)
        self.fc1 = nn.Linear(cat, out_dim * n_tokens)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b = patches.shape[0]
        attn = torch.softmax(self.keypoints(patches) * self.log_temperature.exp(), dim=1)  # [B, g*g, K]
        xy = attn.transpose(1, 2) @ self.coords.to(attn.dtype)  # [B, K, 2]
        what = attn.transpose(1, 2) @ self.values(patches)  # [B, K, feat]
        x = torch.cat([xy.flatten(1), what.flatten(1), patches.mean(1)], dim=-1)
        x = F.gelu(self.fc1(self.norm(x))).reshape(b, self.n_tokens, self.out_dim)
        return self.fc2(x)


class SpaceToDepthProjector(nn.Module):
    """Patch grid ``[B, g*g, C]`` -> ``[B, (g/p)^2, D]``: concatenate p x p neighbours, then LN + MLP."""

    def __init__(self, in_dim: int, out_dim: int, grid: int, pool: int) -> None:
        super().__init__()
        self.grid, self.pool = grid, pool
        cat = in_dim * pool * pool
        self.norm = nn.LayerNorm(cat)
        self.fc1 = nn.Linear(cat, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, _, c = patches.shape
        g, p = self.grid, self.pool
        x = (
            patches.reshape(b, g // p, p, g // p, p, c)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(b, (g // p) ** 2, p * p * c)
        )
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


@dataclass
class EpisodeOutput:
    """Result of :meth:`CompactVLA.forward_episode`.

    Attributes:
        loss: mean cross-entropy over the 256 action bins of every valid action token (or None).
        action_logits: ``[B, T, action_dim, n_bins]`` logits over the action slice of the vocabulary.
        accuracy: fraction of valid action tokens whose argmax bin equals the label (or None).
        image_tokens: ``[B, T, N, H]`` projected visual tokens of every frame (for auxiliary losses).
    """

    loss: torch.Tensor | None
    action_logits: torch.Tensor
    accuracy: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None


def _binned_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Cross-entropy against the label bin, or against a Gaussian over the bins around it.

    Why: the 256 action bins are ordered, but one-hot cross-entropy punishes a prediction one bin
    off as hard as one at the other end of the range. A Gaussian target of width ``sigma`` bins
    (the "HL-Gauss" classification loss of Imani & White 2018, Farebrother et al. 2024) shares the
    gradient between neighbours, which trains a small data set's directions faster; the argmax,
    and so the decoded action, is unchanged in expectation.
    """
    if sigma <= 0:
        return F.cross_entropy(logits, labels)
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    target = torch.exp(-0.5 * ((bins[None] - labels[:, None].float()) / sigma) ** 2)
    target = target / target.sum(-1, keepdim=True)
    return -(target * F.log_softmax(logits.float(), -1)).sum(-1).mean()


def word_order_weights(n_words: int, slots: int, decay: float = WORD_ORDER_DECAY) -> torch.Tensor:
    """``[n_words, slots]``: how much word i counts in ordered read k, ``exp(-decay * |i - a_k|)``
    with the anchors ``a_k`` spread from the first word (k = 0) to the last (k = slots - 1).

    Why fixed and not learned: "touch the red cube, then the blue cube" and "touch the blue cube,
    then the red cube" are the same bag of words; weighting the bag towards its start or its end
    tells them apart with nothing to learn, and the highlight layer decodes a colour from such a
    weighted sum as it did from the plain sum. Measured before this: attention reads with a learned
    relevance per word and learned order slopes let both reads drift to the last colour (the
    one-colour tasks, most of the data, reward any read that finds the colour), and the relevance
    hardly separated colour words from the rest in 1,000 binding steps. With decay 0.5, in the
    templates of ``touch_sequence`` the first read weighs the first colour 12-20x the second, and
    the last read the reverse.
    """
    position = torch.arange(n_words, dtype=torch.float32)
    anchors = torch.linspace(0.0, float(max(n_words - 1, 0)), slots)
    return torch.exp(-decay * (position[:, None] - anchors[None, :]).abs())


class CompactVLA(PromptEmbeddingMixin, PreTrainedModel):
    """The compact VLA; implements :class:`kv_vla.model.base.VLABackbone`."""

    config_class = CompactVLAConfig
    base_model_prefix = "compact_vla"
    main_input_name = "pixel_values"
    _supports_sdpa = True

    def __init__(self, config: CompactVLAConfig, norm_stats: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        if config.vision_backbone == "resnet":
            self.vision = ResNetModel(config.resnet_config())
        else:
            self.vision = SiglipVisionModel(config.vision_config())
        grid = config.image_size // config.patch_size
        if config.projector == "spatial_softmax":
            self.projector = SpatialSoftmaxProjector(
                config.vision_hidden_size,
                config.hidden_size,
                grid,
                config.num_image_tokens,
                config.num_keypoints,
            )
        else:
            self.projector = SpaceToDepthProjector(
                config.vision_hidden_size, config.hidden_size, grid, config.pool
            )
        self.language_model = LlamaForCausalLM(config.text_config())
        self.tokenizer = build_text_tokenizer(config.words, config.n_action_bins)
        # the ids of the prompt template's fixed words before and after the instruction (BOS first)
        before, after = PROMPT_TEMPLATE.split("{instruction}")
        self._template_ids = (
            list(self.tokenizer(before).input_ids),
            list(self.tokenizer(after, add_special_tokens=False).input_ids),
        )
        self.action_tokenizer = ActionTokenizer(config.text_vocab_size, n_bins=config.n_action_bins)
        # FiLM (as RT-1 conditions its EfficientNet on the instruction): a per-channel scale and shift
        # of the vision features, computed from the instruction, before they are cut into tokens.
        # Why: the decoder alone must bind a colour word to a place in four pooled image tokens, which
        # the policy trained without it hardly does; conditioned features can carry "where the named
        # cube is" directly. Zero-initialised, so a FiLM model starts as the same function as without.
        # Its input is a bag of the prompt's words in a table of its own (not the decoder's token
        # embeddings): summed, so the one colour word among ~17 prompt tokens is not averaged away,
        # and at unit scale, so the zero-initialised layer gets a usable gradient from the start.
        self.film: nn.Linear | None = None
        self.film_words: nn.Embedding | None = None
        if config.film or config.highlight:
            self.film_words = nn.Embedding(config.text_vocab_size, config.hidden_size)
        if config.film:
            self.film = nn.Linear(config.hidden_size, 2 * config.vision_hidden_size)
        # Colour highlight (instruction-conditioned early fusion): before the backbone, each pixel
        # gains a * relu(w . rgb + b), with (w, b, a) computed from the instruction. It lets "the red
        # cube" light the red pixels up, which turns a task named in words into one the policy
        # already solves, a lit target (the cued tasks). Why at the input: FiLM on the backbone's
        # output could not localise the named cube even with a direct auxiliary label (held-out
        # position error at the label's variance), while this did (models/README.md). The gain a
        # starts at zero, so a trained model fine-tuned into it starts as the same function.
        # With highlight_slots K > 1 there are K highlights, each with its own colour and gain, read
        # from K ordered reads of the prompt (word_order_weights): "touch the red cube, then the blue
        # cube" marks the red cube one way and the blue one another, which a bag of words -- the
        # same for both orders -- cannot do. Slot k's parameters are rows [7k, 7k + 7) of one layer,
        # so K = 1 is exactly the single highlight.
        self.highlight: nn.Linear | None = None
        if config.highlight:
            self.highlight = nn.Linear(config.hidden_size, HIGHLIGHT_PARAMS * config.highlight_slots)
        self.action_queries: nn.Parameter | None = None
        if config.action_decoding == "parallel":
            self.action_queries = nn.Parameter(torch.randn(config.action_dim, config.hidden_size) * 0.02)
        self.norm_stats: dict[str, Any] = (
            dict(norm_stats)
            if norm_stats is not None
            else {DEFAULT_UNNORM_KEY: identity_norm_stats(config.action_dim)}
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "film", None):
            nn.init.zeros_(module.weight)  # identity modulation at the start (see __init__)
            nn.init.zeros_(module.bias)
            return
        if module is getattr(self, "highlight", None):
            per_slot = module.weight.view(-1, HIGHLIGHT_PARAMS, module.in_features)
            with torch.no_grad():
                per_slot[:, :4].normal_(std=HIGHLIGHT_INIT_STD)  # colour direction w and b
                per_slot[:, 4:].zero_()  # gain a: zero, the identity at the start
            nn.init.zeros_(module.bias)
            return
        if module is getattr(self, "film_words", None):
            # a bag of ~17 words summed then has about unit scale per channel
            nn.init.normal_(module.weight, std=FILM_WORD_STD)
            return
        if isinstance(module, (SpaceToDepthProjector, SpatialSoftmaxProjector)):
            for lin in (module.fc1, module.fc2):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            nn.init.ones_(module.norm.weight)
            nn.init.zeros_(module.norm.bias)

    # ---- VLABackbone -------------------------------------------------------------------------
    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def position_offset(self) -> int:
        return 0

    def action_slot_embeds(self, action_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of the action slots of steps whose actions are ``action_ids`` (``[..., D]``):
        the label tokens (teacher forcing) when autoregressive, the fixed queries when parallel."""
        if self.action_queries is None:
            return self.embed_tokens(action_ids)
        return self.action_queries.expand(*action_ids.shape, self.config.hidden_size)

    def action_query_embeds(self) -> torch.Tensor | None:
        """``[1, D, H]`` slot embeddings of parallel action decoding; None when autoregressive."""
        return None if self.action_queries is None else self.action_queries[None]

    def prompt_ids(self, text: str) -> torch.Tensor:
        """Token ids ``[1, T]`` of a formatted prompt (BOS first)."""
        ids = self.tokenizer(text).input_ids
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def pixel_values(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[..., H, W, 3]`` -> ``[B, 3, S, S]`` in the model's dtype and device."""
        return frames_to_pixel_values(frames, self.config.image_size, device=self.device, dtype=self.dtype)

    def instruction_condition(self, prompt_ids: torch.Tensor) -> torch.Tensor | None:
        """The instruction condition of one prompt (``[P]`` or ``[1, P]`` ids): the sum of its words'
        embeddings in the conditioning table, ``[1, H]``; FiLM and the colour highlight read it.

        None for a model with neither. A bag of words (not the decoder's state) so that training and
        the runtime compute exactly the same vector from the ids alone, before any image is seen;
        word order is left to the decoder, which reads the prompt itself -- except with
        ``highlight_slots`` K > 1, where it is K sums of the instruction's words weighted from its
        start to its end, ``[1, K * H]`` (:func:`word_order_weights`).
        """
        if self.film_words is None:
            return None
        ids = torch.as_tensor(prompt_ids, device=self.device).reshape(1, -1)
        slots = self.config.highlight_slots
        if slots > 1:
            words = self.instruction_words(ids)
            weights = word_order_weights(words.shape[1], slots).to(self.film_words.weight)
            return torch.einsum("pk,bph->bkh", weights, self.film_words(words)).flatten(1)
        return self.film_words(ids).sum(dim=1)

    def instruction_words(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``[1, P]`` prompt ids -> the ids of the instruction inside the fixed template, ``[1, I]``.

        Why: the ordered reads weigh words by their distance from the instruction's start or end;
        counted from the template's ten fixed prefix words, the first read would see only those
        (measured with an earlier design: after 1,000 binding steps it still put its largest
        weights on "<s>", "in" and ":"). A prompt that is not in the template's form is read whole.
        """
        prefix, suffix = self._template_ids
        ids = prompt_ids[0].tolist()
        n_pre, n_suf = len(prefix), len(suffix)
        if len(ids) > n_pre + n_suf and ids[:n_pre] == prefix and ids[len(ids) - n_suf :] == suffix:
            return prompt_ids[:, n_pre : len(ids) - n_suf]
        return prompt_ids

    def encode_pixels(
        self, pixel_values: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, 3, S, S]`` -> projected visual tokens ``[B, N, H]``.

        ``condition`` (``[B, H]`` or ``[1, H]``, from :meth:`instruction_condition`) modulates the
        features of a FiLM model; it is required there and ignored by a model without FiLM.
        """
        if self.highlight is not None:
            pixel_values = self.highlight_pixels(pixel_values, condition)
        return self.project_patches(self.vision_patches(pixel_values), condition)

    def highlight_pixels(self, pixel_values: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """The instruction's colour highlight on ``[B, 3, S, S]`` pixels (see ``__init__``)."""
        if self.highlight is None:
            return pixel_values
        if condition is None:
            raise ValueError("this model highlights the instruction's colour: pass its instruction_condition")
        slots = self.config.highlight_slots
        weight = self.highlight.weight.view(slots, HIGHLIGHT_PARAMS, -1)
        cond = condition.to(pixel_values.dtype).reshape(condition.shape[0], slots, -1)
        params = torch.einsum("bkh,kjh->bkj", cond, weight) + self.highlight.bias.view(slots, -1)
        out = pixel_values
        for k in range(slots):
            p = params[:, k]
            w, b, a = p[:, :3, None, None], p[:, 3:4, None, None], p[:, 4:, None, None]
            out = out + a * torch.relu((pixel_values * w).sum(dim=1, keepdim=True) + b)
        return out

    def vision_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> the vision backbone's patch features ``[B, n_patches, C]``.

        Split from :meth:`project_patches` so that training with a frozen backbone can compute these
        once per frame and reuse them every epoch (``kv-vla train --freeze-vision``).
        """
        feats = self.vision(pixel_values=pixel_values).last_hidden_state
        # the ResNet returns a [B, C, h, w] map: flatten it to the ViT's [B, h*w, C] patch sequence
        return feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats

    def project_patches(self, patches: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Patch features ``[B, n_patches, C]`` -> visual tokens ``[B, N, H]`` (FiLM, then projector)."""
        if self.film is not None:
            if condition is None:
                raise ValueError(
                    "this model is FiLM-conditioned: pass the instruction_condition of the prompt"
                )
            scale, shift = self.film(condition.to(patches.dtype)).chunk(2, dim=-1)
            patches = patches * (1 + scale[:, None, :]) + shift[:, None, :]
        return self.projector(patches)

    def embed_image(
        self, image: np.ndarray | torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(image, np.ndarray) or (isinstance(image, torch.Tensor) and image.dtype == torch.uint8):
            image = self.pixel_values(image)
        return self.encode_pixels(image, condition)

    # ---- training path -----------------------------------------------------------------------
    def forward_episode(
        self,
        prompt_ids: Sequence[torch.Tensor] | torch.Tensor,
        frames: np.ndarray | torch.Tensor | None,
        action_ids: torch.Tensor,
        step_valid: torch.Tensor | None = None,
        step_keep: torch.Tensor | None = None,
        step_bias: torch.Tensor | None = None,
        label_sigma: float = 0.0,
        vision_patches: torch.Tensor | None = None,
    ) -> EpisodeOutput:
        """Teacher-forced pass over whole episodes in one sequence each (the runtime's token layout).

        Args:
            prompt_ids: per episode a 1-D LongTensor of prompt ids (lengths may differ; prompts are
                left-padded and their positions restart at 0, exactly as the runtime sees them), or
                a ``[B, P]`` tensor of equal-length prompts.
            frames: uint8 ``[B, T, H, W, 3]`` frames (resized like the runtime does), or already
                preprocessed pixels ``[B, T, 3, S, S]``.
            action_ids: ``[B, T, action_dim]`` action token ids (``action_tokenizer.encode`` of the
                normalised actions); these are both the inputs (teacher forcing) and the labels.
            step_valid: optional bool ``[B, T]``; False marks padding steps at the end of shorter
                episodes (excluded from the loss; they come last so nothing real attends to them).
            step_keep: optional bool ``[B, T]`` (step ``j``'s tokens are visible to later steps iff
                True) or ``[B, T, T]`` (step ``i`` sees step ``j < i`` iff ``[b, i, j]``). It mimics
                chunk eviction through the attention mask: a step always sees itself and the prompt.
            step_bias: optional float ``[B, T, T]`` added to the attention logits of step ``i``'s
                queries on step ``j``'s keys (``j < i``); ``log u_j`` softly dims chunk ``j`` by a
                factor ``u_j``, which makes a learned keep/evict gate trainable (see kv_vla.train.gate).
            label_sigma: 0 for plain cross-entropy on the label bin; ``> 0`` spreads the target over
                neighbouring bins as a Gaussian of this width in bins (see ``_binned_cross_entropy``).
            vision_patches: optional ``[B, T, n_patches, C]`` backbone features of the frames
                (:meth:`vision_patches`), used instead of running the backbone on ``frames`` (which
                may then be None): the frozen-backbone training path.

        Returns:
            :class:`EpisodeOutput` with the loss over the action bins and ``[B, T, D, n_bins]`` logits.
        """
        cfg = self.config
        device = self.device
        if isinstance(prompt_ids, torch.Tensor) and prompt_ids.ndim == 2:
            prompts = list(prompt_ids)
        else:
            prompts = [torch.as_tensor(p) for p in prompt_ids]
        bsz = len(prompts)
        action_ids = torch.as_tensor(action_ids, device=device, dtype=torch.long)
        if action_ids.ndim != 3 or action_ids.shape[0] != bsz or action_ids.shape[2] != cfg.action_dim:
            raise ValueError(
                f"action_ids must be [B={bsz}, T, {cfg.action_dim}], got {tuple(action_ids.shape)}"
            )
        n_steps = action_ids.shape[1]
        condition = None
        if self.film_words is not None:
            per_episode = torch.cat([self.instruction_condition(p) for p in prompts])  # [B, H]
            condition = per_episode.repeat_interleave(n_steps, dim=0)  # one row per frame
        if vision_patches is not None and self.highlight is not None:
            raise ValueError(
                "a colour-highlight model conditions its pixels: it cannot use cached vision_patches"
            )
        if vision_patches is not None:
            if vision_patches.shape[:2] != (bsz, n_steps):
                raise ValueError(
                    f"vision_patches must start with [B={bsz}, T={n_steps}], got {tuple(vision_patches.shape)}"
                )
            patches = vision_patches.to(device=device, dtype=self.dtype).flatten(0, 1)
        else:
            frames_t = torch.as_tensor(frames, device=device)
            if frames_t.shape[:2] != (bsz, n_steps):
                raise ValueError(
                    f"frames must start with [B={bsz}, T={n_steps}], got {tuple(frames_t.shape)}"
                )
            if frames_t.dtype == torch.uint8:
                pix = self.pixel_values(frames_t)
            else:
                pix = frames_t.reshape(-1, *frames_t.shape[2:]).to(self.dtype)
            patches = self.vision_patches(self.highlight_pixels(pix, condition))
        n_img, n_act = cfg.num_image_tokens, cfg.action_dim
        img = self.project_patches(patches, condition).reshape(bsz, n_steps, n_img, -1)
        act = self.action_slot_embeds(action_ids).to(img.dtype)  # [B, T, D, H]
        steps = torch.cat([img, act], dim=2).reshape(bsz, n_steps * (n_img + n_act), -1)

        lens = [int(p.numel()) for p in prompts]
        p_max = max(lens)
        pad_id = self.config.text_config().pad_token_id
        pids = torch.full((bsz, p_max), pad_id, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            pids[b, p_max - lens[b] :] = p.to(device)
        embeds = torch.cat([self.embed_tokens(pids), steps], dim=1)
        seq = embeds.shape[1]

        # group id per token: -2 padding, -1 prompt, t for control step t
        step_group = torch.arange(n_steps, device=device).repeat_interleave(n_img + n_act)
        group = torch.empty((bsz, seq), dtype=torch.long, device=device)
        pos = torch.empty((bsz, seq), dtype=torch.long, device=device)
        for b in range(bsz):
            pad = p_max - lens[b]
            group[b, :pad] = -2
            group[b, pad:p_max] = -1
            group[b, p_max:] = step_group
            pos[b, :pad] = 0
            pos[b, pad:] = torch.arange(seq - pad, device=device)

        mask = self._episode_mask(group, n_steps, step_keep)
        if step_bias is not None:
            mask = mask + self._step_bias_mask(group, n_steps, step_bias.to(device=device, dtype=mask.dtype))
        out = self.language_model.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False
        )
        hidden = out.last_hidden_state
        # autoregressive: the logits predicting action d of step t sit one position before that
        # action token; parallel: at action slot d itself
        first = n_img if self.action_queries is not None else n_img - 1
        base = p_max + torch.arange(n_steps, device=device) * (n_img + n_act) + first
        idx = (base[:, None] + torch.arange(n_act, device=device)[None, :]).reshape(-1)
        h = hidden[:, idx]  # [B, T*D, H]
        begin = self.action_tokenizer.action_token_begin_idx
        w = self.language_model.lm_head.weight[begin:]
        logits = (h @ w.T).reshape(bsz, n_steps, n_act, -1).float()

        labels = action_ids - begin
        if (labels < 0).any():
            raise ValueError("action_ids contain ids outside the action range (last n_bins vocabulary ids)")
        valid = (
            torch.ones((bsz, n_steps), dtype=torch.bool, device=device)
            if step_valid is None
            else step_valid.to(device)
        )
        sel = valid[:, :, None].expand(-1, -1, n_act)
        loss = acc = None
        if sel.any():
            loss = _binned_cross_entropy(logits[sel], labels[sel], label_sigma)
            acc = (logits[sel].argmax(-1) == labels[sel]).float().mean()
        return EpisodeOutput(loss=loss, action_logits=logits, accuracy=acc, image_tokens=img)

    @staticmethod
    def _step_bias_mask(group: torch.Tensor, n_steps: int, step_bias: torch.Tensor) -> torch.Tensor:
        """Expand a per-step ``[B, T, T]`` bias to tokens ``[B, 1, L, L]`` (zero for prompt/padding)."""
        bsz, seq = group.shape
        if step_bias.shape != (bsz, n_steps, n_steps):
            raise ValueError(
                f"step_bias must be [B, T, T] = {(bsz, n_steps, n_steps)}, got {tuple(step_bias.shape)}"
            )
        gq, gk = group[:, :, None], group[:, None, :]
        qi = gq.clamp(min=0).expand(bsz, seq, seq)
        ki = gk.clamp(min=0).expand(bsz, seq, seq)
        flat = (qi * n_steps + ki).reshape(bsz, -1)
        bias = torch.gather(step_bias.reshape(bsz, -1), 1, flat).reshape(bsz, seq, seq)
        applies = (gq >= 0) & (gk >= 0) & (gk < gq)
        return torch.where(applies, bias, torch.zeros_like(bias))[:, None]

    def _episode_mask(
        self, group: torch.Tensor, n_steps: int, step_keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Additive 4-D mask ``[B, 1, L, L]`` for :meth:`forward_episode` (see its ``step_keep``)."""
        bsz, seq = group.shape
        device = group.device
        causal = torch.ones((seq, seq), dtype=torch.bool, device=device).tril()
        gq, gk = group[:, :, None], group[:, None, :]
        allowed = causal[None] & (gk != -2)
        if step_keep is not None:
            keep = step_keep.to(device=device, dtype=torch.bool)
            if keep.shape == (bsz, n_steps):
                vis = keep[:, None, :].expand(bsz, n_steps, n_steps)
            elif keep.shape == (bsz, n_steps, n_steps):
                vis = keep
            else:
                raise ValueError(f"step_keep must be [B, T] or [B, T, T], got {tuple(keep.shape)}")
            qi = gq.clamp(min=0).expand(bsz, seq, seq)
            ki = gk.clamp(min=0).expand(bsz, seq, seq)
            step_vis = torch.gather(vis.reshape(bsz, -1), 1, (qi * n_steps + ki).reshape(bsz, -1)).reshape(
                bsz, seq, seq
            )
            # a step query sees: the prompt, itself, and earlier steps it keeps
            ok = (gk == -1) | (gk == gq) | (gq < 0) | step_vis
            allowed = allowed & ok
        eye = torch.eye(seq, dtype=torch.bool, device=device)[None]
        allowed = allowed | (eye & (gq == -2))  # padding rows attend to themselves (no NaN)
        zero = torch.zeros((), dtype=self.dtype, device=device)
        neg = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=device)
        return torch.where(allowed, zero, neg)[:, None]

    # ---- persistence -------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:  # type: ignore[override]
        """Write weights (safetensors), config, tokenizer and ``norm_stats.json`` atomically.

        Everything goes to a temporary sibling folder first, which then replaces ``save_directory``,
        so a crash never leaves a half-written checkpoint behind.
        """
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            super().save_pretrained(tmp, safe_serialization=True, **kwargs)
            self.tokenizer.save_pretrained(tmp)
            (tmp / NORM_STATS_FILE).write_text(json.dumps(self.norm_stats, indent=2, sort_keys=True))
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> CompactVLA:  # type: ignore[override]
        """Load a folder written by :meth:`save_pretrained` (local only: nothing is fetched from a hub)."""
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(f"no compact VLA checkpoint folder at {path}")
        kwargs.setdefault("local_files_only", True)
        model = super().from_pretrained(path, *args, **kwargs)
        stats_file = path / NORM_STATS_FILE
        if stats_file.exists():
            model.norm_stats = json.loads(stats_file.read_text())
        if (path / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            model.tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return model
