"""A media file opened once (issue 28): every step of opening a video — the checks, the
cache key, `--fps` and a part, the subtitles, the frames — takes this one object, so the
file is opened twice whatever the steps: once for its bytes (the content fingerprint, and
the full hash a cache miss computes), once as a container (the index, the streams, the
decoder the frame reader goes on with).

    media = open_media("trip.mp4")     # a Video, or a picture's PictureInfo; VideoError
    media.index, media.info            # the frame index (read once) and what it holds
    media.text_streams, media.has_audio, media.format
    media.fingerprint                  # size + sampled blocks, read on first use
    with media.reader(num_frames=32):  # a FrameReader on the same container
        ...
    media.close()

    with opened("trip.mp4") as media:  # closed at its end (a no-op once Engine.open has)
        ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional, Union

import av

from .cache.fingerprint import ContentHasher, Fingerprint
from .checks import media_path
from .errors import VideoError
from .frames import FrameReader, Part, Span, VideoInfo, locate
from .frames.video import open_video
from .image import ImageError, PictureInfo, named_like_picture, picture_format
from .image import probe as probe_picture
from .subtitles import embedded
from .subtitles.events import Event

SNIFF_BYTES = 64  # what telling a picture from a video reads (image.picture_format)


class Video:
    """A video file, opened and indexed, its first frame decoded: nothing else decoded."""

    def __init__(self, path: str, file, opened):
        self.path = path
        self._file = file  # the fingerprint's reads (and the full hash's, through a dup)
        self._opened = opened  # (IndexedVideo, its _Decoder at the start, the first frame)
        indexed, decoder, first = opened
        self.index = indexed.index
        self.info: VideoInfo = indexed.info(first)
        self.text_streams = embedded.text_streams(decoder.container)
        self.has_audio = bool(decoder.container.streams.audio)
        self.format = decoder.container.format.name  # the demuxer's names: "matroska,webm"
        self._fingerprint: Optional[Fingerprint] = None

    @classmethod
    def open(cls, path, file=None) -> Video:
        """VideoError, in one line, for a file FFmpeg cannot open, with no video stream or
        no decodable frame. `file`: the file already open for reading (its bytes)."""
        path = str(path)
        opened = open_video(path, keyframes_only=False)
        if file is None:
            try:
                file = open(path, "rb")
            except OSError as e:
                opened[1].close()
                raise VideoError(f"cannot read {path}: {e.strerror}") from None
        return cls(path, file, opened)

    # -- its bytes -----------------------------------------------------------------------
    @property
    def fingerprint(self) -> Fingerprint:
        if self._fingerprint is None:
            self._fingerprint = Fingerprint.of(self.path, self._file)
        return self._fingerprint

    def hasher(self) -> ContentHasher:
        """The full hash, computed in the background on a duplicate of the open file."""
        if self._file.closed:  # a prepared opening opened a second time
            return ContentHasher(self.path)
        return ContentHasher(self.path, fd=os.dup(self._file.fileno()))

    # -- its frames ----------------------------------------------------------------------
    def span(self, part: Optional[Part]) -> Optional[Span]:
        """The part's frames (design.md §2.4), found or refused on the index; None: all."""
        return locate(self.index, part) if part is not None else None

    def reader(self, **settings) -> FrameReader:
        """A FrameReader (`frames.FrameReader`'s settings) that goes on with this video's
        container and decoder; the first reader only, later ones open the file again."""
        opened, self._opened = self._opened, None
        return FrameReader(self.path, opened=opened, **settings)

    def subtitle_events(self, stream: embedded.Stream) -> list[Event]:
        """A text subtitle stream's events, read through the same container, which is
        then rewound for the frames."""
        if self._opened is None or self.index.pts is None:  # no container, or no seeking
            with av.open(self.path, metadata_errors="ignore") as container:
                return embedded.read_stream(container, stream)
        decoder = self._opened[1]
        try:
            decoder.container.seek(self.index.seek_ts[0], stream=decoder.stream, backward=True)
            events = embedded.read_stream(decoder.container, stream)
        finally:
            decoder.rewind()
        return events

    def close(self) -> None:
        self._file.close()
        opened, self._opened = self._opened, None
        if opened is not None:
            opened[1].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


Media = Union[Video, PictureInfo]


def open_media(media) -> Media:
    """A path opened as a Video or probed as a picture (by its content, never its name);
    an already opened one as it is. VideoError (ImageError for a file named like a
    picture) for a missing or unreadable one."""
    if isinstance(media, (Video, PictureInfo)):
        return media
    path = media_path(media)
    if not os.path.isfile(path):
        return Video.open(path)  # FFmpeg's refusal, in one line (a directory, a device)
    try:
        file = open(path, "rb")
    except OSError as e:
        raise VideoError(f"cannot read {path}: {e.strerror}") from None
    if picture_format(file.read(SNIFF_BYTES)) is not None:
        file.close()
        return probe_picture(path)
    try:
        return Video.open(path, file)
    except VideoError:
        file.close()
        if named_like_picture(path):
            raise ImageError(f"{path} is not a picture (its content is not JPEG, PNG, WebP, "
                             "HEIC or AVIF) nor a video") from None
        raise


@contextmanager
def opened(media) -> Iterator[Media]:
    """`open_media(media)` for a `with`: a video opened here is closed at its end (a no-op
    where `Engine.open` closed it once its frames were read), whatever went wrong between;
    one given already open is its opener's to close."""
    opened_media = open_media(media)
    try:
        yield opened_media
    finally:
        if opened_media is not media and isinstance(opened_media, Video):
            opened_media.close()
