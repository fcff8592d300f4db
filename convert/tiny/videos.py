"""Test videos made on the fly, for the tests, the demo and the benchmarks.

- `write_video`: RGB frames to a file with OpenCV (FFV1 in .mkv: lossless, seek-exact).
- `pattern_frames` / `make_ffv1_video`: frames of big random colour blocks (seeded by the
  frame number), told apart from their neighbours by a mean difference of about 85 grey
  levels, far above any codec's error; written losslessly, decoded frames equal them.
- `moving_shapes`: a gradient with shapes crossing it, the demo's and `sfllava bench`'s clip.
- `make_ffmpeg_video`: Debian's ffmpeg, H.264 or HEVC, long GOP, B-frames, variable frame
  rate, rotation metadata: the files phones and cameras make.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np

BLOCK = 8  # pixels per colour block


def have_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None


def write_video(path, frames: Iterable[np.ndarray], fps: float = 10.0,
                codec: str = "FFV1") -> Path:
    """Write RGB frames (all of one size) with OpenCV's `codec` (a fourcc); return the path."""
    import cv2

    writer = None
    try:
        for frame in frames:
            if writer is None:
                height, width = frame.shape[:2]
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps,
                                         (width, height))
                if not writer.isOpened():
                    raise RuntimeError(f"OpenCV cannot write {codec} to {path}")
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # OpenCV writes BGR
    finally:
        if writer is not None:
            writer.release()
    return Path(path)


def pattern_frame(index: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB frame of big random colour blocks, distinct for every index."""
    rng = np.random.default_rng([seed, index])
    gh, gw = -(-height // BLOCK), -(-width // BLOCK)
    blocks = rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8)
    image = blocks.repeat(BLOCK, axis=0).repeat(BLOCK, axis=1)
    return np.ascontiguousarray(image[:height, :width])


def pattern_frames(n_frames: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    return [pattern_frame(i, width, height, seed) for i in range(n_frames)]


def make_ffv1_video(path, n_frames: int, width: int = 64, height: int = 48, fps: float = 10.0,
                    seed: int = 0) -> list[np.ndarray]:
    """Write an FFV1 .mkv of pattern frames (lossless) and return the RGB frames written."""
    frames = pattern_frames(n_frames, width, height, seed)
    write_video(path, frames, fps)
    return frames


def moving_shapes(n_frames: int, width: int = 640, height: int = 360):
    """RGB frames: a shifting gradient, a box crossing it one way and a ball the other."""
    import cv2

    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    for i in range(n_frames):
        frame = np.broadcast_to(ramp * np.array([0.2, 0.5, 1.0]) + i, (height, width, 3))
        frame = (frame % 256).astype(np.uint8).copy()
        x = int(i * 7) % max(width - 80, 1)
        cv2.rectangle(frame, (x, height // 3), (x + 80, height // 3 + 60), (255, 0, 0), -1)
        cv2.circle(frame, (width - x - 40, 2 * height // 3), 30, (0, 255, 0), -1)
        yield frame


def make_ffmpeg_video(path, n_frames: int, width: int = 64, height: int = 48, fps: float = 10.0,
                      codec: str = "h264", gop: int = 250, bframes: int = 0,
                      timestamps: list[float] | None = None, rotation: int = 0,
                      seed: int = 0, extra: tuple = ()) -> list[np.ndarray]:
    """Encode the pattern frames with ffmpeg and return them (before lossy encoding).

    codec: "h264" (libx264), "hevc" (libx265) or "ffv1" (lossless, all keyframes); gop:
    keyframe interval in frames;
    bframes: B-frames between references (reordered presentation, like phone video);
    timestamps: seconds per frame (whole milliseconds) for a variable-frame-rate file (else constant `fps`);
    rotation: display rotation metadata in degrees (what a portrait phone clip carries);
    the container follows the file name (.mp4, .mkv, .mov).
    """
    frames = pattern_frames(n_frames, width, height, seed)
    args = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
            "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
    if timestamps is not None:
        # Presentation times from an expression of the frame number N, kept as they are.
        assert len(timestamps) == n_frames
        expr = _lookup([round(t * 1000) for t in timestamps], 0, n_frames)
        args += ["-vf", f"settb=1/1000,setpts='{expr}'", "-fps_mode", "passthrough", "-enc_time_base", "1/1000"]
    if codec == "h264":
        preset = "veryfast" if bframes else "ultrafast"  # ultrafast turns B-frames off
        args += ["-c:v", "libx264", "-preset", preset, "-bf", str(bframes),
                 "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0"]
    elif codec == "ffv1":  # lossless, every frame a keyframe, slice checksums: corruption shows
        args += ["-c:v", "ffv1", "-level", "3", "-g", "1", "-slicecrc", "1"]
    elif codec == "hevc":
        params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:log-level=error"
        args += ["-c:v", "libx265", "-preset", "ultrafast", "-x265-params", params, "-tag:v", "hvc1"]
    else:
        raise ValueError(codec)
    args += ["-pix_fmt", "bgr0" if codec == "ffv1" else "yuv420p", *extra]
    path = Path(path)
    target = path.with_name("unrotated-" + path.name) if rotation else path
    data = b"".join(f.tobytes() for f in frames)
    subprocess.run([*args, str(target)], input=data, check=True, capture_output=True)
    if rotation:
        # ffmpeg 5.1 keeps the rotate tag only when copying the stream: a second, lossless step.
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(target), "-c", "copy",
                        "-metadata:s:v:0", f"rotate={rotation}", str(path)],
                       check=True, capture_output=True)
        target.unlink()
    return frames


def _lookup(values, lo, hi) -> str:
    """An ffmpeg expression of N worth values[N]: a balanced tree of if(), shallow enough for
    ffmpeg's expression parser (a flat sum of 100 terms is not)."""
    if hi - lo == 1:
        return str(values[lo])
    mid = (lo + hi) // 2
    return f"if(lt(N,{mid}),{_lookup(values, lo, mid)},{_lookup(values, mid, hi)})"


def make_audio_only(path, seconds: float = 1.0) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"sine=duration={seconds}",
                    "-c:a", "aac", str(path)], check=True, capture_output=True)
