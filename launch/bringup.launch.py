"""Bring up the kv_vla VLA node: `ros2 launch kv_vla bringup.launch.py [model_path:=...] [...]`.

Parameters come from `config/kv_vla.yaml` (or `params_file:=`); each launch argument below, when
given, overrides the node parameter of the same name. Nothing here is launch-only: every value is
also a node parameter (`--ros-args -p name:=value`, `ros2 param set /kv_vla name value`).
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

# launch argument (= node parameter name, one of kv_vla/settings.py) -> (type, help); checked against
# that table by tests/test_settings.py. Empty means "keep the YAML value".
_BOOL = lambda v: v.lower() in ("true", "1")  # noqa: E731


OVERRIDES = {
    "model_path": (str, "checkpoint folder"),
    "device": (str, "cpu, cuda, cuda:N or mps"),
    "dtype": (str, "float32, float16 or bfloat16"),
    "trust_remote_code": (_BOOL, "run Python code shipped in the model folder (OpenVLA)"),
    "policy": (str, "KV eviction policy, e.g. gated, full, window"),
    "chunk_size": (int, "tokens per cache chunk (0 = one control step)"),
    "recent_chunks": (int, "newest complete chunks that are never evicted"),
    "gate_threshold": (float, "gated policy: evict chunks whose utility is below this"),
    "max_tokens": (int, "KV token budget (0 = no budget)"),
    "dry_run": (_BOOL, "compute but publish no action"),
}


def _vla_node(context, *args, **kwargs):
    overrides = {}
    for name, (cast, _help) in OVERRIDES.items():
        value = LaunchConfiguration(name).perform(context)
        if value != "":
            overrides[name] = cast(value)
    return [
        Node(
            package="kv_vla",
            executable="vla_node",
            name="kv_vla",
            namespace=LaunchConfiguration("namespace").perform(context),
            parameters=[LaunchConfiguration("params_file").perform(context), overrides],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("kv_vla"), "config", "kv_vla.yaml")
    arguments = [
        DeclareLaunchArgument("params_file", default_value=default_params, description="node parameter YAML"),
        DeclareLaunchArgument(
            "namespace", default_value="", description="namespace of the node and its topics"
        ),
    ]
    arguments += [
        DeclareLaunchArgument(name, default_value="", description=f"{help_text} (empty: keep the YAML value)")
        for name, (_cast, help_text) in OVERRIDES.items()
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_vla_node)])
