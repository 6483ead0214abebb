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

DEFAULT_MODEL = "models/compact-vla"


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
        "--chunk-size", type=int, default=None, help="tokens per chunk (default: one control step)"
    )
    parser.add_argument("--recent-chunks", type=int, default=None)
    parser.add_argument("--sink-tokens", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--gate-threshold", type=float, default=None)
    parser.add_argument(
        "--positions",
        choices=["episode", "cache"],
        default=None,
        help="position ids: 'episode' (grow with the episode) or 'cache' (StreamingLLM, bounded)",
    )
    parser.add_argument(
        "--gate", default=None, help="trained ChunkGate (default: MODEL/gate.safetensors when present)"
    )
    zip_group = parser.add_argument_group("ZipVL options (policies zipvl and gated_tiered)")
    zip_group.add_argument("--tau", type=float, default=None, help="attention share kept at full precision")
    zip_group.add_argument("--low-bits", type=int, default=None, choices=[2, 4, 8])
    zip_group.add_argument("--quant-group-size", type=int, default=None)
    zip_group.add_argument(
        "--full-threshold", type=float, default=None, help="gated_tiered: utility for 16 bits"
    )
    parser.add_argument("--no-progress", action="store_true")


def cache_options(args: argparse.Namespace) -> dict[str, Any]:
    """The cache options given on the command line (others keep the config defaults)."""
    names = ("chunk_size", "recent_chunks", "sink_tokens", "max_tokens", "gate_threshold", "positions")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


ZIPVL_POLICIES = ("zipvl", "gated_tiered")


def zipvl_options(args: argparse.Namespace) -> dict[str, Any]:
    """ZipVL's options, which live in ``EpisodeCacheConfig.extra`` (only for the ZipVL policies)."""
    names = ("tau", "low_bits", "quant_group_size", "full_threshold")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def model_factory(policy: str, args: argparse.Namespace) -> Any:
    """Load the runtime once with this cache policy; the factory hands it to every task."""
    from kv_vla.cache import EpisodeCacheConfig
    from kv_vla.runtime import EpisodeRuntime, shipped_gate

    options = cache_options(args)
    if policy in ZIPVL_POLICIES and zipvl_options(args):
        options["extra"] = zipvl_options(args)
    EpisodeCacheConfig(policy=policy, **options)  # refuse bad options before loading anything
    gate = args.gate if args.gate is not None else shipped_gate(args.model)
    # no cache config at load: the runtime sizes chunks to one control step of *this* model (the
    # unit its gate was trained on); then the policy and the given options are applied on top
    runtime = EpisodeRuntime.from_pretrained(args.model, device=args.device, gate_path=gate)
    runtime.update_cache_config(policy=policy, **options)
    return lambda env: runtime


def stateless_factory(args: argparse.Namespace) -> Any:
    """``stateless``: the model with no memory and no clock (see :mod:`kv_vla.eval.stateless`)."""
    from kv_vla.eval.stateless import StatelessAgent
    from kv_vla.runtime import EpisodeRuntime

    agent = StatelessAgent(EpisodeRuntime.from_pretrained(args.model, device=args.device))
    return lambda env: agent


def run(args: argparse.Namespace) -> int:
    from kv_vla.eval.harness import MODEL_FREE, evaluate, model_free_factory
    from kv_vla.eval.report import write_report
    from kv_vla_sim.tasks import select_tasks

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        tasks = select_tasks(args.tasks)
    except ValueError as exc:
        raise SystemExit(f"--tasks: {exc}") from None
    factories = {}
    for policy in policies:
        if policy in MODEL_FREE:
            factories[policy] = model_free_factory(policy, seed=args.seed_offset)
            continue
        if policy == "stateless":
            factories[policy] = stateless_factory(args)
            continue
        from kv_vla.cache import POLICIES

        if policy not in POLICIES:
            raise SystemExit(
                f"unknown policy {policy!r}: use one of {sorted(POLICIES)}, 'stateless' or {list(MODEL_FREE)}"
            )
        factories[policy] = model_factory(policy, args)
    result = evaluate(
        factories,
        tasks,
        args.episodes,
        seed_offset=args.seed_offset,
        image_size=args.image_size,
        progress=not args.no_progress,
    )
    result["config"]["model"] = args.model if any(p not in MODEL_FREE for p in policies) else None
    result["config"]["cache_options"] = cache_options(args)
    paths = write_report(result, args.out)
    with open(paths["results"]) as f:
        print(f.read())
    print("wrote", ", ".join(paths.values()))
    return 0
