"""Input images and masks for the editing pipelines, prepared as diffusers' VaeImageProcessor does.

Accepted: a file path, a PIL image, or a numpy array (H, W) / (H, W, C) of uint8, bool, or float
in [0, 1] (floats are quantised to 8 bits, like any picture file). EXIF orientation is applied;
images become RGB, masks greyscale (L). Resizing uses Lanczos, VaeImageProcessor's default
`resample`; pixels are then scaled to [-1, 1] (images) or binarised at 0.5 (masks: 1 = repaint).
`encode_image` turns prepared pixels into the transformer's packed latents (posterior mean).
"""
from __future__ import annotations

import os
import warnings
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .autoencoder import scale_latents
from .config import PIXELS_PER_TOKEN
from .pipeline import MAX_SIDE, PipelineError, jit_apply
from .sampling import pack

RESAMPLE = Image.Resampling.LANCZOS  # VaeImageProcessor(resample="lanczos")
MASK_THRESHOLD = 0.5  # VaeImageProcessor.binarize: values >= 0.5 (of 1) are repainted
MAX_8BIT = 255
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise PipelineError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * MAX_8BIT
    elif np.issubdtype(a.dtype, np.floating):
        if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise PipelineError("a float image array must hold values in [0, 1]")
        a = np.round(a * MAX_8BIT).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise PipelineError(f"image array must be uint8, bool or float in [0, 1], got dtype {a.dtype}")
    return Image.fromarray(a)


def load_image(image: ImageInput, mode: str = "RGB", name: str = "image") -> Image.Image:
    """A PIL image in `mode` ('RGB' or 'L'), upright as its EXIF orientation says."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                f.load()  # read now: a truncated file fails here, not later in a resize
                image = ImageOps.exif_transpose(f)
        except FileNotFoundError:
            raise PipelineError(f"{name}: no such file {os.fspath(image)!r}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise PipelineError(f"{name}: cannot read {os.fspath(image)!r} as an image ({e})") from None
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
    else:
        raise PipelineError(f"{name} must be a file path, a PIL image or a numpy array, got {type(image).__name__}")
    return image.convert(mode)


def default_size(image: Image.Image, name: str = "image") -> tuple[int, int]:
    """(height, width) floored to multiples of 16, as VaeImageProcessor.get_default_height_width."""
    if min(image.size) < PIXELS_PER_TOKEN or max(image.size) > MAX_SIDE:
        raise PipelineError(f"{name} is {image.width}x{image.height} pixels: each side must be from "
                            f"{PIXELS_PER_TOKEN} to {MAX_SIDE}")
    return tuple(side - side % PIXELS_PER_TOKEN for side in (image.height, image.width))


def _resized(image: Image.Image, height: int, width: int) -> np.ndarray:
    if image.size != (width, height):  # PIL's (w, h); a same-size resize is a copy, skip it
        image = image.resize((width, height), resample=RESAMPLE)
    return np.asarray(image, np.float32) / MAX_8BIT


def prepare_image(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB image -> float32 (1, height, width, 3) in [-1, 1]."""
    return (2 * _resized(image, height, width) - 1)[None]


def prepare_mask(mask: Image.Image, height: int, width: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """L mask -> float32 (1, height, width) of 0 (keep) and 1 (repaint).

    A mask whose size differs from its image's (`image_size`, PIL's (w, h)) is resized like
    diffusers does, with a warning: the two may no longer line up.
    """
    if image_size is not None and mask.size != image_size:
        warnings.warn(f"mask_image is {mask.width}x{mask.height} but image is {image_size[0]}x{image_size[1]}: "
                      f"resizing the mask to {width}x{height}", stacklevel=3)
    m = _resized(mask, height, width)
    return (m >= MASK_THRESHOLD).astype(np.float32)[None]


def encode_image(pipe, pixels: np.ndarray) -> jax.Array:
    """Pixels (B, H, W, 3) in [-1, 1] -> packed, shifted and scaled latents (B, L, 64), float32.

    Uses the posterior mean: the same image always gives the same latents (diffusers samples
    the posterior for img2img, inpaint and Fill; Kontext takes the mean there too).
    """
    z = jit_apply(pipe.vae, "encode", pipe.vae_params, jnp.asarray(pixels, pipe.dtype)).astype(jnp.float32)
    return pack(scale_latents(z, pipe.vae_cfg))
