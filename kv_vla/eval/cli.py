"""``kv-vla eval``: closed-loop evaluation of cache policies and model-free agents.

A policy name is either a cache policy of the model (any key of ``kv_vla.cache.POLICIES``: the
model at ``--model`` is loaded with that policy) or a model-free agent (``expert``,
``random-actions``), or ``stateless`` (the model with the episode restarted before every step: no
memory and no clock; :mod:`kv_vla.eval.stateless`). torch and the model are imported only when a
model policy is asked for.
"""

from __future__ import annotations

import argparse
from typing import Any

from kv_vla import settings

DEFAULT_MODEL = "models/compact-vla"
#: cache knobs with a flag (``kv_vla.settings`` names; the flag is the name with ``-``). Left out, a
#: knob keeps the model's evaluated setting (the table's default, or its gate file's).
CACHE_FLAGS = tuple(n for n in settings.CACHE_SETTINGS if n != "policy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", default="expert,random-actions", help="comma-separated policy names")
    parser.add_argument(
        "--tasks",
        default="all",
        help="comma-separated task names (options as NAME:key=value), 'all' (the standard suite) or "
        "'long' (the long-horizon memory tasks)",
    )
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task and policy")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="compact VLA folder (model policies only)")
    parser.add_argument("--seed-offset", type=int, default=0, help="first evaluation seed (< 1_000_000)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--gate", default=None, help="trained ChunkGate (default: MODEL/gate.safetensors when present)"
    )
    settings.add_flags(parser.add_argument_group("cache settings (kv_vla/settings.py)"), CACHE_FLAGS)
    settings.add_flags(parser, ("trust_remote_code",))
    parser.add_argument(
        "--compile",
        dest="compiled_rows",
        action="store_true",
        help="also evaluate each bounded model policy as a compiled step over static storage (rows "
        "POLICY+compiled), so the timing columns show eager vs compiled from one run",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--record-actions", action="store_true", help="store every executed action in eval_info.json"
    )
    dist = parser.add_argument_group("distributed evaluation (kv_vla.eval.distributed)")
    dist.add_argument(
        "--backend", choices=["local", "ray"], default="local", help="this process, or Ray actors"
    )
    dist.add_argument("--workers", type=int, default=1, help="Ray actors (--backend ray)")
    dist.add_argument(
        "--ray-address", default=None, help="Ray cluster to join (default: an embedded local Ray)"
    )


def cache_options(args: argparse.Namespace) -> dict[str, Any]:
    """The cache settings given on the command line (the others keep the evaluated setting)."""
    return settings.given(args, CACHE_FLAGS)


def model_factory(policy: str, args: argparse.Namespace, compiled: bool = False) -> Any:
    """Load the runtime once with this cache policy; the factory hands it to every task.

    ``compiled``: the same policy over static storage with a compiled step (``EpisodeRuntime.set_compile``).
    """
    from kv_vla.cache import EpisodeCacheConfig
    from kv_vla.runtime import EpisodeRuntime, shipped_gate

    options = cache_options(args)
    EpisodeCacheConfig(policy=policy, **options)  # refuse bad options before loading anything
    gate = args.gate if args.gate is not None else shipped_gate(args.model)
    # no cache config at load: the evaluated setting (the gate file's settings, one control step per
    # chunk); then the policy and the given options are applied on top
    runtime = EpisodeRuntime.from_pretrained(
        args.model,
        device=args.device,
        gate_path=gate,
        trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
    )
    runtime.update_cache_config(policy=policy, **options)
    if compiled:
        runtime.update_cache_config(storage="static")
        runtime.set_compile(True)
        runtime.warm_up()  # compile every shape before the first episode: no compile stalls in the timings
    return lambda env: runtime


def compiled_refusal(policy: str, args: argparse.Namespace) -> str | None:
    """Why ``policy`` (with the command line's options) gets no compiled row, or None."""
    from kv_vla.cache import POLICIES, EpisodeCacheConfig

    try:
        EpisodeCacheConfig(policy=policy, storage="static", **cache_options(args))
    except ValueError as exc:
        return str(exc)
    if POLICIES[policy].needs_attention:
        return f"compile: policy {policy!r} reads attention through the probe"
    return None


def stateless_factory(args: argparse.Namespace) -> Any:
    """``stateless``: the model with no memory and no clock (see :mod:`kv_vla.eval.stateless`)."""
    from kv_vla.eval.stateless import StatelessAgent
    from kv_vla.runtime import EpisodeRuntime

    runtime = EpisodeRuntime.from_pretrained(
        args.model, device=args.device, trust_remote_code=bool(getattr(args, "trust_remote_code", False))
    )
    agent = StatelessAgent(runtime)
    return lambda env: agent


def agent_factory(policy: str, args: argparse.Namespace) -> Any:
    """The factory for one policy name (loads the model for model policies)."""
    from kv_vla.eval.harness import MODEL_FREE, model_free_factory

    if policy in MODEL_FREE:
        return model_free_factory(policy, seed=args.seed_offset)
    if policy == "stateless":
        return stateless_factory(args)
    check_policy(policy, args)
    return model_factory(policy, args)


def check_policy(policy: str, args: argparse.Namespace) -> None:
    """Refuse an unknown policy or bad cache options before anything is loaded (or sent to Ray)."""
    from kv_vla.eval.harness import MODEL_FREE

    if policy in MODEL_FREE or policy == "stateless":
        return
    from kv_vla.cache import POLICIES, EpisodeCacheConfig

    if policy not in POLICIES:
        raise SystemExit(
            f"unknown policy {policy!r}: use one of {sorted(POLICIES)}, 'stateless' or {list(MODEL_FREE)}"
        )
    EpisodeCacheConfig(policy=policy, **cache_options(args))


def remote_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` to send to Ray workers: paths made absolute (workers may run in another
    directory), the CLI's own callables left out."""
    import os

    out = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})
    for name in ("model", "gate"):
        value = getattr(out, name, None)
        if value is not None and os.path.exists(value):
            setattr(out, name, os.path.abspath(value))
    return out


def _evaluate_on_ray(policies: list[str], tasks: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import functools

    from kv_vla.eval.distributed import evaluate_ray

    for policy in policies:
        check_policy(policy, args)
    builders = {p: functools.partial(agent_factory, p, remote_args(args)) for p in policies}
    return evaluate_ray(
        builders,
        tasks,
        args.episodes,
        seed_offset=args.seed_offset,
        image_size=args.image_size,
        progress=not args.no_progress,
        workers=args.workers,
        address=args.ray_address,
        record_actions=getattr(args, "record_actions", False),
    )


def run(args: argparse.Namespace) -> int:
    from kv_vla.eval.harness import MODEL_FREE, evaluate
    from kv_vla.eval.report import write_report
    from kv_vla_sim.distributed import check_backend
    from kv_vla_sim.tasks import select_tasks

    backend = getattr(args, "backend", "local")
    workers = getattr(args, "workers", 1)
    check_backend(backend, workers, getattr(args, "ray_address", None))
    if backend == "local" and workers != 1:
        raise SystemExit("--workers needs --backend ray (the local backend runs in this process)")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        tasks = select_tasks(args.tasks)
    except ValueError as exc:
        raise SystemExit(f"--tasks: {exc}") from None
    if backend == "ray" and getattr(args, "compiled_rows", False):
        raise SystemExit(
            "--compile runs on the local backend (its rows compare eager and compiled side by side)"
        )
    if backend == "ray":
        result = _evaluate_on_ray(policies, tasks, args)
    else:
        factories = {}
        for policy in policies:
            factories[policy] = agent_factory(policy, args)
            if getattr(args, "compiled_rows", False) and policy not in MODEL_FREE and policy != "stateless":
                reason = compiled_refusal(policy, args)
                if reason is None:
                    factories[f"{policy}+compiled"] = model_factory(policy, args, compiled=True)
                else:
                    print(f"--compile: no compiled row for {policy!r}: {reason}")
        result = evaluate(
            factories,
            tasks,
            args.episodes,
            seed_offset=args.seed_offset,
            image_size=args.image_size,
            progress=not args.no_progress,
            record_actions=getattr(args, "record_actions", False),
        )
    result["config"]["model"] = args.model if any(p not in MODEL_FREE for p in policies) else None
    result["config"]["cache_options"] = cache_options(args)
    paths = write_report(result, args.out)
    with open(paths["results"]) as f:
        print(f.read())
    print(backend_line(result["config"]["backend"]))
    print("wrote", ", ".join(paths.values()))
    return 0


def backend_line(backend: dict[str, Any]) -> str:
    """Where the episodes ran and how long that took, in one line."""
    if backend["name"] != "ray":
        return f"backend: local, {backend['wall_s']:.1f} s"
    where = backend["address"] or "embedded local Ray"
    return (
        f"backend: ray ({where}), {backend['workers']} workers, {backend['wall_s']:.1f} s "
        f"(Ray start {backend['ray_start_s']:.1f} s, workers start {backend['workers_start_s']:.1f} s, "
        f"episodes {backend['episodes_s']:.1f} s)"
    )
