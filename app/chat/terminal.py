"""`sfllava chat` for a person at a terminal: header, progress, streamed answers, commands."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from sfllava_mlx.errors import ContextOverflowError, UserError

from ..options import engine_options, picture_note, session_options
from .chat import COMMANDS, Chat, media_word, part_label


def main(args, media) -> int:
    """`media`: FILE as `media.open_media` opened it."""
    from sfllava_mlx import Engine

    from .ui import ChatUI, model_info

    ui = ChatUI()
    with ui.console.status(f"loading model {args.model}…"):
        engine = Engine(args.model, **engine_options(args))
    with ui.opening(args.file) as progress:
        session = engine.open(media, progress=progress, prefill=True,
                              **session_options(args))
    session.save()
    chat = Chat(engine, args, session)
    info = model_info(engine)
    ui.header(session, info)
    ui.warnings(session.warnings)
    if session.media == "image" and picture_note(session.options):
        ui.note(picture_note(session.options))
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
                if run_command(chat, ui, question, info) == "quit":
                    return 0
            except UserError as e:
                ui.error(str(e))
            continue
        if question.startswith("/"):
            ui.error(f"unknown command {question.split()[0]} (type /help)")
            continue
        try:
            answer(chat, ui, question)
        except KeyboardInterrupt:  # between two tokens' worth of work, e.g. while rendering
            ui.note("stopped")


def make_prompt():
    """prompt_toolkit with history and line editing; plain input() if it cannot start."""
    from .ui import history_path

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


def answer(chat: Chat, ui, question: str) -> None:
    import mlx.core as mx

    start = time.perf_counter()
    mx.reset_peak_memory()
    session = chat.session
    before = len(session.turns)
    stream = session.ask(question, start_time=start)
    stopped = False
    try:
        with ui.answer() as view:
            try:
                for chunk in stream:
                    view.add(chunk.text)
            except KeyboardInterrupt:
                stopped = view.stopped = True
            finally:
                stream.close()  # runs the conversation's clean-up (rewinds a stopped answer)
    except ContextOverflowError as e:
        ui.error(str(e))
        return
    turn = session.last_turn
    if len(session.turns) == before or (stopped and not turn.tokens and not turn.text):
        ui.note("stopped before the first token: the question was dropped")
        return
    chat.record(question, turn.text, stopped)
    ui.status(turn, stopped, session.conversation.offset, session.conversation.context_limit)
    session.save()


def run_command(chat: Chat, ui, line: str, info: dict) -> Optional[str]:
    cmd, _, rest = line.partition(" ")
    rest = rest.strip()
    session = chat.session
    if cmd in ("/quit", "/exit"):
        ui.note("bye")
        return "quit"
    if cmd == "/help":
        ui.help()
    elif cmd == "/reset":
        chat.reset()
        ui.note(f"new conversation about {Path(session.path).name} ({media_word(session)} "
                f"kept: {session.conversation.offset} tokens in the cache)")
    elif cmd == "/frames":
        if session.media == "image":
            ui.note("a picture has no frames: " + image_line(session))
        else:
            ui.frames(session.clip)
    elif cmd == "/subs":
        ui.subtitles(session.subtitles)
    elif cmd == "/stats":
        ui.stats(stats_rows(chat, info))
    elif cmd == "/save":
        if not rest:
            raise UserError("usage: /save FILE")
        path = chat.save(rest)
        ui.note(f"saved {len(chat.transcript.entries)} entries to {path}")
    elif cmd in ("/video", "/image"):
        if not rest:
            raise UserError(f"usage: {cmd} FILE")
        try:
            with ui.opening(rest) as progress:
                chat.switch(os.path.expanduser(rest), progress, picture=cmd == "/image")
        except KeyboardInterrupt:
            ui.note("opening stopped: still on " + Path(session.path).name)
            return None
        ui.header(chat.session, info)
        ui.warnings(chat.session.warnings)
    elif cmd == "/part":
        if session.media != "video":
            raise UserError("/part is for a video: a picture has no parts")
        tic = time.perf_counter()
        try:
            with ui.opening(session.path) as progress:
                resumed = chat.part(rest, progress)
        except KeyboardInterrupt:
            ui.note("opening stopped: still on " + part_label(session))
            return None
        ui.header(chat.session, info)
        kept = " (kept: nothing encoded again)" if resumed else ""
        ui.note(f"on {part_label(chat.session)} in {time.perf_counter() - tic:.2f} s{kept}")
    return None


def stats_rows(chat: Chat, info: dict) -> list:
    from ..fmt import clock
    from .ui import part_summary, video_summary

    session = chat.session
    conversation = session.conversation
    rows = [(media_word(session), video_summary(session.path, session.clip)),
            *([("part", part_summary(session))] if session.part is not None else []),
            ("model", f"{info['name']} · {info['params']} parameters · {info['dtype']}"),
            ("visual tokens", str(session.visual.embeddings.shape[0])),
            ("cache", f"{session.cache} (opened in {session.open_s:.2f} s)"),
            ("context", f"{conversation.offset} / {conversation.context_limit} tokens"),
            ("turns", f"{len(session.turns)} in this conversation, {chat.turns_total} in all")]
    vt = session.visual.timings
    if session.media == "image":
        rows.append(("picture input", image_line(session)))
    if session.cache != "hit":
        rows.append((f"{media_word(session)} work", f"frames {vt.get('frames', 0):.2f} s · "
                                                    f"vision {vt.get('vision', 0):.2f} s"))
    turn = session.last_turn
    if turn is not None:
        t = turn.timings_s
        rows.append(("last answer", f"ttft {t['ttft']:.2f} s · prefill {t['prefill']:.2f} s "
                                    f"({turn.prompt_tokens} tokens) · {len(turn.tokens)} tokens in "
                                    f"{t['generate']:.2f} s · peak {turn.peak_memory_gb:.2f} GB"))
    clip = session.clip
    if session.media == "video" and clip.timestamps:
        rows.append(("frames", f"{len(clip.timestamps)} from {clock(clip.timestamps[0])} "
                               f"to {clock(clip.timestamps[-1])}"))
    return rows


def image_line(session) -> str:
    from sfllava_mlx.image import describe

    return f"{describe(session.clip)} → {session.visual.embeddings.shape[0]} visual tokens"
