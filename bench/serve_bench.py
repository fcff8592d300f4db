"""`sfllava serve` through the API, against `sfllava generate`, measured in one run.

    python -m bench.serve_bench [--models tiny,mid] [--runs 3] [--frames 16] [--clients 8]

For each model (tiny: conftest's tiny shape; mid: a random model with a Qwen2.5-0.5B-shaped
LLM, 24 layers, 896 wide, and a 6-block ViT at 224 px — written by convert.tiny and
converted by the real converter):

- first / follow-up TTFT: time to the first streamed content chunk, measured by an
  `openai` client, for a first question about a video never seen (server --no-cache and a
  new system prompt each run, so every run decodes, encodes and prefills) and for the
  follow-up in the same conversation (held: only its own tokens prefilled);
- added latency: the whole non-streamed answer through the API against `sfllava generate
  --no-cache --json`'s own ttft + generate for the same request (same system prompt,
  question, frames, max tokens), run right after it: the server's HTTP, JSON, queue and
  thread hand-off cost;
- requests/s (tiny only): `--clients` threads asking about one video at once, streamed and
  not, each a new conversation (the video's prefix is held, so each prefills its question);
- peak memory with 8 video requests queued at once (tiny only): 8 different 640x360 videos,
  the server's peak resident memory (VmHWM) against a fresh server's after one such
  request. The server decodes frames only for the request being answered.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sfllava_convert.tiny import LLM, Tower, write_source_checkpoint
from sfllava_convert.tiny.command import Server, first_message, run_env, sfllava_command
from sfllava_convert.tiny.videos import make_ffv1_video

QUESTION = "What happens in this video?"
FOLLOW_UP = "What color is the car?"
# tiny: sfllava_convert.tiny's defaults (the test suite's shapes)
MID = dict(tower=Tower(image_size=224, patch_size=16, hidden=384, layers=6, heads=6, mlp=1536),
           llm=LLM(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864))


def build_model(tmp: Path, name: str) -> Path:
    from sfllava_app.cli import main as sfllava

    shape = {} if name == "tiny" else MID
    src, dst = tmp / f"{name}-src", tmp / name
    write_source_checkpoint(src, "oryx-vit", seed=0, **shape)
    assert sfllava(["convert", "--hf-path", str(src), "--mlx-path", str(dst), "--dtype", "float32"]) == 0
    return dst


def write_video(path: Path, seed: int) -> Path:
    """10 s of 640x360 at 25 fps, FFV1 (lossless, seek-exact)."""
    make_ffv1_video(path, 250, width=640, height=360, fps=25, seed=seed)
    return path


def streamed(client, model_id, messages, max_tokens, frames):
    """(client-side ttft, text, the sfllava record) of a streamed answer."""
    tic = time.perf_counter()
    ttft, text, last = None, [], None
    for chunk in client.chat.completions.create(model=model_id, messages=messages, stream=True,
                                                max_tokens=max_tokens,
                                                extra_body={"sfllava": {"num_frames": frames}}):
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - tic
            text.append(chunk.choices[0].delta.content)
        last = chunk
    return ttft or time.perf_counter() - tic, "".join(text), last.model_extra["sfllava"]


def ttft_runs(server, model_id, video, runs, max_tokens, frames) -> dict:
    client = server.client()
    firsts, follows, prefilled = [], [], []
    for i in range(runs):
        system = {"role": "system", "content": f"You are a helpful assistant. (run {i})"}
        messages = [system, first_message(str(video), QUESTION)]
        t1, text, r1 = streamed(client, model_id, messages, max_tokens, frames)
        assert r1["cache"] in ("miss", "off"), r1["cache"]
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": FOLLOW_UP}]
        t2, _, r2 = streamed(client, model_id, messages, max_tokens, frames)
        assert r2["cache"] == "held", r2["cache"]
        firsts.append(t1)
        follows.append(t2)
        prefilled.append((r1["prompt_tokens"], r2["prompt_tokens"]))
    first, follow = statistics.median(firsts), statistics.median(follows)
    return {"first_ttft_s": first, "follow_up_ttft_s": follow, "ratio": follow / first,
            "prefilled_tokens": prefilled[-1]}


def added_latency(server, model_id, model_dir, video, runs, max_tokens, frames, tmp) -> dict:
    client = server.client()
    api, gen, inside = [], [], []
    for i in range(runs):
        system = f"You are a helpful assistant. (latency {i})"
        tic = time.perf_counter()
        r = client.chat.completions.create(
            model=model_id, max_tokens=max_tokens, extra_body={"sfllava": {"num_frames": frames}},
            messages=[{"role": "system", "content": system}, first_message(str(video), QUESTION)])
        api.append(time.perf_counter() - tic)
        rec = r.model_extra["sfllava"]
        inside.append(rec["timings_s"]["ttft"] + rec["timings_s"]["generate"])
        out = subprocess.run(sfllava_command(
            ["generate", "--model", model_dir, "--video", video, "--prompt", QUESTION, "--system-prompt",
             system, "--max-tokens", max_tokens, "--num-frames", frames, "--no-cache", "--json"]),
            capture_output=True, text=True, env=run_env(tmp), check=True)
        g = json.loads(out.stdout)
        assert g["tokens"] == rec["tokens"], "the server and generate disagree"
        gen.append(g["timings_s"]["ttft"] + g["timings_s"]["generate"])
    a, g, s = statistics.median(api), statistics.median(gen), statistics.median(inside)
    return {"api_s": a, "generate_s": g, "ratio": a / g, "added_s": a - g,
            "server_inside_s": s, "http_and_queue_s": a - s}


def throughput(server, model_id, video, clients, per_client, max_tokens, frames) -> dict:
    messages = [first_message(str(video), QUESTION)]
    streamed(server.client(), model_id, messages, max_tokens, frames)  # the video is held

    def worker(k):
        c = server.client()
        lat = []
        for j in range(per_client):
            tic = time.perf_counter()
            if (k + j) % 2:
                streamed(c, model_id, messages, max_tokens, frames)
            else:
                c.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                          extra_body={"sfllava": {"num_frames": frames}})
            lat.append(time.perf_counter() - tic)
        return lat

    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lats = [x for lat in pool.map(worker, range(clients)) for x in lat]
    wall = time.perf_counter() - tic
    lats.sort()
    return {"requests": len(lats), "clients": clients, "wall_s": wall, "rps": len(lats) / wall,
            "p50_s": lats[len(lats) // 2], "p95_s": lats[int(len(lats) * 0.95) - 1]}


class HealthPoller:
    """Asks /health every 50 ms on its own connection; keeps the slowest answer."""

    def __init__(self, server):
        import threading

        self.server, self.worst, self.count = server, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        with self.server.http() as h:
            while not self._stop.is_set():
                tic = time.perf_counter()
                h.get("/health").raise_for_status()
                self.worst = max(self.worst, time.perf_counter() - tic)
                self.count += 1
                time.sleep(0.05)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"polls": self.count, "worst_s": self.worst}


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def queued_memory(model_dir, media, tmp, n=8, frames=128) -> dict:
    videos = [write_video(media / f"q{i}.mkv", seed=100 + i) for i in range(n)]
    out = {}
    for label, batch in (("one", videos[:1]), ("eight", videos)):
        s = Server(["--model", model_dir, "--media-dir", media, "--no-cache"], tmp).wait()
        try:
            c = s.client()
            idle = vm_hwm_mb(s.proc.pid)
            with ThreadPoolExecutor(len(batch)) as pool:
                list(pool.map(lambda v, c=c: c.chat.completions.create(
                    model="tiny", max_tokens=4, messages=[first_message(str(v), QUESTION)],
                    extra_body={"sfllava": {"num_frames": frames}}), batch))
            out[label] = {"idle_hwm_mb": idle, "peak_hwm_mb": vm_hwm_mb(s.proc.pid)}
        finally:
            s.stop()
    frame_mb = frames * 640 * 360 * 3 / 2**20
    out["frames_of_one_video_mb"] = frame_mb
    out["eight_minus_one_mb"] = out["eight"]["peak_hwm_mb"] - out["one"]["peak_hwm_mb"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,mid")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--frames", type=int, default=16, help="frames per video (the mid model)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as d:
        tmp = Path(d)
        media = tmp / "media"
        media.mkdir()
        video = write_video(media / "clip.mkv", seed=0)
        for name in a.models.split(","):
            model = build_model(tmp, name)
            frames = 128 if name == "tiny" else a.frames
            s = Server(["--model", model, "--media-dir", media, "--no-cache"], tmp).wait()
            poller = HealthPoller(s)
            try:
                r = {"frames": frames,
                     "ttft": ttft_runs(s, name, video, a.runs, a.max_tokens, frames),
                     "latency": added_latency(s, name, model, video, a.runs, a.max_tokens, frames, tmp)}
                if name == "tiny":
                    r["throughput"] = throughput(s, name, video, a.clients, a.per_client,
                                                 a.max_tokens, frames)
                r["health"] = poller.stop()
            finally:
                poller.stop()
                s.stop()
            if name == "tiny":
                r["queued_memory"] = queued_memory(model, media, tmp)
            results[name] = r
            print(f"{name}: {json.dumps(r, indent=1)}", file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps(results))
    else:
        report(results)
    return 0


def report(results: dict) -> None:
    for name, r in results.items():
        t, lat = r["ttft"], r["latency"]
        print(f"[{name}, {r['frames']} frames]")
        print(f"  first TTFT {t['first_ttft_s'] * 1000:.1f} ms, follow-up {t['follow_up_ttft_s'] * 1000:.1f} ms"
              f" -> follow-up / first = {t['ratio']:.3f} (prefilled {t['prefilled_tokens']})")
        print(f"  API {lat['api_s'] * 1000:.1f} ms vs generate {lat['generate_s'] * 1000:.1f} ms -> "
              f"{lat['ratio']:.3f}x, +{lat['added_s'] * 1000:.1f} ms (HTTP+queue {lat['http_and_queue_s'] * 1000:.1f} ms)")
        print(f"  /health throughout: slowest of {r['health']['polls']} answers "
              f"{r['health']['worst_s'] * 1000:.0f} ms")
        if "throughput" in r:
            th = r["throughput"]
            print(f"  {th['clients']} clients: {th['rps']:.1f} requests/s ({th['requests']} in "
                  f"{th['wall_s']:.1f} s, p50 {th['p50_s'] * 1000:.0f} ms, p95 {th['p95_s'] * 1000:.0f} ms)")
        if "queued_memory" in r:
            q = r["queued_memory"]
            print(f"  peak RSS: 1 video request {q['one']['peak_hwm_mb']:.0f} MB, 8 at once "
                  f"{q['eight']['peak_hwm_mb']:.0f} MB (+{q['eight_minus_one_mb']:.0f} MB; one video's "
                  f"128 frames = {q['frames_of_one_video_mb']:.0f} MB)")


if __name__ == "__main__":
    sys.exit(main())
