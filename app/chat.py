"""`sfllava chat FILE --model DIR`: chat about a video or a picture in the terminal (SPEC §4).

FILE is a picture when its content is one (JPEG, PNG, WebP, HEIC: SPEC §2.11), a video
otherwise; `/image FILE` and `/video FILE` switch to another.

In a terminal: a header, progress while the video is opened, answers streamed as they
are written (Markdown once done), a status line per answer, commands (/help) and
input history. The video's prefix stays in the KV cache, so a follow-up prefills only
its own tokens; Ctrl-C stops an answer and keeps the conversation.

With standard input that is not a terminal: one question a line, answers in turn in the
same conversation, each followed by a blank line, or one JSON object per turn (--json).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sfllava_mlx.errors import ContextOverflowError, UserError

from . import runner
from .options import add_generation_arguments

COMMANDS = ("/help", "/reset", "/frames", "/stats", "/save", "/video", "/image", "/quit")


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE",
                   help="the video, or a picture (recognised by its content: JPEG, PNG, WebP, HEIC)")
    p.add_argument("--model", required=True, help="converted model directory or hub repo id")
    add_generation_arguments(p)


@dataclass
class Exchange:
    question: str
    answer: str
    stopped: bool = False
    reset_before: bool = False  # a /reset happened before this question


@dataclass
class Session:
    """One chat: the model, the open video, and the transcript across /reset and /video."""

    model: object
    tokenizer: object
    args: object
    video: runner.OpenedVideo
    transcript: list = field(default_factory=list)
    turns_total: int = 0
    pending_reset: bool = False
    videos: list = field(default_factory=list)

    @property
    def conv(self):
        return self.video.conv

    def reset(self) -> None:
        self.conv.reset()
        self.pending_reset = True

    def record(self, question: str, answer: str, stopped: bool) -> None:
        self.transcript.append(Exchange(question, answer, stopped, self.pending_reset))
        self.pending_reset = False
        self.turns_total += 1

    def markdown(self) -> str:
        lines = ["# sfllava chat", ""]
        lines.append(f"- {media_word(self.video)}: `{self.video.path}`")
        lines.append(f"- model: `{runner.model_name(self.model)}`")
        lines.append(f"- saved: {time.strftime('%Y-%m-%d %H:%M:%S')}")
        for ex in self.transcript:
            if ex.reset_before:
                lines += ["", "---", "", "*(new conversation)*"]
            if isinstance(ex, VideoSwitch):
                lines += ["", "---", "", f"*({ex.media}: `{ex.path}`)*"]
                continue
            lines += ["", f"**You:** {ex.question}", "", ex.answer.strip() or "*(no answer)*"]
            if ex.stopped:
                lines.append("*(stopped)*")
        return "\n".join(lines) + "\n"


@dataclass
class VideoSwitch:
    path: str
    reset_before: bool = False
    media: str = "video"  # or "picture"


def media_word(opened) -> str:
    return "picture" if getattr(opened, "media", "video") == "image" else "video"


def write_atomic(path: str, text: str) -> Path:
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"{target} is a directory")
    if not target.parent.exists():
        raise UserError(f"no such directory: {target.parent}")
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
    return target


def main(args) -> int:
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not args.json
    if interactive:
        return interactive_main(args)
    return batch_main(args)


# ----------------------------------------------------------------------------------------
# Scripts: one question per line


def batch_main(args) -> int:
    model, tokenizer = runner.load_model(args)
    video = runner.open_media(model, tokenizer, args.file, args)
    if video.media == "image" and runner.picture_note(args):
        print(runner.picture_note(args), file=sys.stderr)
    session = Session(model, tokenizer, args, video)
    for line in sys.stdin:
        question = line.rstrip("\r\n")
        if not question.strip():
            continue
        if question.split()[0] in COMMANDS:
            if batch_command(session, question) == "quit":
                break
            continue
        runner.reset_peak_memory()
        try:
            for r in session.video.ask(question, **runner.ask_options(args)):
                if not args.json:
                    sys.stdout.write(r.text)
                    sys.stdout.flush()
        except ContextOverflowError as e:
            print(f"error: {e}", file=sys.stderr)
            if args.json:
                print(json.dumps({"error": str(e)}), flush=True)
            continue
        turn = session.conv.last_turn
        session.record(question, turn.text, stopped=False)
        if args.json:
            print(json.dumps(runner.turn_record(turn, session.video.visual, session.video.cache,
                                                runner.media_recipe(session.video, args))), flush=True)
        else:
            sys.stdout.write("\n\n")
            sys.stdout.flush()
        session.video.save()
    return 0


def batch_command(session: Session, line: str) -> Optional[str]:
    """Commands work in scripts too; what they say goes to stderr (stdout: answers only)."""
    cmd, _, rest = line.partition(" ")
    rest = rest.strip()
    if cmd == "/quit":
        return "quit"
    if cmd == "/reset":
        session.reset()
    elif cmd == "/save" and rest:
        write_atomic(rest, session.markdown())
    elif cmd in ("/video", "/image") and rest:
        switch_video(session, rest, progress=None, picture=cmd == "/image")
    else:
        print(f"note: {cmd} is ignored when reading questions from a pipe", file=sys.stderr)
    return None


def switch_video(session: Session, path: str, progress, picture: bool = False) -> None:
    """/video and /image: open FILE (a picture or a video, by its content; /image insists on
    a picture) and go on about it; the old one stays as it was if FILE cannot be opened."""
    session.video.save()
    opener = runner.open_image if picture else runner.open_media
    video = opener(session.model, session.tokenizer, path, session.args, progress,
                   prefill=progress is not None)
    session.video = video
    session.transcript.append(VideoSwitch(path, media=media_word(video)))
    session.video.save()


# ----------------------------------------------------------------------------------------
# A person at a terminal


def interactive_main(args) -> int:
    from .chat_ui import ChatUI, model_info

    ui = ChatUI()
    with ui.console.status(f"loading model {args.model}…"):
        model, tokenizer = runner.load_model(args)
    with ui.opening(args.file) as progress:
        video = runner.open_media(model, tokenizer, args.file, args, progress, prefill=True)
    video.save()
    session = Session(model, tokenizer, args, video)
    info = model_info(model)
    ui.header(video, model, info)
    if video.media == "image" and runner.picture_note(args):
        ui.note(runner.picture_note(args))
    prompt = make_prompt()
    while True:
        try:
            line = prompt()
        except (KeyboardInterrupt, EOFError):  # Ctrl-C or Ctrl-D at the prompt: leave
            ui.note("bye")
            return 0
        question = line.strip()
        if not question:
            continue
        if question.startswith("/") and question.split()[0] in COMMANDS + ("/exit",):
            try:
                if run_command(session, ui, question, info) == "quit":
                    return 0
            except UserError as e:
                ui.error(str(e))
            continue
        if question.startswith("/"):
            ui.error(f"unknown command {question.split()[0]} (type /help)")
            continue
        answer_interactively(session, ui, question)


def make_prompt():
    """prompt_toolkit with history and line editing; plain input() if it cannot start."""
    from .chat_ui import history_path

    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()
        session = PromptSession(history=history)
        return lambda: session.prompt("› ")
    except Exception:  # no usable terminal for prompt_toolkit
        import readline  # noqa: F401  (line editing and history for input())

        return lambda: input("› ")


def answer_interactively(session: Session, ui, question: str) -> None:
    try:
        _answer(session, ui, question)
    except KeyboardInterrupt:  # between two tokens' worth of work, e.g. while rendering
        ui.note("stopped")


def _answer(session: Session, ui, question: str) -> None:
    start = time.perf_counter()
    runner.reset_peak_memory()
    stream = session.video.ask(question, start_time=start, **runner.ask_options(session.args))
    stopped = False
    try:
        with ui.answer() as view:
            try:
                for r in stream:
                    view.add(r.text)
            except KeyboardInterrupt:
                stopped = view.stopped = True
            finally:
                stream.close()  # runs the conversation's clean-up (rewinds a stopped answer)
    except ContextOverflowError as e:
        ui.error(str(e))
        return
    turn = session.conv.last_turn
    if turn is None or turn.question != question or (stopped and not turn.tokens and not turn.text):
        ui.note("stopped before the first token: the question was dropped")
        return
    session.record(question, turn.text, stopped)
    ui.status(turn, stopped, session.conv.offset, session.model.context_length)
    session.video.save()


def run_command(session: Session, ui, line: str, info: dict) -> Optional[str]:
    cmd, _, rest = line.partition(" ")
    rest = rest.strip()
    if cmd in ("/quit", "/exit"):
        ui.note("bye")
        return "quit"
    if cmd == "/help":
        ui.help()
    elif cmd == "/reset":
        session.reset()
        ui.note(f"new conversation about {Path(session.video.path).name} "
                f"({media_word(session.video)} kept: {session.conv.offset} tokens in the cache)")
    elif cmd == "/frames":
        if session.video.media == "image":
            ui.note("a picture has no frames: " + image_line(session.video))
        else:
            ui.frames(session.video.clip)
    elif cmd == "/stats":
        ui.stats(stats_rows(session, info))
    elif cmd == "/save":
        if not rest:
            raise UserError("usage: /save FILE")
        path = write_atomic(rest, session.markdown())
        ui.note(f"saved {len(session.transcript)} entries to {path}")
    elif cmd in ("/video", "/image"):
        if not rest:
            raise UserError(f"usage: {cmd} FILE")
        try:
            with ui.opening(rest) as progress:
                switch_video(session, os.path.expanduser(rest), progress, picture=cmd == "/image")
        except KeyboardInterrupt:
            ui.note("opening stopped: still on " + Path(session.video.path).name)
            return None
        ui.header(session.video, session.model, info)
    return None


def stats_rows(session: Session, info: dict) -> list:
    from .chat_ui import clock, video_summary

    video, conv = session.video, session.conv
    rows = [(media_word(video), video_summary(video.path, video.clip)),
            ("model", f"{info['name']} · {info['params']} parameters · {info['dtype']}"),
            ("visual tokens", str(video.visual.embeddings.shape[0])),
            ("cache", f"{video.cache} (opened in {video.open_s:.2f} s)"),
            ("context", f"{conv.offset} / {session.model.context_length} tokens"),
            ("turns", f"{len(conv.turns)} in this conversation, {session.turns_total} in all")]
    vt = video.visual.timings
    if video.media == "image":
        rows.append(("picture input", image_line(video)))
    if video.cache != "hit":
        rows.append((f"{media_word(video)} work", f"frames {vt.get('frames', 0):.2f} s · "
                                                  f"vision {vt.get('vision', 0):.2f} s"))
    turn = conv.last_turn
    if turn is not None:
        t = turn.timings_s
        rows.append(("last answer", f"ttft {t['ttft']:.2f} s · prefill {t['prefill']:.2f} s "
                                    f"({turn.prompt_tokens} tokens) · {len(turn.tokens)} tokens in "
                                    f"{t['generate']:.2f} s · peak {turn.peak_memory_gb:.2f} GB"))
    clip = video.clip
    if getattr(clip, "timestamps", None):
        rows.append(("frames", f"{len(clip.timestamps)} from {clock(clip.timestamps[0])} "
                               f"to {clock(clip.timestamps[-1])}"))
    return rows


def image_line(opened) -> str:
    from sfllava_mlx.image import describe

    return f"{describe(opened.visual.clip)} → {opened.visual.embeddings.shape[0]} visual tokens"
