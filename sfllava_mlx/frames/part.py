"""A part of a video (design.md §2.4): only the frames whose timestamps t satisfy
start <= t < end count. N is their number and every sampling rule runs over them alone;
indices and timestamps stay the video's own.

    part = Part.of("45:00", "47:00")     # None for the whole video; UserError for bad text
    span = locate(index, part)           # the frames [first, stop) of the index, refused
                                         # (UserError) when the part holds none

Both work on the index (every frame's timestamp), so a part is checked before any frame
is decoded, and the decoder seeks straight into it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError
from .sampling import format_time, parse_time


@dataclass(frozen=True)
class Part:
    start: Optional[float] = None  # seconds, in the video's time; None: from its start
    end: Optional[float] = None  # None: to its end

    @classmethod
    def of(cls, start=None, end=None, names=("--start", "--end")) -> Optional[Part]:
        """The part from times as numbers or text (design.md §2.4), or None when neither end is
        given. Refuses (UserError naming the option) text that is not a time, a negative
        time, and a start at or after the end."""
        if start is None and end is None:
            return None
        start = None if start is None else parse_time(start, names[0])
        end = None if end is None else parse_time(end, names[1])
        if start is not None and end is not None and start >= end:
            raise UserError(f"{names[0]} {format_time(start)} is not before {names[1]} "
                            f"{format_time(end)}: the part would hold no time")
        return cls(start, end)

    def label(self) -> str:
        """45:00-47:00, 45:00- or -47:00 (the form /part takes)."""
        return "-".join("" if t is None else format_time(t) for t in (self.start, self.end))

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end}


@dataclass(frozen=True)
class Span:
    """The frames of a part: presentation indices [first, stop) of the video."""

    first: int
    stop: int
    rate: float  # their average frame rate, over their own timestamps

    @property
    def count(self) -> int:
        return self.stop - self.first


def locate(index, part: Part) -> Span:
    """The part's frames in `index` (frames/index.py's: ascending timestamps); UserError,
    naming the part, when it starts at or past the video's end or holds no frame."""
    n = index.n
    last = index.timestamp(n - 1)
    video_end = last + (1 / index.fps if index.fps else 0.0)
    if part.start is not None and part.start >= video_end:
        raise UserError(f"the part {part.label()} starts at or past the end of the video "
                        f"({format_time(video_end)})")
    first = 0 if part.start is None else _first_at_or_after(index, part.start)
    stop = n if part.end is None else _first_at_or_after(index, part.end)
    if stop <= first:
        raise UserError(f"the part {part.label()} holds no frame of the video (frames at "
                        f"{_around(index, first)})")
    span = index.timestamp(stop - 1) - index.timestamp(first)
    count = stop - first
    rate = (count - 1) / span if count > 1 and span > 0 else index.fps
    return Span(first, stop, rate)


def _first_at_or_after(index, t: float) -> int:
    """The first frame whose timestamp is at or after t (n when none is)."""
    return bisect.bisect_left(range(index.n), t, key=index.timestamp)


def _around(index, i: int) -> str:
    """The timestamps of the frames either side of position i, for a message."""
    near = [j for j in (i - 1, i) if 0 <= j < index.n]
    return " and ".join(f"{index.timestamp(j):.3f} s" for j in near)
