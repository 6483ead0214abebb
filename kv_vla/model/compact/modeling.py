"""The compact built-in VLA: a small vision encoder, a space-to-depth projector and a Llama decoder.

OpenVLA's recipe at toy scale, so that everything downstream (episode cache, runtime, ROS node) runs
on a real vision-language-action model that trains on a CPU. The token layout, the action slots
and the instruction highlight are described in docs/ARCHITECTURE.md and models/README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel, ResNetModel, SiglipVisionModel

from kv_vla.model.action_tokenizer import ActionTokenizer, identity_norm_stats
from kv_vla.model.base import PromptEmbeddingMixin
from kv_vla.model.compact import conditioning
from kv_vla.model.compact.configuration import CompactVLAConfig
from kv_vla.model.compact.episode import EpisodeOutput, forward_episode
from kv_vla.model.compact.projectors import SpaceToDepthProjector
from kv_vla.model.image import frames_to_pixel_values
from kv_vla.model.prompt import PROMPT_TEMPLATE
from kv_vla.model.text_tokenizer import build_text_tokenizer

NORM_STATS_FILE = "norm_stats.json"
DEFAULT_UNNORM_KEY = "kv_vla_sim"


class CompactVLA(PromptEmbeddingMixin, PreTrainedModel):
    """The compact VLA; implements :class:`kv_vla.model.base.VLABackbone`.

    With ``action_decoding="parallel"`` (OpenVLA-OFT, Kim et al. 2025) the ``D`` action slots of a
    step are learned queries read at their own positions: one decoder call per step, and no
    ground-truth action in the context, which avoids the copycat problem of cloning with history
    (Wen et al. 2020). ``"autoregressive"`` feeds the previous action tokens back, as OpenVLA does.
    """

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
        # the highlight's word table and layer (names kept from the checkpoints that carry them)
        self.film_words: nn.Embedding | None = None
        self.highlight: nn.Linear | None = None
        if config.highlight:
            self.film_words = nn.Embedding(config.text_vocab_size, config.hidden_size)
            self.highlight = nn.Linear(
                config.hidden_size, conditioning.HIGHLIGHT_PARAMS * config.highlight_slots
            )
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
        if module is getattr(self, "highlight", None):
            conditioning.init_highlight(module)
        elif module is getattr(self, "film_words", None):
            nn.init.normal_(module.weight, std=conditioning.WORD_TABLE_STD)
        elif isinstance(module, SpaceToDepthProjector):
            module.reset_parameters()

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

    # ---- instruction conditioning (kv_vla.model.compact.conditioning) -------------------------
    def instruction_condition(self, prompt_ids: torch.Tensor) -> torch.Tensor | None:
        """The highlight's reads of one prompt (``[P]`` or ``[1, P]`` ids), ``[1, K * H]``; None
        for a model without the highlight."""
        if self.film_words is None:
            return None
        ids = torch.as_tensor(prompt_ids, device=self.device)
        return conditioning.instruction_condition(
            self.film_words, ids, self._template_ids, self.config.highlight_slots
        )

    def instruction_words(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``[1, P]`` prompt ids -> the instruction's ids inside the fixed template, ``[1, I]``."""
        return conditioning.instruction_words(prompt_ids, self._template_ids)

    def highlight_pixels(self, pixel_values: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """The instruction's colour highlight on ``[B, 3, S, S]`` pixels (identity without one)."""
        if self.highlight is None:
            return pixel_values
        return conditioning.highlight_pixels(
            self.highlight, pixel_values, condition, self.config.highlight_slots
        )

    # ---- vision ------------------------------------------------------------------------------
    def vision_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> the vision backbone's patch features ``[B, n_patches, C]``.

        Split from the projector so that training with a frozen backbone can compute these once
        per frame and reuse them every epoch (``kv-vla train --freeze-vision``).
        """
        feats = self.vision(pixel_values=pixel_values).last_hidden_state
        # the ResNet returns a [B, C, h, w] map: flatten it to the ViT's [B, h*w, C] patch sequence
        return feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats

    def encode_pixels(
        self, pixel_values: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, 3, S, S]`` -> projected visual tokens ``[B, N, H]``.

        ``condition`` (from :meth:`instruction_condition`) is required by a highlight model and
        ignored by one without.
        """
        return self.projector(self.vision_patches(self.highlight_pixels(pixel_values, condition)))

    def embed_image(
        self, image: np.ndarray | torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(image, np.ndarray) or (isinstance(image, torch.Tensor) and image.dtype == torch.uint8):
            image = self.pixel_values(image)
        return self.encode_pixels(image, condition)

    # ---- training path (kv_vla.model.compact.episode) ----------------------------------------
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
        step_position_offset: torch.Tensor | None = None,
    ) -> EpisodeOutput:
        """Teacher-forced pass over whole episodes; see :func:`kv_vla.model.compact.episode.forward_episode`."""
        return forward_episode(
            self,
            prompt_ids,
            frames,
            action_ids,
            step_valid=step_valid,
            step_keep=step_keep,
            step_bias=step_bias,
            label_sigma=label_sigma,
            vision_patches=vision_patches,
            step_position_offset=step_position_offset,
        )

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
