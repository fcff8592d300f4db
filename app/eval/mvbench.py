"""MVBench (`OpenGVLab/MVBench`): one JSON file per task (the task is the file's stem), each a
list of `video`, `question`, `candidates` (the options' texts), `answer` (the right one's text).

The words (`ASK`, `OPTION`, `END`) are lmms-eval's MVBench task's (`mvbench_doc_to_text`
and its tasks' `post_prompt`, read 2026-12-07): "Question:" and the question, "Option:",
each option as "(A) ..." on its own line, then "Only give the best option." and a newline.
Kept here, in one place.
"""

from __future__ import annotations

from . import score
from .question import Question

NAME = "mvbench"
TITLE = "MVBench"
FIELDS = ("video", "question", "candidates", "answer")
GROUPS = ("task",)
ORDER: dict = {}

ASK = "Question:{question}\nOption:\n"
OPTION = "({letter}) {text}\n"
END = "Only give the best option.\n"


def prompt(question: str, candidates: list) -> str:
    options = [OPTION.format(letter=k, text=c)
               for k, c in zip(score.letters(len(candidates)), candidates)]
    return ASK.format(question=question) + "".join(options) + END


def questions(rows: list, stem: str) -> list[Question]:
    from sfllava_mlx.errors import UserError

    out = []
    for i, row in enumerate(rows):
        candidates = [str(c) for c in row["candidates"]]
        answer = str(row["answer"])
        if answer not in candidates:
            raise UserError(f"MVBench {stem}, question {i}: its answer {answer!r} is none of "
                            "its candidates")
        video = str(row["video"])
        out.append(Question(
            question_id=f"{stem}_{i}", videos=[video, f"{stem}/{video}"],
            choices=candidates, answer=score.letters(len(candidates))[candidates.index(answer)],
            groups={"task": stem}, plain=prompt(row["question"], candidates)))
    return out


def extract(response: str, q: Question) -> str:
    return score.multi_choice(response, q.choices)
