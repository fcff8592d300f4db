"""`sfllava batch`, the results: JSON Lines that survive any crash (design.md §8).

While a batch runs, each rank appends its answers to its own part file beside `--out`
(`.results.jsonl.rank1.part`), one whole line per write, flushed and fsynced before the
next pair starts: a kill at any moment leaves whole lines, at worst plus one torn last
line, which readers drop and the owner truncates away before appending again. At the end
rank 0 merges `--out` and every part file into a new `--out` (input order; written to a
temporary file, fsynced, renamed over the old one, directory fsynced), and only then are
the part files removed: at every instant each answer is in `--out` or in a part file.

A line is one (video, prompt) pair; the pair is done when a line with the same key exists:
the video's content fingerprint (its path where the file could not be read), the prompt,
the model's identity and the resolved options (`options`: all that changes the answer).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sfllava_mlx.files import fsync_dir, sync, write_atomic  # noqa: F401  write_atomic: run.py's
from sfllava_mlx.options import identity

# The fields of `generate --json` (design.md §3), null in an error line.
ANSWER_FIELDS = ("text", "tokens", "logprobs", "prompt_tokens", "visual_tokens", "timings_s",
                 "peak_memory_gb", "cache", "finish_reason", "recipe", "part", "subtitles")


def pair_key(fingerprint: Optional[str], video: str, prompt: str, model: str,
             options: dict) -> str:
    """`options`: the resolved options of the answer (a line's `options`, design.md §3): every
    one that changes the answer is in the key, so a rerun with other options answers
    again and keeps the lines of the others."""
    what = f"fp:{fingerprint}" if fingerprint else f"path:{video}"
    return json.dumps([what, prompt, model, json.loads(identity(options))])


def record_key(rec: dict) -> Optional[str]:
    try:
        return pair_key(rec.get("fingerprint"), rec["video"], rec["prompt"],
                        rec["model_identity"], rec["options"])
    except (KeyError, TypeError, AttributeError):
        return None


def line(rec: dict) -> bytes:
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


@dataclass
class Lines:
    """Whole, readable lines of a results or part file, as read."""

    records: list = field(default_factory=list)
    raw: list = field(default_factory=list)  # bytes of each record's line, newline included
    torn: int = 0  # an unterminated last line (a write cut short)
    unreadable: int = 0  # whole lines that are not a result (not JSON, or no key)
    good_bytes: int = 0  # length of the file up to the end of its last whole line


def parse(data: bytes) -> Lines:
    out = Lines()
    end = data.rfind(b"\n") + 1
    out.good_bytes = end
    if end < len(data):
        out.torn = 1
    for raw in data[:end].splitlines(keepends=True):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            out.unreadable += 1
            continue
        if not isinstance(rec, dict) or record_key(rec) is None:
            out.unreadable += 1
            continue
        out.records.append(rec)
        out.raw.append(raw if raw.endswith(b"\n") else raw + b"\n")
    return out


def read(path) -> Lines:
    try:
        with open(path, "rb") as f:
            return parse(f.read())
    except FileNotFoundError:
        return Lines()


# ----------------------------------------------------------------------------------------
# Part files


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f".{out.name}.rank{rank}.part")


def part_files(out: Path) -> dict[int, Path]:
    """Part files beside `out` that this machine can see, by rank."""
    pattern = re.compile(r"^\." + re.escape(out.name) + r"\.rank(\d+)\.part$")
    found = {}
    try:
        names = os.listdir(out.parent)
    except OSError:
        return found
    for name in names:
        m = pattern.match(name)
        if m:
            found[int(m.group(1))] = out.parent / name
    return dict(sorted(found.items()))


def owned_parts(out: Path, rank: int, size: int) -> list[Path]:
    """The part files this rank reads and removes: its own, and (every rank, so that no
    machine's leftovers are missed) those of ranks that this run does not have."""
    return [p for r, p in part_files(out).items() if r == rank or r >= size]


class PartWriter:
    """Appends whole lines to this rank's part file, each synced before `write` returns."""

    def __init__(self, path: Path):
        self.path = path
        self.written = 0
        existed = path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if existed:  # a torn last line of a killed run: cut it before appending
            size = os.fstat(self._fd).st_size
            with open(path, "rb") as f:
                good = parse(f.read()).good_bytes
            if good < size:
                os.ftruncate(self._fd, good)
                sync(self._fd)
        else:
            fsync_dir(path.parent)

    def write(self, rec: dict) -> None:
        data = line(rec)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        sync(self._fd)
        self.written += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------------------
# Merging


def merge(records: Iterable[dict], wanted: list[tuple[str, str]]) -> tuple[list[dict], dict]:
    """(merged records, key -> the record answering it).

    `wanted`: the (video as given, key) of every pair of the current input, in input order.
    Those come first, in that order, one line each: the line made for that video, or a copy
    of another line with the same key (the same content under another path: a renamed or
    duplicated file) with `video` set to this path. Every other line follows in the order
    read, exact (video, key) duplicates dropped: nothing already answered is lost.
    """
    by_key: dict[str, list[dict]] = {}
    order = []
    for rec in records:
        k = record_key(rec)
        if k is None:
            continue
        by_key.setdefault(k, []).append(rec)
        order.append((rec["video"], k, rec))
    merged, emitted = [], set()
    answers = {}
    for video, k in wanted:
        if (video, k) in emitted or k not in by_key:
            continue
        same = [r for r in by_key[k] if r["video"] == video]
        rec = same[0] if same else {**by_key[k][0], "video": video}
        merged.append(rec)
        emitted.add((video, k))
        answers.setdefault(k, rec)
    for video, k, rec in order:
        if (video, k) not in emitted:
            merged.append(rec)
            emitted.add((video, k))
    return merged, answers


def remove(paths: Iterable[Path]) -> None:
    paths = list(paths)
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    for d in {Path(p).parent for p in paths}:
        fsync_dir(d)
