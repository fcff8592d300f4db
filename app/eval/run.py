"""`sfllava eval`, the run: batch's run (`app/batch/run.py`) over the benchmark's videos, each
asked its own questions, each line scored as it is written.

The questions of one video are one item: its prefix encoded and prefilled once, its questions
decoded together (--decode-concurrency). A line's `prompt` — what it is keyed and resumed by,
as batch's — is the whole user text after the video: with subtitle lines kept, the engine's
subtitle block (design.md §2.5, from the frames that will be sampled) then the benchmark's
subtitled question; the engine adds the block itself, so the question alone is asked.
"""

from __future__ import annotations

import os

from sfllava_mlx.errors import UserError

from ..batch import inputs, results
from ..batch.run import Batch, Item
from ..fmt import count
from . import source, summary


class Eval(Batch):
    name = "eval"

    # -- what is asked -------------------------------------------------------------------
    def read_inputs(self) -> None:
        args = self.args
        if not os.path.isdir(args.videos):
            raise UserError(f"--videos {args.videos}: no such directory")
        if args.subtitle_dir is not None and not os.path.isdir(args.subtitle_dir):
            raise UserError(f"--subtitle-dir {args.subtitle_dir}: no such directory")
        self.bench = source.load(args.bench)
        self.format = self.bench.format
        questions = self.bench.questions[:args.limit] if args.limit else self.bench.questions
        self.by_video: dict = {}  # video as given -> its questions, in the benchmark's order
        for q in questions:
            self.by_video.setdefault(self.video_of(q), []).append(q)
        self.asked: dict = {}  # (video, prompt) -> (question, the text asked)

    def video_of(self, q) -> str:
        """The first of its names found under --videos, else its own (an error line)."""
        names = [os.path.join(self.args.videos, n) for n in q.videos]
        return next((n for n in names if os.path.isfile(n)), names[0])

    def candidates(self) -> list:
        return [inputs.Candidate(v, os.path.abspath(v), True) for v in self.by_video]

    def given(self, c) -> dict:
        given = super().given(c)
        q = self.by_video[c.video][0]
        if (given.get("subtitles", "auto") == "auto" and self.args.subtitle_dir
                and q.subtitle_file):
            own = os.path.join(self.args.subtitle_dir, q.subtitle_file)
            if os.path.isfile(own):  # the benchmark's own subtitles (Video-MME's .srt)
                given["subtitles"] = own
        return given

    def resolve(self, media, given: dict) -> tuple:
        """Batch's, and the subtitle block of the video's questions, from the same opened
        file (shared with the other ranks in the discovery's table)."""
        options, error = super().resolve(media, given)
        said = error is None and options.get("subtitles") is not None
        return options, error, self.subtitle_block(media, given) if said else ""

    def subtitle_block(self, media, given: dict) -> str:
        """The subtitle block the engine will put before the question ("" for none)."""
        try:
            lines = self.engine.subtitle_lines(self.engine.prepare(media, **given))
        except UserError:  # its answers will be error lines, saying why
            return ""
        return lines.prompt() if lines is not None else ""

    def prompts_for(self, v: Item) -> list:
        block = v.subtitle_block
        prompts = []
        for q in self.by_video[v.video]:
            question = q.prompt(subtitles=bool(block))
            prompt = f"{block}\n{question}" if block else question
            self.asked[(v.video, prompt)] = (q, question)
            prompts.append(prompt)
        return list(dict.fromkeys(prompts))

    def question(self, v: Item, prompt: str) -> str:
        return self.asked[(v.video, prompt)][1]

    # -- the lines -----------------------------------------------------------------------
    def line(self, v: Item, prompt: str, rec: dict) -> dict:
        q, _ = self.asked[(v.video, prompt)]
        response = rec.get("text")
        pred = self.format.extract(response, q) if rec["error"] is None else None
        out = {"benchmark": self.format.NAME, "question_id": q.question_id,
               "video": rec["video"], "prompt": prompt, "response": response, "pred": pred,
               "answer": q.answer, "correct": None if pred is None else pred == q.answer,
               **q.groups, "choices": q.choices, "options": rec["options"],
               "fingerprint": rec["fingerprint"]}
        out.update({k: x for k, x in rec.items() if k not in out})
        return out

    def report_schedule(self, videos, skipped, wanted) -> None:
        where = f" over {self.size} processes" if self.size > 1 else ""
        self.say(f"eval: {self.format.TITLE}, {count(len(wanted), 'question')} about "
                 f"{count(len(videos), 'video')}; {self.total_done} already in "
                 f"{self.args.out}, {self.pending_pairs} to answer{where}")

    def finish(self, wanted: list) -> int:
        code = super().finish(wanted)
        if self.rank == 0:
            keys = {k for _, k in wanted}
            lines = [r for r in results.read(self.out).records
                     if r.get("question_id") is not None and results.record_key(r) in keys]
            summary.show(lines, self.format, summary.summarize(lines, self.format),
                         self.args.json)
        return code
