"""A subtitle event and design.md §2.5's rule: the events the sampled frames select.

An event is kept when the timestamp t of some sampled frame satisfies start <= t < end
(Video-MME's rule, on the frames actually sampled); the kept events come in time order,
each once. Times are seconds on the video's clock (the frames' timestamps' clock).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    start: float  # seconds
    end: float
    text: str  # plain text on one line

    def record(self) -> dict:
        return {"start": round(self.start, 3), "end": round(self.end, 3), "text": self.text}


def one_line(text: str) -> str:
    """An event's lines joined by one space (blank lines dropped)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def plain_text(ass_text: str) -> str:
    """The plain text of an ASS event's text field: pysubs2 removes override tags such as
    `{\\i1}`, turns `\\N` into a line break and `\\h` into a space; then one line."""
    import pysubs2

    return one_line(pysubs2.SSAEvent(text=ass_text).plaintext)


def in_time_order(events) -> list[Event]:
    """Events with text, sorted by start then end (a stable sort: file order breaks ties)."""
    return sorted((e for e in events if e.text and e.end > e.start),
                  key=lambda e: (e.start, e.end))


def select(events: list[Event], timestamps) -> list[Event]:
    """The events (in time order) that some timestamp falls in: start <= t < end."""
    times = sorted(timestamps)
    kept = []
    for event in events:
        first = bisect.bisect_left(times, event.start)  # the first t >= start
        if first < len(times) and times[first] < event.end:
            kept.append(event)
    return kept
