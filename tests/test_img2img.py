"""flux_jax.FluxImg2ImgPipeline against diffusers' FluxImg2ImgPipeline on a random-weight dev folder.

diffusers samples the VAE posterior; we take its mean. The parity runs patch diffusers to the
mean too (`posterior_mean`), so both start from the same latents. The helpers here are shared
by test_inpaint.py and test_kontext.py.
"""
from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from flux_jax import FluxImg2ImgPipeline, PipelineError
from flux_jax.images import encode_image, load_image, prepare_image
from flux_jax.img2img import first_step
from pipeline_fixtures import cached_flux_folder
from torch_ref import rel_err

IMAGE_TOL = 2 / 255  # max |Δ| of float images in [0, 1]
LATENT_TOL = 1e-4  # relative L2 of the packed final latents
H, W = 64, 96  # output size: non-square, 4 x 6 tokens
IN_H, IN_W = 80, 112  # input images are another size, so both sides resize them
STEPS = 3
SEQ = 24  # T5 tokens
LATENT_CHANNELS = 16


def picture(h: int = IN_H, w: int = IN_W, seed: int = 0) -> Image.Image:
    """Smooth colours plus noise: something a VAE encodes to varied latents."""
    y, x = np.mgrid[:h, :w] / max(h, w)
    rgb = np.stack([x, y, 1 - x * y], -1) + 0.2 * np.random.RandomState(seed).rand(h, w, 3)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def torch_noise(batch: int, seed: int, h: int = H, w: int = W) -> tuple[torch.Generator, np.ndarray]:
    """(generator for diffusers, the packed noise diffusers draws from it first)."""
    noise = torch.randn(batch, LATENT_CHANNELS, h // 8, w // 8, generator=torch.Generator().manual_seed(seed))
    packed = diffusers.FluxPipeline._pack_latents(noise, batch, LATENT_CHANNELS, h // 8, w // 8)
    return torch.Generator().manual_seed(seed), packed.numpy()


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers encodes images to the posterior mean, as we do (and draws no noise for it)."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def parity(ref_run, ours, ours_kw: dict, h: int = H, w: int = W) -> tuple[float, float]:
    """(relative L2 of final latents, max |Δ| of images); ref_run(output_type) runs diffusers."""
    kw = {"num_inference_steps": STEPS, "max_sequence_length": SEQ, "progress": False, **ours_kw}
    want_latents, want_images = ref_run("latent"), ref_run("np")
    got_latents = ours(output_type="latent", **kw).images
    got_images = ours(output_type="np", **kw).images
    assert got_images.shape == want_images.shape == (want_latents.shape[0], h, w, 3)
    errors = rel_err(got_latents, want_latents), float(np.abs(got_images - want_images).max())
    print(f"{type(ours).__name__}: latents rel {errors[0]:.2e}, images max |Δ| {errors[1]:.2e}")
    assert errors[0] <= LATENT_TOL and errors[1] <= IMAGE_TOL
    return errors


def diffusers_run(ref, seed: int, batch: int = 1, **kw):
    """ref_run for parity(): diffusers from a fresh generator each time, at H x W."""
    kw = {"height": H, "width": W, "num_inference_steps": STEPS, "max_sequence_length": SEQ, **kw}
    return lambda output_type: ref(generator=torch_noise(batch, seed)[0], output_type=output_type, **kw).images


@pytest.fixture(scope="module")
def dev():
    folder = cached_flux_folder("dev")
    return diffusers.FluxImg2ImgPipeline.from_pretrained(folder, dtype=torch.float32), \
        FluxImg2ImgPipeline.from_pretrained(folder)


def test_parity_with_diffusers(dev, posterior_mean):
    ref, ours = dev
    kw = dict(prompt="a lighthouse at dusk", image=picture(), strength=0.6, guidance_scale=3.5)
    parity(diffusers_run(ref, seed=0, **kw), ours, dict(latents=torch_noise(1, 0)[1], height=H, width=W, **kw))


def test_parity_batch_and_true_cfg(dev, posterior_mean):
    ref, ours = dev
    kw = dict(prompt="a castle", negative_prompt="blurry", true_cfg_scale=2.0, num_images_per_prompt=2,
              image=picture(seed=1), strength=0.8, guidance_scale=2.0)
    parity(diffusers_run(ref, seed=1, batch=2, **kw), ours,
           dict(latents=torch_noise(2, 1)[1], height=H, width=W, **kw))


@pytest.mark.parametrize("steps, strength", [(3, 0.6), (4, 0.5), (28, 0.95), (10, 0.33), (5, 1.0), (7, 0.0)])
def test_first_step_as_diffusers_get_timesteps(dev, steps, strength):
    ref, _ = dev
    ref.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=0.5)
    timesteps, remaining = ref.get_timesteps(steps, strength, "cpu")
    assert steps - first_step(steps, strength) == remaining == len(timesteps)


def test_no_step_left_returns_the_image(dev):
    _, ours = dev
    pil = picture()
    with pytest.warns(UserWarning, match="no denoising step"):
        got = ours("a cat", image=pil, strength=0.0, num_inference_steps=STEPS, output_type="latent").images
    want = encode_image(ours, prepare_image(load_image(pil), IN_H, IN_W))  # default size: the image's own
    np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize("strength", [-0.1, 1.5, "0.5", True])
def test_strength_outside_0_1_is_refused(dev, strength):
    _, ours = dev
    with pytest.raises(PipelineError, match=r"strength must be a number in \[0, 1\]"):
        ours("a cat", image=picture(), strength=strength)


def test_missing_image_mask_and_fill_checkpoint_are_refused(dev, tmp_path):
    _, ours = dev
    with pytest.raises(PipelineError, match="needs an image"):
        ours("a cat")
    with pytest.raises(PipelineError, match="no such file"):
        ours("a cat", image=tmp_path / "missing.png")
    with pytest.raises(PipelineError, match="takes no mask_image"):
        ours("a cat", image=picture(), mask_image=picture())
    fill = FluxImg2ImgPipeline.from_pretrained(cached_flux_folder("fill"))
    with pytest.raises(PipelineError, match="Fill checkpoint"):
        fill("a cat", image=picture())
