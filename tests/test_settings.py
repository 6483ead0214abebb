"""One table of knobs (kv_vla/settings.py): every place that spells a cache or runtime knob is
derived from it or checked against it here, so a knob has one name, one default, one range."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kv_vla import settings

REPO = Path(__file__).resolve().parents[1]


def test_episode_cache_config_fields_are_the_cache_knobs_with_their_defaults():
    from kv_vla.cache import EpisodeCacheConfig

    fields = {f.name: f.default for f in dataclasses.fields(EpisodeCacheConfig)}
    assert tuple(fields) == settings.CACHE_SETTINGS
    assert fields == settings.defaults(settings.CACHE_SETTINGS)


def test_every_policy_option_is_a_policy_field_with_the_table_default():
    from kv_vla.cache import POLICIES

    readers: dict[str, set[str]] = {n: set() for n in settings.POLICY_OPTIONS}
    for name, cls in POLICIES.items():
        for option in cls.option_names():
            field = next(f for f in dataclasses.fields(cls) if f.name == option)
            assert field.default == settings.default(option), (name, option)
            if option in readers:
                readers[option].add(name)
        instance = cls()  # the defaults pass the policy's own __post_init__ check
        assert {n: getattr(instance, n) for n in cls.option_names()} == settings.defaults(cls.option_names())
    assert readers == {n: set(settings.SETTINGS[n].policies) for n in settings.POLICY_OPTIONS}


@pytest.mark.parametrize(
    ("policy", "changes", "reason"),
    [
        ("gated", {"gate_threshold": 1.5}, "gate_threshold: 1.5 is not allowed"),
        ("zipvl", {"tau": 0.0}, "tau: 0.0 is not allowed; allowed values: a number in (0, 1]"),
        ("zipvl", {"low_bits": 3}, "low_bits: 3 is not allowed; allowed values: 2, 4, 8"),
        ("gated_tiered", {"gate_threshold": 0.6, "full_threshold": 0.5}, "full_threshold: 0.5"),
    ],
)
def test_a_policy_checks_its_own_options_in_post_init(policy, changes, reason):
    from kv_vla.cache import POLICIES

    with pytest.raises(ValueError, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        POLICIES[policy](**changes)


@pytest.mark.slow  # a fresh interpreter
def test_the_cache_config_imports_no_policy():
    """No import circle: the config reads the registry; policies never import the config."""
    for path in (REPO / "kv_vla" / "cache" / "config.py", REPO / "kv_vla" / "cache" / "registry.py"):
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else a.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for a in getattr(node, "names", [])
        }
        assert not any("policies" in m for m in imported if m), (path.name, imported)
    for path in (REPO / "kv_vla" / "cache" / "policies").glob("*.py"):
        tree = ast.parse(path.read_text())
        runtime_imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
        assert not any(n.module == "kv_vla.cache.config" for n in runtime_imports), path.name
    code = "import kv_vla.cache.config as c, sys; print(sorted(c.POLICIES)[:1], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("['attention']")


@pytest.mark.slow  # a fresh interpreter
def test_settings_is_torch_free():
    code = "import kv_vla.settings, kv_vla_node.params, sys; print('torch' in sys.modules, 'rclpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_node_parameters_are_the_table():
    from kv_vla_node import params

    assert set(params.NAMES) == set(settings.SETTINGS)
    for spec in params.PARAMS:
        s = settings.SETTINGS[spec.name]
        assert (spec.default, spec.effect, spec.description) == (s.default, s.effect, s.help)
        assert type(spec.default) is s.type


def test_yaml_lists_every_parameter_at_its_declared_default():
    """The shipped YAML is the evaluated setting, so it equals the defaults (no second default)."""
    doc = yaml.safe_load((REPO / "config" / "kv_vla.yaml").read_text())
    values = doc["kv_vla"]["ros__parameters"]
    assert list(values) == list(__import__("kv_vla_node.params", fromlist=["NAMES"]).NAMES)
    assert values == settings.defaults(values)


def test_launch_arguments_are_knobs_of_the_same_type():
    tree = ast.parse((REPO / "launch" / "bringup.launch.py").read_text())
    [overrides] = [
        n.value
        for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "OVERRIDES"
    ]
    casts = {"str": str, "int": int, "float": float, "_BOOL": bool}
    for key, value in zip(overrides.keys, overrides.values):
        name, cast = key.value, casts[value.elts[0].id]
        assert name in settings.SETTINGS and settings.SETTINGS[name].type is cast, name


def _cli_actions() -> list[tuple[str, argparse.Action]]:
    from kv_vla.cli import build_parser

    out = []
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        stack = [parser]
        while stack:
            p = stack.pop()
            for action in p._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack.extend(action.choices.values())
                else:
                    out.append((command, action))
    return out


def test_cli_flags_of_knobs_are_spelled_and_typed_as_the_table():
    seen = set()
    for command, action in _cli_actions():
        s = settings.SETTINGS.get(action.dest)
        if s is None or not action.option_strings:
            continue
        if action.dest in ("device", "dtype", "seed") and s.help not in (action.help or ""):
            continue  # a command's own device/dtype/seed (training, benchmarks), not the runtime knob
        seen.add((command, action.dest))
        assert action.option_strings == [settings.flag(action.dest)], (command, action.dest)
        assert s.help in action.help, (command, action.dest)
        if s.type is bool:
            assert isinstance(action, argparse._StoreTrueAction)
        else:
            assert action.type is s.type, (command, action.dest)
            assert action.choices == (list(s.choices) if s.choices else None), (command, action.dest)
    assert {("eval", n) for n in settings.CACHE_SETTINGS if n != "policy"} <= seen
    assert {("demo", "max_tokens"), ("demo", "chunk_size"), ("eval", "trust_remote_code")} <= seen


def test_node_readme_parameter_table_is_the_generated_one():
    from kv_vla_node import params

    text = (REPO / "kv_vla_node" / "README.md").read_text()
    start = text.index("<!-- settings-table:")
    body = text[text.index("\n", start) + 1 : text.index("<!-- settings-table: end -->")].strip()
    assert body == settings.markdown_table(params.NAMES)


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("chunk_size", 0, True),
        ("chunk_size", -1, False),
        ("max_tokens", 0, True),
        ("gate_threshold", float("inf"), False),
        ("tau", 1, True),
        ("low_bits", True, False),
        ("device", "cuda:1", True),
        ("device", "tpu", False),
        ("trust_remote_code", 1, False),
        ("dtype", "int8", False),
    ],
)
def test_check_refuses_with_the_name_and_the_allowed_values(name, value, ok):
    reason = settings.check(name, value)
    assert (reason is None) == ok
    if not ok:
        assert reason.startswith(f"{name}: ") and "allowed values: " in reason
