"""The vision tower with weights large enough that details show.

The shared tiny fixture uses weights of std 0.05: there exact and tanh GELU differ by less
than the tolerance. Here the tower's activations reach several units, where they differ
by ~1e-3, so a tower with the wrong activation (or a wrong LayerNorm eps) fails.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from sfllava_mlx import load
from tests.conftest import LAYOUTS, convert_checkpoint
from tests.reference import Reference


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tower_matches_reference_with_large_weights(layout, tmp_path):
    from sfllava_convert.tiny import write_source_checkpoint

    src = write_source_checkpoint(tmp_path / "src", layout=layout, seed=7, std=0.35)
    model, _ = load(convert_checkpoint(src, tmp_path / "mlx", "--dtype", "float32"))
    ref = Reference(src)
    pixels = torch.tensor(np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 32)),
                          dtype=torch.float32)
    want = ref.vision_features(pixels).numpy()
    got = np.array(model.vision_tower(mx.array(pixels.permute(0, 2, 3, 1).numpy())))
    assert np.abs(want).max() > 3  # large enough for the GELU variants to differ
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 1e-4 * scale


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_the_other_gelu_would_fail(act):
    """The test above can fail: the two GELUs differ beyond its tolerance at these scales."""
    from sfllava_mlx.vision import ACTIVATIONS

    x = mx.linspace(-4, 4, 101)
    other = "gelu_pytorch_tanh" if act == "gelu" else "gelu"
    assert float(mx.abs(ACTIVATIONS[act](x) - ACTIVATIONS[other](x)).max()) > 1e-4 * 4
