"""`sfllava serve`: the model's one worker thread, its queue and the held conversations.

All MLX work runs on one thread. Jobs arrive on a FIFO queue; up to --decode-concurrency
of them are admitted at a time, first come first served, each a `Task`: its request's
work as bounded steps (`answer.py`), a generator. The thread goes round the tasks: every
answer that is decoding takes its next token (those in `sfllava_mlx.batching`'s batch all
come from one decode step, taken once a round), and one task still opening takes its next
step (a frame batch through the tower, a prefill chunk), so streams already running keep
flowing while a new video is encoded. With --decode-concurrency 1 one answer runs at a
time, decoded alone.

A job reports to its request through an asyncio queue (events `delta`, then `done`,
`error` or `cancelled`); a request whose client went away sets `job.cancelled`, which the
thread looks at before every step of its task: its task is closed there (its sequence
leaves the batch, the others go on). A job cancelled while it waits is dropped when its
turn comes.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from sfllava_mlx.errors import ContextOverflowError, UserError, VideoError

from ..options import engine_options
from .held import HeldConversations
from .log import log
from .media import MediaFile
from .request import APIError, ChatRequest

IDLE_WAIT_S = 0.01  # a round with nothing to do waits this long on a frame (or a new job)


def user_api_error(e: Exception, upload: Optional[str] = None) -> Optional[APIError]:
    """design.md §7's answer to an error the user caused (None for a bug). `upload`: the path
    of an uploaded video, named in messages as "the uploaded video", not by its file."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), "context_length_exceeded", "messages")
    if isinstance(e, VideoError):
        message = str(e) if upload is None else str(e).replace(upload, "the uploaded video")
        return APIError(400, message, "invalid_video", "video_url")
    if isinstance(e, UserError):
        return APIError(400, str(e), "invalid_request")
    return None


class JobCancelled(Exception):
    """Its client left."""


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


@dataclass
class Task:
    """An admitted job and its steps (answer.py)."""

    job: Job
    start: float  # when it was admitted: its time to first token counts from here
    steps: object = None  # the generator of its steps
    phase: str = "open"  # "open" until its answer decodes, then "decode"
    wait: Optional[object] = None  # what its last step waits for (a frame), if anything
    held: Optional[object] = None  # its Held conversation, once found or opened
    starts: int = 0  # bytes of the KV cache its answer starts from
    answer: int = 0  # bytes of its answer's own KV cache in the batch (0: decodes in place)
    working_set: int = 0  # bytes of its open's largest step (tower batch, prefill chunk)


class Worker:
    def __init__(self, args):
        self.args = args  # the server's flags: each request's defaults
        self.concurrency = args.decode_concurrency
        self.engine = None
        self.decoder = None  # a batching.Decoder when answers decode together
        self.held = HeldConversations(args.max_conversations)
        self._queue: queue.Queue[Optional[Job]] = queue.Queue()
        self.waiting: deque[Job] = deque()  # not admitted yet, first come first served
        self.tasks: list[Task] = []
        self.unsaved: list = []  # sessions whose cache entry is written once nobody decodes
        self._ready = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sfllava-model", daemon=True)
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "tokens": 0,
                      "decoding_peak": 0}  # the most answers decoding at once
        self.recent: list = []  # the last jobs, for /v1/sfllava/status

    # -- life ----------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model on the worker thread; raise what loading raised."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self, timeout: float = 10.0) -> None:
        for job in list(self._queue.queue) + list(self.waiting):
            if job is not None:
                job.cancel()
        for task in list(self.tasks):
            task.job.cancel()
        self._stopping = True
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        job.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.stats["requests"] += 1
        self._queue.put(job)

    def status(self) -> dict:
        tasks = list(self.tasks)
        return {"busy": bool(tasks), "queued": self._queue.qsize() + len(self.waiting),
                "running": len(tasks), "decoding": sum(t.phase == "decode" for t in tasks),
                "decode_concurrency": self.concurrency,
                "held_conversations": len(self.held), **self.stats, "recent": list(self.recent)}

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            from sfllava_mlx import Engine
            from sfllava_mlx.batching import Decoder

            self.engine = Engine(self.args.model, **engine_options(self.args))
            if self.concurrency > 1:
                self.decoder = Decoder(self.engine.model, self.engine.tokenizer,
                                       self.concurrency)
        except BaseException as e:  # noqa: BLE001  (reported by start())
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stopping:
                self._take_jobs(block=not self.tasks and not self.waiting)
                self._admit()
                if not self._round() and self.tasks:
                    self._idle()
                if not any(t.phase == "decode" for t in self.tasks):
                    self._save()
        finally:
            for task in list(self.tasks):
                task.steps.close()
            if self.decoder is not None:
                self.decoder.close()

    def _take_jobs(self, block: bool) -> None:
        try:
            job = self._queue.get() if block else self._queue.get_nowait()
            while True:
                if job is None:
                    self._stopping = True
                    return
                self.waiting.append(job)
                job = self._queue.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        """Admit waiting jobs, first come first served, while fewer than N run."""
        from .answer import answer_steps

        while self.waiting and len(self.tasks) < self.concurrency:
            job = self.waiting.popleft()
            if job.cancelled.is_set():  # its client left while it waited
                self._end(job, "cancelled")
                continue
            if not self.tasks:  # alone now: its peak memory is its own
                import mlx.core as mx

                mx.reset_peak_memory()
            task = Task(job, time.perf_counter())
            task.steps = answer_steps(self, task)
            job.state = "running"
            self.tasks.append(task)

    def _round(self) -> bool:
        """A step of every decoding task and of the first task still opening, then the
        batch's decode step; False when none of them could do anything."""
        worked = False
        opener = next((t for t in self.tasks if t.phase == "open"), None)
        for task in list(self.tasks):
            if not task.job.cancelled.is_set():
                if task.phase == "open" and task is not opener:
                    continue  # one video opens at a time, the others wait their turn
                if task.wait is not None and not task.wait(0):
                    continue
            worked = True
            self._step(task)
        if self.decoder is not None:
            worked = self.decoder.step() or worked
        decoding = sum(t.phase == "decode" for t in self.tasks)
        self.stats["decoding_peak"] = max(self.stats["decoding_peak"], decoding)
        return worked

    def _idle(self) -> None:
        """Nothing could run: wait a little for what the tasks wait on (a decoded frame)."""
        waits = [t.wait for t in self.tasks if t.wait is not None]
        if waits:
            waits[0](IDLE_WAIT_S)
        else:
            time.sleep(IDLE_WAIT_S)

    def _step(self, task: Task) -> None:
        job = task.job
        try:
            if job.cancelled.is_set():
                raise JobCancelled()
            pause = next(task.steps)
            task.wait = pause if callable(pause) else None
            return
        except StopIteration as done:
            result = done.value  # None: its client left during its answer
        except JobCancelled:
            task.steps.close()
            result = None
        except Exception as e:  # noqa: BLE001  answered as JSON; the server goes on
            self._finished(task)
            self._failed(job, self._api_error(job, e))
            return
        self._finished(task)
        if result is None:
            self._end(job, "cancelled")
        else:
            self.stats["completed"] += 1
            self._end(job, "done", result)
        if task.held is not None:
            self.unsaved.append(task.held.session)  # written once nobody waits for a token

    def _finished(self, task: Task) -> None:
        self.tasks.remove(task)
        if task.held is not None:
            task.held.busy = False

    def _end(self, job: Job, state: str, result=None) -> None:
        job.state = state
        if state == "cancelled":
            self.stats["cancelled"] += 1
            job.emit("cancelled")
        else:
            job.emit(state, result)
        self._remember(job)

    def _save(self) -> None:
        while self.unsaved:
            self.unsaved.pop().save()  # a no-op once saved

    def _remember(self, job: Job) -> None:
        self.recent.append({"id": job.id, "state": job.state, "tokens": job.generated,
                            "tokens_after_cancel": job.after_cancel})
        del self.recent[:-16]
        if job.on_finish is not None:
            try:
                job.on_finish(job)
            except Exception:  # noqa: BLE001
                traceback.print_exc()

    def _api_error(self, job: Job, e: Exception) -> APIError:
        upload = job.media.path if job.media is not None and job.media.upload else None
        error = user_api_error(e, upload)
        if error is not None:
            return error
        traceback.print_exc()  # a bug: this request fails, the server goes on
        if not self.tasks:
            self.held.clear()  # a conversation may be half-updated: trust none
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    def _failed(self, job: Job, error: APIError) -> None:
        self.stats["errors"] += 1
        self._end(job, "error", error)

    # -- memory ----------------------------------------------------------------------------
    @property
    def weights(self) -> int:
        from sfllava_mlx.memory import weight_bytes

        if self._weights is None:
            self._weights = weight_bytes(self.engine.model)
        return self._weights

    _weights: Optional[int] = None

    def fits(self, task: Task) -> bool:
        """Whether `task`'s answer fits beside the running ones and the idle held
        conversations (design.md §7): every sequence's KV cache counts, in the batch and where it
        starts from. Where it does not, idle conversations are dropped, least recently used
        first, before it waits. Alone, it fits (a request that cannot fit alone was refused
        when it was prepared)."""
        from sfllava_mlx.memory import batch_bytes, fits

        tasks = [t for t in self.tasks if t is not task and (t.starts or t.answer)] + [task]
        while True:
            idle = self.held.idle(keep=task.held)
            if len(tasks) == 1 and not idle:
                return True
            held = sum(self.held_bytes(h) for h in idle)
            if fits(batch_bytes(self.weights, max(t.working_set for t in tasks),
                                sum(t.starts for t in tasks) + held, [t.answer for t in tasks])):
                return True
            if not idle:
                return False
            self.held.drop(idle[0])
            log(f"{task.job.id} dropped an idle held conversation ({idle[0].session.path}, "
                f"{idle[0].session.conversation.offset} tokens) to make room")

    def held_bytes(self, held) -> int:
        from sfllava_mlx.memory import kv_bytes

        conversation = held.session.conversation
        return kv_bytes(self.engine.model, conversation.offset, held.session.options.kv_bits)
