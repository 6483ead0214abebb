"""``kv-vla interpolate``: exact weight mixes, and refusal of models that are not one model's fine-tunes."""

from __future__ import annotations

import pytest
import torch

from kv_vla.cli import main as cli_main
from kv_vla.model.compact import CompactVLA
from kv_vla.train.interpolate import interpolate_models
from kv_vla_node.testing import save_random_model


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interp")
    return save_random_model(tmp / "a", seed=0), save_random_model(tmp / "b", seed=1)


def _floats(path) -> dict[str, torch.Tensor]:
    state = CompactVLA.from_pretrained(path).state_dict()
    return {k: v for k, v in state.items() if torch.is_floating_point(v)}


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_every_float_tensor_is_the_exact_mix(two_models, tmp_path, alpha):
    a, b = two_models
    out = interpolate_models(a, b, alpha, tmp_path / "mix")
    wa, wb, wm = _floats(a), _floats(b), _floats(out)
    assert wm.keys() == wb.keys()
    assert any(not torch.equal(wa[k], wb[k]) for k in wb)  # the two seeds really differ
    for name, mixed in wm.items():
        expected = ((1 - alpha) * wa[name].double() + alpha * wb[name].double()).to(wb[name].dtype)
        assert torch.equal(mixed, expected), name
    assert (out / "train_config.json").exists()


def test_models_of_different_shape_are_refused_with_the_difference(two_models, tmp_path):
    a, _ = two_models
    other = save_random_model(tmp_path / "wide", seed=2, hidden_size=96)
    with pytest.raises(ValueError, match="hidden_size"):
        interpolate_models(a, other, 0.5, tmp_path / "mix")
    assert not (tmp_path / "mix").exists()


def test_cli_refuses_alpha_outside_the_unit_interval(two_models, tmp_path, capsys):
    a, b = two_models
    code = cli_main(
        ["interpolate", "--a", str(a), "--b", str(b), "--alpha", "1.5", "--out", str(tmp_path / "m")]
    )
    assert code == 2
    assert "alpha must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
