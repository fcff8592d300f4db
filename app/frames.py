"""`sfllava frames`: show (and save) the frames the model will see (design.md §6.1).

    sfllava frames VIDEO [--model DIR] [--recipe native|slowfast] [--num-frames T]
                   [--seek exact|keyframe] [--fps F] [--start T0] [--end T1]
                   [--subtitles auto|off|speech|FILE] [--out DIR] [--json]

A table of the sample positions (frame index, timestamp, slow or fast stream) and the
subtitle lines those frames select (design.md §2.5); `--out` writes each sampled frame as a
lossless PNG at the video's own resolution, upright (`NNN.png`, in position order), and
`contact.png`, a labelled sheet of all of them. With `--start` / `--end` only that part of
the video is sampled (design.md §2.4); indices and timestamps stay the video's own.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from sfllava_mlx.config import (
    ModelConfig,
    PreprocessConfig,
    ProjectorConfig,
    PromptConfig,
    SamplingConfig,
    VisionConfig,
)
from sfllava_mlx.errors import UserError
from sfllava_mlx.tokens import num_visual_tokens

from .fmt import clip_notes, clock, note, warn
from .options import FRAME_OPTIONS, add_options, checked_options
from .subtitles import listing_table, speech_progress, summary

THUMB_WIDTH = 192  # contact sheet: pixels per thumbnail
SLOW_COLOUR = (255, 140, 0)  # RGB border of slow-stream frames on the contact sheet


def add_arguments(p) -> None:
    p.add_argument("video", metavar="FILE", help="the video file")
    p.add_argument("--model", default=None,
                   help="converted model directory: use its sampling settings (default: design.md §1's)")
    add_options(p, FRAME_OPTIONS)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write NNN.png per position and contact.png into DIR")
    p.add_argument("--json", action="store_true", help="print JSON (stdout carries only JSON)")


def main(args) -> int:
    from sfllava_mlx.media import Video

    opts = checked_options(args)  # bad values: one line, before the video is opened
    part = opts.part
    config = model_config(args.model)
    sampling = config.recipe(opts.recipe, opts.num_frames)
    tic = time.perf_counter()
    with Video.open(args.video) as video, video.reader(
            num_frames=sampling.num_frames, slow_every=sampling.slow_every, seek=opts.seek,
            hold_all=True, positions=sampling.frame_positions, fps=opts.fps,
            images=bool(args.out), part=part) as reader:  # pixels: --out
        opened_s = time.perf_counter() - tic
        # While the frames decode (the reader has the container: subtitles open their own).
        track, warnings = subtitle_track(video, opts)
        clip = reader.collect()
    elapsed = opened_s + reader.elapsed_s  # the frames' own time, not the subtitles'
    sampling = replace(sampling, num_frames=len(clip.indices))  # --fps: this video's count
    lines = track.select(clip.timestamps) if track is not None else None
    if args.out:
        write_frames(clip, Path(args.out))
    if args.json:
        doc = {
            "frames": [{"index": i, "timestamp": round(t, 6), "stream": s}
                       for i, t, s in zip(clip.indices, clip.timestamps, clip.streams)],
            "exact": clip.exact,
            "recipe": opts.recipe,
            "visual_tokens": num_visual_tokens(config.vision.grid, sampling),
            "timings_s": {"frames": round(elapsed, 6)},
        }
        if part is not None:  # the part asked for, in seconds
            doc["part"] = part.to_json()
        if lines is not None:  # with subtitles: the lines the frames select (design.md §6.1)
            doc["subtitles"] = lines.listing()
        print(json.dumps(doc))
        report_notes(clip, stream=sys.stderr)
        warn(warnings)
    else:
        print_table(clip, elapsed, args.out, part)
        print(recipe_line(config, opts.recipe, sampling))
        print_subtitles(lines, warnings)
    return 0


def subtitle_track(video, opts):
    """(the video's subtitle track or None, warnings): the track whose lines the sampled
    frames of `video` (a media.Video) select, as generate would. Speech is transcribed (or
    read from the cache)."""
    from sfllava_mlx.subtitles import resolve, transcribe

    transcripts = fingerprint = None
    if opts.subtitles == "speech":
        from sfllava_mlx.cache import TranscriptCache

        transcripts, fingerprint = TranscriptCache(), video.fingerprint
    found = resolve(video, opts.subtitles, opts.subtitle_lang, opts.speech_model,
                    transcripts, fingerprint)
    if found.track is None:
        return None, found.warnings
    with speech_progress() as progress:
        track = transcribe(found.track, video, transcripts, fingerprint,
                           progress=(lambda done, total: progress("speech", done, total))
                           if progress else None)
    return track, found.warnings


def print_subtitles(lines, warnings) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    console.print(summary(lines))
    if lines is not None and lines.lines:
        console.print(listing_table(lines))
    warn(warnings, stream=sys.stdout)


def model_config(model) -> ModelConfig:
    """The model's config, or SF-LLaVA-1.5's (design.md §1's defaults) without --model."""
    if model is None:
        return ModelConfig("default", {}, VisionConfig(), ProjectorConfig(),
                           {"native": SamplingConfig()}, PreprocessConfig(), PromptConfig())
    from sfllava_mlx.hub import local_or_download

    return ModelConfig.read(local_or_download(model, ["config.json"]))  # a hub id: config only


def recipe_line(config: ModelConfig, recipe: str, s: SamplingConfig) -> str:
    streams = (f"{len(range(0, s.num_frames, s.slow_every))} slow at stride "
               f"{s.slow_stride} + fast at stride {s.fast_stride}" if s.slow_every > 1
               else f"one stream at stride {s.slow_stride}")
    note = " (SlowFast training-free on this model)" if config.training_free(recipe) else ""
    return (f"recipe: {recipe}{note} for {config.family}: {s.num_frames} frames by {s.frame_positions}, "
            f"{streams}, {s.pool_mode} pooling, newline {s.newline}: "
            f"{num_visual_tokens(config.vision.grid, s)} visual tokens")


# ---------------------------------------------------------------------------------------------
# Output


def describe(info) -> str:
    rotated = f", rotated {info.rotation}°" if info.rotation else ""
    return (f"{Path(info.path).name}: {info.width}x{info.height}{rotated}, {info.codec}, "
            f"{info.num_frames} frames, {info.fps:.3f} fps, {info.duration:.2f} s")


def part_line(part, clip) -> str:
    """The part sampled and what it holds, in the video's time."""
    return (f"part {part.label()}: frames {min(clip.indices)} to {max(clip.indices)} "
            "(the video's own indices and times)")


def report_notes(clip, stream) -> None:
    """Approximate sampling, replaced frames, a damaged file: one line each."""
    for text in clip_notes(clip):
        note(text, stream)


def print_table(clip, elapsed: float, out, part=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(describe(clip.info), highlight=False)
    if part is not None:
        console.print(part_line(part, clip), highlight=False)
    table = Table()
    for name in ("position", "index", "timestamp", "time", "stream"):
        table.add_column(name, justify="left" if name == "stream" else "right")
    for pos, (i, t, s) in enumerate(zip(clip.indices, clip.timestamps, clip.streams)):
        style = "bold" if s == "slow" else None
        table.add_row(str(pos), str(i), f"{t:.3f}", clock(t, 3), s, style=style)
    console.print(table)
    mode = "exact frames" if clip.exact else "APPROXIMATE: keyframe at or before each position"
    slow = clip.streams.count("slow")
    console.print(f"{len(clip.indices)} positions ({slow} slow, {len(clip.indices) - slow} fast), "
                  f"{len(set(clip.indices))} distinct frames, {mode}; read in {elapsed:.2f} s",
                  highlight=False)
    report_notes(clip, stream=sys.stdout)
    if out:
        console.print(f"wrote {len(clip.images)} frames and contact.png to {out}", highlight=False)


def write_frames(clip, out: Path) -> None:
    """NNN.png per position (lossless, the video's own resolution) and contact.png.

    Written into a temporary folder beside the target, then moved in: an interrupted run
    leaves no half-written image.
    """
    import shutil  # here, with cv2: `sfllava frames` without --out starts faster
    import tempfile

    import cv2

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(len(clip.images) - 1)))
    tmp = Path(tempfile.mkdtemp(prefix=".frames-", dir=out))
    try:
        names = []
        for pos, image in enumerate(clip.images):
            name = f"{pos:0{digits}d}.png"
            _imwrite(cv2, tmp / name, image)
            names.append(name)
        _imwrite(cv2, tmp / "contact.png", contact_sheet(clip))
        for name in names + ["contact.png"]:
            os.replace(tmp / name, out / name)
    except OSError as e:
        raise UserError(f"cannot write frames to {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _imwrite(cv2, path: Path, rgb) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"OpenCV could not write {path}")


def contact_sheet(clip, thumb_width: int = THUMB_WIDTH):
    """All sampled frames in a grid, each labelled with position, index, time and stream."""
    import cv2
    import numpy as np

    h0, w0 = clip.images[0].shape[:2]
    tw = min(thumb_width, w0)
    th = max(1, round(h0 * tw / w0))
    label_h, pad = 18, 4
    cols = max(1, min(len(clip.images), math.ceil(math.sqrt(len(clip.images) * 16 / 9 * th / tw))))
    rows = math.ceil(len(clip.images) / cols)
    cell_w, cell_h = tw + 2 * pad, th + label_h + 2 * pad
    sheet = np.full((rows * cell_h, cols * cell_w, 3), 24, np.uint8)
    for pos, (image, i, t, s) in enumerate(zip(clip.images, clip.indices, clip.timestamps,
                                               clip.streams)):
        r, c = divmod(pos, cols)
        y, x = r * cell_h + pad, c * cell_w + pad
        if s == "slow":
            sheet[y - pad:y + th + label_h + pad, x - pad:x + tw + pad] = SLOW_COLOUR
        thumb = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
        sheet[y:y + th, x:x + tw] = thumb
        sheet[y + th:y + th + label_h, x:x + tw] = 0
        text = f"{pos} #{i} {clock(t, 3)}{'' if clip.exact else ' ~'}"
        cv2.putText(sheet, text, (x + 2, y + th + label_h - 5), cv2.FONT_HERSHEY_SIMPLEX,
                    0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return sheet
