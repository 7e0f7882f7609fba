"""The rectified-flow training loss of FLUX, for text-to-image and Kontext edit pairs.

    x_σ = (1 − σ)·x0 + σ·ε,   target velocity v = ε − x0,   loss = mean_b w(σ_b)·mean((v̂ − v)²)

x0 are scaled VAE latents (as the pipelines make them), packed 2×2 into tokens with ids
(0, r, c); a Kontext condition's tokens follow them with ids (1, r, c) and their predictions are
dropped. σ samplers and loss weightings are those of diffusers' SD3/FLUX training scripts
(`compute_density_for_timestep_sampling`, `compute_loss_weighting_for_sd3`) plus FLUX's
resolution shift. Sampling σ, the noise, the loss and its weighting are float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ..config import PATCH
from ..sampling import calculate_shift, image_ids, pack, text_ids

SIGMA_SAMPLERS = ("uniform", "logit_normal", "mode", "flux_shift", "shift")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
CONTROL_INDEX = 1  # first RoPE id axis of Kontext condition tokens (the target's is 0)
SIGMA_EPS = 1e-5  # keeps σ off 0 where sigma_sqrt's weight 1/σ² would blow up


@dataclasses.dataclass(frozen=True)
class LossConfig:
    sigma_sampler: str = "flux_shift"
    logit_mean: float = 0.0  # logit_normal / flux_shift: the normal before the sigmoid
    logit_std: float = 1.0
    mode_scale: float = 1.29  # `mode`: SD3's heavy-tailed mode sampling
    shift: float = 3.0  # `shift`: a fixed shift σ' = sσ / (1 + (s − 1)σ)
    weighting: str = "none"
    guidance: float = 1.0  # guidance input for dev models while training (ai-toolkit, SimpleTuner, musubi-tuner)

    def __post_init__(self):
        if self.sigma_sampler not in SIGMA_SAMPLERS:
            raise ValueError(f"sigma sampler must be one of {SIGMA_SAMPLERS}, got {self.sigma_sampler!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.logit_std <= 0 or self.shift <= 0:
            raise ValueError("logit_std and shift must be > 0")


def sample_sigmas(rng: jax.Array, batch: int, cfg: LossConfig, image_seq_len: int) -> jax.Array:
    """σ (batch,) in (0, 1) from cfg.sigma_sampler; image_seq_len sets flux_shift's μ (as the sampler's)."""
    if cfg.sigma_sampler in ("logit_normal", "flux_shift"):
        u = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, (batch,), jnp.float32))
    else:
        u = jax.random.uniform(rng, (batch,), jnp.float32)
    if cfg.sigma_sampler == "mode":
        u = 1 - u - cfg.mode_scale * (jnp.cos(math.pi * u / 2) ** 2 - 1 + u)
    elif cfg.sigma_sampler == "flux_shift":
        e_mu = math.exp(calculate_shift(image_seq_len))
        u = e_mu / (e_mu + (1 / u - 1))
    elif cfg.sigma_sampler == "shift":
        u = cfg.shift * u / (1 + (cfg.shift - 1) * u)
    return jnp.clip(u, SIGMA_EPS, 1.0)


def loss_weights(sigmas: jax.Array, weighting: str) -> jax.Array:
    """Per-sample loss weight w(σ) (batch,)."""
    if weighting == "sigma_sqrt":
        return sigmas ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return jnp.ones_like(sigmas)


def draw(rng: jax.Array, latents_shape: tuple[int, ...], cfg: LossConfig) -> tuple[jax.Array, jax.Array]:
    """(ε like the latents, σ (B,)) for one batch of latents (B, h, w, C)."""
    b, h, w, _ = latents_shape
    k_noise, k_sigma = jax.random.split(rng)
    noise = jax.random.normal(k_noise, latents_shape, jnp.float32)
    return noise, sample_sigmas(k_sigma, b, cfg, (h // PATCH) * (w // PATCH))


def model_inputs(batch: dict, x_sigma: jax.Array, sigmas: jax.Array, guidance: Optional[float],
                 dtype) -> dict:
    """Keyword arguments of the Flux module for noisy latents x_σ (B, h, w, C) and the batch's text/control."""
    b, h, w, _ = x_sigma.shape
    kw: dict[str, Any] = dict(
        img=pack(x_sigma).astype(dtype), img_ids=image_ids(h // PATCH, w // PATCH),
        txt=batch["txt"].astype(dtype), txt_ids=text_ids(batch["txt"].shape[1]),
        timesteps=sigmas, y=batch["y"].astype(dtype),
        guidance=None if guidance is None else jnp.full((b,), guidance, jnp.float32))
    if batch.get("control") is not None:
        c = batch["control"]
        kw.update(cond_seq=pack(c).astype(dtype),
                  cond_seq_ids=image_ids(c.shape[1] // PATCH, c.shape[2] // PATCH, CONTROL_INDEX))
    return kw


def flow_loss(model, variables: dict, batch: dict, noise: jax.Array, sigmas: jax.Array,
              cfg: LossConfig) -> jax.Array:
    """The weighted flow-matching loss (float32 scalar) of `model` (a Flux module) for given ε and σ.

    batch: "latents" (B, h, w, C) scaled VAE latents, "txt" (B, L, D), "y" (B, D_pooled),
    optionally "control" (B, h', w', C) Kontext condition latents.
    """
    x0 = batch["latents"].astype(jnp.float32)
    s = sigmas[:, None, None, None]
    x_sigma = (1 - s) * x0 + s * noise
    guidance = cfg.guidance if model.cfg.guidance_embed else None
    pred = model.apply(variables, **model_inputs(batch, x_sigma, sigmas, guidance, model.param_dtype))
    err = jnp.square(pred.astype(jnp.float32) - pack(noise - x0))
    per_sample = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return jnp.mean(loss_weights(sigmas, cfg.weighting) * per_sample)

