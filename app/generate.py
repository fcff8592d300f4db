"""`sfllava generate`: answer one question about a video or a picture (SPEC §4, §2.11)."""

import json
import sys

from .options import (
    add_generation_arguments,
    add_model_argument,
    checked_options,
    engine_options,
    picture_note,
    session_options,
)
from .subtitles import speech_progress, summary, warn


def add_arguments(p) -> None:
    add_model_argument(p)
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", help="the video file")
    media.add_argument("--image", help="a picture (JPEG, PNG, WebP, HEIC): the image recipe of "
                                       "the model's config, not a one-frame video")
    p.add_argument("--prompt", required=True, help="the question")
    add_generation_arguments(p)


def main(args) -> int:
    checked_options(args)  # before anything heavy is imported
    if args.image is not None:
        from sfllava_mlx.image import probe

        media = probe(args.image)  # not a picture, empty or huge: refused before the model loads
    else:
        from sfllava_mlx.media import open_media

        media = open_media(args.video)  # opened once: every step of `open` takes it
    from sfllava_mlx import Engine

    engine = Engine(args.model, **engine_options(args))
    with speech_progress() as progress:  # a bar while speech is transcribed (a terminal)
        session = engine.open(media, progress=progress, **session_options(args))
    warn(session.warnings)
    if not args.json and session.media == "video":
        report_sampling(session.clip)
        if session.subtitles is not None:
            print(f"note: {summary(session.subtitles)}", file=sys.stderr)
    if session.media == "image" and picture_note(session.options):
        print(picture_note(session.options), file=sys.stderr)
    for chunk in session.ask(args.prompt):
        if not args.json:
            print(chunk.text, end="", flush=True)
    if args.json:
        print(json.dumps(session.record()), flush=True)
    else:
        print()
        turn = session.last_turn
        t = turn.timings_s
        print(f"[frames {t['frames']:.2f}s | vision {t['vision']:.2f}s | prefill {t['prefill']:.2f}s"
              f" | ttft {t['ttft']:.2f}s | {len(turn.tokens)} tokens in {t['generate']:.2f}s"
              f" | peak {turn.peak_memory_gb:.2f} GB | cache {session.cache}]", file=sys.stderr)
    session.save()  # after the answer: nobody waits for it
    return 0


def report_sampling(clip) -> None:
    """Tell the user, on stderr, what was approximated or replaced."""
    if not clip.exact:
        print("note: keyframe sampling: frames are approximate (nearest keyframe before each "
              "position)", file=sys.stderr)
    for note in clip.info.notes:
        print(f"note: {note}", file=sys.stderr)
    if clip.replaced:
        pairs = ", ".join(f"{a}->{b}" for a, b in clip.replaced)
        print(f"note: frames that failed to decode were replaced by neighbours: {pairs}",
              file=sys.stderr)
