"""`sfllava serve`, part 2: the model's one worker thread and the conversations it holds.

All MLX work runs on one thread, which takes jobs from a FIFO queue: one generation at a
time, first come first served. A job reports to its request through an asyncio queue
(events `delta`, then `done`, `error` or `cancelled`); a request whose client went away
sets `job.cancelled`, which the worker checks before each token.

Conversations stay in memory (the `--max-conversations` most recently used): each is an
open video (runner.OpenedVideo), its KV cache and the (question, answer) pairs it holds.
A request whose messages start with a held conversation's pairs continues it, so only its
new tokens are prefilled; one that branches off earlier (a regenerated or edited answer,
or a new conversation about the same video) gets a copy of the KV cache cut back to where
they part. Turns it does not hold are prefilled from the request ("replayed"): an answer
the server wrote with the tokens it wrote (remembered by text), any other by its text.
Every stage that takes time (frames, tower, prefill chunks, tokens) looks at the job's
cancel flag, so a client that leaves frees the model at the next such step.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Optional

from sfllava_mlx.errors import ContextOverflowError, UserError, VideoError
from sfllava_mlx.generate import Conversation

from . import runner
from .serve_request import APIError, ChatRequest, Video


class JobCancelled(Exception):
    """Raised from a progress callback: the client left while its video was opened."""


@dataclass
class Job:
    req: ChatRequest
    video: Optional[Video]
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
class Held:
    """A conversation the server holds: its state after every turn it has seen."""

    key: tuple  # (video content, system prompt, sampling): what its prefix depends on
    conv: object  # sfllava_mlx.generate.Conversation
    visual: object
    video: Optional[runner.OpenedVideo] = None  # the opened video (None for a branch)
    recipe: Optional[str] = None  # what the turn records say it was opened with
    pairs: list = field(default_factory=list)  # [(question, answer text)]
    ends: list = field(default_factory=list)  # KV offset after each pair


def same_answer(held: str, given: str) -> bool:
    return held == given or held.strip() == given.strip()


class Engine:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.max_held = max(1, getattr(args, "max_conversations", 4) or 1)
        self.model = self.tokenizer = None
        self.held: "OrderedDict[int, Held]" = OrderedDict()
        # The tokens of answers this server wrote, by their text: a turn replayed after its
        # conversation was dropped gets the model's own tokens back (text -> tokens is not
        # one-to-one: an answer can split a character, or a word, unlike the tokenizer).
        self.answers: "OrderedDict[str, list]" = OrderedDict()
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._ready = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="sfllava-model", daemon=True)
        self.running: Optional[Job] = None
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0,
                      "tokens": 0}
        self.recent: list = []  # the last jobs, for /v1/sfllava/status
        self.store = None
        self._record_takes_recipe = "recipe" in inspect.signature(runner.turn_record).parameters

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

    # -- the worker ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.model, self.tokenizer = runner.load_model(self.args)
            from sfllava_mlx import cache as vcache

            self.store = None if getattr(self.args, "no_cache", False) else vcache.VideoCache()
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
        start = time.perf_counter()
        held = result = None
        job.state = "running"
        try:
            if job.cancelled.is_set():  # its client left while it waited
                raise JobCancelled()
            runner.reset_peak_memory()
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
        if held is not None and held.video is not None:
            held.video.save()  # after the answer: nobody waits for it (a no-op once saved)

    def _api_error(self, job: Job, e: Exception) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, ContextOverflowError):
            return APIError(400, str(e), "context_length_exceeded", "messages")
        if isinstance(e, VideoError):
            message = str(e)
            if job.video is not None and job.video.upload:  # not the server's file names
                message = message.replace(job.video.path, "the uploaded video")
            return APIError(400, message, "invalid_video", "video_url")
        if isinstance(e, UserError):
            return APIError(400, str(e), "invalid_request")
        traceback.print_exc()  # a bug: this request fails, the server goes on
        self._drop_all()  # a conversation may be half-updated: trust none
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    def _failed(self, job: Job, error: APIError) -> None:
        job.state = "error"
        self.stats["errors"] += 1
        job.emit("error", error)

    def _drop_all(self) -> None:
        self.held.clear()

    # -- a request -----------------------------------------------------------------------
    def _options(self, req: ChatRequest) -> argparse.Namespace:
        """The server's options with the request's over them, as runner expects them."""
        o = req.options
        supported = {"fps": hasattr(runner, "video_sampling"),
                     "timestamps": "timestamps" in inspect.signature(Conversation).parameters}
        for name, ok in supported.items():
            if o.get(name) and not ok:
                raise APIError(400, f"sfllava.{name} is not supported yet", "unsupported_parameter",
                               f"sfllava.{name}")
        ns = argparse.Namespace(**vars(self.args))
        if req.system is not None:
            ns.system_prompt = req.system
        ns.seek = o.get("seek", getattr(self.args, "seek", "exact"))
        ns.recipe = o.get("recipe", getattr(self.args, "recipe", None))
        ns.num_frames = o.get("num_frames", getattr(self.args, "num_frames", None))
        ns.fps = o.get("fps", getattr(self.args, "fps", None))
        ns.timestamps = o.get("timestamps", getattr(self.args, "timestamps", False))
        ns.max_tokens = req.max_tokens or self.args.max_tokens
        ns.temp = self.args.temp if req.temperature is None else req.temperature
        ns.top_p = self.args.top_p if req.top_p is None else req.top_p
        ns.seed = self.args.seed if req.seed is None else req.seed
        return ns

    def _configure(self, ns: argparse.Namespace) -> None:
        """This request's frame sampling (recipe, --num-frames): under the one worker."""
        configure = getattr(runner, "configure_sampling", None)
        if configure is not None:
            configure(self.model, ns.recipe, ns.num_frames)
            return
        if ns.recipe not in (None, "native"):
            raise APIError(400, "sfllava.recipe is not supported yet", "unsupported_parameter",
                           "sfllava.recipe")
        if not hasattr(self, "_default_frames"):
            self._default_frames = self.model.config.sampling.num_frames
        self.model.config.sampling.num_frames = ns.num_frames or self._default_frames

    def _key(self, job: Job, ns) -> tuple:
        system = ns.system_prompt or self.model.config.prompt.system_prompt
        sampling = tuple(sorted(asdict(self.model.config.sampling).items()))
        return (job.video.key, system, sampling, ns.seek, ns.fps, bool(ns.timestamps),
                getattr(ns, "kv_bits", None))

    def _answer(self, job: Job, start: float):
        req = job.req
        if job.video is None:
            raise APIError(400, "a video is required: put a video_url part in the first user "
                                "message", "missing_video", "messages")
        ns = self._options(req)
        self._configure(ns)
        key = self._key(job, ns)

        def progress(stage, done, total):  # between frame batches and prefill chunks
            if job.cancelled.is_set():
                raise JobCancelled()

        held, cache_state = self._continue(key, req.history)
        if held is None:
            if not job.video.upload and os.path.realpath(job.video.path) != job.video.path:
                raise APIError(403, "the video's path changed since it was checked",
                               "path_not_allowed", "video_url")
            video = self._open(job, ns, progress)
            recipe = getattr(self.model.config, "recipe", ns.recipe)
            if hasattr(runner, "media_recipe"):
                recipe = runner.media_recipe(video, ns)
            held = Held(key, video.conv, video.visual, video, recipe=recipe)
            cache_state = video.cache
            self._hold(held)
        todo = req.history[len(held.pairs):]
        if todo and not held.conv.prefix_done:
            held.conv.prefill_prefix(lambda d, t: progress("prefill", d, t))  # reported with the answer
        replayed, tic = 0, time.perf_counter()
        for question, answer in todo:
            replayed += self._replay(held, question, answer, progress)
        replay_s = time.perf_counter() - tic

        conv = held.conv
        opts = runner.ask_options(ns)
        if held.video is not None and held.video.conv is conv:
            stream = held.video.ask(req.question, start_time=start, progress=progress, **opts)
        else:
            stream = conv.ask(req.question, start_time=start,
                              progress=lambda d, t: progress("prefill", d, t), **opts)
        turns_before = len(conv.turns)
        try:
            for r in stream:
                if job.cancelled.is_set():  # its client left: this token is the last computed
                    job.after_cancel += 1
                    break
                if r.finish_reason != "stop":
                    job.generated += 1
                    self.stats["tokens"] += 1
                if r.text and job.req.stream:  # a whole answer is sent once, with "done"
                    job.emit("delta", r.text)
        finally:
            stream.close()  # the conversation's clean-up: a stopped answer stays, rewound
            turn = conv.last_turn
            if len(conv.turns) > turns_before and turn is not None and turn.question == req.question:
                held.pairs.append((req.question, turn.text))
                held.ends.append(conv.offset)
                self._written(turn.text, turn.tokens)
        if job.cancelled.is_set():
            return held, None
        record = self._record(turn, held, cache_state, ns)
        if replayed:
            record["prompt_tokens"] += replayed
            record["timings_s"]["prefill"] = round(record["timings_s"]["prefill"] + replay_s, 6)
        record["timings_s"]["queue"] = round(start - job.enqueued, 6)
        total = conv.offset - len(turn.tokens)
        return held, {"record": record, "text": turn.text, "finish_reason": turn.finish_reason,
                      "prompt_tokens": total, "completion_tokens": len(turn.tokens),
                      "cached_tokens": max(0, total - record["prompt_tokens"])}

    def _open(self, job: Job, ns, progress):
        """The video (or picture: SPEC §2.11, recognised by its content) -> OpenedVideo."""
        open_media = getattr(runner, "open_media", None)
        if open_media is not None:
            return open_media(self.model, self.tokenizer, job.video.path, ns, progress, store=self.store)
        if job.req.media == "image":
            raise APIError(400, "pictures are not supported yet: send a video_url part",
                           "unsupported_content", "messages")
        return runner.open_video(self.model, self.tokenizer, job.video.path, ns, progress,
                                 store=self.store)

    def _record(self, turn, held: Held, cache_state: str, ns) -> dict:
        recipe = held.recipe
        if self._record_takes_recipe:
            return runner.turn_record(turn, held.visual, cache_state, recipe)
        record = runner.turn_record(turn, held.visual, cache_state)
        record.setdefault("recipe", recipe)
        return record

    # -- held conversations ---------------------------------------------------------------
    def _written(self, text: str, tokens: list, keep: int = 1024) -> None:
        for t in {text, text.strip()} - {""}:
            self.answers[t] = list(tokens)
            self.answers.move_to_end(t)
        while len(self.answers) > keep:
            self.answers.popitem(last=False)

    def _hold(self, held: Held) -> None:
        self.held[id(held)] = held
        self.held.move_to_end(id(held))
        while len(self.held) > self.max_held:
            self.held.popitem(last=False)

    def _continue(self, key: tuple, history: list):
        """(Held to answer in, "held") for the conversation sharing the longest start with
        `history`, continued or branched off; (None, None) when none is about this video."""
        best, best_k = None, -1
        for held in reversed(self.held.values()):  # most recent first
            if held.key != key:
                continue
            k = 0
            while (k < len(held.pairs) and k < len(history)
                   and held.pairs[k][0] == history[k][0] and same_answer(held.pairs[k][1], history[k][1])):
                k += 1
            whole = k == len(held.pairs)
            if k > best_k or (k == best_k and whole and len(best.pairs) != best_k):
                best, best_k = held, k
        if best is None:
            return None, None
        if best_k == len(best.pairs):
            self._hold(best)  # most recently used
            return best, "held"
        branch = self._branch(best, best_k)
        if branch is None:
            return None, None
        self._hold(branch)
        return branch, "held"

    def _branch(self, held: Held, k: int) -> Optional[Held]:
        """A new conversation holding `held`'s first k pairs (a copy of its KV cache up to
        there), or None when its cache cannot be copied (quantized or rotating)."""
        from mlx_lm.models.cache import KVCache

        if not held.conv.prefix_done or not all(type(c) is KVCache for c in held.conv.cache):
            return None
        length = held.ends[k - 1] if k else held.conv.prefix_length()
        import mlx.core as mx

        cache = []
        for c in held.conv.cache:
            copy = KVCache()
            copy.keys = mx.array(c.keys[..., :length, :])
            copy.values = mx.array(c.values[..., :length, :])
            copy.offset = length
            cache.append(copy)
        mx.eval([c.keys for c in cache] + [c.values for c in cache])
        conv = runner.new_conversation(self.model, self.tokenizer, held.visual,
                                       argparse.Namespace(
                                           system_prompt=held.conv.system_prompt,
                                           max_kv_size=held.conv.max_kv_size,
                                           kv_bits=held.conv.kv_options["kv_bits"],
                                           timestamps=getattr(held.conv, "timestamps", False)))
        conv.restore_prefix(cache)
        conv.turns = list(held.conv.turns[:k])
        return Held(held.key, conv, held.visual, None, recipe=held.recipe,
                    pairs=list(held.pairs[:k]), ends=list(held.ends[:k]))

    def _replay(self, held: Held, question: str, answer: str, progress=None) -> int:
        """Prefill a past turn the server did not write (its text as the client sent it),
        after the video's prefix; returns the tokens prefilled."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        from sfllava_mlx import prompt as chatml
        from sfllava_mlx.generate import Turn

        conv = held.conv
        q_ids = conv.question_tokens(question)
        a_ids = self.answers.get(answer) or self.answers.get(answer.strip())
        a_ids = list(a_ids) if a_ids is not None else chatml.encode(self.tokenizer, answer)
        ids = q_ids + a_ids
        conv._check_context(len(ids) + 1)
        before = conv.offset
        try:
            for _ in generate_step(mx.array(ids), self.model.language_model, max_tokens=0,
                                   prompt_cache=conv.cache, prefill_step_size=conv.prefill_step_size,
                                   prompt_progress_callback=(lambda d, t: progress("prefill", d, t))
                                   if progress else None, **conv.kv_options):
                pass
            mx.eval([c.state for c in conv.cache])
        except BaseException:
            conv._rewind(before)
            raise
        conv.turns.append(Turn(question, text=answer, tokens=list(a_ids), prompt_tokens=len(q_ids),
                               finish_reason="stop"))
        held.pairs.append((question, answer))
        held.ends.append(conv.offset)
        return len(ids)


def log(message: str) -> None:
    print(f"sfllava serve: {message}", file=sys.stderr, flush=True)
