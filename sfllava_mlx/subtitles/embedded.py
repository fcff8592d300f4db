"""A video's own text subtitle streams (SubRip, ASS/SSA, WebVTT, MP4 `mov_text`, ...) read
with PyAV: FFmpeg's decoders turn each packet into an ASS event, whose override tags
pysubs2 removes; its times are the packet's, on the video's clock.

Reading a stream reads the file through once (subtitle packets are spread over it), decoding
nothing but the subtitle packets. Bitmap subtitles (DVD, Blu-ray PGS) carry no text: skipped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

import av

from .events import Event, in_time_order, plain_text
from .lang import same_language


@dataclass
class Stream:
    index: int  # the stream's index in the container
    codec: str  # "subrip", "ass", "webvtt", "mov_text", ...
    language: Optional[str]  # its tag ("eng", "fr", ...) or None


def text_streams(container) -> list[Stream]:
    """An open container's text subtitle streams, in container order (headers only)."""
    return [_describe(s) for s in container.streams.subtitles if _is_text(s)]


def _is_text(stream) -> bool:
    try:
        return bool(stream.codec_context.codec.text_sub)
    except (av.error.FFmpegError, ValueError, AttributeError):  # no decoder for it
        return False


def _describe(stream) -> Stream:
    codec = stream.codec_context.codec
    language = (stream.metadata or {}).get("language")
    return Stream(stream.index, codec.canonical_name or codec.name,
                  language if language and language != "und" else None)


def pick(streams: list[Stream], lang: Optional[str]) -> Optional[Stream]:
    """The first stream, or with `lang` the first tagged with that language."""
    for s in streams:
        if lang is None or same_language(s.language, lang):
            return s
    return None


def read_stream(container, stream: Stream) -> list[Event]:
    """The stream's events in time order, demuxed from the open container's position on
    (its start: `media.Video.subtitle_events`). Packets that fail to decode are skipped;
    a damaged tail ends the stream."""
    origin = container.start_time / 1e6 if container.start_time is not None else 0.0
    s = container.streams[stream.index]
    timed = []  # (start, end or None, text)
    try:
        for packet in container.demux(s):
            if packet.pts is None or packet.size == 0:
                continue
            start = float(packet.pts * packet.time_base) - origin
            end = start + float(packet.duration * packet.time_base) if packet.duration else None
            try:
                decoded = packet.decode()
            except (av.error.FFmpegError, ValueError):
                continue
            for text in _texts(decoded):
                timed.append((start, end, text))
    except (av.error.FFmpegError, OSError):
        pass
    return in_time_order(_with_ends(timed))


def _texts(decoded) -> list[str]:
    """Plain texts of a decoded packet's ASS events ("ReadOrder,Layer,Style,Name,MarginL,
    MarginR,MarginV,Effect,Text"; older PyAV wraps them in a set of rects)."""
    out = []
    for item in decoded:
        for rect in ([item] if hasattr(item, "ass") else list(item)):
            line = getattr(rect, "ass", None)
            if not line:
                continue
            fields = bytes(line).decode("utf-8", errors="replace").split(",", 8)
            text = plain_text(fields[-1])
            if text:
                out.append(text)
    return out


def _with_ends(timed) -> list[Event]:
    """A packet without a duration lasts until the next one starts (or one minute)."""
    starts = sorted({t[0] for t in timed})
    events = []
    for start, end, text in timed:
        if end is None:
            following = bisect.bisect_right(starts, start)
            end = starts[following] if following < len(starts) else start + 60.0
        events.append(Event(start, end, text))
    return events
