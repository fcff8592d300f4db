"""`sfllava chat FILE --model DIR`: chat about a video or a picture in the terminal (design.md §6.1).

FILE is a picture when its content is one (JPEG, PNG, WebP, HEIC: design.md §2.3), a video
otherwise; `/image FILE` and `/video FILE` switch to another; `/part T0-T1` talks about a part
of the video at the whole frame budget, `/part` goes back to the whole video (`parts.py`).

In a terminal (`terminal.py`): a header, progress while the video is opened, answers
streamed as they are written (Markdown once done), a status line per answer, commands
(/help) and input history. Ctrl-C stops an answer and keeps the conversation.

With standard input that is not a terminal (`piped.py`): one question a line, answers in
turn in the same conversation, each followed by a blank line, or one JSON object per turn
(--json).
"""

from __future__ import annotations

import sys

from ..options import add_generation_arguments, add_model_argument, checked_options


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE",
                   help="the video, or a picture (recognised by its content: JPEG, PNG, WebP, HEIC)")
    add_model_argument(p)
    add_generation_arguments(p)


def main(args) -> int:
    checked_options(args, args.file)  # before anything heavy is imported
    from sfllava_mlx.media import open_media

    media = open_media(args.file)  # opened once, before the model loads: `open` takes it
    if sys.stdin.isatty() and sys.stdout.isatty() and not args.json:
        from .terminal import main as terminal

        return terminal(args, media)
    from .piped import main as piped

    return piped(args, media)
