"""`sfllava batch` throughput and the cost of resuming (issue 11).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python -m bench.batch_bench [--models tiny,mid] [--videos 8] [--procs 1,2]
                                    [--resume-lines 1000] [--json out.json]

- Throughput: a folder of H.264 camera-like clips (ffmpeg's testsrc2, 320x240, 25 fps,
  keyframe every 250 frames, 6 to 27 s), two prompts each, answered by the real command
  in one process and under `mlx.launch -n N --backend ring`, each run with an empty video
  cache. Reported: videos per minute over the whole command (start-up, model load, merge
  included) and in steady state (from the first video's last line to the last video's,
  polled in the part files).
- Models: `tiny` (the test suite's shapes, 0.15 M parameters) and `mid` (random weights at
  ViT-B/16 224 px + a Qwen2.5-0.5B-shaped LLM with the tiny 640-token vocabulary: 0.45 B
  parameters), both through the real converter.
- Resuming: a results file of `--resume-lines` lines (one per video of a folder of small
  videos, written with the real fingerprints and model identity), one new video beside
  them: seconds from the command's start to the first new answer, against the same command
  on the new video alone with no results file (the start-up both pay).

The machine's load average is printed with each run: other work on the same cores shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sfllava_convert.tiny import LLM, Tower, write_source_checkpoint
from sfllava_convert.tiny.command import REPO, run_env, sfllava_command
from sfllava_convert.tiny.videos import make_ffv1_video

PROMPTS = ("Describe this video.", "Where was it filmed?")
# tiny: sfllava_convert.tiny's defaults (the test suite's shapes)
MID = dict(tower=Tower(image_size=224, patch_size=16, hidden=768, layers=12, heads=12, mlp=3072),
           llm=LLM(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864))
# Frames per video and answer length: the tiny model takes the SF-LLaVA-1.5 default of 128
# frames; the mid model 32 (128 would take minutes per video on 2 CPU cores).
SETTINGS = {"tiny": ["--max-tokens", "16"], "mid": ["--max-tokens", "16", "--num-frames", "32"]}


def make_model(work: Path, name: str) -> Path:
    from sfllava_app.cli import main

    src = write_source_checkpoint(work / f"src-{name}", "oryx-vit", seed=0,
                                  **({} if name == "tiny" else MID))
    dst = work / f"mlx-{name}"
    assert main(["convert", "--hf-path", str(src), "--mlx-path", str(dst),
                 "--dtype", "float32"]) == 0
    shutil.rmtree(src)
    return dst


def make_clips(folder: Path, n: int) -> list[float]:
    folder.mkdir(parents=True, exist_ok=True)
    durations = [6 + (7 * i) % 22 for i in range(n)]  # 6..27 s, mixed
    for i, d in enumerate(durations):
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size=320x240:rate=25:duration={d}", "-c:v", "libx264",
                        "-preset", "ultrafast", "-g", "250", "-keyint_min", "250",
                        "-sc_threshold", "0", "-pix_fmt", "yuv420p", str(folder / f"clip{i:03d}.mp4")],
                       check=True)
    return durations


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def lines_in(out: Path, out_before: int = 0) -> int:
    """Lines answered so far: in the part files, or, once the run has merged them and
    removed them, in --out (beyond the `out_before` it held at the start)."""
    parts = sum(count_lines(p) for p in out.parent.glob(f".{out.name}.rank*.part"))
    return max(parts, count_lines(out) - out_before)


def new_lines(out: Path, before: int) -> list:
    """The lines a (stopped) run added: in its part files, or merged into --out."""
    rows = [json.loads(x) for p in out.parent.glob(f".{out.name}.rank*.part")
            for x in p.read_text().splitlines()]
    if not rows and out.exists():
        rows = [json.loads(x) for x in out.read_text().splitlines()[before:]]
    return rows


def run_batch(cmd: list, out: Path, xdg: Path, per_video: int, stop_after=None) -> dict:
    """Run, polling the part files: (wall, time of each video's last line)."""
    if xdg.exists():
        shutil.rmtree(xdg)
    load = os.getloadavg()[0]
    out_before = count_lines(out)
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env={**run_env(xdg), "XDG_CACHE_HOME": str(xdg)}, cwd=REPO, text=True)
    marks, seen = [], 0
    while p.poll() is None:
        n = lines_in(out, out_before)
        while n >= (len(marks) + 1) * per_video:
            marks.append(time.perf_counter() - start)
        if n > seen:
            seen = n
            if stop_after is not None and n >= stop_after:
                p.kill()
                break
        time.sleep(0.02)
    _, err = p.communicate()
    wall = time.perf_counter() - start
    n = lines_in(out, out_before)  # lines merged after the last poll count at the end
    while stop_after is None and n >= (len(marks) + 1) * per_video:
        marks.append(wall)
    return {"wall_s": round(wall, 2), "video_done_s": [round(t, 2) for t in marks],
            "load_avg": round(load, 2), "status": p.returncode, "stderr_tail": err[-400:]}


def throughput(work: Path, model: Path, name: str, n_videos: int, procs: list[int]) -> list:
    clips = work / "clips"
    if not clips.exists():
        make_clips(clips, n_videos)
    rows = []
    for n in procs:
        out = work / f"out-{name}-{n}" / "results.jsonl"
        if out.parent.exists():
            shutil.rmtree(out.parent)
        out.parent.mkdir(parents=True)
        args = ["batch", str(clips), "--model", str(model), "--out", str(out), *SETTINGS[name]]
        for p in PROMPTS:
            args += ["--prompt", p]
        cmd = sfllava_command([]) + args
        if n > 1:
            cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(n), "--backend",
                   "ring", "--"] + cmd
        r = run_batch(cmd, out, work / "xdg", len(PROMPTS))
        lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
        assert len(lines) == n_videos * len(PROMPTS), (len(lines), r["stderr_tail"])
        assert all(x["error"] is None for x in lines)
        marks = r["video_done_s"]
        # steady state: the videos after the first one, over the time they took
        steady = (len(marks) - 1) / (marks[-1] - marks[0]) * 60 if len(marks) > 1 and marks[-1] > marks[0] else None
        row = {"model": name, "procs": n, "videos": n_videos, "pairs": len(lines),
               "wall_s": r["wall_s"], "videos_per_min": round(n_videos / r["wall_s"] * 60, 2),
               "steady_videos_per_min": round(steady, 2) if steady else None,
               "first_video_s": marks[0] if marks else None, "load_avg": r["load_avg"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def resume_cost(work: Path, model: Path, n_lines: int) -> dict:
    from sfllava_app.batch.results import line
    from sfllava_mlx import load
    from sfllava_mlx.cache import Fingerprint, model_identity

    lib = work / "resume-lib"
    lib.mkdir()
    for i in range(n_lines + 1):
        make_ffv1_video(lib / f"v{i:04d}.mkv", 20, width=48, height=40, seed=i)
    new = lib / f"v{n_lines:04d}.mkv"
    prompt = PROMPTS[0]
    base = ["batch", "--model", str(model), "--prompt", prompt, *SETTINGS["tiny"]]

    # The start-up every run pays: the new video alone, no results file.
    solo = work / "resume-solo"
    solo.mkdir()
    (solo / new.name).symlink_to(new)
    out0 = work / "resume-template" / "results.jsonl"
    out0.parent.mkdir()
    r_bare = run_batch(sfllava_command([]) + base[:1] + [str(solo)] + base[1:] + ["--out", str(out0)],
                       out0, work / "xdg", 1, stop_after=1)
    template = new_lines(out0, 0)[0]  # a real line: its answer fields
    # A results file of n_lines lines, one per old video (their real fingerprints)
    m, _ = load(str(model))
    identity = model_identity(m)
    out = work / "resume" / "results.jsonl"
    out.parent.mkdir()
    with open(out, "wb") as f:
        for i in range(n_lines):
            v = lib / f"v{i:04d}.mkv"
            f.write(line({**template, "video": str(v), "fingerprint": Fingerprint.of(v).sampled,
                          "model_identity": identity}))
    r_resume = run_batch(sfllava_command([]) + base[:1] + [str(lib)] + base[1:] + ["--out", str(out)],
                         out, work / "xdg", 1, stop_after=1)
    answered = [r["video"] for r in new_lines(out, n_lines)]
    assert answered == [str(new)], answered  # only the new video was answered
    # The same folder with no results file: start-up and discovery of every file
    out2 = work / "resume-fresh" / "results.jsonl"
    out2.parent.mkdir()
    r_fresh = run_batch(sfllava_command([]) + base[:1] + [str(lib)] + base[1:] + ["--out", str(out2)],
                        out2, work / "xdg", 1, stop_after=1)
    row = {"results_lines": n_lines,
           "first_new_answer_s": r_resume["video_done_s"][0],
           "first_answer_one_video_no_results_s": r_bare["video_done_s"][0],
           "resume_overhead_s": round(r_resume["video_done_s"][0] - r_bare["video_done_s"][0], 2),
           "first_answer_same_folder_no_results_s": r_fresh["video_done_s"][0],
           "load_avg": [r_bare["load_avg"], r_resume["load_avg"], r_fresh["load_avg"]]}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,mid")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--resume-lines", type=int, default=1000, help="0: skip")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="sfllava-batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"cpus": os.cpu_count(), "throughput": [], "resume": None}
    procs = [int(x) for x in a.procs.split(",")]
    try:
        models = {}
        for name in a.models.split(","):
            models[name] = make_model(work, name)
            report["throughput"] += throughput(work, models[name], name, a.videos, procs)
        if a.resume_lines:
            tiny = models.get("tiny") or make_model(work, "tiny")
            report["resume"] = resume_cost(work, tiny, a.resume_lines)
    finally:
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
