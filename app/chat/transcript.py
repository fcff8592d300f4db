"""What `/save` writes: the conversation as Markdown, across /reset, /video and /part, written
whole (temporary file, then rename)."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sfllava_mlx.errors import UserError


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
