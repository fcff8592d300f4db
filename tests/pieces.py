"""The pipeline's pieces assembled whole, for the numeric tests: the library runs them a frame
(or a turn) at a time, these put the whole video's pooling and the first turn's tokens side by
side with a reference."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from sfllava_mlx.pooling import concat_streams, is_slow, pool_frames, stride_of
from sfllava_mlx.prompt import encode, first_turn


def slowfast_pool(grid: mx.array, sampling, newline=None) -> mx.array:
    """(T, G, G, D) projected tokens in position order -> (Nv, D): slow block, then fast."""
    blocks = []
    for slow in (True, False):
        rows = [t for t in range(grid.shape[0]) if is_slow(t, sampling) == slow]
        blocks.append(pool_frames(grid[mx.array(rows)], stride_of(slow, sampling),
                                  sampling.pool_mode) if rows else None)
    return concat_streams(*blocks, sampling=sampling, newline=newline)


@dataclass
class PromptPieces:
    prefix: list  # tokens before the video
    suffix: list  # tokens after the video: the question and the assistant header


def first_turn_tokens(tokenizer, system_prompt: str, question: str) -> PromptPieces:
    before, after = first_turn(system_prompt, question)
    return PromptPieces(encode(tokenizer, before), encode(tokenizer, after))
