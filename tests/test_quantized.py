"""Quantized conversion (`-q --q-bits 4|8`): the model loads, answers, computes exactly
what its quantized weights say, and its logits for the spliced video prompt stay within a
stated distance of the float32 model's.

These tests use the tiny checkpoint as the builder makes it (initialiser-like random
weights), not the sharpened one of the other numeric tests: sharpening makes attention so
peaked that any weight perturbation is amplified (4-bit moves its logits by their full
scale), which would make a bound on the logit distance say nothing.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from tests.conftest import MAX_TOKENS, QUESTION, SEED, convert_checkpoint

LAYOUT = "oryx-vit"  # quantization touches the LLM only, the same in both layouts

# max |logit(quantized) - logit(float32)| over every position of the spliced prompt (Nv = 224
# visual tokens + text), logits spanning about 2.3 per position (max |logit| 1.7).
# Measured on this fixture (CPU, MLX 0.32, group size 64): 4-bit 0.349, 8-bit 0.0254 (the
# ratio ~14 is what a 16x finer step gives). Bounds: the measurement plus ~40%.
LOGIT_BOUND = {4: 0.5, 8: 0.036}


@pytest.fixture(scope="module")
def plain(work, videos):
    """The unsharpened tiny source, its float32 conversion and that model's logits."""
    from sfllava_convert.tiny import write_source_checkpoint
    from sfllava_mlx import load

    src = write_source_checkpoint(work / f"src-{LAYOUT}-plain", layout=LAYOUT, seed=SEED)
    dst = convert_checkpoint(src, work / f"mlx-{LAYOUT}-plain", "--dtype", "float32")
    model, tokenizer = load(dst)
    return dict(src=src, model=model, logits=spliced_logits(model, tokenizer, videos["main"]))


def visual_tokens(model, video):
    from sfllava_mlx.encode import encode_video
    from sfllava_mlx.frames import read_frames

    s = model.config.recipe()
    return encode_video(model, read_frames(video, num_frames=s.num_frames, slow_every=s.slow_every), s)


def spliced_logits(model, tokenizer, video, language_model=None) -> np.ndarray:
    """The runtime's own pipeline: frames, visual tokens, ChatML splice, LLM logits."""
    from tests.pieces import first_turn_tokens

    visual = visual_tokens(model, video)
    pieces = first_turn_tokens(tokenizer, model.config.prompt.system_prompt, QUESTION)
    embeds = mx.concatenate([model.embed_tokens(pieces.prefix),
                             visual.embeddings.astype(mx.float32),
                             model.embed_tokens(pieces.suffix)])
    llm = language_model or model.language_model
    logits = llm(mx.zeros((1, embeds.shape[0]), dtype=mx.int32), input_embeddings=embeds[None])[0]
    return np.array(logits.astype(mx.float32))


def dequantized_copy(quantized: nn.Module, float_model: nn.Module) -> nn.Module:
    """float_model with every quantized layer's weight replaced by its dequantized value."""
    new = {}
    for path, m in quantized.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            new[f"{path}.weight"] = mx.dequantize(m.weight, m.scales, m.biases,
                                                  group_size=m.group_size, bits=m.bits)
    assert new
    float_model.update(tree_unflatten(list(new.items())))
    return float_model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_loads_answers_and_stays_close(bits, work, plain, videos):
    from sfllava_mlx import load
    from sfllava_mlx.conversation import Conversation

    dst = convert_checkpoint(plain["src"], work / f"mlx-{LAYOUT}-q{bits}", "--dtype", "float32",
                             "-q", "--q-bits", bits)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits
    model, tokenizer = load(dst)
    quantized = [m for _, m in model.language_model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert quantized and all(m.bits == bits for m in quantized)
    # Only the LLM is quantized: the vision side keeps its float weights.
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                   for _, m in list(model.vision_tower.named_modules()) + list(model.projector.named_modules()))
    for name, v in tree_flatten(model.vision_tower.parameters()) + tree_flatten(model.projector.parameters()):
        assert v.dtype == mx.float32, name

    logits = spliced_logits(model, tokenizer, videos["main"])
    diff = float(np.abs(logits - plain["logits"]).max())
    print(f"{bits}-bit: max |logit - float32 logit| = {diff:.3g} "
          f"(max |float32 logit| {np.abs(plain['logits']).max():.3g})")  # shown with -s
    assert 0 < diff <= LOGIT_BOUND[bits]

    # What the quantized kernels compute is the float model with the dequantized weights.
    float_again, _ = load(work / f"mlx-{LAYOUT}-plain")
    llm = dequantized_copy(model.language_model, float_again.language_model)
    same = spliced_logits(model, tokenizer, videos["main"], language_model=llm)
    print(f"{bits}-bit: max |quantized kernels - dequantized float| = {np.abs(logits - same).max():.3g}")
    assert float(np.abs(logits - same).max()) <= 1e-4

    conv = Conversation(model, tokenizer, visual_tokens(model, videos["main"]))
    for _ in conv.ask(QUESTION, max_tokens=MAX_TOKENS):
        pass
    turn = conv.last_turn
    assert turn.tokens and len(turn.tokens) == len(turn.logprobs)
    assert all(np.isfinite(lp) and lp <= 0 for lp in turn.logprobs)
