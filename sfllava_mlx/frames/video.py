"""Opening a video file and decoding its frames by presentation timestamp (PyAV): with its
index (`index.py`), a decoder that walks forward or seeks to the keyframe at or before a
wanted frame, whichever decodes fewer frames.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import av

from ..errors import VideoError
from .index import _build_index

# A seek (demuxer reposition + decoder flush and refill) costs about as much as decoding this
# many frames; measured in bench/frames_bench.py.
SEEK_COST_FRAMES = 8


@dataclass
class VideoInfo:
    path: str
    width: int  # upright (after rotation)
    height: int
    fps: float  # average over the stream's timestamps (the container's rate is not trusted)
    num_frames: int  # N: frames the stream holds, in presentation order
    duration: float  # seconds
    rotation: int  # degrees counter-clockwise applied to make frames upright
    codec: str
    notes: list = field(default_factory=list)  # e.g. a file that ends early
    kind: str = "video"  # a clip's info: this, or a picture's image.PictureLayout



# ---------------------------------------------------------------------------------------------
# Opening a file


def _open_container(path: Path):
    """av.open with every failure turned into one clear line."""
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if path.is_dir():
        raise VideoError(f"{path} is a directory, not a video file")
    size = path.stat().st_size
    if size == 0:
        raise VideoError(f"{path} is empty (0 bytes)")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        if _is_growing(path, size):
            raise VideoError(f"{path} is still being written; try again once it is complete") from None
        if _looks_like_mp4(path):
            raise VideoError(f"{path} is an incomplete MP4/MOV (its index is missing): "
                             "truncated, or still being copied") from None
        reason = getattr(e, "strerror", None) or str(e)
        raise VideoError(f"{path} is not a video FFmpeg can read ({reason})") from None
    if not container.streams.video:
        kind = " (audio only)" if container.streams.audio else ""
        container.close()
        raise VideoError(f"{path} has no video stream{kind}")
    return container


def _is_growing(path: Path, size: int, wait: float = 0.3) -> bool:
    time.sleep(wait)
    return path.exists() and path.stat().st_size != size


def _looks_like_mp4(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    return head[4:8] in (b"ftyp", b"mdat", b"moov", b"wide", b"free")


# ---------------------------------------------------------------------------------------------
# Decoding


class _IndexMismatch(Exception):
    """The first decoded frame's timestamp is not in the index built from the sample table."""


class _Decoder:
    """Decodes one stream forward, seeking to keyframes when that is cheaper."""

    def __init__(self, video: IndexedVideo, keyframes_only: bool):
        self.path, self.index = video.path, video.index
        self.keyframes_only = keyframes_only
        self.decoded = 0  # frames out of the decoder
        self.seeks = 0
        self._known = False  # a frame was found in the index
        self._pts_to_index = {p: i for i, p in enumerate(self.index.pts)} if self.index.pts else None
        self.first = 0  # the index of the first frame out of the decoder at the file's start
        self._open(video.take_container())
        if self.index.read_packets:  # the index pass left the container at the file's end
            self.rewind()

    def _open(self, container=None):
        self.container = container or _open_container(self.path)
        self.stream = self.container.streams.video[0]
        cc = self.stream.codec_context
        # Frame threads decode long runs fastest; keyframe-only decoding gains nothing from them.
        self.stream.thread_type = "SLICE" if self.keyframes_only else "FRAME"
        # One frame thread per core: FFmpeg's default (cores + 1) refills slower after a seek.
        cc.thread_count = os.cpu_count() or 0
        if self.keyframes_only:
            cc.skip_frame = "NONKEY"
        self._restart_stream()
        self.pos = -1  # presentation index of the last frame taken (-1: at the file's start)

    def close(self):
        self.container.close()

    def _restart_stream(self):
        self._frames = self._decode_packets()
        self._peeked = None
        self._count = 0  # frames out since the file's start (sequential counting)

    def _decode_packets(self) -> Iterator:
        try:
            for packet in self.container.demux(self.stream):
                try:
                    frames = packet.decode()
                except (av.error.FFmpegError, ValueError):
                    continue  # this frame fails to decode: replaced later by a neighbour
                for frame in frames:
                    self.decoded += 1
                    yield frame
        except (av.error.FFmpegError, OSError):
            return  # damaged or truncated tail: the stream ends here

    def _frame_index(self, frame) -> Optional[int]:
        if self._pts_to_index is None:
            i = self._count
            self._count += 1
            return i
        return self._pts_to_index.get(frame.pts)

    def peek(self):
        """(index, frame) of the next frame out of the decoder, or None at the end."""
        while self._peeked is None:
            frame = next(self._frames, None)
            if frame is None:
                return None
            i = self._frame_index(frame)
            if i is not None:
                self._peeked = (i, frame)
                self._known = True
            elif not self._known and self.index.read_packets is False:
                raise _IndexMismatch()  # decoded timestamps are not the sample table's
        return self._peeked

    def take(self):
        item = self.peek()
        self._peeked = None
        if item is not None:
            self.pos = item[0]
        return item

    def rewind(self) -> None:
        """Back to the file's start on the same container, after something else read it
        (the index pass, a subtitle stream): seeking to the first keyframe, checked by the
        first frame out; reopened where a seek does not land there (no timestamps, a
        demuxer that cannot seek to the start)."""
        if self.index.pts is not None:
            try:
                self.container.seek(self.index.seek_ts[0], stream=self.stream, backward=True)
                self._restart_stream()
                self.pos = -1
                item = self.peek()
                if item is not None and item[0] == self.first:
                    return
            except (av.error.FFmpegError, _IndexMismatch):
                pass
        self.container.close()
        self._open()

    def seek(self, k: int):
        """Reposition at keyframe number k of the index (0: the file's start)."""
        self.seeks += 1
        if k == 0 or self.index.pts is None:
            self.container.close()
            self._open()  # the start of the stream, whatever its first timestamps
            return
        self.container.seek(self.index.seek_ts[k], stream=self.stream, backward=True)
        self._restart_stream()
        self.pos = self.index.keyframes[k] - 1

    def goto(self, t: int, seek_cost: int = SEEK_COST_FRAMES):
        """Prepare to take frame t: keep decoding, or seek to a keyframe at or before it.

        Decoding on costs t - pos frames, seeking t - keyframe + 1 + seek_cost. Keyframes-only
        decoding always seeks: reading the packets between two keyframes costs more than that.
        """
        if self.index.pts is None:  # counting: only forward from the start
            if self.pos >= t:
                self.seek(0)
            return
        keyframes = self.index.keyframes
        k = self.index.keyframe_before(t)
        if self.pos < t:
            if self.keyframes_only:
                if self.pos == keyframes[k] - 1:  # already just before it (the file's start)
                    return
            elif self.pos >= keyframes[k] - 1 - seek_cost:
                return
        self.seek(k)
        # The demuxer may land after the keyframe asked for: step back until it does not.
        while k > 0 and (item := self.peek()) is not None and item[0] > t:
            k -= 1
            self.seek(k)

    def advance_to(self, t: int):
        """The decoded frame t, or None when it fails to decode (the next frame is kept)."""
        while (item := self.peek()) is not None:
            if item[0] > t:
                return None
            self.take()
            if item[0] == t:
                return item[1]
        return None


def _to_rgb(frame, rotation: int):
    """(H, W, 3) uint8 RGB, upright, read-only."""
    image = frame.to_ndarray(format="rgb24")
    if rotation:
        import numpy as np

        image = np.ascontiguousarray(np.rot90(image, rotation // 90))
    image.flags.writeable = False
    return image


class IndexedVideo:
    """A file opened and indexed: what `probe` reports and what a FrameReader decodes."""

    def __init__(self, path, read_packets: bool = False):
        self.path = Path(path)
        container = _open_container(self.path)
        try:
            size = self.path.stat().st_size
            stream = container.streams.video[0]
            self.index = _build_index(container, stream, self.path, read_packets)
            self.codec = stream.codec_context.name
            if self.path.stat().st_size != size:
                raise VideoError(f"{self.path} is still being written; try again once it is complete")
        except BaseException:
            container.close()
            raise
        self._container = container

    def take_container(self):
        """The open container (None once taken): at the file's start, or at its end where
        the index was read from the packets (the decoder rewinds it)."""
        container, self._container = self._container, None
        return container

    def close(self) -> None:
        """Close the container, where no decoder took it."""
        container = self.take_container()
        if container is not None:
            container.close()

    def info(self, first_frame) -> VideoInfo:
        rotation = int(getattr(first_frame, "rotation", 0) or 0) % 360
        rotation -= rotation % 90
        w, h = first_frame.width, first_frame.height
        if rotation in (90, 270):
            w, h = h, w
        ix = self.index
        n = ix.n
        span = ix.timestamp(n - 1) - ix.timestamp(0)
        duration = span + (1 / ix.fps if ix.fps else 0.0)
        notes = []
        if ix.truncated:
            notes.append(f"the file ends early: {ix.truncated} listed frames are missing")
        return VideoInfo(str(self.path), w, h, round(ix.fps, 6), n, duration, rotation, self.codec, notes)


def probe(path) -> VideoInfo:
    """What the video holds (size upright, frame count, fps, duration, rotation, codec)."""
    video, decoder, first = open_video(path, keyframes_only=False)
    decoder.close()
    return video.info(first)


def open_video(path, keyframes_only: bool, on_index=None):
    """(video, its decoder at the start, the first decodable frame). `on_index(index)` is
    called once the index is built, before any frame is decoded (it may refuse)."""
    video = _indexed(path, on_index)
    decoder = _Decoder(video, keyframes_only)
    try:
        try:
            item = decoder.peek()
        except _IndexMismatch:  # the sample table misled: index the packets themselves
            decoder.close()
            video = _indexed(path, on_index, read_packets=True)
            decoder = _Decoder(video, keyframes_only)
            item = decoder.peek()
        if item is None:
            raise VideoError(f"{video.path}: no frame of the video decodes")
    except BaseException:
        decoder.close()
        raise
    decoder.first = item[0]
    return video, decoder, item[1]


def _indexed(path, on_index, read_packets: bool = False) -> IndexedVideo:
    video = IndexedVideo(path, read_packets)
    if on_index is not None:
        try:
            on_index(video.index)
        except BaseException:
            video.close()
            raise
    return video
