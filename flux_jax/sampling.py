"""Flow-matching Euler sampling as diffusers' FluxPipeline + FlowMatchEulerDiscreteScheduler do it.

Latent packing, position ids, the resolution-shifted sigma schedule, the Euler loop (one
`lax.fori_loop`) and the true-CFG combination. Host-side pieces (schedule, ids) use numpy so
their float32 arithmetic is bit-identical to diffusers'; the loop itself is JAX.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flux_jax.config import LATENT_CHANNELS, PATCH, PIXELS_PER_TOKEN, TIME_FACTOR
from flux_jax.sharding import on_mesh

# FLUX.1-dev scheduler_config.json (schnell uses no shift at all).
BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15
ID_AXES = 3  # (index, row, col) for every token

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------- packing and ids

def pack(latents: jax.Array) -> jax.Array:
    """(B, h, w, C) NHWC latents -> (B, (h/2)(w/2), C*4) tokens, channels ordered (c, ph, pw)."""
    b, h, w, c = latents.shape
    x = jnp.reshape(latents, (b, h // PATCH, PATCH, w // PATCH, PATCH, c))
    # diffusers views NCHW as (b, c, h/2, ph, w/2, pw): the channel index varies slowest in a token.
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4))
    return jnp.reshape(x, (b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH))


def unpack(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """Inverse of `pack` for an image of `height` x `width` PIXELS -> (B, H/8, W/8, C) NHWC."""
    b, _, d = tokens.shape
    # Same flooring as diffusers' _unpack_latents, so odd sizes fail (or pass) the same way.
    ht, wt = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    c = d // (PATCH * PATCH)
    x = jnp.reshape(tokens, (b, ht, wt, c, PATCH, PATCH))
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))
    return jnp.reshape(x, (b, ht * PATCH, wt * PATCH, c))


def image_ids(height_tokens: int, width_tokens: int, index: int = 0) -> np.ndarray:
    """(h*w, 3) float32 ids (index, row, col) in row-major token order.

    index is 0 for the image being generated; Kontext gives its reference image index 1.
    """
    ids = np.zeros((height_tokens, width_tokens, ID_AXES), np.float32)
    ids[..., 0] = index
    ids[..., 1] = np.arange(height_tokens)[:, None]
    ids[..., 2] = np.arange(width_tokens)[None, :]
    return ids.reshape(height_tokens * width_tokens, ID_AXES)


def text_ids(length: int) -> np.ndarray:
    """(L_txt, 3) float32 zeros: text tokens carry no position in FLUX's RoPE."""
    return np.zeros((length, ID_AXES), np.float32)


# ---------------------------------------------------------------- schedule

def calculate_shift(image_seq_len: int, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
                    base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """mu, linear in the image token count (python float math, same operation order as diffusers)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
    """Exponential time shift e^mu / (e^mu + (1/t - 1)^sigma); keeps t's dtype (float32)."""
    with np.errstate(divide="ignore"):  # t == 0 -> 1/t = inf -> shifted 0, as in diffusers
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_schedule(num_steps: Optional[int], image_seq_len: int, shift: bool = True,
                 sigmas: Optional[Sequence[float]] = None) -> np.ndarray:
    """float32 sigmas (num_steps + 1,), ending in 0, exactly as FluxPipeline steps with them.

    shift=True: dev/Kontext/Fill (dynamic exponential shift by mu); shift=False: schnell
    (shift=1.0, i.e. the unshifted sigmas). Custom `sigmas` replace the default linspace and are
    shifted the same way; num_steps may then be None.
    """
    if sigmas is None:
        # The pipeline's default, built in float64 then cast to float32 by the scheduler.
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    elif num_steps is not None and len(sigmas) != num_steps:
        raise ValueError(f"got {len(sigmas)} sigmas for {num_steps} steps")
    s = np.array(sigmas).astype(np.float32)
    if shift:
        s = time_shift(calculate_shift(image_seq_len), 1.0, s)
    # (shift=False: diffusers computes 1.0*s / (1 + 0*s), which is exactly s in float32.)
    return np.concatenate([s, np.zeros(1, np.float32)]).astype(np.float32)


def model_timesteps(sigmas, dtype=jnp.float32) -> np.ndarray:
    """The timestep value diffusers feeds the transformer at each sigma (drops the final 0).

    Why not just sigmas: the scheduler stores t = float32(sigma * 1000), the pipeline casts t to
    the latents' dtype and passes t / 1000 in that dtype, so the model sees sigma re-rounded
    (in float32 it is off by up to an ulp; in bfloat16 by far more). Our model multiplies by
    1000 itself, so feeding this value reproduces diffusers bit for bit. Host-side numpy on
    purpose: XLA simplifies (s * 1000) / 1000 to s, so this must not be computed under jit.
    """
    s = np.asarray(sigmas, np.float32)[:-1]
    t = (s * np.float32(TIME_FACTOR)).astype(dtype)
    return (t / np.asarray(TIME_FACTOR, dtype)).astype(dtype)


# ---------------------------------------------------------------- Euler loop

def denoise(velocity_fn: VelocityFn, x: jax.Array, sigmas: jax.Array, timesteps: Optional[jax.Array] = None,
            progress: Optional[Callable[[int], None]] = None,
            step_hook: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None, state: Any = None):
    """Euler-integrate x from sigmas[0] to sigmas[-1] in one `lax.fori_loop`; jit the caller.

    velocity_fn(x, t) -> v, with t of shape (B,) = `timesteps[i]` (default
    `model_timesteps(sigmas)`, what diffusers feeds the model; pass it explicitly when jitting
    with traced sigmas). The state is float32 and the update is
    FlowMatchEulerDiscreteScheduler.step: x += (sigma_next - sigma) * float32(v).
    sigmas/timesteps may be traced (new values don't recompile); their length fixes the step
    count. progress(i) is an ordered host callback after each step (see `tqdm_progress`);
    step_hook(i, x) -> x runs after each step (inpainting re-imposes the known region there).
    state: a pytree carried from step to step (step caching, see flux_jax/cache.py): then
    velocity_fn(x, t, i, state) -> (v, state) and the result is (x, final state).
    """
    num_steps = sigmas.shape[0] - 1
    if timesteps is None:
        if isinstance(sigmas, jax.core.Tracer):
            raise ValueError("sigmas is traced: pass timesteps=model_timesteps(sigmas) computed on the host")
        timesteps = model_timesteps(sigmas)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    timesteps = jnp.asarray(timesteps)
    batch = x.shape[0]
    multi_device = on_mesh()
    stateful = state is not None
    velocity = velocity_fn if stateful else (lambda x, t, i, state: (velocity_fn(x, t), state))

    def body(i, carry):
        x, state = carry
        t = jnp.broadcast_to(timesteps[i], (batch,))
        v, state = velocity(x, t, i, state)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.astype(jnp.float32)
        if step_hook is not None:
            x = step_hook(i, x)
        if progress is not None:
            # Ordered effects exist on one device only; on a mesh the bar just tolerates reordering.
            jax.debug.callback(progress, i, ordered=not multi_device)
        return x, state

    x, state = jax.lax.fori_loop(0, num_steps, body, (jnp.asarray(x, jnp.float32), state if stateful else ()))
    return (x, state) if stateful else x


def tqdm_progress(total: int, desc: str = "sampling"):
    """(callback, bar): pass callback as denoise's `progress`; close the bar when done."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc)

    def callback(i):
        # Set rather than increment: robust if a compiled loop is re-run with the same bar.
        bar.n = int(i) + 1
        bar.refresh()

    return callback, bar


def cfg_velocity(v_pos: jax.Array, v_neg: jax.Array, scale: float) -> jax.Array:
    """True classifier-free guidance, FluxPipeline's `true_cfg_scale` formula.

    Callers should run both branches as one batched forward (concatenate positive and negative
    prompts on the batch axis, split the output) rather than two model calls.
    """
    return v_neg + scale * (v_pos - v_neg)
