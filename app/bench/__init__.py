"""`sfllava bench`: where the time goes, and how far each stage is from the machine's limit.

    sfllava bench --random-weights 1.5b [--frames 32,64,128] [-q] [--q-bits 4,8] [--runs 3]
    sfllava bench --random-weights ov-0.5b --recipe native,slowfast
    sfllava bench --model DIR [--video FILE] [--json]
    sfllava bench --sizes 1.5b,3b,7b --q-bits 4

The whole pipeline runs `--warmup` times, then `--runs` times, on a video (the given file,
or a generated one). Each stage is the runtime's own critical-path share: frame decode
(the time the tower waited for the decoder thread), preprocessing, vision tower,
projector + pooling, prefill, time to first token, decode tokens/s, a follow-up question's
time to first token, and a cached reopen (the video cache read back, then the first token).
The frame stages add up to what the runtime reports as `frames` + `vision`; with prefill
they add up to the time to first token.

Each configuration (model size x bits x recipe x frames) is one row, named by the model's
family and recipe: median, min and max per stage, peak memory split into weights, KV cache
and working sets, the work each stage does (FLOP or bytes per token, hardware.py:
the tower's FLOP per frame at the model's real grid, times the recipe's frames) and the
share of the machine's peak that the measurement reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from . import configs, hardware
from .configs import _bits, _list, backend_options, build_model, configurations, parse_backend
from .report import _console, _progress, bench_row, print_row, print_summary
from .run import STAGE_KEYS, STAGES, make_video

__all__ = ["STAGES", "STAGE_KEYS", "add_arguments", "backend_options", "configs",
           "configurations", "main", "make_video", "parse_backend"]

SCHEMA = "sfllava-bench/1"
PROMPT = "What happens in this video? Describe it in detail."
FOLLOWUP = "What color is the car?"

# ---------------------------------------------------------------------------------------
# Arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="converted model directory or hub repo id")
    from .random_weights import SIZES

    src.add_argument("--random-weights", choices=SIZES,
                     help="a model's exact shapes with random weights (no download): SF-LLaVA-1.5 "
                          "1.5b/3b/7b, LLaVA-OneVision ov-0.5b/ov-7b (llava-onevision-qwen2-*-ov)")
    src.add_argument("--sizes", type=_list(str), metavar="1.5b,ov-0.5b,...",
                     help="sweep random-weight model sizes")
    p.add_argument("--video", help="video to profile on (default: a generated 10 s clip)")
    p.add_argument("--recipe", type=_list(str), metavar="native,slowfast",
                   help="frame recipes, a sweep when several (default: native): the model's own, "
                        "or SlowFast (32 slow + 96 fast frames)")
    p.add_argument("--frames", type=_list(int), metavar="N[,N...]",
                   help="sample positions per video, a sweep when several (default: the recipe's)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="compute dtype (default: float32 on MLX's CPU backend, else float16 for "
                        "random weights, the model's own for --model)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the LLM (4 bits)")
    p.add_argument("--q-bits", type=_list(_bits), metavar="4,8",
                   help="LLM weight bits, a sweep when several ('none' = not quantized)")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size")
    p.add_argument("--runs", type=int, default=3, help="measured runs per configuration")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per answer")
    p.add_argument("--prompt", default=PROMPT, help="the first question")
    p.add_argument("--followup", default=FOLLOWUP, help="the follow-up question")
    p.add_argument("--seek", choices=["exact", "keyframe"], default="exact")
    p.add_argument("--vision-backend", type=_list(str), default=["mlx"],
                   metavar="mlx,coreml[:UNITS]",
                   help="vision tower backends, a sweep when several; coreml (macOS) takes "
                        "compute units ALL, CPU_AND_NE or CPU_AND_GPU, e.g. coreml:CPU_AND_NE")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="quantize the KV cache")
    p.add_argument("--no-reopen", action="store_true",
                   help="skip the cached-reopen stage (it writes the video cache to a temp dir)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the machine's dense matmul peak, TFLOPS (default: the detected chip's)")
    p.add_argument("--peak-bandwidth-gbs", type=float, default=None,
                   help="the machine's memory bandwidth, GB/s (default: the detected chip's)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure MLX's matmul and bandwidth here and use them as the peak")
    p.add_argument("--json", action="store_true", help="print one JSON object (stdout: only JSON)")


# ---------------------------------------------------------------------------------------
# The command


def machine_info() -> dict:
    import mlx.core as mx

    from sfllava_mlx.system import memory_limit

    chip = hardware.detect_chip()
    limit, source = memory_limit()
    return {"platform": f"{platform.system()} {platform.machine()}",
            "chip": chip.name if chip else None,
            "device": str(mx.default_device()),
            "mlx": getattr(mx, "__version__", "?"),
            "memory_gb": round(limit / 1e9, 1), "memory_source": source,
            "cpu_count": os.cpu_count()}


def main(args) -> int:
    configs = configurations(args)
    if not args.video:
        return profile(args, configs)
    from sfllava_mlx.media import opened

    with opened(args.video) as checked:  # refused before the model loads
        # The first warm-up run opens the video with it; a measured run opens the file
        # itself: its time to first token counts the opening.
        return profile(args, configs, checked if args.warmup else None)


def profile(args, configs, warm=None) -> int:
    """The rows of `configs`; `warm`: the video opened already, for the first (warm-up)
    run."""
    import mlx.core as mx

    from sfllava_mlx import Engine

    from .random_weights import as_dtype, display_name

    compute_dtype = as_dtype(args.dtype) if args.dtype else None
    peak = hardware.resolve_peak(args.peak_tflops, args.peak_bandwidth_gbs, args.calibrate,
                                 compute_dtype or (mx.float32 if mx.default_device() == mx.cpu
                                                   else mx.float16))
    report = {"schema": SCHEMA, "machine": machine_info(), "peak": peak.to_dict(),
              "settings": {"runs": args.runs, "warmup": args.warmup, "max_tokens": args.max_tokens,
                           "prompt": args.prompt, "followup": args.followup, "seek": args.seek},
              "rows": []}
    console = None if args.json else _console()
    with tempfile.TemporaryDirectory(prefix="sfllava-bench-") as tmp:
        path = args.video or str(make_video(Path(tmp) / "bench.mp4"))
        report["video"] = {"path": args.video, "generated": not args.video}
        groups: dict = {}
        for cfg in configs:
            groups.setdefault((cfg.size, cfg.q_bits), []).append(cfg)
        for group in groups.values():
            if console:
                name = group[0].size and f"{display_name(group[0].size)}, random weights"
                console.print(f"[dim]loading {name or group[0].model} ...[/dim]")
            # Its own cache, emptied before each cold open: the user's cache stays as it is.
            engine = Engine(*build_model(group[0], args, group), cache_dir=Path(tmp) / "cache")
            for cfg in group:
                cfg.dtype, cfg.q_bits = group[0].dtype, group[0].q_bits
                cfg.family = engine.model.config.family
                cfg.num_frames = engine.model.config.recipe(cfg.recipe, cfg.num_frames).num_frames
                row = bench_row(cfg, engine, path, args, peak, progress=_progress(console),
                                opened=warm)
                warm = None
                report["rows"].append(row)
                if console:
                    print_row(console, row)
            del engine
            mx.clear_cache()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_summary(console, report)
    return 0
