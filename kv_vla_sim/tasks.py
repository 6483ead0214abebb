"""Task definitions: layout sampling, language templates, success and failure predicates.

Over ~400 lines on purpose: the task registry, the option parser and every task's predicates stay
in one module, so a new task cannot be registered without its chance level and options beside it.

Every predicate is a pure function of an :class:`EpisodeSpec` (what the episode is about, fixed at
reset) and a :class:`SceneState` (where things are now, plus the touch log), so it can be tested
on hand-made states without running physics.

Two families (see DESIGN.md, "The experiment that proves the method"):

* no memory needed - ``reach``, ``push``, ``pick_place``: the current frame and the instruction
  say everything; a memoryless policy can solve them.
* memory needed - ``cued_reach``, ``cued_pick``: three identical grey cubes, one lit (yellow) for
  the first :data:`CUE_STEPS` frames only; the arm is held still until a lamp lights up (white) at least
  :data:`MIN_CUE_GAP` control steps after the cue went out; then the robot must act on the cube
  that was lit. ``touch_sequence``: "touch the red cube, then the blue cube"; touching leaves no
  trace and the expert returns home in between, so the frame before the second reach looks like
  the first frame of the episode. ``late_cued_reach``: ``cued_reach`` with the cue lit at a random
  frame 3-12 instead of 0-2, so a cache cannot keep it by position (attention sinks, accumulated
  attention), only by what it shows.

Long-horizon memory tasks (:data:`LONG_TASKS`, ``kv-vla eval --tasks long``): ``long_cued_reach``
and ``long_cued_pick`` show the cue early, then a busy middle of hundreds of steps (distractor
lamps blinking at random), then the decision; see :class:`_LongCued`.

Task options (``name:key=value,...``, see :func:`get_task`): ``wait=train|eval|LO-HI`` sets a long
task's middle length range; ``lead=N|LO-HI`` puts N frames of the waiting scene before a cued
task's episode (the cue, the go lamp and the step cap move by N).

Chance levels (``Task.chance``) are for a policy that sees only the current frame and the
instruction and does not write state into the world (e.g. by parking the arm somewhere); on the
no-memory tasks the number given is that of a policy that picks an object at random, not a bound.
A learned policy can break the "current frame only" assumption on ``touch_sequence`` through the
clock: caches keep RoPE positions, so even with its cache reset every step (``none``) the policy
knows how many steps have passed, and here the phase follows the step count (measured in
docs/RESULTS.md). Making the task memory-bound needs a phase independent of time (e.g. a random
wait before a visible go signal) and a dwell at home longer than the evaluated recent window.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

# --- geometry (metres, world frame; table top at z = 0, robot base at the origin) -------------
CUBE_HALF = 0.025  # 5 cm cubes
ZONE_HALF = 0.05  # 10 cm square zones / target pad (flat, visual only)
X_RANGE = (0.40, 0.68)  # where objects are placed
Y_RANGE = (-0.20, 0.20)
MIN_SEPARATION = 0.12  # between object centres (cubes and zones)
HOME = np.array([0.35, 0.0, 0.25])  # end-effector home (between the fingertips)
TRAVEL_Z = 0.15  # height at which the expert travels above objects
TOUCH_Z = 0.07  # expert's touch height: fingertips ~1 cm above a cube's top, no contact
TOUCH_XY = 0.035  # touching = end effector within this horizontal distance of a cube centre
TOUCH_DZ = 0.04  #   and less than this above the cube's top face
LIFT_Z = 0.08  # a cube centre above this height counts as lifted (resting: 0.025)
RESTING_Z = 0.04  # a cube centre below this height rests on the table (or a zone)

# --- cue timing (control steps) -----------------------------------------------------------------
CUE_STEPS = 3  # the cue is visible in frames 0, 1, 2
MIN_CUE_GAP = 30  # the go lamp turns on at least this many steps after the cue disappears
GO_JITTER = 5  # go step = CUE_STEPS + MIN_CUE_GAP + U{0..GO_JITTER-1}
LATE_CUE_ONSETS = (3, 12)  # late_cued_reach: the cue's first frame, U{3..12}; go moves with it
# long tasks: the busy middle's length (steps from the cue's last frame to go), per episode uniform
# in the range; evaluation waits reach twice the longest in training
WAIT_RANGES = {"train": (100, 200), "eval": (280, 400)}
DISTRACTOR_COLOURS = ("red", "green", "blue", "purple", "cyan")  # never the cue's yellow
N_DISTRACTOR_LAMPS = 2
DISTRACTOR_QUIET = 5  # no distractor is lit in the last frames before go (nor just after the cue)


@dataclass(frozen=True)
class EpisodeSpec:
    """What one episode is about; fixed at reset and fully determined by (task, seed)."""

    task: str
    seed: int
    instruction: str
    cube_colours: tuple[str, ...]  # colour names; "grey" for the cued tasks
    cube_xy: np.ndarray  # [N, 2]
    zone_colours: tuple[str, ...] = ()
    zone_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # [M, 2]
    target: int = -1  # the cube the instruction (or the cue) designates
    zone: int = -1  # the zone the target cube must end in
    sequence: tuple[int, ...] = ()  # cubes to touch, in order (touch_sequence)
    cue_steps: int = 0  # frames cue_onset..cue_onset+cue_steps-1 show the cue on the target cube
    cue_onset: int = 0  # the first frame that shows the cue (late_cued_reach: random, after frame 2)
    go_step: int = 0  # the arm obeys actions from this step on; the lamp is green from then
    max_steps: int = 40
    # (lamp, first frame, end frame, colour): distractor lamps lit in the busy middle (long tasks)
    distractors: tuple[tuple[int, int, int, str], ...] = ()
    n_distractor_lamps: int = 0
    # before go nothing moves, so the env skips the physics substeps (frames are rendered as usual)
    static_wait: bool = False

    def distractor_colour(self, lamp: int, t: int) -> str | None:
        """The colour distractor lamp ``lamp`` shows in frame t, or None (off)."""
        for k, start, end, colour in self.distractors:
            if k == lamp and start <= t < end:
                return colour
        return None

    def cue_visible(self, t: int) -> bool:
        return self.cue_onset <= t < self.cue_onset + self.cue_steps

    def go(self, t: int) -> bool:
        return t >= self.go_step


@dataclass(frozen=True)
class SceneState:
    """The state predicates look at. ``t`` counts control steps taken so far."""

    t: int
    ee_pos: np.ndarray  # [3]
    cube_pos: np.ndarray  # [N, 3]
    grasped: int = -1  # index of the cube held by the gripper, -1 if none
    gripper_closed: bool = False
    touches: tuple[int, ...] = ()  # cube indices, one entry per touch onset, in order


def touching(ee_pos: np.ndarray, cube_pos: np.ndarray) -> bool:
    """The end effector is right above a cube (within reach of its top face)."""
    dx, dy = ee_pos[0] - cube_pos[0], ee_pos[1] - cube_pos[1]
    return bool(np.hypot(dx, dy) < TOUCH_XY and ee_pos[2] < cube_pos[2] + CUBE_HALF + TOUCH_DZ)


def in_zone(cube_pos: np.ndarray, zone_xy: np.ndarray) -> bool:
    """The cube's centre lies over the square zone."""
    return bool(abs(cube_pos[0] - zone_xy[0]) <= ZONE_HALF and abs(cube_pos[1] - zone_xy[1]) <= ZONE_HALF)


def _sample_points(
    rng: np.random.Generator, n: int, taken: list[np.ndarray], min_sep: float = MIN_SEPARATION
) -> list[np.ndarray]:
    """Rejection-sample n points in the object region, min_sep apart from each other and `taken`."""
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = np.array([rng.uniform(*X_RANGE), rng.uniform(*Y_RANGE)])
        if all(np.linalg.norm(p - q) >= min_sep for q in [*taken, *pts]):
            pts.append(p)
    return pts


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    s = float(np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + s * ab)))


class Task:
    """Base class: a task samples episodes and judges states. Subclasses set the class fields."""

    name: str = ""
    templates: tuple[str, ...] = ()
    max_steps: int = 40
    needs_memory: bool = False
    chance: float = 0.0
    chance_note: str = ""
    option_names: tuple[str, ...] = ()  # what ``name:key=value`` may set (see get_task)
    options: ClassVar[dict[str, tuple[int, int]]] = {}  # instances set their own (with_options)

    @property
    def base(self) -> str:
        """The registered name, without options (what demonstrations and experts go by)."""
        return self.name.partition(":")[0]

    def with_options(self, text: str) -> Task:
        """A copy of this task with ``key=value,...`` options applied (see :func:`get_task`)."""
        parsed = _parse_options(text, self)
        task = copy.copy(self)
        task.options = {**self.options, **parsed}
        task.name = f"{self.base}:{text}"  # as given: reports group episodes by this name
        task._apply_options()
        return task

    def _apply_options(self) -> None:
        """Update class-level facts (``max_steps``) after options change."""

    def sample(self, seed: int) -> EpisodeSpec:
        """The episode for this seed (deterministic)."""
        raise NotImplementedError

    def success(self, spec: EpisodeSpec, state: SceneState) -> bool:
        raise NotImplementedError

    def failure(self, spec: EpisodeSpec, state: SceneState) -> bool:
        """An unrecoverable mistake (touching or grasping the wrong cube); ends the episode."""
        return False

    def _template(self, rng: np.random.Generator, **kw: str) -> str:
        return self.templates[int(rng.integers(len(self.templates)))].format(**kw)


_CUBE_COLOURS = ("red", "green", "blue")


class Reach(Task):
    name = "reach"
    templates = ("reach the {c} cube", "touch the {c} cube", "move the gripper to the {c} cube")
    max_steps = 30
    chance = 1 / 3
    chance_note = "no memory needed; 1/3 = touching one of the 3 cubes at random"

    def sample(self, seed: int) -> EpisodeSpec:
        rng = np.random.default_rng(seed)
        xy = np.array(_sample_points(rng, 3, []))
        colours = tuple(str(c) for c in rng.permutation(_CUBE_COLOURS))
        target = int(rng.integers(3))
        return EpisodeSpec(
            task=self.name,
            seed=seed,
            instruction=self._template(rng, c=colours[target]),
            cube_colours=colours,
            cube_xy=xy,
            target=target,
            max_steps=self.max_steps,
        )

    def success(self, spec: EpisodeSpec, state: SceneState) -> bool:
        return len(state.touches) > 0 and state.touches[0] == spec.target

    def failure(self, spec: EpisodeSpec, state: SceneState) -> bool:
        return len(state.touches) > 0 and state.touches[0] != spec.target


class Push(Task):
    name = "push"
    templates = (
        "push the {c} cube into the {z} zone",
        "slide the {c} cube into the {z} zone",
        "push the {c} cube onto the {z} square",
    )
    max_steps = 40
    chance = 1 / 4
    chance_note = "no memory needed; 1/4 = a random cube into a random zone"

    def sample(self, seed: int) -> EpisodeSpec:
        rng = np.random.default_rng(seed)
        # The push runs roughly along x (the closed gripper's wide face), away from or toward
        # the robot; the target cube, its zone and the pre-push point must fit the region.
        while True:
            sign = 1.0 if rng.uniform() < 0.5 else -1.0
            ang = rng.uniform(-np.pi / 6, np.pi / 6)
            dist = rng.uniform(0.13, 0.18)
            d = sign * np.array([np.cos(ang), np.sin(ang)])
            cube = np.array([rng.uniform(*X_RANGE), rng.uniform(*Y_RANGE)])
            zone = cube + dist * d
            pre = cube - 0.07 * d
            ok = X_RANGE[0] <= zone[0] <= X_RANGE[1] and Y_RANGE[0] <= zone[1] <= Y_RANGE[1]
            if ok and pre[0] >= 0.34:
                break
        while True:
            other_cube, other_zone = _sample_points(rng, 2, [cube, zone])
            if _segment_distance(other_cube, pre, zone) >= 0.10:
                break
        colours = tuple(str(c) for c in rng.permutation(_CUBE_COLOURS)[:2])
        zone_colours = ("yellow", "purple") if rng.uniform() < 0.5 else ("purple", "yellow")
        # Index 0 is the target cube / zone after a seeded swap, so the order carries no hint.
        swap_c, swap_z = bool(rng.integers(2)), bool(rng.integers(2))
        cubes = [other_cube, cube] if swap_c else [cube, other_cube]
        zones = [other_zone, zone] if swap_z else [zone, other_zone]
        target, tzone = int(swap_c), int(swap_z)
        return EpisodeSpec(
            task=self.name,
            seed=seed,
            instruction=self._template(rng, c=colours[target], z=zone_colours[tzone]),
            cube_colours=colours,
            cube_xy=np.array(cubes),
            zone_colours=zone_colours,
            zone_xy=np.array(zones),
            target=target,
            zone=tzone,
            max_steps=self.max_steps,
        )

    def success(self, spec: EpisodeSpec, state: SceneState) -> bool:
        cube = state.cube_pos[spec.target]
        return in_zone(cube, spec.zone_xy[spec.zone]) and cube[2] < RESTING_Z


class PickPlace(Task):
    name = "pick_place"
    templates = (
        "pick up the {c} cube and place it on the target",
        "put the {c} cube on the target",
        "move the {c} cube onto the target",
    )
    max_steps = 40
    chance = 1 / 2
    chance_note = "no memory needed; 1/2 = one of the 2 cubes at random"

    def sample(self, seed: int) -> EpisodeSpec:
        rng = np.random.default_rng(seed)
        pts = _sample_points(rng, 3, [])
        colours = tuple(str(c) for c in rng.permutation(_CUBE_COLOURS)[:2])
        target = int(rng.integers(2))
        return EpisodeSpec(
            task=self.name,
            seed=seed,
            instruction=self._template(rng, c=colours[target]),
            cube_colours=colours,
            cube_xy=np.array(pts[:2]),
            zone_colours=("cyan",),
            zone_xy=np.array(pts[2:]),
            target=target,
            zone=0,
            max_steps=self.max_steps,
        )

    def success(self, spec: EpisodeSpec, state: SceneState) -> bool:
        cube = state.cube_pos[spec.target]
        return state.grasped != spec.target and in_zone(cube, spec.zone_xy[spec.zone]) and cube[2] < RESTING_Z


class _Cued(Task):
    """Three grey cubes, one lit at the start; the arm waits for the go lamp.

    Option ``lead=N`` (or ``LO-HI``, drawn per episode) shows N frames of the waiting scene before
    the episode: why, to measure whether a policy keeps the cue when it comes later in the cache
    than in training (positions, dilution), with nothing else changed.
    """

    needs_memory = True
    chance = 1 / 3
    option_names = ("lead",)

    def _apply_options(self) -> None:
        self.max_steps = type(self).max_steps + self.options.get("lead", (0, 0))[1]

    def sample(self, seed: int) -> EpisodeSpec:
        spec = self._sample(seed)
        if "lead" not in self.options:
            return spec
        lo, hi = self.options["lead"]
        lead = int(np.random.default_rng([seed, 4]).integers(lo, hi + 1))
        return replace(
            spec,
            cue_onset=spec.cue_onset + lead,
            go_step=spec.go_step + lead,
            max_steps=spec.max_steps + lead,
            static_wait=True,
        )

    def _sample(self, seed: int) -> EpisodeSpec:
        rng = np.random.default_rng(seed)
        xy = np.array(_sample_points(rng, 3, []))
        go = CUE_STEPS + MIN_CUE_GAP + int(rng.integers(GO_JITTER))
        return EpisodeSpec(
            task=self.base,
            seed=seed,
            instruction=self._template(rng),
            cube_colours=("grey", "grey", "grey"),
            cube_xy=xy,
            target=int(rng.integers(3)),
            cue_steps=CUE_STEPS,
            go_step=go,
            max_steps=type(self).max_steps,
        )


class CuedReach(_Cued):
    name = "cued_reach"
    templates = (
        "touch the cube that was lit",
        "wait for the lamp, then touch the cube that lit up",
        "when the lamp lights up, touch the cube that was lit",
    )
    max_steps = 50
    chance_note = "1/3: the cue is gone long before the arm may move; 3 identical cubes"

    def success(self, spec: EpisodeSpec, state: SceneState) -> bool:
        return len(state.touches) > 0 and state.touches[0] == spec.target

    def failure(self, spec: EpisodeSpec, state: SceneState) -> bool:
        return len(state.touches) > 0 and state.touches[0] != spec.target


class CuedPick(_Cued):
    name = "cued_pick"
    templates = (
        "pick up the cube that was lit",
        "wait for the lamp, then pick up the cube that lit up",
        "when the lamp lights up, lift the cube that was lit",
    )
    max_steps = 55
    chance_note = "1/3: the cue is gone long before the arm may move; 3 identical cubes"

    def success(self, spec: EpisodeSpec, state: SceneState) -> bool:
        return state.grasped == spec.target and state.cube_pos[spec.target][2] > LIFT_Z

    def failure(self, spec: EpisodeSpec, state: SceneState) -> bool:
        return state.grasped not in (-1, spec.target)


class LateCuedReach(CuedReach):
    """``cued_reach`` with the cue lit at a random step (:data:`LATE_CUE_ONSETS`) instead of at once.

    Why: with the cue in frames 0-2 every history-keeping heuristic finds it by position -- the
    attention sinks hold frame 0, and accumulated attention (H2O) favours the oldest chunks. Here
    3-12 identical grey frames come before the cue, so a policy must keep the cue for what it shows,
    not for where it sits. The go lamp still lights ``MIN_CUE_GAP`` + U{0..4} steps after the cue.
    """

    name = "late_cued_reach"
    max_steps = 50 + LATE_CUE_ONSETS[1]
    chance_note = "1/3: as cued_reach; the cue comes after 3-12 frames of identical grey cubes"

    def _sample(self, seed: int) -> EpisodeSpec:
        spec = super()._sample(seed)
        onset = int(np.random.default_rng([seed, 1]).integers(LATE_CUE_ONSETS[0], LATE_CUE_ONSETS[1] + 1))
        return replace(spec, cue_onset=onset, go_step=spec.go_step + onset)


class TouchSequence(Task):
    name = "touch_sequence"
    templates = (
        "touch the {a} cube, then the {b} cube",
        "first touch the {a} cube and then the {b} cube",
        "touch the {a} cube and after that the {b} cube",
    )
    max_steps = 45
    needs_memory = True
    chance = 1 / 4
    chance_note = (
        "1/4: back home after the first touch the frame equals the first frame, so a memoryless "
        "policy goes to the first cube with some probability p either time: success p(1-p) <= 1/4 "
        "(0 for a deterministic one); touching a cube out of order, or again, fails"
    )

    def sample(self, seed: int) -> EpisodeSpec:
        rng = np.random.default_rng(seed)
        xy = np.array(_sample_points(rng, 3, []))
        colours = tuple(str(c) for c in rng.permutation(_CUBE_COLOURS))
        first, second = (int(i) for i in rng.permutation(3)[:2])
        return EpisodeSpec(
            task=self.name,
            seed=seed,
            instruction=self._template(rng, a=colours[first], b=colours[second]),
            cube_colours=colours,
            cube_xy=xy,
            sequence=(first, second),
            target=second,
            max_steps=self.max_steps,
        )

    def success(self, spec: EpisodeSpec, state: SceneState) -> bool:
        return tuple(state.touches[:2]) == spec.sequence

    def failure(self, spec: EpisodeSpec, state: SceneState) -> bool:
        n = len(state.touches)
        return tuple(state.touches) != spec.sequence[:n] or n > len(spec.sequence)


def distractor_schedule(
    rng: np.random.Generator, start: int, end: int
) -> tuple[tuple[int, int, int, str], ...]:
    """Random blinks of the distractor lamps in frames [start, end): off 3-12 frames, then lit in a
    random colour for 2-6 frames, per lamp independently."""
    out = []
    for lamp in range(N_DISTRACTOR_LAMPS):
        t = start + int(rng.integers(0, 8))
        while True:
            length = int(rng.integers(2, 7))
            if t + length > end:
                break
            out.append(
                (lamp, t, t + length, str(DISTRACTOR_COLOURS[int(rng.integers(len(DISTRACTOR_COLOURS)))]))
            )
            t += length + int(rng.integers(3, 13))
    return tuple(out)


class _LongCued(_Cued):
    """A cued task over a long horizon, in three phases.

    1. Information, early: three identical grey cubes; one is lit (yellow) for frames
       onset..onset+2, onset uniform in :data:`LATE_CUE_ONSETS`.
    2. A busy middle of ``wait`` steps (option ``wait``; :data:`WAIT_RANGES`): the arm is held
       while two distractor lamps blink in random colours (never yellow, never on a cube), drawn
       independently of the cue, and dark for the last :data:`DISTRACTOR_QUIET` frames.
    3. The decision: the go lamp turns on and the arm must act on the cube that was lit. The frame
       at go (grey cubes, dark distractor lamps, lit go lamp, arm at home) is the same whatever
       the cue was (MemoryBench's rule), so a memoryless policy is at chance, 1/3.

    The default wait range is the evaluation one; demonstrations are recorded with
    ``TASK:wait=train``, whose longest wait is half the longest evaluated.
    """

    option_names = ("wait",)
    options: ClassVar[dict[str, tuple[int, int]]] = {"wait": WAIT_RANGES["eval"]}
    decision_steps = 20

    def _apply_options(self) -> None:
        self.max_steps = LATE_CUE_ONSETS[1] + CUE_STEPS + self.options["wait"][1] + self.decision_steps

    def sample(self, seed: int) -> EpisodeSpec:
        rng = np.random.default_rng(seed)
        xy = np.array(_sample_points(rng, 3, []))
        instruction = self._template(rng)
        target = int(rng.integers(3))
        onset = int(np.random.default_rng([seed, 1]).integers(LATE_CUE_ONSETS[0], LATE_CUE_ONSETS[1] + 1))
        lo, hi = self.options["wait"]
        wait = int(np.random.default_rng([seed, 2]).integers(lo, hi + 1))
        go = onset + CUE_STEPS + wait
        blinks = distractor_schedule(
            np.random.default_rng([seed, 3]), onset + CUE_STEPS + DISTRACTOR_QUIET, go - DISTRACTOR_QUIET
        )
        return EpisodeSpec(
            task=self.base,
            seed=seed,
            instruction=instruction,
            cube_colours=("grey", "grey", "grey"),
            cube_xy=xy,
            target=target,
            cue_steps=CUE_STEPS,
            cue_onset=onset,
            go_step=go,
            max_steps=go + self.decision_steps,
            distractors=blinks,
            n_distractor_lamps=N_DISTRACTOR_LAMPS,
            static_wait=True,
        )


class LongCuedReach(_LongCued, CuedReach):
    __doc__ = _LongCued.__doc__
    name = "long_cued_reach"
    chance_note = "1/3: at go the frame is the same whatever the cue was; 3 identical cubes"


class LongCuedPick(_LongCued, CuedPick):
    __doc__ = _LongCued.__doc__
    name = "long_cued_pick"
    decision_steps = 25
    chance_note = "1/3: at go the frame is the same whatever the cue was; 3 identical cubes"


for _cls in (LongCuedReach, LongCuedPick):
    _cls.max_steps = LATE_CUE_ONSETS[1] + CUE_STEPS + WAIT_RANGES["eval"][1] + _cls.decision_steps

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Reach(),
        Push(),
        PickPlace(),
        CuedReach(),
        CuedPick(),
        TouchSequence(),
        LateCuedReach(),
        LongCuedReach(),
        LongCuedPick(),
    )
}
MEMORY_TASKS = tuple(n for n, t in TASKS.items() if t.needs_memory)
PLAIN_TASKS = tuple(n for n, t in TASKS.items() if not t.needs_memory)
LONG_TASKS = ("long_cued_reach", "long_cued_pick")
STANDARD_TASKS = tuple(n for n in TASKS if n not in LONG_TASKS)  # what "all" selects


def _parse_options(text: str, task: Task) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in task.option_names:
            raise ValueError(
                f"task {task.base!r}: unknown option {item!r}; allowed: "
                f"{[k + '=...' for k in task.option_names] or 'none'}"
            )
        if key == "wait" and value in WAIT_RANGES:
            out[key] = WAIT_RANGES[value]
            continue
        lo, _, hi = value.partition("-")
        try:
            rng = (int(lo), int(hi or lo))
        except ValueError:
            raise ValueError(f"task option {item!r}: expected N or LO-HI (whole steps)") from None
        if not 0 <= rng[0] <= rng[1] or (key == "wait" and rng[0] < 2 * DISTRACTOR_QUIET):
            raise ValueError(f"task option {item!r}: need 0 <= LO <= HI (wait >= {2 * DISTRACTOR_QUIET})")
        out[key] = rng
    return out


def get_task(name: str) -> Task:
    """The task registered as ``name``; ``name:key=value,...`` applies options to a copy, e.g.
    ``long_cued_reach:wait=train`` (demonstrations) or ``late_cued_reach:lead=100-400``."""
    base, _, opts = name.partition(":")
    try:
        task = TASKS[base]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}") from None
    return task.with_options(opts) if opts else task


def select_tasks(text: str) -> list[str]:
    """Task names from a comma list in which ``all`` is the standard suite (:data:`STANDARD_TASKS`)
    and ``long`` the long-horizon tasks; each name is checked (options included)."""
    out: list[str] = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        names = {"all": list(STANDARD_TASKS), "long": list(LONG_TASKS)}.get(item, [item])
        for n in names:
            get_task(n)
            if n not in out:
                out.append(n)
    return out


def first_target_xy(task: str, seed: int) -> np.ndarray | None:
    """Where the episode's first target cube sits, scaled to ``[-1, 1]`` over the object region, or
    None for a task without one, or whose frame 0 does not show it yet (late_cued_reach).

    "First target": the cube the instruction names (reach, push, pick_place), the lit one (cued
    tasks) or the first of the sequence (touch_sequence) -- what frame 0 alone, read with the
    instruction, must reveal. Training uses it as an auxiliary label (``kv-vla train --target-aux``).
    """
    both = target_sequence_xy(task, seed)
    return None if both is None else both[0]


def target_sequence_xy(task: str, seed: int) -> np.ndarray | None:
    """``[2, 2]``: where the episode's first and second target cubes sit, scaled like
    :func:`first_target_xy`; the second is the first for a task with one target. None for a task
    without one. Why: the label that tells whether an instruction's word *order* reaches the
    image tokens (touch_sequence), ``experiments/binding_feasibility.py highlight2``.
    """
    spec = get_task(task).sample(seed)
    order = spec.sequence if spec.sequence else (spec.target, spec.target)
    if order[0] < 0 or spec.cue_onset > 0:  # no target, or a cue that frame 0 does not show yet
        return None
    lo = np.array([X_RANGE[0], Y_RANGE[0]])
    hi = np.array([X_RANGE[1], Y_RANGE[1]])
    xy = np.asarray(spec.cube_xy, dtype=np.float64)[list(order)]
    return (2.0 * (xy - lo) / (hi - lo) - 1.0).astype(np.float32)
