"""Images to visual tokens. `encode_images_steps` is the one way pixels meet the vision tower
and the projector, a batch at a time: a video's sampled frames (then SlowFast pooling, each
batch at once, so memory holds one batch of full grids, never all 128) and a picture's tiles
(`image.encode_image_steps`). The Core ML overlap pools with the same `pool_stream`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from .config import VISION_BATCH, PreprocessConfig, SamplingConfig
from .frames import SampledFrames
from .pooling import concat_streams, is_slow, pool_frames, stride_of
from .preprocess import preprocess
from .steps import Steps, Wait, run
from .tokens import num_visual_tokens

_END = object()


@dataclass
class VisualTokens:
    embeddings: mx.array  # (Nv, D), slow block then fast block
    clip: SampledFrames  # what they were made from (a video's frames or a picture)
    timings: dict = field(default_factory=lambda: {"frames": 0.0, "vision": 0.0})


class Stopwatch:
    """Adds elapsed wall time to named stages: critical-path shares, nothing counted twice."""

    def __init__(self, timings: dict):
        self.timings = timings
        self.mark = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.mark
        self.mark = now


def encode_frames(model, frames, sampling: SamplingConfig, **kw) -> mx.array:
    """Frames in position order (an iterable of RGB uint8 images) -> pooled visual tokens
    (`encode_frames_steps`, all at once)."""
    return run(encode_frames_steps(model, frames, sampling, **kw))


def encode_images_steps(model, images, config: PreprocessConfig,
                        take: Callable[[list, mx.array], None], *, vision=None,
                        batch_size: int = VISION_BATCH, total: int = 0,
                        progress: Optional[Callable[[int, int], None]] = None,
                        timings: Optional[dict] = None,
                        ready: Optional[Wait] = None) -> Steps[None]:
    """The one way images meet the tower: RGB uint8 images (a video's frames, a picture's
    tiles) preprocessed by `config`, through `vision` (the model's tower, else e.g. the Core
    ML one) and the projector, a batch at a time; `take(positions, features)` gets each
    batch's (B, G*G, D) features and their positions in `images`.

    A step after each batch, and, where `ready(0)` says the next image is not decoded yet,
    a pause that yields `ready` (whoever runs the steps waits on it, or does other work
    meanwhile). `timings` gains the critical-path shares `decode` (waiting for images),
    `preprocess` and `vision`; `progress(done, total)` follows the tower.
    """
    vision = vision or model.vision_tower
    watch = Stopwatch(timings if timings is not None else {})
    batch, done = [], 0

    def flush():
        nonlocal done
        pixels = preprocess([im for _, im in batch], config)
        watch.lap("preprocess")
        take([p for p, _ in batch], model.projector(vision(pixels)))
        done += len(batch)
        batch.clear()
        watch.lap("vision")
        if progress:
            progress(done, total)

    images = iter(images)
    for position in itertools.count():
        while ready is not None and not ready(0):
            yield ready
        image = next(images, _END)
        watch.lap("decode")
        if image is _END:
            break
        batch.append((position, image))
        if len(batch) == batch_size:
            flush()
            yield
    if batch:
        flush()


def pool_stream(model, features: mx.array, slow: bool, sampling: SamplingConfig) -> mx.array:
    """One stream's projected frames (T, G*G, D) -> pooled (T, g, g, D), evaluated."""
    g = model.config.vision.grid
    pooled = pool_frames(features.reshape(features.shape[0], g, g, -1),
                         stride_of(slow, sampling), sampling.pool_mode)
    mx.eval(pooled)
    return pooled


def encode_frames_steps(model, frames, sampling: SamplingConfig, *, vision=None,
                        batch_size: int = VISION_BATCH,
                        progress: Optional[Callable[[int, int], None]] = None,
                        timings: Optional[dict] = None,
                        ready: Optional[Wait] = None) -> Steps[mx.array]:
    """`encode_frames` in steps (`encode_images_steps`'): each batch is pooled as soon as it
    is projected (pooling is per frame), so memory holds one batch of full grids. `timings`
    gains `decode`, `preprocess`, their sum `frames`, and `vision` (tower, projector,
    pooling)."""
    timings = timings if timings is not None else {}
    before = {k: timings.get(k, 0.0) for k in ("decode", "preprocess")}
    streams = {True: [], False: []}  # slow, fast

    def take(positions: list, features: mx.array) -> None:
        for slow, out in streams.items():
            rows = [j for j, p in enumerate(positions) if is_slow(p, sampling) == slow]
            if rows:
                out.append(pool_stream(model, features[mx.array(rows)], slow, sampling))

    yield from encode_images_steps(model, frames, model.config.preprocess, take, vision=vision,
                                   batch_size=batch_size, total=sampling.num_frames,
                                   progress=progress, timings=timings, ready=ready)
    watch = Stopwatch(timings)
    slow, fast = (mx.concatenate(streams[k]) if streams[k] else None for k in (True, False))
    tokens = concat_streams(slow, fast, sampling=sampling, newline=model.newline)
    mx.eval(tokens)
    watch.lap("vision")
    timings["frames"] = timings.get("frames", 0.0) + sum(
        timings.get(k, 0.0) - before[k] for k in ("decode", "preprocess"))
    return tokens


def encode_video(model, clip, sampling: SamplingConfig, **kw) -> VisualTokens:
    """Sampled frames -> VisualTokens (`encode_video_steps`, all at once)."""
    return run(encode_video_steps(model, clip, sampling, **kw))


def encode_video_steps(model, clip, sampling: SamplingConfig, *, frames_s: float = 0.0,
                       vision=None, batch_size: int = VISION_BATCH, progress=None,
                       on_frame: Optional[Callable[[int, int], None]] = None,
                       ready: Optional[Wait] = None) -> Steps[VisualTokens]:
    """Sampled frames -> VisualTokens, a step per batch of frames (and a pause on `ready`,
    a FrameReader's, while it has no frame decoded). `vision` swaps the tower (e.g. a Core
    ML backend).

    `clip` is a SampledFrames (frames in memory) or a FrameReader, whose frames decode on a
    worker thread while the tower encodes the ones already there. `frames_s`: the time
    already spent on the frames (opening the reader, or reading them all), counted in the
    `frames` stage. `progress(done, total)` follows the tower, `on_frame(done, total)` the
    frames.
    """
    timings = {"frames": frames_s, "vision": 0.0}
    streaming = not isinstance(clip, SampledFrames)
    total = sampling.num_frames

    def images():
        for done, item in enumerate(clip if streaming else clip.images, 1):
            if on_frame:
                on_frame(done, total)
            yield item[1] if streaming else item

    tokens = yield from encode_frames_steps(model, images(), sampling, vision=vision,
                                            batch_size=batch_size, progress=progress,
                                            timings=timings,
                                            ready=ready)
    expected = num_visual_tokens(model.config.vision.grid, sampling)
    assert tokens.shape[0] == expected, (tokens.shape, expected)
    return VisualTokens(tokens, frames_of(clip) if streaming else clip, timings)


def frames_of(reader) -> SampledFrames:
    """What a FrameReader sampled (without the images, which were not kept)."""
    return SampledFrames([], list(reader.indices), list(reader.timestamps),
                         list(reader.streams), reader.exact, list(reader.replaced), reader.info)
