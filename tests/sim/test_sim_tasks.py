"""Task predicates on hand-made states (no physics), and episode sampling."""

from __future__ import annotations

import numpy as np
import pytest

from kv_vla_sim.tasks import (
    CUBE_HALF,
    LATE_CUE_ONSETS,
    LIFT_Z,
    MIN_CUE_GAP,
    MIN_SEPARATION,
    TASKS,
    TOUCH_Z,
    SceneState,
    get_task,
    in_zone,
    touching,
)

REST = CUBE_HALF  # z of a cube centre resting on the table
FAR = np.array([0.35, 0.0, 0.25])  # end effector at home, touching nothing


def resting(spec) -> np.ndarray:
    return np.array([[x, y, REST] for x, y in spec.cube_xy])


def state(spec, **kw) -> SceneState:
    base = {"t": 5, "ee_pos": FAR, "cube_pos": resting(spec)}
    base.update(kw)
    return SceneState(**base)


def test_registry_has_nine_tasks_with_documented_chance():
    assert set(TASKS) == {
        "long_cued_reach",
        "long_cued_pick",
        "reach",
        "push",
        "pick_place",
        "cued_reach",
        "cued_pick",
        "touch_sequence",
        "late_cued_reach",
    }
    for name, task in TASKS.items():
        assert task.name == name and task.templates and 0 < task.chance <= 1 and task.chance_note
        long = name.startswith("long_")
        assert task.max_steps <= (800 if long else 62 if task.needs_memory else 40)
    assert TASKS["cued_reach"].chance == pytest.approx(1 / 3)
    assert TASKS["touch_sequence"].chance == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("fly")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sampling_is_deterministic_and_separated(name):
    task = TASKS[name]
    a, b, c = task.sample(7), task.sample(7), task.sample(8)
    assert a.instruction == b.instruction and np.array_equal(a.cube_xy, b.cube_xy)
    assert not np.array_equal(a.cube_xy, c.cube_xy)
    for s in (task.sample(seed) for seed in range(30)):
        pts = np.concatenate([s.cube_xy, s.zone_xy])
        d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts))
        assert d.min() >= MIN_SEPARATION - 1e-9


def test_instructions_name_the_target():
    for seed in range(20):
        s = TASKS["reach"].sample(seed)
        assert s.cube_colours[s.target] in s.instruction
        s = TASKS["push"].sample(seed)
        assert s.cube_colours[s.target] in s.instruction and s.zone_colours[s.zone] in s.instruction
        s = TASKS["touch_sequence"].sample(seed)
        a, b = (s.cube_colours[i] for i in s.sequence)
        assert s.instruction.index(a) < s.instruction.index(b)


def test_cued_timing_gives_a_long_gap():
    for seed in range(50):
        s = TASKS["cued_pick"].sample(seed)
        assert set(s.cube_colours) == {"grey"}
        assert s.cue_visible(0) and s.cue_visible(s.cue_steps - 1) and not s.cue_visible(s.cue_steps)
        assert s.go_step - s.cue_steps >= MIN_CUE_GAP
        assert not s.go(s.go_step - 1) and s.go(s.go_step)
        assert s.go_step + 12 <= s.max_steps


def test_late_cue_onset_varies_and_keeps_the_cued_layout_and_gap():
    """Same layout, target and instruction as cued_reach for a seed; only the cue moves, to a random
    frame in LATE_CUE_ONSETS, and the go step moves with it."""
    onsets = set()
    for seed in range(60):
        late, cued = TASKS["late_cued_reach"].sample(seed), TASKS["cued_reach"].sample(seed)
        assert np.array_equal(late.cube_xy, cued.cube_xy) and late.target == cued.target
        assert late.instruction == cued.instruction
        lo, hi = LATE_CUE_ONSETS
        assert lo <= late.cue_onset <= hi and late.go_step == cued.go_step + late.cue_onset
        assert not late.cue_visible(late.cue_onset - 1) and not late.cue_visible(0)
        assert late.cue_visible(late.cue_onset) and late.cue_visible(late.cue_onset + late.cue_steps - 1)
        assert not late.cue_visible(late.cue_onset + late.cue_steps)
        assert late.go_step - (late.cue_onset + late.cue_steps) >= MIN_CUE_GAP
        onsets.add(late.cue_onset)
    assert onsets == set(range(LATE_CUE_ONSETS[0], LATE_CUE_ONSETS[1] + 1))


def test_touching_and_in_zone_geometry():
    cube = np.array([0.5, 0.1, REST])
    assert touching(np.array([0.5, 0.1, TOUCH_Z]), cube)
    assert touching(np.array([0.52, 0.11, TOUCH_Z]), cube)
    assert not touching(np.array([0.5, 0.1, 0.15]), cube)  # too high
    assert not touching(np.array([0.56, 0.1, TOUCH_Z]), cube)  # beside it
    assert in_zone(np.array([0.54, 0.0, REST]), np.array([0.5, 0.0]))
    assert not in_zone(np.array([0.56, 0.0, REST]), np.array([0.5, 0.0]))


@pytest.mark.parametrize("name", ["reach", "cued_reach"])
def test_reach_predicates(name):
    task = TASKS[name]
    spec = task.sample(3)
    other = (spec.target + 1) % 3
    assert not task.success(spec, state(spec)) and not task.failure(spec, state(spec))
    assert task.success(spec, state(spec, touches=(spec.target,)))
    assert not task.failure(spec, state(spec, touches=(spec.target,)))
    assert task.failure(spec, state(spec, touches=(other,)))
    assert not task.success(spec, state(spec, touches=(other, spec.target)))


def test_push_predicate():
    task = TASKS["push"]
    spec = task.sample(4)
    cubes = resting(spec)
    assert not task.success(spec, state(spec, cube_pos=cubes))
    zx, zy = spec.zone_xy[spec.zone]
    cubes[spec.target] = [zx + 0.03, zy - 0.03, REST]
    assert task.success(spec, state(spec, cube_pos=cubes))
    lifted = cubes.copy()
    lifted[spec.target, 2] = 0.1
    assert not task.success(spec, state(spec, cube_pos=lifted))
    wrong = resting(spec)
    wrong[1 - spec.target] = [zx, zy, REST]  # the other cube in the zone
    assert not task.success(spec, state(spec, cube_pos=wrong))
    other_zone = resting(spec)
    ox, oy = spec.zone_xy[1 - spec.zone]
    other_zone[spec.target] = [ox, oy, REST]
    assert not task.success(spec, state(spec, cube_pos=other_zone))


def test_pick_place_predicate():
    task = TASKS["pick_place"]
    spec = task.sample(5)
    px, py = spec.zone_xy[spec.zone]
    cubes = resting(spec)
    cubes[spec.target] = [px, py, REST]
    assert task.success(spec, state(spec, cube_pos=cubes))
    assert not task.success(spec, state(spec, cube_pos=cubes, grasped=spec.target))  # still held
    held = cubes.copy()
    held[spec.target, 2] = 0.12
    assert not task.success(spec, state(spec, cube_pos=held))
    assert not task.success(spec, state(spec))


def test_cued_pick_predicates():
    task = TASKS["cued_pick"]
    spec = task.sample(6)
    other = (spec.target + 2) % 3
    cubes = resting(spec)
    cubes[spec.target, 2] = LIFT_Z + 0.01
    assert task.success(spec, state(spec, cube_pos=cubes, grasped=spec.target))
    assert not task.success(spec, state(spec, grasped=spec.target))  # grasped but not lifted
    assert not task.success(spec, state(spec, cube_pos=cubes))  # lifted but not held (falling)
    assert task.failure(spec, state(spec, grasped=other))
    assert not task.failure(spec, state(spec, grasped=spec.target))
    assert not task.failure(spec, state(spec))


def test_touch_sequence_predicates():
    task = TASKS["touch_sequence"]
    spec = task.sample(9)
    a, b = spec.sequence
    c = ({0, 1, 2} - {a, b}).pop()
    assert task.success(spec, state(spec, touches=(a, b)))
    for touches in [(), (a,)]:
        assert not task.success(spec, state(spec, touches=touches))
        assert not task.failure(spec, state(spec, touches=touches))
    for touches in [(b,), (c,), (a, a), (a, c), (b, a)]:
        assert task.failure(spec, state(spec, touches=touches))
        assert not task.success(spec, state(spec, touches=touches))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_first_target_xy_is_the_named_lit_or_first_cube_scaled_to_the_object_region(task):
    from kv_vla_sim.tasks import X_RANGE, Y_RANGE, first_target_xy

    for seed in range(5):
        spec = TASKS[task].sample(seed)
        idx = spec.sequence[0] if spec.sequence else spec.target
        xy = first_target_xy(task, seed)
        if task in ("late_cued_reach", "long_cued_reach", "long_cued_pick"):  # frame 0: no cue, no label
            assert xy is None
            continue
        assert xy is not None and xy.shape == (2,) and np.all(np.abs(xy) <= 1.0)
        back = np.array(
            [
                X_RANGE[0] + (xy[0] + 1) / 2 * (X_RANGE[1] - X_RANGE[0]),
                Y_RANGE[0] + (xy[1] + 1) / 2 * (Y_RANGE[1] - Y_RANGE[0]),
            ]
        )
        np.testing.assert_allclose(back, spec.cube_xy[idx], atol=1e-6)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_target_sequence_xy_is_the_first_then_second_target(task):
    """touch_sequence's two rows are its two cubes in the instruction's order (different cubes);
    every other task repeats its one target."""
    from kv_vla_sim.tasks import first_target_xy, target_sequence_xy

    for seed in range(5):
        both = target_sequence_xy(task, seed)
        if task in ("late_cued_reach", "long_cued_reach", "long_cued_pick"):
            assert both is None
            continue
        assert both is not None and both.shape == (2, 2)
        np.testing.assert_array_equal(both[0], first_target_xy(task, seed))
        if task == "touch_sequence":
            assert np.abs(both[0] - both[1]).max() > 0.1
        else:
            np.testing.assert_array_equal(both[1], both[0])
