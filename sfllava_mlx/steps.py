"""Work in bounded steps: a generator that yields between its steps (a frame batch through
the tower, a prefill chunk) and returns its result. A server runs other answers' decode
steps between them; everyone else runs them all at once with `run`.

A step yields None, or a `Wait` where it cannot go on before something outside is ready
(the next decoded frame): `wait(timeout)` says whether it is, waiting up to `timeout`
seconds (None: as long as it takes), so that whoever runs the steps can block on it or do
other work meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Optional, TypeVar

T = TypeVar("T")
Steps = Generator[Any, None, T]
Wait = Callable[[Optional[float]], bool]


def run(steps: Steps[T]) -> T:
    """Do every step, waiting where one waits; return the result."""
    while True:
        try:
            pause = next(steps)
        except StopIteration as done:
            return done.value
        if pause is not None:
            pause(None)
