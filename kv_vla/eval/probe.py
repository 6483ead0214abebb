"""``kv-vla probe``: the instruction probe (:mod:`kv_vla_sim.probe`) run on the compact VLA.

The scenes and the scoring live in the sim room, which never imports the model; this module
supplies the model's first action and the command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from kv_vla_sim.probe import FirstAction, expert_first_action, instruction_binding


def model_first_action(model: Any) -> FirstAction:
    """The VLA's first (un-normalised) action for an instruction and a frame, in a fresh episode each time."""
    from kv_vla.cache import EpisodeCacheConfig
    from kv_vla.runtime import EpisodeRuntime

    runtime = EpisodeRuntime(model, EpisodeCacheConfig(policy="full"))

    def act(instruction: str, image: np.ndarray, _env: Any, _target: int) -> np.ndarray:
        runtime.reset(instruction)
        return runtime.step(image).action

    return act


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/compact-vla", help="compact VLA folder")
    parser.add_argument("--scenes", type=int, default=50, help="scenes (evaluation seeds 0..N-1)")
    parser.add_argument(
        "--order",
        action="store_true",
        help="probe word order on touch_sequence scenes ('touch the A cube, then the B cube')",
    )
    parser.add_argument(
        "--expert", action="store_true", help="probe the scripted expert instead (the ceiling)"
    )
    parser.add_argument("--json", default=None, help="write the report here (atomically)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from kv_vla.atomic import atomic_write_text
    from kv_vla.model.compact import CompactVLA

    if args.expert:
        agent, image_size, name = expert_first_action, 64, "scripted expert"
    else:
        model = CompactVLA.from_pretrained(args.model).eval()
        agent, image_size, name = model_first_action(model), model.image_size, str(args.model)
    report = instruction_binding(
        agent, list(range(args.scenes)), image_size, not args.no_progress, order=args.order
    )
    report["agent"] = name
    print(
        f"binding accuracy {report['binding_accuracy']:.2f} (chance {report['chance']:.2f}"
        f"{', word order ignored: <= 0.50' if args.order else ''}) over "
        f"{report['scenes']} {report['task']} scenes; mean action change between instructions "
        f"{report['mean_action_change_between_words']:.3f} (action units)"
    )
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2))
    return 0
