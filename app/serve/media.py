"""`sfllava serve`: the body and the media a request may read (design.md §7), off the event loop.

Reading the body spills it to disk past 1 MiB, so queued uploads never sit in memory; the
one video URL becomes a file:

- a local path (`file:///abs/path` or `/abs/path`) is resolved — symlinks and `..` —
  *before* it is checked against the `--media-dir` directories (403 outside, whether or
  not the file exists, so nothing outside can even be probed);
- a `data:video/...;base64,` URL is decoded in chunks into a private upload directory,
  never above `--max-upload-mb` (413); the base64 text is cut out of the raw body before
  the JSON is parsed, so a large upload is never one huge Python string;
- any other URL is refused: the server fetches nothing.
"""

from __future__ import annotations

import binascii
import mmap
import os
import re
import stat
import tempfile
import uuid
from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote, urlsplit

from .request import APIError, fail

SPILL_BYTES = 1 << 20  # bodies above this go to a temporary file while they are read
JSON_ALLOWANCE = 1 << 20  # room for the JSON around an upload of the largest size
DECODE_CHUNK = 4 << 20  # base64 characters decoded at a time (a multiple of 4)
UPLOAD_MARK = "@upload:"  # '@' is not base64: no real payload looks like this


# ----------------------------------------------------------------------------------------
# The body: read with a size limit, uploads cut out before the JSON is parsed


class Body:
    """A request body, in memory or (past SPILL_BYTES) in a temporary file."""

    def __init__(self, spill_dir: str):
        self.spill_dir = spill_dir
        self.size = 0
        self._chunks: list = []
        self._file = None

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is None and self.size > SPILL_BYTES:
            self._file = tempfile.TemporaryFile(dir=self.spill_dir)
            self._file.write(b"".join(self._chunks))
            self._chunks = []
        if self._file is not None:
            self._file.write(chunk)
        else:
            self._chunks.append(chunk)

    def view(self):
        """The whole body as a bytes-like object (an mmap for a spilled body)."""
        if self._file is None:
            return b"".join(self._chunks)
        self._file.flush()
        if self.size == 0:
            return b""
        return mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None


def body_limit(max_upload_bytes: int) -> int:
    """The largest body accepted: one upload at the limit, base64 (4/3), plus the JSON."""
    return max_upload_bytes * 4 // 3 + JSON_ALLOWANCE


_DATA_URL = re.compile(rb'"url"\s*:\s*"data:([^";,]{0,100})((?:;[^";,]{0,100}){0,4});base64,')


def cut_uploads(raw) -> tuple[bytes, list]:
    """Replace each base64 payload of a `"url": "data:…;base64,…"` string in the raw body
    by a mark, and return (the JSON left, [(start, end)] spans of the payloads in `raw`).

    Only an unescaped quote can start a JSON string, and base64 has no quote or
    backslash, so the payload ends at the next quote; one with an escape is left in the
    JSON and decoded from there."""
    pieces, spans, pos = [], [], 0
    for m in _DATA_URL.finditer(raw):
        start = m.end()
        end = raw.find(b'"', start)
        if end < 0:
            break
        if raw.find(b"\\", start, end) >= 0:
            continue
        pieces.append(bytes(raw[pos:start]) + f"{UPLOAD_MARK}{len(spans)}".encode())
        spans.append((start, end))
        pos = end
    pieces.append(bytes(raw[pos:]))
    return b"".join(pieces), spans


# ----------------------------------------------------------------------------------------
# Media


@dataclass
class MediaFile:
    path: str  # the file to read: a resolved path inside a media dir, or an upload
    upload: bool = False  # a private copy, deleted once the request is done


class Media:
    """The files a request may read (design.md §7): inside --media-dir, or uploaded."""

    def __init__(self, media_dirs: list, upload_dir: str, max_upload_bytes: int):
        self.dirs = [os.path.realpath(d) for d in media_dirs]
        self.upload_dir = upload_dir
        self.max_upload_bytes = max_upload_bytes

    def allowed(self, real: str) -> bool:
        return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self.dirs)

    def resolve(self, url: str, raw=None, spans=()) -> MediaFile:
        """A video URL -> MediaFile, or APIError (400 bad or unreadable, 403 outside, 413)."""
        if url.startswith("data:"):
            return self._data_url(url, raw, spans)
        return MediaFile(self.local_file(url, "video_url"))  # opened once, by its answer

    def local_file(self, url: str, param: str, noun: str = "video", kind: str = "video") -> str:
        """A local path (`file:///abs/path` or `/abs/path`) -> the file's resolved path, or
        APIError: 400 bad or unreadable, 403 outside the media directories. `noun` and
        `kind` name the file in the messages and the error codes (`{kind}_not_found`,
        `invalid_{kind}`)."""
        if url.startswith("/"):
            path = url
        elif url.lower().startswith("file:"):
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                fail("file URLs must name a local file (file:///abs/path)", f"invalid_{kind}_url",
                     param)
            path = unquote(parts.path)
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url):
            upload = ", or the video itself as a data: URL" if kind == "video" else ""
            fail("the server fetches no URLs: give a local path (file:///abs/path or /abs/path) "
                  f"inside the media directory{upload}", "url_not_allowed", param)
        else:
            fail(f"a {noun} path must be absolute (file:///abs/path or /abs/path)",
                  f"invalid_{kind}_url", param)
        if "\0" in path or not path.startswith("/"):
            fail(f"a {noun} path must be absolute (file:///abs/path or /abs/path)",
                  f"invalid_{kind}_url", param)
        real = os.path.realpath(path)  # symlinks and '..' first, then the check
        if not self.allowed(real):
            raise APIError(403, f"the {noun} is outside the server's media directories "
                                "(--media-dir)", "path_not_allowed", param)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise APIError(400, f"{noun} not found: {path}", f"{kind}_not_found", param) from None
        except OSError as e:
            raise APIError(400, f"cannot read the {noun}: {e.strerror}", f"invalid_{kind}",
                           param) from None
        if not stat.S_ISREG(st.st_mode):
            fail(f"{path} is not a regular file", f"invalid_{kind}", param)
        if not os.access(real, os.R_OK):
            fail(f"cannot read the {noun} {path}: permission denied", f"invalid_{kind}", param)
        return real

    def _data_url(self, url: str, raw, spans) -> MediaFile:
        head, sep, payload = url.partition(",")
        media_type = head[5:].split(";")[0].strip().lower()
        if ";base64" not in head or not sep:
            fail("a data URL must be base64 (data:video/mp4;base64,...)", "invalid_video_url", "video_url")
        if not (media_type.startswith(("video/", "image/"))
                or media_type in ("application/octet-stream", "")):
            fail(f"a data URL of type {media_type!r} is not a video or a picture",
                  "invalid_video_url", "video_url")
        if payload.startswith(UPLOAD_MARK):
            start, end = spans[int(payload[len(UPLOAD_MARK):])]
            # Views of the body are released before it is closed (an mmap refuses otherwise).
            with memoryview(raw) as whole, whole[start:end] as source:
                return self._decode(source, media_type)
        # Left in the JSON (it had an escape): small, since the body limit bounds it.
        with memoryview(payload.encode("ascii", "replace")) as source:
            return self._decode(source, media_type)

    def _decode(self, source: memoryview, media_type: str) -> MediaFile:
        limit = self.max_upload_bytes
        if len(source) // 4 * 3 - 2 > limit:
            raise APIError(413, f"the video is larger than the server's upload limit "
                                f"({limit / 2**20:g} MB, --max-upload-mb)", "request_too_large",
                           "video_url")
        ext = re.sub(r"[^a-z0-9]", "", media_type.split("/")[-1])[:8] or "bin"
        path = os.path.join(self.upload_dir, f"upload-{uuid.uuid4().hex}.{ext}")
        size = 0
        try:
            with open(path, "xb") as f:
                os.chmod(path, 0o600)
                for i in range(0, len(source), DECODE_CHUNK):
                    data = binascii.a2b_base64(source[i:i + DECODE_CHUNK], strict_mode=True)
                    size += len(data)
                    f.write(data)
        except binascii.Error:
            os.unlink(path)
            fail("the data URL is not valid base64", "invalid_video_url", "video_url")
        except BaseException:
            if os.path.exists(path):
                os.unlink(path)
            raise
        if size == 0:
            os.unlink(path)
            fail("the data URL holds no data", "invalid_video", "video_url")
        return MediaFile(path, upload=True)

    def discard(self, video: Optional[MediaFile]) -> None:
        if video is not None and video.upload:
            try:
                os.unlink(video.path)
            except OSError:
                pass


def content_key(media) -> tuple:
    """What an opened video or picture is, for matching held conversations: its size and
    sampled digest (the persistent cache's fingerprint, design.md §4), never its name or
    modification time; a video's read through its open file."""
    from sfllava_mlx.cache import sampled_digest
    from sfllava_mlx.media import Video

    if isinstance(media, Video):
        return media.fingerprint.size, media.fingerprint.sampled
    try:
        return sampled_digest(media.path)
    except OSError as e:
        raise APIError(400, f"cannot read the video: {e.strerror}", "invalid_video", "video_url") from None
