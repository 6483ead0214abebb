"""TabletopEnv: a Franka Panda over a table with cubes, zones and a go lamp, in PyBullet DIRECT mode.

Design choices (costs measured on one laptop-class CPU core):

* Each env owns its own physics client (``BulletClient``), so several envs live in one process.
* ``reset`` rebuilds the world from scratch (``resetSimulation`` + loading, ~40 ms): no contact
  cache or solver warm start survives from an earlier episode, so a seed always gives the same
  episode, frames included, whatever ran before.
* Physics at 120 Hz, ``substeps`` (default 24) per control step: control at 5 Hz (0.2 s per
  step). About 12 ms of CPU per control step including the 64x64 frame; 240 Hz x 48 substeps
  costs ~18 ms for the same expert success.
* Action ``[dx, dy, dz, g]`` in [-1, 1]: the commanded end-effector target moves by
  ``MAX_STEP * (dx, dy, dz)`` (clipped to the workspace), joint targets come from damped IK with
  the gripper pointing straight down at a fixed yaw; ``g > 0`` closes the gripper.
* Grasping is "magnetic": when the gripper command switches from open to closed with a cube
  centre within :data:`GRASP_RADIUS` of the end effector, a fixed constraint attaches the cube to
  the hand; opening releases it. Friction grasps of a 5 cm cube are fragile and would make the
  experiment about grasp physics rather than memory.
* The camera is fixed and renders with ``ER_TINY_RENDERER`` (CPU) at ``image_size`` (default
  64x64), ~2.5 ms per frame thanks to the low-polygon arm (see ``assets.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pybullet as p
import pybullet_data
from pybullet_utils import bullet_client

from kv_vla_sim import assets
from kv_vla_sim.tasks import CUBE_HALF, HOME, ZONE_HALF, EpisodeSpec, SceneState, Task, get_task, touching

MAX_STEP = 0.05  # metres per control step at |action| = 1
PHYSICS_HZ = 120  # 240 Hz costs ~18 ms of CPU per control step, 120 Hz ~12 ms; same success
DEFAULT_SUBSTEPS = 24
GRASP_RADIUS = 0.045
WORKSPACE_LOW = np.array([0.30, -0.35, 0.03])  # bounds of the commanded end-effector target
WORKSPACE_HIGH = np.array([0.75, 0.35, 0.32])
LAMP_XY = np.array([0.78, -0.22])
DISTRACTOR_LAMP_XY = np.array([[0.78, 0.22], [0.78, 0.0]])  # long tasks' blinking lamps
EE_LINK = 11  # panda_grasptarget: between the fingertips (~1 cm above their lower ends)
ARM_JOINTS = list(range(7))
FINGER_JOINTS = [9, 10]
REST_POSE = [0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.785]
DOWN = p.getQuaternionFromEuler([np.pi, 0.0, 0.0])  # fingers open along world y
FINGER_OPEN, FINGER_CLOSED = 0.04, 0.0

# Camera in front of the table looking back at the robot: the arm stays visible and never hides
# the cubes from the camera when it is at home.
CAMERA_EYE = (1.25, 0.0, 1.05)
CAMERA_TARGET = (0.45, 0.0, 0.02)
CAMERA_FOV = 32.0


class TabletopEnv:
    """Gymnasium-style env (reset/step) for one task; see the module docstring."""

    def __init__(
        self,
        task: str | Task,
        image_size: int = 64,
        substeps: int = DEFAULT_SUBSTEPS,
    ) -> None:
        self.task: Task = get_task(task) if isinstance(task, str) else task
        self.image_size = int(image_size)
        self.substeps = int(substeps)
        self._client = bullet_client.BulletClient(connection_mode=p.DIRECT)
        self._urdf = assets.lowpoly_panda_urdf()
        self._view = p.computeViewMatrix(CAMERA_EYE, CAMERA_TARGET, (0.0, 0.0, 1.0))
        self._proj = p.computeProjectionMatrixFOV(CAMERA_FOV, 1.0, 0.05, 3.0)
        self._home_q: list[float] | None = None
        self._constraint: int | None = None
        self.spec: EpisodeSpec | None = None
        self._t = 0

    # ------------------------------------------------------------------ gym API
    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start the episode of ``seed`` (0 if None); returns (obs, info)."""
        seed = 0 if seed is None else int(seed)
        self.spec = self.task.sample(seed)
        self._place(self.spec)
        self._t = 0
        self._target = HOME.copy()
        self._closed = False
        self._grasped = -1
        self._touches: list[int] = []
        self._touching = [False] * len(self._cubes)
        self._done = False
        self._update_visuals()
        info = {
            "instruction": self.spec.instruction,
            "task": self.task.name,
            "max_steps": self.spec.max_steps,
            "seed": seed,
        }
        return self._obs(), info

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Apply one control step. Before the go signal the arm ignores the action; in a task whose
        wait is static (``spec.static_wait``: nothing can move) the physics is not stepped then."""
        if self.spec is None:
            raise RuntimeError("call reset() first")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if a.shape != (4,) or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be 4 finite numbers, got {action!r}")
        if self.spec.go(self._t):
            self._target = np.clip(self._target + MAX_STEP * a[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
            self._set_gripper(bool(a[3] > 0.0))
        if not (self.spec.static_wait and not self.spec.go(self._t)):
            self._drive_arm()
            for _ in range(self.substeps):
                self._client.stepSimulation()
        self._t += 1
        self._update_touches()
        self._update_visuals()
        state = self.state()
        success = self.task.success(self.spec, state)
        failure = (not success) and self.task.failure(self.spec, state)
        terminated = success or failure
        truncated = (not terminated) and self._t >= self.spec.max_steps
        info = {"success": success, "failure": failure, "t": self._t, "go": self.spec.go(self._t)}
        return self._obs(), float(success), terminated, truncated, info

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            # BulletClient's own __del__ would disconnect again, and at interpreter exit (module
            # globals gone) report a TypeError instead of ignoring it
            self._client._client = -1
            self._client = None  # type: ignore[assignment]

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:  # noqa: SIM105 (no contextlib: at interpreter exit its module may be torn down already)
            self.close()
        except BaseException:
            pass

    # ------------------------------------------------------------------ state
    @property
    def t(self) -> int:
        return self._t

    @property
    def commanded_target(self) -> np.ndarray:
        """The end-effector target the arm is servoing to (what the actions integrate)."""
        return self._target.copy()

    def ee_pos(self) -> np.ndarray:
        return np.array(self._client.getLinkState(self._robot, EE_LINK)[4])

    def gripper_width(self) -> float:
        return float(sum(self._client.getJointState(self._robot, j)[0] for j in FINGER_JOINTS))

    def cube_positions(self) -> np.ndarray:
        return np.array([self._client.getBasePositionAndOrientation(c)[0] for c in self._cubes])

    def state(self) -> SceneState:
        return SceneState(
            t=self._t,
            ee_pos=self.ee_pos(),
            cube_pos=self.cube_positions(),
            grasped=self._grasped,
            gripper_closed=self._closed,
            touches=tuple(self._touches),
        )

    # ------------------------------------------------------------------ internals
    def _build(self, spec: EpisodeSpec) -> None:
        """Create the world of one episode: table, arm at home, zones, lamp, cubes."""
        c = self._client
        c.resetSimulation()
        c.setPhysicsEngineParameter(deterministicOverlappingPairs=1)
        c.setAdditionalSearchPath(pybullet_data.getDataPath())
        c.setGravity(0.0, 0.0, -9.81)
        c.setTimeStep(1.0 / PHYSICS_HZ)
        table_half = [0.45, 0.5, 0.02]
        table = c.createMultiBody(
            0.0,
            c.createCollisionShape(p.GEOM_BOX, halfExtents=table_half),
            c.createVisualShape(p.GEOM_BOX, halfExtents=table_half, rgbaColor=assets.TABLE_RGBA),
            [0.45, 0.0, -0.02],
        )
        c.changeDynamics(table, -1, lateralFriction=0.5)
        self._robot = c.loadURDF(self._urdf, [0.0, 0.0, 0.0], useFixedBase=True)
        for link in range(-1, c.getNumJoints(self._robot)):
            rgba = assets.HAND_RGBA if link >= 8 else assets.ARM_RGBA
            c.changeVisualShape(self._robot, link, rgbaColor=rgba)
        self._set_home_pose()
        self._zones = []
        for colour, xy in zip(spec.zone_colours, spec.zone_xy):
            vis = c.createVisualShape(
                p.GEOM_BOX, halfExtents=[ZONE_HALF, ZONE_HALF, 0.001], rgbaColor=assets.COLOURS[colour]
            )
            self._zones.append(c.createMultiBody(0.0, -1, vis, [xy[0], xy[1], 0.001]))
        lamp_vis = c.createVisualShape(p.GEOM_BOX, halfExtents=[0.035, 0.035, 0.004], rgbaColor=(1, 1, 1, 1))
        self._lamp = c.createMultiBody(0.0, -1, lamp_vis, [LAMP_XY[0], LAMP_XY[1], 0.004])
        self._distractor_lamps = [
            c.createMultiBody(0.0, -1, lamp_vis, [xy[0], xy[1], 0.004])
            for xy in DISTRACTOR_LAMP_XY[: spec.n_distractor_lamps]
        ]
        self._cubes = []
        for colour, xy in zip(spec.cube_colours, spec.cube_xy):
            half = [CUBE_HALF] * 3
            body = c.createMultiBody(
                0.1,
                c.createCollisionShape(p.GEOM_BOX, halfExtents=half),
                c.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=assets.COLOURS[colour]),
                [xy[0], xy[1], CUBE_HALF],
            )
            # frictionAnchor: without it resting boxes creep ~15 um/s on the box table, enough to
            # flip a pixel during the cued tasks' wait, when the frame must not change at all.
            c.changeDynamics(body, -1, lateralFriction=0.5, spinningFriction=0.001, frictionAnchor=1)
            self._cubes.append(body)

    def _place(self, spec: EpisodeSpec) -> None:
        """Rebuild the world for this episode.

        A full ``resetSimulation`` costs ~40 ms per episode but is the only way we found to make
        an episode independent of what ran before it: ``saveState``/``restoreState`` leaves solver
        warm-start data behind and episodes then differ in the 5th decimal after a few steps.
        """
        self._constraint = None
        self._build(spec)

    def _set_home_pose(self) -> None:
        c, r = self._client, self._robot
        if self._home_q is None:  # same computation every time: deterministic
            for j, q in enumerate(REST_POSE):
                c.resetJointState(r, j, q)
            for _ in range(20):
                q = self._ik(HOME, iterations=100)
                for j in ARM_JOINTS:
                    c.resetJointState(r, j, q[j])
            self._home_q = [float(v) for v in q[:7]]
        for j in ARM_JOINTS:
            c.resetJointState(r, j, self._home_q[j])
        for j in FINGER_JOINTS:
            c.resetJointState(r, j, FINGER_OPEN)
        self._arm_q = list(self._home_q)
        self._drive_arm(ik=False)
        self._set_fingers(FINGER_OPEN)

    def _ik(self, pos: np.ndarray, iterations: int = 20) -> list[float]:
        ll = [-2.9671, -1.8326, -2.9671, -3.1416, -2.9671, -0.0873, -2.9671, 0.0, 0.0]
        ul = [2.9671, 1.8326, 2.9671, 0.0, 2.9671, 3.8223, 2.9671, 0.04, 0.04]
        jr = [u - lo for u, lo in zip(ul, ll)]
        rest = [*REST_POSE, FINGER_OPEN, FINGER_OPEN]
        return list(
            self._client.calculateInverseKinematics(
                self._robot,
                EE_LINK,
                list(pos),
                DOWN,
                lowerLimits=ll,
                upperLimits=ul,
                jointRanges=jr,
                restPoses=rest,
                maxNumIterations=iterations,
            )
        )

    def _drive_arm(self, ik: bool = True) -> None:
        if ik:
            self._arm_q = self._ik(self._target)[:7]
        self._client.setJointMotorControlArray(
            self._robot,
            ARM_JOINTS,
            p.POSITION_CONTROL,
            targetPositions=self._arm_q,
            forces=[200.0] * 7,
            positionGains=[0.2] * 7,  # lag < 1 cm at full speed (0.1: 1.4 cm), settles to ~1 mm
        )

    def _set_fingers(self, width_each: float) -> None:
        self._client.setJointMotorControlArray(
            self._robot,
            FINGER_JOINTS,
            p.POSITION_CONTROL,
            targetPositions=[width_each] * 2,
            forces=[20.0] * 2,
        )

    def _set_gripper(self, close: bool) -> None:
        c = self._client
        if close and not self._closed:
            ee = self.ee_pos()
            cubes = self.cube_positions()
            dist = np.linalg.norm(cubes - ee, axis=1)
            i = int(np.argmin(dist))
            if dist[i] < GRASP_RADIUS:
                hand_pos, hand_orn = c.getLinkState(self._robot, EE_LINK)[4:6]
                cube_pos, cube_orn = c.getBasePositionAndOrientation(self._cubes[i])
                inv_pos, inv_orn = c.invertTransform(hand_pos, hand_orn)
                rel_pos, rel_orn = c.multiplyTransforms(inv_pos, inv_orn, cube_pos, cube_orn)
                self._constraint = c.createConstraint(
                    self._robot,
                    EE_LINK,
                    self._cubes[i],
                    -1,
                    p.JOINT_FIXED,
                    [0.0, 0.0, 0.0],
                    rel_pos,
                    [0.0, 0.0, 0.0],
                    rel_orn,
                )
                c.changeConstraint(self._constraint, maxForce=500.0)
                self._grasped = i
            self._set_fingers(CUBE_HALF if self._grasped >= 0 else FINGER_CLOSED)
        elif not close and self._closed:
            if self._constraint is not None:
                c.removeConstraint(self._constraint)
                self._constraint = None
            self._grasped = -1
            self._set_fingers(FINGER_OPEN)
        self._closed = close

    def _update_touches(self) -> None:
        ee = self.ee_pos()
        for i, pos in enumerate(self.cube_positions()):
            now = touching(ee, pos) and i != self._grasped
            if now and not self._touching[i]:
                self._touches.append(i)
            self._touching[i] = now

    def _update_visuals(self) -> None:
        c, spec = self._client, self.spec
        assert spec is not None
        for i, body in enumerate(self._cubes):
            lit = i == spec.target and spec.cue_visible(self._t)
            rgba = assets.CUE_RGBA if lit else assets.COLOURS[spec.cube_colours[i]]
            c.changeVisualShape(body, -1, rgbaColor=rgba)
        lamp = assets.LAMP_ON_RGBA if spec.go(self._t) else assets.LAMP_OFF_RGBA
        c.changeVisualShape(self._lamp, -1, rgbaColor=lamp)
        for k, body in enumerate(self._distractor_lamps):
            colour = spec.distractor_colour(k, self._t)
            rgba = assets.LAMP_OFF_RGBA if colour is None else assets.COLOURS[colour]
            c.changeVisualShape(body, -1, rgbaColor=rgba)

    def _obs(self) -> dict[str, np.ndarray]:
        s = self.image_size
        _, _, rgba, _, _ = self._client.getCameraImage(
            s,
            s,
            self._view,
            self._proj,
            renderer=p.ER_TINY_RENDERER,
            flags=p.ER_NO_SEGMENTATION_MASK,
        )
        image = np.asarray(rgba, dtype=np.uint8).reshape(s, s, 4)[:, :, :3].copy()
        proprio = np.array([*self.ee_pos(), self.gripper_width()], dtype=np.float32)
        return {"image": image, "proprio": proprio}


def make_env(task: str, image_size: int = 64, **kwargs: Any) -> TabletopEnv:
    """Build the env for a task name (see ``kv_vla_sim.tasks.TASKS``)."""
    return TabletopEnv(task, image_size=image_size, **kwargs)
