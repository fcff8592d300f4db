"""The `sfllava generate` contract a user relies on (design.md §3): errors and Ctrl-C."""

import json
import signal
import subprocess

import pytest

from sfllava_convert.tiny.command import REPO, run_env, sfllava_command
from tests.conftest import convert_checkpoint, sfllava


def assert_user_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: ")
    for w in words:
        assert w in first, first


def test_version(tmp_path):
    r = sfllava(["--version"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("sfllava ")


@pytest.mark.slow
def test_missing_model_is_a_user_error(tmp_path, videos):
    r = sfllava(["generate", "--model", tmp_path / "nope", "--video", videos["main"],
                 "--prompt", "hi"], tmp_path)
    assert_user_error(r, "model not found")


@pytest.mark.slow
def test_directory_without_model_is_a_user_error(tmp_path, videos):
    r = sfllava(["generate", "--model", tmp_path, "--video", videos["main"], "--prompt", "hi"],
                tmp_path)
    assert_user_error(r, "config.json")


@pytest.mark.slow
def test_missing_video_is_a_user_error(tmp_path, converted):
    r = sfllava(["generate", "--model", converted["oryx-vit"], "--video", tmp_path / "no.mp4",
                 "--prompt", "hi"], tmp_path)
    assert_user_error(r, "no.mp4")


@pytest.mark.slow
def test_context_overflow_is_a_user_error(tmp_path, sources, videos):
    # A context of 200 tokens cannot hold the 224 visual tokens of the tiny model.
    import shutil

    src = tmp_path / "src"
    shutil.copytree(sources["oryx-vit"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_position_embeddings"] = 200
    (src / "config.json").write_text(json.dumps(cfg))
    model = convert_checkpoint(src, tmp_path / "mlx")
    r = sfllava(["generate", "--model", model, "--video", videos["main"], "--prompt", "hi",
                 "--no-cache"], tmp_path)
    assert_user_error(r, "context")


@pytest.mark.slow
def test_json_stdout_is_only_json(tmp_path, converted, videos):
    r = sfllava(["generate", "--model", converted["oryx-vit"], "--video", videos["main"],
                 "--prompt", "What happens?", "--max-tokens", "4", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # the whole of stdout is one JSON object
    for key in ("text", "tokens", "logprobs", "prompt_tokens", "visual_tokens", "timings_s",
                "peak_memory_gb", "cache"):
        assert key in out
    t = out["timings_s"]
    assert set(t) >= {"frames", "vision", "prefill", "ttft", "generate"}
    # Critical-path shares: the stages before the first token add up to it, nothing counted twice.
    parts = t["frames"] + t["vision"] + t["prefill"]
    assert parts <= t["ttft"] * 1.05 + 0.01
    assert t["ttft"] - parts <= max(0.1 * t["ttft"], 0.03)  # no stage missing
    assert len(out["tokens"]) == len(out["logprobs"]) <= 4
    assert all(lp <= 0 for lp in out["logprobs"])


@pytest.mark.slow
def test_ctrl_c_ends_generate_quietly_with_130(tmp_path, converted, videos):
    cmd = sfllava_command(["generate", "--model", converted["oryx-vit"], "--video",
                           videos["main"], "--prompt", "Tell me everything.",
                           "--max-tokens", "100000", "--no-cache"])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=run_env(tmp_path), cwd=REPO)
    p.stdout.read(1)  # the answer is streaming
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.slow
def test_a_kv_cache_smaller_than_the_video_is_refused(tmp_path, converted, videos):
    # A rotating cache of 100 tokens would overwrite the 224 visual tokens: refused, not cut.
    r = sfllava(["generate", "--model", converted["oryx-vit"], "--video", videos["main"],
                 "--prompt", "hi", "--max-kv-size", "100", "--no-cache"], tmp_path)
    assert_user_error(r, "--max-kv-size")


def test_model_from_the_hub_downloads_no_pickles_or_code(tmp_path, converted, monkeypatch):
    import huggingface_hub

    from sfllava_mlx.model import resolve_model_path

    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(converted["oryx-vit"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_path("someone/sfllava-1b-4bit") == converted["oryx-vit"]
    assert asked["repo_id"] == "someone/sfllava-1b-4bit"
    patterns = asked["allow_patterns"]
    assert "*.safetensors" in patterns and "*.json" in patterns
    assert not any(p.endswith((".bin", ".pth", ".py", ".pt", ".pkl")) for p in patterns)
