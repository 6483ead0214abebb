"""The instruction-binding probe on real PyBullet reach scenes: its ceiling, its floor, its maths."""

from __future__ import annotations

import numpy as np
import pytest

from kv_vla_sim.probe import expert_first_action, instruction_binding

SCENES = [0, 1, 2, 3, 4]


def test_the_scripted_expert_binds_every_word():
    report = instruction_binding(expert_first_action, SCENES, progress=False)
    assert report["binding_accuracy"] == 1.0
    assert report["mean_action_change_between_words"] > 0.3


def test_a_word_blind_policy_scores_exactly_one_third():
    """Whatever a policy does, if its action ignores the word it heads for one cube under all three
    words: exactly one hit per scene."""
    rng = np.random.default_rng(0)
    per_scene: dict[int, np.ndarray] = {}

    def blind(_instruction, image, _env, _target):
        key = hash(image.tobytes())
        return per_scene.setdefault(key, rng.normal(size=4))

    report = instruction_binding(blind, SCENES, progress=False)
    assert report["binding_accuracy"] == pytest.approx(1 / 3)
    assert report["mean_action_change_between_words"] == 0.0
    assert all(len(set(s["chosen_cube_per_ask"])) == 1 for s in report["per_scene"])


def test_a_policy_that_heads_for_the_wrong_cube_scores_zero():
    def contrary(instruction, image, env, target):
        return expert_first_action(instruction, image, env, (target + 1) % 3)

    assert instruction_binding(contrary, SCENES, progress=False)["binding_accuracy"] == 0.0


def test_order_probe_expert_scores_one_and_a_bag_of_words_policy_one_half():
    """On touch_sequence scenes, asked "touch the A cube, then the B cube" for all six ordered
    pairs: the expert (told A) heads for A every time; a policy that reads which colours are named
    but not their order -- here it heads for the alphabetically first of the two -- answers (A, B)
    and (B, A) alike, so it is right on exactly one of each pair."""
    expert = instruction_binding(expert_first_action, SCENES[:3], progress=False, order=True)
    assert expert["task"] == "touch_sequence" and expert["binding_accuracy"] == 1.0

    def bag_of_words(instruction, image, env, _target):
        named = [i for i, c in enumerate(env.spec.cube_colours) if f" {c} " in instruction]
        assert len(named) == 2
        first = min(named, key=lambda i: env.spec.cube_colours[i])
        return expert_first_action(instruction, image, env, first)

    bag = instruction_binding(bag_of_words, SCENES[:3], progress=False, order=True)
    assert bag["binding_accuracy"] == 0.5
    assert all(len(s["chosen_cube_per_ask"]) == 6 for s in bag["per_scene"])
