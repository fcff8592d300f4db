"""A benchmark's question as eval asks and scores it, whatever format it came in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Question:
    question_id: str
    videos: list  # the video's possible names under --videos, the benchmark's own first
    choices: list  # the options as the benchmark lists them (a line's `choices`)
    answer: str  # the right option's letter
    groups: dict  # the benchmark's grouping fields, by their names in it
    plain: str  # the prompt
    subtitled: str = ""  # the prompt when subtitle lines are kept ("": the same as plain)
    subtitle_file: str = ""  # the benchmark's own subtitle file, in --subtitle-dir

    def prompt(self, subtitles: bool) -> str:
        return self.subtitled if subtitles and self.subtitled else self.plain
