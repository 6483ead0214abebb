"""The VLA node's step worker: one thread that runs the model on the newest input, never a queue.

Inputs only store the latest frame and ``wake()`` the worker. Wakes coalesce into one flag, so any
number of frames arriving during a step cause exactly one more run, on the newest frame: a flood
of frames cannot push the step rate below what the model sustains, and the executor threads that
receive frames never wait for the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class StepLoop:
    """Runs ``work()`` on its own thread after every ``wake()``, and at least every ``poll_s``."""

    def __init__(
        self, work: Callable[[], None], on_error: Callable[[BaseException], None], poll_s: float = 0.05
    ) -> None:
        self._work, self._on_error, self._poll_s = work, on_error, poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        # A daemon: a step stuck in the model must not keep the process alive after a shutdown.
        self._thread = threading.Thread(target=self._run, name="kv_vla-step", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Something new arrived (a frame, an instruction, a tick, a request): run ``work`` again."""
        self._wake.set()

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` unless stopped; False when the loop is stopping (then give up the work)."""
        return not self._stop.wait(max(0.0, seconds))

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop after the current ``work`` returns; True when the thread ended within ``timeout_s``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._work()
            except Exception as exc:  # reported by the node; the loop keeps serving
                self._on_error(exc)
