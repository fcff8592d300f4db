"""KV caches beyond what mlx-lm gives: a conversation's cache cut back to a prefix."""

from __future__ import annotations

import copy
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache


def copy_prefix(cache: list, length: int) -> Optional[list]:
    """A copy of `cache` holding its first `length` positions (mlx-lm's caches, deep-copied
    and trimmed), or None where it cannot be cut back (a rotating cache that wrapped)."""
    if not cache or not can_trim_prompt_cache(cache) or cache[0].offset < length:
        return None
    out = copy.deepcopy(cache)
    trim_prompt_cache(out, out[0].offset - length)
    mx.eval([c.state for c in out])
    return out
