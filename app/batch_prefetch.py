"""`sfllava batch`: the next video decodes while the current one is encoded and answered.

One thread walks a rank's videos in order. It decodes a video's sampled frames (through
`frames.iter_frames`, whose own worker decodes) and resizes each to the tower's S x S at
once (SPEC §2.2's resize: the tower's preprocessing then finds nothing to resize, so the
pixels are the very ones `generate` feeds it), keeping them until the tower takes them.
It starts video i + 1 as soon as video i is decoded and taken: at most two videos' frames
are held, at S x S (128 x 384 x 384 x 3 bytes = 57 MB each), whatever the videos' size.

`take(i)` hands the app a FrameReader-like object for video i (attributes, iteration in
position order, context manager), which `runner.open_video(..., frames=...)` encodes as
the frames arrive; a video that failed to open raises its error there, as `generate` would.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

from sfllava_mlx.frames import iter_frames
from sfllava_mlx.preprocess import resize_frame


class PrefetchedFrames:
    def __init__(self, path: str, options: dict, size: int):
        self.path = path
        self._options = options
        self._size = size
        self._frames: list = []
        self._cond = threading.Condition()
        self._opened = threading.Event()
        self._finished = False
        self._closed = False
        self._error: Optional[BaseException] = None
        self._reader = None
        self.timings = {"frames": 0.0}

    # -- the pipeline's thread ---------------------------------------------------------
    def fill(self) -> None:
        try:
            reader = iter_frames(self.path, **self._options)
        except BaseException as e:  # raised in the app's thread, on __enter__
            self._error = e
            self._finish()
            self._opened.set()
            return
        self._reader = reader
        self._opened.set()
        last, last_small = None, None
        try:
            with reader:
                for position, image in reader:
                    if image is not last:  # positions that share a frame share its resize
                        last, last_small = image, resize_frame(image, self._size)
                    with self._cond:
                        if self._closed:
                            return
                        self._frames.append((position, last_small))
                        self._cond.notify_all()
        except BaseException as e:
            self._error = e
        finally:
            self._finish()

    def _finish(self) -> None:
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        return self._finished

    # -- the FrameReader interface (the app's thread) ----------------------------------
    def __enter__(self):
        tic = time.perf_counter()
        self._opened.wait()
        self.timings = {"frames": time.perf_counter() - tic}  # waiting for the header
        if self._reader is None:
            raise self._error
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        k = 0
        while True:
            with self._cond:
                while k >= len(self._frames) and not self._finished and not self._closed:
                    self._cond.wait()
                if k < len(self._frames):
                    item, self._frames[k] = self._frames[k], None  # the tower's now
                elif self._error is not None:
                    raise self._error
                else:
                    return
            k += 1
            yield item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._frames = []
            self._cond.notify_all()

    def __getattr__(self, name):  # info, indices, timestamps, streams, exact, replaced
        if name.startswith("_") or self._reader is None:
            raise AttributeError(name)
        return getattr(self._reader, name)


class FramePipeline:
    """Decodes `paths[i]` (None: nothing to decode) in order, one video ahead of `take`.
    `skip(i)`, asked on the pipeline's thread just before video i, may spare a decode that
    turns out useless (the video cache holds the video)."""

    _SKIPPED = object()

    def __init__(self, paths: list, options: dict, size: int, skip=None):
        self._paths = paths
        self._options = options
        self._size = size
        self._skip = skip
        self._handles: list = [None] * len(paths)
        self._taken = -1
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sfllava-batch-frames",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i, path in enumerate(self._paths):
            if path is None:
                continue
            with self._cond:
                while self._taken < i - 1 and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                skipped = self._skip is not None and self._skip(i)
            except Exception:
                skipped = False
            with self._cond:
                if skipped:
                    self._handles[i] = self._SKIPPED
                    self._cond.notify_all()
                    continue
                handle = PrefetchedFrames(path, self._options, self._size)
                self._handles[i] = handle
                self._cond.notify_all()
            handle.fill()

    def take(self, i: int) -> Optional[PrefetchedFrames]:
        with self._cond:
            self._taken = max(self._taken, i)
            self._cond.notify_all()
            if self._paths[i] is None:
                return None
            while self._handles[i] is None and not self._stop:
                self._cond.wait()
            handle, self._handles[i] = self._handles[i], None
            return None if handle is self._SKIPPED else handle

    def close(self) -> None:
        with self._cond:
            self._stop = True
            handles = [h for h in self._handles if isinstance(h, PrefetchedFrames)]
            self._cond.notify_all()
        for h in handles:
            h.close()
