"""Tiled VAE decoding: latents decoded in overlapping tiles, seams blended linearly.

An untiled decode's memory grows with the image: the mid-block attention spans every latent pixel
((h·w)² float32 logits: 17 GB at 2048², 275 GB at 4096²) and the full-resolution convolutions hold
several H×W×256 buffers. A tile of TILE_LATENTS² latents (512 px) costs the same whatever the
image size. Tiles all have one shape (one compiled decoder), start at evenly spread offsets with at
least OVERLAP_LATENTS of overlap, and are summed with weights that ramp linearly across each
overlap, so every pixel's weights add up to 1. This is the blend of diffusers'
AutoencoderKL.tiled_decode, with same-shaped tiles instead of smaller ragged ones at the edges.
GroupNorm statistics and attention are per tile, so the result differs slightly from an untiled
decode (as in diffusers).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from .config import VAE_DOWNSAMPLE

TILE_LATENTS = 64  # tile side in latents (512 px)
OVERLAP_LATENTS = 16  # least overlap of neighbouring tiles, in latents (128 px: diffusers' 0.25 of a tile)
# Pipelines tile by default above this many pixels (2048²): below it an untiled decode fits next to the
# transformer on the GPUs that run FLUX (its attention logits are 1 GB at 1024²).
TILING_MIN_PIXELS = 2048 * 2048


def use_tiling(vae_tiling: Optional[bool], height: int, width: int) -> bool:
    """vae_tiling True/False forces it; None tiles images of more than TILING_MIN_PIXELS pixels."""
    return height * width > TILING_MIN_PIXELS if vae_tiling is None else bool(vae_tiling)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of length `tile` covering [0, size), neighbours overlapping by >= `overlap`, evenly spread."""
    if size <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be from 0 to tile - 1 ({tile - 1}), got {overlap}")
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(k * (size - tile) / (n - 1)) for k in range(n)]


def blend_weights(starts: list[int], tile: int) -> list[np.ndarray]:
    """One float32 weight ramp of length `tile` per tile: 1 inside, linear across each overlap with a
    neighbour, so the weights of all tiles add up to 1 at every position."""
    weights = []
    for k, start in enumerate(starts):
        w = np.ones(tile, np.float32)
        i = np.arange(tile) + 0.5  # pixel centres: no zero weights
        if k > 0:  # rising across the overlap with the previous tile
            w = np.minimum(w, i / (starts[k - 1] + tile - start))
        if k < len(starts) - 1:  # falling across the overlap with the next one
            w = np.minimum(w, (tile - i) / (start + tile - starts[k + 1]))
        weights.append(w)
    total = np.zeros(starts[-1] + tile, np.float32)
    for start, w in zip(starts, weights):
        total[start:start + tile] += w
    # Exactly 1 where two ramps meet; dividing makes it 1 wherever three tiles overlap too.
    return [w / total[start:start + tile] for start, w in zip(starts, weights)]


def decode_tiled(decode: Callable[[np.ndarray], np.ndarray], z: np.ndarray, tile: Optional[int] = None,
                 overlap: Optional[int] = None, scale: int = VAE_DOWNSAMPLE) -> np.ndarray:
    """Latents (B, h, w, C) -> float32 images (B, scale·h, scale·w, channels), tile by tile.

    decode: a latent tile (B, th, tw, C) -> its image (B, scale·th, scale·tw, channels), as numpy;
    every tile has the same shape (th, tw) = (min(tile, h), min(tile, w)). tile, overlap: in
    latents (None: TILE_LATENTS, OVERLAP_LATENTS). The output is assembled on the host, so device
    memory holds one tile's decode at a time.
    """
    tile = TILE_LATENTS if tile is None else tile
    overlap = OVERLAP_LATENTS if overlap is None else overlap
    b, h, w, _ = z.shape
    th, tw = min(tile, h), min(tile, w)
    rows, cols = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    # Blending in pixels: each latent overlap is `scale` times wider in the image.
    wy = blend_weights([scale * s for s in rows], scale * th)
    wx = blend_weights([scale * s for s in cols], scale * tw)
    out = None
    for y, weight_y in zip(rows, wy):
        for x, weight_x in zip(cols, wx):
            image = np.asarray(decode(z[:, y:y + th, x:x + tw]), np.float32)
            if out is None:
                out = np.zeros((b, scale * h, scale * w, image.shape[-1]), np.float32)
            window = out[:, scale * y:scale * (y + th), scale * x:scale * (x + tw)]
            window += image * (weight_y[:, None] * weight_x[None, :])[None, :, :, None]
    return out
