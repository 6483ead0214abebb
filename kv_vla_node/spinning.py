"""Spin an rclpy executor on its own thread and stop it in an order that cannot hang.

Why not ``executor.spin()`` on the main thread: rclpy's SIGINT handler shuts the context down
*and* chains to Python's, so Ctrl-C also arrives as a ``KeyboardInterrupt`` raised at whatever
bytecode the main thread is running. Inside the executor that can be after it has taken a ready
callback and before it has handed it to its pool, or between a lock's acquire and its ``try``;
and ``MultiThreadedExecutor.shutdown()`` joins its pool threads with no time limit, so one stuck
callback keeps the process alive forever. This module removes both by construction and makes
any hang that is left say where it waits.

Here the executor spins on its own thread and the main thread only waits, so a
``KeyboardInterrupt`` can land nowhere but in that wait. Stopping goes: shut the context down (the
spin loop leaves with ``ExternalShutdownException``), join the spin thread, shut the executor's
pool down, destroy the node; each wait is bounded. If something still does not stop in time the
process says so, prints every thread's stack (so the log shows where it waited) and exits
without waiting for the stuck thread.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node


def register_stack_dump() -> None:
    """``kill -USR1 <pid>`` prints every thread's stack to stderr: how to see where a stuck node waits."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


class BackgroundSpin:
    """An executor spinning ``node`` on a thread of its own, with a bounded ``stop()``.

    ``num_threads`` 0 is a ``SingleThreadedExecutor`` (callbacks run on the spin thread itself, no
    hand-off to a pool: the least latency when every callback is short), else a
    ``MultiThreadedExecutor`` with that many threads.
    """

    def __init__(self, node: Node, num_threads: int) -> None:
        self.node = node
        self.executor = (
            SingleThreadedExecutor() if num_threads == 0 else MultiThreadedExecutor(num_threads=num_threads)
        )
        self.executor.add_node(node)
        self.error: BaseException | None = None
        # Not a daemon: the executor's pool threads inherit the flag from the thread that starts
        # them, and must stay visible to `_join_worker_threads` (the interpreter joins them at exit).
        self._thread = threading.Thread(target=self._spin, name="executor-spin", daemon=False)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass
        except BaseException as exc:  # handed to the main thread via `error`
            # A shutdown landing while the executor builds its wait set raises RCLError "the given
            # context is not valid" rather than ExternalShutdownException: after a shutdown that is
            # a clean stop; while the context is still valid it is a real error.
            if rclpy.ok(context=self.node.context):
                self.error = exc

    def wait(self) -> None:
        """Block until spinning ends: the context was shut down (SIGINT/SIGTERM) or spin failed.

        A ``KeyboardInterrupt`` raised here (the SIGINT's Python half) is the caller's to catch.
        """
        while self._thread.is_alive() and rclpy.ok(context=self.node.context):
            self._thread.join(timeout=0.2)
        # A process that inherited SIGINT as ignored gets rclpy's half of it only: the context is
        # shut down but no KeyboardInterrupt comes, and the spin thread may still sit in its wait
        # (it is woken in ``stop``), so the context's state is what ends this wait.

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Shut down in an order that cannot hang; True when every step finished in time.

        Each of the three waits (spin thread, executor, callback threads) is bounded by ``timeout_s``.
        """
        rclpy.try_shutdown(context=self.node.context)  # the spin loop leaves at its next wake-up
        self.executor.wake()  # ... which this makes now, in case the shutdown's own wake-up was missed
        self._thread.join(timeout=timeout_s)
        spin_stopped = not self._thread.is_alive()
        # The pool is closed only after spin has left its loop (closing it earlier races spin's own
        # submit: ros2/rclpy#1724), and without joining its threads: that join has no time limit,
        # so a stuck callback would hang it. The threads are joined below, with one.
        if isinstance(self.executor, MultiThreadedExecutor):
            work_done = self.executor.shutdown(timeout_sec=timeout_s, wait_for_threads=False)
        else:
            work_done = self.executor.shutdown(timeout_sec=timeout_s)
        self.node.destroy_node()
        threads_done = _join_worker_threads(timeout_s)
        return spin_stopped and work_done and threads_done


def _join_worker_threads(timeout_s: float) -> bool:
    """Join every other non-daemon thread (those the interpreter would wait for at exit) within
    ``timeout_s`` in all; True when none is left."""
    deadline = time.monotonic() + timeout_s
    me = threading.current_thread()
    others = [t for t in threading.enumerate() if t is not me and not t.daemon]
    for thread in others:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in others)


def exit_after(spin: BackgroundSpin, code: int, timeout_s: float = 5.0) -> int:
    """Stop ``spin`` and return the exit code; if it would not stop, dump stacks and leave now.

    ``os._exit`` skips the interpreter's join of the executor's pool threads, the one wait that
    would otherwise still hang on a stuck callback. Call it from the main thread.
    """
    # The shutdown is bounded, so a further SIGINT has nothing left to do; ignoring it also drops a
    # KeyboardInterrupt still pending from the first one, which could otherwise land mid-stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spin.stop(timeout_s):
        return code
    print(f"kv_vla: shutdown did not finish within {timeout_s} s; thread stacks follow", file=sys.stderr)
    faulthandler.dump_traceback(all_threads=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 1)


def spin_until_shutdown(node: Node, num_threads: int, timeout_s: float = 5.0) -> int:
    """Spin ``node`` until SIGINT/SIGTERM (or a spin error), stop cleanly, return the exit code."""
    spin = BackgroundSpin(node, num_threads)
    with contextlib.suppress(KeyboardInterrupt):  # the SIGINT's Python half; rclpy's half stopped spin
        spin.wait()
    if spin.error is not None:
        print(f"kv_vla: executor failed: {spin.error!r}", file=sys.stderr)
    return exit_after(spin, 1 if spin.error is not None else 0, timeout_s)


__all__ = ["BackgroundSpin", "exit_after", "register_stack_dump", "spin_until_shutdown"]
