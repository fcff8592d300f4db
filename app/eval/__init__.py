"""`sfllava eval BENCH --videos DIR --model DST --out FILE.jsonl` (design.md §9): a video
benchmark's table on your own Mac — Video-MME, MVBench or LongVideoBench, read as published,
asked in lmms-eval's words, scored with lmms-eval's answer extraction.

    sfllava eval lmms-lab/Video-MME --videos ~/Video-MME/data --model ~/models/sfllava \\
        --out videomme.jsonl [--subtitles auto --subtitle-dir ~/Video-MME/subtitle]
    sfllava eval --summary videomme.jsonl [--json]

The run is `sfllava batch`'s (`app/batch/run.py`: whole synced lines, resume, `mlx.launch`,
a video's questions decoded together, progress), one line per question; `--summary` reads a
finished or partial file without a model.
"""

from __future__ import annotations

from ..options import (
    COUNT,
    add_decode_concurrency_argument,
    add_model_argument,
    add_options,
)

MAX_TOKENS = 16  # lmms-eval's max_new_tokens for these benchmarks


def add_arguments(p) -> None:
    from sfllava_mlx.options import SPECS

    p.add_argument("bench", nargs="?", metavar="BENCH",
                   help="the benchmark: a parquet, JSON or JSON Lines file, a folder of them, "
                        "or a hub dataset id (Video-MME, MVBench, LongVideoBench)")
    p.add_argument("--summary", metavar="FILE.jsonl",
                   help="print the table of a finished or partial --out file (no model)")
    p.add_argument("--videos", metavar="DIR", help="the benchmark's videos, by its names")
    p.add_argument("--subtitle-dir", metavar="DIR",
                   help="the benchmark's own subtitle files (Video-MME: {videoID}.srt), used "
                        "with --subtitles auto")
    add_model_argument(p, required=False)  # --summary needs none
    p.add_argument("--out", metavar="FILE.jsonl",
                   help="results, one JSON line per question; the same command again answers "
                        "only what is missing")
    p.add_argument("--limit", metavar="N", help="only the first N questions")
    add_decode_concurrency_argument(p, "a video's questions")
    add_options(p, [n for n in SPECS if n != "max_tokens"])
    p.add_argument("--max-tokens", default=str(MAX_TOKENS), metavar="N",
                   help=f"most tokens per answer (default: {MAX_TOKENS}, lmms-eval's)")
    p.add_argument("--json", action="store_true",
                   help="the summary as one JSON object, the last line of stdout")


def main(args) -> int:
    from sfllava_mlx.errors import UserError

    if args.summary is not None:
        from .summary import summary_of_file

        return summary_of_file(args.summary, args.json)
    missing = [f for f, v in (("BENCH", args.bench), ("--videos", args.videos),
                              ("--model", args.model), ("--out", args.out)) if v is None]
    if missing:
        raise UserError(f"eval needs {', '.join(missing)} (or --summary FILE.jsonl)")
    if args.limit is not None:
        try:
            args.limit = COUNT.parse(args.limit)
        except ValueError:
            raise UserError(f"--limit must be {COUNT.words}, not {args.limit!r}") from None
    from ..batch.dist import Group
    from .run import Eval

    return Eval(args, Group()).run()
