"""How the commands write numbers (clocks, byte sizes, counts) and notes: every command's
"note: ..." and "warning: ..." lines come from `note` and `warn`, what a clip has to say
from `clip_notes`."""

from __future__ import annotations

import sys


def clock(seconds: float, digits: int = 2) -> str:
    """1:02:03.45 / 2:03.45 style timestamps, `digits` decimals of the seconds."""
    seconds = max(float(seconds or 0.0), 0.0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    sec = f"{s:0{3 + digits}.{digits}f}"
    return f"{int(h)}:{int(m):02d}:{sec}" if h else f"{int(m)}:{sec}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def count(n: int, what: str) -> str:
    """'1 video', '3 videos'."""
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def note(text: str, stream=None) -> None:
    """One line for the user, on stderr unless `stream`: what was approximated or ignored."""
    print(f"note: {text}", file=stream or sys.stderr)


def warn(warnings, stream=None) -> None:
    """A line each for what went wrong but did not stop the command (a broken sidecar)."""
    for w in warnings:
        print(f"warning: {w}", file=stream or sys.stderr)


def clip_notes(clip) -> list[str]:
    """What the user should know of a clip's frames (frames.SampledFrames): approximate
    sampling, frames replaced, a damaged file."""
    notes = []
    if not clip.exact:
        notes.append("approximate sampling (--seek keyframe): each position shows the keyframe "
                     "at or before it")
    if clip.replaced:
        pairs = ", ".join(f"{a}->{b}" for a, b in clip.replaced)
        notes.append(f"frames that failed to decode were replaced by their nearest neighbour: "
                     f"{pairs}")
    return notes + list(clip.info.notes)
