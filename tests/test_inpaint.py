"""flux_jax.FluxInpaintPipeline and FluxFillPipeline against diffusers' on random-weight dev and Fill folders."""
from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from flux_jax import FluxFillPipeline, FluxInpaintPipeline, PipelineError
from flux_jax.images import encode_image, load_image, prepare_image
from pipeline_fixtures import cached_flux_folder, load_diffusers_pipeline
from test_img2img import (H, IN_H, IN_W, SEQ, STEPS, W, diffusers_run, parity, picture,  # noqa: F401
                          posterior_mean, torch_noise)

REPAINT = (slice(13, 45), slice(29, 83))  # rows, columns to repaint; edges off the 8-pixel grid on purpose


def rectangle_mask(h: int = IN_H, w: int = IN_W) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[REPAINT] = 255
    return Image.fromarray(m, mode="L")


@pytest.fixture(scope="module")
def inpaint():
    folder = cached_flux_folder("dev")
    return diffusers.FluxInpaintPipeline.from_pretrained(folder, dtype=torch.float32), \
        FluxInpaintPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def fill():
    folder = cached_flux_folder("fill")
    return load_diffusers_pipeline(folder, "fill"), FluxFillPipeline.from_pretrained(folder)


def test_inpaint_parity_and_known_region_kept(inpaint, posterior_mean):
    ref, ours = inpaint
    kw = dict(prompt="a red door", image=picture(), mask_image=rectangle_mask(), strength=0.8, guidance_scale=3.5)
    noise = torch_noise(1, 2)[1]
    parity(diffusers_run(ref, seed=2, **kw), ours, dict(latents=noise, height=H, width=W, **kw))
    # The last blend puts back the image latents exactly wherever the mask keeps the picture.
    got = ours(latents=noise, height=H, width=W, num_inference_steps=STEPS, max_sequence_length=SEQ,
               output_type="latent", progress=False, **kw).images
    pixels = prepare_image(picture(), H, W)
    _, (image_latents, _, mask) = ours.mask_inputs(load_image(rectangle_mask(), "L"), (IN_W, IN_H), pixels,
                                                   encode_image(ours, pixels), noise)
    keep = np.broadcast_to(np.asarray(mask) == 0, got.shape)
    assert 0 < keep.mean() < 1
    np.testing.assert_array_equal(got[keep], np.asarray(image_latents)[keep])
    assert not np.allclose(got[~keep], np.asarray(image_latents)[~keep], atol=1e-2)


def test_fill_parity(fill, posterior_mean):
    ref, ours = fill
    kw = dict(prompt="a window", image=picture(seed=3, h=H, w=W), mask_image=rectangle_mask(H, W), strength=0.75,
              guidance_scale=30.0, num_inference_steps=4)
    parity(diffusers_run(ref, seed=3, **kw), ours, dict(latents=torch_noise(1, 3)[1], **kw))


def test_fill_mask_channels_are_unshuffled_8x8_then_packed(fill):
    _, ours = fill
    mask = np.zeros((H, W), np.uint8)
    mask[0, 1] = mask[9, 2] = 255  # token 0: pixel (0, 1) of latent (0, 0); pixel (1, 2) of latent (1, 0)
    cond, hook = ours.mask_inputs(load_image(mask, "L"), (W, H), prepare_image(load_image(mask), H, W), None,
                                  np.zeros((2, 24, 64)))
    channels = np.asarray(cond["img_cond"])[:, :, 64:]
    assert hook is None and channels.shape == (2, (H // 16) * (W // 16), 256)
    # Packed channel = (block channel) * 4 + latent row * 2 + latent col; block channel = row * 8 + col.
    assert set(np.flatnonzero(channels[0, 0])) == {1 * 4 + 0, (1 * 8 + 2) * 4 + 2}
    assert not channels[:, 1:].any() and np.array_equal(channels[0], channels[1])


def test_masks_are_required_and_checkpoints_checked(inpaint, fill):
    _, ours_inpaint = inpaint
    _, ours_fill = fill
    with pytest.raises(PipelineError, match="needs a mask_image"):
        ours_fill("a cat", image=picture())
    with pytest.raises(PipelineError, match="needs a mask_image"):
        ours_inpaint("a cat", image=picture())
    with pytest.raises(PipelineError, match="mask_image: cannot read"):
        ours_inpaint("a cat", image=picture(), mask_image=__file__)
    with pytest.raises(PipelineError, match="needs a Fill checkpoint"):
        FluxFillPipeline.check_checkpoint(ours_inpaint)  # a dev transformer reads 64 channels, not 384


def test_mask_of_another_size_warns(inpaint):
    _, ours = inpaint
    with pytest.warns(UserWarning, match="resizing the mask"):
        ours("a cat", image=picture(), mask_image=rectangle_mask(H, W), strength=0.8, height=H, width=W,
             num_inference_steps=STEPS, max_sequence_length=SEQ, output_type="latent", progress=False)
