"""The interface every VLA the :class:`~kv_vla.runtime.EpisodeRuntime` drives must offer.

The runtime never calls a model's own ``forward``/``generate``: it embeds the prompt and each frame
itself and drives ``language_model`` with ``inputs_embeds``, ``past_key_values`` and explicit
``position_ids``. That is what lets one cache live across a whole episode (OpenVLA's stock
``forward`` cannot continue a cache) and keeps the compact model, the Hugging Face adapters and the
OpenVLA loader interchangeable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from kv_vla.model.action_tokenizer import ActionTokenizer


@runtime_checkable
class VLABackbone(Protocol):
    """Vision encoder + projector + causal language model, seen through embeddings.

    ``language_model(inputs_embeds=, position_ids=, past_key_values=, use_cache=True,
    logits_to_keep=)`` must return an object with ``.logits`` ``[1, T', vocab]`` (a Hugging Face
    ``*ForCausalLM`` or a thin view of one); ``language_model.config`` is the text config the cache is
    built for. The action tokens are the last ``action_tokenizer.n_bins`` ids of its vocabulary.
    """

    language_model: nn.Module
    action_tokenizer: ActionTokenizer
    action_dim: int
    image_size: int
    norm_stats: Mapping[str, Any]
    #: Added to every absolute position (PaliGemma counts positions from 1, everyone else from 0).
    position_offset: int
    # Optional (read with getattr, default False): ``prompt_in_step``. When True the runtime pins only
    # the first prompt token (BOS) and puts the rest of the prompt after every frame, i.e. per step
    # ``[image][prompt][actions]``: OpenVLA's single-frame training layout, repeated per step.

    def embed_prompt(self, text: str) -> torch.Tensor:
        """Token embeddings ``[1, T, H]`` of the already formatted prompt (BOS included if the model uses one)."""
        ...

    def embed_image(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Projected visual tokens ``[1, N, H]`` for one RGB frame (uint8 ``HxWx3``, or a preprocessed tensor)."""
        ...

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[1, T, H]`` of token ids ``[1, T]`` (used to feed decoded action tokens back)."""
        ...

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per frame (``N``); a control step occupies ``N + action_dim`` cache positions."""
        ...


class PromptEmbeddingMixin:
    """``embed_prompt``/``embed_tokens`` through the language model's input embeddings.

    Shared by every backbone here: they differ in how a prompt becomes ids (``prompt_ids``), never in
    how ids become embeddings, which must be exactly the language model's own table so that decoded
    action tokens fed back during a step match what training saw.
    """

    language_model: nn.Module
    device: torch.device

    def prompt_ids(self, text: str) -> torch.Tensor:  # pragma: no cover - each backbone defines it
        raise NotImplementedError

    def embed_prompt(self, text: str) -> torch.Tensor:
        return self.embed_tokens(self.prompt_ids(text))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids.to(self.device))
