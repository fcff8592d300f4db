"""What `/save` writes: the conversation as Markdown, across /reset, /video and /part, written
whole (temporary file, then rename)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sfllava_mlx.errors import UserError
from sfllava_mlx.files import write_atomic


@dataclass
class Exchange:
    question: str
    answer: str
    stopped: bool = False
    reset_before: bool = False  # a /reset happened before this question


@dataclass
class Switch:
    """/video or /image: the conversation went on about another file."""

    path: str
    media: str = "video"  # or "picture"
    reset_before: bool = False
    part: str = ""  # /part: "part 45:00-47:00" or "the whole video"


@dataclass
class Transcript:
    entries: list = field(default_factory=list)
    pending_reset: bool = False

    def add(self, question: str, answer: str, stopped: bool) -> None:
        self.entries.append(Exchange(question, answer, stopped, self.pending_reset))
        self.pending_reset = False

    def markdown(self, media: str, path: str, model: str) -> str:
        lines = ["# sfllava chat", "", f"- {media}: `{path}`", f"- model: `{model}`",
                 f"- saved: {time.strftime('%Y-%m-%d %H:%M:%S')}"]
        for ex in self.entries:
            if ex.reset_before:
                lines += ["", "---", "", "*(new conversation)*"]
            if isinstance(ex, Switch):
                part = f", {ex.part}" if ex.part else ""
                lines += ["", "---", "", f"*({ex.media}: `{ex.path}`{part})*"]
                continue
            lines += ["", f"**You:** {ex.question}", "", ex.answer.strip() or "*(no answer)*"]
            if ex.stopped:
                lines.append("*(stopped)*")
        return "\n".join(lines) + "\n"


def save_text(path: str, text: str) -> Path:
    """The user's file written (`sfllava_mlx.files.write_atomic`); UserError, in one line,
    for a path that cannot be."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"{target} is a directory")
    if not target.parent.exists():
        raise UserError(f"no such directory: {target.parent}")
    try:
        return write_atomic(target, text)
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
