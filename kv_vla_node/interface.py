"""The VLA node's ROS interface: node and diagnostics names, QoS profiles, parameter descriptors.

Shared by the node, the sim bridge and the test client, so a publisher and its subscriber cannot
disagree on a QoS, and nothing outside the node has to import the node module.
"""

from __future__ import annotations

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from kv_vla_node.params import STARTUP, ParamSpec

NODE_NAME = "kv_vla"
DIAG_NAME = "kv_vla: episode KV cache"
IMAGE_TOPIC = "image"
COMPRESSED_TOPIC = "image/compressed"  # image_transport's name for the compressed stream of `image`


def image_qos(reliability: str = "reliable", depth: int = 5) -> QoSProfile:
    """Keep-last ``depth``, volatile, and the given reliability. Reliable with depth 5 is the
    default because best-effort frames larger than one UDP datagram are mostly lost to Fast DDS
    fragmentation and a reliable depth-1 writer replaces a frame before its fragments are through
    (measured: kv_vla_node/README.md). The node still steps on the newest frame only."""
    policy = ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(
        depth=depth,
        reliability=policy,
        durability=qos_profile_sensor_data.durability,
        history=qos_profile_sensor_data.history,
    )


# What publishers of frames use (the sim bridge, the test client): reliable writers match both a
# reliable and a best-effort subscription.
IMAGE_QOS = image_qos("reliable", 5)
INSTRUCTION_QOS = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """The ``ParameterDescriptor`` of one table entry: its help, effect, choices and range."""
    desc = ParameterDescriptor(
        name=spec.name,
        description=f"{spec.description} [takes effect: {spec.effect}]",
        read_only=spec.effect == STARTUP,
    )
    if spec.choices:
        desc.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.low is not None and spec.high is not None:
        if isinstance(spec.default, float):
            desc.floating_point_range = [
                FloatingPointRange(
                    from_value=float(spec.low), to_value=float(spec.high), step=float(spec.step or 0.0)
                )
            ]
        else:
            desc.integer_range = [
                IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=int(spec.step or 1))
            ]
    return desc
