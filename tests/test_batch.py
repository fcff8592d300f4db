"""`sfllava batch` (design.md §8): the real command on a folder of generated videos, one process
and `mlx.launch -n 2 --backend ring` (MLX's CPU backend runs it on this machine), checked
against `sfllava generate --json`'s greedy tokens; kills at random-ish moments (after a
given number of lines), then the same command again.

The library: five FFV1 videos of 4 to 16 s (one in a subfolder), a text file and a hidden
file beside them (skipped), and, named on the command line, a truncated video and a file
that is not there (an error line per prompt each). Two prompts: 14 pairs, 4 of them failed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sfllava_convert.tiny.command import REPO, run_env, sfllava_command
from sfllava_mlx.options import Options, requested
from tests.conftest import LOGPROB_TOL, sfllava

pytestmark = pytest.mark.slow  # end-to-end runs of the tiny models against their references

PROMPTS = ("What happens in this video?", "Who is in it?")
MAX_TOKENS = 8
# Fields that describe the run rather than the answer: time, memory, the video cache's state,
# and prompt_tokens (tokens *this request* prefilled: a cached prefix is not prefilled).
VOLATILE = ("timings_s", "peak_memory_gb", "cache", "prompt_tokens")
LAUNCH = Path(sys.executable).parent / "mlx.launch"


# ----------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    from sfllava_convert.tiny.videos import make_ffv1_video

    root = tmp_path_factory.mktemp("batch")
    lib = root / "lib"
    (lib / "sub").mkdir(parents=True)
    # frames at 10 fps: 16, 12, 8, 6 and 4 s (the plan shares out by duration)
    spec = {"a.mkv": 160, "b.mkv": 120, "c.mkv": 80, "d.mkv": 60, "sub/e.mkv": 40}
    for i, (name, n) in enumerate(spec.items()):
        make_ffv1_video(lib / name, n, width=48, height=40, seed=10 + i)
    (lib / "notes.txt").write_text("not a video\n")
    (lib / ".DS_Store").write_bytes(b"\0" * 64)
    broken = root / "broken.mkv"
    broken.write_bytes((lib / "b.mkv").read_bytes()[:600])  # cut short: no frame decodes
    missing = str(root / "gone.mkv")  # named, but not there: fingerprint null, error lines
    good = [str(lib / name) for name in spec]
    return {"root": root, "lib": lib, "broken": str(broken), "missing": missing, "good": good,
            "order": [*good, str(broken), missing]}


@pytest.fixture(scope="module")
def model(converted) -> Path:
    return converted["oryx-vit"]


def batch_args(library, model, out, prompts_file=None) -> list:
    args = ["batch", library["lib"], library["broken"], library["missing"], "--model", model,
            "--out", out, "--max-tokens", MAX_TOKENS]
    if prompts_file:
        return args + ["--prompts-file", prompts_file]
    for p in PROMPTS:
        args += ["--prompt", p]
    return args


@pytest.fixture(scope="module")
def single(library, model) -> dict:
    """One uninterrupted run in one process: the lines every other run must reproduce."""
    work = library["root"] / "single"
    work.mkdir()
    out = work / "results.jsonl"
    r = sfllava(batch_args(library, model, out), work, timeout=300)
    return {"result": r, "out": out, "lines": read_lines(out), "work": work}


@pytest.fixture(scope="module")
def reference(library, model) -> dict:
    """`sfllava generate --json` (the real command, in this process: no interpreter start-up)
    for every good (video, prompt) pair, without the video cache."""
    from sfllava_app.cli import main

    ref = {}
    for video in library["good"]:
        for prompt in PROMPTS:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                status = main(["generate", "--model", str(model), "--video", video, "--prompt",
                               prompt, "--max-tokens", str(MAX_TOKENS), "--json", "--no-cache"])
            assert status == 0
            ref[video, prompt] = json.loads(buf.getvalue())
    return ref


# ----------------------------------------------------------------------------------------
# Helpers


def read_lines(path: Path) -> list:
    data = Path(path).read_bytes()
    assert not data or data.endswith(b"\n"), "a results file ends with a whole line"
    return [json.loads(line) for line in data.splitlines()]


def answered(n: int) -> str:
    return f"{n} pair{'' if n == 1 else 's'} answered in this run"


def stable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in VOLATILE + ("logprobs",)}


def assert_same_answer(got: dict, want: dict) -> None:
    """The same line but for timings: tokens equal, logprobs within 5e-4 (a resumed run can
    decode a video's prompts in another batch than the first run did: design.md §8)."""
    assert stable(got) == stable(want), (got["video"], got["prompt"])
    assert (got["logprobs"] is None) == (want["logprobs"] is None)
    if got["logprobs"]:
        assert np.abs(np.array(got["logprobs"]) - np.array(want["logprobs"])).max() <= LOGPROB_TOL


def part_files(out: Path) -> list:
    return sorted(out.parent.glob(f".{out.name}.rank*.part"))


def count_whole_lines(path: Path) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return data.count(b"\n")


def wait_until(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_same_lines(lines: list, expected: list) -> None:
    """Every pair exactly once, in input order, with the uninterrupted run's answers."""
    assert [(r["video"], r["prompt"]) for r in lines] == \
        [(r["video"], r["prompt"]) for r in expected]
    for got, want in zip(lines, expected):
        assert_same_answer(got, want)


class Launch:
    """`mlx.launch -n 2 --backend ring -- sfllava ARGS`. Its standard input stays an open,
    silent pipe (mlx.launch forwards its input to the ranks); output goes to files."""

    def __init__(self, args: list, env: dict, work: Path):
        cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--", *sfllava_command(args)]
        self.err_path = work / f"launch-{time.monotonic_ns()}.err"
        with open(self.err_path, "w") as err:
            self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=err, env=env, cwd=REPO, start_new_session=True)
        self.pid = self.p.pid

    def poll(self):
        return self.p.poll()

    @property
    def stderr(self):
        return io.StringIO(self.err_path.read_text())

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            self.p.wait(timeout=timeout)
        finally:
            if self.p.poll() is None:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
            self.p.stdin.close()
        return self.p.returncode, self.err_path.read_text()


def rank_pid(launcher: int, rank: int):
    """The pid of a rank mlx.launch started (its child, with MLX_RANK in its environment)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            with open(f"/proc/{d}/environ", "rb") as f:
                if f"MLX_RANK={rank}".encode() in f.read().split(b"\0"):
                    return int(d)
        except (OSError, ValueError, IndexError):
            continue
    return None


# ----------------------------------------------------------------------------------------
# One process


def test_every_pair_is_answered_as_generate_answers_it(single, library, reference):
    r = single["result"]
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "error: 4 of 14 pairs failed" in r.stderr
    assert "7 videos (1 file is not a video: skipped)" in r.stderr  # notes.txt; hidden: unseen
    lines = single["lines"]
    # input order: the folder's files sorted (recursively), then the named file; prompts in order
    assert [(x["video"], x["prompt"]) for x in lines] == \
        [(v, p) for v in library["order"] for p in PROMPTS]
    for rec in lines:
        assert set(rec) >= {"video", "prompt", "fingerprint", "text", "tokens", "logprobs",
                            "prompt_tokens", "visual_tokens", "timings_s", "peak_memory_gb",
                            "cache", "error"}
        if rec["video"] == library["missing"]:
            assert rec["fingerprint"] is None and "not found" in rec["error"], rec
            continue
        assert len(rec["fingerprint"]) == 64  # the other files are readable
        if rec["video"] == library["broken"]:
            assert rec["error"] and "broken.mkv" in rec["error"], rec
            assert rec["text"] is None and rec["tokens"] is None
            continue
        assert rec["error"] is None
        ref = reference[rec["video"], rec["prompt"]]
        assert rec["tokens"] == ref["tokens"] and rec["text"] == ref["text"]
        assert rec["logprobs"] == pytest.approx(ref["logprobs"], abs=1e-4)
        assert rec["visual_tokens"] == ref["visual_tokens"]
        assert rec["cache"] == "miss"  # a fresh video cache: each video encoded once
    # distinct videos, distinct fingerprints; the part file is gone once merged
    assert len({x["fingerprint"] for x in lines}) == 7  # 6 files and None
    assert part_files(single["out"]) == []


def test_the_video_cache_is_warmed_for_chat(single, library, model, monkeypatch):
    """After the batch, opening a processed video starts at the first question: its visual
    tokens and prefilled prefix come from the video cache."""
    from sfllava_app.cli import build_parser
    from sfllava_app.options import session_options
    from sfllava_mlx import Engine

    argv = ["chat", library["good"][2], "--model", str(model)]
    args = build_parser(argv).parse_args(argv)
    monkeypatch.setenv("XDG_CACHE_HOME", str(single["work"] / "xdg-cache"))
    session = Engine(args.model).open(library["good"][2], **session_options(args))
    assert session.cache == "hit" and session.prefix_from_cache


def test_the_same_command_again_answers_nothing(single, library, model, tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_bytes(single["out"].read_bytes())
    r = sfllava(batch_args(library, model, out), single["work"], timeout=300)
    assert r.returncode == 1, r.stderr  # the broken video's pairs stay failed
    assert "0 already in" not in r.stderr and "14 already in" in r.stderr
    assert "0 pairs answered in this run" in r.stderr
    assert out.read_bytes() == single["out"].read_bytes()


def test_kill_9_midway_then_the_same_command_finishes(single, library, model, tmp_path):
    out = tmp_path / "results.jsonl"
    part = out.with_name(f".{out.name}.rank0.part")
    p = subprocess.Popen(sfllava_command(batch_args(library, model, out)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=run_env(tmp_path), cwd=REPO)
    try:
        wait_until(lambda: count_whole_lines(part) >= 3, 300, "3 answers", p)
        p.kill()
    finally:
        p.wait(timeout=60)
    assert not out.exists()  # merged only at the end
    before = read_lines(part)  # whole lines only
    assert 3 <= len(before) < 14, "killed midway"
    # A write cut short by a crash leaves a torn last line: the next run drops it.
    with open(part, "ab") as f:
        f.write(b'{"video": "' + library["good"][0].encode() + b'", "prompt": "Wh')
    r = sfllava(batch_args(library, model, out), tmp_path, timeout=300)
    assert r.returncode == 1, r.stderr
    assert answered(14 - len(before)) in r.stderr
    assert_same_lines(read_lines(out), single["lines"])
    assert part_files(out) == []


def test_ctrl_c_keeps_every_answer(single, library, model, tmp_path):
    out = tmp_path / "results.jsonl"
    part = out.with_name(f".{out.name}.rank0.part")
    p = subprocess.Popen(sfllava_command(batch_args(library, model, out)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=run_env(tmp_path), cwd=REPO)
    try:
        wait_until(lambda: count_whole_lines(part) >= 2, 300, "2 answers", p)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "run the same command again" in err
    lines = read_lines(out)  # what was answered is in --out already
    assert 2 <= len(lines) < 14 and part_files(out) == []
    expected = {(x["video"], x["prompt"]): x for x in single["lines"]}
    for rec in lines:
        assert_same_answer(rec, expected[rec["video"], rec["prompt"]])


# ----------------------------------------------------------------------------------------
# mlx.launch -n 2 --backend ring


def test_two_ranks_write_the_lines_one_process_writes(single, library, model, tmp_path):
    out = tmp_path / "results.jsonl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")  # blank lines are skipped
    args = batch_args(library, model, out, prompts_file=prompts)
    status, err = Launch(args, run_env(tmp_path), tmp_path).wait(400)
    assert status == 0, err  # mlx.launch's own status: 0 whatever its ranks return
    assert "over 2 processes" in err and "error: 4 of 14 pairs failed" in err
    assert "Traceback" not in err
    assert_same_lines(read_lines(out), single["lines"])
    assert part_files(out) == []


def test_a_rank_killed_midway_then_the_same_command_finishes(single, library, model, tmp_path):
    out = tmp_path / "results.jsonl"
    env = run_env(tmp_path)
    run = Launch(batch_args(library, model, out), env, tmp_path)
    part1 = out.with_name(f".{out.name}.rank1.part")
    try:
        wait_until(lambda: count_whole_lines(part1) >= 2, 300, "rank 1's 2nd answer", run)
        pid = rank_pid(run.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    finally:
        _, err = run.wait(120)  # mlx.launch stops rank 0 and exits
    assert "rank 1" in err  # mlx.launch reports the rank that died
    assert not out.exists()
    done = sum(len(read_lines(f)) for f in part_files(out))  # whole lines only
    assert 2 <= done < 14, "killed midway"
    _, err = Launch(batch_args(library, model, out), env, tmp_path).wait(400)
    assert "unfinished run" in err and "merging them" in err, err
    assert answered(14 - done) in err, err
    assert_same_lines(read_lines(out), single["lines"])
    assert part_files(out) == []


# ----------------------------------------------------------------------------------------
# The parts, in this process


def test_videos_are_shared_out_by_duration_not_count():
    from sfllava_app.batch.inputs import share_out

    assert share_out([100, 10, 10, 10, 10, 10], 2) == [0, 1, 1, 1, 1, 1]
    ranks = share_out([16, 12, 8, 6, 4, 0], 2)
    loads = [sum(d for d, r in zip([16, 12, 8, 6, 4, 0], ranks) if r == k) for k in (0, 1)]
    assert abs(loads[0] - loads[1]) <= 4
    assert share_out([5.0] * 7, 3) == share_out([5.0] * 7, 3)  # the same plan on every rank
    assert share_out([3, 2, 1], 1) == [0, 0, 0]


def test_a_torn_last_line_is_dropped_and_cut_before_appending(tmp_path):
    from sfllava_app.batch.results import PartWriter, parse, read

    part = tmp_path / ".r.jsonl.rank0.part"
    rec = {"video": "a.mkv", "prompt": "p", "fingerprint": "f" * 64, "model_identity": "m",
           "options": requested(Options()), "text": "hi", "error": None}
    part.write_bytes(json.dumps(rec).encode() + b"\n" + b'{"video": "b.mkv", "pro')
    lines = parse(part.read_bytes())
    assert len(lines.records) == 1 and lines.torn == 1
    w = PartWriter(part)
    w.write({**rec, "video": "b.mkv"})
    w.close()
    got = read(part)
    assert [r["video"] for r in got.records] == ["a.mkv", "b.mkv"] and got.torn == 0


def test_merge_puts_input_order_first_and_loses_no_line():
    from sfllava_app.batch.results import merge, pair_key

    options = requested(Options())

    def rec(video, prompt, fp):
        return {"video": video, "prompt": prompt, "fingerprint": fp, "model_identity": "m",
                "options": options, "text": f"{video}/{prompt}", "error": None}

    old = rec("old/x.mkv", "p", "X")  # not in this input: kept, after
    b, a = rec("b.mkv", "p", "B"), rec("a.mkv", "p", "A")
    wanted = [(v, pair_key(fp, v, "p", "m", options))
              for v, fp in (("a.mkv", "A"), ("b.mkv", "B"), ("copy-of-b.mkv", "B"))]
    merged, answers = merge([old, b, a, dict(b)], wanted)
    assert [r["video"] for r in merged] == ["a.mkv", "b.mkv", "copy-of-b.mkv", "old/x.mkv"]
    assert merged[2]["text"] == "b.mkv/p"  # same content: the answer is not asked again
    assert len(answers) == 2


def test_directories_hold_videos_and_other_files(tmp_path):
    import cv2
    import numpy as np

    from sfllava_app.batch.inputs import expand, inspect
    from sfllava_convert.tiny.videos import make_ffv1_video

    make_ffv1_video(tmp_path / "clip.mkv", 20, width=32, height=32)
    cv2.imwrite(str(tmp_path / "photo.jpg"), np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "readme.txt").write_text("hello\n")
    (tmp_path / ".hidden.mkv").write_bytes((tmp_path / "clip.mkv").read_bytes())
    named = tmp_path / "named.txt"
    named.write_text("named on the command line\n")
    found = expand([str(tmp_path), str(named), str(tmp_path / "clip.mkv"), "missing.mkv"])
    assert [Path(c.path).name for c in found] == ["clip.mkv", "named.txt", "photo.jpg",
                                                   "readme.txt", "missing.mkv"]
    kinds = {Path(c.path).name: inspect(c, lambda path: (None, None)) for c in found}
    assert kinds["clip.mkv"].kind == "video" and kinds["clip.mkv"].duration == pytest.approx(2.0)
    assert kinds["photo.jpg"].kind == "video"  # a picture is answered too (design.md §2.3)
    assert kinds["readme.txt"].kind == "skip"
    # named on the command line (too): answered or reported, never skipped
    assert [c.named for c in found] == [True, True, False, False, True]
    assert kinds["named.txt"].kind == "video" and kinds["named.txt"].fingerprint
    assert kinds["missing.mkv"].kind == "video" and kinds["missing.mkv"].fingerprint is None


def test_usage_errors_exit_2(tmp_path, model, capsys):
    from sfllava_app.cli import main

    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    assert main(["batch", str(tmp_path), "--model", str(model), "--prompts-file", str(empty),
                 "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    (tmp_path / "readme.txt").write_text("hello\n")
    assert main(["batch", str(tmp_path), "--model", str(model), "--prompt", "hi",
                 "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "no video found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # neither --prompt nor --prompts-file
        main(["batch", str(tmp_path), "--model", str(model), "--out", str(tmp_path / "r.jsonl")])
    assert e.value.code == 2


def test_exit_0_when_every_pair_is_answered(library, model, tmp_path, monkeypatch, capsys):
    from sfllava_app.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    out = tmp_path / "r.jsonl"
    assert main(["batch", library["good"][4], "--model", str(model), "--prompt", PROMPTS[0],
                 "--max-tokens", str(MAX_TOKENS), "--out", str(out)]) == 0
    (rec,) = read_lines(out)
    assert rec["error"] is None and rec["video"] == library["good"][4]
    assert "1 pair answered in this run" in capsys.readouterr().err


def test_progress_shows_pairs_failed_and_eta_on_a_terminal(monkeypatch):
    from sfllava_app.batch.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    progress = Progress(rank=0, size=1, total=4)
    for failed in (False, True, False):
        progress.advance(failed)
    progress.close()
    text = screen.getvalue()
    assert "3/4" in text and "1 failed" in text and "ETA" in text
    quiet = Progress(rank=1, size=2, total=4)  # only rank 0 shows progress
    quiet.advance(False)
    assert quiet.rich is None and screen.getvalue() == text


def test_a_picture_is_answered_as_generate_answers_it(model, tmp_path):
    """Pictures found or named are answered like `generate --image` (issue #13)."""
    import cv2

    rng = np.random.default_rng(3)
    photo = tmp_path / "lib" / "photo.png"
    photo.parent.mkdir()
    cv2.imwrite(str(photo), rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    out = tmp_path / "r.jsonl"
    r = sfllava(["batch", photo.parent, "--model", model, "--prompt", PROMPTS[0], "--max-tokens",
                 MAX_TOKENS, "--out", out], tmp_path)
    assert r.returncode == 0, r.stderr
    (rec,) = read_lines(out)
    g = sfllava(["generate", "--model", model, "--image", photo, "--prompt", PROMPTS[0],
                 "--max-tokens", MAX_TOKENS, "--json", "--no-cache"], tmp_path)
    assert g.returncode == 0, g.stderr
    want = json.loads(g.stdout)
    assert rec["error"] is None and rec["tokens"] == want["tokens"]
    assert rec["visual_tokens"] == want["visual_tokens"] and rec["fingerprint"]


# ----------------------------------------------------------------------------------------
# A video's prompts decode together (--decode-concurrency)

FOUR = ("What happens in this video?", "Who is in it?", "What color is the car?",
        "Describe the scene in detail, please.")
FOUR_TOKENS = 24


def four_args(videos: list, model, out, *extra) -> list:
    args = ["batch", *videos, "--model", model, "--out", out, "--max-tokens", FOUR_TOKENS, *extra]
    for p in FOUR:
        args += ["--prompt", p]
    return args


@pytest.fixture(scope="module")
def four(library, model) -> dict:
    """Three videos x four prompts, with the real command: one at a time
    (--decode-concurrency 1, each answer alone) and four together; and `generate --json`
    (in this process) for every pair."""
    from sfllava_app.cli import main

    videos = [library["good"][i] for i in (0, 2, 4)]
    work = library["root"] / "four"
    work.mkdir()
    runs = {}
    for n in (1, 4):
        out = work / f"c{n}.jsonl"
        r = sfllava(four_args(videos, model, out, "--decode-concurrency", n), work / f"xdg{n}",
                    timeout=300)
        assert r.returncode == 0, r.stderr
        runs[n] = read_lines(out)
    ref = {}
    for video in videos:
        for prompt in FOUR:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert main(["generate", "--model", str(model), "--video", video, "--prompt",
                             prompt, "--max-tokens", str(FOUR_TOKENS), "--json",
                             "--no-cache"]) == 0
            ref[video, prompt] = json.loads(buf.getvalue())
    return {"videos": videos, "runs": runs, "ref": ref, "work": work}


def assert_answer(rec: dict, want: dict, what) -> None:
    assert rec["error"] is None, (what, rec["error"])
    assert rec["tokens"] == want["tokens"] and rec["text"] == want["text"], what
    assert rec["finish_reason"] == want["finish_reason"], what
    assert np.abs(np.array(rec["logprobs"]) - np.array(want["logprobs"])).max() <= LOGPROB_TOL, what


def test_a_videos_prompts_decoded_together_are_answered_as_alone(four):
    one, together = four["runs"][1], four["runs"][4]
    pairs = [(v, p) for v in four["videos"] for p in FOUR]
    assert [(r["video"], r["prompt"]) for r in together] == pairs
    assert [(r["video"], r["prompt"]) for r in one] == pairs
    for a, b in zip(together, one):
        what = (a["video"], a["prompt"])
        assert_answer(a, four["ref"][what], what)  # the pair's answer alone
        assert_answer(a, b, what)  # and one at a time
        # timings and prompt tokens keep their meaning: the video's work (its prefix
        # prefilled, its frames) reported with the video's first prompt, once
        assert a["prompt_tokens"] == b["prompt_tokens"], what
        assert set(a["timings_s"]) == set(b["timings_s"]), what
        assert (a["timings_s"]["vision"] > 0) == (a["prompt"] == FOUR[0]), what
        assert 0 < a["timings_s"]["ttft"] and a["timings_s"]["generate"] > 0, what
    for v in four["videos"]:  # the prompts' answers differ: a mix-up would show
        assert len({tuple(r["tokens"]) for r in together if r["video"] == v}) == len(FOUR)


def test_a_batch_that_would_not_fit_decodes_fewer_at_a_time(four, model, tmp_path,
                                                             monkeypatch, capsys):
    from sfllava_app.cli import main
    from sfllava_mlx import Engine
    from sfllava_mlx.memory import batch_bytes

    video = four["videos"][0]
    plan = Engine(str(model)).plan(video, max_tokens=FOUR_TOKENS)

    def together(k):
        return batch_bytes(plan.weights, plan.working_set, plan.kv_cache, [plan.kv_cache] * k)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("SFLLAVA_MEMORY_LIMIT_GB", str((together(2) + together(3)) / 2e9))
    out = tmp_path / "r.jsonl"
    assert main([str(a) for a in four_args([video], model, out, "--decode-concurrency", 4)]) == 0
    err = capsys.readouterr().err
    assert "decode 2 at a time, not 4" in err, err
    for rec in read_lines(out):
        assert_answer(rec, four["ref"][video, rec["prompt"]], rec["prompt"])


def test_kv_bits_and_max_kv_size_answers_decode_one_at_a_time(four, model, tmp_path):
    """A quantized or rotating KV cache decodes alone (mlx-lm batches neither): the same
    lines as `generate` with the flag, four prompts asked at --decode-concurrency 4."""
    from sfllava_app.cli import main

    video = four["videos"][1]
    for flag in (["--kv-bits", "8"], ["--max-kv-size", "2048"]):
        out = tmp_path / f"r{flag[0]}.jsonl"
        r = sfllava(four_args([video], model, out, "--decode-concurrency", 4, *flag), tmp_path,
                    timeout=300)
        assert r.returncode == 0, r.stderr
        for rec in read_lines(out):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert main(["generate", "--model", str(model), "--video", video, "--prompt",
                             rec["prompt"], "--max-tokens", str(FOUR_TOKENS), "--json",
                             "--no-cache", *flag]) == 0
            assert_answer(rec, json.loads(buf.getvalue()), (flag, rec["prompt"]))


def test_decode_concurrency_below_1_is_a_usage_error(model, tmp_path, capsys):
    from sfllava_app.cli import main

    assert main(["batch", str(tmp_path), "--model", str(model), "--prompt", "hi", "--out",
                 str(tmp_path / "r.jsonl"), "--decode-concurrency", "0"]) == 2
    assert "--decode-concurrency must be a whole number of at least 1" in capsys.readouterr().err
