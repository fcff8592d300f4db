"""The library API (design.md §6.2): an Engine holds one loaded model and the video cache; `open`
checks a video or a picture — the file, the memory plan, the context — before anything is
decoded, then returns a Session with the options it was opened with.

    from sfllava_mlx import Engine
    engine = Engine("~/models/ov-0.5b")
    chat = engine.open("holiday.mp4", recipe="slowfast")
    for chunk in chat.ask("What happens?"):
        print(chunk.text, end="")

The steps, each written once: `prepare` (file, recipe, memory plan, cache key), the cache
lookup, the encode (frames streamed into the tower, or Core ML beside the prefill, or a
picture's tiles), the conversation with its prefix read back from the cache on a hit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Optional

from .cache import (
    ContentHasher,
    Fingerprint,
    TranscriptCache,
    VideoCache,
    image_key,
    model_identity,
    video_key,
)
from .config import SamplingConfig
from .conversation import Conversation, context_limit
from .encode import VisualTokens, encode_video_steps
from .frames import Span, VideoInfo, frames_for_rate, sampled_timestamps, video_duration
from .frames.reader import FrameReader
from .image import (
    PictureInfo,
    PictureLayout,
    encode_image_steps,
    num_image_tokens,
    read_image,
)
from .media import Video, open_media, opened
from .memory import MIN_TEXT_TOKENS, MemoryPlan, check, check_context, check_video, plan_tokens
from .model import load
from .options import Options, resolved
from .prompt import encode, time_instruction
from .session import Session
from .steps import Steps, run
from .subtitles import SubtitleTrack, resolve, transcribe

# progress(stage, done, total), stage being "speech" (seconds of audio transcribed),
# "frames", "vision" or "prefill"
Progress = Callable[[str, int, int], None]


@dataclass
class Opening:
    """A media file checked for opening, nothing decoded yet: what it is, how it will be
    sampled, the memory plan and the cache key."""

    path: str
    media: str  # "video" or "image"
    options: Options
    memory: MemoryPlan
    started: float  # perf_counter when the request began: the first ttft counts from here
    sampling: Optional[SamplingConfig] = None  # a video's recipe as sampled (T after --fps)
    picture: Optional[PictureInfo] = None
    fingerprint: Optional[Fingerprint] = None
    key: Optional[object] = None  # cache.CacheKey, where the cache is on
    span: Optional[Span] = None  # a part's frames (design.md §2.4); None: the whole video
    subtitles: Optional[SubtitleTrack] = None  # what is said (design.md §2.5); None: nothing
    warnings: list = field(default_factory=list)  # for the user, e.g. a broken sidecar
    # The options as this media resolved them (`options.resolved`): what records carry and
    # what keys are built from.
    resolved: dict = field(default_factory=dict)
    video: Optional[Video] = None  # the video opened once (media.py), every step's

    def reader(self, hold_all: bool = False) -> FrameReader:
        """A FrameReader of this video's sampled frames, decoding on a worker thread."""
        s = self.sampling
        return self.video.reader(num_frames=s.num_frames, slow_every=s.slow_every,
                                 seek=self.options.seek, positions=s.frame_positions,
                                 part=self.options.part, hold_all=hold_all)

    def read_all(self):
        with self.reader(hold_all=True) as reader:
            return reader.collect()

    def close(self) -> None:
        """Close the video's file and container (a FrameReader closes what it took)."""
        if self.video is not None:
            self.video.close()


def model_name(path_or_repo: str) -> str:
    """design.md §7's model id: the last path part of a directory, or the hub repo id."""
    expanded = os.path.expanduser(path_or_repo)
    if os.path.exists(expanded):
        return os.path.basename(os.path.normpath(expanded))
    return path_or_repo


class Engine:
    """One loaded model and the persistent video cache, for any number of Sessions."""

    def __init__(self, model, tokenizer=None, *, dtype=None, cache_dir=None, quantize=False,
                 q_bits=4, q_group_size=64):
        """`model`: a model directory or hub repo id of any kind `load` takes (a Hugging Face
        checkpoint is converted on first use, with dtype / quantize / q_bits / q_group_size
        meaning what they mean to `sfllava convert`), loaded here; or an SFLLaVA already
        loaded (random weights, tests), with its `tokenizer`."""
        if tokenizer is None:
            self.name = model_name(str(model))
            model, tokenizer = load(str(model), dtype=dtype, quantize=quantize, q_bits=q_bits,
                                    q_group_size=q_group_size)
        else:
            self.name = model_name(str(model.path)) if model.path else "model"
        self.model, self.tokenizer = model, tokenizer
        self.store = VideoCache(cache_dir)
        self.transcripts = TranscriptCache(self.store.root.parent)  # speech, beside the videos
        self._identity: Optional[str] = None
        self._towers: dict = {}

    @property
    def identity(self) -> str:
        """The model's content identity (the cache keys on it), hashed once."""
        if self._identity is None:
            self._identity = model_identity(self.model)
        return self._identity

    @property
    def dtype(self) -> str:
        return str(self.model.language_model.model.norm.weight.dtype).replace("mlx.core.", "")

    @property
    def context_length(self) -> int:
        return self.model.context_length

    # -- checking ------------------------------------------------------------------------
    def plan(self, media, **options) -> MemoryPlan:
        """The memory plan and the context check of opening `media`; UserError if it cannot
        fit. Decodes nothing. It counts the subtitle lines the frames will select; speech not
        transcribed yet is not counted here (`open` transcribes it, then checks again)."""
        with opened(media) as checked:  # closed here if opened here: nothing is decoded
            return self.prepare(checked, **options).memory

    def prepare(self, media, **options) -> Opening:
        """`media`: a path, or what `media.open_media` opened (the commands open it before
        the model loads, so that every step takes the same open file)."""
        started = time.perf_counter()
        opts = Options.of(**options)
        found = open_media(media)
        if not isinstance(found, Video):
            return self._prepare_picture(found, opts, started)
        try:
            return self._prepare_video(found, opts, started)
        except BaseException:  # refused (memory, context, subtitles): closed if opened here
            if found is not media:
                found.close()
            raise

    def _context(self, opts: Options) -> tuple[int, str]:
        limit = context_limit(self.context_length, opts.max_kv_size)
        return limit, "--max-kv-size" if limit < self.context_length else "the model's context"

    def _system_prompt(self, opts: Options) -> str:
        return opts.system_prompt or self.model.config.prompt.system_prompt

    def _sampling(self, video: Video, opts: Options) -> tuple[SamplingConfig, Optional[Span]]:
        """The recipe as this video samples it (its T after --fps) and the part's frames."""
        sampling = self.model.config.recipe(opts.recipe, opts.num_frames)
        # A part is found (or refused) on the index: nothing decoded (design.md §2.4).
        span = video.span(opts.part)
        if opts.fps is not None:
            if span is not None:  # --fps over the part's frames alone
                count, rate = span.count, span.rate
            else:
                count, rate = video.info.num_frames, video.info.fps
            sampling = replace(sampling, num_frames=frames_for_rate(
                sampling.num_frames, count, rate, opts.fps))
        return sampling, span

    def resolve(self, media, **options) -> dict:
        """The options as `media` resolves them (the `options` its records carry: the T
        actually sampled, the subtitle source actually read, the part in seconds), without
        the memory plan: what a batch keys its lines by before answering."""
        opts = Options.of(**options)
        with opened(media) as video:
            if not isinstance(video, Video):
                return self._resolved(opts)
            sampling, _ = self._sampling(video, opts)
            found = resolve(video, opts.subtitles, opts.subtitle_lang, opts.speech_model)
        return self._resolved(opts, sampling, found.track)

    def _resolved(self, opts: Options, sampling: Optional[SamplingConfig] = None,
                  track=None) -> dict:
        """The record's options: a video's (`sampling` as it samples), else a picture's."""
        return resolved(opts, num_frames=sampling.num_frames if sampling else None,
                        subtitles=track.read_from() if track is not None else None,
                        speech_model=track.model if track is not None else None,
                        system_prompt=self._system_prompt(opts),
                        media="video" if sampling else "image")

    def _prepare_video(self, video: Video, opts: Options, started: float) -> Opening:
        sampling, span = self._sampling(video, opts)
        fingerprint = video.fingerprint if opts.cache else None
        found = resolve(video, opts.subtitles, opts.subtitle_lang, opts.speech_model,
                        self.transcripts if opts.cache else None, fingerprint)
        record = self._resolved(opts, sampling, found.track)
        key = (video_key(fingerprint, self.identity, self.dtype, sampling, record)
               if opts.cache else None)
        opening = Opening(video.path, "video", opts, None, started, sampling=sampling,
                          fingerprint=fingerprint, key=key, span=span, subtitles=found.track,
                          warnings=found.warnings, resolved=record, video=video)
        opening.memory = self._check_video(opening)
        return opening

    def _check_video(self, opening: Opening) -> MemoryPlan:
        """The memory plan and the context check, the subtitles' tokens counted."""
        opts = opening.options
        limit, limit_name = self._context(opts)
        return check_video(self.model, opening.sampling, context_limit=limit,
                           context_name=limit_name, max_tokens=opts.max_tokens,
                           kv_bits=opts.kv_bits, max_kv_size=opts.max_kv_size,
                           text_tokens=self._subtitle_tokens(opening))

    def subtitle_lines(self, opening: Opening):
        """The subtitle lines (`SubtitleLines`) the sampled frames will select, or None
        without subtitles. The frames' timestamps come, before anything is decoded, from the
        cache entry of the video or from its index (exact: they move only where a frame
        fails to decode and a neighbour replaces it; the prompt is built from the frames
        actually sampled)."""
        track = opening.subtitles
        if track is None or not track.events:
            return None
        times = self.store.cached_timestamps(opening.key) if opening.key is not None else None
        if times is None:
            s = opening.sampling
            times = sampled_timestamps(opening.video.index, s.num_frames, opening.options.seek,
                                       s.frame_positions, opening.span)
        return track.select(times)

    def _subtitle_tokens(self, opening: Opening) -> int:
        """The tokens of the subtitle lines the sampled frames will select."""
        lines = self.subtitle_lines(opening)
        block = lines.prompt() if lines is not None else ""
        return len(encode(self.tokenizer, block + "\n")) if block else 0

    def _transcribe(self, opening: Opening, progress) -> Opening:
        """Speech not cached yet: transcribed now, before any frame is decoded, and the
        plan checked again with what was said."""
        track = opening.subtitles
        if track is None or track.events is not None:
            return opening
        track = transcribe(track, opening.video,
                           self.transcripts if opening.options.cache else None,
                           opening.fingerprint, progress=_stage(progress, "speech"))
        opening = replace(opening, subtitles=track)
        opening.memory = self._check_video(opening)
        return opening

    def _prepare_picture(self, info: PictureInfo, opts: Options, started: float) -> Opening:
        path = info.path
        config = self.model.config
        tokens = num_image_tokens(config, info.size)
        inputs = 1
        if config.image.anyres:
            from .anyres import tiling

            inputs = tiling(info.size, config.image, config.vision.image_size,
                               config.vision.grid).num_tiles
        limit, limit_name = self._context(opts)
        check_context(tokens + MIN_TEXT_TOKENS, limit,
                      f"this picture's {tokens} visual tokens and the prompt", limit_name)
        memory = check(plan_tokens(self.model, tokens, inputs, max_tokens=opts.max_tokens,
                                   kv_bits=opts.kv_bits, max_kv_size=opts.max_kv_size),
                       "this picture", lambda: ["a smaller model"])
        fingerprint = key = None
        if opts.cache:
            fingerprint = Fingerprint.of(path)
            key = image_key(fingerprint, self.identity, self.dtype, config.image)
        return Opening(path, "image", opts, memory, started, picture=info,
                       fingerprint=fingerprint, key=key, resolved=self._resolved(opts))

    def cached(self, opening: Opening) -> bool:
        """Whether the cache holds this opening's visual tokens (nothing to decode)."""
        return opening.key is not None and self.store.entry_dir(opening.key).is_dir()

    # -- opening ---------------------------------------------------------------------------
    def open(self, media, *, progress: Optional[Progress] = None, prefill: bool = False,
             reader=None, tower=None, **options) -> Session:
        """A Session about `media` (a path, or an Opening from `prepare`), through the cache
        unless `cache=False`. `prefill=True` also prefills the prompt's prefix now, so the
        first question prefills only its own tokens. `reader`: a FrameReader-like object
        already decoding this video (a batch's prefetch), used on a cache miss. `tower`:
        a stand-in for the vision backend (the profiler's timed tower)."""
        return run(self.open_steps(media, progress=progress, prefill=prefill, reader=reader,
                                   tower=tower, **options))

    def open_steps(self, media, *, progress: Optional[Progress] = None, prefill: bool = False,
                   reader=None, tower=None, **options) -> Steps[Session]:
        """`open` in bounded steps (`steps.py`): a step per batch of frames through the
        tower and per prefill chunk, a pause while the next frame decodes; the rest (the
        checks, a cache hit's read, a picture's tiles) is one step each. A server decodes
        other answers between them."""
        if isinstance(media, Opening):  # prepared earlier: the request starts now
            opening = replace(media, started=time.perf_counter())
        else:
            opening = self.prepare(media, **options)
        conversation = entry = hasher = None
        try:
            opening = self._transcribe(opening, progress)
            opts = opening.options
            if opening.key is not None:
                hidden = self.model.config.projector.hidden_size
                entry = self.store.lookup(opening.key, opening.fingerprint, hidden_size=hidden,
                                          num_tokens=opening.memory.visual_tokens)
            if entry is None and opening.key is not None:  # the full hash, while frames decode
                hasher = (opening.video.hasher() if opening.video is not None
                          else ContentHasher(opening.path))
            if entry is not None:
                clip = entry.clip(VideoInfo if opening.media == "video" else PictureLayout)
                visual = VisualTokens(entry.visual, clip, {"frames": 0.0, "vision": 0.0})
            elif opening.media == "image":
                visual = yield from encode_image_steps(
                    self.model, read_image(opening.path, opening.picture), vision=tower,
                    progress=_stage(progress, "vision"))
            elif opts.vision_backend == "coreml":  # the prefix prefills as the tokens come
                conversation = self._encode_overlapped(opening, tower or self.vision_backend(opts))
                visual = conversation.visual
            else:
                visual = yield from self._encode_streaming(opening, progress, reader, tower)
        finally:  # the file and container, once what is read of them is read (or refused)
            opening.close()
        conversation = conversation or self._conversation(opening, visual.clip, visual)
        session = Session(self, opening, visual, conversation, entry, hasher)
        if prefill:
            yield
            yield from session.prefill_steps(progress)
        return session

    def vision_backend(self, opts: Options):
        """None for MLX's own tower, else the Core ML tower (compiled once per units)."""
        if opts.vision_backend != "coreml":
            return None
        if opts.compute_units not in self._towers:
            from .coreml_vision import CoreMLVisionTower

            self._towers[opts.compute_units] = CoreMLVisionTower.for_model(self.model,
                                                                          opts.compute_units)
        return self._towers[opts.compute_units]

    def _encode_streaming(self, opening: Opening, progress, reader,
                          tower) -> Steps[VisualTokens]:
        """Decode on the frame reader's thread while the tower encodes what has arrived:
        `frames` counts opening the video and the time the tower waited for frames."""
        tic = time.perf_counter()
        reader = reader if reader is not None else opening.reader()
        with reader:
            yield
            return (yield from encode_video_steps(
                self.model, reader, opening.sampling, frames_s=time.perf_counter() - tic,
                vision=tower, on_frame=_stage(progress, "frames"),
                progress=_stage(progress, "vision"),
                ready=reader.ready if isinstance(reader, FrameReader) else None))

    def _encode_overlapped(self, opening: Opening, tower) -> Conversation:
        """The Core ML tower beside MLX: the conversation prefills its prefix, the slow
        frames' tokens first, while the fast frames encode (design.md §6.2)."""
        from .overlap import encode_overlapped

        tic = time.perf_counter()
        clip = opening.read_all()
        frames_s = time.perf_counter() - tic
        conversation = self._conversation(opening, clip)
        conversation.prefill_prefix_beside(lambda feed: encode_overlapped(
            self.model, clip, tower, opening.sampling, feed, frames_s))
        return conversation

    def _conversation(self, opening: Opening, clip,
                      visual: Optional[VisualTokens] = None) -> Conversation:
        """The conversation about `clip`'s frames (or picture): the time instruction and the
        subtitle lines those frames select go before the first question."""
        opts = opening.options
        preamble = ""
        if opening.media == "video" and opts.timestamps:
            info = clip.info
            preamble = time_instruction(video_duration(info.num_frames, info.fps), clip.timestamps)
        if opening.subtitles is not None:  # the lines these frames select, after the time
            block = opening.subtitles.select(clip.timestamps).prompt()
            preamble = "\n".join(p for p in (preamble, block) if p)
        return Conversation(self.model, self.tokenizer, visual, system_prompt=opts.system_prompt,
                            preamble=preamble, max_kv_size=opts.max_kv_size,
                            kv_bits=opts.kv_bits)


def _stage(progress: Optional[Progress], stage: str):
    return (lambda done, total: progress(stage, done, total)) if progress else None


__all__ = ["Engine", "Opening", "Session"]
