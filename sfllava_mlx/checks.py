"""What a request names, checked before anything heavy is imported or loaded (SPEC §4): the
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
    """"image" or "video" for a file that can be opened as one; VideoError (ImageError for a
    file named like a picture) for a missing or unreadable one. Reads headers only."""
    if not os.path.exists(path):  # before the decoders are imported
        raise VideoError(f"video not found: {path}")
    from .frames.video import check_readable
    from .image import ImageError, is_picture, named_like_picture

    if is_picture(path):
        return "image"
    try:
        check_readable(path)
    except VideoError:
        if os.path.isfile(path) and named_like_picture(path):
            raise ImageError(f"{path} is not a picture (its content is not JPEG, PNG, WebP, "
                             "HEIC or AVIF) nor a video") from None
        raise
    return "video"


def check_request(model: Optional[str], media: Optional[str], **options) -> Options:
    """The options parsed and checked, the model reference a directory or a hub repo id,
    the media readable: UserError otherwise (the cheapest checks first)."""
    opts = Options.of(**options)
    if model is not None:
        check_reference(str(model))
    if media is not None:
        check_media(os.path.expanduser(str(media)))
    return opts
