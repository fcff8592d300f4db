"""`sfllava serve`: the conversations the server holds in memory, for follow-ups.

A request whose messages start with a held conversation's pairs continues it, so only its
new tokens are prefilled (unless another request is writing that conversation's next
answer right now: it branches off then); one that branches off earlier (a regenerated or edited answer,
or a new conversation about the same video) gets a Session branched at the point where
they part (its KV cache copied up to there). Turns it does not hold are replayed from the
request: an answer the server wrote with the tokens it wrote (remembered by text), any
other by its text.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Held:
    """A held conversation: its Session and the (question, answer) pairs it has seen."""

    key: tuple  # (the media's content, the Session's prefix identity)
    session: object  # sfllava_mlx.Session
    pairs: list = field(default_factory=list)  # [(question, answer text)]
    ends: list = field(default_factory=list)  # KV offset after each pair
    busy: bool = False  # a request is writing its next answer: others branch off it

    def answered(self, question: str, answer: str) -> None:
        self.pairs.append((question, answer))
        self.ends.append(self.session.conversation.offset)


def same_answer(held: str, given: str) -> bool:
    return held == given or held.strip() == given.strip()


class HeldConversations:
    def __init__(self, max_held: int, keep_answers: int = 1024):
        self.max_held = max(1, max_held)
        self.keep_answers = keep_answers
        self._held: OrderedDict[int, Held] = OrderedDict()
        # The tokens of answers this server wrote, by their text: a turn replayed after its
        # conversation was dropped gets the model's own tokens back (text -> tokens is not
        # one-to-one: an answer can split a character, or a word, unlike the tokenizer).
        self._answers: OrderedDict[str, list] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def clear(self) -> None:
        self._held.clear()

    def hold(self, held: Held) -> Held:
        self._held[id(held)] = held
        self._held.move_to_end(id(held))
        while len(self._held) > self.max_held:
            self._held.popitem(last=False)
        return held

    def idle(self, keep=None) -> list:
        """Held conversations no request is using (least recently used first), but `keep`."""
        return [h for h in self._held.values() if not h.busy and h is not keep]

    def drop(self, held: Held) -> None:
        self._held.pop(id(held), None)

    def written(self, text: str, tokens: list) -> None:
        for t in {text, text.strip()} - {""}:
            self._answers[t] = list(tokens)
            self._answers.move_to_end(t)
        while len(self._answers) > self.keep_answers:
            self._answers.popitem(last=False)

    def tokens_of(self, answer: str, tokenizer) -> list:
        from sfllava_mlx.prompt import encode

        known = self._answers.get(answer) or self._answers.get(answer.strip())
        return list(known) if known is not None else encode(tokenizer, answer)

    def find(self, key: tuple, history: list) -> Optional[Held]:
        """The conversation sharing the longest start with `history`, continued or branched
        off; None when none is about this media with these options."""
        best, best_k = None, -1
        for held in reversed(self._held.values()):  # most recent first
            if held.key != key:
                continue
            k = 0
            while (k < len(held.pairs) and k < len(history) and held.pairs[k][0] == history[k][0]
                   and same_answer(held.pairs[k][1], history[k][1])):
                k += 1
            whole = k == len(held.pairs)
            if k > best_k or (k == best_k and whole and len(best.pairs) != best_k):
                best, best_k = held, k
        if best is None:
            return None
        if best_k == len(best.pairs) and not best.busy:
            return self.hold(best)  # most recently used
        length = best.ends[best_k - 1] if best_k else best.session.conversation.prefix_length()
        session = best.session.branch(best_k, length)
        if session is None:  # a cache that cannot be copied (rotating)
            return None
        return self.hold(Held(best.key, session, list(best.pairs[:best_k]),
                              list(best.ends[:best_k])))

    def replay_steps(self, held: Held, question: str, answer: str, tokenizer, step=None):
        """Prefill a past turn the server did not answer in this conversation, a step per
        chunk (of `step` tokens); returns the tokens prefilled."""
        n = yield from held.session.replay_steps(question, self.tokens_of(answer, tokenizer),
                                                 answer, step=step)
        held.answered(question, answer)
        return n
