"""Subtitle files (SRT, WebVTT, ASS/SSA, ...) parsed by pysubs2, and the sidecar files
`auto` finds beside a video: `clip.srt`, `clip.L.srt`, `.vtt`, `.ass`, `.ssa`, by stem."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .events import Event, in_time_order, plain_text
from .lang import same_language

EXTENSIONS = (".srt", ".vtt", ".ass", ".ssa")  # in the order a sidecar is preferred


class SubtitleFileError(UserError):
    """A subtitle file that is missing, unreadable or not subtitles."""


def decode(data: bytes) -> str:
    """UTF-8 (with or without a byte order mark, the usual case), else Windows-1252, the
    usual legacy encoding of SRT files; bytes neither can read are replaced."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def parse(text: str, name: str) -> list[Event]:
    """The events of a subtitle file's text, in time order; SubtitleFileError if pysubs2
    recognises no subtitle format in it, or finds no event."""
    import pysubs2

    try:
        subs = pysubs2.SSAFile.from_string(text)
    except pysubs2.exceptions.FormatAutodetectionError:
        raise SubtitleFileError(f"{name} is not a subtitle file (no SRT, WebVTT or ASS/SSA "
                                "content)") from None
    except (pysubs2.exceptions.Pysubs2Error, ValueError, IndexError, KeyError) as e:
        raise SubtitleFileError(f"{name} is not a subtitle file pysubs2 can read: "
                                f"{e or type(e).__name__}") from None
    webvtt = subs.format == "vtt"  # WebVTT escapes & < > as HTML entities
    events = in_time_order(
        Event(e.start / 1000, e.end / 1000,
              html.unescape(plain_text(e.text)) if webvtt else plain_text(e.text))
        for e in subs if not e.is_comment)
    if not events:
        raise SubtitleFileError(f"{name} holds no subtitle events")
    return events


def read_file(path) -> list[Event]:
    """A subtitle file's events (read once, whole)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SubtitleFileError(f"subtitle file not found: {path}") from None
    except IsADirectoryError:
        raise SubtitleFileError(f"{path} is a directory, not a subtitle file") from None
    except OSError as e:
        raise SubtitleFileError(f"cannot read the subtitle file {path}: "
                                f"{e.strerror or e}") from None
    if b"\0" in data[:4096] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SubtitleFileError(f"{path} is not a subtitle file (binary content)")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with its byte order mark
        text = data.decode("utf-16", errors="replace")
    else:
        text = decode(data)
    return parse(text, str(path))


def sidecars(video, lang: Optional[str] = None) -> list[Path]:
    """Subtitle files beside `video` named by its stem, best first: `clip.srt` (untagged)
    before `clip.L.srt`, .srt before .vtt, .ass, .ssa. With `lang`, only files tagged with
    that language (`clip.en.srt`, `clip.eng.srt`, `clip.en-US.srt`)."""
    video = Path(video)
    stem = video.stem
    try:
        names = sorted(p for p in video.parent.iterdir() if p.is_file() and p != video)
    except OSError:
        return []
    found = []
    for p in names:
        ext = p.suffix.lower()
        if ext not in EXTENSIONS or not p.name.startswith(stem + "."):
            continue
        tag = p.name[len(stem) + 1:-len(ext)]  # "" for clip.srt, "en" for clip.en.srt
        if "." in tag:
            continue  # clip.en.forced.srt and the like: not a plain language tag
        if lang is not None and not same_language(tag, lang):
            continue
        found.append((bool(tag), EXTENSIONS.index(ext), p.name, p))
    return [p for *_, p in sorted(found)]
