"""Test videos made on the fly, with frames that differ loudly from one another.

Every frame is a grid of big blocks of random colours (seeded by the frame number), so
a frame is told apart from its neighbours by a mean difference of about 85 grey levels,
far above any codec's error. `identify(image, frames)` names the frame an image shows.

- `make_ffv1_video`: OpenCV's FFV1 writer, lossless: decoded frames equal the written ones.
- `make_ffmpeg_video`: Debian's ffmpeg, H.264 or HEVC, long GOP, B-frames, variable frame
  rate, rotation metadata: the files phones and cameras make. Lossy, so compare with
  `identify` or with a full decode of the file (`decode_all`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

BLOCK = 8  # pixels per colour block


def have_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None


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
    """Write an FFV1 .mkv with OpenCV (lossless) and return the RGB frames written."""
    import cv2

    frames = pattern_frames(n_frames, width, height, seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write FFV1 to {path}")
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # OpenCV writes BGR
    writer.release()
    return frames


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


def make_audio_only(path, seconds: float = 1.0) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"sine=duration={seconds}",
                    "-c:a", "aac", str(path)], check=True, capture_output=True)


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
