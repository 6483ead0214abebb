"""The `kv_vla` ROS 2 package (ament_python): executables, launch files and parameters.

The nodes themselves live in the repository's `kv_vla_node` Python package (installed with
`pip install` of the repository); the executables below only call their `main()`s, so ROS tooling
(`ros2 run kv_vla vla_node`, `ros2 launch kv_vla bringup.launch.py`) finds them in the usual places.
`launch/` and `config/` are symlinks to the repository's folders, so there is one copy of each file.
"""

from glob import glob

from setuptools import setup

PACKAGE = "kv_vla"

setup(
    # Not "kv_vla": that is the core distribution, and the generated scripts look their entry points
    # up by distribution name, which must not depend on which of the two comes first on sys.path.
    name="kv_vla_ros",
    version="0.1.0",
    packages=[],  # code comes from the kv_vla distribution; no auto-discovery of launch/ or config/
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", sorted(glob("launch/*.launch.py"))),
        (f"share/{PACKAGE}/config", sorted(glob("config/*.yaml") + glob("config/*.xml"))),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="kv_vla maintainers",
    maintainer_email="kv-vla-maintainers@example.com",
    description="ROS 2 VLA node with an episode-long, RNN-gated chunked KV cache",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "vla_node = kv_vla_node.vla_node:main",
            "sim_bridge = kv_vla_node.sim_bridge:main",
        ],
    },
)
