"""Where a video's subtitles came from and what they say (`SubtitleTrack`), and the lines
its sampled frames select (`SubtitleLines`): what the prompt, the records, the chat header
and `sfllava frames` show."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ..prompt import subtitle_block
from .events import Event, select


@dataclass
class SubtitleTrack:
    source: str  # embedded, sidecar, file or speech
    events: Optional[list] = None  # Event, in time order; None: speech not transcribed yet
    path: Optional[str] = None  # sidecar, file
    stream: Optional[int] = None  # embedded: the stream's index in the container
    codec: Optional[str] = None  # embedded: "subrip", "ass", "webvtt", "mov_text", ...
    language: Optional[str] = None  # embedded: its tag; speech: the language detected
    model: Optional[str] = None  # speech: the Whisper model as named

    def with_events(self, events: list, **changes) -> SubtitleTrack:
        return replace(self, events=list(events), **changes)

    def identity(self) -> dict:
        """Where they came from, as the JSON records say it."""
        out: dict = {"source": self.source}
        if self.source in ("sidecar", "file"):
            out["path"] = self.path
        elif self.source == "embedded":
            out.update(stream=self.stream, codec=self.codec, language=self.language)
        else:
            out.update(model=self.model, language=self.language)
        return out

    def read_from(self) -> str:
        """Where they were read, as a record's `options.subtitles` says it: the file's path,
        "stream N" (the container's stream index) or "speech"."""
        if self.source in ("sidecar", "file"):
            return self.path
        return f"stream {self.stream}" if self.source == "embedded" else "speech"

    def describe(self) -> str:
        """One line for people: "sidecar clip.en.srt", "embedded stream 2 (subrip, eng)"."""
        if self.source in ("sidecar", "file"):
            return f"{self.source} {Path(self.path).name}"
        if self.source == "embedded":
            tags = ", ".join(t for t in (self.codec, self.language) if t)
            return f"embedded stream {self.stream} ({tags})"
        tags = ", ".join(t for t in (Path(self.model).name, self.language) if t)
        return f"speech ({tags})"

    def select(self, timestamps) -> SubtitleLines:
        return SubtitleLines(self, select(self.events or [], timestamps))


@dataclass
class SubtitleLines:
    """The events of a track the sampled frames select, in time order."""

    track: SubtitleTrack
    lines: list = field(default_factory=list)  # Event

    @property
    def total(self) -> int:
        return len(self.track.events or [])

    def prompt(self) -> str:
        """The subtitle block of the first question ("" when no line is kept)."""
        return subtitle_block(e.text for e in self.lines)

    def record(self) -> dict:
        """`generate --json`'s `subtitles`: where they came from and how many lines."""
        return {**self.track.identity(), "lines": len(self.lines)}

    def listing(self) -> dict:
        """`frames --json`'s `subtitles`: the lines themselves."""
        return {**self.track.identity(), "lines": [e.record() for e in self.lines]}

    def summary(self) -> str:
        return (f"{self.track.describe()} · {len(self.lines)} of {self.total} lines selected "
                "by the frames")


__all__ = ["Event", "SubtitleLines", "SubtitleTrack"]
