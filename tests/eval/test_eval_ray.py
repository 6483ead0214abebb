"""Ray backend: `kv-vla eval` and `kv-vla collect` on two Ray workers give what the local backend
gives for the same seeds, and Ray leaves no process behind.

One embedded Ray (2 CPUs, no dashboard) serves the comparisons (its start-up costs ~10-20 s on these
cores); the commands reuse it and leave it running, the fixture shuts it down. The first test starts
and stops a session of its own, as a command without --ray-address does.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from numerics import LOGIT_ATOL

from kv_vla.cli import main as kv_vla_main
from kv_vla_sim.demos import load_episodes

pytestmark = pytest.mark.slow
# timings, and the logit margins (floats that may differ by round-off between processes; see below)
UNCOMPARED = {"step_ms_p50", "step_ms_p95", "eval_s", "eval_ep_s", "action_margins"}


def _ray_processes(session: str) -> list[str]:
    """Command lines of live processes that belong to this Ray session."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if session in cmd:
                found.append(cmd)
    return found


def _wait_until_gone(session: str) -> list[str]:
    deadline = time.monotonic() + 30.0  # processes exit asynchronously after shutdown
    while _ray_processes(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _ray_processes(session)


def _session_name(ray) -> str:
    return os.path.basename(ray._private.worker._global_node.get_session_dir_path())


def test_embedded_ray_session_shuts_down_and_leaves_no_process():
    """What every `--backend ray` command without an address does (runs before the shared fixture)."""
    import ray

    from kv_vla_sim.distributed import ray_session

    assert not ray.is_initialized()
    with ray_session(1) as session_ray:
        session = _session_name(session_ray)
        assert session_ray.cluster_resources()["CPU"] == 1.0
        assert _ray_processes(session)
    assert not ray.is_initialized()
    assert not _wait_until_gone(session)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024, log_to_driver=False)
    session = _session_name(ray)
    assert _ray_processes(session)  # the check below can see Ray's processes
    yield
    ray.shutdown()
    assert not _wait_until_gone(session)


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if k not in UNCOMPARED}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


def _comparable_prefix(local: dict, remote: dict) -> int | None:
    """Steps of an episode that must agree: all of them, or those before the first step where either
    run decoded a near tie (top two action logits within LOGIT_ATOL: the worker loads the checkpoint
    at another memory alignment, so its logits may differ by float32 round-off and flip that bin)."""
    margins = zip(local.get("action_margins", []), remote.get("action_margins", []))
    for k, (a, b) in enumerate(margins):
        if min(a, b) <= LOGIT_ATOL:
            return k
    return None


def test_eval_on_ray_equals_local(tmp_path, ray_cluster):
    """Same episodes, successes, actions, KV bytes and aggregates; only timings and the backend differ,
    unless an episode decoded a near tie (then it is compared up to that step)."""
    argv = ["eval", "--policies", "gated,random-actions", "--tasks", "late_cued_reach", "--episodes", "2"]
    argv += ["--recent-chunks", "2", "--max-tokens", "80", "--gate-threshold", "0.0"]
    argv += ["--record-actions", "--no-progress"]
    assert kv_vla_main([*argv, "--out", str(tmp_path / "local")]) == 0
    assert kv_vla_main([*argv, "--out", str(tmp_path / "ray"), "--backend", "ray", "--workers", "2"]) == 0
    local = json.loads((tmp_path / "local" / "eval_info.json").read_text())
    ray_ = json.loads((tmp_path / "ray" / "eval_info.json").read_text())
    assert ray_["config"].pop("backend")["workers"] == 2 and local["config"].pop("backend")["name"] == "local"
    assert len(local["episodes"]) == 4 and all(len(e["actions"]) == e["steps"] for e in local["episodes"])
    margins = [len(e.get("action_margins", [])) for e in local["episodes"]]
    assert margins == [e["steps"] if e["policy"] == "gated" else 0 for e in local["episodes"]]
    assert [(e["policy"], e["seed"]) for e in ray_["episodes"]] == [
        (e["policy"], e["seed"]) for e in local["episodes"]
    ]
    ties = [_comparable_prefix(a, b) for a, b in zip(local["episodes"], ray_["episodes"])]
    if all(k is None for k in ties):
        assert _strip_timings(ray_) == _strip_timings(local)
    for a, b, k in zip(local["episodes"], ray_["episodes"], ties):
        assert a["actions"][:k] == b["actions"][:k]
        if k is None:
            assert _strip_timings(a) == _strip_timings(b)


def test_collect_on_ray_equals_local(tmp_path, ray_cluster):
    base = ["collect", "--task", "reach", "--episodes", "2", "--no-progress"]
    assert kv_vla_main([*base, "--out", str(tmp_path / "local")]) == 0
    assert kv_vla_main([*base, "--out", str(tmp_path / "ray"), "--backend", "ray", "--workers", "2"]) == 0
    index = [json.loads((tmp_path / d / "index.json").read_text()) for d in ("local", "ray")]
    assert index[0] == index[1] and len(index[0]["episodes"]) == 2
    a, b = (load_episodes(str(tmp_path / d)) for d in ("local", "ray"))
    assert [e.seed for e in a] == [e.seed for e in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.frames, y.frames) and np.array_equal(x.actions, y.actions)


def test_backend_flags_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="--workers needs --backend ray"):
        kv_vla_main(["eval", "--tasks", "reach", "--episodes", "1", "--workers", "2", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--ray-address needs --backend ray"):
        kv_vla_main(
            ["collect", "--task", "reach", "--episodes", "1", "--out", str(tmp_path), "--ray-address", "x:1"]
        )
