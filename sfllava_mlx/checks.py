"""What a request names, checked before anything heavy is imported or loaded (design.md §3): the
media file, the model reference and the option values. The commands call `check_request`
first, so a user's mistake ends within a second; `Engine.prepare` runs the same media check.
Nothing here imports mlx-lm, transformers or torch."""

from __future__ import annotations

import os
from typing import Optional

from .errors import VideoError
from .hub import check_reference
from .options import Options


def check_media(path: str) -> str:
    """"image" or "video" for a file that can be opened as one (`media.open_media`, the file
    closed again); VideoError (ImageError for a file named like a picture) for a missing
    or unreadable one. Decodes a video's first frame only."""
    if not os.path.exists(path):  # before the decoders are imported
        raise VideoError(f"video not found: {path}")
    from .media import Video, open_media

    media = open_media(path)
    if isinstance(media, Video):
        media.close()
        return "video"
    return "image"


def check_request(model: Optional[str], media: Optional[str], **options) -> Options:
    """The options parsed and checked, the model reference a directory or a hub repo id,
    the media readable: UserError otherwise (the cheapest checks first)."""
    opts = Options.of(**options)
    if model is not None:
        check_reference(str(model))
    if media is not None:
        check_media(os.path.expanduser(str(media)))
    return opts
