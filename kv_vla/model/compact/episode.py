"""The training-time forward of the compact VLA: whole episodes, teacher-forced, in one sequence each.

It builds the runtime's token layout (pinned prompt, then per control step the image tokens and the
action slots) and reads the action logits where the runtime reads them, so one pass computes what
the cached runtime computes step by step (``tests/test_runtime.py`` holds them equal). Chunk
eviction is mimicked through the attention mask (``step_keep``) and a soft gate through an
additive bias (``step_bias``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kv_vla.model.compact.modeling import CompactVLA


@dataclass
class EpisodeOutput:
    """Result of :func:`forward_episode`.

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


def binned_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Cross-entropy against the label bin, or against a Gaussian over the bins around it.

    Why: the 256 action bins are ordered, but one-hot cross-entropy punishes a one-bin miss as hard
    as a 100-bin one. A Gaussian target of width ``sigma`` bins (HL-Gauss, Imani & White 2018;
    Farebrother et al. 2024) shares the gradient between neighbours.
    """
    if sigma <= 0:
        return F.cross_entropy(logits, labels)
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    target = torch.exp(-0.5 * ((bins[None] - labels[:, None].float()) / sigma) ** 2)
    target = target / target.sum(-1, keepdim=True)
    return -(target * F.log_softmax(logits.float(), -1)).sum(-1).mean()


def forward_episode(
    model: CompactVLA,
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
            neighbouring bins as a Gaussian of this width in bins (see :func:`binned_cross_entropy`).
        vision_patches: optional ``[B, T, n_patches, C]`` backbone features of the frames
            (``model.vision_patches``; for a highlight model, of the highlighted pixels, and only
            while the highlight is frozen), used instead of running the backbone on ``frames``
            (which may then be None): the frozen-backbone training path.
        step_position_offset: optional non-decreasing int ``[B, T]`` added to the position ids of
            step ``t``'s tokens: a jump of ``g`` between two steps makes the later ones sit as if
            ``g`` tokens had passed in between (position-gap augmentation: the relative distances
            of a longer episode, at the cost of a short one).

    Returns:
        :class:`EpisodeOutput` with the loss over the action bins and ``[B, T, D, n_bins]`` logits.
    """
    cfg = model.config
    device = model.device
    if isinstance(prompt_ids, torch.Tensor) and prompt_ids.ndim == 2:
        prompts = list(prompt_ids)
    else:
        prompts = [torch.as_tensor(p) for p in prompt_ids]
    bsz = len(prompts)
    action_ids = torch.as_tensor(action_ids, device=device, dtype=torch.long)
    if action_ids.ndim != 3 or action_ids.shape[0] != bsz or action_ids.shape[2] != cfg.action_dim:
        raise ValueError(f"action_ids must be [B={bsz}, T, {cfg.action_dim}], got {tuple(action_ids.shape)}")
    n_steps = action_ids.shape[1]
    condition = None
    if model.film_words is not None:
        per_episode = torch.cat([model.instruction_condition(p) for p in prompts])  # [B, H]
        condition = per_episode.repeat_interleave(n_steps, dim=0)  # one row per frame
    if (
        vision_patches is not None
        and model.highlight is not None
        and any(p.requires_grad for p in model.highlight.parameters())
    ):
        raise ValueError(
            "a colour-highlight model conditions its pixels on a trainable highlight: cached "
            "vision_patches would not follow it (freeze it first: kv_vla.train.model_parts.freeze_vision_path)"
        )
    if vision_patches is not None:
        if vision_patches.shape[:2] != (bsz, n_steps):
            raise ValueError(
                f"vision_patches must start with [B={bsz}, T={n_steps}], got {tuple(vision_patches.shape)}"
            )
        patches = vision_patches.to(device=device, dtype=model.dtype).flatten(0, 1)
    else:
        frames_t = torch.as_tensor(frames, device=device)
        if frames_t.shape[:2] != (bsz, n_steps):
            raise ValueError(f"frames must start with [B={bsz}, T={n_steps}], got {tuple(frames_t.shape)}")
        if frames_t.dtype == torch.uint8:
            pix = model.pixel_values(frames_t)
        else:
            pix = frames_t.reshape(-1, *frames_t.shape[2:]).to(model.dtype)
        patches = model.vision_patches(model.highlight_pixels(pix, condition))
    n_img, n_act = cfg.num_image_tokens, cfg.action_dim
    img = model.projector(patches).reshape(bsz, n_steps, n_img, -1)
    act = model.action_slot_embeds(action_ids).to(img.dtype)  # [B, T, D, H]
    steps = torch.cat([img, act], dim=2).reshape(bsz, n_steps * (n_img + n_act), -1)

    lens = [int(p.numel()) for p in prompts]
    p_max = max(lens)
    pad_id = cfg.text_config().pad_token_id
    pids = torch.full((bsz, p_max), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        pids[b, p_max - lens[b] :] = p.to(device)
    embeds = torch.cat([model.embed_tokens(pids), steps], dim=1)
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
    if step_position_offset is not None:
        offset = torch.as_tensor(step_position_offset, device=device, dtype=torch.long)
        if offset.shape != (bsz, n_steps):
            raise ValueError(f"step_position_offset must be [B={bsz}, T={n_steps}], got {tuple(offset.shape)}")
        if (offset.diff(dim=1) < 0).any() or (offset < 0).any():
            raise ValueError("step_position_offset must be non-negative and non-decreasing along T")
        pos[:, p_max:] += offset.repeat_interleave(n_img + n_act, dim=1)

    mask = episode_mask(group, n_steps, step_keep, model.dtype)
    if step_bias is not None:
        mask = mask + step_bias_mask(group, n_steps, step_bias.to(device=device, dtype=mask.dtype))
    out = model.language_model.model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False
    )
    hidden = out.last_hidden_state
    # autoregressive: the logits predicting action d of step t sit one position before that
    # action token; parallel: at action slot d itself
    first = n_img if model.action_queries is not None else n_img - 1
    base = p_max + torch.arange(n_steps, device=device) * (n_img + n_act) + first
    idx = (base[:, None] + torch.arange(n_act, device=device)[None, :]).reshape(-1)
    h = hidden[:, idx]  # [B, T*D, H]
    begin = model.action_tokenizer.action_token_begin_idx
    w = model.language_model.lm_head.weight[begin:]
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
        loss = binned_cross_entropy(logits[sel], labels[sel], label_sigma)
        acc = (logits[sel].argmax(-1) == labels[sel]).float().mean()
    return EpisodeOutput(loss=loss, action_logits=logits, accuracy=acc, image_tokens=img)


def step_bias_mask(group: torch.Tensor, n_steps: int, step_bias: torch.Tensor) -> torch.Tensor:
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


def episode_mask(
    group: torch.Tensor, n_steps: int, step_keep: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive 4-D mask ``[B, 1, L, L]`` for :func:`forward_episode` (see its ``step_keep``)."""
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
    zero = torch.zeros((), dtype=dtype, device=device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed, zero, neg)[:, None]
