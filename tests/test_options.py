"""The one options schema (design.md §3): every rule through every front end, from the one
definition; errors before the heavy imports; what is stored or held keyed by the resolved
options (batch lines, the server's held conversations); the server's 413 and its memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sfllava_convert.tiny.command import REPO, Server, first_message, run_env
from sfllava_mlx.errors import UserError
from sfllava_mlx.options import (
    SPECS,
    Flag,
    Number,
    OneOf,
    OptionError,
    Options,
    Prompt,
    Text,
    Time,
    Whole,
    flag,
)
from tests.conftest import json_lines
from tests.serve_support import data_url

HEAVY = ("mlx_lm", "transformers", "torch")
QUESTION = "What happens in this video?"


def bad_values(rule) -> list:
    """Values outside `rule`, derived from its kind and bounds (not written per option)."""
    if isinstance(rule, OneOf):
        return ["fancy"]
    if isinstance(rule, Whole):
        return ["many", "2.5"] + ([str(rule.least - 1)] if rule.least is not None else [])
    if isinstance(rule, Number):
        out = ["abc"]
        if rule.above is not None:
            out.append(str(rule.above))
        if rule.least is not None:
            out.append(str(rule.least - 1))
        if rule.most is not None:
            out.append(str(rule.most + 0.5))
        return out
    if isinstance(rule, Text):
        return [" "]
    if isinstance(rule, Time):
        return ["soon"]
    return []  # a flag (no value on a command line), any prompt text


CASES = [(name, value) for name, spec in SPECS.items() for value in bad_values(spec.rule)]


def expected(name: str, value, label: str | None = None) -> str:
    """The one line every front end gives, from the option's own rule."""
    label = label or flag(name)
    rule = SPECS[name].rule
    if isinstance(rule, Time):
        return f"{label} {value!r} is not a time"
    return f"{label} must be {rule.words}, not {value!r}"


def test_every_option_has_a_rule_a_help_and_what_it_changes():
    for name, spec in SPECS.items():
        assert spec.help and spec.changes in ("visual", "prompt", "context", "decoding", "none")
        assert isinstance(spec.rule, (OneOf, Whole, Number, Text, Prompt, Flag, Time)), name
    assert {n for n, s in SPECS.items() if s.changes == "visual"} >= {
        "recipe", "num_frames", "fps", "seek", "start", "end", "vision_backend"}
    assert {n for n, s in SPECS.items() if s.changes == "decoding"} == {
        "max_tokens", "temp", "top_p", "seed"}


@pytest.mark.parametrize("name,value", CASES)
def test_a_bad_value_is_one_line_in_the_python_api(name, value):
    with pytest.raises(UserError) as e:
        Options.of(**{name: value})
    assert str(e.value).startswith(expected(name, value))


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_a_bad_value_is_one_line_on_the_command_line(command, converted, videos, tmp_path,
                                                     capsys, monkeypatch):
    """generate and batch, every option, every bad value: exit 2 and the line, no usage."""
    from sfllava_app.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    head = {"generate": ["generate", "--video", videos["main"], "--prompt", QUESTION],
            "batch": ["batch", videos["main"], "--prompt", QUESTION, "--out", tmp_path / "o.jsonl"]}
    for name, value in CASES:
        assert main([*head[command], "--model", converted["oryx-vit"], flag(name), value]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0].startswith("error: " + expected(name, value)), err
        assert "usage:" not in err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.fixture(scope="module")
def library(tmp_path_factory, videos):
    """A media directory: a video with a subtitle file beside it."""
    tmp = tmp_path_factory.mktemp("options")
    media = tmp / "media"
    media.mkdir()
    shutil.copy(videos["main"], media / "clip.mkv")
    (media / "clip.srt").write_text("1\n00:00:00,000 --> 00:00:30,000\nA red car drives by.\n")
    return {"tmp": tmp, "media": media, "clip": media / "clip.mkv"}


def upload_mb(library) -> float:
    """The server's limit: the clip fits as a data URL, twice its size does not."""
    return 1.5 * library["clip"].stat().st_size / 2**20


@pytest.fixture(scope="module")
def server(library, converted):
    s = Server(["--model", converted["oryx-vit"], "--media-dir", library["media"],
                "--num-frames", 4, "--max-upload-mb", upload_mb(library)], library["tmp"])
    try:
        yield s.wait()
    finally:
        s.stop()


def chat_body(url: str, sfllava: dict | None = None, **fields) -> dict:
    return {"model": "mlx-oryx-vit", "max_tokens": 2,
            "messages": [first_message(url, QUESTION)], "sfllava": sfllava or {}, **fields}


# The OpenAI fields that are options of ours, and the option each one is.
OPENAI_FIELDS = {"temperature": "temp", "top_p": "top_p", "max_tokens": "max_tokens",
                 "seed": "seed"}


@pytest.mark.server
def test_a_bad_value_is_the_same_line_in_the_servers_400(server, library):
    """Every option of the `sfllava` object and every OpenAI field that is one of ours:
    400 with the rule's own words, the server serving on."""
    http = server.http()
    url = str(library["clip"])
    server_options = [n for n, s in SPECS.items() if s.server]
    assert set(server_options) >= {"recipe", "num_frames", "fps", "timestamps", "seek", "start",
                                   "end", "subtitles"}
    cases = [(n, v, f"sfllava.{n}", chat_body(url, {n: v}))
             for n in server_options for v in bad_values(SPECS[n].rule) or ["yes"]]
    cases += [(o, v, f, chat_body(url, **{f: v}))
              for f, o in OPENAI_FIELDS.items() for v in bad_values(SPECS[o].rule)]
    for name, value, label, body in cases:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (label, value, r.text)
        error = r.json()["error"]
        if isinstance(SPECS[name].rule, Flag):
            assert error["message"] == f"{label} must be true or false, not {value!r}"
        else:
            assert error["message"].startswith(expected(name, value, label)), error
        assert error["param"] == label
    r = http.post("/v1/chat/completions", json=chat_body(url, {"fancy": 1}))
    assert r.status_code == 400 and "unknown sfllava option(s): fancy" in r.json()["error"]["message"]
    assert http.get("/health").status_code == 200


# ----------------------------------------------------------------------------------------
# Before the heavy imports


def run_cli(args: list, tmp: Path):
    """`sfllava ARGS` with -X importtime: (the process, the modules it imported)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "sfllava_app.cli",
                        *map(str, args)], capture_output=True, text=True, timeout=120,
                       env=run_env(tmp), cwd=REPO)
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    said = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
    return r, imported, said


def test_user_errors_end_before_the_runtime_is_imported(converted, videos, tmp_path):
    model = converted["oryx-vit"]
    cases = [
        (["generate", "--model", model, "--video", tmp_path / "missing.mkv", "--prompt", "q"],
         "video not found"),
        (["generate", "--model", tmp_path / "no-model", "--video", videos["main"], "--prompt", "q"],
         "model not found"),
        (["generate", "--model", model, "--video", videos["main"], "--prompt", "q", "--fps", "0"],
         "--fps must be a number greater than 0"),
        (["chat", tmp_path / "missing.mkv", "--model", model], "video not found"),
        (["generate", "--model", model, "--image", tmp_path / "missing.jpg", "--prompt", "q"],
         "picture not found"),
        (["batch", videos["main"], "--model", model, "--prompt", "q", "--out", tmp_path / "o.jsonl",
          "--top-p", "1.5"], "--top-p must be a number greater than 0 and at most 1"),
        (["serve", "--model", model, "--temp", "-1"], "--temp must be a number of at least 0"),
        (["frames", videos["main"], "--seek", "fast"], "--seek must be one of exact, keyframe"),
    ]
    for args, says in cases:
        r, imported, said = run_cli(args, tmp_path)
        assert r.returncode == 2 and said[0].startswith(f"error: {says}"), said
        assert len(said) == 1, said
        assert not imported & set(HEAVY), (args, imported & set(HEAVY))
        if "not found" in says:  # a missing file is refused before the decoders, or MLX
            assert not imported & {"av", "mlx.core", "PIL.Image"}, (args, imported)


def test_help_imports_no_runtime(tmp_path):
    from sfllava_app.cli import SUBCOMMANDS

    for args in [[], *([name] for name, _, _ in SUBCOMMANDS)]:
        r, imported, _ = run_cli([*args, "--help"], tmp_path)
        assert r.returncode == 0 and "usage:" in r.stdout, args
        assert not imported & set(HEAVY), (args, imported & set(HEAVY))


# ----------------------------------------------------------------------------------------
# Resolved options: recorded, and what keys a batch line


@pytest.mark.slow
def test_generate_json_records_the_resolved_options(converted, library, tmp_path):
    def generate(*flags):
        args = ["generate", "--model", converted["oryx-vit"], "--video", library["clip"],
                "--prompt", QUESTION, "--max-tokens", 2, "--json", *flags]
        r = subprocess.run([sys.executable, "-m", "sfllava_app.cli", *map(str, args)],
                           capture_output=True, text=True, timeout=180, env=run_env(tmp_path))
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["options"]

    import math

    import cv2

    from sfllava_mlx.config import ModelConfig

    o = generate("--fps", "2", "--start", "0:01")
    cap = cv2.VideoCapture(str(library["clip"]))  # the part's frames, by OpenCV's count
    n, rate = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    inside = n - math.ceil(1.0 * rate)  # frames at or after 1 s
    recipe_t = ModelConfig.read(converted["oryx-vit"]).recipe("native", None).num_frames
    assert o["num_frames"] == min(recipe_t, math.ceil(inside / rate * 2)) != recipe_t
    assert o["fps"] == 2.0 and o["start"] == 1.0 and o["end"] is None
    assert o["subtitles"] == str(library["media"] / "clip.srt")
    assert o["system_prompt"] == "You are a helpful assistant." and o["max_tokens"] == 2
    assert (o["temp"], o["top_p"], o["seed"], o["kv_bits"]) == (0.0, 1.0, None, None)
    off = generate("--subtitles", "off", "--system-prompt", "Be brief.", "--num-frames", 4)
    assert off["subtitles"] is None and off["system_prompt"] == "Be brief." and off["num_frames"] == 4


@pytest.mark.slow
def test_a_batch_rerun_with_other_options_answers_again(converted, library, tmp_path,
                                                        capsys, monkeypatch):
    """Each answer-changing option gets its own line; lines of other option sets stay;
    the same command again answers nothing."""
    from sfllava_app.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "r.jsonl"

    def batch(*flags) -> str:
        code = main(["batch", library["clip"], "--model", converted["oryx-vit"], "--prompt",
                     "What moves?", "--out", out, *map(str, flags)])
        err = capsys.readouterr().err
        assert code == 0, err
        return err

    base = ("--num-frames", 8, "--max-tokens", 4)
    assert "1 to answer" in batch(*base)
    variants = [
        ("--num-frames", 16, "--max-tokens", 8, "--system-prompt", "Be brief."),  # the issue's
        (*base, "--fps", 1), (*base, "--seek", "keyframe"), (*base, "--timestamps"),
        (*base, "--subtitles", "off"), (*base, "--temp", 0.7, "--seed", 3),
        (*base, "--top-p", 0.5), (*base, "--kv-bits", 8), (*base, "--max-kv-size", 4000),
        (*base, "--end", 3),
    ]
    for k, flags in enumerate(variants, start=2):
        assert "1 to answer" in batch(*flags), flags
        lines = json_lines(out.read_text())
        assert len(lines) == k, flags
    lines = json_lines(out.read_text())
    by = {(x["options"]["num_frames"], x["options"]["system_prompt"]): x for x in lines}
    first, second = by[8, "You are a helpful assistant."], by[16, "Be brief."]
    assert first["options"]["max_tokens"] == 4 and second["options"]["max_tokens"] == 8
    assert len(second["tokens"]) <= 8 and second["visual_tokens"] > first["visual_tokens"]
    assert {x["options"]["subtitles"] for x in lines} == {str(library["media"] / "clip.srt"), None}
    assert len({json.dumps(x["options"], sort_keys=True) for x in lines}) == len(lines)
    for flags in [base, *variants]:  # every option set again: nothing to answer
        assert "0 to answer" in batch(*flags)
    assert json_lines(out.read_text()) == lines


# ----------------------------------------------------------------------------------------
# serve: held conversations by the resolved options, the 413, memory


@pytest.mark.server
def test_a_data_url_does_not_continue_a_conversation_whose_subtitles_it_lacks(server, library):
    """The same bytes as a file with a subtitle file beside it, and as a data URL (no
    sidecar): two conversations, each answered with what it has."""
    client = server.client()

    def ask(url, history=()):
        messages = [first_message(url, QUESTION)]
        for answer, question in history:
            messages += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": question}]
        r = client.chat.completions.create(model="mlx-oryx-vit", messages=messages, max_tokens=2)
        return r.choices[0].message.content, r.model_extra["sfllava"]

    text, record = ask(str(library["clip"]))
    assert record["subtitles"]["lines"] == 1
    assert record["options"]["subtitles"] == str(library["media"] / "clip.srt")
    follow = [(text, "And then?")]
    _, as_data = ask(data_url(library["clip"]), follow)
    assert as_data["cache"] != "held" and as_data["subtitles"] is None
    assert as_data["options"]["subtitles"] is None
    _, as_file = ask(str(library["clip"]), follow)
    assert as_file["cache"] == "held" and as_file["subtitles"]["lines"] == 1


@pytest.mark.server
def test_an_upload_past_the_limit_is_the_clients_413(server, library, tmp_path):
    """Through the official client, several times: a 413, never a broken connection."""
    import openai

    big = tmp_path / "big.mkv"
    big.write_bytes(library["clip"].read_bytes() * 2)  # twice the clip: past the limit
    assert big.stat().st_size > upload_mb(library) * 2**20
    client = server.client()
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="mlx-oryx-vit", max_tokens=2,
                                           messages=[first_message(data_url(big), QUESTION)])
        assert e.value.status_code == 413
        assert "--max-upload-mb" in e.value.response.json()["error"]["message"]
    assert any("refused 413 request_too_large" in line for line in server.log)
    r = client.chat.completions.create(model="mlx-oryx-vit", max_tokens=2,
                                       messages=[first_message(str(library["clip"]), QUESTION)])
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.server
def test_idle_held_conversations_give_their_memory_to_a_new_request(converted, library,
                                                                    videos, tmp_path):
    """Memory for one conversation: a second video's request drops the idle one (logged),
    then answers as alone; the first is opened again when it comes back."""
    from sfllava_mlx import Engine

    other = library["media"] / "other.mkv"
    shutil.copy(videos["other"], other)
    tokens = 600
    plan = Engine(converted["oryx-vit"]).plan(library["clip"], num_frames=1, max_tokens=tokens)
    s = Server(["--model", converted["oryx-vit"], "--media-dir", library["media"],
                "--num-frames", 1, "--subtitles", "off"], tmp_path,
               env={"SFLLAVA_MEMORY_LIMIT_GB": repr(plan.total * 1.05 / 1e9)}).wait()
    try:
        client = s.client()

        def ask(path):
            r = client.chat.completions.create(model="mlx-oryx-vit", max_tokens=tokens,
                                               messages=[first_message(str(path), QUESTION)])
            return r.model_extra["sfllava"]

        ask(library["clip"])
        ask(other)
        assert any("dropped an idle held conversation" in line and "clip.mkv" in line
                   for line in s.log), s.log
        status = s.http().get("/v1/sfllava/status").json()
        assert status["held_conversations"] == 1 and status["errors"] == 0
    finally:
        s.stop()


# ----------------------------------------------------------------------------------------
# chat: the context limit it really has


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_shows_the_max_kv_size_as_its_context(library, converted, tmp_path):
    import shlex

    from tests.test_chat import Terminal, at_prompt, statuses
    from tests.test_chat_support import env, sfllava_cmd

    limit = 3000
    command = " ".join(map(shlex.quote, sfllava_cmd() + [
        "chat", str(library["clip"]), "--model", str(converted["oryx-vit"]), "--num-frames", "4",
        "--max-tokens", "2", "--max-kv-size", str(limit)]))
    term = Terminal(command, env(tmp_path / "xdg"))
    try:
        screen = term.wait_for(at_prompt)
        assert f"context {limit} tokens" in screen
        term.send(QUESTION, "Enter")
        screen = term.wait_for(lambda s: statuses(s) != [])
        assert statuses(screen)[0][3] == limit
    finally:
        term.close()


def test_options_error_names_the_option_as_each_front_end_spells_it():
    with pytest.raises(OptionError) as e:
        Options.of(fps=0)
    assert str(e.value) == "--fps must be a number greater than 0, not 0"
    assert str(e.value.named("sfllava.fps")) == "sfllava.fps must be a number greater than 0, not 0"


def test_allowed_values_are_written_once():
    """The front ends take an option's allowed values from the schema: no list of their
    own (two allowed values of one option side by side, in code or in a message)."""
    import re

    from sfllava_mlx.config import RECIPES
    from sfllava_mlx.frames.sampling import SEEK_MODES
    from sfllava_mlx.options import COMPUTE_UNITS, KV_BITS, VISION_BACKENDS

    for front in ("app/options.py", "app/serve/request.py", "app/serve/answer.py",
                  "app/batch/run.py", "app/frames.py", "app/serve/page.py"):
        text = (REPO / front).read_text().split('"""', 2)[2]  # past the module's usage text
        for allowed in (RECIPES, SEEK_MODES, VISION_BACKENDS, COMPUTE_UNITS):
            a, b = allowed[:2]
            assert not re.search(rf"\b{a}\b.{{0,12}}\b{b}\b", text), (front, allowed)
    assert SPECS["kv_bits"].rule.values == KV_BITS
