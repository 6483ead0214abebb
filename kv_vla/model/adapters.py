"""Run Hugging Face vision-language models (vision tower + projector + LM) through the episode runtime.

Each adapter exposes a model as a :class:`~kv_vla.model.base.VLABackbone`: the runtime embeds the
prompt and the frames itself and drives the decoder with ``inputs_embeds`` / ``past_key_values`` /
explicit positions, so the model's stock ``forward`` (which expects ``<image>`` placeholders and
cannot continue an episode cache) is never used. The episode layout is the runtime's: the prompt,
then per control step ``[image tokens][action tokens]``. For a full sequence without eviction
this is exactly what the stock ``forward`` computes when the ``<image>`` placeholders sit at the
image slots (the tests check that); a pretrained VLM still has to be fine-tuned on that layout and
on OpenVLA-style action tokens (the last ``n_bins`` ids of its vocabulary) to act well.

Supported here: ``LlavaForConditionalGeneration`` and ``PaliGemmaForConditionalGeneration`` (Gemma
1 decoder, or PaliGemma 2's Gemma 2 decoder, whose sliding-window layers the episode cache masks by
the kept tokens' positions). All were tested on tiny random configurations built locally, not on
released checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from kv_vla.model.action_tokenizer import ActionTokenizer, identity_norm_stats
from kv_vla.model.base import PromptEmbeddingMixin
from kv_vla.model.image import frames_to_pixel_values

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


class CausalLMView(nn.Module):
    """A decoder (``*Model``) plus its ``lm_head`` seen as a ``*ForCausalLM``: what the runtime calls.

    Multimodal wrappers keep the LM head outside the language model; this view puts them back
    together without copying weights. ``logits_to_keep`` limits the head to the last positions.
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, config: Any) -> None:
        super().__init__()
        self.model = decoder
        self.lm_head = lm_head
        self.config = config
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_attn_implementation(self, implementation: str) -> None:
        """Delegated to the decoder (used to switch the cache's attention probe on and off)."""
        self.model.set_attn_implementation(implementation)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            attention_mask=attention_mask,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)


Tokenize = Callable[[str], Sequence[int]]


class HFVLMAdapter(PromptEmbeddingMixin, nn.Module):
    """Common part of the adapters: prompt/tokens/image embedding around a ``CausalLMView``.

    Args:
        hf_model: the Hugging Face ``*ForConditionalGeneration`` model.
        tokenizer: a HF tokenizer (called with the prompt, BOS included as the model expects) or a
            function ``text -> ids``.
        action_dim: action dimensions decoded per step (OpenVLA: 7; the simulator: 4).
        norm_stats: OpenVLA-format statistics ``{key: {"action": {"q01", "q99", "mask"}}}``;
            default: identity on ``[-1, 1]``.
        image_mean, image_std: pixel normalisation of the vision tower.
        n_bins: action bins (the last ``n_bins`` vocabulary ids).
    """

    position_offset = 0

    def __init__(
        self,
        hf_model: nn.Module,
        language_model: CausalLMView,
        tokenizer: Any,
        action_dim: int,
        image_size: int,
        num_image_tokens: int,
        norm_stats: Mapping[str, Any] | None = None,
        image_mean: Sequence[float] = HALF,
        image_std: Sequence[float] = HALF,
        n_bins: int = 256,
    ) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.action_dim = int(action_dim)
        self.image_size = int(image_size)
        self._num_image_tokens = int(num_image_tokens)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        vocab = int(language_model.config.vocab_size)
        self.action_tokenizer = ActionTokenizer(vocab, n_bins=n_bins)
        self.norm_stats: dict[str, Any] = (
            dict(norm_stats) if norm_stats is not None else {"default": identity_norm_stats(self.action_dim)}
        )

    @property
    def num_image_tokens(self) -> int:
        return self._num_image_tokens

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def prompt_ids(self, text: str) -> torch.Tensor:
        if callable(self.tokenizer) and not hasattr(self.tokenizer, "convert_tokens_to_ids"):
            ids = list(self.tokenizer(text))
        else:
            ids = self.tokenizer(text).input_ids
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def pixel_values(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        return frames_to_pixel_values(
            image, self.image_size, self.image_mean, self.image_std, device=self.device, dtype=self.dtype
        )

    def embed_image(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(image, np.ndarray) or image.dtype == torch.uint8:
            image = self.pixel_values(image)
        out = self.hf_model.get_image_features(pixel_values=image)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        return feats.reshape(1, -1, feats.shape[-1])


class LlavaAdapter(HFVLMAdapter):
    """``LlavaForConditionalGeneration`` (CLIP-style tower, MLP projector, Llama/Mistral/Qwen LM)."""

    def __init__(self, hf_model: nn.Module, tokenizer: Any, action_dim: int = 7, **kwargs: Any) -> None:
        cfg = hf_model.config
        vcfg = cfg.vision_config
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        n_tokens = patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        lm = CausalLMView(hf_model.model.language_model, hf_model.lm_head, cfg.text_config)
        kwargs.setdefault("image_mean", CLIP_MEAN)
        kwargs.setdefault("image_std", CLIP_STD)
        super().__init__(hf_model, lm, tokenizer, action_dim, vcfg.image_size, n_tokens, **kwargs)


class PaliGemmaAdapter(HFVLMAdapter):
    """``PaliGemmaForConditionalGeneration`` (SigLIP tower, linear projector, Gemma LM).

    PaliGemma counts positions from 1 (kept) and was trained as a prefix-LM: bidirectional over its
    image+prompt block. transformers marks its Gemma attention non-causal
    (``use_bidirectional_attention``) and relies on the mask it builds in ``forward``; driven
    through a cache with no explicit mask, whether a block then attends causally would depend on
    the attention backend's mask-skipping. An episode cache needs one rule, so the adapter switches
    the decoder to causal attention everywhere (config and every attention module). This changes
    the prompt's self-attention relative to PaliGemma's prefix-LM training: fine-tune accordingly.
    """

    position_offset = 1

    def __init__(self, hf_model: nn.Module, tokenizer: Any, action_dim: int = 7, **kwargs: Any) -> None:
        cfg = hf_model.config
        vcfg = cfg.vision_config
        n_tokens = (vcfg.image_size // vcfg.patch_size) ** 2
        decoder = hf_model.model.language_model
        cfg.text_config.use_bidirectional_attention = False
        decoder.config.use_bidirectional_attention = False
        for module in decoder.modules():
            if module is not decoder and hasattr(module, "is_causal"):
                module.is_causal = True
        lm = CausalLMView(decoder, hf_model.lm_head, cfg.text_config)
        super().__init__(hf_model, lm, tokenizer, action_dim, vcfg.image_size, n_tokens, **kwargs)


def adapt(hf_model: nn.Module, tokenizer: Any, **kwargs: Any) -> HFVLMAdapter:
    """Pick the adapter for a Hugging Face VLM by its ``model_type``."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", "")
    if model_type == "llava":
        return LlavaAdapter(hf_model, tokenizer, **kwargs)
    if model_type == "paligemma":
        return PaliGemmaAdapter(hf_model, tokenizer, **kwargs)
    raise ValueError(f"no adapter for model_type {model_type!r}; supported: llava, paligemma")
