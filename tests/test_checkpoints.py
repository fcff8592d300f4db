"""The checkpoints users already have (issue #25, design.md §5.4), proven end to end.

A tiny transformers LLaVA-OneVision (tests/onevision_reference.py) is written as a Hugging
Face checkpoint and converted by mlx-vlm's own `convert`, float32 and 4-bit. Then:
- `sfllava generate` on the float mlx-vlm directory, loaded in place, gives transformers'
  answer (tokens; logprobs within LOGPROB_TOL, the reference in float64);
- on the 4-bit directory it gives mlx-vlm's own answer on the same weights: mlx-vlm's model
  (its tower, projector, pooling, newline, splice and quantized LLM) fed the same frames and
  prompt ids (its `generate` needs a processor that our tiny tokenizer lacks: no <video> token);
- on the Hugging Face directory it converts once into $XDG_CACHE_HOME/sfllava/models and the
  second run writes nothing; hub ids of either kind load from a hub cache (offline);
- `sfllava models --json` lists each kind in a hub-style cache and the converted-model cache;
- every refusal is one CheckpointError line (exit 2 from the command).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="the reference is a transformers model")
pytest.importorskip("mlx_vlm", reason="mlx-vlm (a test extra) writes the conversions under test")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the fixture is written with transformers 5's save_pretrained names",
                allow_module_level=True)

from sfllava_convert.tiny.command import run_env  # noqa: E402
from tests.conftest import LOGPROB_TOL, MAX_TOKENS, QUESTION, convert_checkpoint, sfllava  # noqa: E402
from tests.onevision_reference import (  # noqa: E402
    VIDEO_MEAN,
    VIDEO_STD,
    VIDEO_TOKEN,
    HFVideoReference,
    _Text,
    build_model,
    decoded,
    frame_positions,
    pixels,
    write_checkpoint,
)

pytestmark = pytest.mark.slow  # mlx-vlm conversions of a tiny checkpoint, and their answers

FRAMES = 8
HUB_MLX_VLM, HUB_HF, HUB_SFLLAVA, HUB_QWEN = ("mlx-community/tiny-ov-4bit", "llava-hf/tiny-ov-hf",
                                              "someone/tiny-ov-sfllava", "Qwen/tiny-qwen2-vl")


def _mlx_vlm_convert(src: Path, dst: Path, *flags) -> Path:
    subprocess.run([sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", str(src),
                    "--mlx-path", str(dst), *flags], check=True, capture_output=True,
                   env=run_env(dst.parent), timeout=300)
    return dst


@pytest.fixture(scope="module")
def ov(work):
    model = build_model(tied=False)
    src = write_checkpoint(model, work / "ck-src", "save_pretrained")
    return dict(model=model, src=src,
                f32=_mlx_vlm_convert(src, work / "ck-vlm-f32", "--dtype", "float32"),
                q4=_mlx_vlm_convert(src, work / "ck-vlm-q4", "--dtype", "float32", "-q",
                                    "--q-bits", "4"),
                ours=convert_checkpoint(src, work / "ck-ours", "--dtype", "float32"))


def _generate(model, video, tmp, env=None):
    args = ["generate", "--model", model, "--video", video, "--prompt", QUESTION,
            "--max-tokens", MAX_TOKENS, "--num-frames", FRAMES, "--json", "--no-cache"]
    r = subprocess.run(_cmd(args), capture_output=True, text=True, timeout=600, cwd=tmp,
                       env={**run_env(tmp), **(env or {})})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _cmd(args):
    from sfllava_convert.tiny.command import sfllava_command

    return sfllava_command(args)


def _hub_repo(hub: Path, repo: str, src: Path) -> None:
    """`src`'s files as huggingface-hub caches a download: blobs, a snapshot, refs/main."""
    root = hub / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub(ov, work):
    """A hub cache holding each kind, and a family that does not run here."""
    hub = work / "ck-hub"
    _hub_repo(hub, HUB_MLX_VLM, ov["q4"])
    _hub_repo(hub, HUB_HF, ov["src"])
    _hub_repo(hub, HUB_SFLLAVA, ov["ours"])
    qwen = work / "ck-qwen2-vl"
    _qwen2_vl(qwen, ov["f32"])
    _hub_repo(hub, HUB_QWEN, qwen)
    return hub


def _qwen2_vl(dst: Path, like: Path) -> Path:
    dst.mkdir()
    shutil.copyfile(like / "model.safetensors", dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "hidden_size": 64}))
    return dst


@pytest.fixture(scope="module")
def runs(ov, hub, videos, work):
    """Every `sfllava generate` of the module, two at a time."""
    tmp = work / "ck-runs"
    tmp.mkdir()
    offline = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    jobs = {"f32": (ov["f32"], {}), "q4": (ov["q4"], {}),
            "hub-mlx-vlm": (HUB_MLX_VLM, offline), "hub-hf": (HUB_HF, offline)}
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(_generate, m, videos["main"], tmp, env)
                   for k, (m, env) in jobs.items()}
        return {k: f.result() for k, f in futures.items()} | {"tmp": tmp}


def test_a_float_mlx_vlm_conversion_answers_as_transformers(ov, runs, videos):
    ref = HFVideoReference(ov["model"], ov["src"]).answer(videos["main"], QUESTION, MAX_TOKENS,
                                                          FRAMES)
    got = runs["f32"]
    assert got["tokens"] == ref.tokens
    assert np.allclose(got["logprobs"], ref.logprobs, atol=LOGPROB_TOL)
    assert got["visual_tokens"] == ref.visual_tokens


def mlx_vlm_answer(model_dir: Path, src: Path, video, max_tokens: int) -> list:
    """mlx-vlm's own model on `model_dir`: its video path and quantized LLM, greedy."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_vlm.utils import load_model

    model = load_model(model_dir)
    text = _Text(src)
    every = decoded(video)
    frames = [every[i] for i in frame_positions(len(every), FRAMES, "linspace")]
    size = model.config.vision_config.image_size
    pv = mx.array(pixels(frames, size, VIDEO_MEAN, VIDEO_STD).numpy())
    g = -(-(size // model.config.vision_config.patch_size) // 2)
    before, after = text.pieces(QUESTION)
    ids = mx.array([before + [VIDEO_TOKEN] * (FRAMES * g * g + 1) + after])
    emb = model.get_input_embeddings(ids, pixel_values_videos=pv).inputs_embeds
    cache = make_prompt_cache(model.language_model)
    logits = model.language_model(ids, cache=cache, inputs_embeds=emb).logits[0, -1]
    tokens = []
    for _ in range(max_tokens):
        tok = int(mx.argmax(logits))
        if tok in text.end_ids:
            break
        tokens.append(tok)
        logits = model.language_model(mx.array([[tok]]), cache=cache).logits[0, -1]
    return tokens


def test_a_quantized_mlx_vlm_conversion_gives_mlx_vlm_s_answer(ov, runs, videos):
    assert runs["q4"]["tokens"] == mlx_vlm_answer(ov["q4"], ov["src"], videos["main"], MAX_TOKENS)


def test_exactly_the_modules_the_file_quantized_are_quantized(ov):
    from mlx.utils import tree_flatten
    from safetensors import safe_open

    from sfllava_mlx.model import load_sfllava

    with safe_open(str(ov["q4"] / "model.safetensors"), "numpy") as f:
        in_file = {k.rsplit(".", 1)[0] for k in f.keys() if k.endswith(".scales")}
    model = load_sfllava(ov["q4"])
    quantized = {k.rsplit(".", 1)[0] for k, _ in tree_flatten(model.parameters())
                 if k.endswith(".scales")}
    assert quantized == in_file  # mlx-vlm's names and ours agree on the LLM
    assert any("embed_tokens" in k for k in quantized)
    assert not any(k.startswith(("vision_tower", "projector")) for k in quantized)
    assert model.path == ov["q4"]  # loaded in place: no copy


def test_hub_ids_of_either_kind_load_from_the_hub_cache(runs):
    assert runs["hub-mlx-vlm"]["tokens"] == runs["q4"]["tokens"]
    assert runs["hub-hf"]["tokens"] == runs["f32"]["tokens"]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def test_a_hugging_face_checkpoint_is_converted_once(ov, runs, videos, tmp_path):
    first = _generate(ov["src"], videos["main"], tmp_path)
    models = tmp_path / "xdg-cache" / "sfllava" / "models"
    (entry,) = models.iterdir()
    before = _tree(models)
    second = _generate(ov["src"], videos["main"], tmp_path)
    assert _tree(models) == before  # read, never written again
    assert first["tokens"] == second["tokens"] == runs["f32"]["tokens"]
    # the first use is `sfllava convert`'s conversion: the same weights, byte for byte
    assert (entry / "model.safetensors").read_bytes() == (ov["ours"] / "model.safetensors").read_bytes()
    # other settings are another entry; -q means what it means to convert
    from sfllava_mlx.model import load

    model, _ = load(ov["src"], quantize=True, q_bits=8, cache_dir=models)
    assert model.config.quantization["bits"] == 8 and len(list(models.iterdir())) == 2


def test_sfllava_models_lists_each_kind(ov, hub, runs, tmp_path):
    # a converted-model cache with one entry (the first use of the Hugging Face directory)
    from sfllava_mlx.model import load

    xdg = tmp_path / "xdg-cache"
    load(ov["src"], cache_dir=xdg / "sfllava" / "models")
    r = subprocess.run(_cmd(["models", "--json"]), capture_output=True, text=True, timeout=120,
                       env={**run_env(tmp_path), "HF_HUB_CACHE": str(hub), "XDG_CACHE_HOME": str(xdg)})
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert HUB_QWEN not in rows  # a family that does not run here is not listed
    formats = {HUB_MLX_VLM: "mlx-vlm", HUB_HF: "Hugging Face", HUB_SFLLAVA: "sfllava"}
    for name, fmt in formats.items():
        assert rows[name]["format"] == fmt and rows[name]["family"] == "llava-onevision"
        assert rows[name]["size_bytes"] > 0
    assert rows[HUB_MLX_VLM]["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert rows[HUB_HF]["quantization"] is None
    (converted,) = [row for row in rows.values() if row["where"] == "converted"]
    assert converted["format"] == "sfllava" and converted["dtype"] == "float32"


# ---------------------------------------------------------------------------------------
# Refusals


def _refusal(path_or_repo) -> str:
    from sfllava_mlx.errors import CheckpointError
    from sfllava_mlx.model import load

    with pytest.raises(CheckpointError) as e:
        load(path_or_repo)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_another_family_is_refused_by_name(tmp_path, ov, videos):
    qwen = _qwen2_vl(tmp_path / "qwen2-vl", ov["f32"])
    message = _refusal(qwen)
    assert "'qwen2_vl'" in message and "llava_onevision" in message and "sfllava" in message
    r = sfllava(["generate", "--model", qwen, "--video", videos["main"], "--prompt", "?"], tmp_path)
    assert r.returncode == 2 and r.stderr.splitlines()[0] == f"error: {message}"
    assert "Traceback" not in r.stderr


def test_a_directory_that_is_no_model_says_what_it_lacks(tmp_path, ov):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in _refusal(empty)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text(json.dumps({"theme": "dark"}))
    assert "names no model_type" in _refusal(notes)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copyfile(ov["src"] / "config.json", weightless / "config.json")
    assert "has no *.safetensors weights" in _refusal(weightless)


def test_a_hub_id_that_cannot_be_had_is_refused(tmp_path, videos):
    r = subprocess.run(_cmd(["generate", "--model", "nobody/no-such-model", "--video",
                             videos["main"], "--prompt", "?"]), capture_output=True, text=True,
                       timeout=120, env={**run_env(tmp_path), "HF_HUB_OFFLINE": "1",
                                         "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: cannot download 'nobody/no-such-model'")


def test_a_quantization_mlx_cannot_run_is_refused(tmp_path, ov):
    # MLX 0.32's CPU backend runs affine, mxfp4, mxfp8 and nvfp4: a mode it lacks stands in
    odd = tmp_path / "odd-mode"
    odd.mkdir()
    for f in ov["q4"].iterdir():
        (odd / f.name).symlink_to(f)
    config = json.loads((ov["q4"] / "config.json").read_text())
    config["quantization"] = config["quantization_config"] = {"group_size": 64, "bits": 4,
                                                              "mode": "nf4"}
    (odd / "config.json").unlink()
    (odd / "config.json").write_text(json.dumps(config))
    message = _refusal(odd)
    assert "quantization (nf4, 4-bit, group 64) cannot run" in message


def test_quantize_flags_on_an_mlx_model_are_refused(ov):
    from sfllava_mlx.errors import CheckpointError
    from sfllava_mlx.model import load

    with pytest.raises(CheckpointError, match="already an MLX model"):
        load(ov["q4"], quantize=True)
