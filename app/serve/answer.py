"""`sfllava serve`: one request's work as bounded steps, run by the worker's thread.

The steps: find the held conversation it continues (or branches off), else open its video
(`Engine.open_steps`: a step per frame batch) once its answer fits in memory beside the
running ones; prefill its prefix and replay the turns the server does not hold (a step per
chunk); then the answer, a step per token (in the worker's batch, or decoded alone where
the batch cannot take it). A held conversation whose answer is being written is branched, not
continued, by a request that extends it meanwhile.
"""

from __future__ import annotations

import os
import time

from sfllava_mlx.config import PREFILL_STEP
from sfllava_mlx.media import opened
from sfllava_mlx.memory import kv_bytes
from sfllava_mlx.options import ASK, Options, identity

from ..options import session_options
from .held import Held
from .log import log
from .media import content_key
from .request import APIError

# The prefill chunk of a request opened while other answers may be decoding: a running
# stream's longest pause is one step (a frame batch, or this chunk). A quarter of the usual
# 512 keeps that near a frame batch's time (docs/performance.md).
PREFILL_BESIDE = PREFILL_STEP // 4


def request_options(worker, req) -> dict:
    """The Session options: the server's flags with the request's over them."""
    given = {"system_prompt": req.system, "max_tokens": req.max_tokens,
             "temp": req.temperature, "top_p": req.top_p, "seed": req.seed}
    return {**session_options(worker.args), **req.options,
            **{k: v for k, v in given.items() if v is not None}}


def held_key(worker, media, options: dict) -> tuple:
    """What a held conversation is keyed by: the media's content and the resolved options
    that change its visual tokens, its prompt or its KV cache (subtitles as actually found:
    a data URL has no sidecar) — not the decoding ones (design.md §3). `media`: opened."""
    resolved = worker.engine.resolve(media, **options)
    return content_key(media), identity(resolved, "visual", "prompt", "context")


def answer_steps(worker, task):
    """The steps of `task`'s request; returns what the response needs, or None when its
    client left."""
    job, req, engine = task.job, task.job.req, worker.engine
    if job.media is None:
        raise APIError(400, "a video is required: put a video_url part in the first user "
                            "message", "missing_video", "messages")
    options = request_options(worker, req)
    asked = Options.of(**options)  # this request's decoding options, whatever it continues
    held, cache_state = yield from held_or_opened(worker, task, options, asked)
    task.held, held.busy = held, True
    session = held.session
    if cache_state == "held":
        count_memory(worker, task, session.conversation.offset, req.history[len(held.pairs):],
                     asked)
        while not worker.fits(task):
            yield
    prefill_chunk = PREFILL_BESIDE if worker.decoder is not None else None
    if not session.conversation.prefix_done:
        yield from session.prefill_steps(step=prefill_chunk)
    replayed, tic = 0, time.perf_counter()
    for question, answer in req.history[len(held.pairs):]:
        replayed += yield from worker.held.replay_steps(held, question, answer,
                                                        engine.tokenizer, step=prefill_chunk)
    replay_s = time.perf_counter() - tic

    task.phase, task.working_set = "decode", 0  # its tower and prefill are done
    decoder = worker.decoder if task.answer else None
    turns_before = len(session.turns)
    stream = session.ask(req.question, start_time=task.start, decoder=decoder,
                         **{k: getattr(asked, k) for k in ASK})
    try:
        for chunk in stream:
            if chunk is not None:
                if job.cancelled.is_set():  # its client left: this token is the last computed
                    job.after_cancel += 1
                    break
                if chunk.finish_reason != "stop":
                    job.generated += 1
                    worker.stats["tokens"] += 1
                if chunk.text and req.stream:  # a whole answer is sent once, with "done"
                    job.emit("delta", chunk.text)
            yield
    finally:
        stream.close()  # the conversation's clean-up: a stopped answer stays, rewound
        turn = session.last_turn
        if len(session.turns) > turns_before:
            held.answered(req.question, turn.text)
            worker.held.written(turn.text, turn.tokens)
    if job.cancelled.is_set():
        return None
    record = session.record()
    record["cache"] = cache_state
    if replayed:
        record["prompt_tokens"] += replayed
        record["timings_s"]["prefill"] = round(record["timings_s"]["prefill"] + replay_s, 6)
    record["timings_s"]["queue"] = round(task.start - job.enqueued, 6)
    total = session.conversation.offset - len(turn.tokens)
    return {"record": record, "text": turn.text, "finish_reason": turn.finish_reason,
            "prompt_tokens": total, "completion_tokens": len(turn.tokens),
            "cached_tokens": max(0, total - record["prompt_tokens"])}


def held_or_opened(worker, task, options: dict, asked: Options):
    """(the held conversation the request continues or branches off, "held"), else (a new
    one about its video, the cache's state), opened once its answer fits in memory beside
    the running ones. The file is opened once for both: the key, then the session."""
    job, engine = task.job, worker.engine
    if not job.media.upload and os.path.realpath(job.media.path) != job.media.path:
        raise APIError(403, "the video's path changed since it was checked",
                       "path_not_allowed", "video_url")
    with opened(job.media.path) as media:  # closed on a hit; `open_steps` closes it once read
        key = held_key(worker, media, options)
        held = worker.held.find(key, job.req.history)
        if held is not None:
            return held, "held"
        opening = engine.prepare(media, **options)  # the checks; nothing decoded
        plan = opening.memory
        task.working_set = plan.working_set
        count_memory(worker, task, plan.visual_tokens, job.req.history, asked)
        while not worker.fits(task):
            yield
        session = yield from engine.open_steps(opening)
    for warning in session.warnings:  # e.g. a broken subtitle file beside the video
        log(f"{job.id} warning: {warning}")
    return worker.held.hold(Held(key, session)), session.cache


def count_memory(worker, task, start_tokens: int, replayed: list, options: Options) -> None:
    """What `task` holds while it answers: the cache it starts from (`start_tokens`, plus
    the turns it replays) and, where its answer decodes in the batch, the answer's own copy
    of the whole conversation. An answer that decodes alone writes in place; one whose
    batch copy would not fit even with nothing else running decodes alone too."""
    from sfllava_mlx.memory import PROMPT_TEXT_TOKENS, batch_bytes, fits
    from sfllava_mlx.prompt import encode

    tokenizer, model = worker.engine.tokenizer, worker.engine.model
    start = start_tokens + sum(len(encode(tokenizer, q)) + len(encode(tokenizer, a))
                               + PROMPT_TEXT_TOKENS for q, a in replayed)
    whole = (start + len(encode(tokenizer, task.job.req.question)) + PROMPT_TEXT_TOKENS
             + options.max_tokens)
    kv_bits = options.kv_bits
    batched = worker.decoder is not None and not kv_bits and not options.max_kv_size
    task.starts = kv_bytes(model, start if batched else whole, kv_bits)
    task.answer = kv_bytes(model, whole) if batched else 0
    if batched and not fits(batch_bytes(worker.weights, task.working_set, task.starts,
                                        [task.answer])):
        task.starts, task.answer = kv_bytes(model, whole), 0
