# kv_vla on ROS 2 Kilted: the VLA node with the shipped compact checkpoint, CPU torch.
#   docker build -t kv_vla .
#   docker run --rm -it --net=host kv_vla                      # ros2 launch kv_vla bringup.launch.py
#   docker run --rm -it --net=host kv_vla ros2 launch kv_vla sim.launch.py tasks:=cued_reach,reach
# Launch arguments override config/kv_vla.yaml (model_path, device, dtype, cache_policy, chunk_size,
# gate_threshold, max_tokens, dry_run); parameters can be changed live with `ros2 param set /kv_vla ...`.
#
# CUDA desktop: keep this base image, install torch from the CUDA index instead of the CPU one
#   (e.g. --index-url https://download.pytorch.org/whl/cu128), run with `--gpus all` and launch with
#   `device:=cuda dtype:=bfloat16`.
# Jetson (L4T / JetPack 6): start from an L4T image that carries ROS 2 (e.g. a dustynv/ros
#   kilted image for your L4T release) and do NOT pip-install torch from PyPI: use the torch wheel built
#   for your JetPack (NVIDIA / Jetson AI Lab index), drop torch from the requirements line below, and
#   launch with `device:=cuda dtype:=float16`.
FROM ros:kilted-ros-base

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 OMP_NUM_THREADS=2
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3-venv python3-pip python3-colcon-common-extensions libgl1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kv_vla
# Only what the image needs (never a host .venv or outputs/); ros2_ws's launch/ and config/ are
# relative symlinks to the folders copied next to it.
COPY pyproject.toml README.md requirements.txt requirements-ros.txt requirements-dev.txt ./
COPY kv_vla ./kv_vla
COPY kv_vla_sim ./kv_vla_sim
COPY kv_vla_node ./kv_vla_node
COPY config ./config
COPY launch ./launch
COPY models ./models
COPY ros2_ws/src ./ros2_ws/src

# A venv that sees the system's ROS 2 Python packages (rclpy, messages, launch), as `make setup`
# does when ROS_DISTRO is set: the PyPI ROS wheels in requirements-ros.txt are not installed.
RUN python3 -m venv --system-site-packages .venv \
    && .venv/bin/pip install --upgrade pip \
    && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && .venv/bin/pip install -r requirements.txt \
    && .venv/bin/pip install --no-deps -e .

# Build the kv_vla ROS package with the venv's interpreter so its executables run in the venv.
RUN . /opt/ros/kilted/setup.sh \
    && cd ros2_ws \
    && /opt/kv_vla/.venv/bin/python -m colcon build

RUN printf '%s\n' '#!/bin/bash' 'set -e' \
        'source /opt/ros/kilted/setup.bash' \
        'source /opt/kv_vla/ros2_ws/install/setup.bash' \
        'exec "$@"' > /kv_vla_entrypoint.sh \
    && chmod +x /kv_vla_entrypoint.sh
ENTRYPOINT ["/kv_vla_entrypoint.sh"]
CMD ["ros2", "launch", "kv_vla", "bringup.launch.py"]
