"""`make demo`: the whole job on a built-in tiny model and a generated video.

Builds a tiny SF-LLaVA-1.5-shaped checkpoint with random weights, converts it with the
real converter, writes a short video, asks a question and prints the answer with the
stage timings. The tiny model is untrained: its answer is noise, by design.
"""

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from sfllava_convert.tiny import write_source_checkpoint

from .cli import main as sfllava

DEMO_DIR = Path("demo")
QUESTION = "What is moving in this video?"


def write_video(path: Path, seconds: float = 6.0, fps: int = 25, size=(320, 240)) -> Path:
    """A ball crossing a changing background; FFV1 in .mkv is lossless and seek-exact."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, size)
    if not writer.isOpened():
        raise SystemExit(f"cannot write {path}: OpenCV has no FFV1 encoder")
    w, h = size
    n = int(seconds * fps)
    for t in range(n):
        frame = np.full((h, w, 3), (40 + 150 * t // n, 60, 200 - 150 * t // n), np.uint8)
        x = int(20 + (w - 40) * t / max(n - 1, 1))
        cv2.circle(frame, (x, h // 2), 18, (0, 220, 255), -1)
        writer.write(frame)
    writer.release()
    return path


def main() -> int:
    DEMO_DIR.mkdir(exist_ok=True)
    source, model = DEMO_DIR / "tiny-source", DEMO_DIR / "tiny-mlx"
    shutil.rmtree(source, ignore_errors=True)
    print("1. a tiny SF-LLaVA-1.5-shaped checkpoint with random weights ->", source)
    write_source_checkpoint(source, layout="oryx-vit", image_size=64, patch_size=8, seed=3)
    print("2. sfllava convert ->", model)
    status = sfllava(["convert", "--hf-path", str(source), "--mlx-path", str(model), "--force"])
    if status:
        return status
    video = write_video(DEMO_DIR / "ball.mkv")
    print(f"3. sfllava generate on {video}: {QUESTION!r}")
    print("   (the tiny model is untrained: its answer is noise; see README for a real model)")
    return sfllava(["generate", "--model", str(model), "--video", str(video),
                    "--prompt", QUESTION, "--max-tokens", "24"])


if __name__ == "__main__":
    sys.exit(main())
