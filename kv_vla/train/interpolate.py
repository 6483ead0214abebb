"""``kv-vla interpolate``: weight-space interpolation of two fine-tunes of one compact VLA.

``(1 - alpha) * A + alpha * B`` for every parameter and buffer (WiSE-FT, Wortsman et al. 2022,
"Robust fine-tuning of zero-shot models"). Why it is here: a fine-tune that teaches a new task
can cost precision on an old one; the interpolation between the model before and after often
keeps most of both, with no training (the shipped model is one: models/README.md).
Both folders must hold the same architecture, tokenizer and action normalisation, or the mix
means nothing; that is checked and refused with the difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kv_vla.atomic import atomic_write_json

# Config entries that may differ between two fine-tunes of one model.
_IGNORED_CONFIG_KEYS = {"transformers_version", "_name_or_path"}


def _comparable_config(model: Any) -> dict[str, Any]:
    return {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}


def interpolate_models(a: str | Path, b: str | Path, alpha: float, out: str | Path) -> Path:
    """Write ``(1 - alpha) * A + alpha * B`` to ``out`` (atomically) and return ``out``.

    Raises ``ValueError`` when ``alpha`` is outside [0, 1] or the two models are not two
    fine-tunes of one model (config, tokenizer, normalisation or tensor names differ).
    """
    import torch

    from kv_vla.model.compact import CompactVLA

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    model_a = CompactVLA.from_pretrained(a)
    model_b = CompactVLA.from_pretrained(b)
    cfg_a, cfg_b = _comparable_config(model_a), _comparable_config(model_b)
    differing = sorted(k for k in cfg_a.keys() | cfg_b.keys() if cfg_a.get(k) != cfg_b.get(k))
    if differing:
        raise ValueError(f"{a} and {b} have different configs ({', '.join(differing)})")
    if model_a.norm_stats != model_b.norm_stats:
        raise ValueError(f"{a} and {b} normalise actions differently (norm_stats.json)")
    if model_a.tokenizer.get_vocab() != model_b.tokenizer.get_vocab():
        raise ValueError(f"{a} and {b} have different tokenizers")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if state_a.keys() != state_b.keys():
        raise ValueError(f"{a} and {b} hold different tensors")
    mixed = {}
    for name, tb in state_b.items():
        ta = state_a[name]
        if not torch.is_floating_point(tb):  # integer buffers (counters, indices) are B's
            mixed[name] = tb
            continue
        mixed[name] = ((1.0 - alpha) * ta.double() + alpha * tb.double()).to(tb.dtype)
    model_b.load_state_dict(mixed)
    out = Path(out)
    model_b.save_pretrained(out)
    record: dict[str, Any] = {}
    b_config = Path(b) / "train_config.json"
    if b_config.exists():
        record = json.loads(b_config.read_text())
    record["weight_interpolation"] = {"a": str(a), "b": str(b), "alpha": alpha}
    atomic_write_json(out / "train_config.json", record, indent=1)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", required=True, help="model folder at alpha = 0 (e.g. before a fine-tune)")
    parser.add_argument("--b", required=True, help="model folder at alpha = 1 (e.g. after it)")
    parser.add_argument("--alpha", type=float, required=True, help="weight of B, in [0, 1]")
    parser.add_argument("--out", required=True, help="output model folder (no gate: train one for it)")


def run(args: argparse.Namespace) -> int:
    try:
        out = interpolate_models(args.a, args.b, args.alpha, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kv-vla interpolate: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} = {1 - args.alpha:g} * {args.a} + {args.alpha:g} * {args.b}")
    return 0
