"""The `sfllava` command (design.md §6.1): one subcommand a module (or package) of `app/`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sfllava_mlx import __version__
from sfllava_mlx.errors import UserError

SUBCOMMANDS = [
    ("convert", ".convert", "convert an SF-LLaVA-1.5 checkpoint to an MLX model directory"),
    ("generate", ".generate", "answer one question about a video"),
    ("chat", ".chat", "chat about a video in the terminal"),
    ("frames", ".frames", "show (and save) the frames the model will see"),
    ("bench", ".bench", "stage-by-stage latency profile"),
    ("export-coreml", ".export_coreml", "export the vision tower to Core ML"),
    ("serve", ".serve", "an OpenAI-compatible local server for video chat"),
    ("batch", ".batch", "answer questions about many videos, resumable, over several Macs"),
    ("eval", ".eval", "a video benchmark's accuracy table (Video-MME, MVBench, LongVideoBench)"),
    ("cache", ".cache", "list or clear the video cache"),
    ("models", ".models", "list the runnable models on disk (hub cache, converted models)"),
]


def build_parser(argv=()) -> argparse.ArgumentParser:
    """All subcommands are listed; only the one being run is imported (start-up time)."""
    parser = argparse.ArgumentParser(
        prog="sfllava", description="Chat about a local video with SlowFast-LLaVA-1.5 in MLX.")
    parser.add_argument("--version", action="version", version=f"sfllava {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name, help_text in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name, __package__)
            module.add_arguments(p)
            p.set_defaults(run=module.main)
    return parser


PART_FLAGS = ("--start", "--end")


def join_part_values(argv: list) -> list:
    """`--end -0:05` as `--end=-0:05`: argparse takes a value that starts with "-" and is not
    a plain number for a flag, and answers with its usage; joined, the library refuses the
    time in its one line, as it does `--end -5`."""
    out = []
    for arg in argv:
        if out and out[-1] in PART_FLAGS and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def report_error(e: UserError) -> None:
    print(f"error: {e}", file=sys.stderr)
    if e.details:
        print(e.details, file=sys.stderr)


def main(argv=None) -> int:
    argv = join_part_values(sys.argv[1:] if argv is None else [str(a) for a in argv])
    args = build_parser(argv).parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as e:
        report_error(e)
        return 2
    except KeyboardInterrupt:
        return 130  # Ctrl-C: quietly (design.md §6.1)
    except BrokenPipeError:
        return 0


def entry() -> None:
    code = main()
    if code == 130:
        # Ctrl-C: everything is written; a worker thread still decoding must not race the
        # interpreter's shutdown (seen: glibc's "exception not rethrown" abort).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":  # python -m sfllava_app.cli (the same as `sfllava`)
    entry()
