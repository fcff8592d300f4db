"""`sfllava convert`: the library's conversion (`sfllava_mlx.checkpoints`), the same one the
first use of a Hugging Face checkpoint runs (design.md §5.4)."""

from sfllava_mlx.checkpoints.convert import ConversionReport, convert, prepare_conversion
from sfllava_mlx.checkpoints.layouts import group_dropped

__all__ = ["ConversionReport", "convert", "group_dropped", "prepare_conversion"]
