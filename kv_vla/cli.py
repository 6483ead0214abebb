"""The `kv-vla` console script.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Those modules keep heavy imports (torch, pybullet, rclpy) inside ``run`` so that ``kv-vla --help``
stays fast and a missing optional dependency only breaks the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, help). `bench` has its own sub-subcommands (e.g. `kv-vla bench cache`).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("kv_vla.bench.cli", "benchmarks (cache: latency and KV memory per policy)"),
    "collect": ("kv_vla_sim.cli", "record scripted-expert demonstrations in PyBullet"),
    "eval": ("kv_vla.eval.cli", "closed-loop evaluation of cache policies and agents"),
    "probe": ("kv_vla.eval.probe", "does the policy read its instruction's colour word? (reach scenes)"),
    "train": ("kv_vla.train.cli", "behaviour-clone the compact VLA on whole episodes"),
    "train-gate": ("kv_vla.train.gate_cli", "learn the chunk gate's utility"),
    "interpolate": ("kv_vla.train.interpolate", "mix two fine-tunes of one model in weight space (WiSE-FT)"),
    "inspect": (
        "kv_vla.eval.inspector",
        "one episode's cache as a picture: chunks kept/evicted, utility, budget",
    ),
    "demo": ("kv_vla_node.demo", "main job: VLA node + sim bridge over DDS, prints a result table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kv-vla", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a room not installed/built yet: say so when it is used
            sp.set_defaults(_run=None, _import_error=f"{module_name}: {exc}")
            continue
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._run is None:
        print(f"kv-vla {args.command} is unavailable: {args._import_error}", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
