"""flux_jax.FluxKontextPipeline against diffusers' FluxKontextPipeline on a random-weight Kontext folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux import pipeline_flux_kontext

from flux_jax import FluxKontextPipeline, PipelineError
from flux_jax.kontext import DEFAULT_MAX_AREA, PREFERRED_KONTEXT_RESOLUTIONS, area_size, preferred_resolution
from pipeline_fixtures import cached_flux_folder, load_diffusers_pipeline
from test_img2img import H, IN_H, IN_W, SEQ, STEPS, W, parity, picture

# Tiny stand-ins for the 17 preferred (width, height) resolutions, so auto_resize runs at test sizes.
# The input (80 x 112, aspect 1.4) snaps to 96 x 64 (aspect 1.5).
SMALL_RESOLUTIONS = ((64, 64), (96, 64), (128, 64))


def noise(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, (H // 16) * (W // 16), 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kontext():
    folder = cached_flux_folder("kontext")
    return load_diffusers_pipeline(folder, "kontext"), FluxKontextPipeline.from_pretrained(folder)


def reference(ref, latents, **kw):
    """ref_run for parity(): diffusers Kontext at H x W with max_area = H·W (it rescales to max_area)."""
    kw = {"height": H, "width": W, "max_area": H * W, "num_inference_steps": STEPS, "max_sequence_length": SEQ, **kw}
    return lambda output_type: ref(latents=latents, output_type=output_type, **kw).images


def test_parity_keeping_the_input_size(kontext):
    ref, ours = kontext
    latents = noise()
    kw = dict(image=picture(), prompt="make it a watercolour", guidance_scale=2.5)
    parity(reference(ref, latents, _auto_resize=False, **kw), ours,
           dict(latents=latents.numpy(), height=H, width=W, auto_resize=False, **kw))


def test_parity_auto_resize_and_true_cfg(kontext, monkeypatch):
    ref, ours = kontext
    monkeypatch.setattr(pipeline_flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", list(SMALL_RESOLUTIONS))
    monkeypatch.setattr(ours, "preferred_resolutions", SMALL_RESOLUTIONS)
    latents = noise(seed=1)
    kw = dict(image=picture(seed=1), prompt="add a hat", negative_prompt="blurry",
              true_cfg_scale=3.0, guidance_scale=3.5)
    parity(reference(ref, latents, **kw), ours, dict(latents=latents.numpy(), height=H, width=W, max_area=H * W, **kw))


def test_preferred_resolutions_as_diffusers():
    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS
    for h, w in [(1024, 1024), (480, 640), (640, 480), (100, 1000), (1000, 100), (768, 1360), (999, 1001)]:
        aspect = w / h
        _, want_w, want_h = min((abs(aspect - rw / rh), rw, rh) for rw, rh in PREFERRED_KONTEXT_RESOLUTIONS)
        assert preferred_resolution(h, w) == (want_h, want_w)
    assert preferred_resolution(100, 1000) == (672, 1568) and preferred_resolution(1000, 100) == (1568, 672)


def test_output_sizes(kontext):
    _, ours = kontext
    size = ours._output_size
    # Default: max_area pixels at the (snapped) reference's aspect ratio; diffusers' default is square.
    assert size(None, None, [(880, 1184)], DEFAULT_MAX_AREA, True) == area_size(1184 / 880, DEFAULT_MAX_AREA) \
        == (880, 1184)
    assert size(None, None, [(IN_H, IN_W)], DEFAULT_MAX_AREA, False) == (IN_H, IN_W)
    # Explicit sizes: rescaled to max_area at their aspect ratio (as diffusers), or kept without auto_resize.
    # 2·H·W at aspect 1.5: height round(√(12288 / 1.5)) = 91 -> 80, width round(√(12288 · 1.5)) = 136 -> 128.
    assert size(H, W, [], 2 * H * W, True) == (80, 128)
    assert size(H, W, [], DEFAULT_MAX_AREA, False) == (H, W)
    assert size(None, None, [], DEFAULT_MAX_AREA, True) == (1024, 1024)
    with pytest.raises(PipelineError, match="both height and width"):
        size(H, None, [], DEFAULT_MAX_AREA, True)
    with pytest.raises(PipelineError, match="max_area must be an integer"):
        size(H, W, [], 100, True)


def test_several_references_side_by_side(kontext):
    _, ours = kontext
    kw = dict(prompt="put them together", latents=noise().numpy(), height=H, width=W, auto_resize=False,
              num_inference_steps=STEPS, max_sequence_length=SEQ, output_type="latent", progress=False)
    one = ours(image=picture(), **kw).images
    np.testing.assert_array_equal(ours(image=[picture()], **kw).images, one)  # a list of one is the same edit

    small = picture(32, 48, seed=5)
    cond, ids = ours.encode_references([picture(), small], [(IN_H, IN_W), (32, 48)], batch=1)
    w1 = IN_W // 16
    assert cond["cond_seq"].shape == (1, (IN_H // 16) * w1 + 2 * 3, 64)
    assert (ids[:, 0] == 1).all()
    np.testing.assert_array_equal(ids[-6:, 1:], [[0, w1], [0, w1 + 1], [0, w1 + 2], [1, w1], [1, w1 + 1],
                                                 [1, w1 + 2]])
    two = ours(image=[picture(), small], **kw).images
    assert two.shape == one.shape and np.isfinite(two).all() and not np.allclose(two, one)


def test_fill_checkpoint_is_refused():
    fill = FluxKontextPipeline.from_pretrained(cached_flux_folder("fill"))
    with pytest.raises(PipelineError, match="Fill checkpoint"):
        fill(picture(), "a cat")
