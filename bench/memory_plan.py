"""The memory plan (sfllava_mlx/memory.py) against the measured peak, and what fits where.

    python -m bench.memory_plan measure [--size 1.5b] [--frames 8,16,32] [--q-bits 4]
    python -m bench.memory_plan table

`measure` runs the real pipeline on a generated clip with random weights at the real shapes
(one fresh process per configuration, so each peak is its own) and prints the plan's
estimate beside MLX's peak memory. `table` prints, from the plan alone, the memory of 128 /
256 / 512 frames at 1.5B and 7B with a 4-bit LLM, and the largest frame count that fits in
8 / 16 / 32 GB, with and without `--kv-bits 8`. Figures in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def one_run(size: str, frames: int, q_bits: int, max_tokens: int, video: str) -> dict:
    """In this process: plan, then run, and report both."""
    import mlx.core as mx

    from sfllava_app.bench.random_weights import random_model
    from sfllava_mlx import Engine

    engine = Engine(*random_model(size, dtype=mx.float32, q_bits=q_bits or None, num_frames=frames))
    plan = engine.plan(video, cache=False, max_tokens=max_tokens)  # what `open` checks
    mx.reset_peak_memory()
    session = engine.open(video, cache=False, max_tokens=max_tokens)
    for _ in session.ask("Describe the video."):
        pass
    return {"size": size, "frames": frames, "q_bits": q_bits, "estimate_gb": plan.total / 1e9,
            "weights_gb": plan.weights / 1e9, "kv_gb": plan.kv_cache / 1e9,
            "working_gb": plan.working_set / 1e9, "peak_gb": mx.get_peak_memory() / 1e9}


def measure(opts) -> None:
    from sfllava_convert.tiny.videos import make_ffv1_video

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        video = os.path.join(tmp, "clip.mkv")
        make_ffv1_video(video, 100, width=96, height=64)
        for frames in opts.frames:
            cmd = [sys.executable, __file__, "one", "--size", opts.size, "--frames", str(frames),
                   "--q-bits", str(opts.q_bits), "--max-tokens", str(opts.max_tokens),
                   "--video", video]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['size']} q{r['q_bits']} {r['frames']:4d} frames: estimate "
                  f"{r['estimate_gb']:.2f} GB (weights {r['weights_gb']:.2f} + KV {r['kv_gb']:.3f}"
                  f" + working {r['working_gb']:.2f}), peak {r['peak_gb']:.2f} GB, "
                  f"estimate/peak {r['estimate_gb'] / r['peak_gb']:.3f}", flush=True)


def table(_opts) -> None:
    import mlx.core as mx

    from sfllava_app.bench.random_weights import model_config, quantize_language_model
    from sfllava_mlx.memory import largest_fitting_frames, plan_video
    from sfllava_mlx.model import SFLLaVA, cast_model

    print("| LLM | frames | KV 16-bit | total | total with --kv-bits 8 |")
    print("|---|---|---|---|---|")
    models = {}
    for size in ("1.5b", "7b"):
        config = model_config(size, dtype="bfloat16")
        model = SFLLaVA(config)  # lazy: shapes only, nothing allocated
        cast_model(model, mx.bfloat16)
        quantize_language_model(model, 4)
        models[size] = model
        for frames in (128, 256, 512):
            s = config.recipe(num_frames=frames)
            p = plan_video(model, s)
            q = plan_video(model, s, kv_bits=8)
            print(f"| {size} 4-bit | {frames} | {p.kv_cache / 1e9:.2f} GB | {p.total / 1e9:.2f} GB"
                  f" | {q.total / 1e9:.2f} GB |")
    print()
    print("| LLM | 8 GB | 16 GB | 32 GB | 8 GB, --kv-bits 8 | 16 GB, --kv-bits 8 | 32 GB, --kv-bits 8 |")
    print("|---|---|---|---|---|---|---|")
    for size, model in models.items():
        s = model.config.recipe(num_frames=4096)
        cells = []
        for kv_bits in (None, 8):
            for gb in (8, 16, 32):
                # Metal recommends about 3/4 of unified memory as the working set.
                cells.append(str(largest_fitting_frames(model, s, int(gb * 0.75e9), model.context_length,
                                                        kv_bits=kv_bits)))
        print(f"| {size} 4-bit | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--size", default="1.5b")
    m.add_argument("--frames", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32])
    m.add_argument("--q-bits", type=int, default=0)
    m.add_argument("--max-tokens", type=int, default=8)
    o = sub.add_parser("one")
    o.add_argument("--size")
    o.add_argument("--frames", type=int)
    o.add_argument("--q-bits", type=int)
    o.add_argument("--max-tokens", type=int)
    o.add_argument("--video")
    sub.add_parser("table")
    opts = p.parse_args()
    if opts.cmd == "one":
        print(json.dumps(one_run(opts.size, opts.frames, opts.q_bits, opts.max_tokens, opts.video)))
    elif opts.cmd == "measure":
        measure(opts)
    else:
        table(opts)


if __name__ == "__main__":
    main()
