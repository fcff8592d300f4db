"""`sfllava export-coreml`: the Core ML vision tower for an already converted model."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sfllava_convert.coreml import DEFAULT_BATCH_SIZE

    parser.add_argument("--model", required=True, help="converted model directory")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"frames per Core ML call, fixed in the package (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--force", action="store_true",
                        help="replace an existing vision_tower.mlpackage")


def main(args: argparse.Namespace) -> int:
    from sfllava_convert.coreml import export
    from sfllava_mlx.model import resolve_model_path

    model_dir = resolve_model_path(args.model)
    path = export(model_dir, batch_size=args.batch_size, force=args.force,
                  log=lambda msg: print(msg, file=sys.stderr))
    print(path)
    return 0
