"""`sfllava serve`: what a request asks for (design.md §7), checked before it joins the queue —
the Chat Completions shape, one conversation about at most one video or picture, and the
`sfllava` object of per-request options."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ConfigDict, ValidationError, create_model, field_validator, model_validator

from sfllava_mlx.errors import UserError
from sfllava_mlx.frames.part import Part
from sfllava_mlx.options import SPECS, OptionError, check

VIDEO_PART_TYPES = ("video_url", "video")
IMAGE_PART_TYPES = ("image_url",)
ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An error answered as design.md §7's JSON: {"error": {"message", "type", "code"}}."""

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


def fail(message: str, code: str = "invalid_request", param: Optional[str] = None):
    raise APIError(400, message, code, param)


def _text_of(content, where: str) -> tuple[str, list]:
    """(text, [(kind, url)] of its videos and pictures) of a message's content: a string or
    a list of parts."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        fail(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts, videos = [], []
    for j, part in enumerate(content):
        p = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            fail(f"{p} must be an object with a type", param=p)
        kind = part["type"]
        if kind in ("text", "input_text"):
            if not isinstance(part.get("text"), str):
                fail(f"{p}.text must be a string", param=p)
            texts.append(part["text"])
        elif kind in VIDEO_PART_TYPES + IMAGE_PART_TYPES:
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                fail(f'{p} needs {{"{kind}": {{"url": ...}}}}', param=p)
            videos.append(("image" if kind in IMAGE_PART_TYPES else "video", url))
        else:
            fail(f"{p}: unsupported content part type {kind!r} (text, video_url, image_url)",
                  "unsupported_content", p)
    return "\n".join(texts), videos


def _option(body: dict, field: str, name: str):
    """An OpenAI field that is one of our options (`temperature` is `temp`), checked by the
    option's rule and named as the request names it."""
    value = body.get(field)
    if value is None:
        return None
    try:
        return check(name, value, field)
    except OptionError as e:
        fail(str(e), "invalid_value", field)


def parse_chat(body) -> ChatRequest:
    """The JSON body -> ChatRequest, or APIError(400) saying what is wrong."""
    if not isinstance(body, dict):
        fail("the request body must be a JSON object")
    messages = body.get("messages")
    if messages is None:
        fail("messages is required", "missing_messages", "messages")
    if not isinstance(messages, list) or not messages:
        fail("messages must be a non-empty list", "invalid_messages", "messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        fail("model must be a string", param="model")
    n = body.get("n")
    if n not in (None, 1):
        fail("only n = 1 is supported", "unsupported_parameter", "n")
    if body.get("tools") or body.get("functions"):
        fail("tools are not supported", "unsupported_parameter", "tools")
    stop = body.get("stop")
    if stop not in (None, [], ""):
        fail("stop sequences are not supported", "unsupported_parameter", "stop")

    system, turns, videos = None, [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            fail(f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in ROLES:
            fail(f"{where}.role must be one of {', '.join(ROLES)}", "invalid_role", f"{where}.role")
        text, urls = _text_of(m.get("content"), where)
        if urls and role != "user":
            fail(f"{where}: a video goes in a user message", "invalid_video_position", where)
        if role in ("system", "developer"):
            if turns:
                fail("a system message must come before the conversation", "invalid_messages", where)
            system = text if system is None else system + "\n" + text
            continue
        if urls and turns:
            fail("the video must be in the first user message", "invalid_video_position", where)
        videos += urls
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            fail(f"{where}: expected a {expected} message (user and assistant alternate, "
                  "ending with a user message)", "invalid_messages", where)
        turns.append(text)
    if len(videos) > 1:
        fail("at most one video (or picture) per conversation (design.md §7)", "too_many_videos",
              "messages")
    if not turns or len(turns) % 2 == 0:
        fail("the last message must be a user message", "invalid_messages", "messages")

    max_tokens = _option(body, "max_completion_tokens", "max_tokens")
    if max_tokens is None:
        max_tokens = _option(body, "max_tokens", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        fail("stream must be a boolean", param="stream")
    options = body.get("sfllava") or {}
    if not isinstance(options, dict):
        fail("sfllava must be an object", param="sfllava")
    return ChatRequest(
        model=model, system=system, video_url=videos[0][1] if videos else None,
        media=videos[0][0] if videos else "video",
        history=[(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)],
        question=turns[-1], stream=bool(stream), max_tokens=max_tokens,
        temperature=_option(body, "temperature", "temp"),
        top_p=_option(body, "top_p", "top_p"),
        seed=_option(body, "seed", "seed"),
        options=parse_options(options))


def _checked(name: str):
    def validate(cls, value):
        return None if value is None else check(name, value, f"sfllava.{name}")

    return field_validator(name, mode="before")(validate)


def _part(model):
    Part.of(model.start, model.end, names=("sfllava.start", "sfllava.end"))  # start < end
    return model


# The `sfllava` object (design.md §7): the options the schema marks for the server, each checked
# by its own rule (an OptionError passes through pydantic as it is: one line, named).
SERVER_OPTIONS = tuple(n for n, s in SPECS.items() if s.server)
SfllavaOptions = create_model(
    "SfllavaOptions", __config__=ConfigDict(extra="forbid"),
    __validators__={**{f"check_{n}": _checked(n) for n in SERVER_OPTIONS},
                    "check_part": model_validator(mode="after")(_part)},
    **{n: (Optional[Any], None) for n in SERVER_OPTIONS})


def parse_options(o: dict) -> dict:
    """The `sfllava` object -> the options it gives (None left out), or APIError(400)."""
    try:
        return SfllavaOptions.model_validate(o).model_dump(exclude_none=True)
    except OptionError as e:
        fail(str(e), "invalid_value", e.label)
    except UserError as e:  # a part's own words (a time, start before end), name first
        fail(str(e), "invalid_value", str(e).split()[0])
    except ValidationError as e:
        unknown = sorted(str(err["loc"][0]) for err in e.errors() if err["type"] == "extra_forbidden")
        if unknown:
            fail(f"unknown sfllava option(s): {', '.join(unknown)} (known: "
                 f"{', '.join(SERVER_OPTIONS)})", "unsupported_parameter", "sfllava")
        fail(f"sfllava: {e.errors()[0]['msg']}", "invalid_value", "sfllava")


def load_json(text: bytes):
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", "invalid_json") from None
