"""Many answers at once (design.md §7, §8): answers decoding together through mlx-lm's
`BatchGenerator`, each the one it would get alone.

One decode step reads the weights once, whatever the batch: on a memory-bound machine
(a Mac's GPU, this CPU) four answers decode in much less than four times one's time.

    decoder = Decoder(engine.model, engine.tokenizer, concurrency=4)
    asks = [session.fork().ask(q, decoder=decoder) for q in questions]
    for i, error in answer_all(decoder, asks):   # as each answer ends
        ...

- `Session.ask(..., decoder=d)` puts its answer in `d`'s batch. The batch starts from the
  conversation's KV cache, merged into mlx-lm's `BatchKVCache` (left-padded, masked): it
  reads that cache and never writes it, so answers from one prefix can start from the same
  arrays (`Session.fork`). When the answer ends, its conversation's cache is the answer's
  own (extracted from the batch), so follow-ups, `record()` and `save()` work as alone.
- Greedy answers equal their answers alone (the tokens; logprobs within float32 rounding).
  A sampled answer (temperature > 0) samples from its own distribution with its own
  temperature and top-p, drawing from a random key of its own (`sampler.own_sampler`, which
  an answer alone draws from too): seeded, it gives the very tokens it gives alone.
- What decodes alone: a conversation whose KV cache is quantized (`--kv-bits`) or rotating
  (`--max-kv-size`): mlx-lm's batch caches hold neither kind (`QuantizedKVCache` has no
  batch form; a rotating batch cache would be exact only as long as it never rotates,
  which the context check already forbids, so nothing is gained by the risk). For those,
  `Decoder.takes` is False and `Session.ask` decodes alone, a token per pull, beside the
  batch.
- The stream of a batched answer yields None while its next token waits for the
  decoder's next step: whoever drives the answers pulls each in turn, then calls
  `Decoder.step()` once (`answer_all` does; `sfllava serve`'s worker does it between its
  other work). A stream that is closed early drops its own sequence only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import KVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .config import DECODE_CONCURRENCY, PREFILL_STEP
from .sampler import own_sampler


@dataclass
class Response:
    """A token of a batched answer, with what `mlx_lm.stream_generate` gives of it."""

    text: str
    token: int
    logprobs: mx.array  # the log-softmax over the vocabulary at this step
    finish_reason: Optional[str] = None


class Answer:
    """One answer in a Decoder's batch, iterated as mlx-lm's `stream_generate` is (a
    `Response` per token, the last with its finish reason), or None where the next token
    comes with the decoder's next step."""

    def __init__(self, decoder: Decoder, cache: list, ids: list, max_tokens: int,
                 sampler: Optional[Callable]):
        self.decoder = decoder
        self.start_cache, self.ids, self.max_tokens, self.sampler = cache, ids, max_tokens, sampler
        self.uid: Optional[int] = None  # in the BatchGenerator, once inserted
        self.detokenizer = decoder.tokenizer.detokenizer
        self.pending: deque = deque()
        self.tokens = 0  # tokens the batch has computed for it
        self.done = False
        self.cache: Optional[list] = None  # its KV cache, once it ended with a token
        self.error: Optional[BaseException] = None

    def __iter__(self) -> Iterator[Optional[Response]]:
        return self

    def __next__(self) -> Optional[Response]:
        if self.pending:
            return self.pending.popleft()
        if self.error is not None:
            raise self.error
        if self.done:
            raise StopIteration
        return None

    def finish(self) -> Optional[list]:
        """End it (its sequence leaves the batch if still there): its KV cache, the prompt
        and every token computed in it, or None when it has no token yet."""
        if not self.done:
            self.decoder._drop(self)
        return self.cache

    def _receive(self, r) -> None:
        self.tokens += 1
        if r.finish_reason != "stop":
            self.detokenizer.add_token(r.token)
        if r.finish_reason is not None:
            self.detokenizer.finalize()
            self.done, self.cache = True, r.prompt_cache
        self.pending.append(Response(self.detokenizer.last_segment, r.token, r.logprobs,
                                     r.finish_reason))


class Decoder:
    """Answers of one model decoding together, up to `concurrency` in one batch (more wait
    in mlx-lm's queue, first come first served)."""

    def __init__(self, model, tokenizer, concurrency: int = DECODE_CONCURRENCY,
                 prefill_step: int = PREFILL_STEP):
        self.model = model
        self.tokenizer = (tokenizer if isinstance(tokenizer, TokenizerWrapper)
                          else TokenizerWrapper(tokenizer))
        self.concurrency = concurrency
        self.prefill_step = prefill_step
        self._gen: Optional[BatchGenerator] = None
        self._answers: dict[int, Answer] = {}  # in the batch, by uid
        self._new: list[Answer] = []  # inserted at the next step, together

    def takes(self, conversation) -> bool:
        """Whether an answer in `conversation` decodes in this batch (else alone)."""
        return (conversation.model is self.model and conversation.max_kv_size is None
                and not conversation.kv_options.get("kv_bits")
                and all(type(c) is KVCache for c in conversation.cache))

    def answer(self, cache: list, ids: list, *, max_tokens: int, temp: float = 0.0,
               top_p: float = 1.0, seed: Optional[int] = None) -> Answer:
        """The answer to question tokens `ids` after `cache` (read, never written)."""
        a = Answer(self, cache, ids, max_tokens, own_sampler(temp, top_p, seed))
        self._new.append(a)
        return a

    def __len__(self) -> int:
        return len(self._answers) + len(self._new)

    def step(self) -> bool:
        """One decode step of every answer in the batch (and a prefill chunk of the
        questions just added); False when there was nothing to do. An error fails every
        answer in the batch (each raises it), not the caller."""
        if self._new:
            self._insert()
        if not self._answers:
            return False
        try:
            _, responses = self._generator().next()
        except Exception as e:  # noqa: BLE001  raised by each answer instead
            for a in self._answers.values():
                a.error = e
            self._answers.clear()
            self.close()
            return True
        for r in responses:
            a = self._answers.get(r.uid)
            if a is not None:
                a._receive(r)
                if a.done:
                    del self._answers[r.uid]
        return True

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    # ------------------------------------------------------------------------------------
    def _generator(self) -> BatchGenerator:
        if self._gen is None:
            eos = [[t] for t in self.tokenizer.eos_token_ids]
            self._gen = BatchGenerator(self.model.language_model, stop_tokens=eos,
                                       completion_batch_size=self.concurrency,
                                       prefill_batch_size=self.concurrency,
                                       prefill_step_size=self.prefill_step)
        return self._gen

    def _insert(self) -> None:
        new, self._new = self._new, []
        uids = self._generator().insert([a.ids for a in new],
                                        max_tokens=[a.max_tokens for a in new],
                                        caches=[a.start_cache for a in new],
                                        samplers=[a.sampler for a in new])
        for uid, a in zip(uids, new):
            a.uid, a.start_cache = uid, None
            self._answers[uid] = a

    def _drop(self, a: Answer) -> None:
        a.done = True
        if a in self._new:
            self._new.remove(a)
            return
        if self._answers.pop(a.uid, None) is None or self._gen is None:
            return
        caches = self._gen.remove([a.uid], return_prompt_caches=a.tokens > 0)
        if a.tokens:
            a.cache = caches[a.uid][0]


def answer_all(decoder: Decoder, asks: Iterable[Iterator],
               concurrency: Optional[int] = None) -> Iterator[tuple[int, Optional[Exception]]]:
    """Run answers together: `asks` are `Session.ask(..., decoder=decoder)` streams, taken
    in order, `concurrency` at a time (the decoder's by default): as one ends, the next
    starts. Each round pulls one item of every running answer (a chunk; None while it waits
    for the decode step; an answer decoding alone computes its next token), then the
    decoder steps. Yields (i, None) as answer i ends, (i, error) where it raised."""
    concurrency = concurrency or decoder.concurrency
    waiting = enumerate(asks)
    live: dict[int, Iterator] = {}
    try:
        while True:
            while len(live) < concurrency:
                i, ask = next(waiting, (None, None))
                if ask is None:
                    break
                live[i] = ask
            if not live:
                return
            for i, ask in list(live.items()):
                try:
                    next(ask)
                except StopIteration:
                    del live[i]
                    yield i, None
                except Exception as e:  # noqa: BLE001  this answer fails, the others go on
                    del live[i]
                    yield i, e
            decoder.step()
    finally:
        for ask in live.values():
            ask.close()
