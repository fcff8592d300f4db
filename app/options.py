"""Options shared by generate, chat and bench (SPEC §4: a flag means the same everywhere)."""

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="converted model directory or hub repo id")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--system-prompt", default=None, help="replaces the system text")
    add_recipe_argument(p)
    p.add_argument("--num-frames", type=int, default=None,
                   help="sample positions (default: the recipe's: 128 for SF-LLaVA-1.5, "
                        "32 for LLaVA-OneVision native)")
    add_fps_argument(p)
    p.add_argument("--timestamps", action="store_true",
                   help="tell the model when each frame was taken (LLaVA-Video's time "
                        "instruction): for \"when does ...\" questions")
    p.add_argument("--seek", choices=["exact", "keyframe"], default="exact",
                   help="exact frames (default) or the keyframe at or before each position")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="quantize the KV cache")
    p.add_argument("--max-kv-size", type=int, default=None, help="rotating KV cache size")
    p.add_argument("--no-cache", action="store_true", help="do not use the video cache")
    p.add_argument("--vision-backend", choices=["mlx", "coreml"], default="mlx",
                   help="run the vision tower in MLX or Core ML (macOS)")
    p.add_argument("--compute-units", choices=["ALL", "CPU_AND_NE", "CPU_AND_GPU"], default="ALL",
                   help="Core ML compute units (with --vision-backend coreml)")
    p.add_argument("--json", action="store_true", help="print JSON (stdout carries only JSON)")


def add_recipe_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=["native", "slowfast"], default="native",
                   help="the model's own frame recipe, or SlowFast (32 slow + 96 fast frames; "
                        "training-free on models not trained with it)")


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def add_fps_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fps", type=positive_float, default=None, metavar="F",
                   help="sample F frames a second, at most the recipe's frame count: a short "
                        "clip costs fewer tokens")
