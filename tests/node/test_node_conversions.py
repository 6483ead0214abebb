"""Image <-> numpy and action <-> message conversions: every encoding and every malformed case."""

from __future__ import annotations

import numpy as np
import pytest

from kv_vla_node import conversions
from kv_vla_node.conversions import InputRefused

pytestmark = pytest.mark.ros

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def _raw(pixels: np.ndarray, encoding: str, pad: int = 0):
    """Build an Image message by hand from raw channel data (independent of rgb_to_image)."""
    from sensor_msgs.msg import Image

    h, w = pixels.shape[:2]
    rows = pixels.reshape(h, -1)
    if pad:
        rows = np.concatenate([rows, np.full((h, pad), 7, np.uint8)], axis=1)
    msg = Image(height=h, width=w, encoding=encoding, step=rows.shape[1])
    msg.data = rows.tobytes()
    return msg


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize(
    ("encoding", "raw"),
    [
        ("rgb8", lambda x: x),
        ("bgr8", lambda x: x[:, :, ::-1]),
        ("rgba8", lambda x: np.concatenate([x, np.full((*x.shape[:2], 1), 9, np.uint8)], axis=2)),
        ("bgra8", lambda x: np.concatenate([x[:, :, ::-1], np.full((*x.shape[:2], 1), 9, np.uint8)], axis=2)),
    ],
)
def test_color_encodings_decode_to_rgb(encoding, raw, pad):
    out = conversions.image_to_rgb(_raw(np.ascontiguousarray(raw(RGB)), encoding, pad), max_pixels=100)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, RGB)


def test_mono8_replicates_the_channel():
    gray = RGB[:, :, 0]
    out = conversions.image_to_rgb(_raw(gray[:, :, None], "mono8", pad=2), max_pixels=100)
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_rgb_to_image_round_trips(encoding):
    msg = conversions.rgb_to_image(RGB, encoding, stamp_ns=12_000_000_345, frame_id="cam", pad_bytes=1)
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (12, 345, "cam")
    np.testing.assert_array_equal(conversions.image_to_rgb(msg, max_pixels=35), RGB)


def test_rgb_to_image_mono8_is_bt601_luma():
    gray = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 10, 10]]], np.uint8)
    msg = conversions.rgb_to_image(gray, "mono8")
    assert list(msg.data) == [76, 150, 29, 10]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: setattr(m, "encoding", "yuv422"), "unsupported image encoding 'yuv422'"),
        (lambda m: setattr(m, "encoding", "16UC1"), "unsupported image encoding"),
        (lambda m: setattr(m, "encoding", "RGB8"), "unsupported image encoding"),
        (lambda m: setattr(m, "height", 0), "zero-size image (0x7)"),
        (lambda m: setattr(m, "width", 0), "zero-size image (5x0)"),
        (lambda m: setattr(m, "step", 20), "step 20 is smaller than width x channels = 21"),
        (lambda m: setattr(m, "data", bytes(m.data)[:-1]), "shorter than height x step = 105"),
        (lambda m: setattr(m, "data", b""), "image data has 0 bytes"),
        (lambda m: (setattr(m, "height", 50_000), setattr(m, "width", 50_000)), "image too large"),
    ],
)
def test_malformed_images_are_refused_with_a_reason(mutate, reason):
    msg = _raw(RGB, "rgb8")
    mutate(msg)
    with pytest.raises(InputRefused, match=None) as info:
        conversions.image_to_rgb(msg, max_pixels=1_000_000)
    assert reason in str(info.value)


def test_pixel_cap_is_inclusive():
    msg = _raw(RGB, "rgb8")
    assert conversions.image_to_rgb(msg, max_pixels=35).shape == (5, 7, 3)
    with pytest.raises(InputRefused, match="35 pixels > 34"):
        conversions.image_to_rgb(msg, max_pixels=34)


def test_instruction_validation():
    assert conversions.validate_instruction("  pick up the cube \n", 100) == "pick up the cube"
    for empty in ("", "   \n\t"):
        with pytest.raises(InputRefused, match="empty instruction"):
            conversions.validate_instruction(empty, 100)
    assert conversions.validate_instruction("x" * 100, 100) == "x" * 100
    with pytest.raises(InputRefused, match="instruction too long: 102400 characters > 1000"):
        conversions.validate_instruction("x" * 102_400, 1000)


def test_action_array_layout_and_stamp_round_trip():
    action = np.array([0.25, -0.5, 1.0, -1.0], np.float32)
    stamp_ns = 1_700_000_000_000_000_042
    msg = conversions.action_to_array_msg(action, stamp_ns)
    dims = [(d.label, d.size, d.stride) for d in msg.layout.dim]
    assert dims == [
        ("action", 4, 4),
        ("fields:dx,dy,dz,gripper", 1, 1),
        ("stamp:1700000000.000000042", 1, 1),
    ]
    assert msg.layout.data_offset == 0
    back, back_stamp = conversions.array_msg_to_action(msg)
    np.testing.assert_array_equal(back, action)
    assert back_stamp == stamp_ns


def test_array_without_stamp_parses_to_none():
    from std_msgs.msg import Float32MultiArray

    action, stamp = conversions.array_msg_to_action(Float32MultiArray(data=[1.0, 2.0, 3.0, 4.0]))
    assert stamp is None and action.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_twist_copies_the_frame_header_and_scales_linear():
    frame = conversions.rgb_to_image(RGB, stamp_ns=5_000_000_007, frame_id="wrist_cam")
    twist = conversions.action_to_twist(np.array([0.5, -1.0, 0.25, 0.75], np.float32), frame.header, 0.1)
    assert (twist.header.stamp.sec, twist.header.stamp.nanosec) == (5, 7)
    assert twist.header.frame_id == "wrist_cam"
    assert (twist.twist.linear.x, twist.twist.linear.y, twist.twist.linear.z) == pytest.approx(
        (0.05, -0.1, 0.025)
    )
    assert (twist.twist.angular.x, twist.twist.angular.y, twist.twist.angular.z) == (0.75, 0.0, 0.0)


def test_clip_action():
    out = conversions.clip_action([2.0, -3.0, 0.1, 0.5], 0.4)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.4, -0.4, 0.1, 0.4])
