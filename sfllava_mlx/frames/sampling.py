"""Where the sampled positions fall (SPEC §2.1, §2.9-2.10): pure arithmetic on frame counts."""

from __future__ import annotations

import math
from typing import Optional

SEEK_MODES = ("exact", "keyframe")


def sample_positions(n_frames: int, num_frames: int = 128, rule: str = "midpoint") -> list[int]:
    """SPEC §2.1 / §2.9: the frame index each of the T positions takes.

    midpoint: floor((i + 0.5) * N / T), in integers. linspace: numpy.linspace(0, N-1, T)
    truncated to int, as lmms-eval samples (0 when T = 1).
    """
    if n_frames < 1 or num_frames < 1:
        raise ValueError("need at least one frame and one position")
    if rule == "linspace":
        import numpy as np  # only here: `sfllava frames --json` stays clear of numpy's import

        return [int(i) for i in np.linspace(0, n_frames - 1, num_frames).astype(int)]
    if rule != "midpoint":
        raise ValueError(f"unknown frame_positions rule {rule!r}")
    return [(2 * i + 1) * n_frames // (2 * num_frames) for i in range(num_frames)]


def video_duration(n_frames: int, average_rate: float) -> float:
    """D of SPEC §2.10: the frame count over the average frame rate, the rate averaged over the
    frames' own timestamps (a container's nominal rate can lie: an mkv keeps its writer's)."""
    return n_frames / average_rate if average_rate else 0.0


def frames_for_rate(num_frames: int, n_frames: int, average_rate: float,
                    fps: Optional[float]) -> int:
    """T under `--fps F` (Apollo's fps sampling): min(T, max(1, ceil(D * F)))."""
    if fps is None:
        return num_frames
    if not fps > 0:
        raise ValueError(f"--fps must be positive, not {fps}")
    duration = video_duration(n_frames, average_rate)
    if not duration:  # no frame rate to go by: every frame counts as one second apart
        duration = float(n_frames)
    return min(num_frames, max(1, math.ceil(duration * fps)))


def stream_names(num_frames: int, slow_every: int = 4) -> list[str]:
    return ["slow" if i % slow_every == 0 else "fast" for i in range(num_frames)]
