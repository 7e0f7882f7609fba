"""Tiled VAE decoding (flux_jax/tiling.py): tile placement and blend weights, exactness on a local
decoder, closeness to the untiled decode of the tiny VAE, the memory it saves, and the pipeline switch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import tiling
from flux_jax.autoencoder import AutoencoderKL
from flux_jax.config import TINY_VAE, VAE_DOWNSAMPLE, VAEConfig
from flux_jax.demo import demo_params, make_demo_pipeline
from flux_jax.tiling import blend_weights, decode_tiled, tile_starts, use_tiling

TILE, OVERLAP = 16, 4  # latents: small tiles, so the tiny VAE's tests have several of them
LATENT_H, LATENT_W = 32, 40  # 3 x 3 tiles of 16
# Tiled vs untiled decode of the tiny random-weight VAE on N(0, 1) latents (images in [-1, 1]), measured:
# overlap 4: max |Δ| 0.78, mean 0.079 (hard seams: 1.08, 0.085); overlap 8: 0.63, 0.071 (0.75, 0.077).
# A random VAE is far less local than a trained one (its diffuse attention and its GroupNorms see the
# whole tile): the same decoder fitted for 30 steps to smooth images gives max 0.089, mean 0.009.
TILED_MAX, TILED_MEAN = 0.9, 0.09
# The demo pipeline's decode in tiles of 8 latents, overlap 2 (images in [0, 1]): measured 0.44, 0.039.
PIPELINE_MAX, PIPELINE_MEAN = 0.5, 0.045


@pytest.mark.parametrize("size, tile, overlap", [(40, 16, 4), (56, 16, 4), (17, 16, 4), (200, 64, 16),
                                                 (512, 64, 16), (16, 16, 4), (10, 16, 4)])
def test_tiles_cover_the_axis_with_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    t = min(tile, size)
    assert starts[0] == 0 and starts[-1] + t == size  # every tile whole, the last flush with the end
    gaps = np.diff(starts)
    assert np.all(gaps > 0) and np.all(t - gaps >= overlap)  # neighbours overlap by at least `overlap`
    assert len(starts) == 1 or (len(starts) - 2) * (t - overlap) + t < size  # one tile fewer would not do
    weights = blend_weights(starts, t)
    total = np.zeros(size)
    for s, w in zip(starts, weights):
        total[s:s + t] += w
        assert np.all(w > 0)
    np.testing.assert_allclose(total, 1, rtol=1e-6)


def test_blend_is_linear_across_an_overlap():
    w0, w1 = blend_weights([0, 12], 16)  # overlap of 4 pixels: 12..15
    np.testing.assert_allclose(w0[12:], [7 / 8, 5 / 8, 3 / 8, 1 / 8])
    np.testing.assert_allclose(w1[:4], [1 / 8, 3 / 8, 5 / 8, 7 / 8])
    assert np.all(w0[:12] == 1) and np.all(w1[4:] == 1)


def test_local_decoder_is_reproduced_exactly():
    """A decoder that maps each latent to its own 8x8 pixels: tiles must assemble to exactly its output."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, LATENT_H, LATENT_W, 4)).astype(np.float32)
    pointwise = lambda t: np.tanh(t[..., :3]).repeat(VAE_DOWNSAMPLE, 1).repeat(VAE_DOWNSAMPLE, 2) * 2
    calls = []
    got = decode_tiled(lambda t: calls.append(t.shape) or pointwise(t), z, TILE, OVERLAP)
    np.testing.assert_allclose(got, pointwise(z), atol=1e-6)
    assert len(calls) == 3 * 3 and set(calls) == {(2, TILE, TILE, 4)}  # one tile shape: one compilation


@pytest.fixture(scope="module")
def vae():
    params = demo_params()["vae"][0]
    module = AutoencoderKL(TINY_VAE)
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))
    return params, decode


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, LATENT_H, LATENT_W, TINY_VAE.latent_channels),
                                                       np.float32)


def hard_weights(starts: list[int], tile: int) -> list[np.ndarray]:
    """No blending: each position taken whole from one tile, neighbours cut at the middle of their overlap."""
    cuts = [0] + [(b + a + tile) // 2 for a, b in zip(starts, starts[1:])] + [starts[-1] + tile]
    return [((np.arange(tile) + s >= lo) & (np.arange(tile) + s < hi)).astype(np.float32)
            for s, lo, hi in zip(starts, cuts, cuts[1:])]


def test_tiny_vae_tiled_decode_is_close_to_untiled(vae, monkeypatch):
    params, decode = vae
    z = latents()
    whole = np.asarray(decode(params, z))
    decoded = {}  # the hard-seam runs reuse the blended runs' tiles

    def cached(tile: np.ndarray) -> np.ndarray:
        if tile.tobytes() not in decoded:
            decoded[tile.tobytes()] = np.asarray(decode(params, tile))
        return decoded[tile.tobytes()]

    tiled = lambda overlap: decode_tiled(cached, z, TILE, overlap) - whole
    blended = {overlap: np.abs(tiled(overlap)) for overlap in (OVERLAP, 2 * OVERLAP)}
    monkeypatch.setattr(tiling, "blend_weights", hard_weights)
    hard = {overlap: np.abs(tiled(overlap)) for overlap in (OVERLAP, 2 * OVERLAP)}
    for overlap in blended:
        print(f"overlap {overlap}: tiled vs untiled max |d| {blended[overlap].max():.3f} "
              f"mean {blended[overlap].mean():.3f}; hard seams {hard[overlap].max():.3f} {hard[overlap].mean():.3f}")
    err = blended[OVERLAP]
    assert err.shape == whole.shape == (1, 8 * LATENT_H, 8 * LATENT_W, 3)
    assert err.max() <= TILED_MAX and err.mean() <= TILED_MEAN
    assert all(blended[o].mean() < hard[o].mean() for o in blended)  # blending the overlaps softens the seams
    assert blended[2 * OVERLAP].max() < err.max() and blended[2 * OVERLAP].mean() < err.mean()  # more overlap: closer


def temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_tiling_bounds_the_decoders_memory():
    """XLA's compiled memory: one 64-latent tile of FLUX's real VAE vs a whole 2048² image (float32, shapes only)."""
    cfg = VAEConfig()
    module = AutoencoderKL(cfg)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    decode = lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode)
    z = lambda side: jax.ShapeDtypeStruct((1, side, side, cfg.latent_channels), jnp.float32)
    tile = temp_bytes(decode, shapes, z(tiling.TILE_LATENTS))
    whole = temp_bytes(decode, shapes, z(2048 // VAE_DOWNSAMPLE))
    print(f"decode temp: 64-latent tile {tile / 1e9:.2f} GB, 2048² whole {whole / 1e9:.2f} GB")
    assert whole > 30 * tile  # 16x the pixels, 256x the attention logits


def test_default_rule():
    edge = int(np.sqrt(tiling.TILING_MIN_PIXELS))
    assert not use_tiling(None, edge, edge) and use_tiling(None, edge, edge + 16)
    assert use_tiling(True, 64, 64) and not use_tiling(False, 4096, 4096)


def test_pipeline_decodes_in_tiles_when_asked(monkeypatch):
    pipe = make_demo_pipeline()
    h, w = 128, 160  # 16 x 20 latents
    packed = np.random.default_rng(1).standard_normal((1, (h // 16) * (w // 16), 64), np.float32)
    whole = pipe.decode(packed, h, w)
    monkeypatch.setattr(tiling, "TILE_LATENTS", TILE // 2)  # 3 x 3 tiles of 8
    monkeypatch.setattr(tiling, "OVERLAP_LATENTS", OVERLAP // 2)
    calls = []
    decode_tiled = tiling.decode_tiled
    monkeypatch.setattr(tiling, "decode_tiled", lambda *a, **k: calls.append(1) or decode_tiled(*a, **k))
    pipe.vae_tiling = True
    tiled = pipe.decode(packed, h, w)
    assert calls and tiled.shape == whole.shape == (1, h, w, 3) and tiled.min() >= 0 and tiled.max() <= 1
    err = np.abs(tiled - whole)
    print(f"pipeline tiled vs untiled max |d| {err.max():.3f} mean {err.mean():.4f}")
    assert err.max() <= PIPELINE_MAX and err.mean() <= PIPELINE_MEAN
    pipe.vae_tiling = None  # the size rule: 128 x 160 is not tiled
    np.testing.assert_array_equal(pipe.decode(packed, h, w), whole)
    assert len(calls) == 1
