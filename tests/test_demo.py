"""The in-process demo model: variants, determinism, finite output, and pipeline subclasses."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from flux_jax import FluxPipeline
from flux_jax.config import TINY
from flux_jax.demo import DEMO_NAME, demo_config, demo_params, make_demo_pipeline

SIZE = 64


@pytest.mark.parametrize("variant, in_channels, guidance", [("dev", 64, True), ("schnell", 64, False),
                                                            ("fill", 384, True)])
def test_variant_configs(variant, in_channels, guidance):
    cfg = demo_config(variant)
    assert (cfg.in_channels, cfg.guidance_embed, cfg.hidden_size) == (in_channels, guidance, TINY.hidden_size)
    params, _ = demo_params(variant)["transformer"]
    assert params["img_in"]["kernel"].shape == (in_channels, TINY.hidden_size)
    assert ("guidance_in" in params) == guidance


def test_unknown_variant():
    with pytest.raises(ValueError, match="kontext"):
        demo_config("kontext")


def test_params_follow_the_seed():
    leaves = lambda seed: jax.tree_util.tree_leaves(demo_params("dev", seed))
    same, other = leaves(0), leaves(1)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(0), same))
    assert not all(np.array_equal(a, b) for a, b in zip(same, other) if np.asarray(a).std() > 0)


def test_subclass_and_finite_noise():
    class Custom(FluxPipeline):
        pass

    pipe = make_demo_pipeline("schnell", cls=Custom, seed=3)
    assert isinstance(pipe, Custom) and pipe.name == DEMO_NAME and pipe.variant == "schnell"
    assert not pipe.dynamic_shift  # schnell's published scheduler does not shift
    images = pipe("a fox", height=SIZE, width=SIZE, num_inference_steps=1, seed=0, output_type="np",
                  progress=False).images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()
    assert 0.05 < images.std() and 0.2 < images.mean() < 0.8  # visible noise, not saturated to black or white
