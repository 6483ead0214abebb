"""``kv-vla train-gate``: learn the chunk gate's utility for a trained model (see :mod:`kv_vla.train.gate`)."""

from __future__ import annotations

import argparse

from kv_vla import settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="trained compact VLA folder")
    parser.add_argument("--data", required=True, nargs="+", help="`kv-vla collect` output folders")
    parser.add_argument(
        "--out", required=True, help="folder for gate.safetensors, its config and the loss curve"
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--sparsity",
        type=float,
        default=0.0,
        help="weight of the mean-utility (memory) penalty (0 under a budget; ~0.05 with --budget-chunks 0)",
    )
    # the recent window the gate learns around: the cache knob of that name (kv_vla/settings.py)
    settings.add_flags(parser, ("recent_chunks",), default_none=False)
    parser.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    parser.add_argument(
        "--summary-keys",
        choices=["rotated", "unrotated"],
        default="rotated",
        help="keys the chunk summaries read: as cached, or with RoPE undone (position-free summaries)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-per-task", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--budget-chunks",
        type=int,
        default=3,
        help="train under a budget of this many old chunks, so they compete for it as at inference "
        "(0: independent soft masks, the earlier objective, which learns position; see kv_vla/train/gate.py)",
    )


def run(args: argparse.Namespace) -> int:
    from kv_vla.train.gate import GateTrainConfig, train_gate

    cfg = GateTrainConfig(
        model=args.model,
        data=list(args.data),
        out=args.out,
        epochs=args.epochs,
        lr=args.lr,
        sparsity=args.sparsity,
        recent_chunks=args.recent_chunks,
        cell=args.cell,
        summary_keys=args.summary_keys,
        seed=args.seed,
        device=args.device,
        max_per_task=args.max_per_task,
        max_steps=args.max_steps,
        budget_chunks=args.budget_chunks or None,
    )
    path = train_gate(cfg)
    print(f"gate saved to {path}")
    return 0
