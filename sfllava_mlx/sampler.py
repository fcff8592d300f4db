"""A sampled answer's tokens, drawn from a random key of the answer's own.

mlx-lm's `make_sampler(temp, top_p)` draws from MLX's global key, which every sampled
answer shares: two answers decoding side by side (in a batch, or alone between a server's
other answers) would each change the other's draws, and a seed would not give the same
answer twice. `own_sampler` is that sampler over a key of its own, seeded and split as
`mx.random.seed` seeds and splits the global one, so an answer gives the tokens mlx-lm
would give it alone with that seed (tests/test_batching.py holds it to `make_sampler`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p


def own_sampler(temp: float, top_p: float, seed: Optional[int]) -> Optional[Callable]:
    """mlx-lm's sampler (`make_sampler(temp, top_p)`: top-p, then a categorical draw at the
    temperature) drawing from a key of its own: `seed` seeds it as `mx.random.seed` seeds
    the global key, split the same way each draw, so the tokens equal the answer's alone.
    None for greedy decoding (the batch's one argmax)."""
    if temp == 0:
        return None
    if seed is None:  # a fresh key from the global generator
        seed = int(mx.random.randint(0, 2**31 - 1, ()).item())
    key = [mx.random.key(seed)]

    def sample(logprobs: mx.array) -> mx.array:
        key[0], draw = mx.random.split(key[0])
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1.0 / temp), key=draw)

    return sample
