"""Ahead-of-time compiled graphs for the CPU step: ``torch.export`` + AOTInductor, loaded back.

Why: a ``torch.compile``'d call spends about 100 us in dynamo's frame evaluation and the AOT
runtime wrappers before its kernels run, even with guard checks cut down; that was about 7% of
the compact VLA's compiled step on this CPU, for its two calls (vision, decoder). A loaded
AOTInductor package runs the same inductor kernels through its C++ runner and checks nothing:
each package holds one shape, so callers key packages by shape. The packages are written to a
temporary folder that is removed when the process exits.
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kv_vla.cache.storage.compiled import CPU_INDUCTOR_CONFIG, compiling

_folder: Path | None = None
_names = itertools.count()
_compiled = 0


def compiled_count() -> int:
    """How many graphs this process compiled ahead of time (what ``torch.compile``'s counters miss)."""
    return _compiled


def _package_path() -> str:
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix="kv_vla_aot_"))
        atexit.register(shutil.rmtree, _folder, ignore_errors=True)
    return str(_folder / f"graph{next(_names)}.pt2")


def aot_compile(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
    """``module`` exported on ``args`` and compiled by AOTInductor for CPU (weights frozen in, as
    :data:`CPU_INDUCTOR_CONFIG`); returns the loaded callable, which takes arguments of exactly
    ``args``' shapes and dtypes and writes the in-place updates ``module`` makes to its inputs."""
    global _compiled
    exported = torch.export.export(module, args)
    with compiling("cpu"):
        path = torch._inductor.aoti_compile_and_package(
            exported, package_path=_package_path(), inductor_configs=dict(CPU_INDUCTOR_CONFIG)
        )
    _compiled += 1
    return torch._inductor.aoti_load_package(path)
