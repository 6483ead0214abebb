"""The rooms keep their import arrows: the core never pulls rclpy or pybullet (checked in a fresh
interpreter), the sim never imports the core or torch, and no package module imports in a circle
(both read from the source, so an import inside a function counts too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = ["kv_vla.cache", "kv_vla.model", "kv_vla.runtime"]
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kv_vla", "kv_vla_node", "kv_vla_sim")


@pytest.mark.slow  # a fresh interpreter per room
@pytest.mark.parametrize("module", CORE)
def test_core_does_not_import_ros_or_pybullet(module):
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('rclpy', 'pybullet', 'pybullet_data'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imported_names(path: Path, name: str) -> set[str]:
    """Every name ``path`` imports, at any depth (``if TYPE_CHECKING:`` blocks excepted); for
    ``from a import b`` both ``a`` and ``a.b``."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def test_sim_room_imports_nothing_from_the_core_or_torch():
    modules = _modules()
    bad = {
        name: sorted(
            n for n in _imported_names(path, name) if n.split(".")[0] in ("kv_vla", "torch", "rclpy")
        )
        for name, path in modules.items()
        if name.split(".")[0] == "kv_vla_sim"
    }
    assert {k: v for k, v in bad.items() if v} == {}
def test_no_module_imports_in_a_circle():
    """Tarjan's strongly connected components over the package-internal import graph. Importing a
    module's own parent package is not an edge (Python imports the parents first anyway)."""
    modules = _modules()
    graph = {
        name: {
            n
            for n in _imported_names(path, name)
            if n in modules and n != name and not name.startswith(n + ".")
        }
        for name, path in modules.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert circles == []
