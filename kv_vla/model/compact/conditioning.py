"""Instruction conditioning of the compact VLA: the colour highlight and the reads of the prompt it uses.

Before the vision backbone, each pixel gains ``a_k * relu(w_k . rgb + b_k)`` for K highlights, with
``(w_k, b_k, a_k)`` a linear function of read k of the instruction's words. Why at the input: it
turns a task named in words ("the red cube") into one the policy already solves, a lit target.
The parameters stay on the model (``film_words``, ``highlight``: the names the checkpoints carry);
these functions compute with them.
"""

from __future__ import annotations

import torch
from torch import nn

HIGHLIGHT_PARAMS = 7  # colour direction w (3), threshold b (1), per-channel gain a (3)
HIGHLIGHT_INIT_STD = 0.1
WORD_TABLE_STD = 0.25  # a bag of ~17 words summed then has about unit scale per channel
WORD_ORDER_DECAY = 0.5  # per word, of the ordered reads' weights (word_order_weights)


def word_order_weights(n_words: int, slots: int, decay: float = WORD_ORDER_DECAY) -> torch.Tensor:
    """``[n_words, slots]``: how much word i counts in ordered read k, ``exp(-decay * |i - a_k|)``
    with the anchors ``a_k`` spread from the first word (k = 0) to the last (k = slots - 1).

    Why fixed and not learned: "red, then blue" and "blue, then red" are the same bag of words;
    weighting the bag towards its start or its end tells them apart with nothing to learn (the
    learned alternatives are compared in docs/RESULTS.md).
    """
    position = torch.arange(n_words, dtype=torch.float32)
    anchors = torch.linspace(0.0, float(max(n_words - 1, 0)), slots)
    return torch.exp(-decay * (position[:, None] - anchors[None, :]).abs())


def init_highlight(layer: nn.Linear) -> None:
    """Random colour directions, zero gain: a new highlight is the identity on the pixels, so a
    trained model fine-tuned into it starts as the same function."""
    per_slot = layer.weight.view(-1, HIGHLIGHT_PARAMS, layer.in_features)
    with torch.no_grad():
        per_slot[:, :4].normal_(std=HIGHLIGHT_INIT_STD)  # colour direction w and b
        per_slot[:, 4:].zero_()  # gain a
    nn.init.zeros_(layer.bias)


def instruction_words(prompt_ids: torch.Tensor, template_ids: tuple[list[int], list[int]]) -> torch.Tensor:
    """``[1, P]`` prompt ids -> the ids of the instruction inside the fixed template, ``[1, I]``.

    Why: the ordered reads weigh words by their distance from the instruction's start or end, and
    counted over the whole prompt the template's fixed prefix would take the early read. A prompt
    not in the template's form is read whole.
    """
    prefix, suffix = template_ids
    ids = prompt_ids[0].tolist()
    n_pre, n_suf = len(prefix), len(suffix)
    if len(ids) > n_pre + n_suf and ids[:n_pre] == prefix and ids[len(ids) - n_suf :] == suffix:
        return prompt_ids[:, n_pre : len(ids) - n_suf]
    return prompt_ids


def instruction_condition(
    words_table: nn.Embedding, prompt_ids: torch.Tensor, template_ids: tuple[list[int], list[int]], slots: int
) -> torch.Tensor:
    """``[1, K * H]``: K reads of the prompt's words in their own embedding table.

    One slot is the plain sum over the prompt (a bag of words); K > 1 slots are sums over the
    instruction weighted from its start to its end (:func:`word_order_weights`). A function of the
    ids alone, so training and the runtime compute exactly the same vector before any image.
    """
    ids = prompt_ids.reshape(1, -1)
    if slots > 1:
        words = instruction_words(ids, template_ids)
        weights = word_order_weights(words.shape[1], slots).to(words_table.weight)
        return torch.einsum("pk,bph->bkh", weights, words_table(words)).flatten(1)
    return words_table(ids).sum(dim=1)


def highlight_pixels(
    layer: nn.Linear, pixel_values: torch.Tensor, condition: torch.Tensor | None, slots: int
) -> torch.Tensor:
    """``[B, 3, S, S]`` pixels plus each slot's ``a * relu(w . rgb + b)`` (parameters from ``condition``)."""
    if condition is None:
        raise ValueError("this model highlights the instruction's colour: pass its instruction_condition")
    weight = layer.weight.view(slots, HIGHLIGHT_PARAMS, -1)
    cond = condition.to(pixel_values.dtype).reshape(condition.shape[0], slots, -1)
    params = torch.einsum("bkh,kjh->bkj", cond, weight) + layer.bias.view(slots, -1)
    out = pixel_values
    for k in range(slots):
        p = params[:, k]
        w, b, a = p[:, :3, None, None], p[:, 3:4, None, None], p[:, 4:, None, None]
        out = out + a * torch.relu((pixel_values * w).sum(dim=1, keepdim=True) + b)
    return out
