"""`sfllava serve`: the HTTP side (FastAPI on uvicorn), design.md §7.

Routes: `GET /health` (no key needed, answers while a generation runs: the model works
on its own thread), `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`
(JSON or server-sent events), `GET /v1/sfllava/status` (queue, held conversations, the
last jobs). Every error is `{"error": {"message", "type", "code", "param"}}`.

A streamed answer's headers go out with its first token, so an error found while the
video is opened (unreadable, past the context) still gets its own status code. While a
request waits, its connection is watched: a client that leaves cancels its job, queued
or running.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .log import log
from .media import Body, Media, body_limit, cut_uploads
from .page import PAGE_DIR, PAGE_ROUTES, is_public
from .request import APIError, load_json, parse_chat
from .worker import Job, Worker

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
POLL_S = 0.1  # how often a waiting request looks at its connection


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def refused(e: APIError) -> JSONResponse:
    """A request refused before it reached the queue: logged as every request is."""
    log(f"refused {e.status} {e.code}: {e.message}")
    return error_response(e)


class Guard:
    """Pure ASGI middleware: the bearer key (design.md §7) and, without a key, the Host header.

    A server on loopback without a key trusts whoever can reach it, which a web page can
    do through DNS rebinding (a name of the attacker's resolving to 127.0.0.1): such
    requests carry the attacker's host name, so only loopback names are let through."""

    def __init__(self, app, api_key: Optional[str], allowed_hosts: tuple):
        self.app = app
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        error = None
        if self.key is None:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host and name not in self.allowed_hosts:
                error = APIError(403, f"host {host!r} is not allowed: without --api-key the "
                                      "server answers loopback names only", "host_not_allowed")
        elif not (scope["method"] == "GET" and (scope["path"] == "/health"
                                                or is_public(scope["path"]))):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                error = APIError(401, "a valid API key is required (Authorization: Bearer KEY)"
                                 if given else "missing API key (Authorization: Bearer KEY)",
                                 "invalid_api_key")
        if error is None:
            return await self.app(scope, receive, send)
        response = refused(error)
        if error.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


@dataclass
class Served:
    """What one app serves (`app.state.served`): the worker, the media dirs, the model's
    names, the body limit."""

    worker: Worker
    media: Media
    model_id: str
    model_arg: str
    created: int
    limit: int

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "sfllava"}


def served(request: Request) -> Served:
    return request.app.state.served


async def health():
    return {"status": "ok"}


async def models(request: Request):
    return {"object": "list", "data": [served(request).model_card()]}


async def model(request: Request, name: str):
    s = served(request)
    if name not in (s.model_id, s.model_arg):
        raise APIError(404, f"the model {name!r} does not exist: this server runs "
                            f"{s.model_id!r}", "model_not_found", "model")
    return s.model_card()


async def status(request: Request):
    s = served(request)
    return {"model": s.model_id, **s.worker.status()}


async def chat(request: Request):
    s = served(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(400, "the body must be JSON (Content-Type: application/json)",
                       "invalid_content_type")
    body = await read_body(request, s.limit, s.media)
    try:
        req, video = await run_in_threadpool(prepare, body, s.media, s.model_id, s.model_arg)
    finally:
        body.close()
    if await request.is_disconnected():
        s.media.discard(video)
        return JSONResponse({}, status_code=499)
    job = Job(req, video, asyncio.get_running_loop(),
              on_finish=lambda j: s.media.discard(j.media))
    s.worker.submit(job)
    try:
        first = await next_event(job, request)
    except BaseException:
        job.cancel()
        raise
    if first[0] == "error":
        log_job(job, first[1].status)
        return error_response(first[1])
    if first[0] == "cancelled":
        return JSONResponse({}, status_code=499)
    if req.stream:
        return JobStream(job, first, s.model_id)
    text, kind, value = [], *first
    while kind == "delta":
        text.append(value)
        kind, value = await next_event(job, request)
    if kind == "error":
        log_job(job, value.status)
        return error_response(value)
    if kind == "cancelled":
        return JSONResponse({}, status_code=499)
    log_job(job, 200, value)
    return completion(job, value, s.model_id)


async def api_error(request, e: APIError):
    return refused(e)


async def http_error(request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return refused(APIError(e.status_code, str(e.detail), code))


async def server_error(request, e: Exception):
    return error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error"))


# design.md §7's API, then the page's (design.md §7.6): (method, path, endpoint).
ROUTES = [
    ("GET", "/health", health),
    ("GET", "/v1/models", models),
    ("GET", "/v1/models/{name:path}", model),
    ("GET", "/v1/sfllava/status", status),
    ("POST", "/v1/chat/completions", chat),
    *PAGE_ROUTES,
]
ERROR_HANDLERS = [(APIError, api_error), (StarletteHTTPException, http_error),
                  (Exception, server_error)]


def create_app(worker: Worker, media: Media, *, model_id: str, model_arg: str,
               api_key: Optional[str] = None, host: str = "127.0.0.1"):
    app = FastAPI(title="sfllava", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = Served(worker, media, model_id, model_arg, int(time.time()),
                              body_limit(media.max_upload_bytes))
    for method, path, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
    app.mount("/page", StaticFiles(directory=PAGE_DIR), name="page")  # the page's files
    for kind, handler in ERROR_HANDLERS:
        app.add_exception_handler(kind, handler)
    return Guard(app, api_key, LOOPBACK_HOSTS + (host.lower(),))


# ----------------------------------------------------------------------------------------


# A body past the limit is still read, and dropped, up to this many bytes: a client that
# is still sending then reads its 413 instead of a connection reset under its feet.
DRAIN_BYTES = 256 * 2**20


async def read_body(request: Request, limit: int, media: Media) -> Body:
    """The body, refused with 413 past `limit` (a declared length is checked first: such a
    body is drained, not kept)."""
    declared = request.headers.get("content-length")
    too_big = False
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise APIError(400, "bad Content-Length", "invalid_request") from None
    body, seen = Body(media.upload_dir), 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            too_big = too_big or seen > limit
            if not too_big:
                body.add(chunk)
            elif seen > limit + DRAIN_BYTES:
                break
    except BaseException:
        body.close()
        raise
    if too_big:
        body.close()
        raise too_large(media)
    return body


def too_large(media: Media) -> APIError:
    return APIError(413, f"the request is larger than the server accepts: a video of at most "
                         f"{media.max_upload_bytes / 2**20:g} MB (--max-upload-mb)",
                    "request_too_large")


def prepare(body: Body, media: Media, model_id: str, model_arg: str):
    """On a worker thread: JSON -> ChatRequest, the model checked, the video resolved."""
    raw = body.view()
    try:
        text, spans = cut_uploads(raw)
        req = parse_chat(load_json(text))
        if req.model not in (None, "", model_id, model_arg):
            raise APIError(404, f"the model {req.model!r} does not exist: this server runs "
                                f"{model_id!r}", "model_not_found", "model")
        subtitles = req.options.get("subtitles")
        if subtitles is not None and subtitles not in ("auto", "off", "speech"):
            req.options["subtitles"] = media.local_file(subtitles, "sfllava.subtitles",
                                                        "subtitle file", "subtitles")
        video = media.resolve(req.video_url, raw, spans) if req.video_url else None
        return req, video
    finally:
        if hasattr(raw, "close"):  # an mmap of a spilled body
            try:
                raw.close()
            except BufferError:  # a view of it still alive: closed when collected
                pass


async def next_event(job: Job, request: Request):
    """The job's next event; ("cancelled", None) at once if the client goes away meanwhile
    (the job is cancelled: dropped from the queue, or stopped before its next token).
    The connection is looked at every POLL_S, however fast the events come."""
    while True:
        now = time.monotonic()
        if now - job.watched >= POLL_S:
            job.watched = now
            if await request.is_disconnected():
                job.cancel()
                return "cancelled", None
        try:
            return await asyncio.wait_for(job.events.get(), POLL_S)
        except asyncio.TimeoutError:
            pass


def usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": result["cached_tokens"]}}


def completion(job: Job, result: dict, model_id: str) -> dict:
    return {"id": job.id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "logprobs": None, "finish_reason": result["finish_reason"]}],
            "usage": usage(result), "system_fingerprint": None, "sfllava": result["record"]}


def chunk(job: Job, model_id: str, delta: dict, finish_reason=None, **extra) -> bytes:
    obj = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()),
           "model": model_id, "system_fingerprint": None,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
           **extra}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class JobStream(StreamingResponse):
    """Streams a job's events; however the response ends, the job ends with it."""

    def __init__(self, job: Job, first, model_id: str):
        super().__init__(events(job, first, model_id), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # a no-op once the job is over; stops it when the client left


async def events(job: Job, first, model_id: str):
    """Server-sent events: the role, the text as it comes, the end with usage, [DONE]."""
    try:
        yield chunk(job, model_id, {"role": "assistant", "content": ""})
        kind, value = first
        while True:
            if kind == "delta":
                parts, following = [value], None
                while following is None and not job.events.empty():  # what piled up: one chunk
                    following = job.events.get_nowait()
                    if following[0] == "delta":
                        parts.append(following[1])
                        following = None
                yield chunk(job, model_id, {"content": "".join(parts)})
                kind, value = following or await job.events.get()
                continue
            if kind == "done":
                log_job(job, 200, value)
                yield chunk(job, model_id, {}, value["finish_reason"], usage=usage(value),
                            sfllava=value["record"])
                yield b"data: [DONE]\n\n"
            elif kind == "error":
                log_job(job, value.status)
                yield b"data: " + json.dumps(value.body()).encode() + b"\n\n"
            return
    finally:
        job.cancel()


def log_job(job: Job, status: int, result: Optional[dict] = None) -> None:
    if result is None:
        log(f"{job.id} {status} after {time.perf_counter() - job.enqueued:.2f}s")
        return
    r = result["record"]
    log(f"{job.id} {status} cache={r['cache']} prefilled={r['prompt_tokens']} "
        f"tokens={result['completion_tokens']} ttft={r['timings_s']['ttft']:.3f}s "
        f"queue={r['timings_s'].get('queue', 0):.3f}s")
