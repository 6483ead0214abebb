"""The chunked episode KV cache: a ``transformers.Cache`` that lives for a whole control episode.

Longer than ~400 lines on purpose: the chunk timeline, the decisions and both position modes are
one state shared by all layers; storage is in ``kv_vla/cache/storage/``, masks in ``masks.py``,
rotation in ``positions.py`` and model checks in ``compat.py``.

Semantics (see DESIGN.md, "Cache semantics that must hold"):

* Keys are cached already rotated. Evicting a token just drops its column. ``get_seq_length()`` is
  the next position id (HF derives new position ids and the query offset from it), and
  ``get_mask_sizes`` reports ``kv_length = kept + new`` with ``kv_offset = next - kept``: every
  kept token lies before the first query (all visible) and the new block stays causal within
  itself. The position mode (``config.positions``, :mod:`kv_vla.cache.positions`) sets ``next``:
  ``episode``: survivors keep their original positions and ``next`` is the number of tokens *seen*;
  ``cache``: kept column ``j`` is at position ``j`` (keys re-rotated when a gap closes) and ``next``
  is the number of kept tokens, bounded by the budget. ``generate()`` derives positions from its
  whole ``input_ids`` and so needs ``episode``.
* Tokens are grouped into chunks of ``chunk_size`` consecutive positions, with boundaries counted
  from the end of the pinned prefix (so a chunk is one control step when ``chunk_size`` is a step's
  tokens); sink tokens are cut from the front of the first chunk(s). The prefix (``pin_prefix``), the sinks, the
  ``recent_chunks`` newest complete chunks and the open (incomplete) chunk are never evicted.
* Decisions are shared by all layers (one chunk timeline) and causal: they only look at complete
  chunks. A forward that completes a chunk leaves a *pending* decision, applied at the next access
  that depends on it: the start of the next forward (``get_mask_sizes`` / the first layer's
  ``update``), ``stats()``, ``kept_positions()`` or an explicit ``maybe_evict()`` (which the
  runtime calls after each step to free memory at once). Deciding lazily, rather than inside the
  last layer's ``update``, lets the decision use everything the completing forward produced,
  including the last layer's attention probe, and never changes tensors a running forward holds.
* Nothing grows with the episode but counters: only kept chunks have a record (evicted ones are
  counted), and per-step work scales with the kept tokens, not the tokens seen.
* ``max_tokens`` is a hard budget on kept tokens between forward calls (a forward's own new block
  is held while it runs): a decision evicts until the kept tokens *plus the room the open chunk
  still needs to complete* fit, so the budget holds until the next decision.

Storage: per layer, ``keys``/``values`` tensors ``[B, H, kept, D]`` in position order plus one
shared index of the kept positions; eviction is an ``index_select`` of the kept columns. Per-chunk
metadata (:class:`Chunk`) carries ``precision`` so that a low-precision store can later swap how a
chunk's columns are held by subclassing :class:`EpisodeLayer` (``layer_cls``) and reporting its
packed bytes through :meth:`EpisodeLayer.nbytes`.

Masks: after an eviction every mask (causal, sliding window, padding flags) is evaluated at the kept
tokens' positions (:mod:`kv_vla.cache.masks`), so padded batches and sliding-window layers stay
exact; model features that cannot be kept exact are refused when the cache is built
(:mod:`kv_vla.cache.compat`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from kv_vla.cache import compat, masks, probe
from kv_vla.cache.chunks import CacheStats, Chunk
from kv_vla.cache.config import EpisodeCacheConfig
from kv_vla.cache.policies import POLICIES, ChunkPolicy, GatedPolicy, PolicyContext
from kv_vla.cache.positions import RopeRotator, closing_deltas
from kv_vla.cache.storage.dynamic import EpisodeLayer
from kv_vla.cache.summary import check_summary_keys, chunk_summary, layers_summary


class EpisodeCache(Cache):
    """Chunked KV cache for a whole episode, with pluggable chunk eviction (see module docstring).

    Args:
        config: validated cache configuration.
        model_config: the HF decoder's config (text config of a multimodal model is found).
        policy: optional policy instance overriding ``config.policy`` (e.g. with non-default fields).
        layer_cls: storage class per layer (default: the one ``config.storage`` names, see
            :mod:`kv_vla.cache.storage`; an extension point for low-precision chunk storage).
        record_summaries: compute every completed chunk's summary (always on for ``gated``), so a
            trainer can read :meth:`chunk_summaries` after recording an episode.
        summary_keys: keys the summaries read, ``"rotated"`` or ``"unrotated"`` (RoPE undone);
            :meth:`set_gate` takes the gate's own (``GateConfig.summary_keys``).
    """

    def __init__(
        self,
        config: EpisodeCacheConfig,
        model_config: Any,
        policy: ChunkPolicy | None = None,
        layer_cls: type[EpisodeLayer] | None = None,
        record_summaries: bool = False,
        summary_keys: str = "rotated",
    ):
        if layer_cls is None:
            from kv_vla.cache.storage import layer_class

            layer_cls = layer_class(config.storage)
        cfg = compat.text_config(model_config)
        windows = compat.check_model(cfg)
        compat.check_storage(windows, layer_cls)
        masks.install()
        self.model_config = cfg
        self.num_layers = int(cfg.num_hidden_layers)
        self.layer_windows = windows  # per layer: sliding window in tokens, or None (full attention)
        super().__init__(layers=[layer_cls(self, i) for i in range(self.num_layers)])
        self.config = config.validate()
        if self.config.chunk_size < 1:
            raise ValueError(
                "chunk_size: 0 means one control step, which EpisodeRuntime resolves at reset; "
                "a cache built directly needs the chunk size in tokens (an integer >= 1)"
            )
        self.record_summaries = record_summaries
        self._summary_rotator = self._check_summary_keys(summary_keys)
        self._gate = None
        self.policy = self._attach(policy if policy is not None else self._make_policy(config))
        self._rotator = self._check_positions(self.config.positions)
        self._mode = self.config.positions
        self._clear()

    # ------------------------------------------------------------------ episode state
    def _clear(self) -> None:
        self._seen = 0
        self._pinned = 0  # length of the pinned prefix
        self._positions = torch.empty(0, dtype=torch.long)  # kept positions, ascending (CPU)
        self._attn = None  # accumulated attention mass per kept column (device), or None
        self._chunks: list[Chunk] = []  # kept completed chunks, in order (evicted ones are only counted)
        self._new_chunks: list[Chunk] = []  # completed, not yet seen by a decision
        self._completed = 0  # chunks completed in this episode (the next chunk's index)
        self._evicted_chunks = 0
        self._summary_log: list[torch.Tensor] = []  # every chunk's summary, only with record_summaries
        self._max_position = -1  # largest position id (before the model's offset) used so far
        self._origin = 0  # chunk boundaries lie at origin + k * chunk_size
        self._open_start = self.config.effective_sink_tokens
        self._evicted_tokens = 0
        self._decisions = 0
        self._in_forward = False

    def reset(self) -> None:
        """Start a new episode: drop every tensor and all chunk/policy state (keeps config and gate)."""
        for layer in self.layers:
            layer.reset()
        self.policy.reset()
        self._rotator = self._check_positions(self.config.positions)
        self._mode = self.config.positions
        self._clear()

    def _check_positions(self, mode: str) -> RopeRotator | None:
        """The RoPE rotator ``cache`` positions need (None for ``episode``); ValueError if refused."""
        if mode != "cache":
            return None
        rotator = RopeRotator.for_config(self.model_config)
        odd = sorted({type(layer).__name__ for layer in self.layers if not layer.supports_rotation})
        if odd:
            raise ValueError(
                f"positions: 'cache' needs keys that can be re-rotated exactly, but layer storage {odd} "
                f"(policy {self.config.policy!r}) cannot; allowed values with this policy: ['episode']"
            )
        return rotator

    @property
    def position_mode(self) -> str:
        """The position mode of the running episode (a changed ``config.positions`` waits for ``reset``)."""
        return self._mode

    def _make_policy(self, config: EpisodeCacheConfig) -> ChunkPolicy:
        cls = POLICIES[config.policy]
        policy = cls.from_config(config)
        if isinstance(policy, GatedPolicy):
            policy.gate = self._gate  # None: a default gate is sized from the first cached tensors
        return policy

    def _ensure_gate(self) -> None:
        """Give a gated policy without a gate the seeded default one, sized from the key and value
        widths actually cached (multi-head latent attention caches neither ``head_dim``)."""
        if not isinstance(self.policy, GatedPolicy) or self.policy.gate is not None:
            return
        if self._gate is None:
            from kv_vla.cache.gate import ChunkGate

            widths = {
                (int(ly.keys.shape[-1]), int(ly.values.shape[-1]))
                for ly in self.layers
                if ly.keys is not None
            }
            if len(widths) != 1:
                raise ValueError(
                    f"model_config: cached key/value widths differ between layers {sorted(widths)}; "
                    "the default gate needs one width per layer (pass a gate with set_gate)"
                )
            ((key_dim, value_dim),) = widths
            self._gate = ChunkGate.for_widths(self.num_layers, key_dim, value_dim, seed=self.config.seed)
        self.policy.gate = self._gate

    def _attach(self, policy: ChunkPolicy) -> ChunkPolicy:
        """Let a policy bind to this cache (``policy.attach(cache)``, e.g. to swap layer storage)."""
        attach = getattr(policy, "attach", None)
        if callable(attach):
            attach(self)
        return policy

    def _check_summary_keys(self, summary_keys: str) -> RopeRotator | None:
        """The rotator that undoes RoPE for ``"unrotated"`` summaries (None: as cached); ValueError
        naming why for a value not in ``summary.SUMMARY_KEYS`` or a model whose RoPE cannot be undone."""
        if check_summary_keys(summary_keys) == "rotated":
            return None
        try:
            return RopeRotator.for_config(self.model_config)
        except ValueError as exc:
            raise ValueError(f"summary_keys: 'unrotated' needs keys whose RoPE can be undone: {exc}") from exc

    def set_gate(self, gate: Any) -> None:
        """Use ``gate`` (a :class:`kv_vla.cache.gate.ChunkGate`) for the ``gated`` policy; its
        summaries read the keys its config names (ValueError, nothing changed, when refused)."""
        self._summary_rotator = self._check_summary_keys(getattr(gate.config, "summary_keys", "rotated"))
        self._gate = gate
        if isinstance(self.policy, GatedPolicy):
            self.policy.gate = gate
            self.policy.reset()

    @property
    def gate(self) -> Any:
        """The gate in use (``gated`` policy), or None."""
        return self._gate

    def update_config(self, **changes: Any) -> EpisodeCacheConfig:
        """Apply validated ``changes``; they take effect at the next eviction decision.

        A new ``max_tokens`` is checked against the pinned prefix at once; a new ``chunk_size``
        applies from the open chunk on (closed chunks keep their size); a new ``sink_tokens`` applies
        from the next episode (``reset``/``pin_prefix``); a new ``positions`` is checked at once and
        applies from the next episode (``reset``), or at once while nothing is cached; a new
        ``policy`` starts from the chunks as they are (utilities of the old policy are kept until
        re-scored).
        """
        new = self.config.replace(**changes)
        if new.chunk_size < 1:
            raise ValueError("chunk_size: a cache needs the chunk size in tokens (an integer >= 1)")
        new.check_budget(self._pinned)
        old = self.config
        if new.chunk_size != old.chunk_size:
            self._origin = self._open_start  # the open chunk is re-cut from its start
        self.config = new
        try:
            if new.policy != old.policy:
                self.policy = self._attach(self._make_policy(new))
            else:
                self.policy.set_options(new)
            rotator = self._check_positions(new.positions)
        except ValueError:
            self.config = old
            if new.policy != old.policy:
                self.policy = self._attach(self._make_policy(old))
            else:
                self.policy.set_options(old)
            raise
        if self._seen == 0:
            self._rotator, self._mode = rotator, new.positions
        return new

    def pin_prefix(self) -> int:
        """Pin everything cached so far (the instruction prompt): never evicted. Returns its length.

        Call it right after the prompt's forward, before any access that would apply a decision.
        """
        if self._evicted_tokens:
            raise RuntimeError(
                "pin_prefix must be called before any chunk was evicted (right after the prompt)"
            )
        self.config.check_budget(self._seen)
        self._pinned = self._seen
        self._chunks = []
        self._new_chunks = []
        self._origin = self._pinned
        self._open_start = self._pinned + self.config.effective_sink_tokens
        self.policy.reset()
        return self._pinned

    # ------------------------------------------------------------------ HF Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The next position id: tokens seen (``episode`` positions) or kept (``cache`` positions).

        In ``cache`` mode a pending decision is applied first (outside a forward), so the position
        ids a caller derives from it are those the next forward is masked and rotated for.
        """
        if self._mode == "episode":
            return self._seen
        if not self._in_forward:
            self._apply_pending()
        return int(self._positions.numel())

    def next_position(self) -> int:
        """Position id of the next token (before the model's own offset); same as ``get_seq_length``."""
        return self.get_seq_length()

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        """``(kept + new, next - kept)``: all kept tokens precede the queries, the new block is causal.

        Accepts the query length (transformers >= 5.x) or a ``cache_position`` tensor (older 5.x).
        """
        if isinstance(query_length, torch.Tensor):
            query_length = int(query_length.shape[-1])
        return self._mask_sizes(int(query_length))

    def _mask_sizes(self, query_length: int) -> tuple[int, int]:
        if getattr(self.layers[0], "needs_block_mask", False):
            raise ValueError(
                f"storage {self.config.storage!r}: pass attention_mask=cache.attention_mask(query_length) "
                "to the model (a 4-D mask over the storage's slots); transformers' mask cannot see them"
            )
        self._start_forward()
        kept = int(self._positions.numel())
        nxt = self._seen if self._mode == "episode" else kept
        sizes = kept + query_length, nxt - kept
        masks.announce(self._mask_plan(query_length, *sizes))
        return sizes

    def _mask_plan(self, query_length: int, kv_length: int, kv_offset: int) -> masks.MaskPlan:
        """The positions the next forward's mask is evaluated at: kept columns + new block, queries.

        ``episode`` positions: the original positions (gaps where chunks were evicted); ``cache``
        positions: column indices (the stock mask is already right).
        """
        nxt = kv_offset + kv_length - query_length
        new = torch.arange(nxt, nxt + query_length, dtype=torch.long)
        kept = self._positions if self._mode == "episode" else torch.arange(kv_length - query_length)
        return masks.MaskPlan(query_length, kv_length, kv_offset, torch.cat([kept, new]), new)

    def attention_mask(
        self, query_length: int, dtype: torch.dtype = torch.float32, device: Any = "cpu"
    ) -> torch.Tensor | None:
        """The 4-D mask the next forward of ``query_length`` tokens must be given, or None.

        None for the dynamic storage (transformers builds the mask from :meth:`get_mask_sizes`);
        a storage with slots (``static``) reserves the block's slots here and returns the additive
        ``[1, 1, query_length, capacity]`` mask over them.
        """
        if not getattr(self.layers[0], "needs_block_mask", False):
            return None
        from kv_vla.cache.storage import capacity

        self._start_forward()
        pinned = self._pinned if self._pinned else self._seen + query_length
        hint = capacity(self.config, pinned)
        first = self.layers[0]
        first.reserve(query_length, hint)
        for layer in self.layers[1:]:
            layer.reserve(query_length, hint, like=first)
        return first.block_mask(query_length, dtype, torch.device(device))

    def commit_block(self, n_new: int) -> None:
        """Record an ``n_new``-token block that a compiled step wrote into every layer's reserved slots."""
        self._start_forward()
        for layer in self.layers:
            layer.commit_block()
        self._commit(n_new)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a block to layer ``layer_idx``; the last layer's update commits it to the timeline."""
        if layer_idx == 0:
            self._start_forward()
            evicted = self._mode == "episode" and int(self._positions.numel()) < self._seen
            compat.check_stock_mask(masks.took_plan(), evicted, self.layer_windows)
            self._in_forward = True
        keys, values = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        probe.announce(self, layer_idx, int(keys.shape[-2]))
        if layer_idx == self.num_layers - 1:
            self._commit(int(key_states.shape[-2]))
        return keys, values

    def _start_forward(self) -> None:
        if self._in_forward:  # the previous forward raised midway: drop its partial block
            self._rollback_incomplete_forward()
            self._in_forward = False
        self._apply_pending()

    def _rollback_incomplete_forward(self) -> None:
        kept = int(self._positions.numel())
        for layer in self.layers:
            if layer.held_tokens() > kept:
                layer.truncate(kept)
        if self._attn is not None and self._attn.numel() > kept:
            self._attn = self._attn[:kept]

    # ------------------------------------------------------------------ timeline
    def _commit(self, n_new: int) -> None:
        self._in_forward = False
        new = torch.arange(self._seen, self._seen + n_new, dtype=torch.long)
        self._positions = torch.cat([self._positions, new])
        self._seen += n_new
        held = self._seen if self._mode == "episode" else int(self._positions.numel())
        self._max_position = max(self._max_position, held - 1)
        self._pad_attention()
        while self._seen >= (end := self._open_end()):
            chunk = Chunk(index=self._completed, start=self._open_start, length=end - self._open_start)
            self._completed += 1
            self._chunks.append(chunk)
            self._new_chunks.append(chunk)
            self._open_start = end

    def _open_end(self) -> int:
        """End of the open chunk: the next boundary ``origin + k * chunk_size`` after its start.

        Boundaries stay aligned with the prefix end (one chunk per control step) even when sink
        tokens shorten the first chunk.
        """
        cs = self.config.chunk_size
        return self._open_start + cs - (self._open_start - self._origin) % cs

    def _pad_attention(self) -> None:
        n = int(self._positions.numel())
        if self._attn is not None and self._attn.numel() < n:
            self._attn = torch.nn.functional.pad(self._attn, (0, n - self._attn.numel()))

    def record_attention(self, layer_idx: int, mass: torch.Tensor) -> None:
        """Add attention mass received per kv column (``[kv_len]``, kept + new) from one layer.

        Called by the attention probe (``probe.py``); averaged over layers for the shared score, and
        handed unchanged to the layer when its storage keeps per-layer scores (``record_attention``).
        """
        to_columns = getattr(self.layers[layer_idx], "slot_mass_to_columns", None)
        if callable(to_columns):  # a storage with slots reports mass per slot
            mass = to_columns(mass)
        layer_hook = getattr(self.layers[layer_idx], "record_attention", None)
        if callable(layer_hook):
            layer_hook(mass.detach().float())
        mass = mass.detach().float() / self.num_layers
        if self._attn is None:
            self._attn = torch.zeros(mass.shape[0], device=mass.device)
        elif self._attn.numel() < mass.shape[0]:
            self._attn = torch.nn.functional.pad(self._attn, (0, mass.shape[0] - self._attn.numel()))
        self._attn[: mass.shape[0]] += mass

    def _chunk_columns(self, chunk: Chunk) -> tuple[int, int]:
        a = int(torch.searchsorted(self._positions, chunk.start))
        b = int(torch.searchsorted(self._positions, chunk.end))
        return a, b

    def _chunk_attention(self, chunk: Chunk) -> float:
        a, b = self._chunk_columns(chunk)
        if self._attn is None or b <= a:
            return 0.0
        return float(self._attn[a:b].mean())

    def _chunk_summary(self, chunk: Chunk) -> torch.Tensor:
        if chunk.summary is None:
            a, b = self._chunk_columns(chunk)
            columns = [layer.columns(a, b) for layer in self.layers]
            keys = [k for k, _ in columns]
            if self._summary_rotator is not None and b > a:
                # undo RoPE: keys are rotated at their episode positions, or at their columns (cache
                # positions); a model's constant position offset leaves one rotation shared by every chunk
                at = self._positions[a:b] if self._mode == "episode" else torch.arange(a, b)
                keys = [self._summary_rotator.rotate(k, -at) for k in keys]
            per_layer = layers_summary(keys, [v for _, v in columns])
            mass = self._chunk_attention(chunk) if self._attn is not None else None
            chunk.summary = chunk_summary([per_layer], mass, chunk.index)
        return chunk.summary

    def _context(self) -> PolicyContext:
        return PolicyContext(
            config=self.config,
            seen_tokens=self._seen,
            attention_mass=self._chunk_attention if self._attn is not None else None,
            summary=self._chunk_summary,
        )

    def maybe_evict(self) -> list[Chunk]:
        """Apply a pending decision now (if a chunk completed since the last one). Returns evicted chunks."""
        return self._apply_pending()

    def _apply_pending(self) -> list[Chunk]:
        if not self._new_chunks or self._in_forward:
            return []  # nothing completed, or called from inside a forward: decide later
        self._ensure_gate()
        ctx = self._context()
        if self.record_summaries or isinstance(self.policy, GatedPolicy):
            for chunk in self._new_chunks:
                self._chunk_summary(chunk)
                if self.record_summaries:
                    self._summary_log.append(chunk.summary)
        for chunk in self._new_chunks:
            self.policy.observe(chunk, ctx)
        self._new_chunks = []
        self._decisions += 1
        return self._decide(ctx)

    def _decide(self, ctx: PolicyContext) -> list[Chunk]:
        first_recent = self._completed - self.config.effective_recent_chunks
        candidates = [c for c in self._chunks if c.index < first_recent]
        if not candidates:
            return []
        utilities = [float(u) for u in self.policy.score(candidates, ctx)]
        keep = self.policy.keep(candidates, utilities, ctx)
        evict = [c for c, k in zip(candidates, keep) if not k]
        budget = self.config.effective_max_tokens
        if budget is not None:
            # leave room for the open chunk to fill up, so the budget holds until the next decision
            headroom = max(0, self._open_end() - max(self._seen, self._open_start))
            kept_after = int(self._positions.numel()) + headroom - sum(c.length for c in evict)
            survivors = sorted(
                (i for i, k in enumerate(keep) if k), key=lambda i: (utilities[i], candidates[i].index)
            )
            for i in survivors:
                if kept_after <= budget:
                    break
                evict.append(candidates[i])
                kept_after -= candidates[i].length
        if evict:
            self._evict(evict)
        return evict

    def _evict(self, chunks: list[Chunk]) -> None:
        keep = torch.ones(self._positions.numel(), dtype=torch.bool)
        for chunk in chunks:
            a, b = self._chunk_columns(chunk)
            keep[a:b] = False
            chunk.evicted = True
            chunk.summary = None  # the policy has read it; nothing of an evicted chunk is held
            self._evicted_tokens += b - a
        self._evicted_chunks += len(chunks)
        gone = {id(c) for c in chunks}
        self._chunks = [c for c in self._chunks if id(c) not in gone]
        index = keep.nonzero().squeeze(1)
        self._positions = self._positions[index]
        device_index: dict[torch.device, torch.Tensor] = {}
        for layer in self.layers:
            if layer.keys is None:
                continue
            dev = layer.keys.device
            if dev not in device_index:
                device_index[dev] = index.to(dev)
            layer.select(device_index[dev])
        if self._attn is not None:
            self._attn = self._attn.index_select(0, index.to(self._attn.device))
        if self._rotator is not None:
            self._close_gaps(index)

    def _close_gaps(self, index: torch.Tensor) -> None:
        """``cache`` positions: re-rotate every key after the first closed gap to its new column."""
        first, delta = closing_deltas(index)
        if delta.numel() == 0:
            return
        rotator = self._rotator
        for layer in self.layers:
            layer.rotate_keys(first, lambda keys: rotator.rotate(keys, delta))

    # ------------------------------------------------------------------ introspection
    def kept_positions(self) -> torch.Tensor:
        """Episode positions (order of arrival) of the tokens still held (ascending, CPU LongTensor copy).

        With ``cache`` positions the model sees kept token ``j`` at position ``j`` instead.
        """
        self._apply_pending()
        return self._positions.clone()

    @property
    def chunks(self) -> list[Chunk]:
        """The kept completed chunks, in order (evicted chunks are only counted, see ``stats()``)."""
        return list(self._chunks)

    @property
    def pinned_tokens(self) -> int:
        """Tokens never evicted at the start: the pinned prefix plus the sink tokens seen so far."""
        return min(self._seen, self._pinned + self.config.effective_sink_tokens)

    def chunk_summaries(self) -> torch.Tensor:
        """``[T_chunks, F]`` summaries of every completed chunk (a trainer's recording, with
        ``record_summaries``; it grows with the episode), else of the kept chunks (``gated``)."""
        self._apply_pending()
        if self.record_summaries:
            rows = list(self._summary_log)
        else:
            rows = [c.summary for c in self._chunks if c.summary is not None]
        if not rows:
            return torch.empty(0, 0)
        return torch.stack(rows)

    def stats(self) -> CacheStats:
        """Token/chunk counts and bytes actually held per layer (applies a pending decision first)."""
        self._apply_pending()
        per_layer = [int(layer.nbytes()) for layer in self.layers]
        return CacheStats(
            seen_tokens=self._seen,
            kept_tokens=int(self._positions.numel()),
            evicted_tokens=self._evicted_tokens,
            kept_chunks=len(self._chunks),
            evicted_chunks=self._evicted_chunks,
            pinned_tokens=self.pinned_tokens,
            kv_bytes=sum(per_layer),
            kv_bytes_per_layer=per_layer,
            max_position=self._max_position,
            kv_bytes_reserved=sum(int(getattr(ly, "reserved_nbytes", ly.nbytes)()) for ly in self.layers),
        )

    def __iter__(self):
        """Per layer ``(keys, values, sliding_window tensor or None)`` at full precision, as DynamicCache."""
        for layer in self.layers:
            keys, values = layer.columns(0, layer.held_tokens()) if layer.keys is not None else (None, None)
            window = layer.sliding_window
            yield keys, values, (torch.tensor(window, dtype=torch.long) if window is not None else None)

    def __repr__(self) -> str:
        return (
            f"EpisodeCache(policy={self.config.policy!r}, seen={self._seen}, kept={self._positions.numel()})"
        )
