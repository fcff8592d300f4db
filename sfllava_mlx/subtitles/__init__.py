"""What is said in a video (design.md §2.5): subtitles embedded in it or beside it, or its speech
transcribed on device, and the lines its sampled frames select for the prompt.

    from sfllava_mlx.subtitles import resolve

    found = resolve("film.mkv", "auto")           # Resolved(track, warnings)
    lines = found.track.select(clip.timestamps)    # SubtitleLines: .lines, .prompt(), .record()

The modules, one concept each: `events.py` (an event, plain text, the selection rule),
`files.py` (subtitle files by pysubs2, sidecars), `embedded.py` (a video's own text
streams by PyAV), `speech.py` (the audio track by PyAV, mlx-whisper), `lang.py` (language
tags), `track.py` (a track and its selected lines), `sources.py` (auto | off | speech |
FILE).
"""

from .events import Event, select
from .sources import MODES, Resolved, resolve, transcribe
from .speech import DEFAULT_SPEECH_MODEL, INSTALL
from .track import SubtitleLines, SubtitleTrack

__all__ = ["DEFAULT_SPEECH_MODEL", "INSTALL", "MODES", "Event", "Resolved", "SubtitleLines",
           "SubtitleTrack", "resolve", "select", "transcribe"]
