"""Bring up the kv_vla VLA node: `ros2 launch kv_vla bringup.launch.py [model_path:=...] [...]`.

The node is a managed (lifecycle) node; `autostart:=true` (the default) has launch_ros configure
and activate it, `autostart:=false` leaves it unconfigured for a lifecycle manager. Parameters
come from `config/kv_vla.yaml` (or `params_file:=`); each launch argument below, when given,
overrides the node parameter of the same name. Nothing here is launch-only: every value is also a
node parameter (`--ros-args -p name:=value`, `ros2 param set /kv_vla name value`), and the Fast DDS
profile is two environment variables (kv_vla_node/README.md).
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

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
    "step_mode": (str, "event (step on each new frame) or timer"),
    "control_rate_hz": (float, "event: steps/s cap (0 = none); timer: the rate"),
    "image_reliability": (str, "reliable or best_effort (match the camera)"),
}


def _vla_node(context, *args, **kwargs):
    overrides = {}
    for name, (cast, _help) in OVERRIDES.items():
        value = LaunchConfiguration(name).perform(context)
        if value != "":
            overrides[name] = cast(value)
    overrides["autostart"] = False  # launch_ros drives the transitions (below), not the node itself
    actions = []
    profile = LaunchConfiguration("fastdds_profile").perform(context)
    if profile:
        actions += [
            SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", profile),
            SetEnvironmentVariable("RMW_FASTRTPS_USE_QOS_FROM_XML", "1"),
        ]
    actions.append(
        LifecycleNode(
            package="kv_vla",
            executable="vla_node",
            name="kv_vla",
            namespace=LaunchConfiguration("namespace").perform(context),
            parameters=[LaunchConfiguration("params_file").perform(context), overrides],
            autostart=_BOOL(LaunchConfiguration("autostart").perform(context)),
            output="screen",
            emulate_tty=True,
        )
    )
    return actions


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("kv_vla")
    arguments = [
        DeclareLaunchArgument(
            "params_file",
            default_value=os.path.join(share, "config", "kv_vla.yaml"),
            description="node parameter YAML",
        ),
        DeclareLaunchArgument(
            "namespace", default_value="", description="namespace of the node and its topics"
        ),
        DeclareLaunchArgument(
            "autostart",
            default_value="true",
            description="configure and activate the lifecycle node at launch",
        ),
        DeclareLaunchArgument(
            "fastdds_profile",
            default_value=os.path.join(share, "config", "fastdds_kv_vla.xml"),
            description="Fast DDS XML profile (bounds an oversized frame's memory); empty: rmw defaults",
        ),
    ]
    arguments += [
        DeclareLaunchArgument(name, default_value="", description=f"{help_text} (empty: keep the YAML value)")
        for name, (_cast, help_text) in OVERRIDES.items()
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_vla_node)])
