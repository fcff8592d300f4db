"""From a video to an answer: visual tokens, the prompt, and generation through mlx-lm.

`encode_video` turns sampled frames into the pooled visual tokens. `Conversation` keeps
the KV cache across turns, so a follow-up question prefills only its own tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import mlx.core as mx
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from . import prompt as chatml
from .errors import ContextOverflowError
from .pooling import concat_streams, is_slow, num_visual_tokens, pool_frames, stride_of
from .preprocess import preprocess

if TYPE_CHECKING:
    from .frames import SampledFrames

VISION_BATCH = 8  # frames per tower call: bounds the working set whatever the frame count
# Prefill chunk. Where attention is not fused (MLX's CPU backend) each chunk materializes
# heads x chunk x context scores: 512 keeps that near 200 MB for 1.5B at 8K context.
PREFILL_STEP = 512


@dataclass
class VisualTokens:
    embeddings: mx.array  # (Nv, D), slow block then fast block
    clip: Optional["SampledFrames"]
    timings: dict = field(default_factory=lambda: {"frames": 0.0, "vision": 0.0})


class _Stopwatch:
    """Adds elapsed wall time to named stages: critical-path shares, nothing counted twice."""

    def __init__(self, timings: dict):
        self.timings = timings
        self.mark = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.mark
        self.mark = now


def encode_frames(model, frames, *, vision=None, batch_size=VISION_BATCH,
                  progress: Optional[Callable[[int, int], None]] = None,
                  timings: Optional[dict] = None, sampling=None) -> mx.array:
    """Frames in position order (an iterable of RGB uint8 images) -> pooled visual tokens.

    Each batch goes through tower and projector and is pooled right away (pooling is per
    frame), so memory holds one batch of full grids, never all 128. `timings` gains the
    critical-path shares `decode` (waiting for frames), `preprocess`, their sum `frames`,
    and `vision` (tower, projector, pooling).
    """
    cfg = model.config
    sampling = sampling or cfg.sampling
    vision = vision or model.vision_tower
    timings = timings if timings is not None else {}
    before = {k: timings.get(k, 0.0) for k in ("decode", "preprocess")}
    watch = _Stopwatch(timings)
    slow, fast, batch, done = [], [], [], 0
    total = sampling.num_frames

    def flush():
        nonlocal done
        pixels = preprocess([im for _, im in batch], cfg.preprocess)
        watch.lap("preprocess")
        grid = model.projector(vision(pixels))  # (B, G*G, D)
        g = cfg.vision.grid
        grid = grid.reshape(len(batch), g, g, -1)
        pos = [p for p, _ in batch]
        for stream, out in ((True, slow), (False, fast)):
            rows = [j for j, p in enumerate(pos) if is_slow(p, sampling) == stream]
            if rows:
                out.append(pool_frames(grid[mx.array(rows)], stride_of(stream, sampling),
                                       sampling.pool_mode))
        mx.eval(slow, fast)
        done += len(batch)
        batch.clear()
        watch.lap("vision")
        if progress:
            progress(done, total)

    for position, image in enumerate(frames):
        watch.lap("decode")
        batch.append((position, image))
        if len(batch) == batch_size:
            flush()
    watch.lap("decode")
    if batch:
        flush()
    tokens = concat_streams(mx.concatenate(slow) if slow else None,
                            mx.concatenate(fast) if fast else None,
                            sampling=sampling, newline=model.newline)
    mx.eval(tokens)
    watch.lap("vision")
    timings["frames"] = timings.get("frames", 0.0) + sum(
        timings[k] - before[k] for k in ("decode", "preprocess"))
    return tokens


def encode_video(model, clip, *, vision=None, batch_size=VISION_BATCH, progress=None,
                 on_frame: Optional[Callable[[int, int], None]] = None,
                 sampling=None) -> VisualTokens:
    """Sampled frames -> VisualTokens. `vision` swaps the tower (e.g. a Core ML backend).

    `clip` is a SampledFrames (frames in memory) or a `frames.FrameReader`, whose frames
    decode on a worker thread while the tower encodes the ones already there.
    `progress(done, total)` follows the tower, `on_frame(done, total)` the frames.
    `sampling` is this video's recipe (default: the model's; `--fps` makes one per video).
    """
    timings = {"frames": float((getattr(clip, "timings", None) or {}).get("frames", 0.0)),
               "vision": 0.0}
    streaming = not hasattr(clip, "images")
    sampling = sampling or model.config.sampling
    total = sampling.num_frames

    def images():
        for done, item in enumerate(clip if streaming else clip.images, 1):
            if on_frame:
                on_frame(done, total)
            yield item[1] if streaming else item

    tokens = encode_frames(model, images(), vision=vision, batch_size=batch_size,
                           progress=progress, timings=timings, sampling=sampling)
    expected = num_visual_tokens(model.config.vision.grid, sampling)
    assert tokens.shape[0] == expected, (tokens.shape, expected)
    return VisualTokens(tokens, frames_of(clip) if streaming else clip, timings)


def frames_of(reader) -> "SampledFrames":
    """What a FrameReader sampled (without the images, which were not kept)."""
    from .frames import SampledFrames

    return SampledFrames([], list(reader.indices), list(reader.timestamps),
                         list(reader.streams), reader.exact, list(reader.replaced), reader.info)


@dataclass
class Turn:
    question: str
    text: str = ""
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_tokens: int = 0
    timings_s: dict = field(default_factory=dict)
    peak_memory_gb: float = 0.0
    finish_reason: Optional[str] = None


class Conversation:
    """One video, many questions; the KV cache is kept between turns (SPEC §2.7)."""

    def __init__(self, model, tokenizer, visual: VisualTokens, *, system_prompt=None,
                 max_kv_size=None, kv_bits=None, kv_group_size=64,
                 prefill_step_size=PREFILL_STEP, timestamps: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.visual = visual
        self.timestamps = timestamps  # LLaVA-Video's time instruction before the first question
        self.system_prompt = system_prompt or model.config.prompt.system_prompt
        self.max_kv_size = max_kv_size
        self.kv_options = dict(kv_bits=kv_bits, kv_group_size=kv_group_size)
        self.prefill_step_size = prefill_step_size
        self.turns: list[Turn] = []
        self.reset()

    # -- state ---------------------------------------------------------------
    def reset(self) -> None:
        """A new conversation about the same video: no re-encoding, and the prefilled
        video stays in the cache when it can be trimmed back to it."""
        self.turns = []
        if getattr(self, "prefix_done", False) and can_trim_prompt_cache(self.cache):
            self._rewind(self.prefix_length())
            return
        self.cache = make_prompt_cache(self.model.language_model, max_kv_size=self.max_kv_size)
        self.prefix_done = False
        self.unreported = None  # the video's work, reported with the next answer

    def restore_prefix(self, cache: list) -> None:
        """Start from a saved KV cache of the prefix (system prompt + video)."""
        self.turns = []
        self.cache = cache
        self.prefix_done = True
        self.unreported = None

    @property
    def offset(self) -> int:
        """Tokens held in the KV cache."""
        return self.cache[0].offset if self.cache else 0

    @property
    def last_turn(self) -> Optional[Turn]:
        return self.turns[-1] if self.turns else None

    def prefix_tokens(self) -> list:
        before, _ = chatml.first_turn(self.system_prompt, "")
        return chatml.encode(self.tokenizer, before)

    def prefix_length(self) -> int:
        return len(self.prefix_tokens()) + self.visual.embeddings.shape[0]

    # -- prefill -------------------------------------------------------------
    def prefill_prefix(self, progress=None) -> float:
        """Prefill system prompt + video into the cache; returns seconds spent."""
        if self.prefix_done:
            return 0.0
        tic = time.perf_counter()
        ids = self.prefix_tokens()
        embeds = mx.concatenate([self.model.embed_tokens(ids),
                                 self.visual.embeddings.astype(self._dtype())])
        self._check_context(embeds.shape[0])
        placeholder = mx.zeros((embeds.shape[0],), dtype=mx.int32)
        try:
            # max_tokens=0: mlx-lm's chunked prefill with progress, and no token sampled.
            for _ in generate_step(placeholder, self.model.language_model, max_tokens=0,
                                   prompt_cache=self.cache, input_embeddings=embeds,
                                   prefill_step_size=self.prefill_step_size,
                                   prompt_progress_callback=progress, **self.kv_options):
                pass
            mx.eval([c.state for c in self.cache])
        except BaseException:  # a half-filled cache is useless: start clean next time
            self.cache = make_prompt_cache(self.model.language_model, max_kv_size=self.max_kv_size)
            raise
        return self._prefix_filled(time.perf_counter() - tic)

    def prefill_overlapped(self, clip, tower, sampling=None) -> VisualTokens:
        """Encode the video on another unit (a Core ML tower) while MLX prefills what is
        ready, slow frames first; sets and returns the visual tokens."""
        from .coreml_vision import overlapped_prefill

        tokens, timeline = overlapped_prefill(
            self.model, self.cache, self.prefix_tokens(), clip.images, tower.encode,
            tower.batch_size, prefill_step_size=self.prefill_step_size, kv_options=self.kv_options,
            sampling=sampling)
        shares = timeline.critical_path()
        frames = float((getattr(clip, "timings", None) or {}).get("frames", 0.0))
        self.visual = VisualTokens(tokens, clip, {"frames": frames, "vision": shares["vision"],
                                                  "overlap": timeline.overlap_s})
        self._prefix_filled(shares["prefill"])
        return self.visual

    def _prefix_filled(self, prefill_s: float) -> float:
        self.prefix_done = True
        self.unreported = {"frames": self.visual.timings.get("frames", 0.0),
                           "vision": self.visual.timings.get("vision", 0.0),
                           "prefill": prefill_s, "tokens": self.prefix_length()}
        return prefill_s

    def _dtype(self):
        return self.model.language_model.model.norm.weight.dtype

    @property
    def context_limit(self) -> int:
        """Tokens the cache may hold. A rotating cache (--max-kv-size) would overwrite the
        video once full, so its size is a limit too: never cut the video out silently."""
        return min(self.model.context_length, self.max_kv_size or self.model.context_length)

    def _check_context(self, new_tokens: int) -> None:
        limit = self.context_limit
        if self.offset + new_tokens > limit:
            what = ("--max-kv-size" if limit < self.model.context_length
                    else "the model's context")
            raise ContextOverflowError(
                f"the conversation would pass {what} ({self.offset + new_tokens} > {limit} "
                f"tokens); start a new conversation (/reset)")

    def question_tokens(self, question: str) -> list:
        if not self.turns:
            if self.timestamps:
                question = f"{self.time_instruction()}\n{question}"
            _, after = chatml.first_turn(self.system_prompt, question)
            return chatml.encode(self.tokenizer, after)
        return chatml.encode(self.tokenizer, chatml.next_turn(question))

    def time_instruction(self) -> str:
        """SPEC §2.10's text from the sampled frames' timestamps (also for a cached video)."""
        clip = self.visual.clip
        info = clip.info
        n = info["num_frames"] if isinstance(info, dict) else info.num_frames
        fps = info["fps"] if isinstance(info, dict) else info.fps
        from .frames import video_duration

        return chatml.time_instruction(video_duration(n, fps), clip.timestamps)

    # -- a turn --------------------------------------------------------------
    def ask(self, question: str, *, max_tokens=512, temp=0.0, top_p=1.0, seed=None,
            progress=None, start_time=None) -> Iterator:
        """Stream the answer as mlx-lm GenerationResponses; the Turn is in `last_turn`.

        The last response may carry `finish_reason == "stop"`: its text is the end of the
        answer, its token the end token (not part of the answer).
        """
        start = start_time or time.perf_counter()
        turn = Turn(question, timings_s=dict.fromkeys(
            ("frames", "vision", "prefill", "ttft", "generate"), 0.0))
        timings = turn.timings_s
        if not self.prefix_done:
            self.prefill_prefix(progress)
        if self.unreported:  # the video's own work is reported once, with the next answer
            done, self.unreported = self.unreported, None
            turn.prompt_tokens += done.pop("tokens")
            timings.update(done)
        ids = self.question_tokens(question)
        self._check_context(len(ids) + 1)  # room for at least one answer token
        turn.prompt_tokens += len(ids)
        before = self.offset
        max_tokens = max(1, min(max_tokens, self.context_limit - before - len(ids)))
        if seed is not None:
            mx.random.seed(seed)
        self.turns.append(turn)
        tic = time.perf_counter()
        try:
            for r in stream_generate(self.model.language_model, self.tokenizer, mx.array(ids),
                                     max_tokens=max_tokens, prompt_cache=self.cache,
                                     sampler=make_sampler(temp, top_p),
                                     max_kv_size=self.max_kv_size,
                                     prefill_step_size=self.prefill_step_size, **self.kv_options):
                if not timings["ttft"]:
                    now = time.perf_counter()
                    timings["prefill"] += now - tic
                    timings["ttft"] = now - start
                    tic = now
                turn.text += r.text
                turn.finish_reason = r.finish_reason
                if r.finish_reason != "stop":
                    turn.tokens.append(r.token)
                    turn.logprobs.append(r.logprobs[r.token].item())
                yield r
        finally:
            timings["generate"] = time.perf_counter() - tic
            turn.peak_memory_gb = mx.get_peak_memory() / 1e9
            if turn.tokens or turn.finish_reason:
                self._rewind(before + len(ids) + len(turn.tokens))
            else:  # interrupted before the first token: as if the question was never asked
                self._rewind(before)
                self.turns.pop()

    def _rewind(self, length: int) -> None:
        """Keep the answer's tokens in the cache, drop what mlx-lm computed past them."""
        extra = self.offset - length
        if extra > 0:
            trim_prompt_cache(self.cache, extra)
