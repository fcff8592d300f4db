"""`sfllava generate`: answer one question about a video or a picture (SPEC §4, §2.11)."""

import json
import sys
import time

from . import runner
from .options import add_generation_arguments


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="converted model directory or hub repo id")
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", help="the video file")
    media.add_argument("--image", help="a picture (JPEG, PNG, WebP, HEIC): the image recipe of "
                                       "the model's config, not a one-frame video")
    p.add_argument("--prompt", required=True, help="the question")
    add_generation_arguments(p)


def main(args) -> int:
    if args.image is not None:
        from sfllava_mlx.image import probe

        probe(args.image)  # not a picture, empty or huge: refused before the model loads
    model, tokenizer = runner.load_model(args)
    start = time.perf_counter()  # ttft counts from here: after the model is loaded
    if args.image is not None:
        video = runner.open_image(model, tokenizer, args.image, args)
    else:
        video = runner.open_video(model, tokenizer, args.video, args)
    visual, cache = video.visual, video.cache
    if not args.json and video.media == "video":
        report_sampling(visual.clip)
    if video.media == "image" and runner.picture_note(args):
        print(runner.picture_note(args), file=sys.stderr)
    for r in video.ask(args.prompt, start_time=start, **runner.ask_options(args)):
        if not args.json:
            print(r.text, end="", flush=True)
    turn = video.conv.last_turn
    if args.json:
        print(json.dumps(runner.turn_record(turn, visual, cache, runner.media_recipe(video, args))),
              flush=True)
    else:
        print()
        t = turn.timings_s
        print(f"[frames {t['frames']:.2f}s | vision {t['vision']:.2f}s | prefill {t['prefill']:.2f}s"
              f" | ttft {t['ttft']:.2f}s | {len(turn.tokens)} tokens in {t['generate']:.2f}s"
              f" | peak {turn.peak_memory_gb:.2f} GB | cache {cache}]", file=sys.stderr)
    video.save()  # after the answer: nobody waits for it
    return 0


def report_sampling(clip) -> None:
    """Tell the user, on stderr, what was approximated or replaced."""
    if clip is None:
        return
    if not clip.exact:
        print("note: keyframe sampling: frames are approximate (nearest keyframe before each "
              "position)", file=sys.stderr)
    for note in getattr(clip.info, "notes", None) or []:
        print(f"note: {note}", file=sys.stderr)
    if clip.replaced:
        pairs = ", ".join(f"{a}->{b}" for a, b in clip.replaced)
        print(f"note: frames that failed to decode were replaced by neighbours: {pairs}",
              file=sys.stderr)
