"""Slow first: the Core ML tower encodes on the Neural Engine while MLX prefills on the GPU.

`prefill_while_encoding` is the schedule: a worker thread encodes the slow frames, then the
fast ones, while this thread prefills the LLM with what is ready, so both units work at the
same time. `encode_overlapped` is the encoder on it: it returns the visual tokens
`encode_video` returns, and hands them, chunk by chunk, to a conversation's prefill
(`Conversation.prefill_prefix_beside`), which leaves the KV cache `prefill_prefix` leaves.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .config import SamplingConfig
from .encode import VisualTokens, pool_stream
from .pooling import concat_streams, is_slow, with_newlines
from .preprocess import preprocess


@dataclass
class Timeline:
    """Busy intervals (perf_counter seconds) of the vision backend and of the prefill."""

    start: float
    vision: list = field(default_factory=list)
    prefill: list = field(default_factory=list)
    end: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def overlap_s(self) -> float:
        """Time both units were busy at once."""
        return overlap_seconds(self.vision, self.prefill)


def overlap_seconds(a: list, b: list) -> float:
    """Total length of the intersection of two lists of disjoint (start, end) intervals."""
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def prefill_while_encoding(
    encode: Callable[[np.ndarray], np.ndarray],
    slow: np.ndarray,
    fast: np.ndarray,
    consume: Callable,
    batch_size: int,
) -> Timeline:
    """Encode the slow frames, then the fast ones, in a worker thread, and prefill here.

    `encode` maps (n, S, S, 3) numpy pixels to (n, G*G, Dv) numpy features; it gets at
    most `batch_size` frames a call, slow frames first, and must not touch MLX.
    `consume(features: mx.array, stream)` runs on this thread in token order: once with
    all the slow features (`stream="slow"`), then with the fast features in frame order,
    as many frames at a time as are ready (`stream="fast"`). It projects, pools and runs
    the LLM on them while the worker encodes the next frames.
    """
    timeline = Timeline(start=time.perf_counter())
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()
    batches = [("slow", slow[i:i + batch_size]) for i in range(0, len(slow), batch_size)]
    batches += [("fast", fast[i:i + batch_size]) for i in range(0, len(fast), batch_size)]

    def worker():
        try:
            for stream, pixels in batches:
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                features = encode(pixels)
                timeline.vision.append((t0, time.perf_counter()))
                ready.put((stream, features))
        except BaseException as e:  # re-raised on the caller's thread
            ready.put(("error", e))

    def run_prefill(features: list, stream: str):
        t0 = time.perf_counter()
        consume(mx.array(np.concatenate(features)), stream)
        timeline.prefill.append((t0, time.perf_counter()))

    def take() -> tuple:
        stream, item = ready.get()
        if stream == "error":
            raise item
        return stream, item

    thread = threading.Thread(target=worker, name="sfllava-coreml-vision", daemon=True)
    thread.start()
    try:
        remaining = len(batches)
        slow_features = []
        for _ in range(sum(1 for s, _ in batches if s == "slow")):
            slow_features.append(take()[1])
            remaining -= 1
        if slow_features:
            run_prefill(slow_features, "slow")
        while remaining:
            fast_features = [take()[1]]  # wait for one batch, then take all that are ready
            while len(fast_features) < remaining and not ready.empty():
                fast_features.append(take()[1])
            remaining -= len(fast_features)
            run_prefill(fast_features, "fast")
    finally:
        stop.set()
        thread.join()
    timeline.end = time.perf_counter()
    return timeline


def encode_overlapped(model, clip, tower, sampling: SamplingConfig,
                      feed: Callable[[mx.array], None], frames_s: float = 0.0) -> VisualTokens:
    """The frames of `clip` (SampledFrames) -> VisualTokens, as `encode_video` makes them,
    with `tower.encode` (a CoreMLVisionTower's) on a worker thread: `feed(chunk)` gets the
    visual tokens here, in token order, as each chunk is pooled (the slow block, then the
    fast frames as they come, each chunk with its own newlines), so that whoever is fed
    prefills them while the tower encodes the next frames (`Conversation.
    prefill_prefix_beside`). Timings: `frames` (`frames_s`, reading them), `vision` (the
    time not spent in `feed`: waiting for the tower, projecting, pooling) and `overlap`
    (both units busy)."""
    cfg = model.config

    def pixels(slow: bool) -> np.ndarray:
        chosen = [im for p, im in enumerate(clip.images) if is_slow(p, sampling) == slow]
        if not chosen:
            return np.zeros((0, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32)
        return np.asarray(preprocess(chosen, cfg.preprocess))

    feature_dtype = model.projector.linear_1.weight.dtype
    pooled = {"slow": [], "fast": []}
    fed = 0.0

    def timed_feed(chunk: mx.array) -> None:
        nonlocal fed
        tic = time.perf_counter()
        feed(chunk)
        fed += time.perf_counter() - tic

    def on_features(features, stream: str):
        slow = stream == "slow"
        tokens = pool_stream(model, model.projector(features.astype(feature_dtype)), slow,
                             sampling)
        pooled[stream].append(tokens)
        # Row and frame newlines belong to each frame, so a chunk carries its own.
        timed_feed(with_newlines(tokens, sampling, model.newline))

    timeline = prefill_while_encoding(tower.encode, pixels(True), pixels(False), on_features,
                                      tower.batch_size)
    tokens = concat_streams(mx.concatenate(pooled["slow"]) if pooled["slow"] else None,
                            mx.concatenate(pooled["fast"]) if pooled["fast"] else None,
                            sampling=sampling, newline=model.newline)
    if sampling.newline == "one_token":  # after the whole video
        timed_feed(tokens[-1:])
    return VisualTokens(tokens, clip, {"frames": frames_s,
                                       "vision": max(0.0, timeline.wall_s - fed),
                                       "overlap": timeline.overlap_s})
