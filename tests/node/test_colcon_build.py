"""`colcon build` turns ros2_ws into the `kv_vla` ament_python package, and its installed `vla_node`
executable starts the real node (tiny random model) that answers over DDS.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kv_vla_node import params
from kv_vla_node.testing import NodeProcess, RosClient, free_domain_id, ros_env, save_random_model

pytestmark = [pytest.mark.ros, pytest.mark.slow]  # builds the ROS package with colcon

REPO = Path(__file__).resolve().parents[2]
COLCON = Path(sys.executable).parent / "colcon"


def test_package_files_are_tracked_symlinks_and_manifest_is_valid():
    """launch/ and config/ reach the package through relative symlinks that git stores as links."""
    pkg = REPO / "ros2_ws" / "src" / "kv_vla"
    for link in ("launch", "config"):
        assert (pkg / link).is_symlink() and (pkg / link).resolve() == (REPO / link).resolve()
    out = subprocess.run(
        ["git", "ls-files", "-s", "ros2_ws/src/kv_vla/launch", "ros2_ws/src/kv_vla/config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if out:  # tracked (not yet, in a working tree before the first commit): must be symlinks (120000)
        assert all(line.startswith("120000") for line in out.splitlines()), out
    import xml.etree.ElementTree as ET

    root = ET.parse(pkg / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "kv_vla"
    email = root.find("maintainer").get("email")
    assert email and "@" in email and "." in email.split("@")[1]
    assert root.find("export").findtext("build_type") == "ament_python"


@pytest.mark.skipif(not COLCON.exists(), reason="colcon is not installed in this environment")
def test_colcon_build_installs_a_runnable_vla_node(tmp_path):
    build = subprocess.run(
        [
            str(COLCON),
            "--log-base",
            str(tmp_path / "log"),
            "build",
            "--base-paths",
            str(REPO / "ros2_ws"),
            "--build-base",
            str(tmp_path / "build"),
            "--install-base",
            str(tmp_path / "install"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ros_env(tmp_path / "ros_log", 0),
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    prefix = tmp_path / "install" / "kv_vla"
    share = prefix / "share" / "kv_vla"
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "kv_vla").exists()
    assert (share / "package.xml").exists()
    assert (share / "hook" / "ament_prefix_path.dsv").exists(), "colcon did not treat it as ament_python"
    assert {p.name for p in (share / "launch").iterdir()} == {"bringup.launch.py", "sim.launch.py"}
    assert (share / "config" / "kv_vla.yaml").read_text() == (REPO / "config" / "kv_vla.yaml").read_text()
    for exe in ("vla_node", "sim_bridge"):
        assert (prefix / "lib" / "kv_vla" / exe).stat().st_mode & 0o111

    # Source the workspace like a user would and run the installed executable.
    model = save_random_model(tmp_path / "tiny-vla")
    domain = free_domain_id()
    command = (
        f". {shlex.quote(str(tmp_path / 'install' / 'setup.sh'))} && "
        f"exec {shlex.quote(str(prefix / 'lib' / 'kv_vla' / 'vla_node'))} --ros-args "
        f"--params-file {shlex.quote(str(share / 'config' / 'kv_vla.yaml'))} -p model_path:={shlex.quote(str(model))}"
    )
    proc = NodeProcess(
        ["sh", "-c", command], ros_env(tmp_path / "ros_log", domain), tmp_path / "vla_node.log"
    )
    client = RosClient(domain)
    try:
        diag = client.wait_diag(lambda d: "model_path" in d, timeout_s=120)
        assert diag, proc.log_text()[-3000:]
        assert diag["model_path"] == str(model)
        yaml_values = yaml.safe_load((share / "config" / "kv_vla.yaml").read_text())["kv_vla"][
            "ros__parameters"
        ]
        got = client.get_parameters(list(params.SPECS))
        assert got == {**yaml_values, "model_path": str(model)}
    finally:
        client.close()
        code = proc.stop()
        shutil.rmtree(tmp_path / "build", ignore_errors=True)
    assert code == 0, proc.log_text()[-3000:]
