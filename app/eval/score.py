"""Reading the letter a model answered, as lmms-eval reads it (design.md §9), quirks and all.

- `videomme`: lmms-eval's Video-MME `extract_characters_regex`. Its list of prefixes lacks two
  commas, so Python fuses two pairs of them into one string each: those are kept fused here
  (neither fused string ever occurs in an answer, so those four phrases are never removed).
- `multi_choice`: the MMMU parser lmms-eval's LongVideoBench task (and here MVBench) calls,
  `parse_multi_choice_response`: "(B)" first, then "B " with spaces around the response, then
  (more than 5 words) an option's own text; the last one mentioned wins. Where lmms-eval picks
  a random letter (nothing found), this gives "": a run's accuracy does not depend on a seed.
"""

from __future__ import annotations

import re

VIDEOMME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is" "The correct option is",  # fused, as in lmms-eval
    "Best answer:" "Best option:",  # fused, as in lmms-eval
)


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def videomme(response: str) -> str:
    s = response.strip()
    for prefix in VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    match = re.search(r"[ABCD]", s)
    return match[0] if match else ""


def multi_choice(response: str, choices: list[str]) -> str:
    """`choices`: the options' own texts, lettered A, B, ... in order."""
    all_choices = letters(len(choices))
    index2ans = dict(zip(all_choices, choices))
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "  # no partial match at either end
    candidates = [c for c in all_choices if f"({c})" in response]
    brackets, by_letter = bool(candidates), True
    if not candidates:
        candidates = [c for c in all_choices if f"{c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in index2ans.items() if text.lower() in response.lower()]
        by_letter = False
    if not candidates:
        return ""
    if len(candidates) == 1:
        return candidates[0]
    if not by_letter:
        where = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif brackets:
        where = [response.rfind(f"({c})") for c in candidates]
    else:
        where = [response.rfind(f" {c} ") for c in candidates]
    return candidates[where.index(max(where))]
