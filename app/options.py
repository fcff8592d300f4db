"""The command line's flags, made from the library's one options schema
(`sfllava_mlx.options`: a flag means the same everywhere, design.md §3), and the one place
argparse's namespace becomes the library's options. Values are taken as text and checked by
the library's rules, so a bad value is one line naming the option and its rule, the same as
the server's 400 — never argparse's usage."""

from __future__ import annotations

import argparse

from sfllava_mlx.config import DECODE_CONCURRENCY
from sfllava_mlx.options import ASK, DEFAULTS, SPECS, Flag, OptionError, Options, Whole, flag

# The options of `sfllava frames` (the frames a model would see; no answer).
FRAME_OPTIONS = ("recipe", "num_frames", "fps", "seek", "start", "end", "subtitles",
                 "subtitle_lang", "speech_model")
COUNT = Whole("a whole number of at least 1", 1)


def add_model_argument(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="model directory or hub repo id: an sfllava or mlx-vlm conversion, or a "
                        "Hugging Face checkpoint (converted on first use)")
    # what they mean to `sfllava convert`, for a Hugging Face checkpoint's first use
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weight dtype (default: the checkpoint's; float32 on MLX's CPU backend)")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize the LLM of a Hugging Face checkpoint converted on first use")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=4, help="bits per weight (with -q)")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64,
                   help="quantization group size (with -q)")


def engine_options(args) -> dict:
    """The keyword options of `Engine` that add_model_argument's flags give."""
    return dict(dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits,
                q_group_size=args.q_group_size)


def add_options(p, names=tuple(SPECS)) -> None:
    """One flag per option, from its definition (None: not given, the default applies)."""
    for name in names:
        spec = SPECS[name]
        if name == "cache":
            p.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                           help="do not use the video cache")
        elif isinstance(spec.rule, Flag):
            p.add_argument(flag(name), action="store_true", default=None, help=spec.help)
        else:
            p.add_argument(flag(name), default=None, metavar=spec.metavar,
                           help=_with_default(name, spec.help))


def _with_default(name: str, text: str) -> str:
    default = DEFAULTS[name]
    return text if default is None else f"{text} (default: {default})"


def add_generation_arguments(p, json: bool = True) -> None:
    add_options(p)
    if json:
        p.add_argument("--json", action="store_true", help="print JSON (stdout carries only JSON)")


def session_options(args) -> dict:
    """The options given on the command line (the library checks them)."""
    given = vars(args)
    return {n: given[n] for n in SPECS if given.get(n) is not None}


def ask_options(args) -> dict:
    """The decoding options given (`Session.ask`'s keywords)."""
    return {n: v for n, v in session_options(args).items() if n in ASK}


def checked_options(args, media=None, noun: str = "video") -> Options:
    """The options checked, the model reference named and the media file there: before any
    heavy import (design.md §3: a user's mistake ends within a second). The media is the
    command's to open next, once (`media.open_media`), for every step to take."""
    from sfllava_mlx.checks import check_request

    return check_request(vars(args).get("model"), media, noun, **session_options(args))


def add_decode_concurrency_argument(p, what: str) -> None:
    p.add_argument("--decode-concurrency", default=DECODE_CONCURRENCY, metavar="N",
                   help=f"{what} decode together, at most (mlx-lm's server flag; default "
                        f"{DECODE_CONCURRENCY}; 1: one at a time). --kv-bits and --max-kv-size "
                        "answers decode alone")


def check_decode_concurrency(args) -> None:
    try:
        args.decode_concurrency = COUNT.parse(args.decode_concurrency)
    except ValueError:
        raise OptionError("decode_concurrency", COUNT.words, args.decode_concurrency) from None


def picture_note(options: Options) -> str | None:
    """The note a picture's session gets when video-only flags were given."""
    flags = options.video_only_given()
    if not flags:
        return None
    return (f"ignored for a picture (videos only): {', '.join(flags)}; a picture follows "
            "the model's image recipe, on the MLX vision tower")
