"""Running kv_vla's nodes as real child processes over DDS (the demo, and the tests through it).

* ``ros_env``: an environment that isolates a run (its own ROS_DOMAIN_ID, localhost-only discovery,
  a private log folder) so parallel runs never hear each other.
* ``NodeProcess``: a child process in its own process group, output captured to a file, stopped with
  SIGINT then SIGKILL of the whole group, so no orphan survives a failure or a Ctrl-C.
* ``save_random_model``: a tiny random ``CompactVLA`` checkpoint (the real model class, random
  weights) for ``kv-vla demo --random-model`` and the tests.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO_ROOT / "config" / "kv_vla.yaml"


_DOMAIN_LOCKS: dict[int, Any] = {}


def free_domain_id(seed: object = None) -> int:
    """A ROS_DOMAIN_ID in [1, 100] (safe for Fast DDS ports) that no other kv_vla run on this host holds.

    Each id is claimed with an exclusive ``flock`` on a file in the temp folder, held until this
    process exits, so concurrent test runs and demos never share a domain. Random order unless
    ``seed`` is given.
    """
    import fcntl

    rng = random.Random(str(seed) if seed is not None else f"{os.getpid()}-{time.time_ns()}")
    candidates = list(range(1, 101))
    rng.shuffle(candidates)
    lock_dir = Path(tempfile.gettempdir()) / "kv_vla_ros_domains"
    lock_dir.mkdir(exist_ok=True)
    for domain in candidates:
        if domain in _DOMAIN_LOCKS:
            continue
        fh = open(lock_dir / f"{domain}.lock", "a")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        _DOMAIN_LOCKS[domain] = fh
        return domain
    raise RuntimeError("all ROS domain ids 1..100 are held by other kv_vla runs")


def ros_env(log_dir: str | Path, domain_id: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child ROS process: private domain, localhost discovery, logs in ``log_dir``."""
    env = dict(os.environ)
    env.update(
        ROS_DOMAIN_ID=str(domain_id),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_LOG_DIR=str(log_dir),
        HOME=env.get("HOME") or str(log_dir),
        PYTHONUNBUFFERED="1",
        RCUTILS_LOGGING_BUFFERED_STREAM="0",
        RCUTILS_COLORIZED_OUTPUT="0",
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("ROS_LOCALHOST_ONLY", None)  # deprecated; the discovery range above replaces it
    env.update(extra or {})
    return env


def node_command(module: str, params: dict[str, Any], params_file: str | Path | None = None) -> list[str]:
    """``python -m <module> --ros-args [--params-file F] -p k:=v ...`` (values in ROS YAML syntax)."""
    cmd = [sys.executable, "-m", module, "--ros-args"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    for key, value in params.items():
        cmd += ["-p", f"{key}:={_ros_value(value)}"]
    return cmd


def _ros_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_ros_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else "''"
    return repr(value)


class NodeProcess:
    """A child process with its output in ``log_path``; ``stop()`` never leaves an orphan behind."""

    def __init__(
        self, cmd: Sequence[str], env: dict[str, str], log_path: str | Path, cwd: str | Path | None = None
    ):
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            env=env,
            cwd=str(cwd or REPO_ROOT),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches its children too
        )

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGINT (a clean rclpy shutdown), then SIGKILL to the whole process group after ``grace_s``."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                # Stuck: ask for every thread's stack (the nodes register SIGUSR1 with faulthandler)
                # so the log says where it waited, then kill.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(self.proc.pid, signal.SIGUSR1)
                time.sleep(1.0)
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        _signal_group(self.proc.pid, signal.SIGKILL)  # stragglers in the group, if any
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def save_random_model(path: str | Path, seed: int = 0, tiny: bool = True, **overrides: Any) -> Path:
    """Save a randomly initialised ``CompactVLA`` to ``path``: tiny, with the shipped model's token
    layout (4 image tokens + 4 parallel action slots = 8-token steps), so the shipped
    ``config/kv_vla.yaml`` budget fits it; ``overrides`` change the config."""
    import torch

    from kv_vla.model.compact import CompactVLA, CompactVLAConfig

    torch.manual_seed(seed)
    layout = {"pool": 4, "action_decoding": "parallel"} | overrides
    config = CompactVLAConfig.tiny(**layout) if tiny else CompactVLAConfig(**layout)
    CompactVLA(config).save_pretrained(path)
    return Path(path)
