"""``kv-vla train``: behaviour-clone the compact VLA on recorded demonstrations (see :mod:`kv_vla.train.bc`)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, nargs="+", help="one or more `kv-vla collect` output folders"
    )
    parser.add_argument(
        "--out", required=True, help="run folder: checkpoints, loss curve, final model in OUT/model"
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="updates between checkpoints")
    parser.add_argument("--max-per-task", type=int, default=None, help="use at most this many demos per task")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many updates")
    parser.add_argument("--init", default=None, help="start from this trained model folder (fine-tune)")
    parser.add_argument(
        "--shift-pad", type=int, default=4, help="random-shift augmentation (pixels; 0 = off)"
    )
    parser.add_argument(
        "--time-budget-min", type=float, default=None, help="fit the LR schedule into this many minutes"
    )
    parser.add_argument(
        "--label-sigma",
        type=float,
        default=0.0,
        help="Gaussian target over neighbouring action bins, width in bins (0 = one-hot cross-entropy)",
    )
    parser.add_argument(
        "--drop-rates",
        default="0,0,0.3,0.6,1",
        help="history-dropout rates, one drawn per episode (comma list)",
    )
    parser.add_argument(
        "--freeze-vision",
        action="store_true",
        help="with --init: keep the vision backbone (and a colour highlight) fixed and compute its "
        "features once (about 4x faster on a CPU; disables --shift-pad)",
    )
    parser.add_argument(
        "--film-lr-mult",
        type=float,
        default=1.0,
        help="learning-rate multiplier of the instruction-conditioning layers (word table, highlight)",
    )
    parser.add_argument(
        "--target-aux",
        type=float,
        default=0.0,
        help="weight of the auxiliary loss reading the first target cube's position from the first frames' "
        "image tokens (0 = off)",
    )
    parser.add_argument(
        "--position-gap-steps",
        type=int,
        default=0,
        help="position-gap augmentation: half the episodes jump this many steps' worth of positions "
        "at most, at a random step (0 = off)",
    )
    parser.add_argument(
        "--model-config",
        default="{}",
        help="JSON overrides of CompactVLAConfig, e.g. '{\"hidden_size\": 128}'",
    )


def run(args: argparse.Namespace) -> int:
    from kv_vla.train.bc import TrainConfig, train_bc

    cfg = TrainConfig(
        data=list(args.data),
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        max_per_task=args.max_per_task,
        max_steps=args.max_steps,
        shift_pad=args.shift_pad,
        init_from=args.init,
        time_budget_s=None if args.time_budget_min is None else 60.0 * args.time_budget_min,
        drop_rates=[float(x) for x in args.drop_rates.split(",")],
        label_sigma=args.label_sigma,
        model_overrides=json.loads(args.model_config),
        freeze_vision=args.freeze_vision,
        film_lr_mult=args.film_lr_mult,
        target_aux=args.target_aux,
        position_gap_steps=args.position_gap_steps,
    )
    path = train_bc(cfg)
    print(f"model saved to {path}")
    return 0
