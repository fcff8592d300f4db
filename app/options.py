"""The flags shared by the commands (SPEC §4: a flag means the same everywhere), and the one
place argparse's namespace becomes the library's typed options."""

from __future__ import annotations

import argparse

from sfllava_mlx.config import DECODE_CONCURRENCY
from sfllava_mlx.errors import UserError
from sfllava_mlx.options import COMPUTE_UNITS, SEEK_MODES, Options


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
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


def add_generation_arguments(p, json: bool = True) -> None:
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--system-prompt", default=None, help="replaces the system text")
    add_recipe_argument(p)
    add_num_frames_argument(p)
    add_fps_argument(p)
    p.add_argument("--timestamps", action="store_true",
                   help="tell the model when each frame was taken (LLaVA-Video's time "
                        "instruction): for \"when does ...\" questions")
    add_seek_argument(p)
    add_part_arguments(p)
    add_subtitle_arguments(p)
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="quantize the KV cache")
    p.add_argument("--max-kv-size", type=int, default=None, help="rotating KV cache size")
    p.add_argument("--no-cache", action="store_true", help="do not use the video cache")
    p.add_argument("--vision-backend", choices=["mlx", "coreml"], default="mlx",
                   help="run the vision tower in MLX or Core ML (macOS)")
    p.add_argument("--compute-units", choices=COMPUTE_UNITS[:3], default="ALL",
                   help="Core ML compute units (with --vision-backend coreml)")
    if json:
        p.add_argument("--json", action="store_true", help="print JSON (stdout carries only JSON)")


def add_recipe_argument(p) -> None:
    p.add_argument("--recipe", choices=["native", "slowfast"], default="native",
                   help="the model's own frame recipe, or SlowFast (32 slow + 96 fast frames; "
                        "training-free on models not trained with it)")


def add_num_frames_argument(p) -> None:
    p.add_argument("--num-frames", type=int, default=None,
                   help="sample positions (default: the recipe's: 128 for SF-LLaVA-1.5, "
                        "32 for LLaVA-OneVision native)")


def add_seek_argument(p) -> None:
    p.add_argument("--seek", choices=SEEK_MODES, default="exact",
                   help="exact frames (default) or the keyframe at or before each position")


def add_subtitle_arguments(p) -> None:
    p.add_argument("--subtitles", default="auto", metavar="auto|off|speech|FILE",
                   help="what is said, given to the model with the lines the sampled frames "
                        "select: auto (default: the video's own subtitle stream, else a "
                        "subtitle file beside it with its name), off, speech (the audio "
                        "transcribed on device; needs 'sfllava-mlx[speech]'), or a subtitle "
                        "file (SRT, WebVTT, ASS/SSA)")
    p.add_argument("--subtitle-lang", default=None, metavar="L",
                   help="the subtitles in language L (e.g. en or eng): the stream tagged L, "
                        "or clip.L.srt beside the video")
    p.add_argument("--speech-model", default=None, metavar="M",
                   help="the Whisper model of --subtitles speech: an mlx-whisper directory or "
                        "a hub id (default: mlx-community/whisper-large-v3-turbo)")


def subtitle_options(args) -> dict:
    return dict(subtitles=args.subtitles, subtitle_lang=args.subtitle_lang,
                speech_model=args.speech_model)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def add_fps_argument(p) -> None:
    p.add_argument("--fps", type=positive_float, default=None, metavar="F",
                   help="sample F frames a second, at most the recipe's frame count: a short "
                        "clip costs fewer tokens")


PART_FLAGS = ("--start", "--end")


def join_part_values(argv: list) -> list:
    """`--end -0:05` as `--end=-0:05`: argparse takes a value that starts with "-" and is not
    a plain number for a flag, and answers with its usage; joined, the library refuses the
    time in its one line, as it does `--end -5`."""
    out = []
    for arg in argv:
        if out and out[-1] in PART_FLAGS and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def add_part_arguments(p) -> None:
    # Kept as text here: the library reads the time (one parser, one-line errors, exit 2).
    p.add_argument("--start", default=None, metavar="T0",
                   help="only the part of the video from T0 (seconds such as 75, or "
                        "[H:]M:SS[.f] such as 45:00), at the recipe's whole frame budget")
    p.add_argument("--end", default=None, metavar="T1",
                   help="only the part of the video before T1 (the same forms as --start)")


def add_decode_concurrency_argument(p, what: str) -> None:
    p.add_argument("--decode-concurrency", type=int, default=DECODE_CONCURRENCY, metavar="N",
                   help=f"{what} decode together, at most (mlx-lm's server flag; default "
                        f"{DECODE_CONCURRENCY}; 1: one at a time). --kv-bits and --max-kv-size "
                        "answers decode alone")


def check_decode_concurrency(args) -> None:
    if args.decode_concurrency < 1:
        raise UserError(f"--decode-concurrency must be at least 1, not {args.decode_concurrency}")


def session_options(args) -> dict:
    """The library's open() options from generate's flags (Options checks them)."""
    return dict(recipe=args.recipe, num_frames=args.num_frames, fps=args.fps, seek=args.seek,
                timestamps=args.timestamps, system_prompt=args.system_prompt,
                kv_bits=args.kv_bits, max_kv_size=args.max_kv_size,
                vision_backend=args.vision_backend, compute_units=args.compute_units,
                cache=not args.no_cache, max_tokens=args.max_tokens,
                start=args.start, end=args.end, **subtitle_options(args))


def ask_options(args) -> dict:
    return dict(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, seed=args.seed)


def picture_note(options: Options) -> str | None:
    """The note a picture's session gets when video-only flags were given."""
    flags = options.video_only_given()
    if not flags:
        return None
    return (f"note: ignored for a picture (videos only): {', '.join(flags)}; a picture follows "
            "the model's image recipe, on the MLX vision tower")
