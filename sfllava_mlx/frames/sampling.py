"""Where the sampled positions fall (design.md §1.1, §2.1-§2.2): pure arithmetic on frame counts."""

from __future__ import annotations

import math
import re
from typing import Optional

from ..errors import UserError

SEEK_MODES = ("exact", "keyframe")
# design.md §2.4's times: seconds (75, 75.5) or [H:]M:SS[.f] (1:15, 01:15.5, 0:01:15).
_SECONDS = re.compile(r"(\d+(?:\.\d*)?|\.\d+)")
_CLOCK = re.compile(r"(?:(\d+):)?(\d+):([0-5]\d(?:\.\d*)?)")
TIME_FORMS = "seconds such as 75 or 75.5, or [H:]M:SS[.f] such as 1:15 or 0:01:15.5"


def sample_positions(n_frames: int, num_frames: int = 128, rule: str = "midpoint") -> list[int]:
    """design.md §1.1 / §2.1: the frame index each of the T positions takes.

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
    """D of design.md §2.2: the frame count over the average frame rate, the rate averaged over the
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


def parse_time(value, name: str = "--start") -> float:
    """Seconds from design.md §2.4's time text (or a number as it is); UserError naming `name`
    for text that is not a time and for a negative time."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise UserError(f"{name} must be a time, not {value!r}")
    elif isinstance(value, str):
        text = value.strip()
        negative = text.startswith("-")
        body = text[1:].strip() if negative else text
        if (m := _SECONDS.fullmatch(body)) is not None:
            seconds = float(m.group(1))
        elif (m := _CLOCK.fullmatch(body)) is not None and (m.group(1) is None
                                                            or int(m.group(2)) < 60):
            hours, minutes, secs = m.groups()
            seconds = int(hours or 0) * 3600 + int(minutes) * 60 + float(secs)
        else:
            raise UserError(f"{name} {value!r} is not a time ({TIME_FORMS})")
        seconds = -seconds if negative else seconds
    else:
        raise UserError(f"{name} must be a time ({TIME_FORMS}), not {value!r}")
    if seconds < 0:
        raise UserError(f"{name} must not be negative, not {value}")
    return seconds


def format_time(seconds: float) -> str:
    """A time as a person reads it (the form parse_time reads back): 75 -> 1:15, 0.5 -> 0:00.5,
    3725.25 -> 1:02:05.25."""
    whole = math.floor(seconds)
    fraction = f"{seconds - whole:.3f}"  # "0.250", or "1.000" where it rounds up
    if fraction.startswith("1"):
        whole, fraction = whole + 1, ""
    fraction = fraction[1:].rstrip("0").rstrip(".")  # "" or ".25"
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}") + fraction


def stream_names(num_frames: int, slow_every: int = 4) -> list[str]:
    return ["slow" if i % slow_every == 0 else "fast" for i in range(num_frames)]
