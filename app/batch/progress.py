"""`sfllava batch`'s progress: pairs done, failed and the time left of this rank's share."""

from __future__ import annotations

import sys
import time

PLAIN_PROGRESS_EVERY_S = 30.0  # without a terminal, a progress line at most this often


class Progress:
    """Pairs done, failed and the ETA of this rank's share: rich on a terminal (rank 0),
    a plain line now and then otherwise; silent on other ranks."""

    def __init__(self, rank: int, size: int, total: int):
        self.total, self.done, self.failed = total, 0, 0
        self.start = self.last = time.monotonic()
        self.enabled = rank == 0 and total > 0
        self.label = f"rank 0 of {size}" if size > 1 else "pairs"
        self.rich = None
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self.rich = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=False)
            self.task = self.rich.add_task(self.label, total=total, failed=0)
            self.rich.start()

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if not self.enabled:
            return
        if self.rich is not None:
            self.rich.update(self.task, advance=1, failed=self.failed)
            return
        now = time.monotonic()
        if now - self.last >= PLAIN_PROGRESS_EVERY_S and self.done < self.total:
            self.last = now
            eta = (now - self.start) / self.done * (self.total - self.done)
            print(f"batch: {self.label} {self.done}/{self.total}, {self.failed} failed, "
                  f"ETA {_duration(eta)}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line for the user (a warning), above the bar on a terminal; every rank's own."""
        if self.rich is not None:
            self.rich.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()
            self.rich = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
