"""`sfllava batch PATH... --model DST --prompt TEXT [--prompt ...] --out results.jsonl`
(design.md §8): every (video, prompt) pair answered as `generate` would, resumable, over one
process or every rank `mlx.launch` starts.

    one Mac:    sfllava batch ~/Movies --model ~/models/sfllava --prompt "Describe it." --out r.jsonl
    several:    mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- sfllava batch ...

The run, on every rank (a plain run is a group of one):
1. load the model (once), read what this rank can see of the results (`--out` on rank 0,
   part files everywhere) and share the keys of the pairs already done;
2. rank 0 lists the PATHs; the ranks open (once each, closed before the next) and
   fingerprint a stride of them each, and share what they found;
3. every rank computes the same plan: the pairs not done yet, the videos holding them
   shared out by duration (`inputs.share_out`);
4. each rank answers its videos in input order, the next video decoding while the
   current one is encoded and answered (`prefetch.py`); a video's prompts decode together
   from its prefilled prefix, up to --decode-concurrency (`sfllava_mlx.batching`), each
   answer a synced line of its part file (`results.py`) as it ends, and the video cache
   warmed for `sfllava chat`;
5. the ranks wait for one another, send rank 0 their part files' lines, rank 0 writes the
   merged `--out` in input order, then the part files are removed.
Rank 0 alone reports and sets the exit status (0: every pair answered, 1: some failed,
2: usage error); the other ranks exit 0. A rank killed midway (mlx.launch then stops the
others) leaves whole lines in part files: the same command again merges them and answers
only what is missing.
"""

from __future__ import annotations

from ..options import (
    add_decode_concurrency_argument,
    add_generation_arguments,
    add_model_argument,
)


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="video files, and directories searched recursively for videos")
    add_model_argument(p)
    ask = p.add_mutually_exclusive_group(required=True)
    ask.add_argument("--prompt", action="append", metavar="TEXT",
                     help="a question asked about every video (repeat it for several)")
    ask.add_argument("--prompts-file", metavar="F", help="questions, one a line")
    p.add_argument("--out", required=True, metavar="FILE.jsonl",
                   help="results, one JSON line per (video, prompt); the same command again "
                        "answers only what is missing")
    add_decode_concurrency_argument(p, "a video's answers")
    add_generation_arguments(p, json=False)  # batch always writes JSON Lines to --out


def main(args) -> int:
    from .dist import Group
    from .run import Batch

    return Batch(args, Group()).run()
