"""The diagnostics status: its level and message follow the node's state (pure functions, no DDS)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ros


def _values(**changes: str) -> dict[str, str]:
    base = {"instruction": "touch the green cube", "last_error": "", "position_note": ""}
    return base | changes


def test_positions_out_of_range_turn_the_status_warn_with_the_reason():
    from kv_vla.cache.positions import position_range_note
    from kv_vla_node.diagnostics import OK, WARN, status_level

    assert status_level(_values(), 3, 10, False) == (OK, "episode 3 step 10")
    note = position_range_note(8200, 8192, "episode")
    level, message = status_level(_values(position_note=note), 3, 1001, False)
    assert level == WARN and message.startswith("episode 3 step 1001; position id 8200 reached")
    # a fault in this episode still outranks it
    level, _ = status_level(_values(position_note=note, last_error="boom"), 3, 1001, True)
    assert level != WARN


def test_position_range_note_names_the_fix_for_each_mode():
    from kv_vla.cache.positions import position_range_note

    assert position_range_note(8191, 8192, "episode") is None
    assert position_range_note(10**6, None, "episode") is None  # a config without a range
    assert "positions:=cache" in position_range_note(8192, 8192, "episode")
    assert "lower max_tokens" in position_range_note(8192, 8192, "cache")
