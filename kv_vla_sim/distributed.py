"""Ray, for spreading episodes over processes or machines (``--backend ray``); imported only when used.

Why Ray and not a process pool of our own: the same code runs on the cores of one machine (an
embedded Ray started here) and on a cluster (``ray start --head`` on one node, ``ray start
--address`` on the others, then ``--ray-address`` here), and it handles worker start-up, failure
and shutdown. Workers are actors that keep their env (and, for evaluation, the model runtime)
between episodes; every episode is one actor call, so results do not depend on which worker ran it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

#: Object store of an embedded Ray: episodes return small records, not frames, so keep it small on a
#: shared machine (Ray's default is 30% of RAM).
OBJECT_STORE_BYTES = 128 * 1024 * 1024


def check_backend(backend: str, workers: int, address: str | None) -> None:
    """Refuse combinations that would be silently ignored."""
    if backend not in ("local", "ray"):
        raise ValueError(f"backend: {backend!r} is not one of 'local', 'ray'")
    if workers < 1:
        raise ValueError(f"workers: {workers} must be >= 1")
    if address is not None and backend != "ray":
        raise ValueError("--ray-address needs --backend ray")


@contextlib.contextmanager
def ray_session(workers: int, address: str | None = None) -> Iterator[Any]:
    """Connect to the cluster at ``address`` (default: ``$RAY_ADDRESS``, Ray's own convention), or
    start an embedded local Ray with ``workers`` CPUs and no dashboard.

    Reuses a Ray already initialised by the caller (and leaves it running); a session started here is
    shut down on exit, so no Ray process outlives the command.
    """
    import ray

    started = False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        if address is None:
            ray.init(
                num_cpus=workers,
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                log_to_driver=False,
            )
        else:
            ray.init(address=address, log_to_driver=False)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def map_on_actors(actors: list[Any], calls: Iterable[tuple], method: str = "run") -> Iterator[Any]:
    """Yield ``actor.<method>(*call)`` for every call, spread over ``actors`` as each becomes free
    (``ray.util.ActorPool``), in the order they finish (callers sort). Needs a Ray session."""
    from ray.util import ActorPool

    pool = ActorPool(actors)
    fn: Callable[[Any, tuple], Any] = lambda actor, call: getattr(actor, method).remote(*call)  # noqa: E731
    yield from pool.map_unordered(fn, list(calls))


@contextlib.contextmanager
def job_runner(
    workers: int,
    backend: str,
    address: str | None,
    local_map: Callable[[list[tuple], int], Iterator[Any]],
    remote_job: Callable[[tuple], Any],
) -> Iterator[Callable[[list[tuple]], Iterator[Any]]]:
    """``run(jobs)`` for ``kv_vla_sim.demos.collect``, yielding each job's meta as it finishes: the
    local ``local_map(jobs, workers)``, or ``remote_job(job)`` on ``workers`` actors in one Ray
    session kept for the whole collection (not one session per task)."""
    if backend != "ray":
        yield lambda jobs: local_map(jobs, workers)
        return
    with ray_session(workers, address):
        actors = [_job_worker_class().remote() for _ in range(workers)]
        yield lambda jobs: map_on_actors(actors, [(remote_job, job) for job in jobs])


def _job_worker_class() -> Any:
    """The ``@ray.remote`` actor that runs one job function at a time (its module state, such as
    open envs, kept between jobs); built on first use so that importing this module does not
    import ray."""
    import ray

    @ray.remote(num_cpus=1)
    class JobWorker:
        def run(self, fn: Callable[[tuple], Any], job: tuple) -> Any:
            return fn(job)

    return JobWorker
