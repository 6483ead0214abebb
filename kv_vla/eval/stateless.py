"""A baseline with neither memory nor a clock: the prompt and the current frame, re-encoded each step.

Why not the ``none`` cache policy: every cache keeps RoPE positions (a design rule, so that kept
tokens stay where they were seen), so with ``none`` the current frame sits ``8 * t`` positions after
the pinned prompt and the policy can read the step count ``t`` from it. On ``touch_sequence`` that
clock alone solves most episodes (models/README.md). ``stateless`` restarts the episode before
every step, so the frame always sits right after the prompt: the action depends on the instruction
and the current frame only.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class StatelessAgent:
    """Wraps an :class:`~kv_vla.runtime.EpisodeRuntime`: ``reset`` + one step, every step."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self._instruction: str | None = None

    def reset(self, instruction: str) -> None:
        self.runtime.reset(instruction)  # validates the instruction now, as the runtime would
        self._instruction = instruction

    def step(self, image: np.ndarray) -> Any:
        if self._instruction is None:
            raise RuntimeError("call reset(instruction) first")
        self.runtime.reset(self._instruction)
        return self.runtime.step(image)
