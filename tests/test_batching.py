"""Many answers at once (sfllava_mlx/batching.py): answers decoded together through
mlx-lm's BatchGenerator, each held to the same Session's answer alone (`Session.ask`,
stream_generate): greedy tokens equal, logprobs within 5e-4, and the rest of the Turn
(text, finish reason, prompt tokens, timings, the conversation after it).

On conftest's sharpened tiny model the answer follows the prompt and the video (checked
below: the prompts' answers differ), so an answer mixed up with another's, a cache mixed
up with another's, or a question prefilled after the wrong prefix changes the tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from sfllava_mlx import Engine
from sfllava_mlx.batching import Decoder, answer_all
from tests.conftest import LOGPROB_TOL

pytestmark = pytest.mark.slow  # end-to-end runs of the tiny models against their references

PROMPTS = ("What happens in this video?", "Who is in it?", "What color is the car?",
           "Describe the scene in detail, please.")
TOKENS = 40


@pytest.fixture(scope="module")
def engine(converted):
    return Engine(converted["oryx-vit"])


def alone(engine, video, question, follow_up=None, max_tokens=TOKENS, **options):
    """The Turn(s) a fresh Session gives, decoded alone."""
    ask = {k: options.pop(k) for k in ("temp", "top_p", "seed") if k in options}
    session = Engine(engine.model, engine.tokenizer).open(video, cache=False, **options)
    list(session.ask(question, max_tokens=max_tokens, **ask))
    turns = [session.last_turn]
    if follow_up:
        list(session.ask(follow_up, max_tokens=max_tokens))
        turns.append(session.last_turn)
    return turns if follow_up else turns[0], session


def assert_same_turn(got, want, what: str, prefix: int = 0) -> None:
    """`prefix`: the tokens `want` prefilled that `got` found prefilled (another answer
    from the same prefix reported them)."""
    assert got.tokens == want.tokens, f"{what}: {got.tokens} != {want.tokens}"
    diff = float(np.abs(np.array(got.logprobs) - np.array(want.logprobs)).max()) if got.tokens else 0
    assert diff <= LOGPROB_TOL, f"{what}: logprobs differ by {diff:.2g}"
    assert got.text == want.text and got.finish_reason == want.finish_reason, what
    assert got.prompt_tokens == want.prompt_tokens - prefix, what
    assert set(got.timings_s) == set(want.timings_s), what


def run_together(decoder, asks, concurrency=None) -> list:
    errors = dict(answer_all(decoder, asks, concurrency))
    assert not [e for e in errors.values() if e is not None], errors
    return sorted(errors)


def test_answers_decoded_together_equal_their_answers_alone(engine, videos):
    """Four prompts about each of two videos, forked from each video's one prefilled prefix,
    all eight in one batch; then a follow-up in every forked conversation, decoded alone."""
    decoder = Decoder(engine.model, engine.tokenizer, concurrency=8)
    want, forks = {}, {}
    for name in ("main", "other"):
        session = engine.open(videos[name], cache=False)
        session.prefill()
        for p in PROMPTS:
            want[name, p] = alone(engine, videos[name], p, follow_up="And then?")[0]
            forks[name, p] = session.fork()
        assert len({tuple(want[name, p][0].tokens) for p in PROMPTS}) == len(PROMPTS)
    keys = list(forks)
    done = run_together(decoder, (forks[k].ask(k[1], max_tokens=TOKENS, decoder=decoder)
                                  for k in keys))
    assert done == list(range(len(keys)))
    prefix = forks[keys[0]].conversation.prefix_length()
    for k in keys:
        first = k[1] == PROMPTS[0]
        assert_same_turn(forks[k].last_turn, want[k][0], f"{k} together", 0 if first else prefix)
        record = forks[k].record()
        assert record["tokens"] == want[k][0].tokens
    # The first fork of each video carried the video's work (prefix tokens, frames,
    # vision, prefill), the others only their question, as one Session's turns after reset.
    for name in ("main", "other"):
        first, second = forks[name, PROMPTS[0]].last_turn, forks[name, PROMPTS[1]].last_turn
        assert first.timings_s["vision"] > 0 and second.timings_s["vision"] == 0
        assert first.prompt_tokens > 224 > second.prompt_tokens
    # Each conversation goes on from its own answer (its cache is the answer's own).
    for k in keys:
        list(forks[k].ask("And then?", max_tokens=TOKENS))
        assert_same_turn(forks[k].last_turn, want[k][1], f"{k} follow-up")
    decoder.close()


def test_sessions_of_other_prefixes_and_lengths_share_one_batch(engine, videos):
    """Different videos, system prompts (prefix lengths differ: the batch left-pads), answer
    lengths and a conversation on its second turn, joining a running batch one a round."""
    decoder = Decoder(engine.model, engine.tokenizer, concurrency=4)
    specs = [("main", {}, 12), ("short", {"system_prompt": "You describe videos briefly."}, 30),
             ("other", {"num_frames": 8}, 20), ("main", {"timestamps": True}, 25)]
    sessions = [engine.open(videos[v], cache=False, **o) for v, o, _ in specs]
    for s in sessions[:2]:
        s.prefill()
    list(sessions[2].ask(PROMPTS[2], max_tokens=5))  # alone, before the batch

    def asks():  # taken one a round: the batch grows while it decodes
        for s, (_, _, n) in zip(sessions, specs):
            yield s.ask(PROMPTS[3], max_tokens=n, decoder=decoder)

    run_together(decoder, asks())
    for i, (s, (v, o, n)) in enumerate(zip(sessions, specs)):
        if i == 2:
            want = alone(engine, videos[v], PROMPTS[2], follow_up=PROMPTS[3], max_tokens=5,
                         **o)[1]
            redo = Engine(engine.model, engine.tokenizer).open(videos[v], cache=False, **o)
            list(redo.ask(PROMPTS[2], max_tokens=5))
            list(redo.ask(PROMPTS[3], max_tokens=n))
            want = redo.last_turn
        else:
            want = alone(engine, videos[v], PROMPTS[3], max_tokens=n, **o)[0]
        assert_same_turn(s.last_turn, want, f"{v} {o}")
        assert len(s.last_turn.tokens) == n or s.last_turn.finish_reason == "stop"
    decoder.close()


def test_an_answer_dropped_mid_batch_leaves_the_others_unchanged(engine, videos):
    decoder = Decoder(engine.model, engine.tokenizer, concurrency=4)
    session = engine.open(videos["main"], cache=False)
    session.prefill()
    question_ids = [len(session.conversation.question_tokens(p)) for p in PROMPTS]
    forks = [session.fork() for _ in PROMPTS]
    streams = [f.ask(p, max_tokens=TOKENS, decoder=decoder) for f, p in zip(forks, PROMPTS)]
    got = [[] for _ in streams]
    live = set(range(len(streams)))
    while live:
        for i in sorted(live):
            chunk = next(streams[i], StopIteration)
            if chunk is StopIteration:
                live.discard(i)
            elif chunk is not None:
                got[i].append(chunk.token)
                if i == 1 and len(got[i]) == 3:  # its reader goes away
                    streams[i].close()
                    live.discard(i)
                    assert len(decoder) == 3  # its sequence left the batch, the others stay
        decoder.step()
    prefix = session.conversation.prefix_length()
    for i, (f, p) in enumerate(zip(forks, PROMPTS)):
        want = alone(engine, videos["main"], p)[0]
        if i == 1:  # what was written stays, as alone: the turn so far, its cache rewound
            assert f.last_turn.tokens == got[1] == want.tokens[:3]
            assert f.conversation.offset == session.conversation.offset + question_ids[1] + 3
        else:
            assert_same_turn(f.last_turn, want, f"answer {i} beside a dropped one",
                             0 if i == 0 else prefix)
    decoder.close()


def test_a_sampled_answer_samples_its_own_distribution(engine, videos):
    """Temperature and top-p are each answer's own, and so is its random key: seeded, a
    batched answer draws the tokens it draws alone with that seed."""
    specs = [(PROMPTS[0], dict(temp=0.9, top_p=0.8, seed=3)), (PROMPTS[0], dict(temp=1.5, seed=11)),
             (PROMPTS[1], {}), (PROMPTS[2], dict(temp=0.7, seed=5))]
    want = [alone(engine, videos["main"], p, **o)[0] for p, o in specs]
    assert want[0].tokens != want[1].tokens != want[2].tokens  # they did sample
    greedy = alone(engine, videos["main"], PROMPTS[0])[0]
    assert want[0].tokens != greedy.tokens and want[1].tokens != greedy.tokens
    decoder = Decoder(engine.model, engine.tokenizer, concurrency=4)
    session = engine.open(videos["main"], cache=False)
    session.prefill()
    forks = [session.fork() for _ in specs]
    run_together(decoder, (f.ask(p, max_tokens=TOKENS, decoder=decoder, **o)
                           for f, (p, o) in zip(forks, specs)))
    prefix = session.conversation.prefix_length()
    for i, (f, w) in enumerate(zip(forks, want)):
        assert_same_turn(f.last_turn, w, f"answer {i} {specs[i][1]}", 0 if i == 0 else prefix)
    decoder.close()


@pytest.mark.parametrize("temp,top_p,seed", [(0.8, 1.0, 3), (1.3, 0.7, 11), (0.5, 0.9, 0)])
def test_an_answers_own_sampler_draws_what_mlx_lm_draws_with_that_seed(temp, top_p, seed):
    """`own_sampler` against mlx-lm's `make_sampler` after `mx.random.seed`: the same
    tokens, draw after draw, over logits that change each step."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from sfllava_mlx.sampler import own_sampler

    rng = np.random.default_rng(seed)
    steps = [mx.array(rng.normal(size=(1, 64)).astype(np.float32) * 2) for _ in range(40)]
    steps = [x - mx.logsumexp(x, axis=-1, keepdims=True) for x in steps]
    mx.random.seed(seed)
    reference = make_sampler(temp, top_p)
    want = [reference(x).item() for x in steps]
    ours = own_sampler(temp, top_p, seed)
    mx.random.seed(seed + 1)  # the global key moves on: our draws do not follow it
    got = [ours(x).item() for x in steps]
    assert got == want and len(set(want)) > 5


def test_sampled_answers_decoding_alone_side_by_side_each_draw_their_own(engine, videos):
    """Two seeded, sampled answers that decode alone (`--kv-bits`: no batch form), a token
    of each in turn as the server's worker pulls them: each equals itself alone."""
    decoder = Decoder(engine.model, engine.tokenizer, concurrency=4)
    specs = [(PROMPTS[0], dict(temp=0.9, seed=3)), (PROMPTS[0], dict(temp=0.9, seed=4))]
    want = [alone(engine, videos["main"], p, kv_bits=8, **o)[0] for p, o in specs]
    assert want[0].tokens != want[1].tokens  # the seeds differ: so do the answers
    sessions = [engine.open(videos["main"], cache=False, kv_bits=8) for _ in specs]
    assert not any(decoder.takes(s.conversation) for s in sessions)
    run_together(decoder, (s.ask(p, max_tokens=TOKENS, decoder=decoder, **o)
                           for s, (p, o) in zip(sessions, specs)))
    for i, (s, w) in enumerate(zip(sessions, want)):
        assert_same_turn(s.last_turn, w, f"answer {i} {specs[i][1]}")
    decoder.close()


def test_kv_bits_and_max_kv_size_answers_decode_alone_beside_the_batch(engine, videos):
    """mlx-lm's batch caches hold neither a quantized nor a rotating KV cache: those answers
    decode alone (Session.ask's own path, a token a round) while the others batch."""
    decoder = Decoder(engine.model, engine.tokenizer, concurrency=4)
    specs = [{}, {"kv_bits": 8}, {"max_kv_size": 1024}, {"kv_bits": 4}]
    sessions = [engine.open(videos["main"], cache=False, **o) for o in specs]
    assert [decoder.takes(s.conversation) for s in sessions] == [True, False, False, False]
    streams = [s.ask(p, max_tokens=TOKENS, decoder=decoder) for s, p in zip(sessions, PROMPTS)]
    firsts = [next(s) for s in streams]  # started: one answer in the batch, three alone
    assert len(decoder) == 1
    assert firsts[0] is None and all(c is not None for c in firsts[1:])
    run_together(decoder, streams)
    for s, p, o in zip(sessions, PROMPTS, specs):
        assert_same_turn(s.last_turn, alone(engine, videos["main"], p, **o)[0], f"{o}")
    decoder.close()


def test_the_memory_plan_shrinks_a_batch_that_would_not_fit(engine, videos, monkeypatch):
    from sfllava_mlx.errors import MemoryPlanError
    from sfllava_mlx.memory import BATCH_COPIES, batch_bytes, batch_size

    plan = engine.plan(videos["main"])

    def together(k):  # the prefix once, every answer's own cache (copied as the batch grows)
        return batch_bytes(plan.weights, plan.working_set, plan.kv_cache, [plan.kv_cache] * k)

    assert together(3) - together(2) == BATCH_COPIES * plan.kv_cache > 0
    monkeypatch.setenv("SFLLAVA_MEMORY_LIMIT_GB", str((together(2) + together(3)) / 2e9))
    assert [batch_size(plan, k) for k in (1, 2, 3, 4, 8)] == [1, 2, 2, 2, 2]
    # Room for one answer alone, not two together: one at a time, not a refusal.
    monkeypatch.setenv("SFLLAVA_MEMORY_LIMIT_GB", str(plan.total * 1.001 / 1e9))
    assert engine.plan(videos["main"]).total == plan.total and batch_size(plan, 8) == 1
    # No room for one: refused, as before any batching.
    monkeypatch.setenv("SFLLAVA_MEMORY_LIMIT_GB", str(plan.total * 0.9 / 1e9))
    with pytest.raises(MemoryPlanError):
        engine.plan(videos["main"])


def test_open_in_bounded_steps_is_open(engine, videos):
    """Engine.open_steps pauses after every frame batch and every prefill chunk (a server
    decodes other answers there); driven to its end it is the Session `open` gives."""
    from sfllava_mlx.config import VISION_BATCH

    steps = engine.open_steps(videos["main"], cache=False, prefill=True)
    count = 0
    while True:
        try:
            pause = next(steps)
        except StopIteration as done:
            stepped = done.value
            break
        count += 1
        if pause is not None:  # the next frame is not decoded yet: wait for it
            pause(None)
    whole = engine.open(videos["main"], cache=False, prefill=True)
    frames = stepped.sampling.num_frames
    chunks = 2  # the 249-token prefix in one chunk, and its last token (as mlx-lm prefills)
    assert count >= frames // VISION_BATCH + chunks
    assert np.array_equal(np.array(stepped.visual.embeddings), np.array(whole.visual.embeddings))
    assert stepped.conversation.offset == whole.conversation.offset
    for a, b in zip(stepped.conversation.cache, whole.conversation.cache):
        assert np.array_equal(np.array(a.state[0]), np.array(b.state[0]))
    list(stepped.ask(PROMPTS[0], max_tokens=TOKENS))
    list(whole.ask(PROMPTS[0], max_tokens=TOKENS))
    assert stepped.last_turn.tokens == whole.last_turn.tokens
    assert stepped.last_turn.logprobs == whole.last_turn.logprobs


@pytest.mark.parametrize("step", [64, 512])
def test_the_prefill_in_steps_is_mlx_lms_prefill(engine, videos, step):
    """`prefill_steps` cuts the prompt where mlx-lm's generate_step does (chunks of `step`,
    the last token alone): the KV cache is bit for bit the one generate_step leaves."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from sfllava_mlx.conversation import prefill

    session = engine.open(videos["main"], cache=False)
    conv = session.conversation
    embeds = mx.concatenate([engine.model.embed_tokens(conv.prefix_tokens()),
                             session.visual.embeddings])
    lm = engine.model.language_model
    ours, theirs = make_prompt_cache(lm), make_prompt_cache(lm)
    seen = []
    prefill(lm, ours, embeddings=embeds, step=step, progress=lambda d, t: seen.append(d))
    for _ in generate_step(mx.zeros((embeds.shape[0],), mx.int32), lm, max_tokens=0,
                           prompt_cache=theirs, input_embeddings=embeds,
                           prefill_step_size=step):
        pass
    mx.eval([c.state for c in theirs])
    assert seen[0] == 0 and seen[-1] == embeds.shape[0] and len(seen) >= 3
    for a, b in zip(ours, theirs):
        assert a.offset == b.offset
        assert np.array_equal(np.array(a.keys[..., :a.offset, :]), np.array(b.keys[..., :b.offset, :]))
        assert np.array_equal(np.array(a.values[..., :a.offset, :]),
                              np.array(b.values[..., :b.offset, :]))


def test_the_readme_batching_example_runs(engine, videos, tmp_path, monkeypatch, capsys):
    import re

    from sfllava_convert.tiny.command import REPO

    section = (REPO / "README.md").read_text().split("## Python API", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "holiday.mp4").symlink_to(videos["main"])
    exec(compile(code, "README.md", "exec"), {"engine": engine})
    printed = capsys.readouterr().out.splitlines()
    questions = re.search(r"questions = (\[.*?\])", code).group(1)
    for line, q in zip(printed, eval(questions)):
        want = alone(engine, videos["main"], q, max_tokens=128)[0]
        assert line == f"{q} -> {want.text}" or "\n" in want.text
    assert len(printed) >= 3
