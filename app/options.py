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
    p.add_argument("--num-frames", type=int, default=None,
                   help="sample positions (default: the model's, 128)")
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
