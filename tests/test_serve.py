"""`sfllava serve` (design.md §7): the real server on a free loopback port, spoken to with the
official `openai` client (and raw HTTP where a client cannot be made to misbehave).

References are independent of the server: `sfllava generate --json` (conftest's
`cli_answers`) and `sfllava chat --json` for a follow-up, each run as its own process.
The tiny model of conftest answers differently for every video, so equal tokens mean
the same video, frames, prompt and cache were used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sfllava_convert.tiny.command import Server, first_message, run_env, video_part
from tests.conftest import MAX_TOKENS, QUESTION, json_lines, sfllava
from tests.serve_support import chatty_model, data_url, truncated_mp4, wait_until

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.server  # every test here talks to a real `sfllava serve`

KEY = "sk-test-serve"
FOLLOW_UP = "What color is the car?"
MODEL_ID = "mlx-oryx-vit"  # conftest converts to <work>/mlx-oryx-vit: design.md §7's last path part
UPLOAD_MB = 1


@pytest.fixture(scope="module")
def place(tmp_path_factory, videos):
    """The media directory the server may read, and what lies around it."""
    tmp = tmp_path_factory.mktemp("serve")
    media, outside = tmp / "media", tmp / "outside"
    media.mkdir()
    outside.mkdir()
    shutil.copy(videos["main"], media / "main.mkv")
    shutil.copy(videos["other"], outside / "secret.mkv")
    (media / "notes.mp4").write_text("this is a text file, not a video\n")
    (media / "link.mkv").symlink_to(outside / "secret.mkv")
    cut = truncated_mp4(tmp, media / "cut.mp4")
    if cut is None:  # no ffmpeg: a Matroska file cut inside its header
        cut = media / "cut.mkv"
        cut.write_bytes(Path(videos["main"]).read_bytes()[:300])
    return {"tmp": tmp, "media": media, "outside": outside, "main": media / "main.mkv",
            "cut": cut, "ref": tmp_path_factory.mktemp("serve-ref")}


@pytest.fixture(scope="module")
def server(place, converted):
    s = Server(["--model", converted["oryx-vit"], "--api-key", KEY, "--media-dir", place["media"],
                "--max-upload-mb", UPLOAD_MB], place["tmp"])
    try:
        yield s.wait()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(KEY)


@pytest.fixture(scope="module")
def chat_reference(place, converted):
    """`sfllava chat --json` on the same video: QUESTION, then FOLLOW_UP (own cache)."""
    r = sfllava(["chat", place["main"], "--model", converted["oryx-vit"], "--max-tokens", MAX_TOKENS,
                 "--json"], place["ref"], stdin=f"{QUESTION}\n{FOLLOW_UP}\n")
    assert r.returncode == 0, r.stderr
    turns = json_lines(r.stdout)
    assert len(turns) == 2
    return turns


def ask(client, messages, **kw):
    return client.chat.completions.create(model=kw.pop("model", MODEL_ID), messages=messages,
                                          max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)


def ask_streamed(client, messages, **kw):
    """(text, the last chunk) of a streamed answer."""
    stream = ask(client, messages, stream=True, **kw)
    text, last = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        last = chunk
    return "".join(text), last


def extra(obj) -> dict:
    return obj.model_extra["sfllava"]


def assert_same_answer(record: dict, ref: dict) -> None:
    assert record["tokens"] == ref["tokens"]
    assert record["text"] == ref["text"]
    assert record["visual_tokens"] == ref["visual_tokens"]


def assert_usage(usage, record: dict) -> None:
    assert usage.completion_tokens == len(record["tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The whole prompt = what this request prefilled + what it reused.
    assert usage.prompt_tokens == record["prompt_tokens"] + usage.prompt_tokens_details.cached_tokens


# ----------------------------------------------------------------------------------------
# Answers


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    with server.http() as h:  # no key: /health only
        assert h.get("/health").json() == {"status": "ok"}
        assert h.get("/v1/models").status_code == 401


def test_answer_equals_generate(client, place, cli_answers):
    ref = cli_answers["oryx-vit"]
    r = ask(client, [first_message(f"file://{place['main']}", QUESTION)])
    record = extra(r)
    assert r.choices[0].message.content == ref["text"]
    assert r.choices[0].finish_reason == ref["finish_reason"]
    assert_same_answer(record, ref)
    assert_usage(r.usage, record)
    # The first turn's prompt holds the whole prefix: generate prefilled all of it.
    assert r.usage.prompt_tokens == ref["prompt_tokens"]
    assert record["cache"] in ("miss", "held")
    assert set(ref["timings_s"]) <= set(record["timings_s"])


def test_streamed_answer_equals_generate(client, place, cli_answers):
    ref = cli_answers["oryx-vit"]
    text, last = ask_streamed(client, [first_message(str(place["main"]), QUESTION)])
    assert text == ref["text"]
    assert last.choices[0].finish_reason == ref["finish_reason"]
    assert_same_answer(extra(last), ref)
    assert_usage(last.usage, extra(last))
    assert last.usage.prompt_tokens == ref["prompt_tokens"]


def test_follow_up_prefills_only_its_own_tokens(client, place, chat_reference):
    first, second = chat_reference
    messages = [first_message(str(place["main"]), QUESTION)]
    r1 = ask(client, messages)
    assert_same_answer(extra(r1), first)
    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": FOLLOW_UP}]
    text, last = ask_streamed(client, messages)
    record = extra(last)
    assert record["cache"] == "held"
    assert text == second["text"] and record["tokens"] == second["tokens"]
    assert record["prompt_tokens"] == second["prompt_tokens"]  # the follow-up's own tokens
    assert record["timings_s"]["frames"] == record["timings_s"]["vision"] == 0
    assert_usage(last.usage, record)
    assert last.usage.prompt_tokens == r1.usage.prompt_tokens + len(extra(r1)["tokens"]) + second["prompt_tokens"]


def test_a_dropped_conversation_is_replayed_with_the_tokens_the_server_wrote(client, place,
                                                                         chat_reference):
    # The server holds 4 conversations (--max-conversations): 4 others push this one out.
    first, second = chat_reference
    start = [first_message(str(place["main"]), QUESTION)]
    r1 = ask(client, start)
    for i in range(4):
        ask(client, [first_message(str(place["main"]), f"Question number {i}?")], max_tokens=2)
    text, last = ask_streamed(client, start + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": FOLLOW_UP}])
    record = extra(last)
    # Its first turn was prefilled again from the request (the answer's own tokens, which
    # its text alone would not give back: the tiny model splits characters), then chat's answer.
    assert text == second["text"] and record["tokens"] == second["tokens"]
    assert record["cache"] == "held"  # the video's prefix was still held
    reused = last.usage.prompt_tokens_details.cached_tokens  # system prompt + video
    question = first["prompt_tokens"] - reused  # chat's first turn prefilled them all
    assert record["prompt_tokens"] == question + len(first["tokens"]) + second["prompt_tokens"]
    assert_usage(last.usage, record)


def test_video_as_data_url_is_the_same_video(client, place, cli_answers):
    # Same content as the file: the held conversation (or the cache) is found by content.
    r = ask(client, [first_message(data_url(place["main"]), QUESTION)])
    assert_same_answer(extra(r), cli_answers["oryx-vit"])
    assert extra(r)["cache"] in ("held", "hit")


def test_picture_as_image_url_equals_generate(client, place, converted):
    import cv2
    import numpy as np

    picture = place["media"] / "picture.png"
    rng = np.random.default_rng(7)
    cv2.imwrite(str(picture), rng.integers(0, 256, (6, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1))
    g = sfllava(["generate", "--model", converted["oryx-vit"], "--image", picture, "--prompt", QUESTION,
                 "--max-tokens", MAX_TOKENS, "--json"], place["ref"])
    assert g.returncode == 0, g.stderr
    ref = json.loads(g.stdout)
    r = ask(client, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(picture, "image/png")}},
        {"type": "text", "text": QUESTION}]}])
    assert_same_answer(extra(r), ref)
    assert r.usage.prompt_tokens == ref["prompt_tokens"]


def test_per_request_options(client, place):
    r = ask(client, [first_message(str(place["main"]), QUESTION)],
            extra_body={"sfllava": {"num_frames": 8, "seek": "exact"}})
    assert extra(r)["visual_tokens"] == 2 * 2 * 2 + 6  # 2 slow frames x 2x2, 6 fast x 1x1
    assert extra(r)["cache"] == "miss"  # other sampling: another video cache entry
    # --fps 1 on a 16 s clip: 16 frames, 4 slow x 2x2 + 12 fast x 1x1 (design.md §2.2).
    r = ask(client, [first_message(str(place["main"]), QUESTION)], extra_body={"sfllava": {"fps": 1.0}})
    assert extra(r)["visual_tokens"] == 4 * 4 + 12
    plain = ask(client, [first_message(str(place["main"]), QUESTION)])
    timed = ask(client, [first_message(str(place["main"]), QUESTION)],
                extra_body={"sfllava": {"timestamps": True}})
    assert timed.usage.prompt_tokens > plain.usage.prompt_tokens  # the time instruction
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [first_message(str(place["main"]), QUESTION)],
            extra_body={"sfllava": {"num_frames": 0}})
    assert e.value.code == "invalid_value"


def test_second_server_process_hits_the_video_cache(place, converted, client, cli_answers,
                                                   chat_reference):
    ref = cli_answers["oryx-vit"]
    ask(client, [first_message(str(place["main"]), QUESTION)])  # the cache is written by now
    other = Server(["--model", converted["oryx-vit"], "--media-dir", place["media"]], place["tmp"])
    try:
        c = other.wait().client()
        r = ask(c, [first_message(str(place["main"]), QUESTION)])
        assert extra(r)["cache"] == "hit"
        assert_same_answer(extra(r), ref)
        assert extra(r)["timings_s"]["frames"] == extra(r)["timings_s"]["vision"] == 0
        # The prefix came from the cache too: only the question was prefilled.
        assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - extra(r)["prompt_tokens"]
        assert extra(r)["prompt_tokens"] == chat_reference[0]["prompt_tokens"] - r.usage.prompt_tokens_details.cached_tokens
    finally:
        other.stop()


# ----------------------------------------------------------------------------------------
# Load


def test_concurrent_clients_all_get_whole_answers(server, client, place, cli_answers, chat_reference):
    ref, (_, second) = cli_answers["oryx-vit"], chat_reference
    start = [first_message(str(place["main"]), QUESTION)]
    follow = start + [{"role": "assistant", "content": ref["text"]},
                      {"role": "user", "content": FOLLOW_UP}]
    plan = [(start, False), (start, True), (follow, False), (follow, True)] * 2
    health, stop = [], threading.Event()

    def poll_health():
        with server.http() as h:
            while not stop.is_set():
                tic = time.perf_counter()
                assert h.get("/health").status_code == 200
                health.append(time.perf_counter() - tic)
                time.sleep(0.02)

    def one(item):
        messages, streamed = item
        c = server.client(KEY)
        if streamed:
            text, last = ask_streamed(c, messages)
            return text, extra(last)
        r = ask(c, messages)
        return r.choices[0].message.content, extra(r)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        with ThreadPoolExecutor(len(plan)) as pool:
            results = list(pool.map(one, plan))
    finally:
        stop.set()
        poller.join()
    for (messages, _), (text, record) in zip(plan, results):
        expected = ref if messages is start else second
        assert text == expected["text"] and record["tokens"] == expected["tokens"]
    assert health and max(health) < 1.0, f"/health took up to {max(health):.2f} s"


@pytest.fixture(scope="module")
def chatty(place, converted, tmp_path_factory):
    """A server whose model never ends an answer (something to stop mid-stream), one
    answer at a time (--decode-concurrency 1): what waits, waits in its queue."""
    tmp = tmp_path_factory.mktemp("serve-chatty")
    model = chatty_model(converted["oryx-vit"], tmp / "chatty")
    s = Server(["--model", model, "--media-dir", place["media"], "--num-frames", "8",
                "--decode-concurrency", "1"], tmp)
    try:
        yield s.wait()
    finally:
        s.stop()


KILLED_CLIENT = """
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0)
stream = c.chat.completions.create(model="chatty", stream=True, max_tokens=20000, messages=[
    {"role": "user", "content": [{"type": "video_url", "video_url": {"url": sys.argv[2]}},
                                 {"type": "text", "text": "Talk."}]}])
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print("chunk", flush=True)
"""


def test_client_killed_mid_stream_frees_the_model(chatty, place):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, chatty.base_url, str(place["main"])],
                            stdout=subprocess.PIPE, text=True, env=run_env(place["tmp"]))
    try:
        for _ in range(5):  # it is streaming
            assert proc.stdout.readline().startswith("chunk")
        with chatty.http() as h:
            tic = time.perf_counter()
            assert h.get("/health").status_code == 200  # while the model talks
            assert time.perf_counter() - tic < 1.0
            assert h.get("/v1/sfllava/status").json()["busy"]
    finally:
        proc.kill()
        proc.wait()
    with chatty.http() as h:
        def cancelled():
            recent = h.get("/v1/sfllava/status").json()["recent"]
            return next((j for j in recent if j["state"] == "cancelled"), None)
        job = wait_until(cancelled)
    assert 5 <= job["tokens"] < 20000  # stopped long before its end
    assert job["tokens_after_cancel"] <= 1  # at the first token after the disconnect
    # The model is free: the next request is answered in full.
    r = ask(chatty.client(), [first_message(str(place["main"]), "Again.")], max_tokens=5,
            model="chatty")
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_clients_that_leave_before_the_answer_free_the_model(chatty, place):
    # Not streamed: one leaves while its answer is being written, one while it waits its turn.
    body = {"model": "chatty", "max_tokens": 20000,
            "messages": [first_message(str(place["main"]), "Talk.")]}

    def leave_after(seconds):
        with httpx.Client(base_url=chatty.url, timeout=seconds) as h:
            with pytest.raises(httpx.TimeoutException):
                h.post("/v1/chat/completions", json=body)

    with chatty.http() as h:
        before = h.get("/v1/sfllava/status").json()["cancelled"]
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(leave_after, 2.0)
            time.sleep(0.5)
            queued = pool.submit(leave_after, 0.5)
            running.result(), queued.result()
        status = wait_until(lambda: (s := h.get("/v1/sfllava/status").json())["cancelled"] >= before + 2
                            and not s["busy"] and s)
    ran, waited = status["recent"][-2:]
    assert ran["state"] == waited["state"] == "cancelled"
    assert 0 < ran["tokens"] < 20000 and waited["tokens"] == 0


def test_requests_waiting_in_the_queue_are_served_first_come_first_served(chatty, place):
    # A long answer runs; three short requests arrive one after the other meanwhile: each
    # waits its turn, all are answered in full, in the order they came.
    messages = [first_message(str(place["main"]), "Talk.")]
    c = chatty.client()
    with ThreadPoolExecutor(4) as pool:
        long = pool.submit(ask, c, messages, max_tokens=2000, model="chatty")
        wait_until(lambda: server_status(chatty)["busy"])
        short = []
        for _ in range(3):
            short.append(pool.submit(ask, c, messages, max_tokens=3, model="chatty"))
            queued = len(short)
            wait_until(lambda n=queued: server_status(chatty)["queued"] >= n or long.done())
        results = [long.result()] + [f.result() for f in short]
    assert [r.usage.completion_tokens for r in results] == [2000, 3, 3, 3]
    assert all(extra(r)["timings_s"]["queue"] > 0 for r in results[1:])
    done = [j["id"] for j in server_status(chatty)["recent"]]
    assert [done.index(r.id) for r in results] == sorted(done.index(r.id) for r in results)


# ----------------------------------------------------------------------------------------
# Bad requests: each answered with design.md §7's status and JSON error, the server serving on


def server_status(server, key=None) -> dict:
    with server.http(key) as h:
        return h.get("/v1/sfllava/status").json()


def raw_post(server, body: bytes, key=KEY, headers=None):
    with server.http(key) as h:
        return h.post("/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json", **(headers or {})})


def body_for(url, question=QUESTION, **fields) -> bytes:
    return json.dumps({"model": MODEL_ID, "max_tokens": 2, "messages": [first_message(url, question)],
                       **fields}).encode()


def bad_cases(place):
    main, media, outside = place["main"], place["media"], place["outside"]
    big = Path(place["tmp"]) / "big.bin"
    if not big.exists():
        big.write_bytes(os.urandom(int(UPLOAD_MB * 2**20 * 1.5)))
    two = {"model": MODEL_ID, "messages": [{"role": "user", "content": [
        video_part(str(main)), video_part(str(main)), {"type": "text", "text": "?"}]}]}
    return {
        "malformed JSON": (b'{"model": "x", "messages": [', {}, 400, "invalid_json"),
        "missing messages": (json.dumps({"model": MODEL_ID}).encode(), {}, 400, "missing_messages"),
        "two videos": (json.dumps(two).encode(), {}, 400, "too_many_videos"),
        "video not found": (body_for(str(media / "nope.mp4")), {}, 400, "video_not_found"),
        "text file named .mp4": (body_for(str(media / "notes.mp4")), {}, 400, "invalid_video"),
        "truncated video": (body_for(str(place["cut"])), {}, 400, "invalid_video"),
        "outside the media dir": (body_for(str(outside / "secret.mkv")), {}, 403, "path_not_allowed"),
        "outside through a symlink": (body_for(str(media / "link.mkv")), {}, 403, "path_not_allowed"),
        "outside through ..": (body_for(f"file://{media}/../outside/secret.mkv"), {}, 403,
                               "path_not_allowed"),
        "missing file outside": (body_for(str(outside / "nope.mkv")), {}, 403, "path_not_allowed"),
        "a URL to fetch": (body_for("https://example.com/v.mp4"), {}, 400, "url_not_allowed"),
        "oversized data URL": (body_for(data_url(big, "video/mp4")), {}, 413, "request_too_large"),
        "text sent as a video": (body_for(data_url(media / "notes.mp4", "video/mp4")), {}, 400,
                                 "invalid_video"),
        "wrong API key": (body_for(str(main)), {"key": "sk-wrong"}, 401, "invalid_api_key"),
        "missing API key": (body_for(str(main)), {"key": None}, 401, "invalid_api_key"),
        "unknown model": (body_for(str(main), model="gpt-4o"), {}, 404, "model_not_found"),
        "past the context": (body_for(str(main), "car " * 40000), {}, 400, "context_length_exceeded"),
        "unknown sfllava option": (body_for(str(main), sfllava={"speed": 2}), {}, 400,
                                   "unsupported_parameter"),
        "not JSON content": (body_for(str(main)), {"headers": {"Content-Type": "text/plain"}}, 400,
                             "invalid_content_type"),
    }


CASES = ["malformed JSON", "missing messages", "two videos", "video not found",
         "text file named .mp4", "truncated video", "outside the media dir",
         "outside through a symlink", "outside through ..", "missing file outside", "a URL to fetch",
         "oversized data URL", "text sent as a video", "wrong API key", "missing API key", "unknown model",
         "past the context", "unknown sfllava option", "not JSON content"]


@pytest.mark.parametrize("case", CASES)
def test_bad_request_gets_its_status_and_the_server_serves_on(server, place, case):
    body, opts, status, code = bad_cases(place)[case]
    r = raw_post(server, body, key=opts.get("key", KEY), headers=opts.get("headers"))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert "sfllava-serve-" not in error["message"]  # no name of the server's own files
    assert server.alive()
    with server.http() as h:
        assert h.get("/health").status_code == 200


def test_errors_through_the_openai_client(client, server, place):
    bad = server.client("sk-wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.PermissionDeniedError):
        ask(client, [first_message(str(place["media"] / "link.mkv"), QUESTION)])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [first_message(str(place["main"]), "car " * 40000)], stream=True)
    assert e.value.code == "context_length_exceeded"


def test_bad_videos_leave_no_cache_entry(server, client, place):
    ask(client, [first_message(str(place["main"]), QUESTION)])  # a good one, cached
    for case in ("text file named .mp4", "truncated video"):
        body, _, status, _ = bad_cases(place)[case]
        assert raw_post(server, body).status_code == status
    root = Path(place["tmp"]) / "xdg-cache" / "sfllava" / "v1"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    metas = [json.loads((p / "meta.json").read_text()) for p in root.iterdir()
             if not p.name.startswith(".")]
    bad = {str(place["media"] / "notes.mp4"), str(place["cut"])}
    assert metas and not [m for m in metas if m["video"]["path"] in bad]
    assert os.path.getsize(place["main"]) in {m["video"]["size"] for m in metas}


def test_a_host_that_is_not_loopback_is_refused_without_a_key(converted, capsys):
    from sfllava_app.cli import main

    # Refused before the model is loaded or a port is bound (the CLI entry, in this process).
    assert main(["serve", "--model", converted["oryx-vit"], "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: refusing to listen on 0.0.0.0 without --api-key")


def test_dns_rebinding_host_is_refused_without_a_key(chatty):
    with chatty.http() as h:
        r = h.get("/v1/models", headers={"Host": "attacker.example:80"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        assert h.get("/v1/models").status_code == 200


# ----------------------------------------------------------------------------------------
# Many answers at once (--decode-concurrency): each the one it would get alone

TOGETHER = ("What happens in this video?", "Who is in it?", "What color is the car?",
            "Describe the scene in detail, please.")
LONG = 200  # tokens: long enough that the answers decode side by side


@pytest.fixture(scope="module")
def alone_answers(converted, place) -> dict:
    """Each TOGETHER question's answer alone (the library, a fresh Session each, no cache)."""
    from sfllava_mlx import Engine

    engine = Engine(converted["oryx-vit"])
    out = {}
    for q in TOGETHER:
        session = engine.open(place["main"], cache=False)
        list(session.ask(q, max_tokens=LONG))
        out[q] = session.last_turn
    assert len({tuple(t.tokens) for t in out.values()}) == len(TOGETHER)  # a mix-up would show
    return out


def stream_answer(client, question, place, events: list, drop_after=None, model=MODEL_ID):
    """A streamed answer through the openai client: (job id, text, the last chunk's record;
    None where it stops reading after `drop_after` chunks). `events` gets (kind, question)
    in the order they happen, across clients."""
    stream = ask(client, [first_message(str(place["main"]), question)], stream=True,
                 max_tokens=LONG, model=model)
    text, last, n = [], None, 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
            if n == 1:
                events.append(("first", question))
            text.append(chunk.choices[0].delta.content)
            if drop_after is not None and n == drop_after:
                stream.close()  # the client goes away mid-answer
                events.append(("dropped", question))
                return chunk.id, "".join(text), None
        last = chunk
    events.append(("last", question))
    return last.id, "".join(text), extra(last)


def assert_alone(text: str, record: dict, want) -> None:
    assert record["tokens"] == want.tokens and text == want.text == record["text"]
    assert np.abs(np.array(record["logprobs"]) - np.array(want.logprobs)).max() <= 5e-4


def test_four_streaming_clients_decode_together_each_as_alone(server, place, alone_answers):
    events: list = []
    with ThreadPoolExecutor(len(TOGETHER)) as pool:
        results = list(pool.map(lambda q: stream_answer(server.client(KEY), q, place, events),
                                TOGETHER))
    for q, (_, text, record) in zip(TOGETHER, results):
        assert_alone(text, record, alone_answers[q])
    kinds = [k for k, _ in events]
    assert kinds.index("last") >= len(TOGETHER)  # every answer had begun before one ended
    assert server_status(server, KEY)["decoding_peak"] >= 2


def test_a_client_dropped_mid_batch_leaves_the_others_unchanged(server, place, alone_answers):
    events: list = []
    dropped = TOGETHER[1]
    with ThreadPoolExecutor(len(TOGETHER)) as pool:
        results = list(pool.map(lambda q: stream_answer(
            server.client(KEY), q, place, events, drop_after=3 if q == dropped else None),
            TOGETHER))
    for q, (_, text, record) in zip(TOGETHER, results):
        if q != dropped:
            assert_alone(text, record, alone_answers[q])
    # It left while the others were being written: they ended after it, answered in full.
    kinds = [k for k, _ in events]
    assert kinds.index("dropped") < kinds.index("last")
    drop_id = results[TOGETHER.index(dropped)][0]
    recent = wait_until(lambda: (r := server_status(server, KEY)["recent"])
                        and any(j["id"] == drop_id for j in r) and r)
    job = next(j for j in recent if j["id"] == drop_id)
    assert job["state"] == "cancelled" and 3 <= job["tokens"] < LONG


def test_decode_concurrency_below_1_is_refused(converted, capsys):
    from sfllava_app.cli import main

    assert main(["serve", "--model", converted["oryx-vit"], "--decode-concurrency", "0"]) == 2
    assert "--decode-concurrency must be a whole number of at least 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pair(place, converted, tmp_path_factory):
    """A server that decodes two answers together at most."""
    tmp = tmp_path_factory.mktemp("serve-pair")
    s = Server(["--model", converted["oryx-vit"], "--media-dir", place["media"],
                "--decode-concurrency", 2], tmp)
    try:
        yield s.wait()
    finally:
        s.stop()


def test_beyond_n_requests_wait_first_come_first_served(pair, place, alone_answers):
    events: list = []
    questions = TOGETHER[:3]
    c = pair.client()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stream_answer, c, q, place, events, None, "mlx-oryx-vit")
                   for q in questions[:2]]
        wait_until(lambda: server_status(pair)["running"] == 2)
        futures.append(pool.submit(stream_answer, c, questions[2], place, events, None,
                                   "mlx-oryx-vit"))
        wait_until(lambda: server_status(pair)["queued"] == 1 or futures[0].done())
        results = [f.result() for f in futures]
    for q, (_, text, record) in zip(questions, results):
        assert_alone(text, record, alone_answers[q])
    status = server_status(pair)
    assert status["decoding_peak"] == 2  # never three at once
    order = [q for k, q in events if k == "first"]
    assert order.index(questions[2]) == 2  # the third began once one of the two had ended
    assert [k for k, q in events if q == questions[2]] == ["first", "last"]
    firsts = [i for i, (k, q) in enumerate(events) if k == "first" and q == questions[2]]
    lasts = [i for i, (k, _) in enumerate(events) if k == "last"]
    assert firsts[0] > lasts[0]


def test_an_answer_that_would_not_fit_beside_the_running_ones_waits(place, converted,
                                                                     tmp_path):
    """Memory for one answer alone, not two: requests that come together are answered one
    after another (none refused), each as alone. One frame a video and long answers: the
    KV caches, not the tower's working set, are what the memory holds."""
    from sfllava_mlx import Engine

    engine, tokens, questions = Engine(converted["oryx-vit"]), 1000, TOGETHER[:3]
    want = {}
    for q in questions:
        session = engine.open(place["main"], cache=False, num_frames=1)
        list(session.ask(q, max_tokens=tokens))
        want[q] = session.last_turn
    plan = engine.plan(place["main"], num_frames=1, max_tokens=tokens)
    assert plan.kv_cache > plan.working_set
    s = Server(["--model", converted["oryx-vit"], "--media-dir", place["media"],
                "--num-frames", 1], tmp_path,
               env={"SFLLAVA_MEMORY_LIMIT_GB": repr(plan.total * 1.001 / 1e9)}).wait()
    try:
        def one(q):
            r = ask(s.client(), [first_message(str(place["main"]), q)], max_tokens=tokens,
                    model="mlx-oryx-vit")
            return r.choices[0].message.content, extra(r)

        with ThreadPoolExecutor(len(questions)) as pool:
            results = list(pool.map(one, questions))
        for q, (text, record) in zip(questions, results):
            assert_alone(text, record, want[q])
        status = server_status(s)
        assert status["decoding_peak"] == 1 and status["errors"] == 0
        assert status["completed"] == len(questions)
    finally:
        s.stop()
