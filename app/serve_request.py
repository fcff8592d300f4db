"""`sfllava serve`, part 1: what a request asks for, and the media it may read (SPEC §5).

Everything here runs before a request joins the queue, off the event loop: reading the
body (spilled to disk past 1 MiB, so queued uploads never sit in memory), parsing and
checking the Chat Completions shape, and turning the one video URL into a file:

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
import json
import mmap
import os
import re
import stat
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import unquote, urlsplit

SPILL_BYTES = 1 << 20  # bodies above this go to a temporary file while they are read
JSON_ALLOWANCE = 1 << 20  # room for the JSON around an upload of the largest size
DECODE_CHUNK = 4 << 20  # base64 characters decoded at a time (a multiple of 4)
VIDEO_PART_TYPES = ("video_url", "video")
IMAGE_PART_TYPES = ("image_url",)
ROLES = ("system", "developer", "user", "assistant")
UPLOAD_MARK = "@upload:"  # '@' is not base64: no real payload looks like this


class APIError(Exception):
    """An error answered as SPEC §5's JSON: {"error": {"message", "type", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: Optional[str] = None,
                 param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "code": self.code, "param": self.param}}


# ----------------------------------------------------------------------------------------
# The request


@dataclass
class ChatRequest:
    """A Chat Completions request, checked: one conversation about at most one video."""

    model: Optional[str]
    system: Optional[str]
    video_url: Optional[str]  # the one video (or picture) of the conversation
    history: list  # [(question, answer)] of the turns before the last question
    question: str
    stream: bool = False
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    options: dict = field(default_factory=dict)  # the `sfllava` object: recipe, num_frames, …
    media: str = "video"  # "image" when the part was an image_url


def _fail(message: str, code: str = "invalid_request", param: Optional[str] = None):
    raise APIError(400, message, code, param)


def _text_of(content, where: str) -> tuple[str, list]:
    """(text, [(kind, url)] of its videos and pictures) of a message's content: a string or
    a list of parts."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        _fail(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts, videos = [], []
    for j, part in enumerate(content):
        p = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            _fail(f"{p} must be an object with a type", param=p)
        kind = part["type"]
        if kind in ("text", "input_text"):
            if not isinstance(part.get("text"), str):
                _fail(f"{p}.text must be a string", param=p)
            texts.append(part["text"])
        elif kind in VIDEO_PART_TYPES + IMAGE_PART_TYPES:
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                _fail(f'{p} needs {{"{kind}": {{"url": ...}}}}', param=p)
            videos.append(("image" if kind in IMAGE_PART_TYPES else "video", url))
        else:
            _fail(f"{p}: unsupported content part type {kind!r} (text, video_url, image_url)",
                  "unsupported_content", p)
    return "\n".join(texts), videos


def _number(body: dict, name: str, kind, lo=None, hi=None, integer=False):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f" between {lo} and {hi}" if hi is not None else (f" >= {lo}" if lo is not None else "")
        _fail(f"{name} must be a{'n integer' if integer else ' number'}{bounds}",
              "invalid_value", name)
    return kind(value)


def parse_chat(body) -> ChatRequest:
    """The JSON body -> ChatRequest, or APIError(400) saying what is wrong."""
    if not isinstance(body, dict):
        _fail("the request body must be a JSON object")
    messages = body.get("messages")
    if messages is None:
        _fail("messages is required", "missing_messages", "messages")
    if not isinstance(messages, list) or not messages:
        _fail("messages must be a non-empty list", "invalid_messages", "messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        _fail("model must be a string", param="model")
    n = body.get("n")
    if n not in (None, 1):
        _fail("only n = 1 is supported", "unsupported_parameter", "n")
    if body.get("tools") or body.get("functions"):
        _fail("tools are not supported", "unsupported_parameter", "tools")
    stop = body.get("stop")
    if stop not in (None, [], ""):
        _fail("stop sequences are not supported", "unsupported_parameter", "stop")

    system, turns, videos = None, [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            _fail(f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in ROLES:
            _fail(f"{where}.role must be one of {', '.join(ROLES)}", "invalid_role", f"{where}.role")
        text, urls = _text_of(m.get("content"), where)
        if urls and role != "user":
            _fail(f"{where}: a video goes in a user message", "invalid_video_position", where)
        if role in ("system", "developer"):
            if turns:
                _fail("a system message must come before the conversation", "invalid_messages", where)
            system = text if system is None else system + "\n" + text
            continue
        if urls and turns:
            _fail("the video must be in the first user message", "invalid_video_position", where)
        videos += urls
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            _fail(f"{where}: expected a {expected} message (user and assistant alternate, "
                  "ending with a user message)", "invalid_messages", where)
        turns.append(text)
    if len(videos) > 1:
        _fail("at most one video (or picture) per conversation (SPEC §5)", "too_many_videos",
              "messages")
    if not turns or len(turns) % 2 == 0:
        _fail("the last message must be a user message", "invalid_messages", "messages")

    max_tokens = _number(body, "max_completion_tokens", int, 1, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        _fail("stream must be a boolean", param="stream")
    options = body.get("sfllava") or {}
    if not isinstance(options, dict):
        _fail("sfllava must be an object", param="sfllava")
    return ChatRequest(
        model=model, system=system, video_url=videos[0][1] if videos else None,
        media=videos[0][0] if videos else "video",
        history=[(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)],
        question=turns[-1], stream=bool(stream), max_tokens=max_tokens,
        temperature=_number(body, "temperature", float, 0, 2),
        top_p=_number(body, "top_p", float, 0, 1),
        seed=_number(body, "seed", int, integer=True),
        options=parse_options(options))


def parse_options(o: dict) -> dict:
    """The `sfllava` object: SPEC §2.9-2.10 and §4's per-request sampling options."""
    known = ("recipe", "num_frames", "fps", "timestamps", "seek")
    unknown = sorted(set(o) - set(known))
    if unknown:
        _fail(f"unknown sfllava option(s): {', '.join(unknown)} (known: {', '.join(known)})",
              "unsupported_parameter", "sfllava")
    out = {}
    if o.get("recipe") is not None:
        if o["recipe"] not in ("native", "slowfast"):
            _fail("sfllava.recipe must be native or slowfast", "invalid_value", "sfllava.recipe")
        out["recipe"] = o["recipe"]
    if o.get("num_frames") is not None:
        out["num_frames"] = _number(o, "num_frames", int, 1, 4096, integer=True)
    if o.get("seek") is not None:
        if o["seek"] not in ("exact", "keyframe"):
            _fail("sfllava.seek must be exact or keyframe", "invalid_value", "sfllava.seek")
        out["seek"] = o["seek"]
    if o.get("fps") is not None:
        out["fps"] = _number(o, "fps", float, 0)
        if out["fps"] <= 0:
            _fail("sfllava.fps must be positive", "invalid_value", "sfllava.fps")
    if o.get("timestamps") is not None:
        if not isinstance(o["timestamps"], bool):
            _fail("sfllava.timestamps must be a boolean", "invalid_value", "sfllava.timestamps")
        out["timestamps"] = o["timestamps"]
    return out


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


def load_json(text: bytes):
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", "invalid_json") from None


# ----------------------------------------------------------------------------------------
# Media


@dataclass
class Video:
    path: str  # the file to read: a resolved path inside a media dir, or an upload
    upload: bool = False  # a private copy, deleted once the request is done
    key: tuple = ()  # what the video is: (size, sampled digest) of its content


class Media:
    """The files a request may read (SPEC §5): inside --media-dir, or uploaded."""

    def __init__(self, media_dirs: list, upload_dir: str, max_upload_bytes: int):
        self.dirs = [os.path.realpath(d) for d in media_dirs]
        self.upload_dir = upload_dir
        self.max_upload_bytes = max_upload_bytes

    def allowed(self, real: str) -> bool:
        return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self.dirs)

    def resolve(self, url: str, raw=None, spans=()) -> Video:
        """A video URL -> Video, or APIError (400 bad or unreadable, 403 outside, 413)."""
        if url.startswith("data:"):
            return self._data_url(url, raw, spans)
        if url.startswith("/"):
            path = url
        elif url.lower().startswith("file:"):
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                _fail("file URLs must name a local file (file:///abs/path)", "invalid_video_url")
            path = unquote(parts.path)
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url):
            _fail("the server fetches no URLs: give a local path (file:///abs/path or /abs/path) "
                  "inside the media directory, or the video itself as a data: URL",
                  "url_not_allowed", "video_url")
        else:
            _fail("a video path must be absolute (file:///abs/path or /abs/path)",
                  "invalid_video_url", "video_url")
        if "\0" in path or not path.startswith("/"):
            _fail("a video path must be absolute (file:///abs/path or /abs/path)",
                  "invalid_video_url", "video_url")
        real = os.path.realpath(path)  # symlinks and '..' first, then the check
        if not self.allowed(real):
            raise APIError(403, "the video is outside the server's media directories "
                                "(--media-dir)", "path_not_allowed", "video_url")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise APIError(400, f"video not found: {path}", "video_not_found", "video_url") from None
        except OSError as e:
            raise APIError(400, f"cannot read the video: {e.strerror}", "invalid_video", "video_url") from None
        if not stat.S_ISREG(st.st_mode):
            _fail(f"{path} is not a regular file", "invalid_video", "video_url")
        if not os.access(real, os.R_OK):
            _fail(f"cannot read the video {path}: permission denied", "invalid_video", "video_url")
        return Video(real, key=content_key(real))

    def _data_url(self, url: str, raw, spans) -> Video:
        head, sep, payload = url.partition(",")
        media_type = head[5:].split(";")[0].strip().lower()
        if ";base64" not in head or not sep:
            _fail("a data URL must be base64 (data:video/mp4;base64,...)", "invalid_video_url", "video_url")
        if not (media_type.startswith(("video/", "image/"))
                or media_type in ("application/octet-stream", "")):
            _fail(f"a data URL of type {media_type!r} is not a video or a picture",
                  "invalid_video_url", "video_url")
        if payload.startswith(UPLOAD_MARK):
            start, end = spans[int(payload[len(UPLOAD_MARK):])]
            # Views of the body are released before it is closed (an mmap refuses otherwise).
            with memoryview(raw) as whole, whole[start:end] as source:
                return self._decode(source, media_type)
        # Left in the JSON (it had an escape): small, since the body limit bounds it.
        with memoryview(payload.encode("ascii", "replace")) as source:
            return self._decode(source, media_type)

    def _decode(self, source: memoryview, media_type: str) -> Video:
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
            _fail("the data URL is not valid base64", "invalid_video_url", "video_url")
        except BaseException:
            if os.path.exists(path):
                os.unlink(path)
            raise
        if size == 0:
            os.unlink(path)
            _fail("the data URL holds no data", "invalid_video", "video_url")
        return Video(path, upload=True, key=content_key(path))

    def discard(self, video: Optional[Video]) -> None:
        if video is not None and video.upload:
            try:
                os.unlink(video.path)
            except OSError:
                pass


def content_key(path: str) -> tuple:
    """What a video is, for matching held conversations: its size and sampled digest (the
    persistent cache's fingerprint, SPEC §4), never its name or modification time."""
    from sfllava_mlx.cache import sampled_digest

    try:
        return sampled_digest(path)
    except OSError as e:
        raise APIError(400, f"cannot read the video: {e.strerror}", "invalid_video", "video_url") from None

