"""KV caches beyond what mlx-lm gives: a conversation's cache cut back to a prefix, copied
or shared."""

from __future__ import annotations

import copy
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, trim_prompt_cache


def copy_prefix(cache: list, length: int) -> Optional[list]:
    """A copy of `cache` holding its first `length` positions (mlx-lm's caches, deep-copied
    and trimmed), or None where it cannot be cut back (a rotating cache that wrapped)."""
    if not cache or not can_trim_prompt_cache(cache) or cache[0].offset < length:
        return None
    out = copy.deepcopy(cache)
    trim_prompt_cache(out, out[0].offset - length)
    mx.eval([c.state for c in out])
    return out


def share_prefix(cache: list, length: int) -> Optional[list]:
    """`copy_prefix` without copying where the caches are mlx-lm's KVCache: new cache objects
    over views of the same arrays, cut to `length`. MLX arrays are values, so what either
    writes later never shows in the other (and the first write past the cut allocates)."""
    if not cache or any(type(c) is not KVCache for c in cache) or cache[0].offset < length:
        return copy_prefix(cache, length)
    out = []
    for c in cache:
        d = KVCache()
        if c.keys is not None:
            d.keys, d.values = c.keys[..., :length, :], c.values[..., :length, :]
        d.offset = length
        out.append(d)
    return out
