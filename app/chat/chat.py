"""One chat: the engine, the Session about the current video or picture, and the transcript
across /reset and /video. What the terminal and the piped mode share."""

from __future__ import annotations

from dataclasses import dataclass, field

from sfllava_mlx.subtitles.sources import MODES

from ..options import session_options
from .transcript import Switch, Transcript, write_atomic

COMMANDS = ("/help", "/reset", "/frames", "/subs", "/stats", "/save", "/video", "/image",
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

    def reset(self) -> None:
        self.session.reset()
        self.transcript.pending_reset = True

    def record(self, question: str, answer: str, stopped: bool) -> None:
        self.transcript.add(question, answer, stopped)
        self.turns_total += 1

    def switch(self, path: str, progress=None, picture: bool = False) -> None:
        """/video and /image: open FILE (a picture or a video, by its content; /image
        insists on a picture) and go on about it; the old one stays if FILE cannot open."""
        if picture:
            from sfllava_mlx.image import probe

            probe(path)  # refused as a picture before anything else
        self.session.save()
        options = session_options(self.args)
        if options["subtitles"] not in MODES:  # --subtitles FILE was the first video's
            options["subtitles"] = "auto"
        session = self.engine.open(path, progress=progress, prefill=progress is not None,
                                   **options)
        self.session = session
        self.transcript.entries.append(Switch(path, media_word(session)))
        session.save()

    def save(self, path: str):
        text = self.transcript.markdown(media_word(self.session), self.session.path,
                                        self.engine.name)
        return write_atomic(path, text)
