"""Helpers for the subtitle and speech tests: subtitle files written from a list of events
in each format's own markup, videos that carry them as streams (ffmpeg muxes them), and
design.md §2.5's rule and prompt written out plainly, independent of the library. No tests here.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.videos import ffprobe_frames

HEADER = "This video's subtitles are listed below: \n"  # lmms-eval's Video-MME wording


@dataclass
class Line:
    start_ms: int
    end_ms: int
    lines: list  # the event's lines of text, without markup
    comment: bool = False  # an ASS Comment: never shown, never selected

    @property
    def plain(self) -> str:
        return " ".join(self.lines)


# Frames of the main test video (160 frames at 10 fps, 128 midpoint positions) sit at
# 0.0, 0.1, 0.3, 0.4, ... (every fifth frame is not sampled: 0.2, 0.7, 1.2, ...). The events
# hit the rule's edges: a start on a sampled frame, an end on one (not included), an event
# holding only a frame that is not sampled, overlaps, one past the last frame; the file
# lists them out of order.
EVENTS = [
    Line(1000, 4000, ["The dog runs", "& the cat follows"]),
    Line(300, 350, ["A red car turns left"]),  # starts on the frame at 0.3 s
    Line(150, 300, ["Only an unsampled frame"]),  # 0.2 s is not sampled; 0.3 s is its end
    Line(2500, 2600, ["Someone shouts"]),  # inside the dog's event: both kept, in time order
    Line(9000, 9500, ["Near the end", "of the scene"]),
    Line(16000, 21000, ["After the last frame"]),
    Line(5000, 6000, ["A comment, not a line"], comment=True),
]


def srt_time(ms: int, sep: str = ",") -> str:
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def ass_time(ms: int) -> str:
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h}:{m:02d}:{s:02d}.{ms // 10:02d}"


def write_srt(path: Path, events=EVENTS) -> Path:
    """SRT with HTML-like tags, and the events' lines on lines of their own."""
    blocks = []
    for n, e in enumerate([e for e in events if not e.comment], 1):
        text = "\n".join(f"<i>{line}</i>" if i == 0 else line for i, line in enumerate(e.lines))
        blocks.append(f"{n}\n{srt_time(e.start_ms)} --> {srt_time(e.end_ms)}\n{text}\n")
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


def write_vtt(path: Path, events=EVENTS) -> Path:
    """WebVTT with a voice tag, bold, and `&` escaped as WebVTT escapes it."""
    out = ["WEBVTT", ""]
    for e in events:
        if e.comment:
            continue
        escaped = [line.replace("&", "&amp;") for line in e.lines]
        lines = [f"<v Narrator><b>{escaped[0]}</b>", *escaped[1:]]
        out += [f"{srt_time(e.start_ms, '.')} --> {srt_time(e.end_ms, '.')}", *lines, ""]
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def write_ass(path: Path, events=EVENTS) -> Path:
    """ASS with override tags, \\N line breaks and a Comment line."""
    head = """[Script Info]
ScriptType: v4.00+
PlayResX: 384
PlayResY: 288

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, MarginV, Encoding
Style: Default,Arial,20,&H00FFFFFF,&H000000FF,&H00000000,&H00000000,0,0,0,0,100,100,0,0,1,2,2,2,10,10,10,1

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
"""
    rows = []
    for e in events:
        kind = "Comment" if e.comment else "Dialogue"
        text = "\\N".join(e.lines)
        rows.append(f"{kind}: 0,{ass_time(e.start_ms)},{ass_time(e.end_ms)},Default,,0,0,0,,"
                    f"{{\\an8}}{{\\b1}}{text}{{\\b0}}")
    path.write_text(head + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def mux(video: Path, subtitle_files: list, out: Path, codec: str, languages=()) -> Path:
    """`video` with the subtitle files as streams (`-c:s codec`); the video stream copied,
    except into MP4, which gets lossless PNG frames (FFV1 does not go in MP4)."""
    args = ["ffmpeg", "-v", "error", "-y", "-i", str(video)]
    for f in subtitle_files:
        args += ["-i", str(f)]
    args += ["-map", "0:v"]
    for i in range(len(subtitle_files)):
        args += ["-map", f"{i + 1}"]
    args += ["-c:v", "png" if out.suffix == ".mp4" else "copy", "-c:s", codec]
    for i, lang in enumerate(languages):
        args += [f"-metadata:s:s:{i}", f"language={lang}"]
    subprocess.run([*args, str(out)], check=True, capture_output=True)
    return out


# ----------------------------------------------------------------------------------------
# design.md §2.5, written out here


def frame_times(video: Path, num_frames: int = 128) -> list:
    """The sampled frames' times: ffprobe's frame list at design.md §1.1's midpoint indices."""
    times = [t for t, _ in ffprobe_frames(video)]
    n = len(times)
    return [times[(2 * i + 1) * n // (2 * num_frames)] for i in range(num_frames)]


def kept(events, times) -> list:
    """The events some sampled time falls in (start <= t < end), in time order."""
    shown = sorted((e for e in events if not e.comment), key=lambda e: (e.start_ms, e.end_ms))
    return [e for e in shown if any(e.start_ms / 1000 <= t < e.end_ms / 1000 for t in times)]


def block(events) -> str:
    return HEADER + "\n".join(e.plain for e in events) if events else ""


def question_with(events, question: str) -> str:
    """The first question's text after `<image>\\n`: SUB, then the question."""
    sub = block(events)
    return f"{sub}\n{question}" if sub else question


# ----------------------------------------------------------------------------------------
# Speech


def add_audio(video: Path, out: Path, *, delay: float = 0.0, codec: str = "pcm_s16le",
              rate: int = 48000, seconds: float = 12.0) -> Path:
    """`video` (its frames copied) with a stereo track of beeps that starts `delay` seconds
    into it."""
    source = (f"aevalsrc=0.5*sin(2*PI*440*t)*lt(mod(t\\,2)\\,1)|0.3*sin(2*PI*660*t)"
              f":s={rate}:d={seconds}")
    args = ["ffmpeg", "-v", "error", "-y", "-i", str(video)]
    if delay:
        args += ["-itsoffset", str(delay)]
    args += ["-f", "lavfi", "-i", source, "-map", "0:v", "-map", "1:a", "-c:v", "copy",
             "-c:a", codec, str(out)]
    subprocess.run(args, check=True, capture_output=True)
    return out


def ffmpeg_audio(video: Path):
    """ffmpeg's own decode of the first audio track to 16 kHz mono float32."""
    import numpy as np

    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-map", "0:a:0", "-f",
                          "f32le", "-ac", "1", "-ar", "16000", "-"], check=True,
                         capture_output=True).stdout
    return np.frombuffer(raw, np.float32)


def audio_start(video: Path) -> float:
    """When the audio track starts on the video's clock, by ffprobe."""
    import json

    out = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,start_time:format=start_time",
         "-of", "json", str(video)], check=True, capture_output=True, text=True).stdout)
    audio = next(s for s in out["streams"] if s["codec_type"] == "audio")
    return float(audio["start_time"]) - float(out["format"].get("start_time", 0.0))


def kept_seconds(segments, times) -> list:
    """design.md §2.5's rule over (start, end, text) in seconds: in time order, text only."""
    shown = sorted((s for s in segments if s[2] and s[1] > s[0]), key=lambda s: (s[0], s[1]))
    return [s for s in shown if any(s[0] <= t < s[1] for t in times)]
