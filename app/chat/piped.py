"""`sfllava chat` reading questions from a pipe: one a line, answered in turn in the same
conversation; plain answers each followed by a blank line, or one JSON object a turn."""

from __future__ import annotations

import json
import sys
from typing import Optional

from sfllava_mlx.errors import ContextOverflowError

from ..fmt import note, warn
from ..options import engine_options, picture_note, session_options
from ..subtitles import plain_listing, summary
from .chat import COMMANDS, Chat


def main(args, media) -> int:
    """`media`: FILE as `media.open_media` opened it."""
    import mlx.core as mx

    from sfllava_mlx import Engine

    engine = Engine(args.model, **engine_options(args))
    session = engine.open(media, **session_options(args))
    warn(session.warnings)
    if session.media == "image" and picture_note(session.options):
        note(picture_note(session.options))
    chat = Chat(engine, args, session)
    for line in sys.stdin:
        question = line.rstrip("\r\n")
        if not question.strip():
            continue
        if question.split()[0] in COMMANDS:
            if command(chat, question) == "quit":
                break
            continue
        mx.reset_peak_memory()
        try:
            for chunk in chat.session.ask(question):
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        except ContextOverflowError as e:
            print(f"error: {e}", file=sys.stderr)
            if args.json:
                print(json.dumps({"error": str(e)}), flush=True)
            continue
        chat.record(question, chat.session.last_turn.text, stopped=False)
        if args.json:
            print(json.dumps(chat.session.record()), flush=True)
        else:
            sys.stdout.write("\n\n")
            sys.stdout.flush()
        chat.session.save()
    return 0


def command(chat: Chat, line: str) -> Optional[str]:
    """Commands work in scripts too; what they say goes to stderr (stdout: answers only)."""
    cmd, _, rest = line.partition(" ")
    rest = rest.strip()
    if cmd == "/quit":
        return "quit"
    if cmd == "/reset":
        chat.reset()
    elif cmd == "/save" and rest:
        chat.save(rest)
    elif cmd in ("/video", "/image") and rest:
        chat.switch(rest, picture=cmd == "/image")
        warn(chat.session.warnings)
    elif cmd == "/part":
        chat.part(rest)
    elif cmd == "/subs":  # the lines the frames selected, on stderr (stdout: answers only)
        lines = chat.session.subtitles
        print(summary(lines), file=sys.stderr)
        if lines is not None and lines.lines:
            print(plain_listing(lines), file=sys.stderr)
    else:
        note(f"{cmd} is ignored when reading questions from a pipe")
    return None
