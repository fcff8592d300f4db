"""`sfllava eval` (design.md §9): tiny benchmark sets in each published format, written here
(Video-MME as parquet and JSON Lines with its own `<font>`-wrapped subtitle files, MVBench's
per-task JSON, LongVideoBench's lvb_val.json), a few generated videos, and the tiny model.

The prompts are held word for word against the benchmarks' published words (Video-MME's as
design.md §9 gives them, checked on the conversation's real user text), the extraction against a
table of awkward answers, the table against accuracies counted here by hand.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
from pathlib import Path

import pytest

from sfllava_convert.tiny.command import REPO, run_env, sfllava_command
from tests.conftest import sfllava

OPTIONS = [["A. A red car.", "B. A blue sky.", "C. A dog.", "D. A cat."],
           ["A. One.", "B. Two.", "C. Three.", "D. Four."]]
# (videoID, question_id, duration, domain, task_type, question, options, answer)
VIDEOMME = [
    ("vid1", "001-1", "short", "Knowledge", "Counting Problem", "What is shown?", 0, "A"),
    ("vid1", "001-2", "short", "Knowledge", "Object Recognition", "How many?", 1, "C"),
    ("vid2", "002-1", "medium", "Sports", "Counting Problem", "What is shown?", 0, "B"),
    ("vid2", "002-2", "medium", "Sports", "Action Reasoning", "How many?", 1, "D"),
    ("vid404", "404-1", "long", "Sports", "Action Reasoning", "What is shown?", 0, "A"),
]
# Video-MME's own subtitle file: each line in a <font> tag. The 4 s video's frames fall in
# the first two events; the third is after its end.
SRT = ("1\n00:00:00,000 --> 00:00:01,500\n<font color=\"white\" size=\".72c\">Hello there</font>\n\n"
       "2\n00:00:01,500 --> 00:00:03,000\n<font color=\"white\" size=\".72c\">a red car\nis "
       "passing</font>\n\n"
       "3\n00:00:10,000 --> 00:00:12,000\n<font color=\"white\" size=\".72c\">never seen</font>\n\n")
KEPT = ["Hello there", "a red car is passing"]


def videomme_rows() -> list:
    return [{"video_id": vid[-3:], "duration": dur, "domain": dom, "sub_category": "Other",
             "url": "https://example.com", "videoID": vid, "question_id": qid,
             "task_type": task, "question": q, "options": OPTIONS[o], "answer": a}
            for vid, qid, dur, dom, task, q, o, a in VIDEOMME]


def spec_prompt(question: str, options: list, subtitles: bool) -> str:
    """design.md §9's words, written out here."""
    about = "the video and the subtitles." if subtitles else "the video."
    return ("Select the best answer to the following multiple-choice question based on "
            f"{about} Respond with only the letter (A, B, C, or D) of the correct option.\n"
            f"{question}\n" + "\n".join(options) + "\nThe best answer is:")


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sfllava_convert.tiny.videos import make_ffv1_video

    root = tmp_path_factory.mktemp("eval")
    videos = root / "videos"
    (videos / "task_b").mkdir(parents=True)
    for i, name in enumerate(("vid1.mkv", "vid2.mkv", "clip.mkv", "task_b/deep.mkv")):
        make_ffv1_video(videos / name, 40, width=48, height=40, seed=20 + i)
    subs = root / "subtitle"
    subs.mkdir()
    (subs / "vid1.srt").write_text(SRT)
    rows = videomme_rows()
    vmme = root / "videomme"
    vmme.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), vmme / "test-00000-of-00001.parquet")
    (root / "videomme.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mvb = root / "mvbench"
    mvb.mkdir()
    (mvb / "task_a.json").write_text(json.dumps([
        {"video": "clip.mkv", "question": "What moves?", "candidates": ["a car", "a dog", "a cat"],
         "answer": "a dog"}]))
    (mvb / "task_b.json").write_text(json.dumps([
        {"video": "deep.mkv", "question": "Where?", "candidates": ["park", "street"],
         "answer": "street"}]))
    lvb = root / "lvb_val.json"
    lvb.write_text(json.dumps([
        {"video_id": "x", "video_path": "clip.mkv", "question": "What is first?", "id": "lvb-1",
         "candidates": ["a tree", "a bird", "a fish", "a horse"], "correct_choice": 3,
         "duration_group": 15, "question_category": "E2O", "subtitle_path": "clip_en.json"}]))
    return {"root": root, "videos": videos, "subs": subs, "parquet": vmme,
            "jsonl": root / "videomme.jsonl", "mvbench": mvb, "lvb": lvb}


@pytest.fixture(scope="module")
def model(converted) -> Path:
    return converted["oryx-vit"]


def run_main(args: list) -> tuple[int, str, str]:
    """`sfllava ARGS` in this process: (status, stdout, stderr)."""
    from sfllava_app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def read_lines(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def eval_args(sets, model, out, *more) -> list:
    return ["eval", sets["parquet"], "--videos", sets["videos"], "--model", model, "--out", out,
            "--subtitle-dir", sets["subs"], "--no-cache", *more]


@pytest.fixture(scope="module")
def videomme_run(sets, model) -> dict:
    """One run over the Video-MME parquet, with its subtitles: 4 questions answered, and one
    whose video is missing."""
    out = sets["root"] / "vmme.jsonl"
    status, stdout, stderr = run_main(eval_args(sets, model, out, "--json"))
    return {"status": status, "stdout": stdout, "stderr": stderr, "out": out,
            "lines": {r["question_id"]: r for r in read_lines(out)}}


# ----------------------------------------------------------------------------------------
# Formats


def test_each_format_is_recognised_by_its_fields_and_read(sets):
    from sfllava_app.eval import source

    for path in (sets["parquet"], sets["jsonl"]):
        b = source.load(str(path))
        assert b.format.NAME == "videomme"
        assert [q.question_id for q in b.questions] == [r[1] for r in VIDEOMME]
        assert [q.answer for q in b.questions] == [r[7] for r in VIDEOMME]
        assert b.questions[2].groups == {"duration": "medium", "domain": "Sports",
                                         "sub_category": "Other", "task_type": "Counting Problem"}
        assert b.questions[0].choices == OPTIONS[0]
    b = source.load(str(sets["mvbench"]))
    assert b.format.NAME == "mvbench"
    assert [(q.question_id, q.answer, q.groups) for q in b.questions] == [
        ("task_a_0", "B", {"task": "task_a"}), ("task_b_0", "B", {"task": "task_b"})]
    b = source.load(str(sets["lvb"]))
    assert b.format.NAME == "longvideobench"
    assert [(q.question_id, q.answer, q.groups) for q in b.questions] == [
        ("lvb-1", "D", {"duration_group": 15, "question_category": "E2O"})]


def test_mvbench_and_longvideobench_prompts_are_lmms_evals_words(sets):
    from sfllava_app.eval import source

    mvb = source.load(str(sets["mvbench"])).questions[0]
    assert mvb.prompt(subtitles=False) == (
        "Question:What moves?\nOption:\n(A) a car\n(B) a dog\n(C) a cat\n"
        "Only give the best option.\n")
    lvb = source.load(str(sets["lvb"])).questions[0]
    assert lvb.prompt(subtitles=True) == (
        "What is first?\nA. a tree\nB. a bird\nC. a fish\nD. a horse\n"
        "Answer with the option's letter from the given choices directly.\n")


def test_refusals_are_one_line_exit_2(sets, model, tmp_path, monkeypatch):
    bad = tmp_path / "rows.json"
    bad.write_text(json.dumps([{"videoID": "v", "question": "q", "options": ["A. x"]}]))
    out = tmp_path / "o.jsonl"
    status, _, err = run_main(["eval", bad, "--videos", sets["videos"], "--model", model,
                               "--out", out])
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "Video-MME" in err
    for f in ("question_id", "duration", "domain", "sub_category", "task_type", "answer"):
        assert f in err
    status, _, err = run_main(["eval", sets["parquet"], "--videos", tmp_path / "nowhere",
                               "--model", model, "--out", out])
    assert status == 2 and len(err.splitlines()) == 1 and "--videos" in err, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, _, err = run_main(["eval", "nobody-here/no-such-benchmark", "--videos",
                               sets["videos"], "--model", model, "--out", out])
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "nobody-here/no-such-benchmark" in err
    assert not out.exists()


def test_parquet_without_pyarrow_names_the_extra(sets, monkeypatch):
    import builtins

    from sfllava_app.eval import source
    from sfllava_mlx.errors import UserError

    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(UserError, match=r"sfllava-mlx\[eval\]"):
        source.load(str(sets["parquet"]))


# ----------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize("response, want", [
    ("The best answer is: B.", "B"),
    ("B", "B"),
    ("(C) A dog.", "C"),
    ("Because the car is red.", "B"),  # lmms-eval's quirk: the first capital A-D anywhere
    ("the answer is c", ""),  # lower case is no letter
    ("It is a long answer that names no option at all, just words about the video.", ""),
    ("It is a long answer that names no option at all, just words, then D", "D"),
    ("The answer is A", "A"),
    ("  D. A cat.  ", "D"),
    ("", ""),
])
def test_videomme_extraction_is_lmms_evals(response, want):
    from sfllava_app.eval import score

    assert score.videomme(response) == want


@pytest.mark.parametrize("response, want", [
    ("(B) a dog", "B"),
    ("B", "B"),
    ("The best answer is: C.", "C"),
    ("Best option: (A) a car, not (C) a cat", "C"),  # the last one mentioned
    ("I think the video shows a dog running in a park today", "B"),  # an option's own text
    ("b", ""),
    ("Because of it.", ""),
])
def test_multi_choice_extraction_is_lmms_evals(response, want):
    from sfllava_app.eval import score

    assert score.multi_choice(response, ["a car", "a dog", "a cat"]) == want


# ----------------------------------------------------------------------------------------
# The table


def test_summary_breaks_accuracy_down_by_every_grouping_field(tmp_path):
    from collections import Counter

    lines = []
    cases = [("short", "Knowledge", "T1", True), ("short", "Sports", "T1", False),
             ("medium", "Sports", "T2", True), ("long", "Sports", "T2", True),
             ("long", "Knowledge", "T1", False), ("long", "Knowledge", "T2", None)]
    for i, (dur, dom, task, correct) in enumerate(cases):
        lines.append({"benchmark": "videomme", "question_id": f"q{i}", "video": f"v{i}.mp4",
                      "prompt": "p", "response": None if correct is None else "A",
                      "pred": None if correct is None else "A", "answer": "A" if correct else "B",
                      "correct": correct, "duration": dur, "domain": dom,
                      "sub_category": "S", "task_type": task, "choices": [],
                      "options": {}, "fingerprint": f"f{i}", "model_identity": "m",
                      "timings_s": {"frames": 1.0, "generate": 0.5},
                      "error": "video not found" if correct is None else None})
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn')
    status, stdout, _ = run_main(["eval", "--summary", f, "--json"])
    assert status == 0
    got = json.loads(stdout.splitlines()[-1])
    done = [c for c in cases if c[3] is not None]
    assert got["answered"] == 5 and got["missing"] == 1
    assert got["accuracy"] == pytest.approx(3 / 5)
    for k, field in ((0, "duration"), (1, "domain"), (2, "task_type")):
        n, right = Counter(c[k] for c in done), Counter(c[k] for c in done if c[3])
        assert got["by"][field] == {v: {"accuracy": pytest.approx(right[v] / n[v]), "n": n[v]}
                                    for v in n}
    assert list(got["by"]["duration"]) == ["short", "medium", "long"]
    status, stdout, _ = run_main(["eval", "--summary", f])  # the rich table
    assert status == 0 and "duration" in stdout and "60.0%" in stdout


# ----------------------------------------------------------------------------------------
# Runs


def test_a_run_writes_a_scored_line_per_question(videomme_run, sets):
    r = videomme_run
    assert r["status"] == 1, r["stderr"]  # vid404 is missing
    lines = r["lines"]
    assert sorted(lines) == sorted(q[1] for q in VIDEOMME)
    for vid, qid, dur, dom, task, _q, o, a in VIDEOMME:
        line = lines[qid]
        assert (line["answer"], line["duration"], line["domain"], line["task_type"],
                line["choices"]) == (a, dur, dom, task, OPTIONS[o])
        assert line["options"]["max_tokens"] == 16 and line["options"]["temp"] == 0.0
        if vid == "vid404":
            assert line["error"] and line["pred"] is None and line["correct"] is None
            continue
        assert line["error"] is None and line["response"] == line["text"]
        from sfllava_app.eval import score

        assert line["pred"] == score.videomme(line["response"])
        assert line["correct"] == (line["pred"] == a)
        assert len(line["tokens"]) <= 16
    got = json.loads(r["stdout"].splitlines()[-1])
    answered = [x for x in lines.values() if x["error"] is None]
    assert got["answered"] == 4 and got["missing"] == 1
    assert got["accuracy"] == pytest.approx(sum(x["correct"] for x in answered) / 4)


def test_videomme_prompts_are_the_benchmarks_words_on_the_real_conversation(videomme_run, sets,
                                                                             model):
    from sfllava_mlx import Engine
    from sfllava_mlx.prompt import encode

    lines = videomme_run["lines"]
    # Without subtitles (vid2 has no subtitle file): design.md §9's words alone.
    assert lines["002-2"]["prompt"] == spec_prompt("How many?", OPTIONS[1], False)
    assert lines["002-2"]["options"]["subtitles"] is None
    # With them: lmms-eval's Video-MME-with-subtitles prompt, the <font> tags dropped.
    srt = str(sets["subs"] / "vid1.srt")
    want = ("This video's subtitles are listed below: \n" + "\n".join(KEPT) + "\n"
            + spec_prompt("How many?", OPTIONS[1], True))
    assert lines["001-2"]["prompt"] == want
    assert lines["001-2"]["options"]["subtitles"] == srt
    # ... and that is the user text of the conversation the engine builds and prefills.
    engine = Engine(str(model))
    session = engine.open(str(sets["videos"] / "vid1.mkv"), subtitles=srt, cache=False)
    asked = spec_prompt("How many?", OPTIONS[1], True)
    tokens = session.conversation.question_tokens(asked)
    assert tokens == encode(engine.tokenizer, f"\n{want}<|im_end|>\n<|im_start|>assistant\n")
    for _ in session.ask(asked, max_tokens=16):
        pass
    assert session.record()["tokens"] == lines["001-2"]["tokens"]


def test_a_videos_questions_decoded_together_equal_each_alone(videomme_run, sets, model,
                                                              tmp_path):
    out = tmp_path / "alone.jsonl"
    status, _, err = run_main(eval_args(sets, model, out, "--decode-concurrency", "1"))
    assert status == 1, err
    alone = {r["question_id"]: r for r in read_lines(out)}
    for qid, line in videomme_run["lines"].items():
        assert alone[qid]["tokens"] == line["tokens"], qid
        assert alone[qid]["pred"] == line["pred"]


def test_other_formats_run_and_score(sets, model, tmp_path):
    for bench, n in ((sets["mvbench"], 2), (sets["lvb"], 1)):
        out = tmp_path / f"{Path(bench).stem}.jsonl"
        status, stdout, err = run_main(["eval", bench, "--videos", sets["videos"], "--model",
                                        model, "--out", out, "--no-cache", "--json"])
        assert status == 0, err
        lines = read_lines(out)
        assert len(lines) == n and all(x["error"] is None for x in lines)
        assert json.loads(stdout.splitlines()[-1])["answered"] == n


def test_killed_midway_then_the_same_command_answers_only_the_rest(sets, model, tmp_path):
    out = tmp_path / "killed.jsonl"
    part = out.with_name(f".{out.name}.rank0.part")
    args = eval_args(sets, model, out, "--decode-concurrency", "1", "--max-tokens", "64")
    p = subprocess.Popen(sfllava_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=run_env(tmp_path), cwd=REPO)
    try:
        while not (part.exists() and part.read_bytes().count(b"\n") >= 1):
            assert p.poll() is None, "the run ended before its first line"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    before = read_lines(part)  # whole lines only
    assert 1 <= len(before) < 5
    r = sfllava(args, tmp_path, timeout=300)
    assert r.returncode == 1, r.stderr
    assert f"{5 - len(before)} pair" in r.stderr and "answered in this run" in r.stderr
    lines = read_lines(out)
    assert sorted(x["question_id"] for x in lines) == sorted(q[1] for q in VIDEOMME)
    assert not part.exists()
