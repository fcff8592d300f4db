"""`sfllava eval` against `sfllava batch` over the same (video, prompt) pairs (issue 26), and
an estimate of a full Video-MME run on an M-series Mac from the project's stage figures.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python -m bench.eval_bench [--videos 12] [--repeats 3] [--json out.json]

- Measured: a Video-MME-style set written here (parquet), 3 questions a video about H.264
  clips (ffmpeg testsrc2, 320x240, 25 fps, 4 s and half a second more each), every video asked the same 3 questions
  so that `sfllava batch --prompt P1 --prompt P2 --prompt P3` answers exactly the pairs eval
  answers (eval's prompts are those texts). The tiny model (the test suite's shapes) through
  the real converter; the real commands, alternated, each run with an empty video cache;
  wall time from start to exit (start-up, model load and merge included). Ratio = batch's
  time / eval's (>= 0.95x: eval adds only its prompt and its scoring).
- Estimated: 900 videos x 3 questions at 128 frames, from the work per stage that
  docs/performance.md counts (the SF tower's 66 TFLOP for 128 frames, the prefix's prefill,
  16 decode steps per question, the three decoded together) and the chip table of
  docs/hardware.md, at stated efficiencies. An estimate, not a measurement: no Mac was lent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from sfllava_convert.tiny.command import REPO, run_env, sfllava_command

QUESTIONS = [("What is shown?", ["A. A red car.", "B. A blue sky.", "C. A dog.", "D. A cat."], "A"),
             ("How many?", ["A. One.", "B. Two.", "C. Three.", "D. Four."], "C"),
             ("When?", ["A. Morning.", "B. Noon.", "C. Evening.", "D. Night."], "D")]

# Work per video and question (docs/performance.md, "On an NVIDIA H100": counted as in
# docs/hardware.md): SF-LLaVA-1.5, 128 frames, 8,114-token prefix.
TOWER_TFLOP = 66.0
PREFILL_TFLOP = {"1.5B": 26.9, "7B": 119.0}
DECODE_GB = {"1.5B": 1.10, "7B": 4.44}  # a 4-bit decode step, the 8K KV cache included
QUESTION_TOKENS = 80  # a Video-MME question and its options, prefilled after the prefix
CHIPS = {"M1": (2.6, 68), "M2 Pro": (6.8, 200), "M3 Max (40-core GPU)": (16.2, 400),
         "M4 Pro": (9.2, 273), "M4 Max (40-core GPU)": (18.4, 546)}  # FP16 TFLOPS, GB/s
EFFICIENCY = (0.25, 0.5)  # share of peak FLOP/s the tower and prefill reach (a range)
BANDWIDTH_SHARE = 0.6  # share of the bandwidth decode reaches (docs/hardware.md: 50-84 %)


def make_set(work: Path, n_videos: int) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    videos = work / "videos"
    videos.mkdir(parents=True)
    rows = []
    for i in range(n_videos):
        d = 4 + 0.5 * i  # distinct content: no two videos share a fingerprint
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size=320x240:rate=25:duration={d}", "-c:v", "libx264",
                        "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                        str(videos / f"v{i:03d}.mp4")], check=True)
        for k, (q, options, answer) in enumerate(QUESTIONS):
            rows.append({"video_id": f"{i:03d}", "duration": "short", "domain": "Knowledge",
                         "sub_category": "Other", "url": "", "videoID": f"v{i:03d}",
                         "question_id": f"{i:03d}-{k + 1}", "task_type": "Counting Problem",
                         "question": q, "options": options, "answer": answer})
    bench = work / "videomme.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bench)
    return bench, videos


def timed(cmd: list, xdg: Path) -> float:
    shutil.rmtree(xdg, ignore_errors=True)
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**run_env(xdg), "XDG_CACHE_HOME": str(xdg)},
                       cwd=REPO)
    wall = time.perf_counter() - start
    assert r.returncode == 0, r.stderr[-2000:]
    return wall


def measure(work: Path, n_videos: int, repeats: int) -> dict:
    from bench.batch_bench import make_model
    from sfllava_app.eval import videomme

    model = make_model(work, "tiny")
    bench, videos = make_set(work, n_videos)
    common = ["--model", str(model), "--max-tokens", "16"]
    prompts = [videomme.prompt(q, o, False) for q, o, _ in QUESTIONS]
    walls = {"eval": [], "batch": []}
    load = os.getloadavg()[0]
    for r in range(repeats):
        for name in ("eval", "batch") if r % 2 == 0 else ("batch", "eval"):
            out = work / f"{name}-{r}.jsonl"
            if name == "eval":
                args = ["eval", str(bench), "--videos", str(videos), "--out", str(out)]
            else:
                args = ["batch", str(videos), "--out", str(out)]
                for p in prompts:
                    args += ["--prompt", p]
            walls[name].append(timed(sfllava_command(args + common), work / "xdg"))
            lines = out.read_text().splitlines()
            assert len(lines) == n_videos * len(QUESTIONS), (name, len(lines))
    e, b = statistics.median(walls["eval"]), statistics.median(walls["batch"])
    return {"videos": n_videos, "questions": n_videos * len(QUESTIONS), "repeats": repeats,
            "eval_s": [round(x, 2) for x in walls["eval"]],
            "batch_s": [round(x, 2) for x in walls["batch"]],
            "eval_median_s": round(e, 2), "batch_median_s": round(b, 2),
            "ratio_batch_over_eval": round(b / e, 3), "load_avg": round(load, 2)}


def estimate(videos: int = 900, questions: int = 2700) -> list:
    """Hours for the whole run per chip and size, at the efficiency range."""
    per_video_q = questions / videos
    rows = []
    for size in PREFILL_TFLOP:
        flop = TOWER_TFLOP + PREFILL_TFLOP[size] * (1 + per_video_q * QUESTION_TOKENS / 8114)
        for chip, (tflops, gbs) in CHIPS.items():
            decode_s = 16 * DECODE_GB[size] / (gbs * BANDWIDTH_SHARE)  # 3 decoded together
            hours = [videos * (flop / (tflops * eff) + decode_s) / 3600 for eff in EFFICIENCY]
            rows.append({"size": size, "chip": chip, "tflop_per_video": round(flop, 1),
                         "decode_s_per_video": round(decode_s, 2),
                         "hours": [round(h, 1) for h in sorted(hours)]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    try:
        result = {"measured": measure(work, a.videos, a.repeats), "estimate": estimate()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result["measured"]))
    for row in result["estimate"]:
        print(json.dumps(row))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
