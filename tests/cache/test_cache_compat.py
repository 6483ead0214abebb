"""Model-feature checks: sliding windows are accepted and really masked; what cannot be exact is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig
from kv_vla.cache.testing import reference_logits, reference_mask, run_episode, tiny_model


def test_default_mistral_window_is_accepted():
    cache = EpisodeCache(EpisodeCacheConfig(chunk_size=8), MistralConfig(num_hidden_layers=2))
    assert cache.layer_windows == [4096, 4096]
    assert all(layer.is_sliding for layer in cache.layers)


def test_sliding_window_masks_by_kept_positions_and_the_window_matters():
    model = tiny_model("mistral", window=20)
    cache = EpisodeCache(EpisodeCacheConfig(policy="window", chunk_size=15, recent_chunks=1), model.config)
    record = run_episode(model, cache, list(range(3, 13)), 10, 12, 3, seed=1)
    got = torch.cat(record.logits, dim=1)
    assert (got - reference_logits(model, record)).abs().max().item() <= 1e-5
    # the same record with the window ignored (kept tokens all visible) is far off
    ids, pos = torch.tensor([record.ids]), torch.arange(len(record.ids)).unsqueeze(0)
    with torch.no_grad():
        unwindowed = model(input_ids=ids, attention_mask=reference_mask(record), position_ids=pos).logits
    assert (got - unwindowed).abs().max().item() > 1e-3


def test_a_4d_mask_after_eviction_on_a_sliding_model_is_refused():
    model = tiny_model("mistral", window=20)
    cache = EpisodeCache(EpisodeCacheConfig(policy="window", chunk_size=15, recent_chunks=1), model.config)
    run_episode(model, cache, list(range(3, 13)), 6, 12, 3)
    start, kept = cache.get_seq_length(), cache.kept_positions().numel()
    mask = torch.zeros(1, 1, 2, kept + 2)
    with pytest.raises(ValueError, match=r"^attention_mask: this forward's sliding-window mask"):
        model(
            input_ids=torch.tensor([[4, 5]]),
            attention_mask=mask,
            position_ids=torch.arange(start, start + 2).unsqueeze(0),
            past_key_values=cache,
        )
    assert cache.get_seq_length() == start  # nothing was appended


def test_static_storage_refuses_sliding_windows():
    cfg = EpisodeCacheConfig(policy="window", chunk_size=8, storage="static")
    with pytest.raises(ValueError, match=r"^storage: .* sliding"):
        EpisodeCache(cfg, MistralConfig(num_hidden_layers=2, sliding_window=64))


def test_flash_mask_builder_refuses_padding_after_eviction():
    """flash-attention masks are 2-D padding flags by column: after an eviction they would be misplaced."""
    from transformers.masking_utils import flash_attention_mask

    from kv_vla.cache import masks

    builder = masks.wrap(flash_attention_mask, "flash_attention_2")
    kept = torch.tensor([0, 1, 2, 9, 10])  # positions 3..8 were evicted
    plan = masks.MaskPlan(2, 7, 6, torch.cat([kept, torch.tensor([11, 12])]), torch.tensor([11, 12]))
    padding = torch.ones(1, 13, dtype=torch.bool)
    padding[0, 0] = False
    masks.announce(plan)
    with pytest.raises(ValueError, match=r"^attn_implementation: 'flash_attention_2' cannot mask"):
        builder(batch_size=1, q_length=2, kv_length=7, q_offset=11, kv_offset=6, attention_mask=padding)
    masks.announce(plan)  # without padding the flash kernel's bottom-right causal mask is right
    assert (
        builder(batch_size=1, q_length=2, kv_length=7, q_offset=11, kv_offset=6, attention_mask=None) is None
    )


@pytest.mark.parametrize("use_vmap", [False, True])
def test_remapped_mask_evaluates_the_models_mask_function_at_kept_positions(use_vmap):
    """A custom overlay (as image blocks add) is evaluated at the real positions, vmapped or not."""
    from transformers.masking_utils import and_masks, sdpa_mask, sliding_window_causal_mask_function

    from kv_vla.cache import masks

    kept = torch.tensor([0, 1, 2, 9, 10])  # positions 3..8 were evicted
    new = torch.tensor([11, 12])
    plan = masks.MaskPlan(2, 7, 6, torch.cat([kept, new]), new)
    not_nine = lambda b, h, q, kv: kv != 9  # noqa: E731  (an index-based overlay)
    function = and_masks(sliding_window_causal_mask_function(11), not_nine)
    padding = torch.ones(1, 13, dtype=torch.bool)
    padding[0, 2] = False
    masks.announce(plan)
    got = masks.wrap(sdpa_mask, "sdpa")(
        batch_size=1,
        q_length=2,
        kv_length=7,
        q_offset=11,
        kv_offset=6,
        mask_function=function,
        attention_mask=padding,
        local_size=11,
        use_vmap=use_vmap,
    )
    kv = plan.kv_positions
    expected = torch.stack([(kv <= q) & (kv > q - 11) & (kv != 9) & padding[0, kv] for q in new.tolist()])
    assert expected.tolist() == [[False, True, False, False, True, True, False], [False] * 4 + [True] * 3]
    assert torch.equal(got[0, 0], expected)
