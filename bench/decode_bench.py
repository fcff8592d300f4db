"""Many answers at once (issue 17): decoding together against one at a time, in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python -m bench.decode_bench [--parts decode,batch,serve,pause] [--frames 64]
                                     [--tokens 160] [--rounds 2] [--small] [--json out.json]

The model: random weights through the real converter, with LLaVA-OneVision-0.5B's LLM
(Qwen2: 24 layers, 896 wide, 14 heads, 2 KV heads, MLP 4864, its 151,936-token vocabulary,
tied embeddings: 494 M parameters) and a small ViT (224 px, patch 16, 6 blocks, 384 wide),
float32. The video: 10 s of 640x360 FFV1; `--frames` 64 SlowFast positions give a
1,552-token visual prefix (16 slow frames x 7x7 + 48 fast x 4x4).

- decode: the library. One prefilled prefix, then k prompts' answers (`--tokens` each)
  from forks of it: k = 1 decodes alone (`Session.ask`, mlx-lm's stream_generate), k = 2, 4
  and 8 together (`batching.Decoder`); aggregate tokens/s over the wall time from the first
  question to the last token, and peak memory against the memory plan's estimate. Rounds
  alternate the order (1, 2, 4, 8, then 8, 4, 2, 1).
- batch: the real `sfllava batch` on 1 video x 4 prompts x `--tokens`, --decode-concurrency
  1 and 4, alternating, each with an empty video cache: the command's wall time.
- serve: the real `sfllava serve`; the video's prefix held (asked once first); then one
  client's streamed answer, and four clients' at once: aggregate completion tokens/s from
  the first request to the last token, alternating.
- pause: the real `sfllava serve`; a client streams a long answer; meanwhile another asks
  about a video never seen (its frames decoded, encoded and its prefix prefilled in steps):
  the gaps between the first client's chunks before, and during the other's open (until
  its first token), as that client receives them.

The machine's load average is printed with each part: other work on the same cores shows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sfllava_convert.tiny import LLM, Tower, write_source_checkpoint
from sfllava_convert.tiny.command import REPO, Server, first_message, run_env, sfllava_command
from sfllava_convert.tiny.videos import make_ffv1_video

PROMPTS = ("What happens in this video?", "Who is in it?", "What color is the car?",
           "Describe the scene in detail, please.", "Where was it filmed?",
           "What is the weather like?", "How many people are there?", "What happens at the end?")
OV05 = LLM(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab_size=151936)
VIT = Tower(image_size=224, patch_size=16, hidden=384, layers=6, heads=6, mlp=1536)
SMALL = LLM(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=256, vocab_size=4096)


def load() -> str:
    return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())


def build(work: Path, small: bool) -> Path:
    from sfllava_app.cli import main
    dst = work / "model"
    if (dst / "config.json").exists():
        return dst
    src = write_source_checkpoint(work / "src", "oryx-vit", seed=0, tower=VIT,
                                  llm=SMALL if small else OV05)
    assert main(["convert", "--hf-path", str(src), "--mlx-path", str(dst),
                 "--dtype", "float32"]) == 0
    import shutil

    shutil.rmtree(src)
    return dst


# ----------------------------------------------------------------------------------------
# decode: the library, k answers from one prefix


def decode_part(model_dir: Path, video: Path, frames: int, tokens: int, rounds: int) -> dict:
    import mlx.core as mx

    from sfllava_mlx import Engine
    from sfllava_mlx.batching import Decoder, answer_all
    from sfllava_mlx.memory import batch_bytes, kv_bytes

    engine = Engine(str(model_dir))
    session = engine.open(video, cache=False, recipe="slowfast", num_frames=frames)
    tic = time.perf_counter()
    session.prefill()
    prefill_s = time.perf_counter() - tic
    prefix = session.conversation.offset
    print(f"decode: prefix {prefix} tokens, prefilled in {prefill_s:.1f} s; {load()}", flush=True)
    rows: dict = {}
    order = [1, 2, 4, 8]
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            forks = [session.fork() for _ in range(k)]
            mx.synchronize()
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            tic = time.perf_counter()
            if k == 1:
                for _ in forks[0].ask(PROMPTS[0], max_tokens=tokens, temp=0.0):
                    pass
            else:
                decoder = Decoder(engine.model, engine.tokenizer, concurrency=k)
                list(answer_all(decoder, (f.ask(p, max_tokens=tokens, decoder=decoder)
                                          for f, p in zip(forks, PROMPTS))))
                decoder.close()
            wall = time.perf_counter() - tic
            generated = sum(len(f.last_turn.tokens) for f in forks)
            peak = mx.get_peak_memory() - before
            # the plan: every answer's own cache, twice, beside the prefix (held already)
            answer = kv_bytes(engine.model, prefix + 20 + tokens)
            plan = batch_bytes(0, 0, 0, [answer] * k) if k > 1 else answer - kv_bytes(
                engine.model, prefix)
            row = rows.setdefault(k, {"tokens_s": [], "peak_mb": [], "plan_mb": plan / 1e6})
            row["tokens_s"].append(generated / wall)
            row["peak_mb"].append(peak / 1e6)
            print(f"  concurrency {k}: {generated} tokens in {wall:.1f} s = "
                  f"{generated / wall:.2f} tokens/s; peak above the held prefix "
                  f"{peak / 1e6:.0f} MB (plan {plan / 1e6:.0f} MB); {load()}", flush=True)
    return {"prefix_tokens": prefix, "prefill_s": prefill_s, "rows": rows}


# ----------------------------------------------------------------------------------------
# batch: the real command


def batch_part(model_dir: Path, video: Path, frames: int, tokens: int, rounds: int,
               work: Path) -> dict:
    walls: dict = {1: [], 4: []}
    for r in range(rounds):
        for n in ((1, 4) if r % 2 == 0 else (4, 1)):
            out = work / f"batch-c{n}-{r}.jsonl"
            out.unlink(missing_ok=True)  # answered from scratch, not resumed
            args = ["batch", video, "--model", model_dir, "--out", out, "--max-tokens", tokens,
                    "--recipe", "slowfast", "--num-frames", frames, "--decode-concurrency", n]
            for p in PROMPTS[:4]:
                args += ["--prompt", p]
            xdg = work / f"xdg-batch-{n}-{r}"  # an empty video cache each run
            tic = time.perf_counter()
            subprocess.run(sfllava_command(args), check=True, env=run_env(xdg), cwd=REPO,
                           capture_output=True, text=True)
            wall = time.perf_counter() - tic
            lines = [json.loads(x) for x in out.read_text().splitlines()]
            made = sum(len(x["tokens"]) for x in lines)
            walls[n].append(wall)
            print(f"batch: --decode-concurrency {n}: {wall:.1f} s for {len(lines)} answers, "
                  f"{made} tokens; {load()}", flush=True)
    return {"wall_s": walls}


# ----------------------------------------------------------------------------------------
# serve: one client against four


def streamed(client, video, question, tokens, frames, marks: list | None = None) -> int:
    n = 0
    stream = client.chat.completions.create(
        model="model", messages=[first_message(str(video), question)], stream=True,
        max_tokens=tokens, extra_body={"sfllava": {"num_frames": frames, "recipe": "slowfast"}})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if marks is not None:
                marks.append(time.perf_counter())
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return n


def serve_part(model_dir: Path, video: Path, frames: int, tokens: int, rounds: int,
               work: Path) -> dict:
    s = Server(["--model", model_dir, "--media-dir", video.parent], work / "serve").wait()
    try:
        streamed(s.client(), video, "Warm up.", 2, frames)  # the prefix is held from now
        rates: dict = {1: [], 4: []}
        for r in range(rounds):
            for n in ((1, 4) if r % 2 == 0 else (4, 1)):
                tic = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    made = sum(pool.map(lambda q: streamed(s.client(), video, q, tokens, frames),
                                        PROMPTS[:n]))
                wall = time.perf_counter() - tic
                rates[n].append(made / wall)
                print(f"serve: {n} client{'s' if n > 1 else ''}: {made} tokens in {wall:.1f} s "
                      f"= {made / wall:.2f} tokens/s; {load()}", flush=True)
    finally:
        s.stop()
    return {"tokens_s": rates}


# ----------------------------------------------------------------------------------------
# pause: a running stream while another request's video is opened


def pause_part(model_dir: Path, video: Path, other: Path, frames: int, work: Path) -> dict:
    s = Server(["--model", model_dir, "--media-dir", video.parent, "--no-cache"],
               work / "pause").wait()
    try:
        streamed(s.client(), video, "Warm up.", 2, frames)  # held: the stream decodes at once
        marks: list = []
        opened: dict = {}
        done = threading.Event()

        def long_stream():
            streamed(s.client(), video, PROMPTS[1], 2000, frames, marks)

        def newcomer():
            while len(marks) < 20:
                time.sleep(0.01)
            opened["sent"] = time.perf_counter()
            first: list = []
            streamed(s.client(), other, PROMPTS[2], 4, frames, first)
            opened["first"] = first[0] if first else time.perf_counter()
            done.set()

        runner = threading.Thread(target=long_stream, daemon=True)
        runner.start()
        newcomer()
        time.sleep(2.0)  # a little of the stream after the newcomer's first token
        tail = time.perf_counter()
    finally:
        s.stop()
    gaps = [(b - a, a) for a, b in zip(marks, marks[1:])]
    before = [g for g, t in gaps if t < opened["sent"]]
    during = [g for g, t in gaps if opened["sent"] <= t < opened["first"]]
    after = [g for g, t in gaps if opened["first"] <= t < tail]
    out = {"open_s": opened["first"] - opened["sent"],
           "gap_before_median_s": sorted(before)[len(before) // 2] if before else None,
           "gap_during_max_s": max(during) if during else None,
           "gaps_during": len(during), "gap_after_median_s":
               sorted(after)[len(after) // 2] if after else None}
    print(f"pause: the newcomer's open took {out['open_s']:.1f} s (to its first token); the "
          f"running stream's gaps: median {out['gap_before_median_s']:.3f} s before, longest "
          f"{out['gap_during_max_s']:.2f} s over {len(during)} chunks during; {load()}",
          flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="decode,batch,serve,pause")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a small LLM: checks the script")
    ap.add_argument("--work", default=None, help="keep the model here between runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work or "/tmp/sfllava-decode-bench")
    work.mkdir(parents=True, exist_ok=True)
    print(f"start: {load()}", flush=True)
    model = build(work, args.small)
    media = work / "media"
    media.mkdir(exist_ok=True)
    video, other = media / "clip.mkv", media / "other.mkv"  # 10 s of 640x360 at 25 fps
    make_ffv1_video(video, 250, width=640, height=360, fps=25, seed=1)
    make_ffv1_video(other, 250, width=640, height=360, fps=25, seed=2)
    parts = args.parts.split(",")
    report = {"load_start": os.getloadavg()}
    if "decode" in parts:
        report["decode"] = decode_part(model, video, args.frames, args.tokens, args.rounds)
    if "batch" in parts:
        report["batch"] = batch_part(model, video, args.frames, args.tokens, args.rounds, work)
    if "serve" in parts:
        report["serve"] = serve_part(model, video, args.frames, args.tokens, args.rounds, work)
    if "pause" in parts:
        report["pause"] = pause_part(model, video, other, args.frames, work)
    report["load_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
