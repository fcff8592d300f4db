"""What generate, chat and bench share: load a model, open a video (through the video
cache), ask, and report a turn."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Optional

import mlx.core as mx

from sfllava_mlx import load
from sfllava_mlx.config import SamplingConfig
from sfllava_mlx import cache as vcache
from sfllava_mlx.errors import UserError, VideoError
# Imported up front: PyAV's import would otherwise land inside the first answer's ttft.
from sfllava_mlx.frames import frames_for_rate, iter_frames, probe, read_frames
from sfllava_mlx.generate import Conversation, VisualTokens, encode_video
from sfllava_mlx import image
from sfllava_mlx.memory import MemoryPlan, check_plan
from sfllava_mlx.pooling import num_visual_tokens

# progress(stage, done, total), stage being "frames", "vision" or "prefill"
Progress = Callable[[str, int, int], None]


def load_model(args):
    """Load --model; --recipe picks its recipe, --num-frames overrides the recipe's T."""
    model, tokenizer = load(args.model)
    configure_sampling(model, getattr(args, "recipe", None), getattr(args, "num_frames", None))
    return model, tokenizer


def configure_sampling(model, recipe: Optional[str] = None, num_frames: Optional[int] = None):
    """Set the sampling that the next videos are opened with (SPEC §2.9-2.10)."""
    try:
        return model.config.use_recipe(recipe or "native", num_frames)
    except ValueError as e:
        raise UserError(str(e)) from None


def frame_options(model, args) -> dict:
    s = model.config.sampling
    return dict(num_frames=s.num_frames, slow_every=s.slow_every, positions=s.frame_positions,
                seek=getattr(args, "seek", "exact"), fps=getattr(args, "fps", None))


def plan(model, sampling: SamplingConfig, args) -> MemoryPlan:
    """The memory plan of one video's request; a request that cannot fit is refused."""
    max_kv_size = getattr(args, "max_kv_size", None)
    limit = min(model.context_length, max_kv_size or model.context_length)
    return check_plan(model, sampling, max_tokens=getattr(args, "max_tokens", 512) or 512,
                      kv_bits=getattr(args, "kv_bits", None), max_kv_size=max_kv_size,
                      context_limit=limit, context_name="--max-kv-size" if limit < model.context_length
                      else "the model's context")


def video_sampling(model, path, args) -> SamplingConfig:
    """The recipe this video is opened with: `--fps` caps its frame count by its duration
    (SPEC §2.10), as the frame reader does with the same rule."""
    s = model.config.sampling
    fps = getattr(args, "fps", None)
    if fps is None:
        return s
    info = probe(path)
    try:
        return replace(s, num_frames=frames_for_rate(s.num_frames, info.num_frames, info.fps, fps))
    except ValueError as e:
        raise UserError(str(e)) from None


def vision_backend(model, args):
    """None for MLX's own tower, else a Core ML tower with the same call signature."""
    if getattr(args, "vision_backend", "mlx") != "coreml":
        return None
    from sfllava_mlx.coreml_vision import CoreMLVisionTower

    return CoreMLVisionTower.for_model(model, args.compute_units)


def sample_video(model, path, args):
    """All sampled frames at once (SampledFrames, with `timings["frames"]`)."""
    tic = time.perf_counter()
    clip = read_frames(path, **frame_options(model, args))
    clip.timings = {"frames": time.perf_counter() - tic}
    return clip


def encode_streaming(model, path, args, progress: Optional[Progress] = None,
                     vision=None, frames=None) -> VisualTokens:
    """Decode on the frame reader's thread while the tower encodes what has arrived: the
    `frames` stage counts opening the video and the time the tower waited for frames.
    `frames`: a FrameReader-like object already reading this video (batch prefetches the
    next video's frames: app/batch_prefetch.py), which sets its own `timings`."""
    tic = time.perf_counter()
    reader = frames if frames is not None else iter_frames(path, **frame_options(model, args))
    with reader:
        if frames is None:
            reader.timings = {"frames": time.perf_counter() - tic}  # container, index, first frame
        # The reader knows this video's frame count (--fps makes it per video).
        sampling = replace(model.config.sampling, num_frames=len(reader.indices))
        return encode_video(
            model, reader, vision=vision, sampling=sampling,
            on_frame=(lambda d, t: progress("frames", d, t)) if progress else None,
            progress=(lambda d, t: progress("vision", d, t)) if progress else None)


def check_video_path(path) -> str:
    if not os.path.exists(path):
        raise VideoError(f"video not found: {path}")
    if os.path.isdir(path):
        raise VideoError(f"{path} is a directory, not a video file")
    return path


def use_cache(args) -> bool:
    return not getattr(args, "no_cache", False)


@dataclass
class OpenedVideo:
    """A video ready for questions: its visual tokens, a conversation, and the cache state.

    `cache` is "hit" (tokens and, when saved, the prefilled prefix read back), "miss"
    (computed, to be saved) or "off". `save()` writes what the cache lacks; call it when
    nobody waits for a token (after an answer), it is a no-op once all is saved.
    """

    media: ClassVar[str] = "video"  # OpenedImage: "image"

    path: str
    visual: VisualTokens
    conv: Conversation
    cache: str
    open_s: float  # wall time to open (fingerprint, frames, vision or cache reads)
    start: float  # when opening began: the first answer's ttft counts from here
    load_s: float = 0.0  # time spent reading the cache (a hit)
    prefix_from_cache: bool = False
    _store: Optional[vcache.VideoCache] = None
    _key: Optional[vcache.CacheKey] = None
    _fingerprint: Optional[vcache.VideoFingerprint] = None
    _hasher: Optional[vcache.ContentHasher] = None
    _entry: Optional[object] = None  # Path of the stored entry
    _kv_key: str = ""
    _kv_saved: bool = False
    _model_name: str = ""
    _first: bool = field(default=True)

    @property
    def clip(self):
        return self.visual.clip

    def ask(self, question: str, *, start_time=None, progress: Optional[Progress] = None, **opts):
        """conv.ask, with the open's cache reads folded into the first answer's timings."""
        first = self._first and not self.conv.turns
        start = start_time or (self.start if first else None)
        prefill_progress = (lambda d, t: progress("prefill", d, t)) if progress else None
        try:
            yield from self.conv.ask(question, start_time=start, progress=prefill_progress, **opts)
        finally:
            turn = self.conv.last_turn
            if turn is not None and turn.question == question:
                # Reading the cache stands in for frames, vision and prefix prefill on a hit.
                turn.timings_s["cache_load"] = self.load_s if first else 0.0
                if first:
                    self._first = False

    def prefill(self, progress: Optional[Progress] = None) -> float:
        """Prefill the prefix now (chat does it before the first question)."""
        cb = (lambda d, t: progress("prefill", d, t)) if progress else None
        return self.conv.prefill_prefix(cb)

    def save(self) -> None:
        if self._store is None:
            return
        try:
            if self._entry is None:
                content = self._hasher.result() if self._hasher else None
                self._entry = self._store.store(self._key, self._fingerprint, self.visual.embeddings,
                                                self.visual.clip, content_sha256=content,
                                                model_name=self._model_name)
            if self._entry is not None and not self._kv_saved and self.conv.prefix_done:
                self._store.store_prefix(self._entry, self._kv_key, self.conv.cache,
                                         length=self.conv.prefix_length(),
                                         system_prompt=self.conv.system_prompt)
                self._kv_saved = True
        except OSError:  # a full or read-only disk must not end the conversation
            self._store = None


def model_name(model) -> str:
    path = getattr(model, "path", None)
    return os.path.basename(os.path.normpath(str(path))) if path else str(getattr(model, "identity", "model"))


def open_video(model, tokenizer, path, args, progress: Optional[Progress] = None, *,
               prefill: bool = False, store: Optional[vcache.VideoCache] = None,
               frames=None) -> OpenedVideo:
    """Video -> OpenedVideo, through the cache unless --no-cache.

    prefill=True also prefills the prompt prefix now (with progress), so that the first
    question prefills only its own tokens; otherwise the first `ask` does it and reports
    it with its timings (generate). `frames`: see `encode_streaming` (MLX tower only;
    unused on a cache hit, the caller closes it).
    """
    check_video_path(path)
    start = time.perf_counter()
    seek = getattr(args, "seek", "exact")
    backend = getattr(args, "vision_backend", "mlx")
    sampling = video_sampling(model, path, args)
    plan(model, sampling, args)  # refused here, before a frame is decoded, if it cannot fit
    opened_store = None
    key = fingerprint = entry = None
    if use_cache(args):
        opened_store = store or vcache.VideoCache()
        fingerprint = vcache.VideoFingerprint.of(path)
        key = vcache.make_key(fingerprint, model, seek=seek, vision_backend=backend,
                              sampling=sampling, fps=getattr(args, "fps", None))
        entry = opened_store.lookup(
            key, fingerprint, hidden_size=model.config.projector.hidden_size,
            num_tokens=num_visual_tokens(model.config.vision.grid, sampling))

    hasher, conv = None, None
    if entry is not None:
        visual = VisualTokens(entry.visual, entry.clip, {"frames": 0.0, "vision": 0.0})
    else:
        hasher = vcache.ContentHasher(path) if opened_store is not None else None
        tower = vision_backend(model, args)
        try:
            if backend == "coreml":  # the tower runs beside MLX: prefill while it encodes
                conv = new_conversation(model, tokenizer, None, args)
                clip = sample_video(model, path, args)
                visual = conv.prefill_overlapped(clip, tower, replace(
                    model.config.sampling, num_frames=len(clip.indices)))
            else:
                visual = encode_streaming(model, path, args, progress, vision=tower, frames=frames)
        except ValueError as e:  # bad sampling settings
            raise UserError(str(e)) from None
    conv = conv or new_conversation(model, tokenizer, visual, args)
    return _opened(OpenedVideo, path, visual, conv, args, start, store=opened_store, entry=entry,
                   key=key, fingerprint=fingerprint, hasher=hasher, prefill=prefill,
                   progress=progress)


def _opened(cls, path, visual, conv, args, start, *, store, entry, key, fingerprint, hasher,
            prefill, progress):
    """What opening a video or a picture ends with: the prefix KV read back on a cache hit,
    the cache state, and the prefix prefilled now when asked (prefill=True)."""
    model = conv.model
    kv_key = vcache.prefix_key(conv.prefix_tokens(), kv_bits=getattr(args, "kv_bits", None))
    prefix_from_cache = False
    if entry is not None and not getattr(args, "max_kv_size", None):
        cache = store.load_prefix(entry, kv_key, length=conv.prefix_length(),
                                  num_layers=len(model.language_model.layers))
        if cache is not None:
            conv.restore_prefix(cache)
            prefix_from_cache = True
    load_s = time.perf_counter() - start if entry is not None else 0.0
    status = "off" if store is None else ("hit" if entry is not None else "miss")
    opened = cls(str(path), visual, conv, status, time.perf_counter() - start, start,
                 load_s=load_s, prefix_from_cache=prefix_from_cache, _store=store,
                 _key=key, _fingerprint=fingerprint, _hasher=hasher,
                 _entry=entry.path if entry is not None else None, _kv_key=kv_key,
                 _kv_saved=prefix_from_cache or bool(getattr(args, "max_kv_size", None)),
                 _model_name=model_name(model))
    if prefill:
        opened.prefill(progress)
        opened.open_s = time.perf_counter() - start
    return opened


def new_conversation(model, tokenizer, visual, args) -> Conversation:
    return Conversation(model, tokenizer, visual, system_prompt=getattr(args, "system_prompt", None),
                        max_kv_size=getattr(args, "max_kv_size", None),
                        kv_bits=getattr(args, "kv_bits", None),
                        timestamps=bool(getattr(args, "timestamps", False)))


def ask_options(args) -> dict:
    return dict(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, seed=args.seed)


def turn_record(turn, visual: VisualTokens, cache: str, recipe: Optional[str] = None) -> dict:
    """The JSON object of SPEC §4 for one answered question."""
    return {
        "text": turn.text,
        "tokens": turn.tokens,
        "logprobs": turn.logprobs,
        "prompt_tokens": turn.prompt_tokens,
        "visual_tokens": int(visual.embeddings.shape[0]),
        "timings_s": {k: round(v, 6) for k, v in turn.timings_s.items()},
        "peak_memory_gb": round(turn.peak_memory_gb, 4),
        "cache": cache,
        "finish_reason": turn.finish_reason,
        "recipe": recipe,
    }


def reset_peak_memory() -> None:
    if hasattr(mx, "reset_peak_memory"):
        mx.reset_peak_memory()


# ----------------------------------------------------------------------------------------
# Pictures (SPEC §2.11)


@dataclass
class OpenedImage(OpenedVideo):
    """A picture ready for questions: what `OpenedVideo` is for a video (the same `ask`,
    `prefill`, `save`, `conv`, `visual`, `cache`). `clip` is an `image.PictureClip`."""

    media: ClassVar[str] = "image"

    @property
    def info(self) -> dict:
        return self.visual.clip.info


def image_plan(model, num_tokens: int, num_inputs: int, args) -> None:
    """The memory plan of one picture's request: refused before decoding if it cannot fit."""
    from sfllava_mlx import memory as mem

    max_kv_size = getattr(args, "max_kv_size", None)
    limit_ctx = min(model.context_length, max_kv_size or model.context_length)
    if num_tokens + mem.MIN_TEXT_TOKENS > limit_ctx:
        from sfllava_mlx.errors import ContextOverflowError

        raise ContextOverflowError(f"this picture's {num_tokens} visual tokens and the prompt "
                                   f"pass the context of {limit_ctx} tokens")
    total = mem.plan_tokens(model, num_tokens, num_inputs,
                            max_tokens=getattr(args, "max_tokens", 512) or 512,
                            kv_bits=getattr(args, "kv_bits", None), max_kv_size=max_kv_size).total
    limit, source = mem.memory_limit()
    if limit and total > limit:
        raise mem.MemoryPlanError(f"this picture needs about {total / 1e9:.2f} GB, more than the "
                                  f"{limit / 1e9:.2f} GB of {source}; a smaller model would fit")


def open_image(model, tokenizer, path, args, progress: Optional[Progress] = None, *,
               prefill: bool = False, store: Optional[vcache.VideoCache] = None) -> OpenedImage:
    """Picture -> OpenedImage, through the cache unless --no-cache (keyed by the picture's
    content, the model and its image recipe). The header is read first: a file that is not
    a picture, a huge one or an empty one is refused before decoding. progress(stage, done,
    total) gets "vision" per batch of tiles (and "prefill" with prefill=True)."""
    start = time.perf_counter()
    info = image.probe(path)  # ImageError (a VideoError: exit 2) for what cannot be used
    n_tokens = image.num_image_tokens(model.config, info.size)
    n_inputs = (image.anyres.plan(info.size, model.config.image, model.config.vision.image_size,
                                  model.config.vision.grid).num_tiles
                if model.config.image.anyres else 1)
    image_plan(model, n_tokens, n_inputs, args)
    opened_store = key = fingerprint = entry = None
    if use_cache(args):
        opened_store = store or vcache.VideoCache()
        fingerprint = vcache.VideoFingerprint.of(path)
        key = vcache.make_image_key(fingerprint, model)
        entry = opened_store.lookup(key, fingerprint, num_tokens=n_tokens,
                                    hidden_size=model.config.projector.hidden_size)
    hasher = None
    if entry is not None:
        visual = VisualTokens(entry.visual, image.PictureClip.from_cached(entry.clip),
                              {"frames": 0.0, "vision": 0.0})
    else:
        hasher = vcache.ContentHasher(path) if opened_store is not None else None
        picture = image.read_image(path, info)
        visual = image.encode_image(
            model, picture, progress=(lambda d, t: progress("vision", d, t)) if progress else None)
    conv = Conversation(model, tokenizer, visual, system_prompt=getattr(args, "system_prompt", None),
                        max_kv_size=getattr(args, "max_kv_size", None),
                        kv_bits=getattr(args, "kv_bits", None))  # no frames: no time instruction
    return _opened(OpenedImage, path, visual, conv, args, start, store=opened_store, entry=entry,
                   key=key, fingerprint=fingerprint, hasher=hasher, prefill=prefill,
                   progress=progress)


def open_media(model, tokenizer, path, args, progress: Optional[Progress] = None, **kwargs):
    """A picture (recognised by its content, never its name: JPEG, PNG, WebP, HEIC, AVIF) ->
    open_image; any other file -> open_video (a file named like a picture that is neither is
    refused as a picture). `kwargs` (prefill, store, frames) go to the one called; `frames`
    only to open_video. Returns an OpenedImage or an OpenedVideo (`.media` tells which)."""
    path = str(path)
    if image.is_picture(path):
        kwargs.pop("frames", None)
        return open_image(model, tokenizer, path, args, progress, **kwargs)
    try:
        return open_video(model, tokenizer, path, args, progress, **kwargs)
    except VideoError:
        if os.path.isfile(path) and image.named_like_picture(path):
            raise image.ImageError(f"{path} is not a picture (its content is not JPEG, PNG, WebP, "
                                   "HEIC or AVIF) nor a video") from None
        raise


def media_recipe(opened, args) -> Optional[str]:
    """The `recipe` of a turn record: the video's --recipe, or a picture's image mode."""
    if getattr(opened, "media", "video") == "image":
        return opened.visual.clip.info.get("mode") or opened.conv.model.config.image.mode
    return getattr(args, "recipe", None)


def video_only_options(args) -> list:
    """The flags given that only mean something for a video (a picture ignores them)."""
    given = [("--fps", getattr(args, "fps", None) is not None),
             ("--timestamps", bool(getattr(args, "timestamps", False))),
             ("--num-frames", bool(getattr(args, "num_frames", None))),
             ("--recipe", getattr(args, "recipe", "native") not in (None, "native")),
             ("--seek", getattr(args, "seek", "exact") not in (None, "exact")),
             ("--vision-backend", getattr(args, "vision_backend", "mlx") not in (None, "mlx"))]
    return [flag for flag, on in given if on]


def picture_note(args) -> Optional[str]:
    flags = video_only_options(args)
    if not flags:
        return None
    return (f"note: ignored for a picture (videos only): {', '.join(flags)}; a picture follows "
            "the model's image recipe, on the MLX vision tower")
