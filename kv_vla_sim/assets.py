"""Scene assets: a low-polygon Franka Panda and the colour palette.

The stock ``franka_panda/panda.urdf`` of ``pybullet_data`` draws its links with visual meshes of
about a million vertices in total; the CPU "tiny renderer" then spends ~35 ms per frame on the arm
alone, even at 64x64. The collision meshes show the same silhouette with a few thousand triangles,
so we write a copy of the URDF whose visuals point at the collision meshes (solid colours instead
of textures) and render a frame in ~2.5 ms. The copy is generated once per user into the temp
directory, atomically, with a name that hashes its content, so concurrent processes never read a
half-written file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pybullet_data

# RGBA colours. Large, saturated, well separated hues so a 64x64 frame tells them apart.
COLOURS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.92, 0.12, 0.10, 1.0),
    "green": (0.10, 0.72, 0.15, 1.0),
    "blue": (0.10, 0.25, 0.95, 1.0),
    "yellow": (0.98, 0.88, 0.10, 1.0),
    "purple": (0.62, 0.18, 0.82, 1.0),
    "cyan": (0.10, 0.85, 0.90, 1.0),
    "grey": (0.30, 0.30, 0.30, 1.0),
}
TABLE_RGBA = (0.72, 0.58, 0.42, 1.0)
CUE_RGBA = (1.0, 0.95, 0.25, 1.0)  # the "lit" cube of the cued tasks
LAMP_OFF_RGBA = (0.12, 0.12, 0.12, 1.0)
LAMP_ON_RGBA = (1.0, 1.0, 1.0, 1.0)
ARM_RGBA = (0.88, 0.88, 0.90, 1.0)
HAND_RGBA = (0.12, 0.12, 0.14, 1.0)


def _lowpoly_urdf_text() -> str:
    root = pybullet_data.getDataPath()
    mesh_dir = os.path.join(root, "franka_panda", "meshes", "collision")
    with open(os.path.join(root, "franka_panda", "panda.urdf")) as f:
        text = f.read()
    text = text.replace("package://meshes/visual/", mesh_dir + "/")
    text = text.replace("package://meshes/collision/", mesh_dir + "/")
    return text


def lowpoly_panda_urdf() -> str:
    """Path of the low-polygon Panda URDF (created on first use)."""
    text = _lowpoly_urdf_text()
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    out_dir = os.path.join(tempfile.gettempdir(), f"kv_vla_sim_assets_{os.getuid()}")
    path = os.path.join(out_dir, f"panda_lowpoly_{digest}.urdf")
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".urdf.tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path
