"""Launch files and the parameter YAML agree with the nodes' declared parameters.

`launch`/`launch_ros` cannot be installed here, so the launch files are checked statically (imports,
declared arguments vs node parameters) and then executed against a minimal stand-in of the small
part of the launch API they use, to check the arguments reach the nodes as typed parameters.
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest
import yaml

from kv_vla_node import params

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
ALLOWED_IMPORTS = {"__future__", "os", "launch", "launch_ros", "ament_index_python"}


def _bridge_parameters() -> set[str]:
    """Names the sim bridge declares (read from its source: no rclpy needed)."""
    tree = ast.parse((REPO / "kv_vla_node" / "sim_bridge.py").read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", "") == "declare_parameter"
        and isinstance(node.args[0], ast.Constant)
    }


def test_yaml_keys_are_exactly_the_declared_parameters_and_valid():
    doc = yaml.safe_load((REPO / "config" / "kv_vla.yaml").read_text())
    assert list(doc) == ["kv_vla"]
    values = doc["kv_vla"]["ros__parameters"]
    assert set(values) == set(params.SPECS)
    for name, value in values.items():
        spec = params.SPECS[name]
        assert type(value) is type(spec.default), f"{name}: YAML type {type(value)} != {type(spec.default)}"
        assert params.validate(name, value) is None


@pytest.mark.parametrize("name", ["bringup.launch.py", "sim.launch.py"])
def test_launch_files_use_only_the_launch_api(name):
    tree = ast.parse((LAUNCH / name).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots <= ALLOWED_IMPORTS, roots - ALLOWED_IMPORTS
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)


# ---------------------------------------------------------------- minimal launch API stand-in
class _Context:
    def __init__(self, configs: dict[str, str]):
        self.launch_configurations = configs


class _LaunchConfiguration:
    def __init__(self, name: str):
        self.name = name

    def perform(self, context: _Context) -> str:
        return context.launch_configurations[self.name]


class _Record:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _Env(_Record):
    pass


class _Lifecycle(_Record):
    pass


def _load_launch_module(path: Path, monkeypatch) -> types.ModuleType:
    fake = {
        "launch": {"LaunchDescription": _Record},
        "launch.actions": {
            "DeclareLaunchArgument": _Record,
            "OpaqueFunction": _Record,
            "IncludeLaunchDescription": _Record,
            "SetEnvironmentVariable": _Env,
            "EmitEvent": _Record,
            "RegisterEventHandler": _Record,
        },
        "launch.event_handlers": {"OnProcessExit": _Record},
        "launch.events": {"Shutdown": _Record},
        "launch.substitutions": {"LaunchConfiguration": _LaunchConfiguration},
        "launch.launch_description_sources": {"PythonLaunchDescriptionSource": _Record},
        "launch_ros": {},
        "launch_ros.actions": {"Node": _Record, "LifecycleNode": _Lifecycle},
        "ament_index_python": {},
        "ament_index_python.packages": {"get_package_share_directory": lambda pkg: f"/opt/share/{pkg}"},
    }
    for mod_name, attrs in fake.items():
        module = types.ModuleType(mod_name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, mod_name, module)
    code = compile(path.read_text(), str(path), "exec")
    module = types.ModuleType(path.stem.replace(".", "_"))
    exec(code, module.__dict__)
    return module


def _declared(description: _Record) -> dict[str, str]:
    return {
        a.args[0]: a.kwargs["default_value"]
        for a in description.args[0]
        if isinstance(a, _Record) and a.args and isinstance(a.args[0], str)
    }


def _opaque(description: _Record) -> _Record:
    return next(a for a in description.args[0] if "function" in a.kwargs)


def test_bringup_arguments_map_to_node_parameters(monkeypatch):
    mod = _load_launch_module(LAUNCH / "bringup.launch.py", monkeypatch)
    desc = mod.generate_launch_description()
    declared = _declared(desc)
    overrides = set(declared) - {"params_file", "namespace", "fastdds_profile"}  # the profile: env vars
    assert overrides <= set(params.SPECS)
    assert {"model_path", "policy", "chunk_size", "gate_threshold", "device"} <= overrides
    assert declared["params_file"] == "/opt/share/kv_vla/config/kv_vla.yaml"

    assert declared["autostart"] == "true"
    assert declared["fastdds_profile"] == "/opt/share/kv_vla/config/fastdds_kv_vla.xml"
    assert (REPO / "config" / "fastdds_kv_vla.xml").exists()

    # Empty arguments keep the YAML; given ones become typed parameter overrides. launch_ros drives
    # the lifecycle (autostart), so the node's own autostart is off.
    configs = dict(declared)
    configs.update({name: "" for name in mod.OVERRIDES})
    env, env2, node = _opaque(desc).kwargs["function"](_Context(configs))
    assert isinstance(env, _Env) and isinstance(env2, _Env) and isinstance(node, _Lifecycle)
    assert dict([env.args, env2.args]) == {
        "FASTDDS_DEFAULT_PROFILES_FILE": declared["fastdds_profile"],
        "RMW_FASTRTPS_USE_QOS_FROM_XML": "1",
    }
    assert node.kwargs["parameters"] == [declared["params_file"], {"autostart": False}]
    assert node.kwargs["autostart"] is True and node.kwargs["name"] == "kv_vla"
    assert (node.kwargs["package"], node.kwargs["executable"]) == ("kv_vla", "vla_node")
    configs |= {
        "chunk_size": "40",
        "gate_threshold": "0.3",
        "policy": "window",
        "dry_run": "true",
        "step_mode": "timer",
        "control_rate_hz": "15",
        "autostart": "false",
        "fastdds_profile": "",
    }
    [node] = _opaque(desc).kwargs["function"](_Context(configs))
    overrides = node.kwargs["parameters"][1]
    assert node.kwargs["autostart"] is False
    assert overrides == {
        "chunk_size": 40,
        "gate_threshold": 0.3,
        "policy": "window",
        "dry_run": True,
        "step_mode": "timer",
        "control_rate_hz": 15.0,
        "autostart": False,
    }
    for name, value in overrides.items():
        assert type(value) is type(params.SPECS[name].default)
        assert params.validate(name, value) is None


def test_sim_launch_includes_bringup_and_maps_bridge_arguments(monkeypatch):
    mod = _load_launch_module(LAUNCH / "sim.launch.py", monkeypatch)
    desc = mod.generate_launch_description()
    declared = _declared(desc)
    assert set(declared) - {"namespace"} <= _bridge_parameters()
    [include] = [a for a in desc.args[0] if a.args and isinstance(a.args[0], _Record)]
    assert include.args[0].args == ("/opt/share/kv_vla/launch/bringup.launch.py",)
    node, handler = _opaque(desc).kwargs["function"](_Context(dict(declared)))
    assert node.kwargs["executable"] == "sim_bridge"
    # the bridge's exit shuts the launch down, naming its exit code
    [on_exit] = handler.args
    assert on_exit.kwargs["target_action"] is node
    [emit] = on_exit.kwargs["on_exit"](types.SimpleNamespace(returncode=3), None)
    assert "exited with code 3" in emit.kwargs["event"].kwargs["reason"]
    bridge_params = node.kwargs["parameters"][0]
    assert bridge_params["tasks"] == ["cued_reach", "reach"]
    assert bridge_params["episodes_per_task"] == 2 and isinstance(bridge_params["episodes_per_task"], int)
