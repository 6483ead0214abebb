"""``kv-vla bench frames``: which camera frames reach the VLA node over DDS, and get answered.

Per image QoS reliability, one node process (the real runtime on a tiny random model: delivery is
the question, not skill) and a camera publisher in this process with the same QoS, as a camera
driver would use. Each size is streamed at ``--hz`` for ``--frames`` frames; "delivered" is the
node's own ``frames_received`` counter, "answered" the actions carrying one of the sent stamps.
With ``--oversize-mb`` one frame of that size is sent (refused by ``max_image_pixels``) and the
node's resident memory is read before and after, with and without the Fast DDS profile
``config/fastdds_kv_vla.xml``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = ((64, 64), (640, 480), (1280, 720), (1920, 1080))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kv-vla bench frames``."""
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--hz", type=float, default=30.0)
    parser.add_argument("--frames", type=int, default=60, help="frames per size")
    parser.add_argument("--reliabilities", default="best_effort,reliable")
    parser.add_argument(
        "--depth", type=int, default=5, help="keep-last depth of camera and node (image_depth)"
    )
    parser.add_argument("--oversize-mb", type=float, default=96.0, help="0: skip the memory check")
    parser.add_argument("--log-dir", default="outputs/bench_frames_logs")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start(
    tmp: Path, log_dir: Path, reliability: str, extra_env: dict[str, str] | None = None, depth: int = 1
) -> tuple[Any, Any]:
    from kv_vla_node.testing import (
        NodeProcess,
        RosClient,
        free_domain_id,
        node_command,
        ros_env,
        save_random_model,
    )

    model = tmp / "tiny-vla"
    if not model.exists():
        save_random_model(model)
    domain = free_domain_id()
    params = {
        "model_path": str(model),
        "image_reliability": reliability,
        "image_depth": depth,
        "max_image_age_s": 30.0,
        "max_image_pixels": 1920 * 1080,
    }
    proc = NodeProcess(
        node_command("kv_vla_node.vla_node", params),
        ros_env(log_dir / "ros", domain, extra_env),
        log_dir / f"node_{reliability}{'_xml' if extra_env else ''}.log",
    )
    client = RosClient(domain, node_name="kv_vla_bench_camera")
    client.publish_instruction("reach the red cube")
    if not client.wait_diag(lambda d: d.get("episode") == "1", 180):
        raise RuntimeError(f"node did not start:\n{proc.log_text()[-2000:]}")
    return proc, client


def _camera(client: Any, reliability: str, depth: int = 1, compressed: bool = False) -> Any:
    from sensor_msgs.msg import CompressedImage, Image

    from kv_vla_node.interface import COMPRESSED_TOPIC, IMAGE_TOPIC, image_qos

    kind, topic = (CompressedImage, COMPRESSED_TOPIC) if compressed else (Image, IMAGE_TOPIC)
    pub = client.node.create_publisher(kind, topic, image_qos(reliability, depth))
    deadline = time.monotonic() + 10
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return pub


def _scene(h: int, w: int) -> np.ndarray:
    """A camera-like frame (gradients, a block, mild noise): compresses as real images do."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=2).astype(np.int16)
    rgb[h // 4 : h // 2, w // 4 : w // 2] = (200, 30, 40)
    rgb += np.random.default_rng(0).integers(-6, 7, rgb.shape, dtype=np.int16)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _stream(
    client: Any, pub: Any, size: tuple[int, int], hz: float, n: int, fmt: str = "rgb8"
) -> dict[str, Any]:
    """Stream ``n`` frames at ``hz`` (rgb8 Images, or one JPEG re-stamped per frame)."""
    from kv_vla_node.compressed import rgb_to_compressed
    from kv_vla_node.conversions import ns_to_stamp, rgb_to_image

    w, h = size
    rgb = _scene(h, w)
    msg = rgb_to_compressed(rgb, "jpeg") if fmt == "jpeg" else rgb_to_image(rgb, "rgb8", 0, "bench_camera")
    before = int(client.last_diag().get("frames_received", 0))
    stamps = set()
    t0 = time.monotonic()
    for i in range(n):
        stamp = client.now_ns()
        stamps.add(stamp)
        ns_to_stamp(stamp, msg.header.stamp)
        pub.publish(msg)
        time.sleep(max(0.0, t0 + (i + 1) / hz - time.monotonic()))
    time.sleep(2.5)  # the last frames' steps and the 1 Hz diagnostics after them
    delivered = int(client.last_diag().get("frames_received", 0)) - before
    answered = sum(1 for a in list(client.actions) if a[1] in stamps)
    return {
        "width": w,
        "height": h,
        "format": fmt,
        "mib": round(len(msg.data) / 2**20, 2),
        "sent": n,
        "delivered": delivered,
        "answered": answered,
    }


def _oversize(args: argparse.Namespace, tmp: Path, log_dir: Path, with_xml: bool) -> dict[str, Any]:
    from kv_vla_node.testing import REPO_ROOT

    env = (
        {
            "FASTDDS_DEFAULT_PROFILES_FILE": str(REPO_ROOT / "config" / "fastdds_kv_vla.xml"),
            "RMW_FASTRTPS_USE_QOS_FROM_XML": "1",
        }
        if with_xml
        else None
    )
    proc, client = _start(tmp, log_dir, "reliable", env)
    try:
        pub = _camera(client, "reliable")
        time.sleep(2.0)
        rss0 = _rss_mib(proc.proc.pid)
        side = int((args.oversize_mb * 2**20 / 3) ** 0.5)
        before = int(client.last_diag().get("refused_frames", 0))
        from kv_vla_node.conversions import rgb_to_image

        pub.publish(rgb_to_image(np.zeros((side, side, 3), np.uint8), "rgb8", client.now_ns()))
        refused = client.wait_diag(lambda d: int(d.get("refused_frames", 0)) > before, 60)
        time.sleep(3.0)
        rss1 = _rss_mib(proc.proc.pid)
        return {
            "profile": "config/fastdds_kv_vla.xml" if with_xml else "rmw default",
            "frame_mib": round(side * side * 3 / 2**20, 1),
            "refused": bool(refused),
            "reason": refused.get("last_refusal", ""),
            "rss_before_mib": round(rss0, 1),
            "rss_after_mib": round(rss1, 1),
            "rss_kept_mib": round(rss1 - rss0, 1),
        }
    finally:
        client.close()
        proc.stop()


def format_tables(report: dict[str, Any]) -> str:
    """Markdown: sizes x reliability (delivered / answered of sent), then the memory rows."""
    lines = [
        "| frame | MiB sent | QoS | sent | delivered | answered |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["sizes"]:
        lines.append(
            f"| {r['width']}x{r['height']} {r['format']} | {r['mib']} | {r['reliability']} | {r['sent']} | {r['delivered']} | {r['answered']} |"
        )
    if report.get("oversize"):
        lines += [
            "",
            "| profile | frame MiB | refused | RSS before | RSS after | kept |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in report["oversize"]:
            lines.append(
                f"| {r['profile']} | {r['frame_mib']} | {r['refused']} | {r['rss_before_mib']} | {r['rss_after_mib']} | {r['rss_kept_mib']} |"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from kv_vla.atomic import atomic_write_json
    from kv_vla_node.demo import _interrupt_on_stop_signals

    _interrupt_on_stop_signals()
    tmp = Path(tempfile.mkdtemp(prefix="kv_vla_bench_frames_"))
    log_dir = Path(args.log_dir)
    report: dict[str, Any] = {
        "config": {k: str(v) for k, v in vars(args).items() if not k.startswith("_")},
        "sizes": [],
    }
    for reliability in [r.strip() for r in args.reliabilities.split(",") if r.strip()]:
        proc, client = _start(tmp, log_dir, reliability, depth=args.depth)
        try:
            pub = _camera(client, reliability, args.depth)
            rows = [_stream(client, pub, size, args.hz, args.frames) for size in SIZES]
            jpeg = _camera(client, reliability, args.depth, compressed=True)
            rows += [_stream(client, jpeg, size, args.hz, args.frames, "jpeg") for size in SIZES[2:]]
            for row in rows:
                print(row, flush=True)
                report["sizes"].append({"reliability": reliability, "depth": args.depth, **row})
        finally:
            client.close()
            proc.stop()
    if args.oversize_mb > 0:
        report["oversize"] = [_oversize(args, tmp, log_dir, with_xml) for with_xml in (False, True)]
        print(report["oversize"], flush=True)
    atomic_write_json(args.json, report)
    print(format_tables(report))
    return 0
