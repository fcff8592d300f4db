"""`sfllava generate`: answer one question about a video or a picture (design.md §6.1, §2.3)."""

import json
import sys

from .fmt import clip_notes, note, warn
from .options import (
    add_generation_arguments,
    add_model_argument,
    checked_options,
    engine_options,
    picture_note,
    session_options,
)
from .subtitles import speech_progress, summary


def add_arguments(p) -> None:
    add_model_argument(p)
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", help="the video file")
    media.add_argument("--image", help="a picture (JPEG, PNG, WebP, HEIC): the image recipe of "
                                       "the model's config, not a one-frame video")
    p.add_argument("--prompt", required=True, help="the question")
    add_generation_arguments(p)


def main(args) -> int:
    picture = args.image is not None
    checked_options(args, args.image if picture else args.video,  # before anything heavy
                    "picture" if picture else "video")
    if picture:
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
        for text in clip_notes(session.clip):
            note(text)
        if session.subtitles is not None:
            note(summary(session.subtitles))
    if session.media == "image" and picture_note(session.options):
        note(picture_note(session.options))
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
