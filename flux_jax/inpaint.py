"""Inpainting: FluxInpaintPipeline (any FLUX.1 checkpoint) and FluxFillPipeline (FLUX.1-Fill-dev).

    pipe = FluxInpaintPipeline.from_pretrained("/path/to/FLUX.1-dev")
    out = pipe("a red door", image="house.png", mask_image="door_mask.png", strength=0.85).images[0]

mask_image: white (>= 0.5 after resizing) = repaint, black = keep; binarised like diffusers. A
mask of another size than the image is resized to the output size, as diffusers does, with a
warning.

FluxInpaintPipeline is img2img plus diffusers' per-step blending: after every Euler step the
known region is put back, noised to the next sigma (with the same noise the start was made
from); the mask is sampled to latent resolution by nearest neighbour.

FluxFillPipeline gives the mask to the model instead of blending: its transformer reads 384
channels a token, 64 noisy latents + 64 latents of the masked image (image · (1 − mask)) + 256
of mask (each 8x8 pixel block unshuffled into 64 channels, then packed 2x2), as diffusers'
FluxFillPipeline. Defaults: 50 steps, guidance 30, strength 1.0 (start from pure noise).
"""
from __future__ import annotations

import jax.numpy as jnp

from .config import LATENT_CHANNELS, VAE_DOWNSAMPLE
from .images import encode_image, load_image, prepare_mask
from .img2img import FluxImg2ImgPipeline, noised
from .pipeline import PipelineError
from .sampling import pack

FILL_STRENGTH = 1.0  # diffusers' FluxFillPipeline default


class FluxInpaintPipeline(FluxImg2ImgPipeline):
    """Repaint the white part of `mask_image`, keeping the rest of `image`; loads like FluxPipeline."""

    def load_mask(self, mask_image):
        if mask_image is None:
            raise PipelineError(f"{type(self).__name__} needs a mask_image (white = repaint)")
        return load_image(mask_image, mode="L", name="mask_image")

    def mask_inputs(self, mask, image_size, pixels, image_latents, noise):
        m = prepare_mask(mask, *pixels.shape[1:3], image_size)
        # torch's nearest interpolate by exactly 8 takes pixel (8i, 8j); every latent channel gets it.
        m = m[:, ::VAE_DOWNSAMPLE, ::VAE_DOWNSAMPLE, None]
        m = pack(jnp.broadcast_to(jnp.asarray(m), (*m.shape[:3], LATENT_CHANNELS)))
        return None, (image_latents, noise, m)

    def step_hook(self, i, x, sigmas, hook_args):
        """After step i: keep the repainted region, put back the known one noised to sigma i + 1."""
        image_latents, noise, mask = hook_args
        known = noised(image_latents, noise, sigmas[i + 1])  # sigma 0 after the last step: the image itself
        return (1 - mask) * known + mask * x


class FluxFillPipeline(FluxInpaintPipeline):
    """Inpainting / outpainting with FLUX.1-Fill-dev; loads like FluxPipeline."""

    default_strength = FILL_STRENGTH

    def check_checkpoint(self) -> None:
        if self.variant != "fill":
            raise PipelineError(f"FluxFillPipeline needs a Fill checkpoint (transformer in_channels 384), this one "
                                f"reads {self.cfg.in_channels}: use FluxInpaintPipeline")

    def mask_inputs(self, mask, image_size, pixels, image_latents, noise):
        m = prepare_mask(mask, *pixels.shape[1:3], image_size)
        masked = encode_image(self, pixels * (1 - m[..., None]))
        b, h, w = m.shape
        r = VAE_DOWNSAMPLE
        # Pixel-unshuffle: each 8x8 block becomes 64 channels (row-major in the block), then 2x2 packing.
        blocks = m.reshape(b, h // r, r, w // r, r).transpose(0, 1, 3, 2, 4).reshape(b, h // r, w // r, r * r)
        img_cond = jnp.concatenate([masked, pack(jnp.asarray(blocks))], axis=-1).astype(self.dtype)
        # No step_hook args: the model sees the mask, nothing is blended.
        return {"img_cond": jnp.broadcast_to(img_cond, (noise.shape[0], *img_cond.shape[1:]))}, None
