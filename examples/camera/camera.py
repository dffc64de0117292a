"""A sensor process: frames into shared memory, detections back.

    python camera.py --make-model            # writes squares.onnx beside this file
    edged serve -c edged.toml &               # in another terminal
    python camera.py --frames 100             # a synthetic camera: bright squares moving

Each frame is written straight into a slot of a shared-memory ring (a sealed memfd registered
with the daemon once); the request carries only the slot's reference, so the 6 MB frame never
crosses the socket. The daemon resizes, normalises, runs the detector and suppresses
overlapping boxes in one onnxruntime session, and replies with boxes in the frame's pixels.
With OpenCV installed, ``--device 0`` reads a real camera instead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edged.client import Client
from edged.shm import FrameRing

HERE = Path(__file__).resolve().parent
HEIGHT, WIDTH = 1080, 1920
SQUARE = 270  # a bright square a quarter of the frame's height: one cell of the detector's grid


def synthetic_frames() -> Iterator[np.ndarray[Any, Any]]:
    """A dark, noisy scene with two bright squares moving along the detector's grid."""
    rng = np.random.default_rng(0)
    step = 0
    while True:
        frame = rng.integers(0, 40, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        for row, col in ((1, step % 4), (3, (step + 2) % 4)):
            top, left = row * SQUARE, col * (WIDTH // 4)
            frame[top : top + SQUARE, left : left + WIDTH // 4] = (60, 200, 250)  # BGR
        yield frame
        step += 1


def device_frames(device: int) -> Iterator[np.ndarray[Any, Any]]:
    import cv2  # only for a real camera

    capture = cv2.VideoCapture(device)
    capture.set(cv2.CAP_PROP_FRAME_WIDTH, WIDTH)
    capture.set(cv2.CAP_PROP_FRAME_HEIGHT, HEIGHT)
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield cv2.resize(frame, (WIDTH, HEIGHT)) if frame.shape[:2] != (HEIGHT, WIDTH) else frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default=f"ipc://{HERE / 'run' / 'infer.sock'}")
    parser.add_argument("--model", default="detector")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--device", type=int, help="an OpenCV camera index instead")
    parser.add_argument(
        "--make-model",
        nargs="?",
        const=str(HERE / "squares.onnx"),
        metavar="PATH",
        help="write the detector (default: squares.onnx here) and exit",
    )
    args = parser.parse_args()
    if args.make_model:
        from edged.demo import build_squares_detector

        print(build_squares_detector(Path(args.make_model)))
        return
    source = synthetic_frames() if args.device is None else device_frames(args.device)
    took: list[float] = []
    with Client(args.endpoint) as client, FrameRing(client, (HEIGHT, WIDTH, 3), np.uint8) as ring:
        for number, image in zip(range(args.frames), source, strict=False):
            slot = ring.next()
            slot[...] = image  # a camera driver would write here directly
            started = time.perf_counter()
            result = client.infer(args.model, {"frame": slot})
            took.append(time.perf_counter() - started)
            boxes = result["boxes"].round().astype(int).tolist()
            found = zip(boxes, result["scores"].tolist(), strict=True)
            listed = "  ".join(f"{box} {score:.2f}" for box, score in found)
            print(f"frame {number}: {len(boxes)} found  {listed}")
    print(f"round trip: median {statistics.median(took) * 1000:.2f} ms over {len(took)} frames")


if __name__ == "__main__":
    main()
