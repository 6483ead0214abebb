"""The core rooms never pull rclpy or pybullet (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = ["kv_vla.cache", "kv_vla.model", "kv_vla.runtime"]


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
