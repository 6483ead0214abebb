"""``kv-vla eval --compile``: which model policies get a compiled row, and why the others do not."""

from __future__ import annotations

import argparse

from kv_vla.eval import cli as eval_cli


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return parser.parse_args(["--out", "unused", *argv])


def test_compiled_rows_only_for_bounded_policies_without_the_probe():
    args = _args("--compile", "--max-tokens", "80")
    assert args.compiled_rows
    assert eval_cli.compiled_refusal("gated", args) is None
    assert eval_cli.compiled_refusal("window", args) is None
    assert "probe" in eval_cli.compiled_refusal("attention", args)
    assert "low-bit" in eval_cli.compiled_refusal("gated_tiered", args)
    unbounded = _args("--compile", "--max-tokens", "0")  # 0: no budget (the default is 80)
    assert "bounded policy" in eval_cli.compiled_refusal("gated", unbounded)
    assert "bounded policy" in eval_cli.compiled_refusal("full", unbounded)
