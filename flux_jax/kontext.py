"""FluxKontextPipeline: edit an image from a prompt with FLUX.1 Kontext, as diffusers' FluxKontextPipeline.

    pipe = FluxKontextPipeline.from_pretrained("/path/to/FLUX.1-Kontext-dev")
    out = pipe(image="cat.png", prompt="make the cat wear a red hat").images[0]

The reference image is VAE-encoded (posterior mean), packed, and appended after the noise tokens
with ids (1, row, col); the transformer's predictions for those tokens are dropped. The sigma
schedule's shift (mu) counts the generated tokens only.

Sizes (diffusers differs only where marked *):

  ==========================  ===================================  ==========================
                              auto_resize=True (default)            auto_resize=False
  ==========================  ===================================  ==========================
  reference image             nearest of BFL's 17 preferred        its own size, floored to
                              resolutions by aspect ratio          a multiple of 16
  output, no height/width     max_area at the reference's aspect   the reference's size *
                              ratio *
  output, height and width    max_area at their aspect ratio       as given *
  ==========================  ===================================  ==========================

  * diffusers' height and width default to 1024, so its output is square unless you pass them,
    and it rescales the output to max_area whatever `_auto_resize` says.

Several reference images (experimental; Kontext was trained with one): pass a list. Each is
sized as above on its own; all get index 1 and sit side by side, the j-th one's column ids
offset by the total token width of those before it, as if stitched into one wide reference.
The default output aspect ratio is the first image's.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from .cache import StepCache, parse_cache
from .config import PIXELS_PER_TOKEN
from .images import ImageInput, default_size, encode_image, load_image, prepare_image
from .pipeline import FluxPipeline, FluxPipelineOutput, Prompt, PipelineError, _as_list
from .sampling import image_ids

# (width, height) pairs, as BFL's flux/util.py and diffusers list them; all near 1024² pixels.
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024),
    (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)
DEFAULT_SIDE = 1024  # output side without a reference image or a size, as diffusers
DEFAULT_MAX_AREA = DEFAULT_SIDE ** 2
REFERENCE_INDEX = 1  # first id axis of reference tokens; the generated image has 0


def preferred_resolution(height: int, width: int, resolutions=PREFERRED_KONTEXT_RESOLUTIONS) -> tuple[int, int]:
    """(height, width) of the preferred resolution closest in aspect ratio (ties: the smaller width)."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in resolutions)
    return h // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN, w // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN


def area_size(aspect: float, max_area: int) -> tuple[int, int]:
    """(height, width) of about max_area pixels at aspect = width / height, floored to multiples of 16."""
    w, h = round((max_area * aspect) ** 0.5), round((max_area / aspect) ** 0.5)
    return h // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN, w // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN


class FluxKontextPipeline(FluxPipeline):
    """Image editing with a Kontext checkpoint; loads like FluxPipeline (`from_pretrained`)."""

    preferred_resolutions = PREFERRED_KONTEXT_RESOLUTIONS  # (width, height) pairs auto_resize snaps to

    def __call__(self, image: Union[ImageInput, Sequence[ImageInput], None], prompt: Prompt,
                 prompt_2: Optional[Prompt] = None, negative_prompt: Optional[Prompt] = None,
                 negative_prompt_2: Optional[Prompt] = None, true_cfg_scale: float = 1.0,
                 height: Optional[int] = None, width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 sigmas: Optional[Sequence[float]] = None, guidance_scale: Optional[float] = None,
                 num_images_per_prompt: int = 1, seed: Optional[int] = None, latents=None,
                 max_sequence_length: Optional[int] = None, output_type: str = "pil", progress: bool = True,
                 max_area: int = DEFAULT_MAX_AREA, auto_resize: bool = True,
                 cache: Union[str, StepCache, None] = None) -> FluxPipelineOutput:
        """Edit `image` (a path, PIL image or array; a list for several references) as `prompt` says.

        Keywords as FluxPipeline's, plus max_area and auto_resize (diffusers' `_auto_resize`); see
        the module docstring for how sizes are chosen. latents: packed noise (B, L, 64) for the
        generated image, as diffusers takes it. image=None generates from the prompt alone.
        cache: training-free step caching, as FluxPipeline's.
        """
        cache = parse_cache(cache)
        if self.variant == "fill":
            raise PipelineError("this is a Fill checkpoint: use FluxFillPipeline with a mask_image")
        steps, guidance_scale, max_len = self.call_settings(num_inference_steps, sigmas, guidance_scale,
                                                            max_sequence_length, output_type, num_images_per_prompt)
        refs = [] if image is None else [load_image(im, name=f"image[{i}]") for i, im in
                                         enumerate(image if isinstance(image, (list, tuple)) else [image])]
        ref_sizes = [preferred_resolution(*default_size(r), self.preferred_resolutions) if auto_resize
                     else default_size(r) for r in refs]
        height, width = self._output_size(height, width, ref_sizes, max_area, auto_resize)
        h_tok, w_tok = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
        sigma_schedule = self.schedule(steps, h_tok * w_tok, sigmas)  # mu from the generated tokens only
        batch = len(_as_list(prompt, "prompt")) * num_images_per_prompt
        x = self.initial_latents(latents, batch, h_tok * w_tok, seed)

        timings = {}
        t0 = time.perf_counter()
        cond, cond_ids = self.encode_references(refs, ref_sizes, x.shape[0])
        timings["encode_image"] = time.perf_counter() - t0
        txt, y, neg, timings["encode"] = self.encode_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2,
                                                             true_cfg_scale, num_images_per_prompt, max_len)
        out, t = self.denoise_latents(x, txt, y, sigma_schedule, guidance_scale, image_ids(h_tok, w_tok),
                                      true_cfg_scale, neg, cond=cond, cond_ids=cond_ids, progress=progress,
                                      cache=cache)
        timings.update(t)
        return self.finish(out, height, width, output_type, timings, batch)

    def _output_size(self, height, width, ref_sizes, max_area, auto_resize) -> tuple[int, int]:
        if (height is None) != (width is None):
            raise PipelineError("pass both height and width, or neither")
        if height is None:
            height, width = ref_sizes[0] if ref_sizes else (DEFAULT_SIDE, DEFAULT_SIDE)
        if not auto_resize:
            return self.check_size(height, width)
        if not isinstance(max_area, (int, np.integer)) or max_area < PIXELS_PER_TOKEN ** 2:
            raise PipelineError(f"max_area must be an integer of at least {PIXELS_PER_TOKEN ** 2} pixels, "
                                f"got {max_area!r}")
        return self.check_size(*area_size(width / height, max_area))

    def encode_references(self, refs, sizes, batch: int):
        """({'cond_seq', 'cond_seq_ids'} for the transformer, ids for RoPE), or (None, None) without references."""
        if not refs:
            return None, None
        tokens, ids, col = [], [], 0
        for ref, (h, w) in zip(refs, sizes):
            tokens.append(encode_image(self, prepare_image(ref, h, w)))
            i = image_ids(h // PIXELS_PER_TOKEN, w // PIXELS_PER_TOKEN, REFERENCE_INDEX)
            i[:, 2] += col  # side by side: later references continue the columns of earlier ones
            ids.append(i)
            col += w // PIXELS_PER_TOKEN
        seq, ids = jnp.concatenate(tokens, axis=1), np.concatenate(ids)
        # Batched so true CFG can stack the condition along the batch like every other input.
        cond = {"cond_seq": jnp.broadcast_to(seq, (batch, *seq.shape[1:])).astype(self.dtype),
                "cond_seq_ids": jnp.broadcast_to(jnp.asarray(ids), (batch, *ids.shape))}
        return cond, ids
