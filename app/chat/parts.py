"""Chat's `/part T0-T1` (design.md §6.1, §2.4): a conversation about a part of the video at the
recipe's whole frame budget; `/part` alone goes back to the whole video.

The Sessions of the video are kept by part (the whole video's always, the last few parts'
too), so going back to one costs no encoding: its visual tokens and prefilled prefix are
still in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from sfllava_mlx.errors import UserError
from sfllava_mlx.frames import Part

USAGE = ("usage: /part T0-T1 (seconds, or [H:]M:SS such as 45:00-47:00; either end may be "
         "left out: /part 45:00-, /part -47:00); /part alone: the whole video")
KEEP_PARTS = 3  # part Sessions kept beside the whole video's: 4 in all, as serve holds 4


def parse(text: str) -> Optional[Part]:
    """The part `/part TEXT` names, None for the whole video; UserError for what is not."""
    text = text.strip()
    if text in ("", "-"):
        return None
    if "-" not in text:
        raise UserError(USAGE)
    start, _, end = text.partition("-")
    return Part.of(start.strip() or None, end.strip() or None,
                   names=("/part's start", "/part's end"))


def key(part: Optional[Part]) -> tuple:
    return (None, None) if part is None else (part.start, part.end)


class KeptSessions:
    """The Sessions about one video, by part: the whole video's (when opened) and the
    KEEP_PARTS most recently used parts'."""

    def __init__(self):
        self._sessions: OrderedDict[tuple, object] = OrderedDict()

    def keep(self, session) -> None:
        k = key(session.part)
        self._sessions[k] = session
        self._sessions.move_to_end(k)
        parts = [k for k in self._sessions if k != (None, None)]
        for old in parts[:-KEEP_PARTS]:
            del self._sessions[old]

    def get(self, part: Optional[Part]):
        return self._sessions.get(key(part))

    def clear(self) -> None:
        self._sessions.clear()

    def __len__(self) -> int:
        return len(self._sessions)
