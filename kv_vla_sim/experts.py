"""Scripted, state-based experts: one per task, reading the simulator's true state.

Motions are straight lines between waypoints at a fixed speed (``MAX_STEP`` per control step,
the last step of a segment shorter), computed from the *commanded* end-effector target so that
arrival at a waypoint is exact and repeatable. Before the go signal of the cued tasks the expert
outputs zeros. Pushing is closed loop: the pusher is re-aimed behind the cube every step, and the
expert backs off and re-approaches if the cube slid sideways.

``expert_action`` is what a demonstration records. ``noisy`` (optional, for collection) perturbs
the *executed* motion of full-speed steps only, DART-style: the recorded label stays the clean
expert action for the state reached, so demonstrations show how to recover from small errors
while waypoints (touch points, grasp poses, home) are still reached exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kv_vla_sim.env import MAX_STEP, TabletopEnv
from kv_vla_sim.tasks import CUBE_HALF, HOME, TOUCH_Z, TRAVEL_Z

OPEN, CLOSE = -1.0, 1.0
GRASP_Z = 0.03  # end-effector height to grasp a resting cube (centre at 0.025)
PLACE_Z = 0.04  # end-effector height to release a carried cube just above the pad
PUSH_Z = 0.03
PUSH_TRAVEL_Z = 0.10
PUSH_SPEED = 0.6  # fraction of MAX_STEP while in contact
PUSHER_HALF = 0.012  # half thickness of the closed fingers along the push direction
PRE_PUSH = CUBE_HALF + 0.045  # pre-push point behind the cube centre
MAX_LATERAL = 0.02  # re-approach when the pusher is this far off the cube-zone line
HOME_DWELL = 3  # steps the touch_sequence expert waits at home between the two touches


def _toward(cur: np.ndarray, goal: np.ndarray, speed: float = 1.0) -> tuple[np.ndarray, bool]:
    """Normalised motion from cur toward goal at `speed`; True if it arrives this step."""
    delta = goal - cur
    dist = float(np.linalg.norm(delta))
    step = speed * MAX_STEP
    if dist <= step:
        return delta / MAX_STEP, True
    return delta / dist * step / MAX_STEP, False


@dataclass
class Waypoint:
    pos: np.ndarray
    grip: float
    hold: int = 0  # extra steps to stay once there (e.g. to close the gripper)


class Expert:
    """Scripted policy for one env; ``reset()`` at each episode start, then ``act()`` per step."""

    def __init__(self, env: TabletopEnv) -> None:
        self.env = env
        self.reset()

    def reset(self) -> None:
        self._plan: list[Waypoint] | None = None
        self._held = 0
        self._phase = "approach"
        self._grip = OPEN

    # ------------------------------------------------------------------ public
    def act(self) -> np.ndarray:
        """The expert's action for the env's current state (float32 [4])."""
        env, spec = self.env, self.env.spec
        assert spec is not None, "reset the env first"
        if not spec.go(env.t):
            return np.zeros(4, dtype=np.float32)
        if spec.task == "push":
            return self._push()
        if self._plan is None:
            self._plan = self._make_plan()
        return self._follow()

    # ------------------------------------------------------------------ waypoint plans
    def _make_plan(self) -> list[Waypoint]:
        spec = self.env.spec
        assert spec is not None
        cubes = self.env.cube_positions()

        def above(i: int, z: float = TRAVEL_Z) -> np.ndarray:
            return np.array([cubes[i][0], cubes[i][1], z])

        if spec.task in ("reach", "cued_reach", "late_cued_reach", "long_cued_reach"):
            return [Waypoint(above(spec.target), OPEN), Waypoint(above(spec.target, TOUCH_Z), OPEN)]
        if spec.task == "touch_sequence":
            a, b = spec.sequence
            return [
                Waypoint(above(a), OPEN),
                Waypoint(above(a, TOUCH_Z), OPEN),
                Waypoint(above(a), OPEN),
                Waypoint(HOME.copy(), OPEN, hold=HOME_DWELL),  # let the arm settle: frame == frame 0
                Waypoint(above(b), OPEN),
                Waypoint(above(b, TOUCH_Z), OPEN),
            ]
        if spec.task in ("pick_place", "cued_pick", "long_cued_pick"):
            c = spec.target
            plan = [
                Waypoint(above(c), OPEN),
                Waypoint(above(c, GRASP_Z), OPEN),
                Waypoint(above(c, GRASP_Z), CLOSE, hold=1),
                Waypoint(above(c), CLOSE),
            ]
            if spec.task == "pick_place":
                pad = spec.zone_xy[spec.zone]
                plan += [
                    Waypoint(np.array([pad[0], pad[1], TRAVEL_Z]), CLOSE),
                    Waypoint(np.array([pad[0], pad[1], PLACE_Z]), CLOSE),
                    Waypoint(np.array([pad[0], pad[1], PLACE_Z]), OPEN, hold=1),
                    Waypoint(np.array([pad[0], pad[1], TRAVEL_Z]), OPEN),
                ]
            return plan
        raise ValueError(f"no expert for task {spec.task!r}")

    def _follow(self) -> np.ndarray:
        assert self._plan is not None
        cur = self.env.commanded_target
        while self._plan:
            wp = self._plan[0]
            at = float(np.linalg.norm(wp.pos - cur)) < 1e-5
            grip_ok = wp.grip == self._grip
            if at and grip_ok and self._held >= wp.hold:
                self._plan.pop(0)
                self._held = 0
                continue
            if at:  # change the gripper / dwell in place
                self._grip = wp.grip
                self._held += 1
                return np.array([0.0, 0.0, 0.0, self._grip], dtype=np.float32)
            move, _ = _toward(cur, wp.pos)
            return np.array([*move, self._grip], dtype=np.float32)
        return np.array([0.0, 0.0, 0.0, self._grip], dtype=np.float32)

    # ------------------------------------------------------------------ pushing (closed loop)
    def _push(self) -> np.ndarray:
        spec = self.env.spec
        assert spec is not None
        cur = self.env.commanded_target
        cube = self.env.cube_positions()[spec.target][:2]
        zone = spec.zone_xy[spec.zone]
        d = zone - cube
        u = d / max(float(np.linalg.norm(d)), 1e-9)
        rel = cur[:2] - cube
        lateral = abs(float(u[0] * rel[1] - u[1] * rel[0]))
        behind = -float(np.dot(rel, u))  # distance of the pusher behind the cube centre
        if self._phase == "push" and (lateral > MAX_LATERAL or behind < CUBE_HALF):
            self._phase = "retreat"
        if self._phase == "retreat":
            goal = np.array([cur[0], cur[1], PUSH_TRAVEL_Z])
            move, arrived = _toward(cur, goal)
            if arrived:
                self._phase = "approach"
            return np.array([*move, CLOSE], dtype=np.float32)
        pre = cube - PRE_PUSH * u
        if self._phase == "approach":
            goal = np.array([pre[0], pre[1], PUSH_TRAVEL_Z])
            move, arrived = _toward(cur, goal)
            if arrived:
                self._phase = "descend"
            return np.array([*move, CLOSE], dtype=np.float32)
        if self._phase == "descend":
            goal = np.array([pre[0], pre[1], PUSH_Z])
            move, arrived = _toward(cur, goal)
            if arrived:
                self._phase = "push"
            return np.array([*move, CLOSE], dtype=np.float32)
        # push: aim the pusher at the contact point shifted forward along the cube-zone line
        remaining = float(np.linalg.norm(d))
        contact = cube - (CUBE_HALF + PUSHER_HALF) * u
        goal_xy = contact + min(remaining, PUSH_SPEED * MAX_STEP) * u
        move, _ = _toward(cur, np.array([goal_xy[0], goal_xy[1], PUSH_Z]), PUSH_SPEED)
        return np.array([*move, CLOSE], dtype=np.float32)


def noisy(action: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Perturb the motion of a full-speed step (|xyz| at the max); leave other steps exact."""
    a = np.asarray(action, dtype=np.float32).copy()
    if sigma > 0 and float(np.linalg.norm(a[:3])) > 0.999:
        a[:3] = np.clip(a[:3] + rng.normal(0.0, sigma, 3), -1.0, 1.0)
    return a


def run_expert_episode(
    env: TabletopEnv, seed: int, noise: float = 0.0, record: bool = False
) -> dict[str, object]:
    """Roll out the expert for one seed. Returns success, steps and (if record) the trajectory."""
    obs, info = env.reset(seed=seed)
    expert = Expert(env)
    rng = np.random.default_rng(seed + 7_777)
    frames, actions, proprio = [], [], []
    success, steps = False, 0
    for _ in range(info["max_steps"]):
        a = expert.act()
        if record:
            frames.append(obs["image"])
            actions.append(a)
            proprio.append(obs["proprio"])
        obs, _, terminated, truncated, step_info = env.step(noisy(a, rng, noise))
        steps += 1
        success = bool(step_info["success"])
        if terminated or truncated:
            break
    out: dict[str, object] = {"success": success, "steps": steps, "instruction": info["instruction"]}
    if record:
        out["frames"] = np.stack(frames)
        out["actions"] = np.stack(actions).astype(np.float32)
        out["proprio"] = np.stack(proprio).astype(np.float32)
    return out
