"""The VLA node and the PyBullet sim bridge: `ros2 launch kv_vla sim.launch.py [tasks:=cued_reach,reach]`.

Includes `bringup.launch.py` (all its arguments pass through) and starts the sim bridge, which runs
`episodes_per_task` episodes of each task and publishes each result on `episode_result`. When the
bridge exits the whole launch shuts down, the shutdown's reason naming the bridge's exit code.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    IncludeLaunchDescription,
    OpaqueFunction,
    RegisterEventHandler,
)
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

# launch argument (= sim bridge parameter name) -> (type, default)
BRIDGE_ARGS = {
    "tasks": (lambda v: [t.strip() for t in v.split(",") if t.strip()], "cued_reach,reach"),
    "episodes_per_task": (int, "2"),
    "seed_offset": (int, "0"),
    "image_size": (int, "64"),
    "max_steps": (int, "0"),
    "results_path": (str, ""),
}


def _shutdown_with_code(event, context):
    """The bridge has exited: shut the launch down, saying with which code."""
    return [EmitEvent(event=Shutdown(reason=f"sim bridge exited with code {event.returncode}"))]


def _bridge(context, *args, **kwargs):
    params = {
        name: cast(LaunchConfiguration(name).perform(context)) for name, (cast, _d) in BRIDGE_ARGS.items()
    }
    bridge = Node(
        package="kv_vla",
        executable="sim_bridge",
        name="kv_vla_sim_bridge",
        namespace=LaunchConfiguration("namespace").perform(context),
        parameters=[params],
        output="screen",
        emulate_tty=True,
    )
    return [bridge, RegisterEventHandler(OnProcessExit(target_action=bridge, on_exit=_shutdown_with_code))]


def generate_launch_description() -> LaunchDescription:
    bringup = os.path.join(get_package_share_directory("kv_vla"), "launch", "bringup.launch.py")
    arguments = [DeclareLaunchArgument("namespace", default_value="", description="namespace of both nodes")]
    arguments += [
        DeclareLaunchArgument(name, default_value=default, description=f"sim bridge parameter {name}")
        for name, (_cast, default) in BRIDGE_ARGS.items()
    ]
    return LaunchDescription(
        [
            *arguments,
            IncludeLaunchDescription(PythonLaunchDescriptionSource(bringup)),
            OpaqueFunction(function=_bridge),
        ]
    )
