"""What the commands show of a video's subtitles (design.md §2.5): where they came from, the
lines the sampled frames selected, the warnings, and a progress bar while speech is
transcribed on a terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from .fmt import clock

SPEECH_LABEL = "transcribing speech"


def summary(lines) -> str:
    """One line: "subtitles: sidecar clip.srt · 3 of 40 lines selected by the frames"."""
    return "subtitles: " + (lines.summary() if lines is not None else "none")


def listing_table(lines):
    """A rich table of the selected lines (start, end, text)."""
    from rich.table import Table

    table = Table(show_lines=False)
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    table.add_column("text", overflow="fold")
    for e in lines.lines:
        table.add_row(clock(e.start), clock(e.end), e.text)
    return table


def plain_listing(lines) -> str:
    """The selected lines as text, one a line: "0:01.00-0:02.50  Hello world"."""
    return "\n".join(f"{clock(e.start)}-{clock(e.end)}  {e.text}" for e in lines.lines)


@contextmanager
def speech_progress(stream=None):
    """A `progress(stage, done, total)` callback that draws a bar on `stream` (stderr) while
    speech is transcribed, where it is a terminal; None elsewhere (a pipe stays clean)."""
    stream = stream or sys.stderr
    if not stream.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed:.0f}/{task.total:.0f} s of audio"),
                   TimeElapsedColumn(), TimeRemainingColumn(),
                   console=Console(file=stream), transient=True)
    task = None

    def update(stage: str, done: int, total: int) -> None:
        nonlocal task
        if stage != "speech":
            return
        if task is None:
            bar.start()
            task = bar.add_task(SPEECH_LABEL, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        bar.stop()
