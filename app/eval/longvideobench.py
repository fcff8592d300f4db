"""LongVideoBench (`longvideobench/LongVideoBench`, `lvb_val.json`): a list of `video_path`,
`question`, `candidates`, `correct_choice` (the right one's index), `duration_group`,
`question_category`, `subtitle_path` (and `id`).

The words are lmms-eval's LongVideoBench task's (`longvideobench_doc_to_text`): the question,
then each candidate as "A. ...", then its post prompt (with its trailing newline). Kept here,
in one place, so that they can be corrected against lmms-eval's task code.
"""

from __future__ import annotations

from . import score
from .question import Question

NAME = "longvideobench"
TITLE = "LongVideoBench"
FIELDS = ("video_path", "question", "candidates", "correct_choice", "duration_group",
          "question_category")
GROUPS = ("duration_group", "question_category")
ORDER: dict = {}

OPTION = "{letter}. {text}"
END = "Answer with the option's letter from the given choices directly.\n"


def prompt(question: str, candidates: list) -> str:
    options = [OPTION.format(letter=k, text=c)
               for k, c in zip(score.letters(len(candidates)), candidates)]
    return question + "\n" + "\n".join(options) + "\n" + END


def questions(rows: list, stem: str) -> list[Question]:
    from sfllava_mlx.errors import UserError

    out = []
    for i, row in enumerate(rows):
        candidates = [str(c) for c in row["candidates"]]
        right = row["correct_choice"]
        if not isinstance(right, int) or not 0 <= right < len(candidates):
            raise UserError(f"LongVideoBench question {row.get('id', i)}: correct_choice "
                            f"{right!r} is not the index of one of its candidates")
        video = str(row["video_path"])
        out.append(Question(
            question_id=str(row.get("id", i)), videos=[video, f"videos/{video}"],
            choices=candidates, answer=score.letters(len(candidates))[right],
            groups={g: row[g] for g in GROUPS}, plain=prompt(row["question"], candidates)))
    return out


def extract(response: str, q: Question) -> str:
    return score.multi_choice(response, q.choices)
