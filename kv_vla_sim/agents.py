"""Model-free agents with the runtime's interface (docs/CONTRACTS.md, "Agents").

An agent has ``reset(instruction)`` and ``step(image) -> StepResult-like`` with ``.action``
(float32 [4]), ``.timings_ms`` and ``.cache_stats`` (None here: no KV cache). The evaluation
harness drives these exactly like a VLA runtime, so it can be tested before a model exists.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from kv_vla_sim.env import TabletopEnv
from kv_vla_sim.experts import Expert


@dataclass
class AgentStep:
    action: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)
    cache_stats: None = None


class ExpertAgent:
    """The scripted expert as an agent. It ignores the image and reads the env's true state,
    so it must be given the env it acts in."""

    def __init__(self, env: TabletopEnv) -> None:
        self.env = env
        self._expert = Expert(env)

    def reset(self, instruction: str) -> None:
        self._expert.reset()

    def step(self, image: np.ndarray) -> AgentStep:
        t0 = time.perf_counter()
        action = self._expert.act()
        return AgentStep(action, {"total": 1000.0 * (time.perf_counter() - t0)})


class RandomAgent:
    """Uniform random actions in [-1, 1]^4 from its own seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def reset(self, instruction: str) -> None:
        pass

    def step(self, image: np.ndarray) -> AgentStep:
        t0 = time.perf_counter()
        action = self._rng.uniform(-1.0, 1.0, 4).astype(np.float32)
        return AgentStep(action, {"total": 1000.0 * (time.perf_counter() - t0)})


class EpisodeSeededRandomAgent(RandomAgent):
    """:class:`RandomAgent` whose generator restarts every episode from (``seed``, task, episode seed).

    Why: an episode's actions must not depend on which episodes the same agent ran before, so that
    evaluation gives the same episodes however they are spread over processes.
    """

    def __init__(self, env: TabletopEnv, seed: int = 0) -> None:
        super().__init__(seed)
        self.env = env
        self.seed = int(seed)

    def reset(self, instruction: str) -> None:
        spec = self.env.spec
        if spec is None:
            raise RuntimeError("reset the env before the agent")
        self._rng = np.random.default_rng([self.seed, zlib.crc32(spec.task.encode()), spec.seed])
