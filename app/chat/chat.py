"""One chat: the engine, the Session about the current video or picture, and the transcript
across /reset, /video and /part. What the terminal and the piped mode share."""

from __future__ import annotations

from dataclasses import dataclass, field

from sfllava_mlx.errors import UserError
from sfllava_mlx.subtitles.sources import MODES

from ..options import session_options
from . import parts
from .transcript import Switch, Transcript, save_text

COMMANDS = ("/help", "/reset", "/frames", "/subs", "/stats", "/save", "/video", "/image",
            "/part",
            "/quit")


def media_word(session) -> str:
    return "picture" if session.media == "image" else "video"


@dataclass
class Chat:
    engine: object  # sfllava_mlx.Engine
    args: object  # the command's flags (session and ask options)
    session: object  # sfllava_mlx.Session
    transcript: Transcript = field(default_factory=Transcript)
    turns_total: int = 0
    kept: parts.KeptSessions = field(default_factory=parts.KeptSessions)  # /part's, by part

    def reset(self) -> None:
        self.session.reset()
        self.transcript.pending_reset = True

    def record(self, question: str, answer: str, stopped: bool) -> None:
        self.transcript.add(question, answer, stopped)
        self.turns_total += 1

    def switch(self, path: str, progress=None, picture: bool = False) -> None:
        """/video and /image: open FILE (a picture or a video, by its content; /image
        insists on a picture) and go on about it; the old one stays if FILE cannot open."""
        media = path
        if picture:
            from sfllava_mlx.image import probe

            media = probe(path)  # refused as a picture before anything else; `open` takes it
        self.session.save()
        options = session_options(self.args)
        if options.get("subtitles", "auto") not in MODES:  # --subtitles FILE was the first video's
            options["subtitles"] = "auto"
        session = self.engine.open(media, progress=progress, prefill=progress is not None,
                                   **options)
        self.session = session
        self.kept.clear()  # another file: the parts of the old one are no use
        self.transcript.entries.append(Switch(path, media_word(session)))
        session.save()

    def part(self, text: str, progress=None) -> bool:
        """/part T0-T1: a new conversation about that part of the video, at the recipe's
        whole frame budget; /part alone: back to the whole video's conversation. A Session
        kept from before is taken up again (nothing encoded); returns whether one was."""
        part = parts.parse(text)
        if self.session.media != "video":
            raise UserError("/part is for a video: a picture has no parts")
        self.session.save()
        self.kept.keep(self.session)
        session = self.kept.get(part)
        resumed = session is not None
        if resumed:
            if part is not None:
                session.reset()  # /part T0-T1 starts a new conversation about the part
            if session is not self.session:
                session.resume(progress)
        else:
            options = {**session_options(self.args), "start": part and part.start,
                       "end": part and part.end}
            session = self.engine.open(self.session.path, progress=progress,
                                       prefill=progress is not None, **options)
        self.session = session
        self.kept.keep(session)
        self.transcript.entries.append(Switch(session.path, "video", part=part_label(session)))
        session.save()
        return resumed

    def save(self, path: str):
        text = self.transcript.markdown(media_word(self.session), self.session.path,
                                        self.engine.name)
        return save_text(path, text)


def part_label(session) -> str:
    """What the header and the transcript say of a Session's part."""
    return f"part {session.part.label()}" if session.part is not None else "the whole video"
