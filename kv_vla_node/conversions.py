"""Pure conversions between ROS 2 messages and numpy arrays (no node, no DDS).

Everything a subscription receives is untrusted: ``image_to_rgb`` and ``validate_instruction`` refuse
malformed input by raising ``InputRefused`` with a human-readable reason instead of letting numpy
raise something obscure deep inside the inference step. The node logs the reason, counts it in its
diagnostics and keeps going.

The ``action`` topic carries a ``std_msgs/Float32MultiArray``. Its layout is labelled so that a
consumer needs no out-of-band knowledge (see ``action_to_array_msg``)::

    layout.dim[0] = {label: "action",                         size: 4, stride: 4}
    layout.dim[1] = {label: "fields:dx,dy,dz,gripper",        size: 1, stride: 1}
    layout.dim[2] = {label: "stamp:<sec>.<nanosec, 9 digits>", size: 1, stride: 1}
    data          = [dx, dy, dz, gripper]

The two trailing size-1 dimensions leave the array's shape at 4 elements while carrying the field
names and the header stamp of the camera frame the action answers, so the action can be traced to its
frame (the sim bridge uses this to pair each action with the frame it sent). ``action_twist`` carries
the same action as a ``geometry_msgs/TwistStamped`` whose header is the frame's header.
"""

from __future__ import annotations

import array
import struct
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

# encoding -> (channels, indices of R, G, B within a pixel)
ENCODINGS: dict[str, tuple[int, tuple[int, int, int]]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, (0, 0, 0)),
}
ACTION_FIELDS: tuple[str, ...] = ("dx", "dy", "dz", "gripper")
ACTION_LABEL = "action"
FIELDS_PREFIX = "fields:"
STAMP_PREFIX = "stamp:"


class InputRefused(ValueError):
    """Raised for a message the node will not act on; ``str(exc)`` is the reason that gets logged."""


def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds (0 means "no stamp")."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int, stamp: Any | None = None) -> Any:
    """Integer nanoseconds -> ``builtin_interfaces/Time`` (filled in place when ``stamp`` is given)."""
    if stamp is None:
        from builtin_interfaces.msg import Time

        stamp = Time()
    stamp.sec = int(ns // 1_000_000_000)
    stamp.nanosec = int(ns % 1_000_000_000)
    return stamp


def check_image(msg: Any, max_pixels: int) -> None:
    """Refuse (``InputRefused``) an ``Image`` ``image_to_rgb`` could not decode, from its header and
    data length alone (no copy): an unknown encoding, a zero-size image, more than ``max_pixels``
    pixels, a ``step`` too small for one row, ``data`` shorter than ``height x step``."""
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise InputRefused(
            f"unsupported image encoding {encoding!r} (accepted: {', '.join(sorted(ENCODINGS))})"
        )
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise InputRefused(f"zero-size image ({height}x{width})")
    if height * width > max_pixels:
        raise InputRefused(f"image too large: {width}x{height} = {width * height} pixels > {max_pixels}")
    row_bytes = width * ENCODINGS[encoding][0]
    if step < row_bytes:
        raise InputRefused(f"step {step} is smaller than width x channels = {row_bytes} for {encoding}")
    if len(msg.data) < height * step:
        raise InputRefused(
            f"image data has {len(msg.data)} bytes, shorter than height x step = {height * step}"
        )


def image_to_rgb(msg: Any, max_pixels: int) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` into a contiguous ``uint8 [H, W, 3]`` RGB array.

    Accepts rgb8, bgr8, rgba8, bgra8 and mono8 with any row padding (``step`` >= width x channels);
    refuses what ``check_image`` refuses. The checks come before any allocation so a hostile header
    cannot make the node allocate a huge buffer.
    """
    check_image(msg, max_pixels)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    channels, rgb_index = ENCODINGS[str(msg.encoding)]
    row_bytes = width * channels
    data = msg.data
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8, count=height * step)
    pixels = buf.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    if channels == 3 and rgb_index == (0, 1, 2):
        return np.array(pixels)  # rgb8: one copy, no fancy indexing
    return np.ascontiguousarray(pixels[:, :, list(rgb_index)])


def rgb_to_image(
    rgb: np.ndarray,
    encoding: str = "rgb8",
    stamp_ns: int = 0,
    frame_id: str = "",
    pad_bytes: int = 0,
) -> Any:
    """Encode ``uint8 [H, W, 3]`` RGB as a ``sensor_msgs/Image`` in ``encoding``.

    ``pad_bytes`` adds that many bytes of row padding (``step`` > width x channels), which some
    camera drivers produce; mono8 uses ITU-R BT.601 luma.
    """
    from sensor_msgs.msg import Image

    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported encoding {encoding!r}")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    if encoding == "mono8":
        luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        pixels = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, :, None]
    else:
        channels, rgb_index = ENCODINGS[encoding]
        pixels = np.empty((height, width, channels), dtype=np.uint8)
        pixels[:, :, list(rgb_index)] = rgb
        if channels == 4:
            pixels[:, :, 3] = 255
    rows = pixels.reshape(height, -1)
    if pad_bytes:
        rows = np.concatenate([rows, np.zeros((height, pad_bytes), dtype=np.uint8)], axis=1)
    msg = Image()
    ns_to_stamp(stamp_ns, msg.header.stamp)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(height), int(width)
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(rows.shape[1])
    msg.data = as_uint8_array(rows)
    return msg


def as_uint8_array(pixels: np.ndarray) -> array.array:
    """Bytes for a ``uint8[]`` message field as ``array.array('B')``: the generated setter accepts
    that as is, but checks ``bytes`` element by element in Python (about 0.3 s for a 1280x720 frame)."""
    out = array.array("B")
    out.frombytes(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return out


def validate_instruction(text: str, max_chars: int) -> str:
    """Return the stripped instruction, or refuse it (``InputRefused``) when it is empty, over-long,
    carries a NUL (which C layers would silently cut at) or has no printable word (only control,
    format or zero-width characters)."""
    if len(text) > max_chars:
        raise InputRefused(f"instruction too long: {len(text)} characters > {max_chars}")
    if "\x00" in text:
        raise InputRefused(f"instruction contains a NUL character at index {text.index(chr(0))}")
    stripped = text.strip()
    if not stripped:
        raise InputRefused("empty instruction")
    if not any(ch.isalnum() for ch in stripped if unicodedata.category(ch)[0] != "C"):
        raise InputRefused(
            "instruction has no printable word (only control, format or zero-width characters)"
        )
    return stripped


def string_from_cdr(raw: bytes) -> str:
    """The ``data`` of a serialized ``std_msgs/String``, embedded NULs kept.

    rclpy's own conversion stops at the first NUL, so ``"stop\\0 and go"`` would arrive as ``"stop"``;
    reading the CDR (4-byte encapsulation header, uint32 length including the terminating NUL,
    the bytes) lets ``validate_instruction`` refuse it instead.
    """
    if len(raw) < 8 or raw[0] != 0 or raw[1] not in (0, 1):
        raise InputRefused(f"malformed instruction message ({len(raw)} bytes)")
    (length,) = struct.unpack("<I" if raw[1] == 1 else ">I", raw[4:8])
    if length == 0 or 8 + length > len(raw):
        raise InputRefused(f"malformed instruction message: string length {length} in {len(raw)} bytes")
    try:
        return raw[8 : 8 + length - 1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputRefused(f"instruction is not valid UTF-8: {exc}") from None


def check_stamp(stamp_ns: int, now_ns: int, max_future_s: float) -> None:
    """Refuse (``InputRefused``) a frame stamped more than ``max_future_s`` after the node clock."""
    ahead_s = (stamp_ns - now_ns) / 1e9
    if ahead_s > max_future_s:
        raise InputRefused(
            f"frame stamped {ahead_s:.3f} s in the future (> max_future_stamp_s={max_future_s}); "
            "check the camera's clock"
        )


def action_to_array_msg(action: np.ndarray, stamp_ns: int) -> Any:
    """Action -> labelled ``std_msgs/Float32MultiArray`` (layout documented in the module docstring)."""
    from std_msgs.msg import Float32MultiArray, MultiArrayDimension

    values = np.asarray(action, dtype=np.float32).reshape(-1)
    msg = Float32MultiArray()
    msg.layout.dim = [
        MultiArrayDimension(label=ACTION_LABEL, size=int(values.size), stride=int(values.size)),
        MultiArrayDimension(label=FIELDS_PREFIX + ",".join(ACTION_FIELDS[: values.size]), size=1, stride=1),
        MultiArrayDimension(
            label=f"{STAMP_PREFIX}{stamp_ns // 1_000_000_000}.{stamp_ns % 1_000_000_000:09d}",
            size=1,
            stride=1,
        ),
    ]
    msg.layout.data_offset = 0
    msg.data = values.tolist()
    return msg


def array_msg_to_action(msg: Any) -> tuple[np.ndarray, int | None]:
    """Labelled ``Float32MultiArray`` -> (action float32 [N], answered frame stamp in ns or None)."""
    stamp_ns: int | None = None
    for dim in msg.layout.dim:
        if dim.label.startswith(STAMP_PREFIX):
            sec, _, nsec = dim.label[len(STAMP_PREFIX) :].partition(".")
            try:
                stamp_ns = int(sec) * 1_000_000_000 + int(nsec or 0)
            except ValueError:
                stamp_ns = None
    return np.asarray(msg.data, dtype=np.float32), stamp_ns


def action_to_twist(action: np.ndarray, header: Any, scale: float) -> Any:
    """Action -> ``geometry_msgs/TwistStamped`` answering the frame whose ``header`` is given.

    ``twist.linear`` = (dx, dy, dz) x ``scale`` (end-effector velocity command, m/s per unit action at
    the control rate); ``twist.angular.x`` = the gripper command in [-1, 1] (> 0 closes), and
    ``angular.y``/``angular.z`` are 0: the policy commands no end-effector rotation.
    """
    from geometry_msgs.msg import TwistStamped

    values = np.asarray(action, dtype=np.float64).reshape(-1)
    msg = TwistStamped()
    msg.header.stamp = header.stamp
    msg.header.frame_id = header.frame_id
    msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(v * scale) for v in values[:3])
    msg.twist.angular.x = float(values[3]) if values.size > 3 else 0.0
    return msg


def clip_action(action: Sequence[float] | np.ndarray, limit: float) -> np.ndarray:
    """Clip every component to [-limit, limit] (the node's last safety net before publishing)."""
    return np.clip(np.asarray(action, dtype=np.float32), -limit, limit)
