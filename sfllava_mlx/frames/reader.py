"""The sampled frames of one video, decoded on a worker thread while the consumer works."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

from ..errors import VideoError
from ..system import available_memory, physical_memory
from .part import Part, Span, locate
from .sampling import SEEK_MODES, frames_for_rate, sample_positions, stream_names
from .video import IndexedVideo, VideoInfo, _Decoder, _to_rgb, open_video

if TYPE_CHECKING:
    import numpy as np

PREFETCH = 8  # decoded frames waiting for the consumer (bounds memory)
_DONE = object()
_NONE = object()


@dataclass
class SampledFrames:
    """The clip visual tokens are made from, the one type every step and the cache hold: a
    video's sampled frames, or a picture's (no frames; `info` an image.PictureLayout)."""

    images: list  # np.ndarray uint8 (H, W, 3) RGB, upright, one per position; [] once dropped
    indices: list  # frame index taken per position (the keyframe's in keyframe mode)
    timestamps: list  # seconds, presentation time of that frame
    streams: list  # "slow" | "fast" per position
    exact: bool  # False in keyframe mode
    replaced: list  # (wanted_index, used_index) for frames that failed to decode
    info: object  # VideoInfo, or a picture's image.PictureLayout

    def record(self) -> dict:
        """What the cache keeps of the clip (JSON): everything but the pixels."""
        return {"indices": [int(i) for i in self.indices],
                "timestamps": [float(t) for t in self.timestamps],
                "streams": list(self.streams), "exact": bool(self.exact),
                "replaced": [[int(a), int(b)] for a, b in self.replaced],
                "info": asdict(self.info) if self.info is not None else {}}

    @classmethod
    def from_record(cls, record: dict, info_type) -> SampledFrames:
        """The clip a `record` kept, its info restored as `info_type` (the media's)."""
        return cls([], list(record["indices"]), list(record["timestamps"]),
                    list(record["streams"]), bool(record["exact"]),
                    [tuple(r) for r in record["replaced"]], info_type(**record["info"]))



def _available_memory() -> int:
    """Bytes of memory this process may still use (Linux: MemAvailable; else physical memory)."""
    return available_memory() or physical_memory() or 1 << 62


def _check_memory(info: VideoInfo, held_frames: int) -> None:
    frame = info.width * info.height * 3
    decoder = 24 * info.width * info.height * 3 // 2  # reference frames and threads, YUV 4:2:0
    need = held_frames * frame + decoder
    available = _available_memory()
    if need > available:
        raise VideoError(
            f"{info.path} is {info.width}x{info.height}: decoding {held_frames} frames of it needs "
            f"{need / 1e9:.1f} GB, more than the {available / 1e9:.1f} GB of memory available")


def wanted_frames(index, num_frames: int, positions: str, exact: bool,
                  span: Optional[Span] = None) -> list[int]:
    """The frame each position takes (design.md §1.1, §2.1), over the frames of `span` (a part,
    design.md §2.4; default the whole video): in keyframe mode, the keyframe at or before it."""
    span = span or Span(0, index.n, index.fps)
    wanted = [span.first + i for i in sample_positions(span.count, num_frames, positions)]
    if not exact:
        wanted = [index.keyframes[index.keyframe_before(i)] for i in wanted]
    return wanted


def sampled_timestamps(index, num_frames: int = 128, seek: str = "exact",
                       positions: str = "midpoint", span: Optional[Span] = None) -> list[float]:
    """The timestamps a FrameReader of these settings reports, from the video's index alone
    (nothing decoded): they differ only where a frame fails to decode and a neighbour
    takes its place. `num_frames` is the count to sample (--fps already applied); `span`
    the part's frames."""
    exact = seek == "exact" or index.pts is None
    return [index.timestamp(i) for i in wanted_frames(index, num_frames, positions, exact, span)]


# ---------------------------------------------------------------------------------------------
# The reader: header now, frames from a worker thread


class FrameReader:
    """The sampled frames of one video, decoded on a worker thread (see the module docstring).

    Use as a context manager or call close(): leaving early stops the worker.
    Attributes: info, indices, timestamps, streams, exact, replaced, decoded (frames the decoder
    produced), seeks, elapsed_s (decoding wall time, once finished). With `images=False` the
    frames are decoded (a frame that fails is still replaced) but not converted to RGB: the
    positions come with None, for a caller that needs indices and timestamps only.
    """

    def __init__(self, path, num_frames: int = 128, slow_every: int = 4, seek: str = "exact",
                 prefetch: int = PREFETCH, hold_all: bool = False, positions: str = "midpoint",
                 fps: Optional[float] = None, images: bool = True, part: Optional[Part] = None,
                 opened: Optional[tuple] = None):
        """`opened`: `open_video`'s (video, decoder, first frame) to go on with (a
        media.Video's, which owns nothing of it once handed over) instead of opening `path`."""
        if seek not in SEEK_MODES:
            raise ValueError(f"seek must be one of {SEEK_MODES}, not {seek!r}")
        if num_frames < 1 or slow_every < 1:
            raise ValueError("num_frames and slow_every must be at least 1")
        keyframes_only = seek == "keyframe"
        if opened is not None and opened[1].keyframes_only != keyframes_only:
            opened[1].close()  # keyframe decoding is set up before the first frame: anew
            opened = None
        spans = []  # the part's frames, found (or refused) before any frame is decoded
        on_index = None if part is None else lambda index: spans.append(locate(index, part))
        if opened is None:
            opened = open_video(path, keyframes_only, on_index)
        elif on_index is not None:
            try:
                on_index(opened[0].index)
            except BaseException:
                opened[1].close()
                raise
        video, self._decoder, first = opened
        index = video.index
        # Without timestamps there is no seeking: keyframe mode degrades to the exact pass.
        self.exact = seek == "exact" or index.pts is None
        try:
            if self.exact and self._decoder.keyframes_only:
                self._decoder.close()
                self._decoder = _Decoder(IndexedVideo(path, index.read_packets), keyframes_only=False)
            self.info = video.info(first)
            # A part: every rule runs over its frames alone (design.md §2.4).
            self.span = span = spans[-1] if spans else Span(0, index.n, self.info.fps)
            num_frames = frames_for_rate(num_frames, span.count, span.rate, fps)
            wanted = wanted_frames(index, num_frames, positions, self.exact, span)
            self.indices = list(wanted)
            self.timestamps = [index.timestamp(i) for i in wanted]
            self.streams = stream_names(num_frames, slow_every)
            self.replaced: list = []
            # read_frames holds every distinct frame; a streaming consumer only the prefetch.
            _check_memory(self.info, (len(set(wanted)) if hold_all else prefetch) if images else 0)
        except BaseException:
            self._decoder.close()
            raise
        self.decoded = self.seeks = 0
        self.elapsed_s = 0.0
        self._images = images
        self._index = index
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._next = _NONE  # an item taken from the queue by ready(), not consumed yet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="sfllava-frames", daemon=True)
        self._thread.start()

    # -- worker ---------------------------------------------------------------------------
    def _work(self):
        start = time.perf_counter()
        try:
            by_index: dict[int, list[int]] = {}
            for position, i in enumerate(self.indices):
                by_index.setdefault(i, []).append(position)
            for t in sorted(by_index):
                used, image = self._decode(t)
                if used != t:
                    self.replaced.append((t, used))
                for position in by_index[t]:
                    self.indices[position] = used
                    self.timestamps[position] = self._index.timestamp(used)
                for position in by_index[t]:
                    if not self._put((position, image)):
                        return
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)
        finally:
            self.decoded, self.seeks = self._decoder.decoded, self._decoder.seeks
            self.elapsed_s = time.perf_counter() - start
            self._decoder.close()

    def _decode(self, t: int):
        d = self._decoder
        d.goto(t)
        frame = d.advance_to(t)
        if frame is not None:
            return t, self._image(frame)
        return self._nearest(t)

    def _image(self, frame):
        return _to_rgb(frame, self.info.rotation) if self._images else None

    def _nearest(self, t: int):
        """The nearest decodable frame to t (the earlier one on a tie), inside the part."""
        d = self._decoder
        first, last = min(t, self.span.first), max(t, self.span.stop - 1)
        radius = 8
        while True:
            lo, hi = max(t - radius, first), min(t + radius, last)
            d.goto(lo, seek_cost=0)
            before = after = None
            while (item := d.peek()) is not None and item[0] <= hi:
                d.take()
                if item[0] < t:
                    before = item
                elif item[0] > t:
                    after = item
                    break
            candidates = [c for c in (before, after) if c is not None]
            if candidates:
                i, frame = min(candidates, key=lambda c: (abs(c[0] - t), c[0]))
                return i, self._image(frame)
            if lo == first and hi == last:
                what = "video" if (first, last) == (0, self._index.n - 1) else "part"
                raise VideoError(f"{self.info.path}: no frame of the {what} decodes")
            radius *= 8

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # -- consumer -------------------------------------------------------------------------
    def ready(self, timeout: Optional[float] = 0) -> bool:
        """Whether the next frame (or the end) is decoded, waiting up to `timeout` seconds
        for it (None: as long as it takes): a consumer with other work to do asks first."""
        if self._next is _NONE:
            try:
                self._next = (self._queue.get_nowait() if timeout == 0
                              else self._queue.get(timeout=timeout))
            except queue.Empty:
                return False
        return True

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        while True:
            self.ready(None)
            item, self._next = self._next, _NONE
            if item is _DONE:
                self._thread.join()
                return
            if isinstance(item, BaseException):
                self._thread.join()
                raise item
            yield item

    def collect(self, on_frame: Optional[Callable[[int, np.ndarray], None]] = None
                ) -> SampledFrames:
        """Every frame, once decoded (open with `hold_all=True`): what `read_frames` returns."""
        images = [None] * len(self.indices)
        for position, image in self:
            images[position] = image
            if on_frame is not None:
                on_frame(position, image)
        return SampledFrames(images, list(self.indices), list(self.timestamps),
                             list(self.streams), self.exact, list(self.replaced), self.info)

    def close(self):
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def iter_frames(path, num_frames: int = 128, slow_every: int = 4, seek: str = "exact",
                prefetch: int = PREFETCH, positions: str = "midpoint",
                fps: Optional[float] = None, part: Optional[Part] = None) -> FrameReader:
    """Open the video (errors are raised here) and start decoding on a worker thread.
    `part`: sample only that part of the video (design.md §2.4)."""
    return FrameReader(path, num_frames, slow_every, seek, prefetch, positions=positions, fps=fps,
                       part=part)


def read_frames(path, num_frames: int = 128, slow_every: int = 4, seek: str = "exact",
                on_frame: Optional[Callable[[int, np.ndarray], None]] = None,
                positions: str = "midpoint", fps: Optional[float] = None,
                images: bool = True, part: Optional[Part] = None) -> SampledFrames:
    """All sampled frames at once. on_frame(position, image) is called as each arrives.
    `images=False`: indices and timestamps only (`images` holds None)."""
    with FrameReader(path, num_frames, slow_every, seek, hold_all=True,
                     positions=positions, fps=fps, images=images, part=part) as reader:
        return reader.collect(on_frame)
