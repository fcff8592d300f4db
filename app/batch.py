"""`sfllava batch PATH... --model DST --prompt TEXT [--prompt ...] --out results.jsonl`
(SPEC §6): every (video, prompt) pair answered as `generate` would, resumable, over one
process or every rank `mlx.launch` starts.

    one Mac:    sfllava batch ~/Movies --model ~/models/sfllava --prompt "Describe it." --out r.jsonl
    several:    mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- sfllava batch ...

The run, on every rank (a plain run is a group of one):
1. load the model (once), read what this rank can see of the results (`--out` on rank 0,
   part files everywhere) and share the keys of the pairs already done;
2. rank 0 lists the PATHs; the ranks fingerprint (and, for files found in directories,
   open) a stride of them each, and share what they found;
3. every rank computes the same plan: the pairs not done yet, the videos holding them
   shared out by duration (`batch_inputs.share_out`);
4. each rank answers its videos in input order, the next video decoding while the
   current one is encoded and answered (`batch_prefetch`), each answer a synced line of
   its part file (`batch_results`), and the video cache warmed for `sfllava chat`;
5. the ranks wait for one another, send rank 0 their part files' lines, rank 0 writes the
   merged `--out` in input order, then the part files are removed.
Rank 0 alone reports and sets the exit status (0: every pair answered, 1: some failed,
2: usage error); the other ranks exit 0. A rank killed midway (mlx.launch then stops the
others) leaves whole lines in part files: the same command again merges them and answers
only what is missing.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sfllava_mlx.errors import UserError

from . import batch_inputs as inputs
from . import batch_results as results
from .batch_progress import Progress
from .options import add_generation_arguments

def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="video files, and directories searched recursively for videos")
    p.add_argument("--model", required=True, help="converted model directory or hub repo id")
    ask = p.add_mutually_exclusive_group(required=True)
    ask.add_argument("--prompt", action="append", metavar="TEXT",
                     help="a question asked about every video (repeat it for several)")
    ask.add_argument("--prompts-file", metavar="F", help="questions, one a line")
    p.add_argument("--out", required=True, metavar="FILE.jsonl",
                   help="results, one JSON line per (video, prompt); the same command again "
                        "answers only what is missing")
    add_generation_arguments(_WithoutJson(p))


class _WithoutJson:
    """generate's options, less --json (batch always writes JSON Lines to --out)."""

    def __init__(self, parser):
        self._parser = parser

    def add_argument(self, *names, **kwargs):
        if "--json" not in names:
            return self._parser.add_argument(*names, **kwargs)
        return None

    def __getattr__(self, name):
        return getattr(self._parser, name)


@dataclass
class Video:
    index: int  # in input order
    video: str  # as given
    path: str  # absolute
    fingerprint: Optional[str]
    duration: float
    pending: list  # prompts this run answers for it


def main(args) -> int:
    from .batch_dist import Group

    return Batch(args, Group()).run()


def message(e: BaseException) -> str:
    """The one line an error line carries."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(e, UserError):
        return first or type(e).__name__
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class Batch:
    def __init__(self, args, group):
        self.args = args
        self.group = group
        self.rank, self.size = group.rank, group.size
        self.out = Path(os.path.abspath(args.out))
        self.recipe = getattr(args, "recipe", None) or "native"

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=sys.stderr, flush=True)

    # ---------------------------------------------------------------------------------
    def run(self) -> int:
        error = None
        try:
            self.setup()
        except UserError as e:
            error = str(e)
        # Every rank learns whether all could start, and what is already done.
        shared = self.group.exchange_json({
            "error": error,
            "keys": [] if error else sorted(self.done_local),
            "leftover": {} if error else self.leftover,
        })
        failures = [(r, s["error"]) for r, s in enumerate(shared) if s["error"]]
        if failures:
            if self.rank != 0:
                return 0  # rank 0 reports
            r, text = next(((r, t) for r, t in failures if r == 0), failures[0])
            raise UserError(text if r == 0 else f"rank {r}: {text}")
        self.done = set().union(*(set(s["keys"]) for s in shared))
        leftover = {}
        for s in shared:
            leftover.update(s["leftover"])
        if leftover:
            ranks = sorted(int(n.rsplit(".rank", 1)[1].split(".")[0]) for n in leftover)
            self.say(f"batch: an unfinished run (stopped, or a rank killed) left "
                     f"{sum(leftover.values())} answers in the part files of rank"
                     f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: "
                     "merging them, answering only what is missing")

        videos, skipped = self.discover()
        if not videos:
            if self.rank != 0:
                return 0
            raise UserError(f"no video found in {' '.join(self.args.paths)}"
                            + (f" ({skipped} other files)" if skipped else ""))
        wanted = self.plan(videos)
        self.report_plan(videos, skipped, wanted)
        mine = [v for v, r in zip(self.todo, self.ranks) if r == self.rank]
        try:
            self.answer(mine)
        except KeyboardInterrupt:
            if self.size == 1:
                self.merge_locally(wanted)
            self.say("batch: interrupted; every answer so far is kept: run the same command "
                     "again to finish")
            raise
        return self.finish(wanted)

    # -- 1. set-up, local to this rank ---------------------------------------------------
    def setup(self) -> None:
        from app import runner
        from sfllava_mlx import cache as vcache

        self.prompts = inputs.read_prompts(self.args)
        if self.out.is_dir():
            raise UserError(f"--out {self.args.out} is a directory; name a .jsonl file")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the folder of --out {self.args.out}: "
                            f"{e.strerror or e}") from None
        self.model, self.tokenizer = runner.load_model(self.args)
        self.identity = vcache.model_identity(self.model)
        self.model.identity = self.identity  # hashed once, not per video
        # What this rank can see of the results: --out (rank 0) and part files.
        self.read_paths = results.owned_parts(self.out, self.rank, self.size)
        seen = [results.read(p) for p in self.read_paths]
        self.leftover = {p.name: len(ls.records) for p, ls in zip(self.read_paths, seen)
                         if ls.records}
        if self.rank == 0:
            seen.append(results.read(self.out))
        self.done_local = set()
        for ls in seen:
            for rec in ls.records:
                if (rec.get("model_identity") == self.identity
                        and (rec.get("recipe") or "native") == self.recipe):
                    self.done_local.add(results.record_key(rec))

    # -- 2. what to answer ---------------------------------------------------------------
    def key(self, fingerprint, video, prompt) -> str:
        return results.pair_key(fingerprint, video, prompt, self.identity, self.recipe)

    def discover(self):
        g = self.group
        found = inputs.expand(self.args.paths) if self.rank == 0 else None
        candidates = [inputs.Candidate(**c) for c in
                      g.broadcast_json(inputs.to_json(found) if found is not None else None)]
        known = {k[0][3:] for k in map(json.loads, self.done) if k[0].startswith("fp:")}

        def needs_duration(fp):
            return any(self.key(fp, "", p) not in self.done for p in self.prompts)

        mine = {i: inputs.inspect(c, known, needs_duration).__dict__
                for i, c in enumerate(candidates) if i % self.size == self.rank}
        table = {}
        for part in g.exchange_json(mine):
            table.update({int(i): v for i, v in part.items()})
        videos, skipped = [], 0
        for i, c in enumerate(candidates):
            info = inputs.Inspected(**table[i])
            if info.kind == "skip":
                skipped += 1
                continue
            videos.append(Video(len(videos), c.video, c.path, info.fingerprint, info.duration, []))
        return videos, skipped

    def plan(self, videos: list[Video]) -> list:
        """The (video, key) of every pair in input order; sets each video's pending prompts
        (a pair whose content another video of this run answers is not answered twice),
        `self.todo` (videos with pending prompts) and `self.ranks` (who answers each)."""
        wanted, claimed = [], set()
        self.total_done = 0
        for v in videos:
            for p in self.prompts:
                k = self.key(v.fingerprint, v.video, p)
                wanted.append((v.video, k))
                if k in self.done:
                    self.total_done += 1
                elif k not in claimed:
                    claimed.add(k)
                    v.pending.append(p)
        self.todo = [v for v in videos if v.pending]
        self.ranks = inputs.share_out([v.duration for v in self.todo], self.size)
        self.pending_pairs = sum(len(v.pending) for v in self.todo)
        return wanted

    def report_plan(self, videos, skipped, wanted) -> None:
        skip = (f" ({skipped} {'file is not a video' if skipped == 1 else 'files are not videos'}"
                ": skipped)" if skipped else "")
        where = f" over {self.size} processes" if self.size > 1 else ""
        self.say(f"batch: {_count(len(videos), 'video')}{skip} x "
                 f"{_count(len(self.prompts), 'prompt')} = {_count(len(wanted), 'pair')}; "
                 f"{self.total_done} already in {self.args.out}, "
                 f"{self.pending_pairs} to answer{where}")

    # -- 4. answering ---------------------------------------------------------------------
    def answer(self, mine: list[Video]) -> None:
        from app import runner
        from sfllava_mlx import cache as vcache

        from .batch_prefetch import FramePipeline

        args = self.args
        store = vcache.VideoCache() if runner.use_cache(args) else None
        frame_options = runner.frame_options(self.model, args)
        prefetch = getattr(args, "vision_backend", "mlx") == "mlx"
        from sfllava_mlx.image import is_picture

        # Pictures have no frames to decode ahead.
        paths = [_open_path(v) if prefetch and not is_picture(_open_path(v)) else None
                 for v in mine]
        pipeline = FramePipeline(paths, frame_options, self.model.config.preprocess.image_size,
                                 skip=lambda j: self.likely_cached(mine[j], store))
        self.writer = results.PartWriter(results.part_path(self.out, self.rank))
        progress = Progress(self.rank, self.size, sum(len(v.pending) for v in mine))
        try:
            for j, v in enumerate(mine):
                self.answer_video(v, pipeline.take(j), store, progress)
        finally:
            pipeline.close()
            progress.close()
            self.writer.close()

    def likely_cached(self, v: Video, store) -> bool:
        """The video cache holds its visual tokens (then nothing needs decoding): the key
        `runner.open_video` looks up. Asked on the frame pipeline's thread."""
        if store is None or v.fingerprint is None:
            return False
        from app import runner
        from sfllava_mlx import cache as vcache

        args = self.args
        fp = vcache.VideoFingerprint(v.path, os.path.getsize(v.path), v.fingerprint, 0)
        key = vcache.make_key(fp, self.model, seek=getattr(args, "seek", "exact"),
                              vision_backend=getattr(args, "vision_backend", "mlx"),
                              sampling=runner.video_sampling(self.model, _open_path(v), args),
                              fps=getattr(args, "fps", None))
        return store.entry_dir(key).is_dir()

    def answer_video(self, v: Video, frames, store, progress) -> None:
        from app import runner

        runner.reset_peak_memory()
        try:
            opened = runner.open_media(self.model, self.tokenizer, _open_path(v), self.args,
                                       store=store, frames=frames)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # the batch goes on: one error line per prompt
            for p in v.pending:
                self.write(v, p, None, message(e))
                progress.advance(failed=True)
            return
        finally:
            if frames is not None:
                frames.close()
        options = runner.ask_options(self.args)
        for k, p in enumerate(v.pending):
            if k:
                opened.conv.reset()  # each pair is a conversation of its own
            try:
                for _ in opened.ask(p, **options):
                    pass
                rec = runner.turn_record(opened.conv.last_turn, opened.visual, opened.cache,
                                         runner.media_recipe(opened, self.args))
            except KeyboardInterrupt:
                raise
            except Exception as e:
                self.write(v, p, None, message(e))
                progress.advance(failed=True)
                continue
            self.write(v, p, rec, None)
            progress.advance(failed=False)
            opened.save()  # warms the video cache for `sfllava chat` (a no-op once saved)

    def write(self, v: Video, prompt: str, answer: Optional[dict], error: Optional[str]) -> None:
        rec = {"video": v.video, "prompt": prompt, "fingerprint": v.fingerprint,
               "model": self.args.model, "model_identity": self.identity, "recipe": self.recipe}
        if answer is None:
            rec.update(dict.fromkeys(results.ANSWER_FIELDS))
        else:  # generate --json's object, whatever fields it has
            rec.update({k: x for k, x in answer.items() if k not in rec and k != "error"})
        rec["error"] = error
        self.writer.write(rec)

    # -- 5. merging -----------------------------------------------------------------------
    def finish(self, wanted: list) -> int:
        g = self.group
        g.barrier()  # every rank has written its last line
        paths = results.owned_parts(self.out, self.rank, self.size)
        payload = b"".join(b"".join(results.read(p).raw) for p in paths)
        parts = g.exchange(f"{self.writer.written}\n".encode() + payload)
        code = 0
        if self.rank == 0:
            answered_now = 0
            records = results.read(self.out).records
            for part in parts:
                head, _, body = part.partition(b"\n")
                answered_now += int(head)
                records += results.parse(body).records
            code = self.write_out(records, wanted, answered_now)
        g.barrier()  # --out is written and synced: the part files can go
        results.remove(paths)
        g.barrier()  # rank 0 exits (and mlx.launch stops the others) only after that
        return code

    def write_out(self, records: list, wanted: list, answered_now: int) -> int:
        merged, answers = results.merge(records, wanted)
        data = b"".join(results.line(r) for r in merged)
        try:
            with open(self.out, "rb") as f:
                same = f.read() == data
        except FileNotFoundError:
            same = False
        if not same:
            results.write_atomic(self.out, data)
        keys = [k for _, k in wanted]
        missing = sum(1 for k in keys if k not in answers)
        failed = sum(1 for k in keys if k in answers and answers[k].get("error") is not None)
        self.say(f"batch: {_pairs(answered_now)} answered in this run; {self.args.out} holds "
                 f"{len(keys) - missing} of {len(keys)} pairs of this input"
                 + (f", {failed} failed" if failed else ""))
        if missing:
            print(f"error: {missing} of {len(keys)} pairs have no line; run the same command "
                  "again", file=sys.stderr)
            return 1
        if failed:
            print(f"error: {failed} of {len(keys)} pairs failed (lines with an `error`; remove "
                  "a line to retry its pair)", file=sys.stderr)
            return 1
        return 0

    def merge_locally(self, wanted: list) -> None:
        """After Ctrl-C in a single process: fold this run's part file into --out."""
        paths = results.owned_parts(self.out, self.rank, self.size)
        records = results.read(self.out).records
        for p in paths:
            records += results.read(p).records
        merged, _ = results.merge(records, wanted)
        results.write_atomic(self.out, b"".join(results.line(r) for r in merged))
        results.remove(paths)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _pairs(n: int) -> str:
    return _count(n, "pair")


def _open_path(v: Video) -> str:
    """The path as given where it names the same file here (error messages then read as
    `generate`'s), else the absolute path rank 0 found."""
    return v.video if os.path.abspath(v.video) == v.path else v.path
