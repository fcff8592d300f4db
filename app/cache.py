"""`sfllava cache ls|clear`: what the video cache holds, and emptying it (design.md §4)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sfllava_mlx.cache import TranscriptCache, VideoCache, max_cache_bytes

from .fmt import human_bytes


def add_arguments(p) -> None:
    p.add_argument("action", choices=["ls", "clear"], help="list the entries, or remove them all")
    p.add_argument("--json", action="store_true", help="ls: print JSON")


def main(args) -> int:
    store = VideoCache()
    if args.action == "clear":
        n = store.clear()
        speech = TranscriptCache(store.root.parent).clear()
        also = f" and {speech} transcript{'s' if speech != 1 else ''}" if speech else ""
        print(f"removed {n} cached video{'s' if n != 1 else ''}{also} from {store.root.parent}")
        return 0
    entries = store.entries()
    transcripts = TranscriptCache(store.root.parent).entries()
    total = sum(e.bytes for e in entries)
    if args.json:
        print(json.dumps({"root": str(store.root.parent), "max_bytes": store.max_bytes,
                          "bytes": total, "entries": [vars(e) for e in entries],
                          "transcripts": [vars(t) for t in transcripts]}))
        return 0
    from rich.console import Console

    console = Console(highlight=False)
    if not entries and not transcripts:
        console.print(f"the video cache is empty ({store.root.parent})")
        return 0
    if entries:
        console.print(video_table(store, entries))
        console.print(f"{len(entries)} videos, {human_bytes(total)} of "
                      f"{human_bytes(max_cache_bytes())} (SFLLAVA_CACHE_MAX_GB sets the cap)")
    if transcripts:
        console.print(transcript_table(transcripts))
    return 0


def video_table(store, entries):
    from rich.table import Table

    table = Table(title=f"video cache: {store.root.parent}")
    for name, justify in (("video", "left"), ("model", "left"), ("frames", "right"),
                          ("prompts", "right"), ("size", "right"), ("last used", "left")):
        table.add_column(name, justify=justify)
    for e in entries:
        table.add_row(Path(e.video).name, e.model,
                      f"{e.num_frames}{'' if e.seek == 'exact' else ' (keyframe)'}",
                      str(e.prefixes), human_bytes(e.bytes), when(e.last_used))
    return table


def transcript_table(transcripts):
    """Speech transcribed with --subtitles speech: kept with the video, cleared with it."""
    from rich.table import Table

    table = Table(title="transcripts (--subtitles speech)")
    for name, justify in (("video", "left"), ("speech model", "left"), ("language", "left"),
                          ("segments", "right"), ("size", "right"), ("made", "left")):
        table.add_column(name, justify=justify)
    for t in transcripts:
        table.add_row(Path(t.video).name, Path(t.model).name, t.language or "?",
                      str(t.segments), human_bytes(t.bytes), when(t.created))
    return table


def when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else "?"
