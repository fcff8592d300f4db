"""Transcribed speech, cached with the video (design.md §2.5): one small JSON file per (video
content, Whisper model, settings), so a second question or a reopen transcribes nothing.

    $XDG_CACHE_HOME/sfllava/speech-v1/<key>.json

Written whole (a temporary file, then a rename). As for the video cache, the key is the
video's size and sampled blocks; where the file's modification time moved since, the whole
file must still hash to the digest stored with the transcript.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .files import CorruptEntry, read_json, recheck_video, write_json
from .fingerprint import Fingerprint
from .store import cache_root

FORMAT = "speech-v1"


@dataclass
class TranscriptInfo:
    """One line of `sfllava cache ls`'s transcripts."""

    video: str
    model: str
    language: Optional[str]
    segments: int
    bytes: int
    created: float


class TranscriptCache:
    def __init__(self, base: Optional[Path] = None):
        self.root = Path(base or cache_root()) / FORMAT

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def lookup(self, key: str, fingerprint: Fingerprint) -> Optional[dict]:
        """The stored transcript ({"segments": [...], "language", ...}), or None (a bad or
        stale file is removed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = read_json(path)
            if entry.get("key") != key or not isinstance(entry.get("segments"), list):
                raise CorruptEntry("not this transcript")
            recheck_video(entry, path, fingerprint)
        except (CorruptEntry, KeyError, TypeError, AttributeError, OSError):
            path.unlink(missing_ok=True)
            return None
        return entry

    def store(self, key: str, fingerprint: Fingerprint, transcript: dict, *,
              content_sha256: Optional[str]) -> None:
        """Keep `transcript` (segments on the video's clock, language, model); a full or
        read-only disk only costs the next open a transcription."""
        entry = {"format": FORMAT, "key": key, "created": time.time(),
                 "video": {"path": fingerprint.path, "size": fingerprint.size,
                           "mtime_ns": fingerprint.mtime_ns, "sha256": content_sha256},
                 **transcript}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(self.path(key), entry)
        except OSError:
            pass

    def entries(self) -> list[TranscriptInfo]:
        """Every stored transcript, newest first (not checked against its video)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.glob("*.json"):
            try:
                entry = read_json(p)
                out.append(TranscriptInfo(entry["video"]["path"], entry.get("model", "?"),
                                          entry.get("language"), len(entry["segments"]),
                                          p.stat().st_size, entry.get("created", 0.0)))
            except (CorruptEntry, KeyError, TypeError, OSError):
                continue  # unreadable: the next lookup removes it
        return sorted(out, key=lambda e: e.created, reverse=True)

    def clear(self) -> int:
        if not self.root.is_dir():
            return 0
        n = 0
        for p in self.root.iterdir():
            if p.suffix == ".json" or p.name.startswith("."):
                p.unlink(missing_ok=True)
                n += p.suffix == ".json"
        return n
