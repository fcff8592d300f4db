"""`sfllava batch`: the next video is checked and decoded while the current one is encoded
and answered.

One thread walks a rank's videos in order. For each it asks the engine to prepare it (the
file, the memory plan, the cache key: `Engine.prepare`) and, unless it is a picture or the
cache holds it, decodes its sampled frames (through the opening's own FrameReader) and
resizes each to the tower's S x S at once (design.md §1.2's resize: the tower's preprocessing
then finds nothing to resize, so the pixels are the very ones `generate` feeds it). It starts
video i + 1 as soon as video i is decoded and taken: at most two videos' frames are held,
at S x S (128 x 384 x 384 x 3 bytes = 57 MB each), whatever the videos' size.

`take(i)` hands over a `Prefetched`: the opening (or the error preparing it raised, raised
again by `opening()`, as `generate` would) and the FrameReader-like frames that
`Engine.open(..., reader=...)` encodes as they arrive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Optional

from sfllava_mlx.preprocess import resize_frame


class PrefetchedFrames:
    """A video's sampled frames, filled by the pipeline's thread, read in position order."""

    def __init__(self, reader_factory: Callable, size: int):
        self._reader_factory = reader_factory
        self._size = size
        self._frames: list = []
        self._cond = threading.Condition()
        self._opened = threading.Event()
        self._finished = False
        self._closed = False
        self._error: Optional[BaseException] = None
        self._reader = None

    # -- the pipeline's thread ---------------------------------------------------------
    def fill(self) -> None:
        try:
            reader = self._reader_factory()
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

    # -- the FrameReader interface (the app's thread) ----------------------------------
    def __enter__(self):
        self._opened.wait()  # the header: the time it takes counts as the frames stage's
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

    @property
    def reader(self):
        return self._reader

    # What encode_video reads of a FrameReader once the frames are through.
    indices = property(lambda self: self._reader.indices)
    timestamps = property(lambda self: self._reader.timestamps)
    streams = property(lambda self: self._reader.streams)
    exact = property(lambda self: self._reader.exact)
    replaced = property(lambda self: self._reader.replaced)
    info = property(lambda self: self._reader.info)


class Prefetched:
    """What the pipeline made of one path: its opening (or error) and its frames."""

    def __init__(self):
        self._opening = None
        self._error: Optional[BaseException] = None
        self.frames: Optional[PrefetchedFrames] = None

    def opening(self):
        if self._error is not None:
            raise self._error
        return self._opening

    def close(self) -> None:
        if self.frames is not None:
            self.frames.close()
        if self._opening is not None:  # the file `prepare` opened, where `open` did not close it
            self._opening.close()


class FramePipeline:
    """Prepares `paths[i]` with `prepare(path)` and (with `decode`) decodes its frames, in
    order, one video ahead of `take`. A picture, or an opening `cached(opening)` says the
    video cache holds, is not decoded."""

    def __init__(self, paths: list, prepare: Callable, size: int, *, decode: bool = True,
                 cached: Callable = lambda opening: False):
        self._paths = paths
        self._prepare = prepare
        self._size = size
        self._decode = decode
        self._cached = cached
        self._handles: list = [None] * len(paths)
        self._taken = -1
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sfllava-batch-frames",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i, path in enumerate(self._paths):
            with self._cond:
                while self._taken < i - 1 and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            handle = Prefetched()
            try:
                handle._opening = opening = self._prepare(path)
            except Exception as e:  # noqa: BLE001  raised again where `generate` would raise it
                handle._error = e
                opening = None
            decode = (self._decode and opening is not None and opening.media == "video"
                      and not self._cached(opening))
            if decode:
                handle.frames = PrefetchedFrames(opening.reader, self._size)
            with self._cond:
                self._handles[i] = handle
                self._cond.notify_all()
            if decode:
                handle.frames.fill()

    def take(self, i: int) -> Prefetched:
        with self._cond:
            self._taken = max(self._taken, i)
            self._cond.notify_all()
            while self._handles[i] is None and not self._stop:
                self._cond.wait()
            handle, self._handles[i] = self._handles[i], None
            return handle

    def close(self) -> None:
        with self._cond:
            self._stop = True
            handles = [h for h in self._handles if h is not None]
            self._cond.notify_all()
        for h in handles:
            h.close()
