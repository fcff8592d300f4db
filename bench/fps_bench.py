"""Time to first token of a clip at `--fps F` against the recipe's frame count, side by side.

    python -m bench.fps_bench --model DIR [--seconds 20] [--fps 2] [--runs 2]
    python -m bench.fps_bench --random-weights 1.5b [--q-bits 4] ...

One process, one loaded model, a generated clip of `--seconds` at 25 fps; each setting
runs `--runs` times after a warm-up (the video cache off), alternating, and the median
TTFT of each is reported with their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile


def main() -> None:
    p = argparse.ArgumentParser()
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model")
    src.add_argument("--random-weights")
    p.add_argument("--q-bits", type=int, default=None)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=4)
    opts = p.parse_args()

    import mlx.core as mx

    from sfllava_convert.tiny.videos import make_ffv1_video
    from sfllava_mlx import Engine

    if opts.model:
        engine = Engine(opts.model)
    else:
        from sfllava_app.bench.random_weights import random_model

        engine = Engine(*random_model(opts.random_weights, dtype=mx.float32, q_bits=opts.q_bits))
    settings = {"recipe": None, f"--fps {opts.fps:g}": opts.fps}
    times = {k: [] for k in settings}
    tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        video = os.path.join(tmp, "clip.mkv")
        make_ffv1_video(video, int(opts.seconds * 25), width=320, height=240, fps=25.0)
        for run in range(opts.runs + 1):
            for name, fps in settings.items():
                session = engine.open(video, cache=False, fps=fps, max_tokens=opts.max_tokens)
                for _ in session.ask("What happens?"):
                    pass
                turn = session.last_turn
                tokens[name] = session.visual.embeddings.shape[0]
                if run:  # the first round warms up
                    times[name].append(turn.timings_s["ttft"])
    base, fast = (statistics.median(v) for v in times.values())
    frames = {k: v for k, v in tokens.items()}
    print(f"{opts.seconds:g} s clip, {opts.model or opts.random_weights}: "
          f"recipe ({engine.model.config.recipe().num_frames} frames, {frames['recipe']} tokens) TTFT "
          f"{base:.3f} s; --fps {opts.fps:g} ({list(frames.values())[1]} tokens) TTFT {fast:.3f} s;"
          f" ratio {fast / base:.3f}")


if __name__ == "__main__":
    main()
