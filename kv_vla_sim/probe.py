"""The instruction probe's scenes and scoring: does a policy read the colour word of its instruction?

Why: a policy can succeed well above chance on the instruction-named tasks without reading the
instruction at all (it touches *a* cube), so success alone hides whether the language path works. This probe isolates it. On the first frame of ``reach`` scenes it asks the model once
per cube, changing only the colour word ("reach the red/green/blue cube"), and checks whether the
first action heads for the named cube: its lateral direction must be closer (by cosine) to the
direction from the gripper to that cube than to the other two. A policy that ignores the word gives
the same action for all three and scores 1/3; the scripted expert scores 1. The policy comes in
as a function (``FirstAction``), so this room needs no model: ``kv-vla probe``
(:mod:`kv_vla.eval.probe`) plugs the VLA in.

It also reports how far the action moves when only the word changes (mean pairwise distance of the
lateral actions, in the env's action units), to put beside the expert's (``--expert``).

``--order`` probes word *order* instead, on the first frame of ``touch_sequence`` scenes: all six
ordered pairs "touch the {a} cube, then the {b} cube", scored on whether the first action heads for
cube a. A word-blind policy scores 1/3, and a policy that reads the words but not their order (a
bag of words: the same action for (a, b) and (b, a)) at most 1/2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

TEMPLATE = "reach the {c} cube"
ORDER_TEMPLATE = "touch the {a} cube, then the {b} cube"


FirstAction = Callable[[str, np.ndarray, Any, int], np.ndarray]
"""(instruction, first frame, the env, index of the named cube) -> the first action in the env's
units; the env and the index are there for the scripted expert, which is told its target."""


def instruction_binding(
    first_action: FirstAction,
    seeds: list[int],
    image_size: int = 64,
    progress: bool = True,
    order: bool = False,
) -> dict[str, Any]:
    """The probe over scenes ``seeds``: ``reach`` scenes asked once per cube colour, or with
    ``order`` ``touch_sequence`` scenes asked once per ordered pair of colours."""
    from tqdm import tqdm

    from kv_vla_sim.env import make_env

    task = "touch_sequence" if order else "reach"
    env = make_env(task, image_size=image_size)
    hits, asks_total, spreads, per_scene = 0, 0, [], []
    try:
        for seed in tqdm(seeds, desc=f"instruction probe ({task})", unit="scene", disable=not progress):
            obs, _ = env.reset(seed=seed)
            spec = env.spec
            assert spec is not None
            colours = spec.cube_colours
            if order:
                asks = [
                    (ORDER_TEMPLATE.format(a=colours[a], b=colours[b]), a)
                    for a in range(3)
                    for b in range(3)
                    if a != b
                ]
            else:
                asks = [(TEMPLATE.format(c=colour), k) for k, colour in enumerate(colours)]
            to_cubes = spec.cube_xy - env.ee_pos()[:2]
            to_cubes = to_cubes / np.linalg.norm(to_cubes, axis=1, keepdims=True)
            lateral = [
                np.asarray(first_action(text, obs["image"], env, k), dtype=np.float64)[:2] for text, k in asks
            ]
            chosen = []
            for (_, k), move in zip(asks, lateral):
                cos = to_cubes @ move / max(float(np.linalg.norm(move)), 1e-9)
                chosen.append(int(np.argmax(cos)))
                hits += int(chosen[-1] == k)
            asks_total += len(asks)
            n = len(lateral)
            pairs = [np.linalg.norm(lateral[i] - lateral[j]) for i in range(n) for j in range(i + 1, n)]
            spreads.append(float(np.mean(pairs)))
            per_scene.append(
                {"seed": seed, "named_first": [k for _, k in asks], "chosen_cube_per_ask": chosen}
            )
    finally:
        env.close()
    return {
        "task": task,
        "template": ORDER_TEMPLATE if order else TEMPLATE,
        "scenes": len(seeds),
        "binding_accuracy": hits / asks_total,
        "chance": 1 / 3,
        "mean_action_change_between_words": float(np.mean(spreads)),
        "per_scene": per_scene,
    }


def expert_first_action(_instruction: str, _image: np.ndarray, env: Any, target: int) -> np.ndarray:
    """The scripted expert's first action toward cube ``target`` (it is told, not asked to read):
    the probe's ceiling, and the scale of how much the action should change between words. In a
    ``touch_sequence`` scene ``target`` is the cube to touch first."""
    import dataclasses

    from kv_vla_sim.experts import Expert

    spec = env.spec
    if spec.sequence:
        told = dataclasses.replace(spec, sequence=(target, (target + 1) % 3), target=(target + 1) % 3)
    else:
        told = dataclasses.replace(spec, target=target)
    env.spec = told
    try:
        return Expert(env).act()
    finally:
        env.spec = spec
