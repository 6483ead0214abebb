"""``kv-vla probe``: does a policy read the colour word of its instruction?

Why: a policy can reach 40-60% on the instruction-named tasks without reading the instruction at
all (it touches *a* cube; chance is 1/3 for ``reach``), so success alone hides whether the language
path works. This probe isolates it. On the first frame of ``reach`` scenes it asks the model once
per cube, changing only the colour word ("reach the red/green/blue cube"), and checks whether the
first action heads for the named cube: its lateral direction must be closer (by cosine) to the
direction from the gripper to that cube than to the other two. A policy that ignores the word gives
the same action for all three and scores 1/3; the scripted expert scores 1.

It also reports how far the action moves when only the word changes (mean pairwise distance of the
lateral actions, in the env's action units), to put beside the expert's (``--expert``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TEMPLATE = "reach the {c} cube"


FirstAction = Callable[[str, np.ndarray, Any, int], np.ndarray]
"""(instruction, first frame, the env, index of the named cube) -> the first action in the env's
units; the env and the index are there for the scripted expert, which is told its target."""


def instruction_binding(
    first_action: FirstAction, seeds: list[int], image_size: int = 64, progress: bool = True
) -> dict[str, Any]:
    """The probe over ``reach`` scenes ``seeds``; ``first_action`` is asked once per cube colour."""
    from tqdm import tqdm

    from kv_vla_sim.env import make_env

    env = make_env("reach", image_size=image_size)
    hits, spreads, per_scene = 0, [], []
    try:
        for seed in tqdm(seeds, desc="instruction probe (reach)", unit="scene", disable=not progress):
            obs, _ = env.reset(seed=seed)
            spec = env.spec
            assert spec is not None
            to_cubes = spec.cube_xy - env.ee_pos()[:2]
            to_cubes = to_cubes / np.linalg.norm(to_cubes, axis=1, keepdims=True)
            lateral = [
                np.asarray(first_action(TEMPLATE.format(c=colour), obs["image"], env, k), dtype=np.float64)[
                    :2
                ]
                for k, colour in enumerate(spec.cube_colours)
            ]
            chosen = []
            for k, move in enumerate(lateral):
                cos = to_cubes @ move / max(float(np.linalg.norm(move)), 1e-9)
                chosen.append(int(np.argmax(cos)))
                hits += int(chosen[-1] == k)
            pairs = [np.linalg.norm(lateral[i] - lateral[j]) for i in range(3) for j in range(i + 1, 3)]
            spreads.append(float(np.mean(pairs)))
            per_scene.append({"seed": seed, "chosen_cube_per_word": chosen})
    finally:
        env.close()
    return {
        "task": "reach",
        "template": TEMPLATE,
        "scenes": len(seeds),
        "binding_accuracy": hits / (3 * len(seeds)),
        "chance": 1 / 3,
        "mean_action_change_between_words": float(np.mean(spreads)),
        "per_scene": per_scene,
    }


def model_first_action(model: Any) -> FirstAction:
    """The compact VLA's first (un-normalised) action for an instruction and a frame, in a fresh
    episode each time."""
    from kv_vla.cache import EpisodeCacheConfig
    from kv_vla.runtime import EpisodeRuntime

    runtime = EpisodeRuntime(model, EpisodeCacheConfig(policy="full"))

    def act(instruction: str, image: np.ndarray, _env: Any, _target: int) -> np.ndarray:
        runtime.reset(instruction)
        return runtime.step(image).action

    return act


def expert_first_action(_instruction: str, _image: np.ndarray, env: Any, target: int) -> np.ndarray:
    """The scripted expert's first action toward cube ``target`` (it is told, not asked to read):
    the probe's ceiling, and the scale of how much the action should change between words."""
    import dataclasses

    from kv_vla_sim.experts import Expert

    spec = env.spec
    env.spec = dataclasses.replace(spec, target=target)
    try:
        return Expert(env).act()
    finally:
        env.spec = spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/compact-vla", help="compact VLA folder")
    parser.add_argument("--scenes", type=int, default=50, help="reach scenes (evaluation seeds 0..N-1)")
    parser.add_argument(
        "--expert", action="store_true", help="probe the scripted expert instead (the ceiling)"
    )
    parser.add_argument("--json", default=None, help="write the report here (atomically)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from kv_vla.atomic import atomic_write_text
    from kv_vla.model.compact_vla import CompactVLA

    if args.expert:
        agent, image_size, name = expert_first_action, 64, "scripted expert"
    else:
        model = CompactVLA.from_pretrained(args.model).eval()
        agent, image_size, name = model_first_action(model), model.image_size, str(args.model)
    report = instruction_binding(agent, list(range(args.scenes)), image_size, not args.no_progress)
    report["agent"] = name
    print(
        f"binding accuracy {report['binding_accuracy']:.2f} (chance {report['chance']:.2f}) over "
        f"{report['scenes']} reach scenes; mean action change between colour words "
        f"{report['mean_action_change_between_words']:.3f} (action units)"
    )
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2))
    return 0
