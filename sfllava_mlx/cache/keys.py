"""The cache's keys, each built here and nowhere else: what a video's visual tokens depend on
(its content, the model, the frame sampling and the part sampled, the dtype, the vision
backend: not temperature, seed or system prompt), what a picture's do, and what a prefilled
prefix depends on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..config import ImageConfig, SamplingConfig
from ..options import changing
from .fingerprint import Fingerprint


@dataclass
class CacheKey:
    video_size: int
    video_sampled: str
    model: str
    num_frames: int
    slow_every: int
    seek: str
    dtype: str
    vision_backend: str = "mlx"
    # The recipe's other fields where they differ from SF-LLaVA-1.5's defaults (design.md §2.1),
    # and the options that chose the frames (--fps).
    recipe: dict = field(default_factory=dict)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def video_key(fingerprint: Fingerprint, model: str, dtype: str, sampling: SamplingConfig,
              options: dict) -> CacheKey:
    """`sampling`: this video's recipe as sampled (its T after --fps); `options`: the resolved
    options (`options.resolved`), of which those that change the visual tokens key it."""
    recipe = {k: v for k, v in asdict(sampling).items()
              if k not in ("num_frames", "slow_every") and v != getattr(SamplingConfig, k)}
    visual = {n: options[n] for n in changing("visual") if n in options}
    recipe.update({n: v for n, v in visual.items()
                   if n not in ("num_frames", "seek", "vision_backend") and v is not None})
    return CacheKey(fingerprint.size, fingerprint.sampled, model, sampling.num_frames,
                    sampling.slow_every, visual["seek"], dtype, visual["vision_backend"], recipe)


def image_key(fingerprint: Fingerprint, model: str, dtype: str, image: ImageConfig) -> CacheKey:
    """A picture's key: its content, the model, the image recipe (design.md §2.3) and the dtype.
    No frames (num_frames 0, seek "image")."""
    return CacheKey(fingerprint.size, fingerprint.sampled, model, 0, 0, "image", dtype, "mlx",
                    {"image": asdict(image)})


def prefix_key(prefix_ids: list, *, kv_bits=None, kv_group_size=64) -> str:
    """The KV cache of the prefix depends on the system prompt's tokens and the KV format."""
    material = json.dumps({"prefix": list(map(int, prefix_ids)), "kv_bits": kv_bits,
                           "kv_group_size": kv_group_size if kv_bits else None})
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def transcript_key(fingerprint: Fingerprint, speech_model: str, settings: dict) -> str:
    """A video's transcribed speech depends on its content, the Whisper model (its identity)
    and how it was run (`settings`: the format, the dtype): never on the frames."""
    material = json.dumps({"video_size": fingerprint.size, "video_sampled": fingerprint.sampled,
                           "speech_model": speech_model, "settings": settings}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]
