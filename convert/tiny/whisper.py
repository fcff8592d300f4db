"""A tiny random-weight Whisper, for the speech tests and the subtitles benchmark."""

from __future__ import annotations

import json
from pathlib import Path


def write_tiny_whisper(path: Path, seed: int = 0, width: int = 64, layers: int = 1,
                       heads: int = 2, text_ctx: int = 64) -> Path:
    """A random-weight Whisper in mlx-whisper's directory layout (config.json +
    weights.safetensors): the multilingual vocabulary and 80 mel bins of whisper-tiny,
    tiny widths, and a short text context (answers of at most 32 tokens a window)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper  # the `speech` extra

    dims = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=width, n_audio_head=heads,
                n_audio_layer=layers, n_vocab=51865, n_text_ctx=text_ctx, n_text_state=width,
                n_text_head=heads, n_text_layer=layers)
    mx.random.seed(seed)
    model = Whisper(ModelDimensions(**dims), mx.float32)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "weights.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps({"model_type": "whisper", **dims}))
    return path
