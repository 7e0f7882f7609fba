"""`--init demo`: a tiny FLUX to train from scratch, whose VAE is first fitted to the training images.

    images = to_unit_range(digit_images("train")[0])      # float32 (N, 32, 32, 3) in [-1, 1]
    pipe = demo_pipeline(images)                          # FluxPipeline "demo": random transformer

flux_jax.demo's random VAE turns any picture into noise, so nothing trained on its latents could
show a recognisable image. fit_vae trains the tiny VAE (TINY_VAE) as a KL autoencoder on the images
(32x32 digits: under a minute on two CPU cores, compilation included), then sets shift_factor /
scaling_factor from the data, as the real FLUX VAE's constants were, so scaled latents have zero
mean and unit variance. The transformer and the text encoders stay random: the trainer learns the
transformer from scratch.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ..autoencoder import AutoencoderKL
from ..config import PIXELS_PER_TOKEN, TINY_VAE, VAEConfig, parse_dtype
from ..demo import DEMO_NAME, demo_params, demo_tokenizers, random_params
from ..pipeline import FluxPipeline, jit_apply, pad_rows

# Measured on 32x32 digits: batches of 8 at a constant 3e-3 reconstruct better than batches of 16
# or 32 for the same compute, and a cosine decay only slowed the (still early) descent.
VAE_STEPS = 300
VAE_BATCH = 8
VAE_LEARNING_RATE = 3e-3
# KL to N(0, 1) per latent element, against a per-pixel reconstruction loss: enough to keep the
# posterior a smooth distribution (noise during training), small enough not to blur digits.
KL_WEIGHT = 1e-4
# Images per jitted encode / decode; the last chunk is padded to it, so any count compiles one shape.
CODEC_BATCH = 64
IMAGE_RANGE = (-1.0, 1.0)
ADAM = optax.scale_by_adam()  # the step scales its direction by the (traced) learning rate


def _check_images(images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be float (N, H, W, 3) in [-1, 1], got {x.dtype} {x.shape}")
    if x.shape[1] % PIXELS_PER_TOKEN or x.shape[2] % PIXELS_PER_TOKEN:
        raise ValueError(f"image sides must be multiples of {PIXELS_PER_TOKEN} pixels, got {x.shape[1:3]}")
    if x.min() < IMAGE_RANGE[0] - 1e-3 or x.max() > IMAGE_RANGE[1] + 1e-3:
        raise ValueError(f"images must be in [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}]")
    return x.astype(np.float32)


def vae_loss(params: dict, module: AutoencoderKL, x: jax.Array, key: jax.Array, kl_weight: float):
    """(mean abs + squared pixel error + kl_weight · KL per latent element, (recon, kl)) of one batch."""
    moments = module.apply({"params": params}, x, method=lambda m, v: m.encoder(v))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the same
    z = mean + jnp.exp(logvar / 2) * jax.random.normal(key, mean.shape)
    err = module.apply({"params": params}, z, method=AutoencoderKL.decode) - x
    # L1 keeps edges sharp, L2 punishes the few large errors on strokes.
    recon = jnp.abs(err).mean() + jnp.square(err).mean()
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1 - logvar).mean()
    return recon + kl_weight * kl, (recon, kl)


@functools.lru_cache(maxsize=None)
def _train_step(module: AutoencoderKL):
    """Jitted adam step; learning rate and KL weight are arguments: one compilation per VAE and batch shape."""

    @jax.jit
    def step(params, adam_state, x, key, learning_rate, kl_weight):
        grads, aux = jax.grad(vae_loss, has_aux=True)(params, module, x, key, kl_weight)
        updates, adam_state = ADAM.update(grads, adam_state)
        params = jax.tree_util.tree_map(lambda p, u: p - learning_rate * u, params, updates)
        return params, adam_state, aux

    return step


def _codec(cfg: VAEConfig) -> AutoencoderKL:
    """The VAE module to train, encode and decode with; these ignore the latent constants, so the
    random and any fitted cfg share compilations."""
    return AutoencoderKL(cfg.replace(shift_factor=0.0, scaling_factor=1.0))


def _in_chunks(module: AutoencoderKL, method: str, params: dict, x: np.ndarray) -> np.ndarray:
    """module.method over x in CODEC_BATCH chunks, the last padded with copies of its final row."""
    out = []
    for i in range(0, len(x), CODEC_BATCH):
        chunk = pad_rows(x[i:i + CODEC_BATCH], CODEC_BATCH)
        out.append(np.asarray(jit_apply(module, method, params, chunk))[:len(x) - i])
    return np.concatenate(out)


def encode_means(params: dict, cfg: VAEConfig, images) -> np.ndarray:
    """Posterior means (N, H/8, W/8, latent) of float images in [-1, 1]."""
    return _in_chunks(_codec(cfg), "encode", params, np.asarray(images, np.float32))


def latent_constants(params: dict, cfg: VAEConfig, images) -> VAEConfig:
    """cfg with shift_factor = mean and scaling_factor = 1/std of the images' posterior means."""
    z = encode_means(params, cfg, images)
    return cfg.replace(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


def fit_vae(images, cfg: VAEConfig = TINY_VAE, steps: int = VAE_STEPS, batch_size: int = VAE_BATCH,
            learning_rate: float = VAE_LEARNING_RATE, kl_weight: float = KL_WEIGHT, seed: int = 0,
            progress: bool = True) -> tuple[dict, VAEConfig]:
    """(float32 params, cfg with data-fitted latent constants) of a VAE trained on `images`.

    images: float (N, H, W, 3) in [-1, 1], sides multiples of 16. Starts from random params drawn
    as flux_jax.demo draws them; adam on reconstruction + kl_weight · KL, sampling the posterior.
    """
    x = _check_images(images)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batch_size = min(batch_size, len(x))  # one shape for every step: a single compilation
    params = random_params(AutoencoderKL(cfg), seed, jnp.float32, jnp.zeros((1, *x.shape[1:])))
    step = _train_step(_codec(cfg))
    adam_state = ADAM.init(params)
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    hyper = np.float32(learning_rate), np.float32(kl_weight)
    order, pos = rng.permutation(len(x)), 0
    bar = tqdm(range(steps), desc="fitting VAE", disable=not progress)
    t0 = time.perf_counter()
    for i in bar:
        if pos + batch_size > len(order):  # epochs without replacement, a fresh order each
            order, pos = rng.permutation(len(x)), 0
        batch, pos = x[order[pos:pos + batch_size]], pos + batch_size
        params, adam_state, (recon, kl) = step(params, adam_state, batch, jax.random.fold_in(key, i), *hyper)
        if progress and (i % 25 == 0 or i == steps - 1):
            bar.set_postfix(recon=f"{float(recon):.4f}", kl=f"{float(kl):.3g}")
    jax.block_until_ready(params)
    bar.close()
    fitted = latent_constants(params, cfg, x)
    if progress:
        tqdm.write(f"VAE fitted in {time.perf_counter() - t0:.1f}s: shift {fitted.shift_factor:.4f}, "
                   f"scale {fitted.scaling_factor:.4f}")
    return params, fitted


def reconstruct(params: dict, cfg: VAEConfig, images) -> np.ndarray:
    """Decoded posterior means of float images in [-1, 1]: float32, same shape, clipped to [-1, 1]."""
    z = encode_means(params, cfg, images)
    return np.clip(_in_chunks(_codec(cfg), "decode", params, z), *IMAGE_RANGE)


def demo_pipeline(images, variant: str = "dev", seed: int = 0, vae_steps: int = VAE_STEPS,
                  vae: tuple[dict, VAEConfig] | None = None, cls=FluxPipeline, dtype=jnp.float32,
                  progress: bool = True, **kw) -> FluxPipeline:
    """flux_jax.demo's tiny random `variant` pipeline (a `cls`), with a VAE fitted to `images`.

    vae: (params, cfg) already fitted (e.g. by fit_vae) instead of fitting one here. Extra
    keywords go to `cls` (e.g. mesh=). Named "demo"; its transformer is random until trained.
    """
    dtype = parse_dtype(dtype) or jnp.dtype(jnp.float32)
    if vae is None:
        vae = fit_vae(images, steps=vae_steps, seed=seed, progress=progress)
    vae_params, vae_cfg = vae
    parts = demo_params(variant, seed, dtype)
    tokenizer, tokenizer_2 = demo_tokenizers()
    vae_params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), vae_params)
    return cls(transformer=parts["transformer"], text_encoder=parts["text_encoder"],
               text_encoder_2=parts["text_encoder_2"], vae=(vae_params, vae_cfg), tokenizer=tokenizer,
               tokenizer_2=tokenizer_2, dynamic_shift=parts["transformer"][1].guidance_embed,
               dtype=dtype, name=DEMO_NAME, **kw)
