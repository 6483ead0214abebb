"""Camera frames as the node receives them: CompressedImage decoding, refusals, and the model input.

The node does no resizing of its own: it hands the decoded frame to the runtime, which resizes with
``kv_vla.model.image.frames_to_pixel_values``, the function the training path uses on recorded
sim frames. So a frame that goes through the node's conversion must give the training path's
pixel tensor exactly (same kernels on the same tensors in one process).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from kv_vla.model.image import frames_to_pixel_values
from kv_vla_node import conversions
from kv_vla_node.compressed import compressed_to_rgb, rgb_to_compressed
from kv_vla_node.conversions import InputRefused

RNG = np.random.default_rng(3)


def _smooth(h: int, w: int) -> np.ndarray:
    """A camera-like frame (gradients + a block): JPEG keeps it close, unlike noise."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 256)], axis=2)
    rgb[h // 4 : h // 2, w // 4 : w // 2] = (200, 30, 40)
    return rgb.astype(np.uint8)


@pytest.mark.parametrize(("h", "w"), [(64, 64), (480, 640), (720, 1280)])
@pytest.mark.parametrize("path", ["rgb8", "bgr8", "png"])
def test_node_conversion_gives_the_training_pixels(h, w, path):
    frame = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if path == "png":
        node_rgb = compressed_to_rgb(rgb_to_compressed(frame, "png"), h * w)
    else:
        node_rgb = conversions.image_to_rgb(conversions.rgb_to_image(frame, path), h * w)
    assert node_rgb.dtype == np.uint8 and np.array_equal(node_rgb, frame)
    size = 32
    training = frames_to_pixel_values(frame[None, None], size)  # [B, T, H, W, 3] episodes, as bc does
    assert torch.equal(frames_to_pixel_values(node_rgb, size), training)


def test_sim_frames_through_the_node_equal_the_recorded_ones():
    from kv_vla_sim import make_env

    env = make_env("cued_reach", image_size=64)
    try:
        obs, _ = env.reset(seed=0)
        frame = np.asarray(obs["image"], dtype=np.uint8)
    finally:
        env.close()
    msg = conversions.rgb_to_image(frame, "rgb8", 1, "sim_camera")  # what the sim bridge publishes
    assert np.array_equal(conversions.image_to_rgb(msg, 64 * 64), frame)


def test_jpeg_decodes_close_to_the_frame():
    frame = _smooth(480, 640)
    out = compressed_to_rgb(rgb_to_compressed(frame, "jpeg"), 640 * 480)
    assert out.shape == frame.shape
    assert np.abs(out.astype(int) - frame).mean() < 3.0  # lossy: a bound, not equality


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_truncated_corrupt_and_oversized_payloads_are_refused(fmt):
    frame = _smooth(120, 160)
    good = rgb_to_compressed(frame, fmt)
    data = bytes(good.data)
    kind = fmt.upper()

    def refused(payload: bytes, max_pixels: int = 160 * 120) -> str:
        msg = rgb_to_compressed(frame, fmt)
        msg.data = payload
        with pytest.raises(InputRefused) as info:
            compressed_to_rgb(msg, max_pixels)
        return str(info.value)

    assert f"truncated {kind}" in refused(data[: len(data) // 2])
    assert "neither JPEG nor PNG" in refused(b"GIF89a" + data[6:])
    assert "image too large: 160x120" in refused(data, max_pixels=100)
    if fmt == "png":  # a flipped byte in the pixel data fails its chunk CRC
        broken = bytearray(data)
        broken[60] ^= 0xFF
        assert "corrupt PNG" in refused(bytes(broken))
    else:  # a frame header claiming 60000x60000 is refused before anything is decoded
        at = data.index(b"\xff\xc0")
        huge = data[: at + 5] + struct.pack(">HH", 60000, 60000) + data[at + 9 :]
        assert "image too large: 60000x60000" in refused(huge)


def test_instruction_and_stamp_checks():
    with pytest.raises(InputRefused, match="no printable word"):
        conversions.validate_instruction("\u200b\u200d\ufeff", 100)
    with pytest.raises(InputRefused, match="NUL character at index 4"):
        conversions.validate_instruction("stop\x00 now", 100)
    assert conversions.validate_instruction("  pick up the cube\u200b ", 100) == "pick up the cube\u200b"
    now = 1_000 * 10**9
    conversions.check_stamp(now + 10**8, now, 0.5)  # 0.1 s ahead: clock skew, accepted
    with pytest.raises(InputRefused, match="in the future"):
        conversions.check_stamp(now + 10**9, now, 0.5)


def test_string_from_cdr_keeps_an_embedded_nul():
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String

    assert conversions.string_from_cdr(serialize_message(String(data="héllo"))) == "héllo"
    text = b"go\x00left"
    raw = b"\x00\x01\x00\x00" + struct.pack("<I", len(text) + 1) + text + b"\x00"
    assert conversions.string_from_cdr(raw) == "go\x00left"
    with pytest.raises(InputRefused, match="malformed"):
        conversions.string_from_cdr(b"\x00\x01\x00\x00" + struct.pack("<I", 999) + b"ab")
