"""Attention masks built from the kept tokens' positions, for caches that evict columns.

transformers builds a layer's mask from column indices: column ``j`` is taken to be position
``kv_offset + j``, and the mask function (causal, sliding window, image blocks) and the 2-D padding
flags are evaluated there. Once chunks are evicted that is false, so sliding windows and padding
flags land on the wrong tokens. A cache calls :func:`announce` from ``get_mask_sizes`` with the
real positions of the columns its next mask describes; the mask builders registered for ``sdpa``,
``eager`` and the attention probe (wrapped by :func:`install`, unchanged otherwise) then evaluate
the model's own mask function and padding flags at those positions (as transformers'
``remap_positions_for_packed_sequence`` does for queries). Other implementations (flash, flex)
cannot take an arbitrary mask and refuse a forward that would need one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_local = threading.local()


@dataclass
class MaskPlan:
    """What the cache's next mask call describes: its sizes and the real positions behind them."""

    q_length: int
    kv_length: int
    kv_offset: int
    kv_positions: torch.Tensor  # [kv_length] real position of every returned column
    q_positions: torch.Tensor  # [q_length] real position of every query

    @property
    def contiguous(self) -> bool:
        """Columns are exactly ``kv_offset + j`` and queries follow: the stock mask is right."""
        expect = torch.arange(self.kv_offset, self.kv_offset + self.kv_length)
        queries = torch.arange(
            self.kv_offset + self.kv_length - self.q_length, self.kv_offset + self.kv_length
        )
        return torch.equal(self.kv_positions, expect) and torch.equal(self.q_positions, queries)


def announce(plan: MaskPlan) -> None:
    """Called by the cache's ``get_mask_sizes``: the next mask call with these sizes is ``plan``."""
    _local.plan = plan


def _take(kwargs: dict) -> MaskPlan | None:
    plan = getattr(_local, "plan", None)
    if plan is None:
        return None
    if (kwargs.get("kv_length"), kwargs.get("kv_offset")) != (plan.kv_length, plan.kv_offset):
        return None
    if kwargs.get("q_length", plan.q_length) != plan.q_length:
        return None
    _local.plan, _local.taken = None, True
    return None if plan.contiguous else plan


def took_plan() -> bool:
    """Whether a mask builder took an announced plan since the last call (and forget both)."""
    taken = bool(getattr(_local, "taken", False))
    _local.plan, _local.taken = None, False
    return taken


def remap(mask_function: Callable, plan: MaskPlan, q_offset: int, padding: torch.Tensor | None) -> Callable:
    """``mask_function`` (index based) evaluated at real positions, and-ed with the padding flags."""
    device = padding.device if padding is not None else None
    kv_pos = plan.kv_positions.to(device) if device is not None else plan.kv_positions
    q_pos = plan.q_positions.to(device) if device is not None else plan.q_positions
    if padding is not None and padding.shape[-1] <= int(kv_pos.max()):
        padding = torch.nn.functional.pad(padding, (0, int(kv_pos.max()) + 1 - padding.shape[-1]))

    def inner(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        real_q = q_pos.to(q_idx.device)[q_idx - q_offset]
        real_kv = kv_pos.to(kv_idx.device)[kv_idx - plan.kv_offset]
        allowed = mask_function(batch_idx, head_idx, real_q, real_kv)
        if padding is not None:
            allowed = allowed & padding[batch_idx, real_kv]
        return allowed

    return inner


def wrap(original: Callable, name: str) -> Callable:
    """``original`` mask builder, evaluated at the positions the cache announced (if any)."""
    if getattr(original, "_kv_vla_original", None) is not None:
        return original

    def builder(*args: Any, **kwargs: Any) -> Any:
        plan = _take(kwargs) if not args else None
        if plan is None:
            return original(*args, **kwargs)
        padding = kwargs.get("attention_mask")
        if original not in _remappable_builders() or "q_length" not in kwargs:  # flash/flex, other API
            if kwargs.get("local_size") is not None or (padding is not None and not bool(padding.all())):
                raise ValueError(
                    f"attn_implementation: {name!r} cannot mask a sliding window or padding by the kept "
                    "tokens' positions after an eviction; use attn_implementation='sdpa' or 'eager'"
                )
            return original(*args, **kwargs)
        from transformers.masking_utils import causal_mask_function

        mask_function = kwargs.get("mask_function") or causal_mask_function
        if _stock_is_exact(mask_function, kwargs, padding):
            return original(*args, **kwargs)
        kwargs["mask_function"] = remap(mask_function, plan, int(kwargs.get("q_offset", 0)), padding)
        kwargs["attention_mask"] = None
        kwargs["allow_is_causal_skip"] = False
        kwargs["allow_is_bidirectional_skip"] = False
        return original(*args, **kwargs)

    builder._kv_vla_original = original  # type: ignore[attr-defined]
    return builder


def _stock_is_exact(mask_function: Callable, kwargs: dict, padding: torch.Tensor | None) -> bool:
    """A plain causal mask without window or padding: every kept column precedes the queries and is
    visible, so the stock mask (and SDPA's ``is_causal`` fast path) is already right."""
    from transformers.masking_utils import causal_mask_function

    plain = mask_function is causal_mask_function and kwargs.get("local_size") is None
    return plain and (padding is None or bool(padding.all()))


def _remappable_builders() -> tuple[Callable, ...]:
    from transformers.masking_utils import eager_mask, sdpa_mask

    return (sdpa_mask, eager_mask)


def install() -> None:
    """Wrap every registered mask builder (idempotent); unannounced calls pass through unchanged."""
    from transformers.masking_utils import AttentionMaskInterface

    for name, fn in list(AttentionMaskInterface._global_mapping.items()):
        if getattr(fn, "_kv_vla_original", None) is None:
            AttentionMaskInterface.register(name, wrap(fn, name))
