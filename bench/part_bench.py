"""Chat's `/part` (design.md §6.1, §2.4): switch times there and back, measured side by side in one
process through the chat's own state (`sfllava_app.chat.chat.Chat`, as `sfllava chat` in a
terminal drives it: each open prefills its prefix).

    python -m bench.part_bench [--model DIR | --random-weights SIZE] [--dir DIR] [--runs 3]
                               [--num-frames T]

On the 20-minute 640x360 long-GOP H.264 file of bench.frames_bench (made once, kept in
DIR), with the part 10:00-12:00:
- open the whole video (cold: empty video cache), then ask;
- `/part 10:00-12:00` (cold: the part's frames decoded and encoded), then ask;
- `/part` back to the whole video (its Session kept: nothing decoded or encoded), then a
  follow-up;
- `/part 10:00-12:00` again (the part's Session kept: a new conversation about it);
- `/part 10:00-12:00` in a new chat, the video cache warm (visual tokens and prefix read back).
Times are wall seconds of the switch itself, then the question's time to first token.
Without --model the tiny demo checkpoint (sfllava_convert.tiny) is converted and used: the
tower and LLM then cost next to nothing, so the switch shows the frames' share.
`--random-weights SIZE` (e.g. ov-0.5b, 1.5b) runs the real shapes with random weights
(sfllava_app.bench.random_weights): there the tower's cost per frame joins in.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.frames_bench import FILES, PART, make_file

QUESTION = "What happens in this part of the video?"
FOLLOW_UP = "And in the whole video?"


def demo_model(tmp: Path) -> Path:
    from sfllava_app.cli import main as sfllava
    from sfllava_convert.tiny import write_source_checkpoint

    src, dst = tmp / "demo-src", tmp / "demo"
    write_source_checkpoint(src, layout="oryx-vit", seed=0)
    assert sfllava(["convert", "--hf-path", str(src), "--mlx-path", str(dst)]) == 0
    return dst


def ttft(chat, question: str) -> float:
    start = time.perf_counter()
    for _ in chat.session.ask(question, start_time=start, max_tokens=1):
        pass
    chat.session.save()
    return chat.session.last_turn.timings_s["ttft"]


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def run_once(engine, args, video: Path, cache: Path) -> dict:
    """One pass of the sequence on an empty video cache."""
    from sfllava_app.chat.chat import Chat

    os.environ["XDG_CACHE_HOME"] = str(cache)
    engine.store = type(engine.store)()  # the empty cache of this pass

    def progress(stage, done, total):  # what the terminal's bars get (opens prefill)
        pass

    part_text = f"{PART[0]}-{PART[1]}"
    row = {}
    holder = {}
    row["open whole video (cold)"] = timed(lambda: holder.setdefault("s", engine.open(
        video, progress=progress, prefill=True, num_frames=args.num_frames)))
    chat = Chat(engine, args.chat_args, holder["s"])
    chat.session.save()
    row["ask (whole)"] = ttft(chat, QUESTION)
    row["/part there (cold)"] = timed(lambda: chat.part(part_text, progress))
    assert chat.session.cache == "miss"
    row["ask (part)"] = ttft(chat, QUESTION)
    row["/part back (kept)"] = timed(lambda: chat.part("", progress))
    assert chat.session.part is None and chat.session.cache == "hit"
    row["follow-up (whole)"] = ttft(chat, FOLLOW_UP)
    row["/part there again (kept)"] = timed(lambda: chat.part(part_text, progress))
    row["ask (part again)"] = ttft(chat, QUESTION)
    other = Chat(engine, args.chat_args, chat.kept.get(None))  # a new chat: the disk cache only
    row["/part there, new chat (video cache warm)"] = timed(lambda: other.part(part_text,
                                                                               progress))
    assert other.session.cache == "hit"
    row["ask (part, from the cache)"] = ttft(other, QUESTION)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a converted model (default: the tiny demo)")
    p.add_argument("--random-weights", default=None, metavar="SIZE",
                   help="real shapes, random weights (see sfllava_app.bench.random_weights)")
    p.add_argument("--dir", default="/tmp/sfllava-frames-bench", help="where the video is kept")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--num-frames", type=int, default=None)
    args = p.parse_args()

    from sfllava_app.cli import build_parser
    from sfllava_mlx import Engine

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    spec = FILES["long"]
    video = folder / spec["name"]
    make_file(video, spec["size"], spec["seconds"])
    video.read_bytes()  # into the page cache
    tmp = Path(tempfile.mkdtemp(prefix="sfllava-part-bench-"))
    flags = ["--num-frames", str(args.num_frames)] if args.num_frames else []
    if args.random_weights:
        import mlx.core as mx

        from sfllava_app.bench.random_weights import random_model

        model = f"random {args.random_weights}"
        engine = Engine(*random_model(args.random_weights, dtype=mx.float32,
                                      num_frames=args.num_frames))
    else:
        model = args.model or str(demo_model(tmp))
        engine = Engine(model)
    args.chat_args = build_parser(["chat"]).parse_args(["chat", str(video), "--model", model,
                                                        *flags])
    load = os.getloadavg()
    rows = [run_once(engine, args, video, tmp / f"cache-{i}") for i in range(args.runs)]
    print(f"\n{video.name}, part {PART[0]}-{PART[1]}, model {Path(model).name}, "
          f"{args.num_frames or 'the recipe'} frames; median of {args.runs} passes; load average "
          f"{load[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {os.cpu_count()} cores\n")
    base = statistics.median(r["/part there (cold)"] for r in rows)
    print("| step | median s | min s | vs /part there (cold) |")
    print("|---|---|---|---|")
    for name in rows[0]:
        values = [r[name] for r in rows]
        print(f"| {name} | {statistics.median(values):.4f} | {min(values):.4f} | "
              f"{statistics.median(values) / base:.4f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
