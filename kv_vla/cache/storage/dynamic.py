"""``dynamic`` storage: a layer's kept keys and values as tensors that grow by concatenation and
shrink by selection; works for every policy (the default, and the only one for unbounded ones)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import CacheLayerMixin

if TYPE_CHECKING:
    from kv_vla.cache.episode_cache import EpisodeCache


class EpisodeLayer(CacheLayerMixin):
    """One layer's kept keys and values, ``[B, H, kept, D]`` in episode-position order.

    All bookkeeping (positions, chunks, decisions) lives in the owning :class:`EpisodeCache`; a
    layer only stores, appends, selects and reports bytes, which is the surface a low-precision
    subclass overrides.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: EpisodeCache, layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.sliding_window = owner.layer_windows[layer_idx]  # masked by kv_vla.cache.masks
        self.is_sliding = self.sliding_window is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new block and return everything this forward attends to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def held_tokens(self) -> int:
        """Columns currently stored (kept tokens, plus the running forward's block)."""
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def select(self, index: torch.Tensor) -> None:
        """Keep only the columns in ``index`` (ascending, on the layer's device)."""
        if self.keys is not None:
            self.keys = self.keys.index_select(2, index)
            self.values = self.values.index_select(2, index)

    def columns(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of columns ``[start, end)`` (full precision), e.g. for a chunk summary."""
        return self.keys[:, :, start:end], self.values[:, :, start:end]

    #: False for storage that cannot re-rotate its keys exactly (e.g. quantised keys): ``cache``
    #: positions are then refused.
    supports_rotation = True

    def rotate_keys(self, start: int, rotate: Any) -> None:
        """Replace the keys of columns ``[start, kept)`` by ``rotate(keys)`` (``cache`` positions)."""
        if self.keys is not None and self.keys.shape[-2] > start:
            # a new tensor, not in place: the keys may be inference tensors touched outside inference mode
            self.keys = torch.cat([self.keys[:, :, :start], rotate(self.keys[:, :, start:])], dim=2)

    def truncate(self, n: int) -> None:
        """Drop columns past ``n`` (rolls back a forward that raised midway)."""
        if self.keys is not None and self.keys.shape[-2] > n:
            self.keys = self.keys[:, :, :n]
            self.values = self.values[:, :, :n]

    def batch_index(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (in that order): beam reordering, repeat and select share it."""
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_index(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self.batch_index(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        index = torch.as_tensor(indices)
        self.batch_index(index.nonzero().squeeze(1) if index.dtype == torch.bool else index.long())

    def nbytes(self) -> int:
        """Bytes of the tensors actually held (a quantised store reports packed bytes + scales)."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner._mask_sizes(query_length)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("EpisodeCache does not support crop (assisted decoding / rollback)")
