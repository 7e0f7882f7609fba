"""FluxImg2ImgPipeline: re-draw an image from a prompt, with diffusers' FluxImg2ImgPipeline keywords.

    pipe = FluxImg2ImgPipeline.from_pretrained("/path/to/FLUX.1-dev")
    out = pipe("a watercolour of a lighthouse", image="photo.png", strength=0.7).images[0]

`strength` picks where on the sigma schedule sampling starts, as diffusers' get_timesteps does:
the last min(steps·strength, steps) steps run, from latents σ·noise + (1 − σ)·image_latents.
The image is encoded to the VAE's posterior MEAN, where diffusers draws a sample from the
posterior: same result up to that sample's noise, and deterministic.

Differences from diffusers, on purpose: height and width default to the input image's size
(floored to multiples of 16; diffusers uses 1024x1024), guidance_scale to the variant's
default (3.5 for dev; diffusers 7.0), and `latents` is the packed NOISE that is mixed with the
image (diffusers takes it as the already-noised start and then ignores the image).
strength too small to leave a single step returns the image unchanged (VAE round trip), with a
warning; diffusers raises.
"""
from __future__ import annotations

import numbers
import time
import warnings
from typing import Optional, Sequence, Union

import jax
import numpy as np

from .cache import StepCache, parse_cache
from .config import PIXELS_PER_TOKEN
from .images import ImageInput, default_size, encode_image, load_image, prepare_image
from .pipeline import FluxPipeline, FluxPipelineOutput, PipelineError, Prompt, _as_list
from .sampling import image_ids

DEFAULT_STRENGTH = 0.6  # diffusers' FluxImg2ImgPipeline and FluxInpaintPipeline


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        raise PipelineError(f"strength must be a number in [0, 1], got {strength!r}")
    return float(strength)


def first_step(num_steps: int, strength: float) -> int:
    """Index of the first sigma that runs: diffusers' get_timesteps t_start (python float math, as there)."""
    init_timestep = min(num_steps * strength, num_steps)
    return int(max(num_steps - init_timestep, 0))


def noised(image_latents: jax.Array, noise: jax.Array, sigma) -> jax.Array:
    """The flow-matching forward process at `sigma`: FlowMatchEulerDiscreteScheduler.scale_noise."""
    return sigma * noise + (1.0 - sigma) * image_latents


class FluxImg2ImgPipeline(FluxPipeline):
    """Image-to-image; loads like FluxPipeline. Subclasses add a mask (FluxInpaintPipeline, FluxFillPipeline)."""

    default_strength = DEFAULT_STRENGTH

    def __call__(self, prompt: Prompt, prompt_2: Optional[Prompt] = None, negative_prompt: Optional[Prompt] = None,
                 negative_prompt_2: Optional[Prompt] = None, true_cfg_scale: float = 1.0,
                 image: Optional[ImageInput] = None, mask_image: Optional[ImageInput] = None,
                 height: Optional[int] = None, width: Optional[int] = None, strength: Optional[float] = None,
                 num_inference_steps: Optional[int] = None, sigmas: Optional[Sequence[float]] = None,
                 guidance_scale: Optional[float] = None, num_images_per_prompt: int = 1, seed: Optional[int] = None,
                 latents=None, max_sequence_length: Optional[int] = None, output_type: str = "pil",
                 progress: bool = True, cache: Union[str, StepCache, None] = None) -> FluxPipelineOutput:
        """Re-draw `image` (path, PIL image or array) as `prompt` says; see the module docstring.

        mask_image: only for FluxInpaintPipeline / FluxFillPipeline (white = repaint).
        strength: default 0.6 (Fill: 1.0). latents: packed noise (B, L, 64). Other keywords (cache
        included) as FluxPipeline's.
        """
        cache = parse_cache(cache)
        self.check_checkpoint()
        strength = check_strength(self.default_strength if strength is None else strength)
        steps, guidance_scale, max_len = self.call_settings(num_inference_steps, sigmas, guidance_scale,
                                                            max_sequence_length, output_type, num_images_per_prompt)
        if image is None:
            raise PipelineError(f"{type(self).__name__} needs an image")
        pil = load_image(image)
        mask = self.load_mask(mask_image)
        if (height is None) != (width is None):
            raise PipelineError("pass both height and width, or neither")
        height, width = default_size(pil) if height is None else self.check_size(height, width)
        h_tok, w_tok = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
        full = self.schedule(steps, h_tok * w_tok, sigmas)
        sigma_schedule = full[first_step(len(full) - 1, strength):]
        batch = len(_as_list(prompt, "prompt")) * num_images_per_prompt
        noise = self.initial_latents(latents, batch, h_tok * w_tok, seed)

        timings = {}
        t0 = time.perf_counter()
        pixels = prepare_image(pil, height, width)
        image_latents = encode_image(self, pixels)
        cond, hook_args = self.mask_inputs(mask, pil.size, pixels, image_latents, noise)
        timings["encode_image"] = time.perf_counter() - t0
        x = noised(image_latents, noise, sigma_schedule[0])
        if len(sigma_schedule) == 1:
            warnings.warn(f"strength {strength} leaves no denoising step out of {steps}: returning the image",
                          stacklevel=2)
            return self.finish(x, height, width, output_type, timings, batch)
        txt, y, neg, timings["encode"] = self.encode_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2,
                                                             true_cfg_scale, num_images_per_prompt, max_len)
        out, t = self.denoise_latents(x, txt, y, sigma_schedule, guidance_scale, image_ids(h_tok, w_tok),
                                      true_cfg_scale, neg, cond=cond, hook_args=hook_args, progress=progress,
                                      cache=cache)
        timings.update(t)
        return self.finish(out, height, width, output_type, timings, batch)

    # ---------------------------------------------------------------- overridden by the masked pipelines
    def check_checkpoint(self) -> None:
        if self.variant == "fill":
            raise PipelineError("this is a Fill checkpoint: use FluxFillPipeline with a mask_image")

    def load_mask(self, mask_image):
        if mask_image is not None:
            raise PipelineError(f"{type(self).__name__} takes no mask_image: use FluxInpaintPipeline")
        return None

    def mask_inputs(self, mask, image_size: tuple[int, int], pixels: np.ndarray, image_latents: jax.Array,
                    noise: jax.Array) -> tuple[Optional[dict], object]:
        """(extra transformer inputs, step_hook args) from the mask; none without one.

        image_size: the input image's PIL (width, height); pixels: the prepared (1, H, W, 3) image.
        """
        return None, None
