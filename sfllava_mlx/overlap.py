"""Slow first: the Core ML tower encodes on the Neural Engine while MLX prefills on the GPU.

`prefill_while_encoding` is the schedule: a worker thread encodes the slow frames, then the
fast ones, while this thread prefills the LLM with what is ready, so both units work at the
same time. `prefill_overlapped` applies it to a conversation: it leaves the KV cache and the
visual tokens that `encode_video` + `Conversation.prefill_prefix` leave.
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
from .conversation import Conversation, prefill
from .encode import VisualTokens
from .pooling import concat_streams, is_slow, pool_frames, stride_of, with_newlines
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
    def prefill_s(self) -> float:
        return sum(e - s for s, e in self.prefill)

    @property
    def overlap_s(self) -> float:
        """Time both units were busy at once."""
        return overlap_seconds(self.vision, self.prefill)

    def critical_path(self) -> dict:
        """design.md §1.9 stage shares: prefill ran on this thread, so all of it is on the
        critical path; vision counts only the time this thread waited for the encoder."""
        return {"vision": max(0.0, self.wall_s - self.prefill_s), "prefill": self.prefill_s}


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


def prefill_overlapped(conversation: Conversation, clip, tower, sampling: SamplingConfig,
                       frames_s: float = 0.0) -> VisualTokens:
    """Prefill the conversation's prefix — the text before `<image>` and the video, slow
    block first — while `tower.encode` (a CoreMLVisionTower's) encodes the frames of `clip`
    (SampledFrames) on a worker thread; returns the visual tokens, as `encode_video` makes
    them, with the critical-path timings (`frames_s`: the time the frames took to read)."""
    model = conversation.model
    cfg = model.config
    g = cfg.vision.grid
    feature_dtype = model.projector.linear_1.weight.dtype
    embed_dtype = conversation.dtype

    def pixels(slow: bool) -> np.ndarray:
        chosen = [im for p, im in enumerate(clip.images) if is_slow(p, sampling) == slow]
        if not chosen:
            return np.zeros((0, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32)
        return np.asarray(preprocess(chosen, cfg.preprocess))

    pooled = {"slow": [], "fast": []}
    text = [model.embed_tokens(conversation.prefix_tokens()).astype(embed_dtype)]

    def run(embeds):
        prefill(model.language_model, conversation.cache, embeddings=embeds,
                step=conversation.prefill_step, **conversation.kv_options)

    def on_features(features, stream: str):
        grid = model.projector(features.astype(feature_dtype)).reshape(features.shape[0], g, g, -1)
        tokens = pool_frames(grid, stride_of(stream == "slow", sampling), sampling.pool_mode)
        pooled[stream].append(tokens)
        # Row and frame newlines belong to each frame, so a chunk carries its own.
        chunk = with_newlines(tokens, sampling, model.newline).astype(embed_dtype)
        run(mx.concatenate(text + [chunk]))  # position 0 is slow: the first call has the text
        text.clear()
        mx.eval(pooled[stream][-1:])

    timeline = prefill_while_encoding(tower.encode, pixels(True), pixels(False), on_features,
                                      tower.batch_size)
    if sampling.newline == "one_token":  # after the whole video
        run(model.newline.astype(embed_dtype)[None])
    tokens = concat_streams(mx.concatenate(pooled["slow"]) if pooled["slow"] else None,
                            mx.concatenate(pooled["fast"]) if pooled["fast"] else None,
                            sampling=sampling, newline=model.newline)
    shares = timeline.critical_path()
    conversation.visual = VisualTokens(tokens, clip, {"frames": frames_s, "vision": shares["vision"],
                                                      "overlap": timeline.overlap_s})
    conversation.prefix_filled(shares["prefill"])
    return conversation.visual
