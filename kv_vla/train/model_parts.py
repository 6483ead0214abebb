"""The model side of behaviour cloning: building the compact VLA from the data, fine-tuning into a
changed configuration, the training-only target head, the parameter groups, frozen-backbone features.

Kept apart from the training loop (:mod:`kv_vla.train.bc`) so each file has one job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kv_vla.train.data import EpisodeTensors


def build_model(episodes: Sequence[Any], overrides: dict[str, Any], seed: int) -> Any:
    """A fresh compact VLA whose vocabulary covers every instruction word and whose action
    normalisation statistics (q01/q99; the binary gripper left un-normalised) come from the data."""
    from kv_vla.model.action_tokenizer import compute_norm_stats
    from kv_vla.model.compact import CompactVLA, CompactVLAConfig
    from kv_vla.model.text_tokenizer import DEFAULT_WORDS

    words = set(DEFAULT_WORDS)
    for ep in episodes:
        words.update(ep.instruction.lower().replace(",", " ").replace(".", " ").split())
    actions = np.concatenate([np.asarray(ep.actions, dtype=np.float32) for ep in episodes])
    mask = [True] * (actions.shape[1] - 1) + [False]
    torch.manual_seed(seed)
    config = CompactVLAConfig(words=sorted(words), action_dim=actions.shape[1], **overrides)
    return CompactVLA(config, norm_stats={"kv_vla_sim": compute_norm_stats(actions, mask=mask)})


def with_overrides(model: Any, overrides: dict[str, Any]) -> Any:
    """``model`` rebuilt with some configuration fields changed, keeping every weight that still fits.

    For fine-tuning into a larger architecture (e.g. ``{"highlight": true}`` on a model trained
    without it): parameters the change adds keep their own initialisation (the highlight's is the
    identity), every other weight is copied; a change that alters an existing weight's shape is refused.
    """
    import copy

    from kv_vla.model.compact import CompactVLA

    config = copy.deepcopy(model.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model_overrides: {key!r} is not a CompactVLAConfig field")
        setattr(config, key, value)
    config._check()
    new = CompactVLA(config, norm_stats=model.norm_stats)
    try:
        result = new.load_state_dict(model.state_dict(), strict=False)
    except RuntimeError as exc:  # size mismatch
        raise ValueError(f"model_overrides {overrides} change the shape of trained weights: {exc}") from None
    if result.unexpected_keys:
        raise ValueError(f"model_overrides {overrides} drop trained weights: {result.unexpected_keys}")
    return new


class TargetHead(torch.nn.Module):
    """Reads the first target cube's position (``[-1, 1]^2``) from an early frame's image tokens.

    Why: behaviour cloning alone rewards reading the colour word only through the first few actions
    of an episode (later ones can follow the arm's own heading), and a policy trained that way
    barely reads it (``kv-vla probe``). Asking the image tokens of the first frames -- conditioned
    on the instruction -- to say where the named (or lit) cube is gives that path a direct, dense
    signal. Used in training only; it is not part of the saved model.
    """

    def __init__(self, n_tokens: int, hidden: int, width: int = 128, n_targets: int = 1) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_tokens * hidden, width), torch.nn.GELU(), torch.nn.Linear(width, 2 * n_targets)
        )

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, H]`` -> ``[B, 2 * n_targets]`` (x, y of each target in turn)."""
        return self.net(image_tokens.flatten(1).float())


def param_groups(model: Any, film_lr_mult: float) -> list[dict[str, Any]]:
    """The trainable parameters, the instruction-conditioning layers' (the word table and the
    colour highlight) in a group of their own with their learning-rate multiplier.

    Why a multiplier: they start as the identity inside a model that already acts well without
    them, so at the fine-tuning learning rate the rest adapts long before they say anything.
    """
    film_ids = {
        id(p) for name in ("film_words", "highlight") for p in _params_of(getattr(model, name, None))
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in film_ids], "lr_mult": 1.0},
        {"params": [p for p in trainable if id(p) in film_ids], "lr_mult": film_lr_mult},
    ]
    return [g for g in groups if g["params"]]


def _params_of(module: Any) -> list[torch.nn.Parameter]:
    return [] if module is None else list(module.parameters())


def freeze_vision_path(model: Any) -> None:
    """Freeze every weight between the pixels and the patch features: the backbone and, in a
    colour-highlight model, the instruction's highlight (its word table and layer) too.

    Why the highlight as well: it changes the pixels the backbone sees, so features cached once
    per frame stay exact only while it is fixed.
    """
    model.vision.requires_grad_(False)
    for name in ("film_words", "highlight"):
        module = getattr(model, name, None)
        if module is not None:
            module.requires_grad_(False)


@torch.no_grad()
def cache_vision_patches(model: Any, data: Sequence[EpisodeTensors], frames_per_batch: int = 512) -> None:
    """Fill each episode's ``patches`` with the (frozen) backbone's features of its frames, in fp16
    on the CPU (12 KiB per frame for the shipped layout), so training never runs the backbone.

    A colour-highlight model's features are of the highlighted pixels, each episode under its own
    instruction, which is what :meth:`CompactVLA.forward_episode` would compute from the frames.
    """
    from tqdm import tqdm

    was_training = model.vision.training
    model.vision.eval()
    for ep in tqdm(data, desc="vision features (frozen backbone)", unit="ep"):
        condition = model.instruction_condition(ep.prompt_ids)
        chunks = []
        for k in range(0, ep.n_steps, frames_per_batch):
            pix = model.pixel_values(
                torch.as_tensor(ep.frames[k : k + frames_per_batch], device=model.device)
            )
            if condition is not None:
                pix = model.highlight_pixels(pix, condition.expand(pix.shape[0], -1))
            chunks.append(model.vision_patches(pix).to("cpu", torch.float16))
        ep.patches = torch.cat(chunks)
    model.vision.train(was_training)
