"""`sfllava batch`: the run on one rank (see the package's docstring for the steps)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sfllava_mlx.errors import UserError
from sfllava_mlx.options import Options, requested, with_answer

from ..fmt import count
from ..options import (
    ask_options,
    check_decode_concurrency,
    checked_options,
    engine_options,
    session_options,
)
from . import inputs, results
from .progress import Progress


@dataclass
class Item:
    """A video (or picture) of the library, and the prompts this run answers about it
    (batch: every prompt for every video; eval: the questions about this video)."""

    index: int  # in input order
    video: str  # as given
    path: str  # absolute
    fingerprint: Optional[str]
    duration: float
    pending: list  # prompts this run answers for it
    options: dict  # the options as it resolves them: its lines' `options` and keys
    error: Optional[str] = None  # why they could not be resolved (its lines are errors)
    prompts: list = field(default_factory=list)  # every prompt of it, done or not
    given: dict = field(default_factory=dict)  # its options as given (`session_options`)
    subtitle_block: str = ""  # eval: the one its questions carry (`Eval.resolve`)


def message(e: BaseException) -> str:
    """The one line an error line carries."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(e, UserError):
        return first or type(e).__name__
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class Batch:
    """One rank's run. Eval (`app/eval/run.py`) drives the same run with its own items:
    `read_inputs`, `candidates`, `given`, `prompts_for`, `question` and `line` are what it
    changes."""

    name = "batch"  # the command, in its messages

    def __init__(self, args, group):
        self.args = args
        self.group = group
        self.rank, self.size = group.rank, group.size
        self.out = Path(os.path.abspath(args.out))

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
            self.say(f"{self.name}: an unfinished run (stopped, or a rank killed) left "
                     f"{sum(leftover.values())} answers in the part files of rank"
                     f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: "
                     "merging them, answering only what is missing")

        videos, skipped = self.discover()
        if not videos:
            if self.rank != 0:
                return 0
            raise UserError(f"no video found in {' '.join(self.args.paths)}"
                            + (f" ({skipped} other files)" if skipped else ""))
        wanted = self.schedule(videos)
        self.report_schedule(videos, skipped, wanted)
        mine = [v for v, r in zip(self.todo, self.ranks) if r == self.rank]
        try:
            self.answer(mine)
        except KeyboardInterrupt:
            if self.size == 1:
                self.merge_locally(wanted)
            self.say(f"{self.name}: interrupted; every answer so far is kept: run the same command "
                     "again to finish")
            raise
        return self.finish(wanted)

    # -- 1. set-up, local to this rank ---------------------------------------------------
    def setup(self) -> None:
        check_decode_concurrency(self.args)
        self.options = checked_options(self.args)  # a bad value: refused before the model
        self.read_inputs()
        if self.out.is_dir():
            raise UserError(f"--out {self.args.out} is a directory; name a .jsonl file")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the folder of --out {self.args.out}: "
                            f"{e.strerror or e}") from None
        from sfllava_mlx import Engine  # after every check: the heavy imports

        self.engine = Engine(self.args.model, **engine_options(self.args))
        self.identity = self.engine.identity  # hashed once, not per video
        # What this rank can see of the results: --out (rank 0) and part files.
        self.read_paths = results.owned_parts(self.out, self.rank, self.size)
        seen = [results.read(p) for p in self.read_paths]
        self.leftover = {p.name: len(ls.records) for p, ls in zip(self.read_paths, seen)
                         if ls.records}
        if self.rank == 0:
            seen.append(results.read(self.out))
        self.done_local = {results.record_key(rec) for ls in seen for rec in ls.records
                           if rec.get("model_identity") == self.identity}

    # -- 2. what to answer ---------------------------------------------------------------
    def key(self, v: Item, prompt: str) -> str:
        return results.pair_key(v.fingerprint, v.video, prompt, self.identity, v.options)

    def resolve(self, media, given: dict) -> tuple:
        """(the options as `media` — the file `inputs.inspect` opened, or its path where it
        cannot be opened — resolves them, None), or (the options as given, the error) where
        it cannot: its pairs are then error lines keyed by those."""
        try:
            record = self.engine.resolve(media, **given)
        except UserError as e:
            return requested(Options.of(**given)), message(e)
        return with_answer(record, self.options), None

    def read_inputs(self) -> None:
        """What is asked, read (and refused) before the model is loaded."""
        self.prompts = inputs.read_prompts(self.args)

    def candidates(self) -> list:
        """The files to answer about (`inputs.Candidate`), in input order, on every rank."""
        found = inputs.expand(self.args.paths) if self.rank == 0 else None
        return [inputs.Candidate(**c) for c in
                self.group.broadcast_json(inputs.to_json(found) if found is not None else None)]

    def given(self, c) -> dict:
        """The options given for candidate `c` (eval: a video's own subtitle file)."""
        return session_options(self.args)

    def prompts_for(self, v: Item) -> list:
        """The prompts asked about item `v` (its options resolved)."""
        return self.prompts

    def question(self, v: Item, prompt: str) -> str:
        """The text asked for `prompt` (eval: without the subtitle block the engine adds)."""
        return prompt

    def line(self, v: Item, prompt: str, rec: dict) -> dict:
        """The line written for `prompt` (eval adds its fields)."""
        return rec

    def discover(self):
        g = self.group
        candidates = self.candidates()
        given = [self.given(c) for c in candidates]

        def resolve(i):
            return lambda media: self.resolve(media, given[i])

        mine = {i: inputs.inspect(c, resolve(i)).__dict__
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
            options = info.options or requested(Options.of(**given[i]))
            v = Item(len(videos), c.video, c.path, info.fingerprint, info.duration, [], options,
                     info.error, given=given[i], subtitle_block=info.subtitle_block)
            v.prompts = self.prompts_for(v)
            videos.append(v)
        return videos, skipped

    def schedule(self, videos: list[Item]) -> list:
        """The (video, key) of every pair in input order; sets each video's pending prompts
        (a pair whose content another video of this run answers is not answered twice),
        `self.todo` (videos with pending prompts) and `self.ranks` (who answers each)."""
        wanted, claimed = [], set()
        self.total_done = 0
        for v in videos:
            for p in v.prompts:
                k = self.key(v, p)
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

    def report_schedule(self, videos, skipped, wanted) -> None:
        skip = (f" ({skipped} {'file is not a video' if skipped == 1 else 'files are not videos'}"
                ": skipped)" if skipped else "")
        where = f" over {self.size} processes" if self.size > 1 else ""
        self.say(f"batch: {count(len(videos), 'video')}{skip} x "
                 f"{count(len(self.prompts), 'prompt')} = {count(len(wanted), 'pair')}; "
                 f"{self.total_done} already in {self.args.out}, "
                 f"{self.pending_pairs} to answer{where}")

    # -- 4. answering ---------------------------------------------------------------------
    def answer(self, mine: list[Item]) -> None:
        from sfllava_mlx.batching import Decoder

        from .prefetch import FramePipeline

        prefetch = self.options.vision_backend == "mlx"  # Core ML reads all frames itself
        pipeline = FramePipeline(
            mine, lambda v: self.engine.prepare(_open_path(v), **v.given),
            self.engine.model.config.preprocess.image_size, decode=prefetch,
            cached=self.engine.cached)
        self.writer = results.PartWriter(results.part_path(self.out, self.rank))
        progress = Progress(self.rank, self.size, sum(len(v.pending) for v in mine))
        self.decoder = Decoder(self.engine.model, self.engine.tokenizer,
                               self.args.decode_concurrency)
        try:
            for j, v in enumerate(mine):
                self.answer_item(v, pipeline.take(j), progress)
        finally:
            self.decoder.close()
            pipeline.close()
            progress.close()
            self.writer.close()

    def answer_item(self, v: Item, prefetched, progress) -> None:
        import mlx.core as mx

        mx.reset_peak_memory()
        try:
            if v.error is not None:
                raise UserError(v.error)
            session = self.engine.open(prefetched.opening(), reader=prefetched.frames)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # the batch goes on: one error line per prompt
            for p in v.pending:
                self.write(v, p, None, message(e))
                progress.advance(failed=True)
            return
        finally:
            prefetched.close()
        for warning in session.warnings:  # e.g. a broken subtitle file beside the video
            progress.note(f"warning: {v.video}: {warning}")
        together = self.together(v, session)
        if together > 1:
            self.answer_together(v, session, together, progress)
        else:
            self.answer_one_by_one(v, session, progress)

    def together(self, v: Item, session) -> int:
        """How many of this video's prompts decode together: --decode-concurrency, fewer
        where the memory plan says so; 1 for a KV cache that decodes alone (--kv-bits,
        --max-kv-size)."""
        from sfllava_mlx.memory import batch_size

        wanted = min(self.args.decode_concurrency, len(v.pending))
        if wanted < 2 or not self.decoder.takes(session.conversation):
            return 1
        k = batch_size(session.opening.memory, wanted)
        if k < wanted:
            print(f"{self.name}: {v.video}: its prompts decode {k} at a time, not {wanted}: the memory "
                  "plan counts every answer's KV cache", file=sys.stderr, flush=True)
        return k

    def answer_together(self, v: Item, session, together: int, progress) -> None:
        """The prompts' answers decode as one batch from copies of the prefilled prefix
        (`sfllava_mlx.batching`); each line is written as its answer ends."""
        from sfllava_mlx.batching import answer_all

        forks = {}

        def asks():
            for k, p in enumerate(v.pending):
                forks[k] = session.fork()  # the first carries the open's work and timings
                yield forks[k].ask(self.question(v, p), decoder=self.decoder,
                                   **ask_options(self.args))

        try:
            session.prefill()
        except KeyboardInterrupt:
            raise
        except Exception as e:
            for p in v.pending:
                self.write(v, p, None, message(e))
                progress.advance(failed=True)
            return
        for k, error in answer_all(self.decoder, asks(), together):
            p = v.pending[k]
            if error is not None:
                self.write(v, p, None, message(error))
            else:
                self.write(v, p, forks.pop(k).record(), None)
            progress.advance(failed=error is not None)
        session.save()  # warms the video cache for `sfllava chat`

    def answer_one_by_one(self, v: Item, session, progress) -> None:
        for k, p in enumerate(v.pending):
            if k:
                session.reset()  # each pair is a conversation of its own
            try:
                for _ in session.ask(self.question(v, p), **ask_options(self.args)):
                    pass
                rec = session.record()
            except KeyboardInterrupt:
                raise
            except Exception as e:
                self.write(v, p, None, message(e))
                progress.advance(failed=True)
                continue
            self.write(v, p, rec, None)
            progress.advance(failed=False)
            session.save()  # warms the video cache for `sfllava chat` (a no-op once saved)

    def write(self, v: Item, prompt: str, answer: Optional[dict], error: Optional[str]) -> None:
        rec = {"video": v.video, "prompt": prompt, "fingerprint": v.fingerprint,
               "model": self.args.model, "model_identity": self.identity}
        if answer is None:
            rec.update(dict.fromkeys(results.ANSWER_FIELDS))
        else:  # generate --json's object, whatever fields it has
            rec.update({k: x for k, x in answer.items() if k not in rec and k != "error"})
        rec["options"] = v.options  # what it was keyed by: the resolution before answering
        rec["error"] = error
        self.writer.write(self.line(v, prompt, rec))

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
        self.say(f"{self.name}: {count(answered_now, 'pair')} answered in this run; {self.args.out} holds "
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


def _open_path(v: Item) -> str:
    """The path as given where it names the same file here (error messages then read as
    `generate`'s), else the absolute path rank 0 found."""
    return v.video if os.path.abspath(v.video) == v.path else v.path
