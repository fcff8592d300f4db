"""One video (or picture), many questions: the prompt around the visual tokens and the KV
cache kept between turns (design.md §1.7), so a follow-up prefills only its own tokens.

`prefill` is the one way anything is prefilled — the prefix of system prompt and video, a
Core ML overlap's chunks, a past turn replayed — and `Conversation.branch` (a conversation
cut back to a turn) and `fork` (as it is) the ways a conversation is copied: over views of
its KV arrays (`kv.share_prefix`; a deep copy where the cache is not mlx-lm's plain KVCache).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import (
    DEFAULT_QUANTIZED_KV_START,
    generation_stream,
    maybe_quantize_kv_cache,
    stream_generate,
)
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from .config import PREFILL_STEP
from .encode import VisualTokens
from .errors import ContextOverflowError
from .kv import share_prefix
from .prompt import encode, first_turn, next_turn
from .sampler import own_sampler
from .steps import Steps, run

STAGES = ("frames", "vision", "prefill", "ttft", "generate")


@dataclass
class Turn:
    question: str
    text: str = ""
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_tokens: int = 0
    timings_s: dict = field(default_factory=dict)
    peak_memory_gb: float = 0.0
    finish_reason: Optional[str] = None


@dataclass
class Chunk:
    """A piece of an answer as it streams. The last one may have `finish_reason == "stop"`:
    its text ends the answer, its token is the end token (not part of the answer)."""

    text: str
    token: int
    finish_reason: Optional[str] = None
    logprobs: Optional[mx.array] = None  # the log-softmax over the vocabulary for this step


def context_limit(context_length: int, max_kv_size: Optional[int]) -> int:
    """Tokens a conversation's cache may hold. A rotating cache (--max-kv-size) would
    overwrite the video once full, so its size is a limit too: never cut the video out
    silently."""
    return min(context_length, max_kv_size or context_length)


def prefill(language_model, cache: list, **kw) -> None:
    """Run `embeddings` (length, D) or token `ids` through the LLM into `cache`
    (`prefill_steps`, all at once)."""
    run(prefill_steps(language_model, cache, **kw))


def prefill_steps(language_model, cache: list, *, embeddings: Optional[mx.array] = None,
                  ids: Optional[list] = None, step: int = PREFILL_STEP,
                  progress: Optional[Callable[[int, int], None]] = None, kv_bits=None,
                  kv_group_size: int = 64) -> Steps[None]:
    """Run `embeddings` (length, D) or token `ids` through the LLM into `cache`, a step per
    chunk, with `progress(done, total)`: mlx-lm's chunked prefill (`generate_step`'s chunks
    of `step`, the last token on its own, the KV quantized as it quantizes it), asked for
    no token."""
    n = embeddings.shape[0] if embeddings is not None else len(ids)
    prompt = mx.array(ids, dtype=mx.int32) if ids is not None else mx.zeros((n,), mx.int32)
    done = 0
    if progress:
        progress(0, n)
    while done < n:
        k = min(step, n - done - 1) if n - done > 1 else 1
        with mx.stream(generation_stream):
            language_model(prompt[None, done:done + k], cache=cache,
                           input_embeddings=(embeddings[None, done:done + k]
                                             if embeddings is not None else None))
            maybe_quantize_kv_cache(cache, DEFAULT_QUANTIZED_KV_START, kv_group_size, kv_bits)
            mx.eval([c.state for c in cache])
        done += k
        if progress:
            progress(done, n)
        mx.clear_cache()
        yield


class Conversation:
    """The KV cache and turns of one conversation about one video or picture.

    `preamble`: text between the video and the first question (LLaVA-Video's time
    instruction), part of the first turn's question tokens."""

    def __init__(self, model, tokenizer, visual: Optional[VisualTokens], *, system_prompt=None,
                 preamble: str = "", max_kv_size=None, kv_bits=None, kv_group_size=64,
                 prefill_step: int = PREFILL_STEP):
        self.model = model
        self.tokenizer = tokenizer
        self.visual = visual
        self.system_prompt = system_prompt or model.config.prompt.system_prompt
        self.preamble = preamble
        self.max_kv_size = max_kv_size
        self.kv_options = dict(kv_bits=kv_bits, kv_group_size=kv_group_size)
        self.prefill_step = prefill_step
        self.turns: list[Turn] = []
        self.cache = self.new_cache()
        self.prefix_done = False
        self.unreported: Optional[dict] = None  # the video's work, reported with the next answer

    def new_cache(self) -> list:
        return make_prompt_cache(self.model.language_model, max_kv_size=self.max_kv_size)

    # -- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        """A new conversation about the same video: no re-encoding, and the prefilled
        video stays in the cache when it can be trimmed back to it."""
        self.turns = []
        if self.prefix_done and can_trim_prompt_cache(self.cache):
            self.rewind(self.prefix_length())
            return
        self.cache = self.new_cache()
        self.prefix_done = False

    def restore_prefix(self, cache: list) -> None:
        """Start from a KV cache of the prefix (system prompt + video), e.g. read from disk."""
        self.turns = []
        self.cache = cache
        self.prefix_done = True
        self.unreported = None

    def branch(self, turns: int, length: int) -> Optional[Conversation]:
        """A new conversation holding this one's first `turns` turns, its KV cache copied up
        to `length` tokens; None where the cache cannot be cut back (rotating)."""
        if not self.prefix_done:
            return None
        cache = share_prefix(self.cache, length)  # views: MLX arrays are values
        if cache is None:
            return None
        other = self._sibling()
        other.restore_prefix(cache)
        other.turns = list(self.turns[:turns])
        return other

    def fork(self) -> Optional[Conversation]:
        """A conversation that goes on from this one's state without copying its KV cache
        (`kv.share_prefix`), as the answers of `batching` start from one prefix; the work
        this one has not reported yet (its prefix's) goes with the fork. None where the
        cache cannot be cut back (rotating)."""
        cache = share_prefix(self.cache, self.offset)
        if cache is None:
            return None
        other = self._sibling()
        other.cache, other.prefix_done, other.turns = cache, self.prefix_done, list(self.turns)
        other.unreported, self.unreported = self.unreported, None
        return other

    def _sibling(self) -> Conversation:
        return Conversation(self.model, self.tokenizer, self.visual,
                            system_prompt=self.system_prompt, preamble=self.preamble,
                            max_kv_size=self.max_kv_size, prefill_step=self.prefill_step,
                            **self.kv_options)

    @property
    def offset(self) -> int:
        """Tokens held in the KV cache."""
        return self.cache[0].offset if self.cache else 0

    @property
    def last_turn(self) -> Optional[Turn]:
        return self.turns[-1] if self.turns else None

    def prefix_tokens(self) -> list:
        before, _ = first_turn(self.system_prompt, "")
        return encode(self.tokenizer, before)

    def prefix_length(self) -> int:
        return len(self.prefix_tokens()) + self.visual.embeddings.shape[0]

    def rewind(self, length: int) -> None:
        """Keep the first `length` tokens in the cache, drop what was computed past them."""
        extra = self.offset - length
        if extra > 0:
            trim_prompt_cache(self.cache, extra)

    # -- prefill ---------------------------------------------------------------------------
    def prefill_prefix(self, progress=None) -> float:
        """Prefill system prompt + video into the cache; returns seconds spent."""
        return run(self.prefill_prefix_steps(progress))

    def prefill_prefix_steps(self, progress=None, step: Optional[int] = None) -> Steps[float]:
        """`prefill_prefix`, a step per chunk (of `step` tokens, else the usual)."""
        if self.prefix_done:
            return 0.0
        tic = time.perf_counter()
        embeds = mx.concatenate([self.model.embed_tokens(self.prefix_tokens()),
                                 self.visual.embeddings.astype(self.dtype)])
        self.check_context(embeds.shape[0])
        try:
            yield from prefill_steps(self.model.language_model, self.cache, embeddings=embeds,
                                     step=step or self.prefill_step, progress=progress,
                                     **self.kv_options)
        except BaseException:  # a half-filled cache is useless: start clean next time
            self.cache = self.new_cache()
            raise
        return self._prefix_filled(time.perf_counter() - tic)

    def prefill_prefix_beside(self, encode: Callable[[Callable], VisualTokens]) -> VisualTokens:
        """Prefill the prefix while its visual tokens are being made (the Core ML tower's,
        beside this prefill): `encode(feed)` calls `feed(chunk)` with them, in token order,
        as each chunk is ready, and returns them all (`overlap.encode_overlapped`). The
        cache is then what `prefill_prefix` leaves."""
        text = [self.model.embed_tokens(self.prefix_tokens())]
        spent = 0.0

        def feed(chunk: mx.array) -> None:
            nonlocal spent
            tic = time.perf_counter()
            embeds = mx.concatenate([*text, chunk]).astype(self.dtype)  # the text goes first
            text.clear()
            prefill(self.model.language_model, self.cache, embeddings=embeds,
                    step=self.prefill_step, **self.kv_options)
            spent += time.perf_counter() - tic

        try:
            self.visual = encode(feed)
        except BaseException:  # a half-filled cache is useless: start clean next time
            self.cache = self.new_cache()
            raise
        self._prefix_filled(spent)
        return self.visual

    def _prefix_filled(self, prefill_s: float) -> float:
        """The prefix is in the cache: its work is reported with the next answer."""
        self.prefix_done = True
        self.unreported = {"frames": self.visual.timings.get("frames", 0.0),
                           "vision": self.visual.timings.get("vision", 0.0),
                           "prefill": prefill_s, "tokens": self.prefix_length()}
        return prefill_s

    @property
    def dtype(self):
        return self.model.language_model.model.norm.weight.dtype

    @property
    def context_limit(self) -> int:
        return context_limit(self.model.context_length, self.max_kv_size)

    def check_context(self, new_tokens: int) -> None:
        limit = self.context_limit
        if self.offset + new_tokens > limit:
            what = ("--max-kv-size" if limit < self.model.context_length
                    else "the model's context")
            raise ContextOverflowError(
                f"the conversation would pass {what} ({self.offset + new_tokens} > {limit} "
                f"tokens); start a new conversation (/reset)")

    def question_tokens(self, question: str) -> list:
        if not self.turns:
            if self.preamble:
                question = f"{self.preamble}\n{question}"
            _, after = first_turn(self.system_prompt, question)
            return encode(self.tokenizer, after)
        return encode(self.tokenizer, next_turn(question))

    # -- a turn ----------------------------------------------------------------------------
    def ask(self, question: str, *, max_tokens=512, temp=0.0, top_p=1.0, seed=None,
            progress=None, start_time=None, decoder=None) -> Iterator[Optional[Chunk]]:
        """Stream the answer; the Turn is in `last_turn` (complete once the stream ends).

        With a `batching.Decoder` that takes this conversation, the answer decodes in its
        batch: the stream then yields None where its next token waits for the decoder's
        next step, and this conversation's cache is the answer's own once it ends (the
        batch never writes into the cache it starts from)."""
        start = start_time or time.perf_counter()
        turn = Turn(question, timings_s=dict.fromkeys(STAGES, 0.0))
        timings = turn.timings_s
        if not self.prefix_done:
            self.prefill_prefix(progress)
        if self.unreported:  # the video's own work is reported once, with the next answer
            done, self.unreported = self.unreported, None
            turn.prompt_tokens += done.pop("tokens")
            timings.update(done)
        ids = self.question_tokens(question)
        self.check_context(len(ids) + 1)  # room for at least one answer token
        turn.prompt_tokens += len(ids)
        before = self.offset
        max_tokens = max(1, min(max_tokens, self.context_limit - before - len(ids)))
        batched = decoder is not None and decoder.takes(self)
        if batched:  # its own sampler, seeded with its own key
            source = decoder.answer(self.cache, ids, max_tokens=max_tokens, temp=temp,
                                    top_p=top_p, seed=seed)
        else:  # the same sampler: answers decoding alone side by side draw apart too
            source = stream_generate(self.model.language_model, self.tokenizer, mx.array(ids),
                                     max_tokens=max_tokens, prompt_cache=self.cache,
                                     sampler=own_sampler(temp, top_p, seed),
                                     max_kv_size=self.max_kv_size,
                                     prefill_step_size=self.prefill_step, **self.kv_options)
        self.turns.append(turn)
        logprobs = []  # each token's, evaluated behind the decode: no wait per token
        tic, end = time.perf_counter(), None
        try:
            for r in source:
                if r is None:  # batched: its next token comes with the decoder's next step
                    yield None
                    continue
                if not timings["ttft"]:
                    now = time.perf_counter()
                    timings["prefill"] += now - tic
                    timings["ttft"] = now - start
                    tic = now
                turn.text += r.text
                turn.finish_reason = r.finish_reason
                if r.finish_reason != "stop":
                    turn.tokens.append(r.token)
                    logprobs.append(r.logprobs[r.token])
                    mx.async_eval(logprobs[-1])
                if r.finish_reason:  # its last token: the end, whenever the stream is closed
                    end = time.perf_counter()
                yield Chunk(r.text, r.token, r.finish_reason, r.logprobs)
        finally:
            if batched:  # the answer's cache, where it has one
                self.cache = source.finish() or self.cache
            timings["generate"] = (end or time.perf_counter()) - tic
            turn.logprobs = [x.item() for x in logprobs]
            turn.peak_memory_gb = mx.get_peak_memory() / 1e9
            if turn.tokens or turn.finish_reason:
                self.rewind(before + len(ids) + len(turn.tokens))
            else:  # interrupted before the first token: as if the question was never asked
                self.rewind(before)
                self.turns.pop()

    def replay_steps(self, question: str, answer_tokens: list, answer_text: str,
                     progress=None, step: Optional[int] = None) -> Steps[int]:
        """`replay`, a step per chunk (of `step` tokens, else the usual)."""
        ids = self.question_tokens(question) + list(answer_tokens)
        self.check_context(len(ids) + 1)
        before = self.offset
        try:
            yield from prefill_steps(self.model.language_model, self.cache, ids=ids,
                                     step=step or self.prefill_step, progress=progress,
                                     **self.kv_options)
        except BaseException:
            self.rewind(before)
            raise
        self.turns.append(Turn(question, text=answer_text, tokens=list(answer_tokens),
                               prompt_tokens=len(ids) - len(answer_tokens), finish_reason="stop"))
        return len(ids)
