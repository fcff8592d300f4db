"""The fixture would catch the usual porting mistakes: each one, made in the torch
reference, changes the greedy answer about the test video, while the MLX port's
answer (`sfllava generate --json`) equals the reference made without mistakes.
"""

from __future__ import annotations

import pytest

from tests.conftest import LAYOUTS, MAX_TOKENS, QUESTION
from tests.reference import Mistakes, Reference

pytestmark = pytest.mark.slow  # the torch reference answers once per mistake

MISTAKES = {
    "bgr-frames": Mistakes(bgr=True),
    "frame-index-off-by-one": Mistakes(index_offset=1),
    # the feature layer next to the right one: SigLIP's last block instead of the
    # penultimate (LLaVA's -2), Oryx's penultimate block instead of the last
    "wrong-feature-layer": {"llava-siglip": Mistakes(feature_layer=-1),
                            "oryx-vit": Mistakes(feature_layer=-2)},
    "pool-before-projector": Mistakes(pool_before_projector=True),
    "slow-fast-swapped": Mistakes(swap_streams=True),  # fast block first
    "slow-fast-strides-swapped": Mistakes(swap_strides=True),  # slow frames pooled hard
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_answer_is_decisive_and_follows_the_video(layout, references, reference_answers, videos):
    """Greedy choices win by a clear margin (so float32 noise cannot flip a token), and a
    different video gets a different answer."""
    ans = reference_answers[layout]
    assert len(ans.tokens) >= 4
    assert min(ans.margins) > 1e-2, f"top-1 vs top-2 logit margins {ans.margins}"
    other = references[layout].answer(videos["other"], QUESTION, MAX_TOKENS)
    assert other.tokens != ans.tokens


@pytest.mark.parametrize("mistake", MISTAKES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mistake_changes_the_answer(layout, mistake, sources, videos, reference_answers, cli_answers):
    m = MISTAKES[mistake]
    m = m[layout] if isinstance(m, dict) else m
    wrong = Reference(sources[layout], mistakes=m).answer(videos["main"], QUESTION, MAX_TOKENS)
    right = reference_answers[layout]
    assert wrong.tokens != right.tokens, f"{mistake} does not change the answer: the fixture is blind to it"
    assert cli_answers[layout]["tokens"] == right.tokens
