"""Recording scripted-expert demonstrations, resumably, and reading them back.

Longer than ~400 lines on purpose: recording, the resumable index and reading back all follow the
one on-disk layout below, and the sim room has no shared I/O module to move them to.

Layout of a demonstration directory::

    DIR/index.json                 {"episodes": [{file, task, seed, steps, instruction}, ...],
                                    "rejected": [{task, seed}, ...]}   (expert failures, skipped)
    DIR/<task>-<seed>.npz          one compressed episode: frames uint8 [T,H,W,3] (the frame the
                                    action was chosen on), actions float32 [T,4] (the clean expert
                                    labels), proprio float32 [T,4], instruction, task, seed,
                                    success, image_size, noise, sim_signature

Only successful expert episodes are kept as demonstrations; a failed seed is listed under
"rejected" and never retried (episodes are deterministic). Seeds start at
:data:`DEMO_SEED_OFFSET` so they never overlap evaluation seeds (< 1_000_000).

Stale data is refused, not trained on: every episode carries the ``sim_signature`` of the code that
recorded it (:func:`sim_signature`: a hash of a probe episode's first frame, instruction and expert
actions), and :func:`load_episodes` skips, with a warning, episodes whose signature differs from
the current simulator's. Why: a camera or layout change makes old demonstrations look like a
different world; mixed into training they silently teach the wrong mapping. Files written before
signatures existed can be checked once with ``python -m kv_vla_sim.demos --stamp DIR``, which
re-renders each episode's first frame and stamps only the ones that still match.

Every file is written to a temporary name and ``os.replace``d, so an interrupted run leaves either
a complete episode or none. On restart the ``.npz`` files on disk are the truth: the index is
rebuilt from them, finished seeds are skipped, and collection continues until the requested
number of successful episodes per task exists - never more, never a duplicate.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from kv_vla_sim.tasks import get_task, select_tasks

DEMO_SEED_OFFSET = 1_000_000
DEFAULT_NOISE = 0.1  # see experts.noisy: perturbs full-speed steps only, labels stay clean
INDEX = "index.json"
SIGNATURE_SEED = 999_999  # the probe episode behind sim_signature (never a demonstration seed)
_log = logging.getLogger(__name__)


@dataclass
class Episode:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    actions: np.ndarray  # float32 [T, 4]
    proprio: np.ndarray  # float32 [T, 4]
    instruction: str
    task: str
    seed: int
    success: bool
    sim_signature: str = ""  # "" = recorded before signatures existed (unverified)
    image_size: int = 64
    noise: float = DEFAULT_NOISE

    def __len__(self) -> int:
        return len(self.actions)


_SIGNATURES: dict[tuple[str, int], str] = {}


def sim_signature(task: str, image_size: int = 64) -> str:
    """A short hash of what the current simulator shows and the expert does for one probe seed.

    It changes when rendering (camera, colours, meshes), scene layout sampling, instructions or the
    expert's labels change -- the things that make recorded demonstrations stale -- and not when
    code is merely edited. Costs one reset and three expert steps (~0.1 s), cached per process.
    """
    key = (task, image_size)
    if key not in _SIGNATURES:
        from kv_vla_sim.env import TabletopEnv
        from kv_vla_sim.experts import Expert

        env = TabletopEnv(task, image_size=image_size)
        try:
            obs, info = env.reset(seed=SIGNATURE_SEED)
            h = hashlib.sha256(np.ascontiguousarray(obs["image"]).tobytes())
            h.update(str(info["instruction"]).encode())
            expert = Expert(env)
            for _ in range(3):
                a = np.asarray(expert.act(), dtype=np.float32)
                h.update(np.round(a, 4).tobytes())
                obs, *_ = env.step(a)
            _SIGNATURES[key] = h.hexdigest()[:16]
        finally:
            env.close()
    return _SIGNATURES[key]


def episode_file(task: str, seed: int) -> str:
    return f"{task}-{seed}.npz"


def _atomic_write_bytes(path: str, write) -> None:  # type: ignore[no-untyped-def]
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: object) -> None:
    _atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def save_episode(
    out_dir: str, ep: Episode, image_size: int, noise: float, signature: str | None = None
) -> str:
    name = episode_file(ep.task, ep.seed)
    arrays = {
        "frames": ep.frames,
        "actions": ep.actions.astype(np.float32),
        "proprio": ep.proprio.astype(np.float32),
        "instruction": np.array(ep.instruction),
        "task": np.array(ep.task),
        "seed": np.array(ep.seed, dtype=np.int64),
        "success": np.array(ep.success),
        "image_size": np.array(image_size),
        "noise": np.array(noise, dtype=np.float32),
        "sim_signature": np.array(signature if signature is not None else sim_signature(ep.task, image_size)),
    }
    _atomic_write_bytes(os.path.join(out_dir, name), lambda f: np.savez_compressed(f, **arrays))
    return name


def load_episode(path: str) -> Episode:
    with np.load(path, allow_pickle=False) as z:
        return Episode(
            frames=z["frames"],
            actions=z["actions"],
            proprio=z["proprio"],
            instruction=str(z["instruction"]),
            task=str(z["task"]),
            seed=int(z["seed"]),
            success=bool(z["success"]),
            sim_signature=str(z["sim_signature"]) if "sim_signature" in z.files else "",
            image_size=int(z["image_size"]) if "image_size" in z.files else int(z["frames"].shape[1]),
            noise=float(z["noise"]) if "noise" in z.files else DEFAULT_NOISE,
        )


def _simulator_available() -> bool:
    try:
        import pybullet  # noqa: F401
    except ImportError:
        return False
    return True


def _current_signatures(
    keys: set[tuple[str, int]], episodes: list[Episode], directory: str
) -> dict[tuple[str, int], str | None]:
    """The signature each (task, image size) must carry to be loaded.

    With the simulator installed this is :func:`sim_signature`. A training machine may have no
    PyBullet (a GPU box with torch only); there the most common signed value per task stands in for
    it (None, which no file matches, where none is signed: unsigned files are never loaded), and a
    warning says so. Why that is still safe enough: collection signs every file from one
    simulator, so a mixed directory is exactly what this catches; what it cannot catch is a directory
    that is stale as a whole, which the warning names, so check it where the simulator runs.
    """
    if _simulator_available():
        return {key: sim_signature(*key) for key in keys}
    out: dict[tuple[str, int], str | None] = {}
    for key in keys:
        signed = [e.sim_signature for e in episodes if (e.task, e.image_size) == key and e.sim_signature]
        out[key] = max(set(signed), key=signed.count) if signed else None
    _log.warning(
        "%s: PyBullet is not installed, so signatures are checked for agreement only (the most "
        "common one per task is kept); verify the directory where the simulator runs",
        directory,
    )
    return out


def load_episodes(
    directory: str, tasks: Iterable[str] | None = None, check_signature: bool = True
) -> list[Episode]:
    """Episodes in ``directory`` (optionally only some tasks), sorted by (task, seed).

    With ``check_signature`` (the default) episodes recorded by a different simulator, or never
    verified, are skipped with a warning naming how many and why (see the module docstring).
    """
    wanted = None if tasks is None else set(tasks)
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.npz"))):
        task = os.path.basename(path).rsplit("-", 1)[0]
        if wanted is None or task in wanted:
            out.append(load_episode(path))
    if check_signature:
        current = {(e.task, e.image_size) for e in out}
        sig = _current_signatures(current, out, directory)
        current_eps = [e for e in out if e.sim_signature == sig[(e.task, e.image_size)]]
        if len(current_eps) < len(out):
            unsigned = sum(1 for e in out if not e.sim_signature)
            _log.warning(
                "%s: skipping %d of %d episodes recorded by a different simulator (%d unsigned: "
                "check them with `python -m kv_vla_sim.demos --stamp %s`, or re-collect)",
                directory,
                len(out) - len(current_eps),
                len(out),
                unsigned,
                directory,
            )
        out = current_eps
    out.sort(key=lambda e: (e.task, e.seed))
    return out


def stamp_verified(directory: str, progress: bool = True) -> dict[str, int]:
    """Sign unsigned episodes whose first frame the current simulator reproduces exactly.

    For files recorded before signatures existed: each seed is reset and its first frame and
    instruction compared with the recorded ones; matches are re-written (atomically) with the
    current signature, mismatches are left unsigned, so :func:`load_episodes` keeps skipping them.
    """
    from kv_vla_sim.env import TabletopEnv

    envs: dict[tuple[str, int], TabletopEnv] = {}
    counts = {"stamped": 0, "stale": 0, "already": 0}
    paths = sorted(glob.glob(os.path.join(directory, "*.npz")))
    for path in tqdm(paths, desc=f"verify {directory}", disable=not progress):
        ep = load_episode(path)
        if ep.sim_signature:
            counts["already"] += 1
            continue
        key = (ep.task, ep.image_size)
        env = envs.setdefault(key, TabletopEnv(ep.task, image_size=ep.image_size))
        obs, info = env.reset(seed=ep.seed)
        if np.array_equal(obs["image"], ep.frames[0]) and info["instruction"] == ep.instruction:
            save_episode(directory, ep, ep.image_size, ep.noise)
            counts["stamped"] += 1
        else:
            counts["stale"] += 1
    for env in envs.values():
        env.close()
    return counts


def _read_index(out_dir: str) -> dict[str, list[dict[str, object]]]:
    """The index, reconciled with the episode files actually on disk."""
    path = os.path.join(out_dir, INDEX)
    index: dict[str, list[dict[str, object]]] = {"episodes": [], "rejected": []}
    if os.path.exists(path):
        with open(path) as f:
            index = json.load(f)
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "*.npz"))}
    known = {str(e["file"]) for e in index["episodes"] if e["file"] in on_disk}
    index["episodes"] = [e for e in index["episodes"] if e["file"] in on_disk]
    for name in sorted(on_disk - known):  # written before an interruption hit the index
        ep = load_episode(os.path.join(out_dir, name))
        index["episodes"].append(
            {"file": name, "task": ep.task, "seed": ep.seed, "steps": len(ep), "instruction": ep.instruction}
        )
    index["episodes"].sort(key=lambda e: (str(e["task"]), int(e["seed"])))  # type: ignore[call-overload]
    return index


# ---------------------------------------------------------------------- workers
_ENVS: dict[tuple[str, int], object] = {}


def _run_one(job: tuple[str, int, int, float, str]) -> dict[str, object]:
    """Roll out one expert episode; save it if it succeeded. Runs in a worker or in-process."""
    from kv_vla_sim.env import TabletopEnv
    from kv_vla_sim.experts import run_expert_episode

    task, seed, image_size, noise, out_dir = job
    key = (task, image_size)
    if key not in _ENVS:
        _ENVS[key] = TabletopEnv(task, image_size=image_size)
    env = _ENVS[key]
    r = run_expert_episode(env, seed, noise=noise, record=True)  # type: ignore[arg-type]
    task = get_task(task).base  # recorded under the registered name, whatever options made it
    meta: dict[str, object] = {"task": task, "seed": seed, "steps": r["steps"], "success": r["success"]}
    if r["success"]:
        ep = Episode(
            frames=r["frames"],  # type: ignore[arg-type]
            actions=r["actions"],  # type: ignore[arg-type]
            proprio=r["proprio"],  # type: ignore[arg-type]
            instruction=str(r["instruction"]),
            task=task,
            seed=seed,
            success=True,
        )
        meta["file"] = save_episode(out_dir, ep, image_size, noise)
        meta["instruction"] = ep.instruction
    return meta


def _map(jobs: list[tuple[str, int, int, float, str]], workers: int) -> Iterator[dict[str, object]]:
    if workers <= 1:
        for job in jobs:
            yield _run_one(job)
        return
    ctx = mp.get_context("spawn")  # no fork: callers may hold torch threads or GPU handles
    with ctx.Pool(workers) as pool:
        yield from pool.imap_unordered(_run_one, jobs)


def _run_job_alone(job: tuple[str, int, int, float, str]) -> dict[str, object]:
    """One job on a Ray worker: the envs of other tasks are closed first (one env per worker)."""
    for key in [k for k in _ENVS if k != (job[0], job[2])]:
        _ENVS.pop(key).close()
    return _run_one(job)


def collect(
    task: str,
    episodes: int,
    out_dir: str,
    seed_offset: int = DEMO_SEED_OFFSET,
    image_size: int = 64,
    noise: float = DEFAULT_NOISE,
    workers: int = 1,
    progress: bool = True,
    backend: str = "local",
    ray_address: str | None = None,
) -> dict[str, int]:
    """Make sure ``out_dir`` holds ``episodes`` successful demonstrations of each task.

    ``task`` is a task name (options allowed, e.g. ``long_cued_reach:wait=train``; episodes are
    recorded under the registered name), ``"all"`` (the standard suite) or ``"long"``. Returns
    {task: number of demonstrations on disk}.
    ``backend="ray"``: on Ray actors (:mod:`kv_vla_sim.distributed`), same files and index.
    """
    from kv_vla_sim.distributed import check_backend, job_runner

    check_backend(backend, workers, ray_address)
    out_dir = os.path.abspath(out_dir)  # Ray workers may run in another working directory
    if seed_offset < DEMO_SEED_OFFSET:
        raise ValueError(f"demonstration seeds must be >= {DEMO_SEED_OFFSET} (evaluation uses the rest)")
    tasks = select_tasks(task)
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, ".tmp-*")):  # left by a killed writer
        os.unlink(stale)
    index = _read_index(out_dir)
    write_json_atomic(os.path.join(out_dir, INDEX), index)
    with job_runner(
        workers, backend, ray_address, _map, _run_job_alone
    ) as run_jobs:  # one Ray session for all tasks
        counts = {}
        for t in tasks:
            base = get_task(t).base
            done = {int(e["seed"]) for e in index["episodes"] if e["task"] == base}  # type: ignore[call-overload]
            rejected = {int(e["seed"]) for e in index["rejected"] if e["task"] == base}  # type: ignore[call-overload]
            bar = tqdm(
                total=episodes, initial=min(len(done), episodes), desc=f"collect {t}", disable=not progress
            )
            next_seed = seed_offset
            while len(done) < episodes:
                jobs = []
                while len(jobs) < episodes - len(done):
                    if next_seed not in done and next_seed not in rejected:
                        jobs.append((t, next_seed, image_size, noise, out_dir))
                    next_seed += 1
                for k, meta in enumerate(run_jobs(jobs)):
                    if meta["success"]:
                        done.add(int(meta["seed"]))  # type: ignore[call-overload]
                        index["episodes"].append(
                            {
                                "file": meta["file"],
                                "task": base,
                                "seed": meta["seed"],
                                "steps": meta["steps"],
                                "instruction": meta["instruction"],
                            }
                        )
                        bar.update(1)
                    else:
                        rejected.add(int(meta["seed"]))  # type: ignore[call-overload]
                        index["rejected"].append({"task": base, "seed": meta["seed"]})
                    if k % 10 == 9:
                        write_json_atomic(os.path.join(out_dir, INDEX), index)
                for entries in index.values():  # one order, whichever worker finished first
                    entries.sort(key=lambda e: (str(e["task"]), int(e["seed"])))  # type: ignore[call-overload]
                write_json_atomic(os.path.join(out_dir, INDEX), index)
            bar.close()
            counts[base] = len(done)
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m kv_vla_sim.demos --stamp DIR [DIR ...]``: verify and sign older recordings."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--stamp", nargs="+", required=True, metavar="DIR")
    args = parser.parse_args(argv)
    for d in args.stamp:
        print(d, stamp_verified(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
