"""bench/ is a package: every benchmark runs as `python -m bench.NAME`, says what it does
with `--help` without loading mlx-lm or torch, and imports nothing from tests/ (its helpers
are sfllava_convert.tiny's)."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sfllava_convert.tiny.command import REPO, run_env, sfllava_command
from sfllava_convert.tiny.videos import have_ffmpeg

BENCHES = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__")
HEAVY = ("mlx_lm", "torch", "transformers")


def test_every_benchmark_answers_help(tmp_path):
    runs = {name: subprocess.Popen([sys.executable, "-m", f"bench.{name}", "--help"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=REPO, env=run_env(tmp_path))
            for name in BENCHES}
    assert len(runs) >= 14
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"bench.{name} --help: {err}"
        assert out.startswith("usage:"), f"bench.{name} --help printed {out[:200]!r}"


def test_importing_the_benchmarks_stays_light(tmp_path):
    code = ("import importlib, json, sys\n"
            f"for name in {BENCHES!r}:\n"
            "    importlib.import_module('bench.' + name)\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env=run_env(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_no_benchmark_edits_sys_path_or_imports_tests():
    for name in BENCHES:
        tree = ast.parse((REPO / "bench" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "tests" for a in node.names), name
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "tests", name
            elif isinstance(node, ast.Attribute) and node.attr == "path":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), \
                    f"bench/{name}.py edits sys.path"


# ---------------------------------------------------------------------------------------------
# Each benchmark that runs in seconds at its tiniest settings, run for real: the library's API
# drifting under a benchmark (a renamed keyword, a removed attribute) fails here, not on the
# next person to measure something. A figure's size is not checked, only that it is there.
# Not run here (each ran by hand at its smallest; see the benchmark's --help): those that take
# tens of seconds even so (chat_bench, memory_plan measure, serve_bench, checkpoints_bench,
# convert_bench, frames_bench, part_bench, eval_bench), page_bench (a browser), fps_bench
# --random-weights (minutes on a CPU), and device_summary (it reads a device run's output).

needs_ffmpeg = pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg is not installed (make setup)")


def bench_env(tmp_path) -> dict:
    # the benchmarks' temporary directories (tempfile's) land in the test's own
    return {**run_env(tmp_path), "TMPDIR": str(tmp_path)}


def run_bench(tmp_path, name: str, *args, timeout: int = 180) -> str:
    """`python -m bench.NAME ARGS` in a subprocess: its stdout, once it exits with status 0."""
    cmd = [sys.executable, "-m", f"bench.{name}", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=bench_env(tmp_path),
                         timeout=timeout)
    assert out.returncode == 0, (f"bench.{name} {' '.join(cmd[3:])}: exit status "
                                 f"{out.returncode}\n{out.stderr[-4000:]}")
    return out.stdout


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


def tiny_model(tmp_path) -> Path:
    """The test suite's tiny checkpoint, converted by the real command."""
    from sfllava_convert.tiny import write_source_checkpoint

    src = write_source_checkpoint(tmp_path / "tiny-src", "oryx-vit", seed=0)
    out = subprocess.run(sfllava_command(["convert", "--hf-path", src, "--mlx-path",
                                          tmp_path / "tiny", "--dtype", "float32"]),
                         capture_output=True, text=True, cwd=REPO, env=run_env(tmp_path),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return tmp_path / "tiny"


def test_memory_plan_table_runs(tmp_path):
    out = run_bench(tmp_path, "memory_plan", "table")
    rows = [line.strip("|").split("|") for line in out.splitlines() if "4-bit |" in line]
    plan = [r for r in rows if len(r) == 5]  # | LLM | frames | KV | total | total, KV 8-bit |
    fits = [r for r in rows if len(r) == 7]  # | LLM | 6 budgets |
    assert [(r[0].strip(), int(r[1])) for r in plan] == [
        (f"{s} 4-bit", f) for s in ("1.5b", "7b") for f in (128, 256, 512)]
    assert all(positive(*(float(c.split()[0]) for c in r[2:])) for r in plan), plan
    assert [r[0].strip() for r in fits] == ["1.5b 4-bit", "7b 4-bit"]
    assert all(positive(*map(int, r[1:])) for r in fits), fits


@pytest.mark.slow
def test_image_bench_runs(tmp_path):
    out = run_bench(tmp_path, "image_bench", "--sizes", "tiny", "--runs", 1, "--warmup", 0, "--json")
    rows = json.loads(out)
    assert [(r["size"], r["family"], r["image_mode"]) for r in rows] == [
        ("tiny", "sf-llava-1.5", "single"), ("tiny", "llava-onevision", "anyres_max_9")]
    for r in rows:
        assert positive(r["image_tokens"], r["video_tokens"], r["image_ttft_s"],
                        r["video_ttft_s"], r["token_ratio"], r["ttft_ratio"]), r
        assert {"frames", "vision", "prefill", "ttft"} <= set(r["image_timings_s"]), r
        assert {"frames", "vision", "prefill", "ttft"} <= set(r["video_timings_s"]), r


@pytest.mark.slow
def test_decode_overhead_runs(tmp_path):
    report = tmp_path / "report.json"
    out = run_bench(tmp_path, "decode_overhead", "--tokens", 4, "--rounds", 1, "--json", report)
    assert "time per token, ours / mlx-lm" in out
    r = json.loads(report.read_text())
    assert (r["tokens"], r["rounds"]) == (4, 1)
    assert positive(r["ours_tok_s"], r["mlx_lm_tok_s"], r["ratio_time_per_token"])
    assert len(r["ours_tok_s_all"]) == len(r["mlx_lm_tok_s_all"]) == 1


@pytest.mark.slow
def test_startup_bench_runs(tmp_path):
    out = run_bench(tmp_path, "startup_bench", "--runs", 1)
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    rows.pop("command")  # the header
    assert {"sfllava --help", "generate: missing video", "generate: missing model",
            "generate --fps 0", "batch --top-p 1.5"} <= set(rows), rows
    assert positive(*map(float, rows.values())), rows


@pytest.mark.slow
def test_fps_bench_runs(tmp_path):
    out = run_bench(tmp_path, "fps_bench", "--model", tiny_model(tmp_path), "--seconds", 2,
                    "--runs", 1, "--max-tokens", 1)
    m = re.search(r"recipe \((\d+) frames, (\d+) tokens\) TTFT ([\d.]+) s; --fps 2 \((\d+) "
                  r"tokens\) TTFT ([\d.]+) s; ratio ([\d.]+)", out)
    assert m, out
    frames, tokens, base, fps_tokens, fast, ratio = map(float, m.groups())
    assert positive(frames, tokens, base, fast, ratio)
    assert 0 < fps_tokens < tokens  # 2 s at 2 fps: fewer frames than the recipe's


@pytest.mark.slow
@needs_ffmpeg
def test_subtitles_bench_runs(tmp_path):
    out = run_bench(tmp_path, "subtitles_bench", "--dir", tmp_path / "subs", "--repeats", 1,
                    "--film-seconds", 30, "--speech-seconds", 1, "--speech-models", "tiny")
    srt = re.search(r"film's SRT \((\d+) events", out)
    embedded = re.search(r"embedded SubRip stream read: \d+ ms \((\d+) events\)", out)
    assert srt and embedded and srt.group(1) == embedded.group(1), out
    assert re.search(r"select by 128 frames: [\d.]+ ms -> [1-9]\d* lines", out), out
    opening = [line for line in out.splitlines()
               if line.startswith(("| off |", "| auto (embedded stream) |", "| FILE (the SRT) |"))]
    assert len(opening) == 3, out
    assert re.search(r"- tests' tiny .*: [\d.]+ s = [\d.]+ s per minute of audio \(\d+ segments\)",
                     out), out


@pytest.mark.slow
def test_decode_bench_runs(tmp_path):
    report = tmp_path / "report.json"
    run_bench(tmp_path, "decode_bench", "--parts", "decode", "--small", "--frames", 2,
              "--tokens", 4, "--rounds", 1, "--work", tmp_path / "work", "--json", report)
    r = json.loads(report.read_text())["decode"]
    assert positive(r["prefix_tokens"], r["prefill_s"])
    assert sorted(r["rows"], key=int) == ["1", "2", "4", "8"]
    for row in r["rows"].values():
        assert positive(*row["tokens_s"], *row["peak_mb"]) and len(row["tokens_s"]) == 1, row


@pytest.mark.slow
@needs_ffmpeg
def test_batch_bench_runs(tmp_path):
    report = tmp_path / "report.json"
    run_bench(tmp_path, "batch_bench", "--models", "tiny", "--videos", 1, "--procs", 1,
              "--resume-lines", 1, "--work", tmp_path / "work", "--json", report)
    r = json.loads(report.read_text())
    [row] = r["throughput"]
    assert (row["model"], row["procs"], row["videos"], row["pairs"]) == ("tiny", 1, 1, 2)
    assert positive(row["wall_s"], row["videos_per_min"], row["first_video_s"])
    resume = r["resume"]
    assert resume["results_lines"] == 1
    assert positive(resume["first_new_answer_s"], resume["first_answer_one_video_no_results_s"],
                    resume["first_answer_same_folder_no_results_s"])


@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("mlx_vlm", "torch", "transformers")),
                    reason="mlx-vlm, torch and transformers (test extras) run the other side")
def test_mlx_vlm_bench_runs(tmp_path):
    report = tmp_path / "report.json"
    out = run_bench(tmp_path, "mlx_vlm_bench", "--tiny", "--frames", 2, "--max-tokens", 2,
                    "--warmup-frames", 1, "--vlm-python", sys.executable, "--json", report)
    assert "same LLM input sequence: True" in out, out
    r = json.loads(report.read_text())
    for side in ("ours", "theirs"):
        assert positive(r[side]["ttft_s"], r[side]["peak_memory_gb"]), r[side]
        assert len(r[side]["tokens"]) == 2, r[side]
    assert r["ours"]["visual_tokens"] == r["theirs"]["visual_tokens"] > 0
