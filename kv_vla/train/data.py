"""Demonstration episodes as model-ready tensors, and the history-dropout masks used in training.

Behaviour cloning here is on whole episodes: one sequence holds the prompt and then, per control
step, the frame's tokens and the action tokens (the runtime's exact layout). To make the policy
tolerate an evicted history, training hides random old steps from later ones through the attention
mask (:func:`sample_step_visibility`), the same way the episode cache hides evicted chunks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class EpisodeTensors:
    """One demonstration, tokenised for :meth:`CompactVLA.forward_episode`."""

    prompt_ids: torch.Tensor  # [P] int64
    frames: np.ndarray  # [T, H, W, 3] uint8
    action_ids: torch.Tensor  # [T, D] int64
    task: str
    seed: int
    patches: torch.Tensor | None = None  # [T, n_patches, C] frozen-backbone features, if cached
    # [2 * n] the first n target cubes' x, y in [-1, 1] (auxiliary label; see aux_targets)
    target_xy: torch.Tensor | None = None

    @property
    def n_steps(self) -> int:
        return int(self.action_ids.shape[0])


def load_demonstrations(dirs: Sequence[str | Path], max_per_task: int | None = None) -> list[Any]:
    """Successful demonstrations from one or more ``kv-vla collect`` output folders.

    ``max_per_task`` caps each task's episodes, taken in turn from every folder that holds the task
    (folder 1's first, folder 2's first, ..., folder 1's second, ...), so a cap never fills from the
    first folder alone: ``late_cued_reach`` from replay and from lead demonstrations both count.
    """
    from kv_vla_sim.demos import load_episodes

    per_dir = [[ep for ep in load_episodes(d) if ep.success] for d in dirs]
    episodes = [ep for eps in per_dir for ep in eps]
    if not episodes:
        raise ValueError(f"no successful demonstrations found in {list(map(str, dirs))}")
    if max_per_task is None:
        return episodes
    by_task: dict[str, list[list[Any]]] = {}
    for eps in per_dir:
        groups: dict[str, list[Any]] = {}
        for ep in eps:
            groups.setdefault(ep.task, []).append(ep)
        for task, group in groups.items():
            by_task.setdefault(task, []).append(group)
    out: list[Any] = []
    for groups in by_task.values():
        taken = [ep for turn in itertools.zip_longest(*groups) for ep in turn if ep is not None]
        out.extend(taken[:max_per_task])
    return out


def tokenize_episodes(model: Any, episodes: Sequence[Any]) -> list[EpisodeTensors]:
    """Prompt ids and action token ids (normalised with the model's statistics) per episode."""
    from kv_vla.model.action_tokenizer import normalize_actions
    from kv_vla.model.prompt import build_prompt

    out = []
    for ep in episodes:
        prompt = model.prompt_ids(build_prompt(ep.instruction))[0].cpu()
        norm = normalize_actions(np.asarray(ep.actions, dtype=np.float32), model.norm_stats)
        ids = torch.as_tensor(model.action_tokenizer.encode(norm), dtype=torch.long)
        target = target_label(ep.task, int(ep.seed), aux_targets(model))
        out.append(
            EpisodeTensors(prompt, np.asarray(ep.frames), ids, ep.task, int(ep.seed), target_xy=target)
        )
    return out


def aux_targets(model: Any) -> int:
    """How many target cubes the auxiliary label names: two (first, then second) for a model with
    ordered highlights, whose second slot should come to mark touch_sequence's second cube; one
    otherwise."""
    return 2 if getattr(model.config, "highlight_slots", 1) > 1 else 1


def target_label(task: str, seed: int, n_targets: int = 1) -> torch.Tensor | None:
    """The auxiliary target label of a simulator episode, ``[2 * n_targets]`` (the first
    ``n_targets`` target cubes' x, y); None for episodes from elsewhere."""
    from kv_vla_sim.tasks import TASKS, target_sequence_xy

    if task.partition(":")[0] not in TASKS:
        return None
    xy = target_sequence_xy(task, seed)
    return None if xy is None else torch.as_tensor(xy[:n_targets].ravel())


def collate(batch: Sequence[EpisodeTensors]) -> dict[str, Any]:
    """Pad episodes to the longest one; padded steps are marked invalid (excluded from the loss)."""
    n_max = max(e.n_steps for e in batch)
    h, w = batch[0].frames.shape[1:3]
    d = batch[0].action_ids.shape[1]
    frames = np.zeros((len(batch), n_max, h, w, 3), dtype=np.uint8)
    actions = torch.zeros((len(batch), n_max, d), dtype=torch.long)
    valid = torch.zeros((len(batch), n_max), dtype=torch.bool)
    for b, e in enumerate(batch):
        frames[b, : e.n_steps] = e.frames
        actions[b, : e.n_steps] = e.action_ids
        actions[b, e.n_steps :] = e.action_ids[-1]  # any valid id; padding is masked out of the loss
        valid[b, : e.n_steps] = True
    out: dict[str, Any] = {
        "prompt_ids": [e.prompt_ids for e in batch],
        "frames": frames,
        "action_ids": actions,
        "step_valid": valid,
    }
    if all(e.patches is not None for e in batch):
        first = batch[0].patches
        assert first is not None
        patches = torch.zeros((len(batch), n_max, *first.shape[1:]), dtype=first.dtype)
        for b, e in enumerate(batch):
            patches[b, : e.n_steps] = e.patches
        out["vision_patches"] = patches
    labelled = [e.target_xy for e in batch if e.target_xy is not None]
    if labelled:
        # episodes without a label (late_cued_reach, outside data) get NaN rows and a False mask, so
        # one of them in a batch does not switch the auxiliary loss off for the others
        target = torch.full((len(batch), labelled[0].numel()), float("nan"), dtype=labelled[0].dtype)
        for b, e in enumerate(batch):
            if e.target_xy is not None:
                target[b] = e.target_xy
        out["target_xy"] = target
        out["target_valid"] = torch.tensor([e.target_xy is not None for e in batch])
    return out


def sample_step_visibility(
    n_batch: int,
    n_steps: int,
    recent: int,
    drop_rates: Sequence[float],
    generator: torch.Generator,
) -> torch.Tensor:
    """``[B, T, T]`` bool: step ``i`` sees step ``j < i`` iff ``i - j <= recent`` or ``j`` was kept.

    Each episode draws one drop rate from ``drop_rates`` (rate 1.0 = only the recent window, like the
    ``window`` policy; with ``recent=0`` it is OpenVLA's per-step reset) and then drops each old step
    independently. This is eviction as the cache does it: a step dropped is gone for every later one.
    """
    rates = torch.tensor(drop_rates, dtype=torch.float32)
    pick = torch.randint(len(drop_rates), (n_batch,), generator=generator)
    keep = torch.rand((n_batch, n_steps), generator=generator) >= rates[pick][:, None]
    i = torch.arange(n_steps)[:, None]
    j = torch.arange(n_steps)[None, :]
    recent_mask = (i - j <= recent) & (j <= i)
    return recent_mask[None] | keep[:, None, :]


def sample_position_gaps(
    step_valid: torch.Tensor, max_gap_steps: int, tokens_per_step: int, generator: torch.Generator
) -> torch.Tensor:
    """``[B, T]`` position offsets: in half the episodes, every step from a random one on sits
    ``g`` steps' worth of positions later, ``g`` uniform in ``[1, max_gap_steps]``.

    Why: with rotary positions the model sees only relative distances, so one jump between two
    steps shows a short demonstration's later steps at the distances a wait ``g`` steps longer
    would put them, e.g. a cue seen 300 steps before the decision from a 150-step episode. Waits
    longer than any in training then no longer put the model at distances it never saw.
    """
    bsz, n_steps = step_valid.shape
    lengths = step_valid.sum(1).clamp(min=2)
    apply = torch.rand(bsz, generator=generator) < 0.5
    split = 1 + (torch.rand(bsz, generator=generator) * (lengths - 1)).long()
    gap = 1 + (torch.rand(bsz, generator=generator) * max_gap_steps).long()
    later = torch.arange(n_steps)[None, :] >= split[:, None]
    return torch.where(later & apply[:, None], (gap * tokens_per_step)[:, None], 0)


def random_shift(frames: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """DrQ-style augmentation: shift every frame by up to ``pad`` pixels (edge-padded).

    Why it is safe for this action space: the arm and the objects move together in the frame, so
    the end-effector delta that the label encodes is unchanged; what changes is only *where* in the
    image they are, which is what a small model trained on a few hundred layouts overfits to.
    """
    if pad <= 0:
        return frames
    lead = frames.shape[:-3]
    h, w = frames.shape[-3:-1]
    flat = frames.reshape(-1, h, w, frames.shape[-1])
    padded = np.pad(flat, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    dy = rng.integers(0, 2 * pad + 1, size=flat.shape[0])
    dx = rng.integers(0, 2 * pad + 1, size=flat.shape[0])
    out = np.empty_like(flat)
    for k in range(flat.shape[0]):
        out[k] = padded[k, dy[k] : dy[k] + h, dx[k] : dx[k] + w]
    return out.reshape(*lead, h, w, frames.shape[-1])
