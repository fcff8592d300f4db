"""The options, one schema (design.md §3 "Options are one schema"): every option is defined once,
here — its name, type, default, rule, help and what it changes — and the command line, the
server's `sfllava` object, batch, eval and the Python API all take theirs from it.

    opts = Options.of(recipe="slowfast", fps="2")   # text from a command line is parsed here
    opts.fps                                        # 2.0
    Options.of(fps=0)                               # OptionError: --fps must be a number
                                                    #   greater than 0, not 0

What an option changes decides what it keys: `visual` options key the video cache, `visual`,
`prompt` and `context` options key a conversation the server holds, and all but `none` key
a batch or eval line. The values recorded and keyed are the *resolved* ones (`resolved`):
the T actually sampled, the subtitle source actually read, the part in seconds.

This module is light (no MLX, no mlx-lm): the commands check options before loading a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from .config import RECIPES
from .errors import UserError
from .frames.part import Part
from .frames.sampling import SEEK_MODES

VISION_BACKENDS = ("mlx", "coreml")
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
KV_BITS = (4, 8)
# What an option changes, from the most to the least of the answer.


class OptionError(UserError):
    """A value outside its option's rule; the message names the option and the rule."""

    def __init__(self, name: str, rule: str, value: Any, label: Optional[str] = None):
        self.option, self.rule, self.value = name, rule, value
        self.label = label or flag(name)
        super().__init__(f"{self.label} must be {rule}, not {_shown(value)}")

    def named(self, label: str) -> OptionError:
        """The same error, the option named as a front end spells it (`sfllava.fps`)."""
        return OptionError(self.option, self.rule, self.value, label)


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------
# Rules: what a value must be, in words, and its parse (text from a command line included)


@dataclass(frozen=True)
class Rule:
    words: str

    def parse(self, value):
        """The value in its type, or ValueError."""
        return value


@dataclass(frozen=True)
class OneOf(Rule):
    values: tuple = ()

    def parse(self, value):
        for v in self.values:  # "8" from a command line is kv_bits 8
            if value == v or (isinstance(value, str) and value == str(v)):
                return v
        raise ValueError


@dataclass(frozen=True)
class Whole(Rule):
    least: Optional[int] = None

    def parse(self, value):
        if isinstance(value, str):
            value = int(value.strip())
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        if self.least is not None and value < self.least:
            raise ValueError
        return value


@dataclass(frozen=True)
class Number(Rule):
    above: Optional[float] = None  # value > above
    least: Optional[float] = None  # value >= least
    most: Optional[float] = None  # value <= most

    def parse(self, value):
        if isinstance(value, str):
            value = float(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError
        if ((self.above is not None and not value > self.above)
                or (self.least is not None and value < self.least)
                or (self.most is not None and value > self.most)):
            raise ValueError
        return float(value)


@dataclass(frozen=True)
class Text(Rule):
    def parse(self, value):
        if not isinstance(value, str) or not value.strip():
            raise ValueError
        return value


@dataclass(frozen=True)
class Prompt(Rule):
    """The system prompt: any text, the empty one included."""

    def parse(self, value):
        if not isinstance(value, str):
            raise ValueError
        return value


@dataclass(frozen=True)
class Flag(Rule):
    def parse(self, value):
        if not isinstance(value, bool):
            raise ValueError
        return value


@dataclass(frozen=True)
class Time(Rule):
    """A part's end: seconds or [H:]M:SS[.f] text; `Part.of` reads it (its own words)."""


# ----------------------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class Spec:
    rule: Rule
    changes: str  # visual, prompt, context, decoding or none
    help: str
    metavar: Optional[str] = None
    server: bool = False  # a field of the server's `sfllava` object
    video_only: bool = False  # a picture follows the model's image recipe instead


def option(default, rule: Rule, changes: str, help: str, **spec):
    return field(default=default, metadata={"spec": Spec(rule, changes, help, **spec)})


@dataclass(frozen=True)
class Options:
    """A Session's options (and its answers' defaults: `ask` may override the decoding
    ones). Frozen; build with `Options.of(...)`, which checks every value."""

    recipe: str = option(
        "native", OneOf("one of " + ", ".join(RECIPES), RECIPES), "visual",
        "the model's own frame recipe, or slowfast (32 slow + 96 fast frames; training-free "
        "on models not trained with it)", metavar="|".join(RECIPES), server=True,
        video_only=True)
    num_frames: Optional[int] = option(
        None, Whole("a whole number of at least 1", 1), "visual",
        "sample positions (default: the recipe's: 128 for SF-LLaVA-1.5, 32 for "
        "LLaVA-OneVision native)", metavar="T", server=True, video_only=True)
    fps: Optional[float] = option(
        None, Number("a number greater than 0", above=0), "visual",
        "sample F frames a second, at most the recipe's frame count: a short clip costs "
        "fewer tokens", metavar="F", server=True, video_only=True)
    seek: str = option(
        "exact", OneOf("one of " + ", ".join(SEEK_MODES), SEEK_MODES), "visual",
        "exact frames (default) or the keyframe at or before each position",
        metavar="|".join(SEEK_MODES), server=True, video_only=True)
    start: Optional[float] = option(
        None, Time("a time"), "visual",
        "only the part of the video from T0 (seconds such as 75, or [H:]M:SS[.f] such as "
        "45:00), at the recipe's whole frame budget", metavar="T0", server=True,
        video_only=True)
    end: Optional[float] = option(
        None, Time("a time"), "visual",
        "only the part of the video before T1 (the same forms as --start)", metavar="T1",
        server=True, video_only=True)
    vision_backend: str = option(
        "mlx", OneOf("one of " + ", ".join(VISION_BACKENDS), VISION_BACKENDS), "visual",
        "run the vision tower in MLX or Core ML (macOS)", metavar="|".join(VISION_BACKENDS),
        video_only=True)
    compute_units: str = option(
        "ALL", OneOf("one of " + ", ".join(COMPUTE_UNITS), COMPUTE_UNITS), "visual",
        "Core ML compute units (with --vision-backend coreml)", metavar="|".join(COMPUTE_UNITS))
    timestamps: bool = option(
        False, Flag("true or false"), "prompt",
        "tell the model when each frame was taken (LLaVA-Video's time instruction): for "
        "\"when does ...\" questions", server=True, video_only=True)
    system_prompt: Optional[str] = option(
        None, Prompt("a text"), "prompt", "replaces the system text", metavar="TEXT")
    subtitles: str = option(
        "auto", Text("auto, off, speech or a subtitle file"), "prompt",
        "what is said, given to the model with the lines the sampled frames select: auto "
        "(default: the video's own subtitle stream, else a subtitle file beside it with its "
        "name), off, speech (the audio transcribed on device; needs 'sfllava-mlx[speech]'), "
        "or a subtitle file (SRT, WebVTT, ASS/SSA)", metavar="auto|off|speech|FILE",
        server=True, video_only=True)
    subtitle_lang: Optional[str] = option(
        None, Text("a language tag such as en"), "prompt",
        "the subtitles in language L (e.g. en or eng): the stream tagged L, or clip.L.srt "
        "beside the video", metavar="L", server=True, video_only=True)
    speech_model: Optional[str] = option(
        None, Text("a Whisper model directory or hub id"), "prompt",
        "the Whisper model of --subtitles speech: an mlx-whisper directory or a hub id "
        "(default: mlx-community/whisper-large-v3-turbo)", metavar="M", video_only=True)
    kv_bits: Optional[int] = option(
        None, OneOf("one of " + ", ".join(map(str, KV_BITS)), KV_BITS), "context",
        "quantize the KV cache", metavar="|".join(map(str, KV_BITS)))
    max_kv_size: Optional[int] = option(
        None, Whole("a whole number of at least 1", 1), "context",
        "a rotating KV cache of N tokens: the conversation's context limit", metavar="N")
    max_tokens: int = option(
        512, Whole("a whole number of at least 1", 1), "decoding", "most tokens per answer",
        metavar="N")
    temp: float = option(
        0.0, Number("a number of at least 0", least=0), "decoding",
        "sampling temperature (0: greedy)", metavar="T")
    top_p: float = option(
        1.0, Number("a number greater than 0 and at most 1", above=0, most=1), "decoding",
        "nucleus sampling threshold", metavar="P")
    seed: Optional[int] = option(
        None, Whole("a whole number"), "decoding", "random seed for sampling", metavar="S")
    cache: bool = option(
        True, Flag("true or false"), "none", "the persistent video cache (--no-cache: off)")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, check(f.name, value))
        part = Part.of(self.start, self.end)  # start before end; each a time
        object.__setattr__(self, "start", part.start if part else None)
        object.__setattr__(self, "end", part.end if part else None)

    @classmethod
    def of(cls, **given) -> Options:
        """Options from keyword arguments (None: the default); a name that is no option is a
        TypeError."""
        unknown = sorted(set(given) - set(SPECS))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}: the options are "
                            f"{', '.join(sorted(SPECS))}")
        return cls(**{k: v for k, v in given.items() if v is not None})

    @property
    def part(self) -> Optional[Part]:
        """The part of the video to sample, or None for the whole video."""
        return Part.of(self.start, self.end)

    def replace(self, **changes) -> Options:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def video_only_given(self) -> list:
        """The flags given that mean something for a video only (ignored for a picture)."""
        return [flag(n) for n, s in SPECS.items()
                if s.video_only and getattr(self, n) != DEFAULTS[n]]


SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in fields(Options)}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Options)}
# Chosen when a Session answers (`Session.ask`), beside the Session's own.
ASK = tuple(n for n, s in SPECS.items() if s.changes == "decoding")


def check(name: str, value, label: Optional[str] = None):
    """`value` of option `name` parsed and checked against its rule, or OptionError naming
    the option as `label` (default: its flag)."""
    spec = SPECS[name]
    if isinstance(spec.rule, Time):
        label = label or flag(name)
        part = Part.of(**{name: value}, names=(label, label)) if value is not None else None
        return getattr(part, name) if part else None
    try:
        return spec.rule.parse(value)
    except (ValueError, TypeError):
        raise OptionError(name, spec.rule.words, value, label) from None


def changing(*what: str) -> tuple:
    """The names of the options that change `what` (some of `Spec.changes`' values)."""
    return tuple(n for n, s in SPECS.items() if s.changes in what)


# ----------------------------------------------------------------------------------------
# Resolved: the values that made an answer, as recorded and keyed


# The fields of a record's `options` (design.md §3), in its order.
RECORDED = ("recipe", "num_frames", "fps", "seek", "start", "end", "timestamps", "subtitles",
            "system_prompt", "max_tokens", "temp", "top_p", "seed", "kv_bits", "max_kv_size",
            "vision_backend", "speech_model")


def resolved(options: Options, *, num_frames: Optional[int], subtitles: Optional[str],
             system_prompt: str, speech_model: Optional[str] = None,
             media: str = "video") -> dict:
    """The `options` a record carries: `options` as the video resolved them — the T
    actually sampled, where the subtitles were actually read (`SubtitleTrack.read_from`, or
    None), the system text and Whisper model actually used. A picture has no frame options
    (its image recipe decides)."""
    out = {n: getattr(options, n) for n in RECORDED}
    out.update(num_frames=num_frames, subtitles=subtitles, system_prompt=system_prompt,
               speech_model=speech_model if subtitles == "speech" else None)
    if media != "video":
        out.update({n: None for n in RECORDED if SPECS[n].video_only})
    return out


def requested(options: Options) -> dict:
    """The options as given, in a record's shape: where the media cannot resolve them (an
    unreadable file's error line)."""
    return {n: getattr(options, n) for n in RECORDED}


def with_answer(record: dict, options: Options) -> dict:
    """A resolved record with an answer's decoding options."""
    return {**record, **{n: getattr(options, n) for n in ASK}}


def identity(record: dict, *what: str) -> str:
    """A canonical text of the resolved options that change `what` (all recorded when
    none is named): the part of a key that the options make."""
    import json

    names = changing(*what) if what else RECORDED
    return json.dumps({n: record.get(n) for n in RECORDED if n in names}, sort_keys=True)


def as_json(options: Options) -> dict:
    return asdict(options)
