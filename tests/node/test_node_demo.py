"""`kv-vla demo` (the main job) end to end with a tiny random CompactVLA: two node processes over DDS, a
result table and JSON, and no process left behind, also when interrupted with Ctrl-C (SIGINT).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]  # node processes over DDS

REPO = Path(__file__).resolve().parents[2]


def _processes_with_env(key: str, value: str) -> list[int]:
    """PIDs whose environment has ``key=value`` (the demo's children inherit ROS_LOG_DIR)."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """One tiny random checkpoint for both runs (the demo's --random-model would build one each time),
    with the shipped model's token layout (8-token steps), which the shipped YAML's budget is for."""
    from kv_vla_node.testing import save_random_model

    path = tmp_path_factory.mktemp("demo_model") / "tiny-vla"
    return save_random_model(path)


def _demo(tmp_path: Path, model: Path, *extra: str, sigint_ignored: bool = False) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HOME=os.environ.get("HOME", str(tmp_path)))
    cmd = [
        sys.executable,
        "-m",
        "kv_vla.cli",
        "demo",
        "--model",
        str(model),
        "--episodes",
        "1",
        "--policies",
        "gated",
    ]
    cmd += ["--json", str(tmp_path / "demo.json"), "--log-dir", str(tmp_path / "logs"), *extra]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # what a shell's background job (`cmd &` in a script, e.g. a CI runner) inherits
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
    )


def test_demo_runs_episodes_over_dds_and_prints_the_table(tmp_path, model):
    proc = _demo(tmp_path, model, "--tasks", "cued_reach", "reach", "--max-steps", "3")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    result = json.loads((tmp_path / "demo.json").read_text())
    episodes = result["episodes"]
    assert [(e["task"], e["seed"], e["policy"]) for e in episodes] == [
        ("cued_reach", 0, "gated"),
        ("reach", 0, "gated"),
    ]
    for e in episodes:
        assert e["steps"] == 3 or e["success"], e
        assert e["peak_kv_bytes"] > 0 and e["step_latency_ms_p50"] > 0
    rows = {(r["policy"], r["task"]): r for r in result["per_task"]}
    assert set(rows) == {("gated", "cued_reach"), ("gated", "reach")}
    assert rows[("gated", "reach")]["peak_kv_bytes_mean"] == episodes[1]["peak_kv_bytes"]
    header = next(line for line in out.splitlines() if line.startswith("policy"))
    assert all(col in header for col in ("success", "peak KV KiB", "KV kept", "step p50 ms"))
    assert any(line.startswith("gated    cued_reach") for line in out.splitlines())
    assert _processes_with_env("ROS_LOG_DIR", str(tmp_path / "logs" / "ros")) == []


@pytest.mark.parametrize(
    ("sig", "sigint_ignored"),
    [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["SIGINT", "SIGINT-in-a-background-job", "SIGTERM"],
)
def test_demo_interrupted_leaves_no_processes(tmp_path, model, sig, sigint_ignored):
    # 20 episodes, so the run is surely still going when the interrupt lands (one reach episode is
    # truncated at its 30 steps, ~2-3 s)
    proc = _demo(tmp_path, model, "--tasks", "reach", "--episodes", "20", sigint_ignored=sigint_ignored)
    node_log = tmp_path / "logs" / "vla_node_gated.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if node_log.exists() and "episode 1 started" in node_log.read_text(errors="replace"):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    children = _processes_with_env("ROS_LOG_DIR", str(tmp_path / "logs" / "ros"))
    assert len(children) >= 2  # the VLA node and the sim bridge are running
    proc.send_signal(sig)  # SIGINT: what Ctrl-C delivers; SIGTERM: what `kill` and ros2 launch send
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert _processes_with_env("ROS_LOG_DIR", str(tmp_path / "logs" / "ros")) == []


def test_demo_fails_fast_with_the_reason_when_the_node_refuses_its_parameters(tmp_path, model):
    """A budget too small for the model's steps (30 tokens: not even the shortest prompt and three
    8-token chunks) stops the node at configure with the reason (no instruction could ever run); the
    demo stops with it at once instead of waiting for the bridge's startup timeout, and leaves no
    process behind."""
    from kv_vla_node.demo import instruction_refusal

    proc = _demo(tmp_path, model, "--tasks", "reach", "--max-tokens", "30", "--timeout", "240")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "the VLA node refused the episode:" in out and "timed out" not in out
    assert "max_tokens: 30 is smaller" in out, out
    node_log = (tmp_path / "logs" / "vla_node_gated.log").read_text(errors="replace")
    reason = instruction_refusal(node_log)
    assert reason and "max_tokens" in reason and reason in out
    assert "ready: waiting" not in node_log  # it never claimed to be ready
    assert _processes_with_env("ROS_LOG_DIR", str(tmp_path / "logs" / "ros")) == []
