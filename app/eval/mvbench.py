"""MVBench (`OpenGVLab/MVBench`): one JSON file per task (the task is the file's stem), each a
list of `video`, `question`, `candidates` (the options' texts), `answer` (the right one's text).

The words (`ASK`, `OPTIONS`, `END`) are MVBench's own prompt as lmms-eval's task uses it:
"Question: ...", "Options:" and the options as "(A) ...", then "Only give the best option."
(MVBench's answer prefix "Best option:(" belongs to the assistant's turn and is not sent).
Kept here, in one place, so that they can be corrected against lmms-eval's task code.
"""

from __future__ import annotations

from . import score
from .question import Question

NAME = "mvbench"
TITLE = "MVBench"
FIELDS = ("video", "question", "candidates", "answer")
GROUPS = ("task",)
ORDER: dict = {}

ASK = "Question: {question}\nOptions:\n"
OPTION = "({letter}) {text}"
END = "\nOnly give the best option."


def prompt(question: str, candidates: list) -> str:
    options = [OPTION.format(letter=k, text=c)
               for k, c in zip(score.letters(len(candidates)), candidates)]
    return ASK.format(question=question) + "\n".join(options) + END


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
