"""Learning the chunk gate's utility (``kv-vla train-gate``).

Objective: distil the full-history policy under a memory penalty. For a demonstration episode we
run the frozen VLA twice over the same teacher-forced sequence:

* teacher: full attention over the whole history, giving action distributions ``p_full``;
* student: every *old* step ``j`` (outside the always-kept recent window) is down-weighted in the
  attention of every later step by adding ``log u_j`` to its attention logits, where ``u_j`` is the
  gate's utility for chunk ``j`` computed causally from the chunk summaries the cache would see.

The loss is ``KL(p_full || p_student) + sparsity * mean(u)``: a chunk whose removal changes no later
action is pushed to utility 0 (evicted at inference), a chunk the policy needs (the cue frame, the
first touch of a sequence) is pushed to 1, because dimming it raises the KL. Soft masking makes the
objective differentiable end to end; at inference the cache applies the hard rule (evict below
``gate_threshold``; over budget, lowest utility first). Why not "loss increase when one chunk is
removed": the cue is shown for several consecutive steps, so removing any single one of them changes
nothing and a leave-one-out target would call all of them useless.

``budget_chunks`` (``--budget-chunks K``) makes the old chunks compete, as they do at inference
under a token budget: step ``i`` weighs old chunk ``j`` by ``min(1, K * u_j / sum of u over the old
chunks step i sees)`` instead of ``u_j`` (all kept while ``K`` or fewer are old). Why: with
independent soft masks a gate can keep every early chunk at a moderate utility and lose nothing,
so it learns position instead of content (the cue sits at frames 0-2 in most cued tasks; measured
in docs/RESULTS.md). Under the budget, a useless early chunk takes weight from the cue, so the
ranking itself is trained.

The gate's input is exactly what :class:`kv_vla.cache.EpisodeCache` computes online (per-layer
key/value statistics of each completed chunk and its index), taken from a cache that has seen the
same teacher-forced episode, so training and inference read the same features.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kv_vla.atomic import atomic_write_text
from kv_vla.cache.config import _check_int
from kv_vla.train.bc import _smooth, plot_curve, resolve_device
from kv_vla.train.data import EpisodeTensors, tokenize_episodes


@dataclass
class GateTrainConfig:
    """Hyper-parameters of gate training (saved beside the gate as ``gate_train_config.json``)."""

    model: str
    data: list[str]
    out: str
    epochs: int = 4
    lr: float = 3e-3
    # weight of the mean-utility penalty; 0 under a budget (the budget is the memory pressure, and a
    # penalty there only shrinks every utility), about 0.05 for independent soft masks
    sparsity: float = 0.0
    recent_chunks: int = 2
    hidden_size: int = 64
    cell: str = "gru"
    summary_keys: str = "rotated"  # GateConfig.summary_keys: "unrotated" undoes RoPE before summarising
    seed: int = 0
    device: str = "auto"
    max_per_task: int | None = None
    max_steps: int | None = None
    # old chunks kept under the training budget (None: independent soft masks, the objective of the
    # gates before late_cued_reach; see the module docstring). 3 ~ what an 80-token budget leaves.
    budget_chunks: int | None = 3

    def validate(self) -> GateTrainConfig:
        if self.sparsity < 0:
            raise ValueError(f"sparsity must be >= 0, got {self.sparsity}")
        if self.recent_chunks < 0:
            raise ValueError(f"recent_chunks must be >= 0, got {self.recent_chunks}")
        if self.budget_chunks is not None:
            _check_int("budget_chunks", self.budget_chunks, minimum=1, none_ok=True)
        return self


@torch.no_grad()
def episode_summaries(model: Any, ep: EpisodeTensors, summary_keys: str = "rotated") -> torch.Tensor:
    """``[T, F]`` chunk summaries of a teacher-forced episode, as the runtime's cache computes them.

    The prompt is prefilled and pinned, then all steps (frame tokens + action tokens or parallel
    decoding's action slots, the runtime's layout and positions) are appended; with the ``full``
    policy nothing is evicted, so every chunk's keys and values are exactly those the online cache
    holds when the chunk completes.
    """
    from kv_vla.cache import EpisodeCache, EpisodeCacheConfig

    lm = model.language_model
    cfg = EpisodeCacheConfig(policy="full", chunk_size=int(model.num_image_tokens + model.action_dim))
    cache = EpisodeCache(cfg, lm.config, record_summaries=True, summary_keys=summary_keys)
    device = model.device
    prompt = ep.prompt_ids.to(device)[None]
    pos = torch.arange(prompt.shape[1], device=device)[None] + model.position_offset
    lm(
        input_ids=None,
        inputs_embeds=model.embed_tokens(prompt),
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
    )
    cache.pin_prefix()
    condition = model.instruction_condition(prompt)  # None without a highlight
    img = model.encode_pixels(
        model.pixel_values(torch.as_tensor(ep.frames, device=device)), condition
    )  # [T, N, H]
    act = model.action_slot_embeds(ep.action_ids.to(device)[None])[0]  # [T, D, H]
    steps = torch.cat([img, act.to(img.dtype)], dim=1).reshape(1, -1, img.shape[-1])
    start = cache.get_seq_length() + model.position_offset
    pos = torch.arange(start, start + steps.shape[1], device=device)[None]
    lm(inputs_embeds=steps, position_ids=pos, past_key_values=cache, use_cache=True)
    summaries = cache.chunk_summaries()
    if summaries.shape[0] != ep.n_steps:
        raise RuntimeError(f"expected {ep.n_steps} chunk summaries, got {summaries.shape[0]}")
    return summaries


def old_step_bias(utilities: torch.Tensor, recent: int, floor: float = 1e-4) -> torch.Tensor:
    """``[T, T]`` additive attention bias: ``log u_j`` where step ``i`` sees ``j`` as old (``i - j > recent``)."""
    n = utilities.shape[0]
    i = torch.arange(n, device=utilities.device)[:, None]
    j = torch.arange(n, device=utilities.device)[None, :]
    old = (i - j) > recent
    log_u = torch.log(utilities.clamp(min=floor))[None, :].expand(n, n)
    return torch.where(old, log_u, torch.zeros_like(log_u))


def budget_step_bias(utilities: torch.Tensor, recent: int, budget: int, floor: float = 1e-4) -> torch.Tensor:
    """``[T, T]`` additive attention bias under a budget of ``budget`` old chunks: step ``i`` weighs
    old chunk ``j`` (``i - j > recent``) by ``min(1, budget * u_j / sum_{old j'} u_j')``, and by 1
    while ``budget`` or fewer chunks are old; recent chunks are unbiased (see the module docstring)."""
    n = utilities.shape[0]
    i = torch.arange(n, device=utilities.device)[:, None]
    j = torch.arange(n, device=utilities.device)[None, :]
    old = (i - j) > recent
    u = utilities[None, :].expand(n, n)
    mass = torch.where(old, u, torch.zeros_like(u)).sum(-1, keepdim=True)
    share = (budget * u / mass.clamp(min=1e-8)).clamp(max=1.0)
    within = old.sum(-1, keepdim=True) <= budget
    weight = torch.where(within, torch.ones_like(share), share)
    return torch.where(old, torch.log(weight.clamp(min=floor)), torch.zeros_like(u))


def gate_loss(
    model: Any,
    gate: Any,
    ep: EpisodeTensors,
    summaries: torch.Tensor,
    teacher_logp: torch.Tensor,
    cfg: GateTrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Distillation KL under the gate's soft mask plus the sparsity penalty (see module docstring)."""
    u = gate(summaries.to(model.device))  # [T]
    if cfg.budget_chunks is None:
        bias = old_step_bias(u, cfg.recent_chunks)
    else:
        bias = budget_step_bias(u, cfg.recent_chunks, cfg.budget_chunks)
    out = model.forward_episode([ep.prompt_ids], ep.frames[None], ep.action_ids[None], step_bias=bias[None])
    student_logp = F.log_softmax(out.action_logits[0].float(), dim=-1)
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1).mean()
    n_old = max(1, ep.n_steps - cfg.recent_chunks - 1)
    # only chunks that ever become "old" cost memory; the last recent ones are never evicted anyway
    usage = u[:n_old].mean() if ep.n_steps > cfg.recent_chunks + 1 else u.sum() * 0
    loss = kl + cfg.sparsity * usage
    return loss, {
        "loss": float(loss.detach()),
        "kl": float(kl.detach()),
        "mean_utility": float(usage.detach()),
    }


def train_gate(cfg: GateTrainConfig, episodes: Sequence[Any] | None = None) -> Path:
    """Train a :class:`ChunkGate` for the model at ``cfg.model``; writes ``gate.safetensors`` (+ .json)."""
    from tqdm import tqdm

    from kv_vla.cache import ChunkGate
    from kv_vla.model.compact import CompactVLA
    from kv_vla.train.data import load_demonstrations

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if episodes is None:
        episodes = load_demonstrations(cfg.data, cfg.max_per_task)
    if device.type == "cuda":
        # the memory-efficient SDPA kernel has no backward for a float mask that needs a gradient
        # ("LSE is not correctly aligned"); the math kernel does, and this model is small
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_flash_sdp(False)
    model = CompactVLA.from_pretrained(cfg.model).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data = tokenize_episodes(model, episodes)
    gate = ChunkGate.for_model(
        model.language_model.config,
        seed=cfg.seed,
        hidden_size=cfg.hidden_size,
        cell=cfg.cell,
        summary_keys=cfg.summary_keys,
    )
    gate.to(device).train()
    opt = torch.optim.Adam(gate.parameters(), lr=cfg.lr)

    # features and teacher distributions do not depend on the gate: compute them once
    cached = []
    for ep in tqdm(data, desc="gate: teacher pass", unit="ep"):
        s = episode_summaries(model, ep, cfg.summary_keys)
        with torch.no_grad():
            full = model.forward_episode([ep.prompt_ids], ep.frames[None], ep.action_ids[None])
        cached.append((ep, s, F.log_softmax(full.action_logits[0].float(), dim=-1)))

    rng = random.Random(cfg.seed)
    total = (
        cfg.epochs * len(cached) if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * len(cached))
    )
    history: list[dict[str, float]] = []
    step = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="gate: distil", unit="ep")
    for _ in range(cfg.epochs):
        order = list(range(len(cached)))
        rng.shuffle(order)
        for k in order:
            if step >= total:
                break
            ep, s, teacher = cached[k]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
            loss, logs = gate_loss(model, gate, ep, s, teacher, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gate.parameters(), 1.0)
            opt.step()
            step += 1
            history.append({"step": step, **logs})
            bar.update(1)
            bar.set_postfix(kl=f"{logs['kl']:.3f}", u=f"{logs['mean_utility']:.2f}")
    bar.close()
    gate.eval()
    path = out / "gate.safetensors"
    gate.cpu().save(path)
    report = utility_report(gate, cached, cfg.recent_chunks)
    meta = {"updates": step, "episodes": len(cached), "wall_s": round(time.perf_counter() - t0, 1), **report}
    atomic_write_text(
        out / "gate_train.json", json.dumps({"meta": meta, "config": asdict(cfg), "history": history})
    )
    plot_curve(
        _smooth([{"step": h["step"], "loss": h["loss"]} for h in history]), out / "gate_loss.png", "gate"
    )
    return path


@torch.no_grad()
def utility_report(
    gate: Any, cached: Sequence[tuple[EpisodeTensors, torch.Tensor, torch.Tensor]], recent: int
) -> dict:
    """Mean utility per task and per step index bucket (what the gate learned to keep)."""
    per_task: dict[str, list[torch.Tensor]] = {}
    for ep, s, _ in cached:
        per_task.setdefault(ep.task, []).append(gate(s.to(next(gate.parameters()).device)).cpu())
    report = {}
    for task, us in per_task.items():
        first = torch.stack([u[:3] for u in us if u.numel() >= 3]).mean().item() if us else float("nan")
        allu = torch.cat(us)
        report[task] = {
            "mean_utility": round(float(allu.mean()), 4),
            "mean_utility_first3": round(first, 4),
            "kept_at_0.5": round(float((allu >= 0.5).float().mean()), 4),
        }
    return {"utility_by_task": report}
