"""Frame source: the exact frames of design.md §1.1, with their timestamps, decoded on a worker thread.

    from sfllava_mlx.frames import read_frames, iter_frames, probe

    clip = read_frames("trip.mp4", num_frames=128, slow_every=4, seek="exact")  # SampledFrames
    clip = read_frames("film.mkv", part=Part.of("45:00", "47:00"))  # that part alone (§2.12)

    with iter_frames("trip.mp4") as reader:        # FrameReader: opens, then decodes on a thread
        reader.info, reader.indices, reader.timestamps, reader.streams, reader.exact  # known now
        for position, image in reader:             # position order; decoding runs ahead
            ...                                    # (H, W, 3) uint8 RGB, upright, read-only
        reader.replaced                            # complete once the loop ends

Positions i = 0..T-1 take frame `floor((i + 0.5) * N / T)`, N being the frames the stream
holds in presentation order (not the container's frame count or fps, which may lie). An entry
of `indices` or `timestamps` can change only for a frame that fails to decode (it is replaced
by its nearest decodable neighbour, listed in `replaced`), and is final once its position has
been yielded. Positions that share a frame share one read-only array.

A part (`part=Part.of(start, end)`, design.md §2.4) keeps only the frames with start <= t < end:
N is their number, the positions and `fps` run over them alone, indices and timestamps stay
the video's own. It is found on the index (refused there, before any frame is decoded, when
it holds no frame) and the decoder seeks straight into it.

How frames are found. OpenCV's `CAP_PROP_POS_FRAMES` seek maps a frame number to a time with
the nominal fps (wrong for variable frame rate) and cannot name keyframes, so this module uses
PyAV, the same FFmpeg underneath:
- an index of every frame's presentation timestamp and of the keyframes. For MP4/MOV without
  frame reordering it is the container's sample table (free, no file read); otherwise one
  pass over the packets (reads the file, decodes nothing).
- exact mode walks the wanted frames in order and, for each, either keeps decoding forward or
  seeks to the keyframe at or before it, whichever decodes fewer frames (a seek counts as
  `SEEK_COST_FRAMES` frames more). That is never worse than one sequential pass nor than one
  seek per frame, and equals the decode floor (frames from each wanted frame's keyframe to it)
  up to the seeks' overhead. Frames are identified by their timestamps, not by counting, so
  variable frame rate and B-frame reordering stay exact. Skipped frames are decoded but never
  colour-converted (what OpenCV's `grab()` saves).
- keyframe mode (`seek="keyframe"`) takes, for each position, the keyframe at or before it,
  decoding keyframes only: fast and approximate; indices and timestamps reported are the
  keyframes' own.
- containers without timestamps fall back to one sequential pass that counts frames.
"""

from .part import Part, Span, locate
from .sampling import (
    SEEK_MODES,
    format_time,
    frames_for_rate,
    parse_time,
    sample_positions,
    stream_names,
    video_duration,
)

# The decoder (PyAV) is imported when first used: the options and the command line's checks
# read parts and time text without it.
_LAZY = {"FrameReader": "reader", "SampledFrames": "reader", "iter_frames": "reader",
         "read_frames": "reader", "sampled_timestamps": "reader", "VideoInfo": "video",
         "probe": "video"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FrameReader", "Part", "SampledFrames", "Span", "VideoInfo", "SEEK_MODES",
           "format_time", "frames_for_rate", "iter_frames", "parse_time", "probe", "read_frames",
           "sample_positions", "sampled_timestamps", "locate", "stream_names", "video_duration"]
