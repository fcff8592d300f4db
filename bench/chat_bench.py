"""Chat latency at real SF-LLaVA-1.5-1.5B shapes (random weights): follow-ups and reopening
a cached video, as ratios measured side by side in one run.

    python -m bench.chat_bench [--frames 16] [--runs 3] [--size 1.5b]

- cold open: time to first token of the first question about a video never seen
  (frames, vision tower, prefill of system prompt + video + question), cache empty;
- follow-up: time to first token of the next question in the same conversation (the
  KV cache is kept: only the question is prefilled);
- reopen: time to first token of the first question when the video is opened again and
  the video cache hits (visual tokens and prefilled prefix read back from disk).

Each run goes through the library's Engine / Session exactly as `sfllava generate`/`chat` do. The goals of
the project's issue 3: follow-up <= 5 % of the first question, reopen <= 10 % of a cold open.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sfllava_convert.tiny.videos import make_ffv1_video

QUESTION = "What happens in this video?"
FOLLOW_UPS = ["What color is the car?", "How many people are in the video?",
              "Where does the video take place?", "What happens at the end?"]


def first_token(session, question, start=None):
    """Ask and return the turn once the first token is out (the rest is not timed)."""
    for _ in session.ask(question, start_time=start, max_tokens=1):
        pass
    return session.last_turn


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1.5b")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--runs", type=int, default=3, help="follow-ups and reopens measured (median)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    import mlx.core as mx

    from sfllava_app.bench.random_weights import random_model
    from sfllava_mlx import Engine

    tmp = Path(tempfile.mkdtemp(prefix="sfllava-chat-bench-"))
    os.environ["XDG_CACHE_HOME"] = str(tmp / "xdg")
    video = tmp / "clip.mkv"  # 20 s of 640x360 at 25 fps, FFV1 (lossless, seek-exact)
    make_ffv1_video(video, 500, width=640, height=360, fps=25)
    tic = time.perf_counter()
    model, tok = random_model(a.size, dtype=mx.float32, num_frames=a.frames)
    print(f"model: SF-LLaVA-1.5 {a.size} shapes, random weights, float32, {a.frames} frames "
          f"(built in {time.perf_counter() - tic:.0f} s)", file=sys.stderr)
    # Warm-up on a few tokens: first-call allocations are not the video's cost.
    mx.eval(model.vision_tower(mx.zeros((1, 384, 384, 3))))
    mx.eval(model.language_model(mx.zeros((1, 16), dtype=mx.int32)))

    engine = Engine(model, tok)
    options = dict(num_frames=a.frames, max_tokens=4)

    # Cold open: empty cache.
    cold = engine.open(video, **options)
    turn = first_token(cold, QUESTION)
    cold_ttft, cold_timings = turn.timings_s["ttft"], dict(turn.timings_s)
    assert cold.cache == "miss"
    tic = time.perf_counter()
    cold.save()
    save_s = time.perf_counter() - tic
    print(f"cold open: ttft {cold_ttft:.2f} s {fmt(cold_timings)}; saved in {save_s:.2f} s",
          file=sys.stderr)

    follow = []
    for q in FOLLOW_UPS[:a.runs]:
        t = first_token(cold, q, time.perf_counter())
        follow.append(t.timings_s["ttft"])
        print(f"follow-up: ttft {follow[-1] * 1000:.0f} ms ({t.prompt_tokens} prompt tokens, "
              f"context {cold.conversation.offset})", file=sys.stderr)

    reopen, reopen_timings = [], None
    for _ in range(a.runs):
        warm = engine.open(video, **options)
        t = first_token(warm, QUESTION)
        assert warm.cache == "hit" and warm.prefix_from_cache
        reopen.append(t.timings_s["ttft"])
        reopen_timings = dict(t.timings_s)
        print(f"reopen: ttft {reopen[-1] * 1000:.0f} ms {fmt(t.timings_s)}", file=sys.stderr)

    entry = engine.store.entries()[0]
    result = {
        "size": a.size, "frames": a.frames, "visual_tokens": int(cold.visual.embeddings.shape[0]),
        "prefix_tokens": cold.conversation.prefix_length(),
        "cold_ttft_s": cold_ttft, "cold_timings_s": cold_timings, "save_s": save_s,
        "follow_up_ttft_s": statistics.median(follow), "reopen_ttft_s": statistics.median(reopen),
        "reopen_timings_s": reopen_timings, "cache_entry_bytes": entry.bytes,
        "follow_up_ratio": statistics.median(follow) / cold_ttft,
        "reopen_ratio": statistics.median(reopen) / cold_ttft,
    }
    print(json.dumps(result, indent=None if a.json else 1))
    print(f"follow-up / first question: {100 * result['follow_up_ratio']:.2f} % (goal <= 5 %); "
          f"reopen / cold open: {100 * result['reopen_ratio']:.2f} % (goal <= 10 %)", file=sys.stderr)
    return 0


def fmt(t: dict) -> str:
    return "(" + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k != "ttft") + ")"


if __name__ == "__main__":
    sys.exit(main())
