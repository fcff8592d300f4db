"""The index of a video's frames: every frame's presentation timestamp and the keyframes,
from the MP4/MOV sample table where it can serve (free, no file read), else from one pass
over the packets (reads the file, decodes nothing)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from operator import attrgetter, itemgetter, lt
from pathlib import Path
from typing import Optional

import av

from ..errors import VideoError

_MOV_FAMILY = {"mov", "mp4", "m4a", "3gp", "3g2", "mj2"}
_AVINDEX_KEYFRAME, _AVINDEX_DISCARD_FRAME = 0x1, 0x2  # libavformat's AVIndexEntry flags
_TIMESTAMP_FLAGS = attrgetter("timestamp", "flags")


@dataclass
class _Index:
    """Every frame of the stream in presentation order."""

    pts: Optional[list]  # per frame, ascending; None: the container has no timestamps
    keyframes: list  # presentation indices of keyframes, ascending, starting with 0
    seek_ts: list  # per keyframe, the stream timestamp that seeks to it
    time_base: Fraction
    origin: float  # seconds subtracted from every timestamp (the container's start)
    fps: float
    truncated: int = 0  # frames the container lists but the file does not hold
    count: int = 0  # frames, where there are no timestamps
    read_packets: bool = False  # built by reading the file (the container is at its end)

    @property
    def n(self) -> int:
        return len(self.pts) if self.pts is not None else self.count

    def keyframe_before(self, i: int) -> int:
        """Position in `keyframes` of the last keyframe at or before frame i."""
        return max(bisect.bisect_right(self.keyframes, i) - 1, 0)

    def timestamp(self, i: int) -> float:
        if self.pts is None:
            return i / self.fps if self.fps else 0.0
        return float(self.pts[i] * self.time_base) - self.origin


def _nominal_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _build_index(container, stream, path: Path, read_packets: bool = False) -> _Index:
    tb = stream.time_base or Fraction(1, 1)
    origin = container.start_time / 1e6 if container.start_time is not None else 0.0
    rows = None if read_packets else _rows_from_sample_table(container, stream, path)
    truncated, read_packets = 0, rows is None
    if rows is not None:
        rows, truncated = rows
    else:
        rows = _rows_from_packets(container, stream)  # read once: media.Video holds it
    if not rows:
        raise VideoError(f"{path} holds no video frames")
    pts = [r[0] for r in rows]
    if None in pts or not _ascending(pts):
        if None in pts or len(set(pts)) != len(pts):
            # No usable timestamps: frames are counted in decode order by one sequential pass.
            return _Index(None, [0], [None], tb, origin, _nominal_fps(stream), truncated,
                          count=len(rows), read_packets=read_packets)
        rows = sorted(rows, key=itemgetter(0))  # frame reordering: into presentation order
        pts = [r[0] for r in rows]
    keyframes = [i for i, r in enumerate(rows) if r[1]]
    seek_ts = [pts[i] for i in keyframes]
    if not keyframes or keyframes[0] != 0:  # the stream does not open on a keyframe
        keyframes.insert(0, 0)
        seek_ts.insert(0, pts[0])
    span = float((pts[-1] - pts[0]) * tb)
    fps = (len(pts) - 1) / span if len(pts) > 1 and span > 0 else _nominal_fps(stream)
    return _Index(pts, keyframes, seek_ts, tb, origin, fps, truncated, read_packets=read_packets)


def _rows_from_sample_table(container, stream, path: Path):
    """(pts, is_keyframe) per frame from an MP4/MOV sample table, or None where it cannot serve.

    Only without frame reordering, where decode order is presentation order and a sample's
    timestamp is the frame's presentation time; the file's size tells which samples it holds.
    """
    if not _MOV_FAMILY & set(container.format.name.split(",")):
        return None
    if stream.codec_context.has_b_frames:
        return None
    entries = stream.index_entries
    if entries is None or len(entries) == 0:
        return None
    n = len(entries)
    size = path.stat().st_size
    tail = entries[n - 1]
    if tail.pos + tail.size > size:  # the file ends early (still being copied, or cut)
        n = next(k for k, e in enumerate(entries) if e.pos + e.size > size)
    rows = list(map(_TIMESTAMP_FLAGS, entries[:n]))  # C-level: this runs per frame
    rows = [(ts, flags & _AVINDEX_KEYFRAME) for ts, flags in rows
            if not flags & _AVINDEX_DISCARD_FRAME]
    if not _ascending([r[0] for r in rows]):
        return None  # not in presentation order after all
    return rows, len(entries) - n


def _ascending(values: list) -> bool:
    """Strictly ascending (no two equal)."""
    return all(map(lt, values, islice(values, 1, None)))


def _rows_from_packets(container, stream):
    """(pts, is_keyframe) per packet of the stream, in decode order: one read of the file."""
    rows = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:
                continue
            rows.append((packet.pts, bool(packet.is_keyframe)))
    except (av.error.FFmpegError, OSError):
        pass  # damaged or truncated tail: keep the frames read so far
    return rows
