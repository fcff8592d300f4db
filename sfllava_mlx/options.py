"""The options a Session is opened with (SPEC §7): typed values named as the command-line
flags, checked once, owned by the Session (never set on the loaded model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from .config import RECIPES
from .errors import UserError
from .frames.part import Part
from .frames.sampling import SEEK_MODES

VISION_BACKENDS = ("mlx", "coreml")
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
KV_BITS = (4, 8)
# Options that mean something for a video only (a picture follows the model's image recipe).
VIDEO_ONLY = ("recipe", "num_frames", "fps", "timestamps", "seek", "vision_backend", "start",
              "end", "subtitles", "subtitle_lang", "speech_model")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Options:
    recipe: str = "native"  # the model's own frame recipe, or "slowfast" (SPEC §2.9)
    num_frames: Optional[int] = None  # replaces the recipe's T
    fps: Optional[float] = None  # T = min(T, ceil(duration x fps)) (SPEC §2.10)
    seek: str = "exact"  # exact frames, or the keyframe at or before each position
    timestamps: bool = False  # LLaVA-Video's time instruction before the first question
    system_prompt: Optional[str] = None  # replaces the model's system text
    kv_bits: Optional[int] = None  # quantize the KV cache
    max_kv_size: Optional[int] = None  # a rotating KV cache of this many tokens
    vision_backend: str = "mlx"  # or "coreml" (macOS): the tower on the Neural Engine
    compute_units: str = "ALL"  # Core ML's, with vision_backend="coreml"
    cache: bool = True  # the persistent video cache
    max_tokens: int = 512  # the longest answer the memory plan makes room for
    # A part of the video (SPEC §2.12): seconds, or time text such as "45:00" (kept as seconds)
    start: Optional[float] = None
    end: Optional[float] = None
    subtitles: str = "auto"  # auto | off | speech | a subtitle file (SPEC §2.13)
    subtitle_lang: Optional[str] = None  # the embedded stream (or sidecar) in this language
    speech_model: Optional[str] = None  # Whisper: a directory or hub id (default: turbo)

    def __post_init__(self):
        part = Part.of(self.start, self.end)  # refuses bad text, negative times, start >= end
        object.__setattr__(self, "start", part.start if part else None)
        object.__setattr__(self, "end", part.end if part else None)
        self._one_of("recipe", RECIPES)
        self._one_of("seek", SEEK_MODES)
        self._one_of("vision_backend", VISION_BACKENDS)
        self._one_of("compute_units", COMPUTE_UNITS)
        if self.kv_bits is not None:
            self._one_of("kv_bits", KV_BITS)
        for name in ("num_frames", "max_kv_size", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise UserError(f"{flag(name)} must be a whole number of at least 1, not {value!r}")
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and self.fps > 0):
            raise UserError(f"--fps must be positive, not {self.fps!r}")
        if not (isinstance(self.subtitles, str) and self.subtitles.strip()):
            raise UserError("--subtitles must be auto, off, speech or a subtitle file, not "
                            f"{self.subtitles!r}")
        for name in ("subtitle_lang", "speech_model"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise UserError(f"{flag(name)} must be a non-empty text, not {value!r}")

    def _one_of(self, name: str, allowed: tuple) -> None:
        if getattr(self, name) not in allowed:
            raise UserError(f"{flag(name)} must be one of {', '.join(map(str, allowed))}, "
                            f"not {getattr(self, name)!r}")

    @classmethod
    def of(cls, **given) -> Options:
        """Options from keyword arguments; a name that is no option is a TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}: the options are "
                            f"{', '.join(sorted(known))}")
        return cls(**given)

    @property
    def part(self) -> Optional[Part]:
        """The part of the video to sample, or None for the whole video."""
        return Part.of(self.start, self.end)

    def replace(self, **changes) -> Options:
        return replace(self, **changes)

    def prefix_identity(self) -> tuple:
        """What decides a session's visual tokens and prefix: every option but the answer
        length (conversations that share it can continue one another)."""
        return tuple(sorted((k, v) for k, v in asdict(self).items() if k != "max_tokens"))

    def video_only_given(self) -> list:
        """The flags given that mean something for a video only (ignored for a picture)."""
        default = Options()
        return [flag(n) for n in VIDEO_ONLY if getattr(self, n) != getattr(default, n)]
