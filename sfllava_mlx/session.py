"""A Session (design.md §6.2): one conversation about one video or picture, with the options it
was opened with, its visual tokens and KV cache, and what the cache still lacks of it."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from functools import cached_property
from typing import Optional

from .cache import prefix_key
from .conversation import Chunk, Conversation, Turn
from .encode import VisualTokens
from .options import Options, with_answer
from .steps import Steps, run


class Session:
    """Made by `Engine.open`. `cache` is "hit" (visual tokens and, when saved, the prefilled
    prefix read back), "miss" (computed; `save()` stores them) or "off"."""

    def __init__(self, engine, opening, visual: VisualTokens, conversation: Conversation,
                 entry=None, hasher=None):
        self.engine = engine
        self.opening = opening
        self.visual = visual
        self.conversation = conversation
        self.cache = "off" if opening.key is None else ("hit" if entry is not None else "miss")
        self._entry = entry.path if entry is not None else None
        self._hasher = hasher
        self._kv_key = prefix_key(conversation.prefix_tokens(), kv_bits=self.options.kv_bits)
        self.prefix_from_cache = False
        if entry is not None and not self.options.max_kv_size:
            cache = engine.store.load_prefix(entry, self._kv_key,
                                             length=conversation.prefix_length(),
                                             num_layers=len(engine.model.language_model.layers))
            if cache is not None:
                conversation.restore_prefix(cache)
                self.prefix_from_cache = True
        self._saved = opening.key is None or entry is not None  # the visual tokens
        # The prefix: a rotating cache (--max-kv-size) may have dropped it, never stored.
        self._kv_saved = (opening.key is None or self.prefix_from_cache
                          or bool(self.options.max_kv_size))
        now = time.perf_counter()
        self.load_s = now - opening.started if entry is not None else 0.0  # a hit's reads
        self.open_s = now - opening.started
        self._first = True  # the first answer counts from the open and reports its work
        self.asked = self.options  # the options of the last answer (`ask`)

    # -- what it is about ----------------------------------------------------------------
    @property
    def options(self) -> Options:
        return self.opening.options

    @property
    def media(self) -> str:
        return self.opening.media

    @property
    def path(self) -> str:
        return self.opening.path

    @property
    def sampling(self):
        return self.opening.sampling

    @property
    def clip(self):
        return self.visual.clip

    @cached_property
    def subtitles(self):
        """The subtitle lines its sampled frames selected (`subtitles.SubtitleLines`: the
        track they came from, the lines), or None without subtitles (design.md §2.5)."""
        track = self.opening.subtitles
        return track.select(self.clip.timestamps) if track is not None else None

    @property
    def warnings(self) -> list:
        """What the user should hear about opening it (a broken sidecar ignored, ...)."""
        return self.opening.warnings

    @property
    def recipe(self) -> str:
        """The recipe a turn record names: the video's, or the picture's image mode."""
        if self.media == "image":
            return self.clip.info.mode
        return self.options.recipe

    @property
    def part(self):
        """The part of the video this Session is about (frames.Part), None for the whole."""
        return self.options.part if self.media == "video" else None

    @property
    def training_free(self) -> bool:
        return self.media == "video" and self.engine.model.config.training_free(self.options.recipe)

    @property
    def turns(self) -> list:
        return self.conversation.turns

    @property
    def last_turn(self) -> Optional[Turn]:
        return self.conversation.last_turn

    # -- the conversation ------------------------------------------------------------------
    def ask(self, question: str, *, max_tokens: Optional[int] = None,
            temp: Optional[float] = None, top_p: Optional[float] = None,
            seed: Optional[int] = None, progress=None, start_time: Optional[float] = None,
            decoder=None) -> Iterator[Optional[Chunk]]:
        """Stream the answer to `question` as Chunks; `last_turn` holds it once done. The
        decoding options not given are the Session's (`options`), each checked by its rule.

        The first answer after opening counts its time to first token from the open and
        reports the open's work (frames, vision, prefill, `cache_load` on a hit).
        `decoder`: a `batching.Decoder` to decode in, with other answers (the stream then
        yields None between its tokens, see `Conversation.ask`)."""
        asked = self.options.replace(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
        self.asked = asked
        first = self._first and not self.turns
        start = start_time or (self.opening.started if first else None)
        before = len(self.turns)
        try:
            yield from self.conversation.ask(
                question, max_tokens=asked.max_tokens, temp=asked.temp, top_p=asked.top_p,
                seed=asked.seed, start_time=start, decoder=decoder,
                progress=(lambda d, t: progress("prefill", d, t)) if progress else None)
        finally:
            if len(self.turns) > before:
                self.last_turn.timings_s["cache_load"] = self.load_s if first else 0.0
                if first:
                    self._first = False

    @property
    def resolved(self) -> dict:
        """The options that made the last answer (design.md §3's `options`), as resolved."""
        return with_answer(self.opening.resolved, self.asked)

    def record(self) -> dict:
        """The object `generate --json` prints for the last turn (design.md §3)."""
        turn = self.last_turn
        return {
            "text": turn.text,
            "tokens": turn.tokens,
            "logprobs": turn.logprobs,
            "prompt_tokens": turn.prompt_tokens,
            "visual_tokens": int(self.visual.embeddings.shape[0]),
            "timings_s": {k: round(v, 6) for k, v in turn.timings_s.items()},
            "peak_memory_gb": round(turn.peak_memory_gb, 4),
            "cache": self.cache,
            "finish_reason": turn.finish_reason,
            "recipe": self.recipe,
            "part": self.part.to_json() if self.part is not None else None,
            "subtitles": self.subtitles.record() if self.subtitles is not None else None,
            "options": self.resolved,
        }

    def reset(self) -> None:
        """The same video, a new conversation (no re-encoding)."""
        self.conversation.reset()

    def resume(self, progress=None) -> None:
        """Take this Session up again after others were used (chat's /part back to a kept
        one): its prefix is prefilled now if it was not, and its next answer counts from
        its own question and reports only its own work. Its visual tokens were kept, not
        encoded again: its cache state reads "hit" (or "off" without the cache)."""
        self.prefill(progress)
        self.conversation.unreported = None  # the open's work: no answer of now did it
        self._first = False
        if self.cache == "miss":
            self.cache = "hit"

    def prefill(self, progress=None) -> float:
        """Prefill the prefix now (chat does it before the first question); seconds spent."""
        return run(self.prefill_steps(progress))

    def prefill_steps(self, progress=None, step: Optional[int] = None) -> Steps[float]:
        """`prefill`, a step per chunk (of `step` tokens: a server makes them smaller while
        other answers decode, the pause between their tokens being one chunk)."""
        return self.conversation.prefill_prefix_steps(
            (lambda d, t: progress("prefill", d, t)) if progress else None, step)

    def branch(self, turns: int, length: int) -> Optional[Session]:
        """A Session holding this one's first `turns` turns (its KV cache copied up to
        `length` tokens), or None where the cache cannot be cut back. It stores nothing."""
        conversation = self.conversation.branch(turns, length)
        if conversation is None:
            return None
        other = copy.copy(self)
        other.conversation = conversation
        other._saved = other._kv_saved = True
        other._first = False
        return other

    def replay_steps(self, question: str, answer_tokens: list, answer_text: str,
                     progress=None, step: Optional[int] = None) -> Steps[int]:
        """`replay`, a step per chunk (of `step` tokens, as `prefill_steps`)."""
        if not self.conversation.prefix_done:
            yield from self.prefill_steps(progress, step)
        return (yield from self.conversation.replay_steps(
            question, answer_tokens, answer_text,
            progress=(lambda d, t: progress("prefill", d, t)) if progress else None, step=step))

    def fork(self) -> Optional[Session]:
        """A Session that goes on from this one's state, its KV cache shared, not copied
        (`Conversation.fork`): one per answer `batching` decodes from one prefix. The
        open's work not reported yet goes with the fork (its first answer reports it, as
        this one's would have); this one stays to `save()` what the cache lacks. None where
        the cache cannot be cut back (rotating)."""
        conversation = self.conversation.fork()
        if conversation is None:
            return None
        other = copy.copy(self)
        other.conversation = conversation
        other._saved = other._kv_saved = True
        other._first, self._first = self._first, False
        return other

    # -- the persistent cache --------------------------------------------------------------
    def save(self) -> None:
        """Store what the cache lacks (visual tokens; the prefilled prefix). Call it when
        nobody waits for a token (after an answer); a no-op once all is stored."""
        if self._saved and self._kv_saved:
            return
        store = self.engine.store
        try:
            if not self._saved:
                content = self._hasher.result() if self._hasher else None
                self._entry = store.store(self.opening.key, self.opening.fingerprint,
                                          self.visual.embeddings, self.visual.clip,
                                          content_sha256=content, model_name=self.engine.name)
                self._saved = True
            if self._entry is not None and not self._kv_saved and self.conversation.prefix_done:
                store.store_prefix(self._entry, self._kv_key, self.conversation.cache,
                                   length=self.conversation.prefix_length(),
                                   system_prompt=self.conversation.system_prompt)
                self._kv_saved = True
        except OSError:  # a full or read-only disk must not end the conversation
            self._saved = self._kv_saved = True
