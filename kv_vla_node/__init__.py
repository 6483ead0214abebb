"""kv_vla's ROS 2 layer: the VLA node, the PyBullet sim bridge, message conversions and the demo.

Depends on rclpy, ``kv_vla.runtime`` and ``kv_vla_sim``; the core never imports this package.
"""
