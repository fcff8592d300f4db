"""Which subtitles a video gets (design.md §2.5's `--subtitles auto|off|speech|FILE`):

- `auto`: the video's first text subtitle stream (`--subtitle-lang L`: the first tagged
  L), else a sidecar file with the video's stem, else none;
- `FILE`: that file; missing, unreadable or not subtitles is the user's error;
- `speech`: the audio track transcribed (cached with the video); checked here — an audio
  track, mlx-whisper installed, the model — and transcribed by `transcribe`, before any
  frame is decoded;
- `off`: none.

A broken sidecar that `auto` found is a warning, not an error: the video gets no subtitles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from . import embedded, files, speech
from .track import SubtitleTrack

if TYPE_CHECKING:
    from ..media import Video

MODES = ("auto", "off", "speech")  # anything else names a file


@dataclass
class Resolved:
    track: Optional[SubtitleTrack]  # None: no subtitles
    warnings: list = field(default_factory=list)


def resolve(video: Video, choice: str, lang: Optional[str] = None,
            speech_model: Optional[str] = None, transcripts=None,
            fingerprint=None) -> Resolved:
    """The subtitles `choice` gives `video` (a media.Video: opened, its streams known). For
    speech, the track's events are the cached transcript's, or None (to transcribe);
    `transcripts` (a TranscriptCache) and the video's `fingerprint`, where caching is on."""
    if choice == "off":
        return Resolved(None)
    if choice == "speech":
        return Resolved(speech_track(video, speech_model, transcripts, fingerprint))
    if choice == "auto":
        return auto(video, lang)
    path = os.path.abspath(os.path.expanduser(choice))
    return Resolved(SubtitleTrack("file", files.read_file(path), path=path))


def auto(video: Video, lang: Optional[str]) -> Resolved:
    streams = video.text_streams
    chosen = embedded.pick(streams, lang)
    if chosen is not None:
        events = video.subtitle_events(chosen)
        if events:
            return Resolved(SubtitleTrack("embedded", events, stream=chosen.index,
                                          codec=chosen.codec, language=chosen.language))
    warnings = []
    for path in files.sidecars(video.path, lang):
        try:
            return Resolved(SubtitleTrack("sidecar", files.read_file(path), path=str(path)),
                            warnings)
        except files.SubtitleFileError as e:
            warnings.append(f"ignoring the subtitles beside the video: {e}")
    if lang is not None and streams and chosen is None:
        tags = sorted({s.language or "untagged" for s in streams})
        warnings.append(f"no subtitles in {lang!r}: the video's subtitle streams are "
                        f"{', '.join(tags)}")
    return Resolved(None, warnings)


# ----------------------------------------------------------------------------------------
# Speech


def speech_track(video: Video, model: Optional[str], transcripts=None,
                 fingerprint=None) -> SubtitleTrack:
    """The speech track, its events read from the cache when it has them; refuses at once
    what cannot be transcribed (no mlx-whisper, no audio track, no such model)."""
    name = model or speech.DEFAULT_SPEECH_MODEL
    speech.require_whisper()
    if not video.has_audio:
        raise speech.SpeechError(f"{video.path} has no audio track: --subtitles speech needs one")
    speech.check_model(name)
    track = SubtitleTrack("speech", model=name)
    if transcripts is not None and fingerprint is not None:
        found = transcripts.lookup(transcript_key(fingerprint, name), fingerprint)
        if found is not None:
            return track.with_events(speech.events_of(found), language=found.get("language"))
    return track


def transcript_key(fingerprint, model: str) -> str:
    from ..cache.keys import transcript_key as key

    return key(fingerprint, speech.model_identity(model), speech.settings())


def transcribe(track: SubtitleTrack, video: Video, transcripts=None, fingerprint=None,
               progress=None) -> SubtitleTrack:
    """The speech track with its events: the audio decoded and transcribed (the cache
    written, where it is on). `progress(done, total)` in seconds of audio."""
    if track.events is not None:
        return track
    model_dir = speech.model_directory(track.model)  # a hub id fetched (or refused) first
    hasher = None
    if transcripts is not None and fingerprint is not None:
        hasher = video.hasher()  # the full hash, while the audio is transcribed
    audio = speech.decode_audio(video.path)  # a container of its own: the audio decoder
    result = speech.transcribe(audio, model_dir, progress)
    result["model"] = track.model
    if hasher is not None:
        transcripts.store(transcript_key(fingerprint, track.model), fingerprint, result,
                          content_sha256=hasher.result())
    return track.with_events(speech.events_of(result), language=result.get("language"))
