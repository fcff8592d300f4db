"""Readers for the test videos that sfllava_convert.tiny.videos writes: references to compare
the library's frames with.

- `decode_all`: OpenCV's plain sequential read of every frame;
- `identify(image, frames)`: names the frame an image shows (for lossy files);
- `ffprobe_frames`: presentation times and keyframes, by ffprobe;
- `corrupt_frames`: damages given frames in place.
"""

from __future__ import annotations

import subprocess

import numpy as np


def decode_all(path) -> list[np.ndarray]:
    """Every frame of the file, in order, by OpenCV's plain sequential read (the reference).

    RGB, upright: OpenCV 5 applies rotation metadata by default (CAP_PROP_ORIENTATION_AUTO).
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def identify(image: np.ndarray, frames: list[np.ndarray]) -> tuple[int, float]:
    """(index of the frame `image` is closest to, its mean absolute difference)."""
    diffs = [np.abs(image.astype(np.int16) - f).mean() if f.shape == image.shape else np.inf
             for f in frames]
    best = int(np.argmin(diffs))
    return best, float(diffs[best])


def ffprobe_frames(path) -> list[tuple[float, bool]]:
    """(presentation time in seconds, is keyframe) of every decoded frame, by ffprobe."""
    import json

    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "frame=pts_time,key_frame", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return [(float(f["pts_time"]), bool(f["key_frame"])) for f in json.loads(out)["frames"]]


def corrupt_frames(path, indices) -> None:
    """Overwrite most of the coded data of the given frames (presentation order) in place."""
    import av

    with av.open(str(path)) as c:
        packets = [(p.pts, p.pos, p.size) for p in c.demux(video=0) if p.size]
    packets.sort()
    with open(path, "r+b") as f:
        for i in indices:
            _, pos, size = packets[i]
            f.seek(pos + size // 4)
            f.write(b"\xff" * (size - size // 4))
