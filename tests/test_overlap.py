"""`--vision-backend coreml` wiring: the slow-first overlap gives the MLX path's answer.

Core ML predicts only on macOS, so a stand-in tower with the Core ML tower's interface
(`encode` on numpy pixels, a fixed `batch_size`) runs the MLX tower here.
"""

import json

import mlx.core as mx
import numpy as np

from sfllava_app.cli import main as sfllava
from sfllava_mlx.engine import Engine
from tests.conftest import LOGPROB_TOL


class StandInTower:
    batch_size = 4

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.array(self.model.vision_tower(mx.array(pixels)))


def run_generate(capsys, model_dir, video, *extra):
    status = sfllava(["generate", "--model", model_dir, "--video", video, "--prompt",
                      "What happens in this video?", "--max-tokens", "6", "--json",
                      "--no-cache", *extra])
    assert status == 0
    return json.loads(capsys.readouterr().out)


def test_coreml_backend_overlaps_and_answers_like_mlx(capsys, monkeypatch, converted, videos):
    plain = run_generate(capsys, converted["oryx-vit"], videos["main"])
    towers = []

    def stand_in(engine, options):
        if options.vision_backend != "coreml":
            return None
        towers.append(StandInTower(engine.model))
        return towers[-1]

    monkeypatch.setattr(Engine, "vision_backend", stand_in)
    overlapped = run_generate(capsys, converted["oryx-vit"], videos["main"],
                              "--vision-backend", "coreml")
    assert towers and towers[0].calls == 128 // StandInTower.batch_size
    assert overlapped["tokens"] == plain["tokens"]
    np.testing.assert_allclose(overlapped["logprobs"], plain["logprobs"], atol=LOGPROB_TOL)
    assert overlapped["prompt_tokens"] == plain["prompt_tokens"]
    t = overlapped["timings_s"]
    assert t["vision"] > 0 and t["prefill"] > 0
    assert t["frames"] + t["vision"] + t["prefill"] <= t["ttft"] * 1.05 + 0.01
