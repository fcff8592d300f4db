"""`sfllava cache ls|clear`: what the video cache holds, and emptying it (SPEC §4)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sfllava_mlx.cache import TranscriptCache, VideoCache, max_cache_bytes


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
    total = sum(e.bytes for e in entries)
    if args.json:
        print(json.dumps({"root": str(store.root.parent), "max_bytes": store.max_bytes,
                          "bytes": total, "entries": [vars(e) for e in entries]}))
        return 0
    from rich.console import Console
    from rich.table import Table

    from .fmt import human_bytes

    console = Console(highlight=False)
    if not entries:
        console.print(f"the video cache is empty ({store.root.parent})")
        return 0
    table = Table(title=f"video cache: {store.root.parent}")
    table.add_column("video")
    table.add_column("model")
    table.add_column("frames", justify="right")
    table.add_column("prompts", justify="right")
    table.add_column("size", justify="right")
    table.add_column("last used")
    for e in entries:
        table.add_row(Path(e.video).name, e.model, f"{e.num_frames}{'' if e.seek == 'exact' else ' (keyframe)'}",
                      str(e.prefixes), human_bytes(e.bytes),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "?")
    console.print(table)
    console.print(f"{len(entries)} videos, {human_bytes(total)} of {human_bytes(max_cache_bytes())} "
                  f"(SFLLAVA_CACHE_MAX_GB sets the cap)")
    return 0
