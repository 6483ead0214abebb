"""``sensor_msgs/CompressedImage`` (JPEG, PNG) -> RGB, refusing a corrupt, truncated or oversized one.

The pixel count is read from the header before anything is decoded, so a small payload that claims
a huge image cannot make the node allocate it. OpenCV (``opencv-python-headless``) decodes; it is
imported on first use so the rest of the node does not need it.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from kv_vla_node.conversions import InputRefused

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
# SOF markers carry the frame size (not DHT 0xC4, JPG 0xC8, DAC 0xCC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise InputRefused(f"truncated PNG: {len(data)} bytes, no complete IHDR chunk")
    if not data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"):
        raise InputRefused(f"truncated PNG: {len(data)} bytes and no IEND chunk at the end")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    if not data.rstrip(b"\x00").endswith(JPEG_EOI):
        raise InputRefused(f"truncated JPEG: {len(data)} bytes and no end-of-image marker")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise InputRefused(f"corrupt JPEG: no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            break
        i += 2 + length
    raise InputRefused(f"corrupt JPEG: no frame header in {len(data)} bytes")


def compressed_to_rgb(msg: Any, max_pixels: int) -> np.ndarray:
    """Decode a JPEG or PNG ``CompressedImage`` into a contiguous ``uint8 [H, W, 3]`` RGB array.

    The format is recognised from the payload's magic bytes (``msg.format`` is free text in ROS);
    colour images decode to RGB, grey ones are replicated to three channels.
    """
    data = bytes(msg.data)
    if data.startswith(PNG_MAGIC):
        kind, (width, height) = "PNG", _png_size(data)
    elif data.startswith(JPEG_SOI):
        kind, (width, height) = "JPEG", _jpeg_size(data)
    else:
        raise InputRefused(
            f"unsupported compressed format {str(msg.format)!r}: the payload is neither JPEG nor PNG"
        )
    if width <= 0 or height <= 0:
        raise InputRefused(f"zero-size {kind} image ({height}x{width})")
    if width * height > max_pixels:
        raise InputRefused(f"image too large: {width}x{height} = {width * height} pixels > {max_pixels}")
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[:2] != (height, width):
        raise InputRefused(f"corrupt {kind} payload: OpenCV could not decode its {len(data)} bytes")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def rgb_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", stamp_ns: int = 0, frame_id: str = "") -> Any:
    """Encode ``uint8 [H, W, 3]`` RGB as a ``sensor_msgs/CompressedImage`` (``jpeg`` or ``png``)."""
    import cv2
    from sensor_msgs.msg import CompressedImage

    from kv_vla_node.conversions import as_uint8_array, ns_to_stamp

    if fmt not in ("jpeg", "png"):
        raise ValueError(f"unsupported format {fmt!r} (jpeg or png)")
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} frame as {fmt}")
    msg = CompressedImage(format=fmt)
    ns_to_stamp(stamp_ns, msg.header.stamp)
    msg.header.frame_id = frame_id
    msg.data = as_uint8_array(buf)
    return msg
