"""`sfllava serve`'s page (design.md §7.6): `GET /` and its static files, and what the page asks
for beside design.md §7's API.

- `GET /`, `GET /page/...`: index.html, page.js, page.css, shipped in the package; no key
  (`is_public`), the host guard still applies.
- `GET /v1/sfllava/media`: the videos and pictures under the --media-dir directories, by
  extension (nothing opened); symlinks and `..` resolved, anything resolving outside left
  out. It also carries the server's defaults for the page's options and the upload limit.
- `GET /v1/sfllava/plan?path=...&recipe=...`: the visual tokens and the memory plan of
  `Engine.prepare` (nothing decoded).
- `GET /v1/sfllava/sheet?path=...&recipe=...`: the contact sheet of the frames those
  options sample — `sfllava frames --out`'s contact.png, slow frames marked, timestamps —
  as a PNG (a picture: the picture itself).

Options are the chat request's `sfllava` object, one query parameter each, read by the
request's own parsing. The work runs on the thread pool, never on the event loop nor on
the model's thread (nothing here runs the model), so streams in flight keep flowing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from sfllava_mlx.errors import UserError
from sfllava_mlx.image import PICTURE_EXTENSIONS
from sfllava_mlx.options import Options

from ..options import session_options
from .answer import request_options
from .request import ChatRequest, fail, parse_options
from .worker import user_api_error

PAGE_DIR = Path(__file__).with_name("page")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts",
                    ".mts", ".m2ts", ".wmv", ".flv", ".3gp", ".ogv")
MAX_LISTED = 5000  # a media dir may be a home directory: the list stops here
PICTURE_WIDTH = 768  # the largest picture shown in place of a contact sheet
NO_STORE = {"Cache-Control": "no-store"}


def is_public(path: str) -> bool:
    """The page and its static files: served without the key (the API calls need it)."""
    return path == "/" or path.startswith("/page/")


async def index():
    return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def media_list(request: Request):
    s = request.app.state.served
    listed = await run_in_threadpool(listing, s.media)
    return {**listed, "max_upload_bytes": s.media.max_upload_bytes,
            "defaults": page_defaults(s.worker.args)}


async def plan(request: Request):
    s = request.app.state.served
    return await run_in_threadpool(plan_json, s.worker, s.media, request.query_params)


async def sheet(request: Request):
    s = request.app.state.served
    png = await run_in_threadpool(sheet_png, s.worker, s.media, request.query_params)
    return Response(png, media_type="image/png", headers=NO_STORE)


# (method, path, endpoint); the static files are mounted at /page.
PAGE_ROUTES = [
    ("GET", "/", index),
    ("GET", "/v1/sfllava/media", media_list),
    ("GET", "/v1/sfllava/plan", plan),
    ("GET", "/v1/sfllava/sheet", sheet),
]


# ----------------------------------------------------------------------------------------
# The list


def media_kind(name: str):
    name = name.lower()
    if name.endswith(VIDEO_EXTENSIONS):
        return "video"
    return "image" if name.endswith(PICTURE_EXTENSIONS) else None


def listing(media) -> dict:
    """Every video or picture file under the media dirs (hidden names skipped), as
    {"path": relative to its dir, "url": the absolute path a request names, "kind", "size"}.
    Directories are walked through symlinks that stay inside, each real one once."""
    items, seen = [], set()
    for d in media.dirs:
        for top, dirs, files in os.walk(d, followlinks=True):
            real_top = os.path.realpath(top)
            if real_top in seen or not media.allowed(real_top):
                dirs[:] = []
                continue
            seen.add(real_top)
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            for name in sorted(files):
                kind = media_kind(name)
                if kind is None or name.startswith("."):
                    continue
                path = os.path.join(top, name)
                real = os.path.realpath(path)
                if not media.allowed(real) or not os.path.isfile(real):
                    continue
                items.append({"path": os.path.relpath(path, d), "url": path, "kind": kind,
                              "size": os.path.getsize(real)})
                if len(items) >= MAX_LISTED:
                    return {"object": "list", "data": items, "truncated": True}
    return {"object": "list", "data": items, "truncated": False}


def page_defaults(args) -> dict:
    """The server's own values of the page's options (its flags), to start the controls."""
    o = Options.of(**session_options(args))
    return {k: getattr(o, k) for k in ("recipe", "num_frames", "fps", "start", "end",
                                       "subtitles", "timestamps")}


# ----------------------------------------------------------------------------------------
# What the model sees


def query_value(text: str):
    """A query parameter as the JSON value it spells (8, 1.5, true), else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (bool, int, float)) else text


def prepare(worker, media, params):
    """The Opening (`Engine.prepare`) of `path` with the page's options over the server's."""
    path = params.get("path")
    if not path:
        fail("path is required (a video or picture inside the media directory)",
             "missing_path", "path")
    real = media.local_file(path, "path")
    options = parse_options({k: query_value(v) for k, v in params.items() if k != "path"})
    subtitles = options.get("subtitles")
    if subtitles is not None and subtitles not in ("auto", "off", "speech"):
        options["subtitles"] = media.local_file(subtitles, "sfllava.subtitles",
                                                "subtitle file", "subtitles")
    opts = request_options(worker, ChatRequest(None, None, real, [], "", options=options))
    try:
        # cache=False: no content hash nor model identity for a preview; the sampling is
        # the same (the cache only stores what it gives).
        return worker.engine.prepare(real, **{**opts, "cache": False})
    except UserError as e:
        raise user_api_error(e) from None


def plan_json(worker, media, params) -> dict:
    opening = prepare(worker, media, params)
    opening.close()  # a plan decodes nothing: the file and container are done with
    m = opening.memory
    return {"media": opening.media, "visual_tokens": m.visual_tokens,
            "num_frames": opening.sampling.num_frames if opening.sampling else None,
            "recipe": opening.options.recipe if opening.media == "video" else None,
            "context_length": worker.engine.context_length,
            "memory": {"total": m.total, "weights": m.weights, "kv_cache": m.kv_cache,
                       "working_set": m.working_set, "context_tokens": m.context_tokens,
                       "text": m.describe()}}


def sheet_png(worker, media, params) -> bytes:
    import cv2

    from sfllava_mlx.image import read_image

    from ..frames import contact_sheet

    opening = prepare(worker, media, params)
    try:
        if opening.media == "image":
            image = read_image(opening.path, opening.picture).pixels
            if image.shape[1] > PICTURE_WIDTH:
                height = round(image.shape[0] * PICTURE_WIDTH / image.shape[1])
                image = cv2.resize(image, (PICTURE_WIDTH, max(1, height)),
                                   interpolation=cv2.INTER_AREA)
        else:
            image = contact_sheet(opening.read_all())
    except UserError as e:
        raise user_api_error(e) from None
    finally:
        opening.close()  # the reader closed the container it took, not the file
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the contact sheet")
    return png.tobytes()
