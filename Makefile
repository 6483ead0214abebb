# kv_vla: the two commands a newcomer runs are `make demo` (main job) and `make test` (tests);
# `make test-fast` is the inner loop (everything not marked slow, over pytest-xdist workers).
# Both create .venv and install everything on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kv_vla-installed
# Where a system ROS 2 is sourced (ROS_DISTRO set), its rclpy is used: the venv sees system
# site-packages and the PyPI ROS wheels are not installed.
VENV_FLAGS := $(if $(ROS_DISTRO),--system-site-packages,)
ROS_REQS := $(if $(ROS_DISTRO),,-r requirements-ros.txt)

.PHONY: setup test test-fast demo lint bench eval clean
setup: $(STAMP)

$(STAMP): requirements.txt requirements-ros.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt $(ROS_REQS) -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow" -n auto --maxprocesses 4

demo: setup
	$(VENV)/bin/kv-vla demo

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/kv-vla bench cache --json outputs/bench_cache.json

clean:
	rm -rf $(VENV) build ros2_ws/build ros2_ws/install ros2_ws/log
