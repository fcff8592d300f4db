"""SlowFast-LLaVA-1.5 in MLX: chat about a local video, on device."""

__version__ = "0.1.0"


def load(path_or_repo, dtype=None):
    """Load a converted model directory (or hub repo id): returns (model, tokenizer)."""
    from .model import load as _load

    return _load(path_or_repo, dtype=dtype)
