"""What a request names, checked before anything heavy is imported or loaded (design.md §3): the
model reference and the option values. The commands call `check_request` first, so a user's
mistake ends within a second, then open the media once (`media.open_media`: a missing or
unreadable file refused before the model loads) for every step to take. Nothing here
imports mlx-lm, transformers or torch."""

from __future__ import annotations

from typing import Optional

from .hub import check_reference
from .options import Options


def check_request(model: Optional[str], **options) -> Options:
    """The options parsed and checked, the model reference a directory or a hub repo id:
    UserError otherwise (the cheapest checks first)."""
    opts = Options.of(**options)
    if model is not None:
        check_reference(str(model))
    return opts
