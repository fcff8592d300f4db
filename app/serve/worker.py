"""`sfllava serve`: the model's one worker thread, its queue and the held conversations.

All MLX work runs on one thread, which takes jobs from a FIFO queue: one generation at a
time, first come first served. A job reports to its request through an asyncio queue
(events `delta`, then `done`, `error` or `cancelled`); a request whose client went away
sets `job.cancelled`, which every stage that takes time (frames, tower, prefill chunks,
tokens) looks at, so a client that leaves frees the model at the next such step.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Optional

from sfllava_mlx.errors import ContextOverflowError, UserError, VideoError
from sfllava_mlx.options import Options

from ..options import session_options
from .held import Held, HeldConversations
from .media import MediaFile
from .request import APIError, ChatRequest


class JobCancelled(Exception):
    """Raised from a progress callback: the client left while its video was opened."""


@dataclass
class Job:
    req: ChatRequest
    media: Optional[MediaFile]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    id: str = ""
    state: str = "queued"  # queued, running, done, cancelled, error
    generated: int = 0  # answer tokens written
    after_cancel: int = 0  # of which written after the client had gone
    on_finish: Optional[object] = None  # called on the worker once the job is over
    watched: float = 0.0  # when its client's connection was last looked at

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    def __init__(self, args):
        self.args = args  # the server's flags: each request's defaults
        self.engine = None
        self.held = HeldConversations(args.max_conversations)
        self._queue: queue.Queue[Optional[Job]] = queue.Queue()
        self._ready = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="sfllava-model", daemon=True)
        self.running: Optional[Job] = None
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "tokens": 0}
        self.recent: list = []  # the last jobs, for /v1/sfllava/status

    # -- life ----------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model on the worker thread; raise what loading raised."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self, timeout: float = 10.0) -> None:
        for job in list(self._queue.queue):
            if job is not None:
                job.cancel()
        if self.running is not None:
            self.running.cancel()
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        job.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.stats["requests"] += 1
        self._queue.put(job)

    def status(self) -> dict:
        return {"busy": self.running is not None, "queued": self._queue.qsize(),
                "held_conversations": len(self.held), **self.stats,
                "recent": list(self.recent)}

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            from sfllava_mlx import Engine

            self.engine = Engine(self.args.model)
        except BaseException as e:  # noqa: BLE001  (reported by start())
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._queue.get()
            if job is None:
                return
            self.running = job
            try:
                self._serve(job)
            finally:
                self.running = None
                self._remember(job)
                if job.on_finish is not None:
                    try:
                        job.on_finish(job)
                    except Exception:  # noqa: BLE001
                        traceback.print_exc()

    def _remember(self, job: Job) -> None:
        self.recent.append({"id": job.id, "state": job.state, "tokens": job.generated,
                            "tokens_after_cancel": job.after_cancel})
        del self.recent[:-16]

    def _serve(self, job: Job) -> None:
        import mlx.core as mx

        start = time.perf_counter()
        held = result = None
        job.state = "running"
        try:
            if job.cancelled.is_set():  # its client left while it waited
                raise JobCancelled()
            mx.reset_peak_memory()
            held, result = self._answer(job, start)
        except JobCancelled:
            pass
        except Exception as e:  # noqa: BLE001  answered as JSON; the server goes on
            self._failed(job, self._api_error(job, e))
            return
        if result is None:
            job.state = "cancelled"
            self.stats["cancelled"] += 1
            job.emit("cancelled")
        else:
            job.state = "done"
            self.stats["completed"] += 1
            job.emit("done", result)
        if held is not None:
            held.session.save()  # after the answer: nobody waits for it (a no-op once saved)

    def _api_error(self, job: Job, e: Exception) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, ContextOverflowError):
            return APIError(400, str(e), "context_length_exceeded", "messages")
        if isinstance(e, VideoError):
            message = str(e)
            if job.media is not None and job.media.upload:  # not the server's file names
                message = message.replace(job.media.path, "the uploaded video")
            return APIError(400, message, "invalid_video", "video_url")
        if isinstance(e, UserError):
            return APIError(400, str(e), "invalid_request")
        traceback.print_exc()  # a bug: this request fails, the server goes on
        self.held.clear()  # a conversation may be half-updated: trust none
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    def _failed(self, job: Job, error: APIError) -> None:
        job.state = "error"
        self.stats["errors"] += 1
        job.emit("error", error)

    # -- a request -----------------------------------------------------------------------
    def _options(self, req: ChatRequest) -> dict:
        """The Session options: the server's flags with the request's over them."""
        opts = {**session_options(self.args), **req.options}
        if req.system is not None:
            opts["system_prompt"] = req.system
        if req.max_tokens:
            opts["max_tokens"] = req.max_tokens
        return opts

    def _ask_options(self, req: ChatRequest, options: dict) -> dict:
        a = self.args
        return dict(max_tokens=options["max_tokens"],
                    temp=a.temp if req.temperature is None else req.temperature,
                    top_p=a.top_p if req.top_p is None else req.top_p,
                    seed=a.seed if req.seed is None else req.seed)

    def _answer(self, job: Job, start: float):
        req = job.req
        if job.media is None:
            raise APIError(400, "a video is required: put a video_url part in the first user "
                                "message", "missing_video", "messages")
        options = self._options(req)
        key = (job.media.key, Options.of(**options).prefix_identity())

        def progress(stage, done, total):  # between frame batches and prefill chunks
            if job.cancelled.is_set():
                raise JobCancelled()

        held = self.held.find(key, req.history)
        cache_state = "held"
        if held is None:
            if not job.media.upload and os.path.realpath(job.media.path) != job.media.path:
                raise APIError(403, "the video's path changed since it was checked",
                               "path_not_allowed", "video_url")
            session = self.engine.open(job.media.path, progress=progress, **options)
            for warning in session.warnings:
                log(f"{job.id} warning: {warning}")
            held = self.held.hold(Held(key, session))
            cache_state = session.cache
        replayed, tic = 0, time.perf_counter()
        for question, answer in req.history[len(held.pairs):]:
            replayed += self.held.replay(held, question, answer, self.engine.tokenizer, progress)
        replay_s = time.perf_counter() - tic

        session = held.session
        turns_before = len(session.turns)
        stream = session.ask(req.question, start_time=start, progress=progress,
                             **self._ask_options(req, options))
        try:
            for chunk in stream:
                if job.cancelled.is_set():  # its client left: this token is the last computed
                    job.after_cancel += 1
                    break
                if chunk.finish_reason != "stop":
                    job.generated += 1
                    self.stats["tokens"] += 1
                if chunk.text and job.req.stream:  # a whole answer is sent once, with "done"
                    job.emit("delta", chunk.text)
        finally:
            stream.close()  # the conversation's clean-up: a stopped answer stays, rewound
            turn = session.last_turn
            if len(session.turns) > turns_before:
                held.answered(req.question, turn.text)
                self.held.written(turn.text, turn.tokens)
        if job.cancelled.is_set():
            return held, None
        record = session.record()
        record["cache"] = cache_state
        if replayed:
            record["prompt_tokens"] += replayed
            record["timings_s"]["prefill"] = round(record["timings_s"]["prefill"] + replay_s, 6)
        record["timings_s"]["queue"] = round(start - job.enqueued, 6)
        total = session.conversation.offset - len(turn.tokens)
        return held, {"record": record, "text": turn.text, "finish_reason": turn.finish_reason,
                      "prompt_tokens": total, "completion_tokens": len(turn.tokens),
                      "cached_tokens": max(0, total - record["prompt_tokens"])}


def log(message: str) -> None:
    print(f"sfllava serve: {message}", file=sys.stderr, flush=True)
