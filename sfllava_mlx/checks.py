"""What a request names, checked before anything heavy is imported or loaded (design.md §3): the
option values, the model reference and that the media file is there. The commands call
`check_request` first, so a user's mistake ends within a second, then open the media once
(`media.open_media`, which starts with the same `media_path`) for every step to take.
Nothing here imports mlx, mlx-lm, PyAV, transformers or torch."""

from __future__ import annotations

import os
from typing import Optional

from .errors import VideoError
from .hub import check_reference
from .options import Options


def media_path(media, noun: str = "video") -> str:
    """The path a request names, `~` expanded; VideoError where nothing is there."""
    path = os.path.expanduser(str(media))
    if not os.path.exists(path):
        raise VideoError(f"{noun} not found: {path}")
    return path


def check_request(model: Optional[str], media: Optional[str] = None, noun: str = "video",
                  **options) -> Options:
    """The options parsed and checked, the model reference a directory or a hub repo id,
    the media file there: UserError otherwise (the cheapest checks first)."""
    opts = Options.of(**options)
    if model is not None:
        check_reference(str(model))
    if media is not None:
        media_path(media, noun)
    return opts
