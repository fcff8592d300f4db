"""Video-MME (`lmms-lab/Video-MME`): its parquet, or JSON / JSON Lines of the same rows.

One row a question: `videoID` (the video is `{videoID}.mp4`, `.MP4` or `.mkv`; its subtitles
`{videoID}.srt`, each line in a `<font>` tag that §2.13's plain text drops), `question_id`,
`duration` (short / medium / long), `domain`, `sub_category`, `task_type`, `question`,
`options` (a list of "A. ..."), `answer` (a letter). The prompt is design.md §9's, the benchmark's
own words: lmms-eval's, with and without subtitles.
"""

from __future__ import annotations

from . import score
from .question import Question

NAME = "videomme"
TITLE = "Video-MME"
FIELDS = ("videoID", "question_id", "duration", "domain", "sub_category", "task_type",
          "question", "options", "answer")
GROUPS = ("duration", "domain", "sub_category", "task_type")
ORDER = {"duration": ("short", "medium", "long")}
EXTENSIONS = (".mp4", ".MP4", ".mkv")

ASK = ("Select the best answer to the following multiple-choice question based on the "
       "{about} Respond with only the letter (A, B, C, or D) of the correct option.\n")
ABOUT = "video."
ABOUT_SUBTITLES = "video and the subtitles."
END = "\nThe best answer is:"


def prompt(question: str, options: list, subtitles: bool) -> str:
    about = ABOUT_SUBTITLES if subtitles else ABOUT
    return ASK.format(about=about) + question + "\n" + "\n".join(options) + END


def questions(rows: list, stem: str) -> list[Question]:
    out = []
    for row in rows:
        options = [str(o) for o in row["options"]]
        video = str(row["videoID"])
        out.append(Question(
            question_id=str(row["question_id"]), videos=[video + ext for ext in EXTENSIONS],
            choices=options, answer=str(row["answer"]).strip(),
            groups={g: row[g] for g in GROUPS},
            plain=prompt(row["question"], options, False),
            subtitled=prompt(row["question"], options, True), subtitle_file=video + ".srt"))
    return out


def extract(response: str, q: Question) -> str:
    return score.videomme(response)
