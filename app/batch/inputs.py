"""`sfllava batch`, what to answer: the videos under the PATHs, the prompts, and the plan
that shares the videos out over the ranks (design.md §8).

- `expand(paths)`: files named on the command line, and every file under the directories
  (recursively, sorted, hidden files and folders left out), in input order.
- `inspect(candidate, resolve)`: the file opened once (`media.open_media`: its index, its
  first frame) for its content fingerprint (the video cache's, §4), for a file found in a
  directory whether it is a video (a video stream, not a still picture's demuxer), its
  duration for the plan, and the options as it resolves them (the T it samples, the
  subtitles it has: what its lines are keyed by); closed again before the next file.
- `share_out(weights, size)`: longest first onto the least-loaded rank; the same plan on
  every rank (no randomness, ties to the lower index and rank).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

from sfllava_mlx.errors import UserError, VideoError

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
    subtitle_block: str = ""  # eval: the subtitle block its questions carry, read with the rest


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


def inspect(c: Candidate, resolve) -> Inspected:
    """`resolve(media)`: (the options as the file resolves them, or None and the one-line
    error that stopped them[, eval's subtitle block]) — what its lines are keyed by. The
    file is opened once (`media.open_media`) for all of it, and closed before the next one
    is."""
    from sfllava_mlx.media import Video, open_media

    try:
        media = open_media(c.path)
    except VideoError:
        return unopened(c, resolve)
    if not isinstance(media, Video):  # a photo is answered too (design.md §2.3)
        return Inspected("video", fingerprint_of(c.path), 1.0, *resolve(media))
    with media:
        if not c.named and not is_video_format(media.format):
            return Inspected("skip", None, 0.0)
        return Inspected("video", media.fingerprint.sampled, media.info.duration,
                         *resolve(media))


def unopened(c: Candidate, resolve) -> Inspected:
    """A file that cannot be opened: skipped where a directory holds it (unless it is a
    broken picture), else its pairs are error lines saying why."""
    from sfllava_mlx.image import is_picture

    picture = is_picture(c.path)
    if not (c.named or picture):
        return Inspected("skip", None, 0.0)
    fp = fingerprint_of(c.path)
    if fp is None:
        return Inspected("video", None, 0.0)  # unreadable: the answer is an error line
    return Inspected("video", fp, 1.0 if picture else 0.0, *resolve(c.path))  # its error


def is_video_format(names: str) -> bool:
    """Whether a demuxer's names (`Video.format`) are a video's, not a still picture's or
    text art's."""
    fmt = set(names.split(","))
    return not (fmt & _NOT_VIDEO_FORMATS or any(f.endswith("_pipe") for f in fmt))


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
