"""Behaviour cloning of the compact VLA on whole episodes (``kv-vla train``).

Why whole episodes: the policy must learn to *use* its episode history (the cue shown at the start,
the first touch of a sequence), so each training sequence is exactly what the runtime's episode
cache holds — prompt, then per step the frame's tokens and the action tokens — and the loss is on
the action tokens only. Old steps are hidden at random (history dropout) so the policy still acts
well when the cache has evicted chunks or keeps none (OpenVLA-style reset).

Checkpoints (model, optimiser, step, RNG) are written atomically every ``checkpoint_every`` updates
and training resumes from the latest one; the loss curve is saved as JSON and PNG beside them.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kv_vla.atomic import atomic_write, atomic_write_text
from kv_vla.train.data import (
    EpisodeTensors,
    aux_targets,
    collate,
    random_shift,
    sample_position_gaps,
    sample_step_visibility,
    tokenize_episodes,
)
from kv_vla.train.model_parts import (
    TargetHead,
    build_model,
    cache_vision_patches,
    freeze_vision_path,
    param_groups,
    with_overrides,
)

CHECKPOINT = "checkpoint.pt"
TARGET_AUX_FRAMES = 3  # frames per episode that the auxiliary target loss reads (cue steps)


@dataclass
class TrainConfig:
    """Hyper-parameters of a behaviour-cloning run (saved beside the model as ``train_config.json``)."""

    data: list[str]
    out: str
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    drop_rates: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.3, 0.6, 1.0])
    recent_choices: list[int] = field(default_factory=lambda: [2, 2, 2, 0])
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 200
    max_per_task: int | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    max_steps: int | None = None  # stop after this many updates (tests, smoke runs)
    init_from: str | None = None  # start from this model folder's weights (fine-tuning)
    shift_pad: int = 4  # random-shift augmentation in pixels (0 = off)
    label_sigma: float = 0.0  # Gaussian soft target over action bins, in bins (0 = one-hot)
    time_budget_s: float | None = None  # shrink the schedule to fit (measured after 20 updates)
    # keep the vision backbone's weights (and a colour highlight's) as they are (from --init) and
    # compute its features once per frame: ~4x fewer FLOPs per CPU update; random shift is then off
    freeze_vision: bool = False
    # learning-rate multiplier of the instruction-conditioning layers (word table, highlight)
    film_lr_mult: float = 1.0
    # weight of the auxiliary loss that reads the first target cube's position from the first frames'
    # tokens (0 = off); see TargetHead
    target_aux: float = 0.0
    # position-gap augmentation: per episode, with probability one half, the steps after a random
    # step sit up to this many steps' worth of positions later (0 = off); see sample_position_gaps
    position_gap_steps: int = 0

    def validate(self) -> TrainConfig:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not self.drop_rates or any(not 0.0 <= r <= 1.0 for r in self.drop_rates):
            raise ValueError(f"drop_rates: each must lie in [0, 1], got {self.drop_rates}")
        if self.label_sigma < 0:
            raise ValueError(f"label_sigma must be >= 0, got {self.label_sigma}")
        if not self.recent_choices or any(r < 0 for r in self.recent_choices):
            raise ValueError(f"recent_choices: each must be >= 0, got {self.recent_choices}")
        if self.film_lr_mult <= 0:
            raise ValueError(f"film_lr_mult must be > 0, got {self.film_lr_mult}")
        if self.target_aux < 0:
            raise ValueError(f"target_aux must be >= 0, got {self.target_aux}")
        if self.position_gap_steps < 0:
            raise ValueError(f"position_gap_steps must be >= 0, got {self.position_gap_steps}")
        if self.freeze_vision and self.init_from is None:
            raise ValueError("freeze_vision keeps a trained backbone: it needs init_from (--init)")
        return self


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present (training then runs in bf16 autocast), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def plot_curve(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Loss (and accuracy, if logged) against update step, as a PNG."""
    from kv_vla.plotting import headless_pyplot

    plt = headless_pyplot()
    if plt is None:  # matplotlib comes with the sim extra; without it there is no plot to write
        return

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history], label="loss", color="tab:blue")
    ax.set_xlabel("update")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if "accuracy" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [h["accuracy"] for h in history], label="action-token accuracy", color="tab:orange")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _batches(data: list[EpisodeTensors], batch_size: int, rng: random.Random) -> list[list[EpisodeTensors]]:
    """Length-bucketed batches (less padding), shuffled."""
    order = sorted(range(len(data)), key=lambda i: (data[i].n_steps, rng.random()))
    batches = [[data[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def train_bc(cfg: TrainConfig, episodes: Sequence[Any] | None = None) -> Path:
    """Train (or resume) and save the final model folder to ``cfg.out``; returns that path."""
    from tqdm import tqdm

    from kv_vla.model.compact import CompactVLA
    from kv_vla.train.data import load_demonstrations

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if episodes is None:
        episodes = load_demonstrations(cfg.data, cfg.max_per_task)
    ckpt_path = out / CHECKPOINT
    # weights_only: a checkpoint is data (tensors, numbers, RNG state tuples); unpickling arbitrary
    # objects would run code from whoever wrote the file
    resume = torch.load(ckpt_path, weights_only=True) if ckpt_path.exists() else None
    if resume is not None:
        model = CompactVLA.from_pretrained(out / "checkpoint_model")
    elif cfg.init_from is not None:
        model = CompactVLA.from_pretrained(cfg.init_from)  # keeps its vocabulary and norm stats
        if cfg.model_overrides:
            model = with_overrides(model, cfg.model_overrides)
    else:
        model = build_model(episodes, cfg.model_overrides, cfg.seed)
    model.to(device)
    data = tokenize_episodes(model, episodes)
    if cfg.freeze_vision:
        freeze_vision_path(model)
        cache_vision_patches(model, data)
    groups = param_groups(model, cfg.film_lr_mult)
    target_head = None
    if cfg.target_aux > 0:
        torch.manual_seed(cfg.seed)
        target_head = TargetHead(
            model.config.num_image_tokens, model.config.hidden_size, n_targets=aux_targets(model)
        ).to(device)
        groups.append({"params": list(target_head.parameters()), "lr_mult": 1.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = (
        steps_per_epoch * cfg.epochs
        if cfg.max_steps is None
        else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    )
    full_total = total
    step, history = 0, []
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        if target_head is not None:
            target_head.load_state_dict(resume["target_head"])
        step, history = resume["step"], resume["history"]
        rng.setstate(resume["epoch_rng"])  # replays the interrupted epoch's batch order
        gen.set_state(resume["torch_rng"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    tokens_per_step = model.config.num_image_tokens + model.config.action_dim  # one chunk per step
    n_params = sum(p.numel() for p in model.parameters())
    atomic_write_text(out / "train_config.json", json.dumps(asdict(cfg), indent=2))
    start_epoch = step // steps_per_epoch
    bar = tqdm(
        total=total, initial=step, desc=f"bc ({n_params / 1e6:.2f}M params, {device.type})", unit="upd"
    )
    t_start = time.perf_counter()
    first_step = step
    t_warm = t_start
    model.train()
    if cfg.freeze_vision:
        model.vision.eval()  # its batch-norm statistics stay those the runtime uses
    for _epoch in range(start_epoch, cfg.epochs):
        # the batch order is drawn from the RNG state saved at the epoch's start, so a resumed run
        # replays the same order and skips the batches it already did (none lost, none repeated)
        epoch_rng = rng.getstate()
        batches = _batches(data, cfg.batch_size, rng)
        for batch in batches[step % steps_per_epoch :] if _epoch == start_epoch else batches:
            if step >= total:
                break
            b = collate(batch)
            if not cfg.freeze_vision:
                b["frames"] = random_shift(b["frames"], cfg.shift_pad, aug_rng)
            recent = rng.choice(cfg.recent_choices)
            vis = sample_step_visibility(len(batch), b["action_ids"].shape[1], recent, cfg.drop_rates, gen)
            offsets = None
            if cfg.position_gap_steps > 0:
                offsets = sample_position_gaps(b["step_valid"], cfg.position_gap_steps, tokens_per_step, gen)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg) * group["lr_mult"]
            with autocast:
                res = model.forward_episode(
                    b["prompt_ids"],
                    b["frames"],
                    b["action_ids"],
                    step_valid=b["step_valid"],
                    step_keep=vis,
                    label_sigma=cfg.label_sigma,
                    vision_patches=b.get("vision_patches"),
                    step_position_offset=offsets,
                )
            loss = res.loss
            record = {"step": step + 1, "loss": float(res.loss.detach()), "accuracy": float(res.accuracy)}
            if target_head is not None and "target_xy" in b:
                # the first frames: the cue is still lit (cued tasks) and no cube has moved yet
                labelled = b["target_valid"].to(res.image_tokens.device)
                tokens = res.image_tokens[labelled, :TARGET_AUX_FRAMES]
                pred = target_head(tokens.flatten(0, 1))
                labels = b["target_xy"][b["target_valid"]].to(pred.device)
                labels = labels.repeat_interleave(tokens.shape[1], dim=0)
                target_mse = torch.nn.functional.mse_loss(pred, labels)
                loss = loss + cfg.target_aux * target_mse
                record["target_mse"] = float(target_mse.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            step += 1
            if step - first_step == 20:
                t_warm = time.perf_counter()  # the first updates include CUDA/allocator warm-up
            done = step - first_step
            if cfg.time_budget_s is not None and done >= 60 and done % 50 == 10:
                # size the cosine schedule to the time left, so a budgeted run still anneals fully;
                # re-measured every 50 updates over everything since warm-up (batches differ in
                # length, so an early short sample can be far off in either direction)
                per_update = (time.perf_counter() - t_warm) / (done - 20)
                fits = step + int((cfg.time_budget_s - (time.perf_counter() - t_start)) / per_update)
                total = max(step, min(full_total, fits))
                bar.total = total
            history.append(record)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "step"})
            if step % cfg.checkpoint_every == 0 or step == total:
                _save_checkpoint(model, opt, step, history, epoch_rng, gen, out, target_head)
        if step >= total:
            break
    bar.close()
    model.eval()
    final = out / "model"
    model.save_pretrained(final)
    meta = {
        "updates": step,
        "episodes": len(data),
        "params": n_params,
        "device": str(device),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "final_loss": history[-1]["loss"] if history else None,
    }
    atomic_write_text(out / "loss.json", json.dumps({"meta": meta, "history": history}))
    plot_curve(_smooth(history), out / "loss.png", "behaviour cloning (smoothed)")
    return final


def _save_checkpoint(
    model: Any,
    opt: Any,
    step: int,
    history: list,
    epoch_rng: Any,
    gen: Any,
    out: Path,
    target_head: torch.nn.Module | None = None,
) -> None:
    model.save_pretrained(out / "checkpoint_model")
    state = {
        "optimizer": opt.state_dict(),
        "step": step,
        "history": history,
        "epoch_rng": epoch_rng,
        "torch_rng": gen.get_state(),
        "target_head": None if target_head is None else target_head.state_dict(),
    }
    atomic_write(out / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def _smooth(history: list[dict[str, float]], window: int = 20) -> list[dict[str, float]]:
    out = []
    for i in range(len(history)):
        chunk = history[max(0, i - window + 1) : i + 1]
        out.append(
            {k: float(np.mean([h[k] for h in chunk if k in h])) for k in history[i]}
            | {"step": history[i]["step"]}
        )
    return out
