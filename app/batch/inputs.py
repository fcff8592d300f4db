"""`sfllava batch`, what to answer: the videos under the PATHs, the prompts, and the plan
that shares the videos out over the ranks (design.md §8).

- `expand(paths)`: files named on the command line, and every file under the directories
  (recursively, sorted, hidden files and folders left out), in input order.
- `inspect(candidate, resolve)`: the file's content fingerprint (the video cache's, §4),
  for a file found in a directory whether PyAV opens it with a video stream, its duration
  (container metadata, no decoding) for the plan, and the options as it resolves them (the
  T it samples, the subtitles it has: what its lines are keyed by).
- `share_out(weights, size)`: longest first onto the least-loaded rank; the same plan on
  every rank (no randomness, ties to the lower index and rank).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

from sfllava_mlx.errors import UserError

# Demuxers that open still pictures and text art: a video stream, but not a video.
_NOT_VIDEO_FORMATS = {"image2", "image2pipe", "tty", "bin", "xbin", "adf", "idf", "ico",
                      "apng", "webp", "gif"}


@dataclass
class Candidate:
    video: str  # the path as given (a directory's files: joined onto the directory as given)
    path: str  # absolute, what is opened
    named: bool  # named on the command line: always answered or reported, never skipped


@dataclass
class Inspected:
    kind: str  # "video" (a video or a picture: answered) or "skip" (found in a directory, neither)
    fingerprint: Optional[str]  # None where the file cannot be read
    duration: float  # seconds (0 where unknown)
    options: Optional[dict] = None  # the options as this file resolves them (design.md §3)
    error: Optional[str] = None  # why they cannot be resolved: its pairs are error lines


def read_prompts(args) -> list[str]:
    """--prompt (repeatable) or --prompts-file (one a line, blank lines skipped), deduplicated."""
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\r\n") for line in f]
        except OSError as e:
            raise UserError(f"cannot read --prompts-file {args.prompts_file}: "
                            f"{e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UserError(f"--prompts-file {args.prompts_file} is not UTF-8 text") from None
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise UserError(f"--prompts-file {args.prompts_file} holds no prompt")
    else:
        prompts = list(args.prompt)
        if any(not p.strip() for p in prompts):
            raise UserError("--prompt must not be empty")
    return list(dict.fromkeys(prompts))


def expand(paths: list[str]) -> list[Candidate]:
    out, seen = [], {}

    def add(video: str, named: bool) -> None:
        path = os.path.abspath(video)
        if path not in seen:
            seen[path] = Candidate(video, path, named)
            out.append(seen[path])
        elif named:  # also named on the command line: reported whatever it holds
            seen[path].named = True

    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        add(os.path.join(root, name), False)
        else:
            add(p, True)  # missing or unreadable: reported as an error line, never skipped
    return out


def fingerprint_of(path: str) -> Optional[str]:
    from sfllava_mlx.cache import Fingerprint

    try:
        return Fingerprint.of(path).sampled
    except OSError:
        return None


def probe_container(path: str) -> tuple[bool, float]:
    """(PyAV opens it with a video stream, duration in seconds from the container's
    metadata); reads the header only."""
    import av

    try:
        with av.open(path, metadata_errors="ignore") as c:
            fmt = set(c.format.name.split(","))
            if not c.streams.video or fmt & _NOT_VIDEO_FORMATS or any(
                    f.endswith("_pipe") for f in fmt):
                return False, 0.0
            if c.duration:
                return True, max(c.duration / 1e6, 0.0)
            s = c.streams.video[0]
            if s.duration and s.time_base:
                return True, float(s.duration * s.time_base)
            if s.frames and s.average_rate:
                return True, float(s.frames / s.average_rate)
            return True, 0.0
    except Exception:  # FFmpeg errors, OSError, odd metadata: not a video we can open
        return False, 0.0


def inspect(c: Candidate, resolve) -> Inspected:
    """`resolve(path)`: (the options as the file resolves them, or None and the one-line
    error that stopped them) — what its lines are keyed by."""
    fp = fingerprint_of(c.path)
    if not c.named and fp is None:
        return Inspected("skip", None, 0.0)
    if c.named and fp is None:
        return Inspected("video", None, 0.0)  # the answer is an error line
    from sfllava_mlx.image import is_picture

    if is_picture(c.path):  # a photo is answered too (design.md §2.3): about a frame's work
        return Inspected("video", fp, 1.0, *resolve(c.path))
    is_video, duration = probe_container(c.path)
    if not is_video and not c.named:
        return Inspected("skip", fp, 0.0)
    return Inspected("video", fp, duration, *resolve(c.path))


def share_out(weights: list[float], size: int) -> list[int]:
    """The rank of each item: longest first onto the least-loaded rank (deterministic)."""
    loads = [0.0] * size
    ranks = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        r = min(range(size), key=lambda r: (loads[r], r))
        ranks[i] = r
        loads[r] += weights[i]
    return ranks


def to_json(items) -> list:
    return [asdict(x) for x in items]
