"""Static KV storage: preallocated per-layer slot buffers for a bounded episode cache.

A bounded policy knows its largest size in advance (``kv_vla.cache.storage.bound``), so each layer
holds keys and values in fixed ``[B, H, capacity, D]`` buffers. A forward's new block is written
into free slots (``index_copy_``) and eviction only frees slots, so a steady-state step allocates
no KV tensor and attention always sees the same shapes: what ``torch.compile`` and CUDA graphs
need. Attention covers a bucketed prefix of the slots (up to the highest one in use, see
``SPAN_BUCKETS``) and is masked by occupancy: the caller passes the 4-D additive
mask of :meth:`StaticLayer.block_mask` (``EpisodeCache.attention_mask``); transformers' own mask
is sized by ``get_mask_sizes`` and cannot see which slots are free, so it is refused.

The layer keeps the base layer's contract (columns are kept tokens in position order): a column's
slot is ``slots[column]``. Slots are taken lowest-free-first, the same in every layer, so one mask
serves all layers. Buffers grow (once, copying) only when a block does not fit, e.g. after a live
``max_tokens`` increase; :attr:`StaticLayer.grows` counts it.
"""

from __future__ import annotations

from typing import Any

import torch

from kv_vla.cache.storage.dynamic import EpisodeLayer

#: Attention covers slots ``[0, span)``, ``span`` rounded up to ``capacity / SPAN_BUCKETS``: a policy
#: holding far fewer tokens than its bound (a gate evicting below threshold) does not attend over
#: the whole buffer, and a compiled step still sees at most this many shapes per block length.
SPAN_BUCKETS = 8


class StaticLayer(EpisodeLayer):
    """One layer's keys and values in preallocated slots (see module docstring)."""

    is_compileable = True
    needs_block_mask = True  # the cache must build the attention mask (EpisodeCache.attention_mask)

    def __init__(self, owner: Any, layer_idx: int):
        super().__init__(owner, layer_idx)
        self._init_slots()
        self.grows = 0

    def _init_slots(self) -> None:
        self.slots = torch.empty(0, dtype=torch.long)  # slot of each held column, position order (CPU)
        self._reserved: torch.Tensor | None = None  # slots of the next block (CPU)
        self._reserved_dev: torch.Tensor | None = None
        self._pending_capacity: int | None = None  # buffer size the next block needs (None: as is)
        self.span = 0  # slots the next block attends over (set by reserve)

    # ------------------------------------------------------------------ allocation
    @property
    def capacity(self) -> int:
        """Slots per buffer (0 before the first block)."""
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def _allocate(self, like: torch.Tensor, like_v: torch.Tensor, capacity: int) -> None:
        b, h, _, d = like.shape
        keys = like.new_zeros((b, h, capacity, d))
        values = like_v.new_zeros((b, h, capacity, like_v.shape[-1]))
        if self.keys is not None:  # growth: keep what is held, slot for slot
            n = self.capacity
            keys[:, :, :n] = self.keys
            values[:, :, :n] = self.values
            self.grows += 1
        self.keys, self.values = keys, values
        self.dtype, self.device = like.dtype, like.device
        self.is_initialized = True
        if self.device.type == "cuda":  # CUDA graphs replay on fixed addresses
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def reserve(self, n: int, capacity_hint: int, like: StaticLayer | None = None) -> torch.Tensor:
        """Pick the slots of the next ``n``-token block (lowest free first); returns them (CPU).

        ``capacity_hint`` is the bound the owner computed; buffers are (re)sized to it when they are
        first allocated or when ``held + n`` would not fit. ``like``: a layer that already reserved
        this block; its choice is taken when both hold as many slots in buffers of one size (the
        slots are then the same: lowest-free-first in every layer), so a forward chooses once.
        """
        held = int(self.slots.numel())
        if (
            like is not None
            and like._reserved is not None
            and int(like._reserved.numel()) == n
            and like.capacity == self.capacity
            and like.held_tokens() == held
        ):
            self._pending_capacity, self._reserved, self.span = like._pending_capacity, like._reserved, like.span
            self._reserved_dev = None
            return self._reserved
        fits = self.keys is not None and held + n <= self.capacity
        self._pending_capacity = None if fits else max(held + n, capacity_hint)
        cap = self._pending_capacity or self.capacity
        self._reserved = self.free_slots(cap)[:n]
        self._reserved_dev = None
        high = int(self._reserved.max()) + 1 if n else 0
        if self.slots.numel():
            high = max(high, int(self.slots.max()) + 1)
        self.span = self.span_of(high, cap)
        return self._reserved

    def free_slots(self, capacity: int | None = None) -> torch.Tensor:
        """Slots not held, ascending (CPU), of a buffer of ``capacity`` slots (default: the current one)."""
        free = torch.ones(self.capacity if capacity is None else capacity, dtype=torch.bool)
        free[self.slots] = False
        return free.nonzero().squeeze(1)

    def span_of(self, high: int, capacity: int | None = None) -> int:
        """Slots attended when the highest slot in use is ``high - 1``: a prefix of the buffer,
        ``high`` rounded up to a multiple of ``capacity / SPAN_BUCKETS`` (default: the current one)."""
        cap = self.capacity if capacity is None else capacity
        step = -(-cap // SPAN_BUCKETS)
        return min(cap, -(-high // step) * step)

    def block_mask(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive ``[1, 1, n, span]`` mask of the reserved block: every held slot is visible (all
        kept tokens precede the block) and the block is causal within itself."""
        if self._reserved is None or int(self._reserved.numel()) != n:
            raise RuntimeError("block_mask: call reserve(n) first")
        blocked = torch.finfo(dtype).min
        held = torch.ones(self.span, dtype=torch.bool)
        held[self.slots] = False  # True where a slot is not held
        row = torch.zeros(self.span, dtype=dtype).masked_fill_(held, blocked)
        mask = row.expand(n, self.span).clone()  # one row built, then copied: every query sees the held slots
        causal = torch.zeros(n, n, dtype=dtype).masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), blocked)
        mask.index_copy_(1, self._reserved, causal)
        return mask.to(device)[None, None]

    def reserved_slots(self, device: torch.device) -> torch.Tensor:
        """The reserved block's slots on ``device`` (the compiled step's ``index_copy_`` index)."""
        if self._reserved_dev is None or self._reserved_dev.device != device:
            self._reserved_dev = self._reserved.to(device)
        return self._reserved_dev

    def ensure_capacity(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate (or grow) the buffers the last :meth:`reserve` sized."""
        if self._pending_capacity is not None:
            self._allocate(key_states, value_states, self._pending_capacity)
            self._pending_capacity = None

    # ------------------------------------------------------------------ EpisodeLayer contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.ensure_capacity(key_states, value_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new block into its reserved slots; return the whole buffers (masked by the caller)."""
        n = int(key_states.shape[-2])
        if self._reserved is None or int(self._reserved.numel()) != n:
            raise ValueError(
                "storage 'static': pass attention_mask=cache.attention_mask(query_length) to the model "
                "for every forward (a 4-D mask over the slots); transformers' own mask cannot see which "
                "slots are held"
            )
        self.ensure_capacity(key_states, value_states)
        index = self.reserved_slots(key_states.device)
        self.keys.index_copy_(2, index, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, index, value_states.to(self.values.dtype))
        self.commit_block()
        return self.keys[:, :, : self.span], self.values[:, :, : self.span]

    def commit_block(self) -> None:
        """Record the reserved block as held (its slots were written by :meth:`update` or a compiled step)."""
        self.slots = torch.cat([self.slots, self._reserved])
        self._reserved = self._reserved_dev = None

    def held_tokens(self) -> int:
        return int(self.slots.numel())

    def select(self, index: torch.Tensor) -> None:
        """Keep only the columns in ``index``: their slots stay, every other slot is free."""
        self.slots = self.slots[index.to("cpu")]

    def columns(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns ``[start, end)``: a view when their slots are consecutive (the usual chunk), else a gather."""
        slots = self.slots[start:end]
        listed = slots.tolist()  # a chunk's few slots: checked in Python, cheaper than tensor ops
        if listed and listed == list(range(listed[0], listed[0] + len(listed))):
            a, b = listed[0], listed[-1] + 1
            return self.keys[:, :, a:b], self.values[:, :, a:b]
        index = slots.to(self.keys.device)
        return self.keys.index_select(2, index), self.values.index_select(2, index)

    def rotate_keys(self, start: int, rotate: Any) -> None:
        """Re-rotate the keys of columns ``[start, held)`` in their slots (``cache`` positions)."""
        if self.keys is None or self.held_tokens() <= start:
            return
        index = self.slots[start:].to(self.keys.device)
        with torch.inference_mode(self.keys.is_inference()):  # in place, whichever mode made the buffer
            self.keys.index_copy_(2, index, rotate(self.keys.index_select(2, index)))

    def truncate(self, n: int) -> None:
        self.slots = self.slots[:n]
        self._reserved = self._reserved_dev = None

    def nbytes(self) -> int:
        """Bytes of the held slots (the same accounting as the dynamic storage's kept columns)."""
        if self.keys is None:
            return 0
        per_slot = self.keys[:, :, :1].numel() * self.keys.element_size()
        per_slot += self.values[:, :, :1].numel() * self.values.element_size()
        return self.held_tokens() * per_slot

    def reserved_nbytes(self) -> int:
        """Bytes preallocated for the whole bound (what the process really holds for this layer)."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def slot_mass_to_columns(self, mass: torch.Tensor) -> torch.Tensor:
        """Attention mass per slot (the probe's ``[capacity]``) -> per held column, position order."""
        return mass.index_select(0, self.slots.to(mass.device))

    def reset(self) -> None:
        """New episode: every slot is free; the buffers stay (same addresses, nothing recompiles)."""
        self._init_slots()
