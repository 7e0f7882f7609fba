"""Building blocks of the FLUX transformer: linear, norms, RoPE, attention, embedders, modulation.

Compute happens in the params' dtype; RoPE, timestep embeddings, norm statistics and softmax
stay in float32.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import quantize
from .config import TIME_EMBED_DIM, TIME_FACTOR
from .sharding import sharded_attention

LORA, LORA_SCALE = "lora", "lora_scale"  # variable collections of LoRA adapters (see flux_jax/lora.py)

NORM_EPS = 1e-6
Init = Callable[..., jax.Array]


class Linear(nn.Module):
    """y = x @ kernel + bias, computed in the kernel's dtype (kernel is (in, out), as Flax's Dense).

    The kernel may be weight-only quantized (a dict, see flux_jax/quantize.py): computed in its
    scales' dtype then. With a LoRA adapter in the variables (collections LORA: a (in, r), b (r, out);
    LORA_SCALE: s (r,), one scale per rank column), adds the side branch ((x @ a) · s) @ b.
    """
    features: int
    use_bias: bool = True
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Init = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.get_variable("params", "kernel")
        if not quantize.is_quantized(kernel):  # a float kernel, or initialising
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        dtype = quantize.compute_dtype(kernel)
        x = x.astype(dtype)
        y = quantize.dot(x, kernel)
        if self.has_variable(LORA, "a"):
            a, b = (self.get_variable(LORA, n).astype(dtype) for n in ("a", "b"))
            y = y + jnp.dot(jnp.dot(x, a) * self.get_variable(LORA_SCALE, "s").astype(dtype), b)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return y


def layer_norm(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """LayerNorm without affine params; statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (FLUX's QK norm); statistics in float32."""
    param_dtype: jnp.dtype = jnp.float32
    eps: float = NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return x32.astype(scale.dtype) * scale


def timestep_embedding(t: jax.Array, dim: int = TIME_EMBED_DIM, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding [cos, sin] of t·1000 (t in [0, 1]: sigma, or guidance scale), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * TIME_FACTOR)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope(ids: jax.Array, axes_dim: Sequence[int], theta: int) -> jax.Array:
    """RoPE rotation table for position ids (B, L, n_axes), integer or fractional.

    Returns (B, L, head_dim // 2, 2) float32 holding (cos, sin) for each adjacent pair of channels;
    axis i of the ids owns the next axes_dim[i] channels.
    """
    ids = ids.astype(jnp.float32)
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
        angles.append(ids[..., i, None] * omega)
    angle = jnp.concatenate(angles, axis=-1)
    return jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)


def apply_rope(x: jax.Array, pe: jax.Array) -> jax.Array:
    """Rotate adjacent channel pairs of x (B, L, H, D) by pe (B, L, D/2, 2), in float32."""
    xp = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos, sin = pe[:, :, None, :, 0], pe[:, :, None, :, 1]
    re = xp[..., 0] * cos - xp[..., 1] * sin
    im = xp[..., 0] * sin + xp[..., 1] * cos
    return jnp.stack([re, im], axis=-1).reshape(x.shape).astype(x.dtype)


XLA, CUDNN, PER_HEAD, TOKAMAX = "xla", "cudnn", "per_head", "tokamax"  # attention_impl's names
# tokamax.dot_product_attention's implementations, forced with FLUX_JAX_ATTENTION=tokamax:<name>
TOKAMAX_IMPLS = ("mosaic", "triton", "cudnn", "xla", "xla_chunked")
ATTENTION_IMPLS = (XLA, CUDNN, PER_HEAD, TOKAMAX, *(f"{TOKAMAX}:{name}" for name in TOKAMAX_IMPLS))


def attention_impl(dtype) -> Optional[str]:
    """cuDNN's fused flash attention on NVIDIA GPUs in half precision, per_head_attention on CPU,
    XLA's otherwise.

    jax.nn.dot_product_attention does not pick cuDNN by itself. FLUX_JAX_ATTENTION (one of
    ATTENTION_IMPLS, read when tracing) overrides: xla|cudnn (jax.nn's), per_head, tokamax (Google's
    Pallas kernels, tokamax picks: see tokamax_attention) or tokamax:<name> (one of TOKAMAX_IMPLS).
    tokamax is not a default: cuDNN vs tokamax on GPU is for `benchmarks/transformer.py --gpu
    --attention cudnn tokamax` to measure.
    """
    forced = os.environ.get("FLUX_JAX_ATTENTION")
    if forced:
        if forced not in ATTENTION_IMPLS:
            raise ValueError(f"FLUX_JAX_ATTENTION={forced!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
        return forced
    backend = jax.default_backend()
    if backend == "cpu":
        return PER_HEAD
    return CUDNN if jnp.dtype(dtype) in quantize.HALF and backend == "gpu" else None


def per_head_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention over (B, L, H, D), one (row, head) at a time (lax.map) with 2-D matmuls.

    The math of jax.nn.dot_product_attention (float32 logits and softmax, probabilities in v's dtype),
    in another order: on CPU, XLA's batched version makes several passes over every head's L×L
    logits at once (226 MB at 1536 tokens and 24 heads), one head's (9 MB) stays in cache. Measured
    on 2 cores, fp32, 1536 tokens: forward 0.26 s vs 0.63 s, with its gradient 0.95 s vs 1.25 s.
    """
    b, length, heads, dim = q.shape
    rows = lambda x: x.transpose(0, 2, 1, 3).reshape(b * heads, x.shape[1], dim)

    def one(qkv):
        qh, kh, vh = qkv
        logits = jnp.dot(qh, kh.T, preferred_element_type=jnp.float32) * (dim ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(vh.dtype)
        return jnp.dot(probs, vh, preferred_element_type=jnp.float32).astype(vh.dtype)

    out = jax.lax.map(one, (rows(q), rows(k), rows(v)))
    return out.reshape(b, heads, length, dim).transpose(0, 2, 1, 3)


def _import_tokamax():
    """tokamax, imported only when chosen (about 1 s of imports).

    tokamax reads its options as absl flags and, unless a program already parsed them (absl's
    app.run), parses sys.argv for them on first use: an argparse command line (--steps 4) then fails
    with UnrecognizedFlagError. Marked parsed here instead, so its options keep their defaults
    (tokamax.config's context managers still override them).
    """
    try:
        import tokamax
        from absl import flags
    except ModuleNotFoundError as e:
        if e.name != "tokamax":  # tokamax is there but broken: its own error says more
            raise
        raise ModuleNotFoundError("FLUX_JAX_ATTENTION=tokamax needs the tokamax package: "
                                  "pip install tokamax (or flux-jax[tokamax])") from None
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def tokamax_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: Optional[str] = None) -> jax.Array:
    """Softmax attention over (B, L, H, D) by tokamax.dot_product_attention, jax.nn's layout.

    implementation: one of TOKAMAX_IMPLS; None lets tokamax take the first of mosaic (Mosaic GPU
    flash attention on sm90/sm100 in half precision, splash/Mosaic on TPU), triton (Pallas Triton
    flash attention) and xla that supports the inputs: xla on CPU. Scale 1/sqrt(D); logits and
    softmax in float32; dot precision the process default (jax_default_matmul_precision), as
    jax.nn's: exact float32 on CPU, TF32 for float32 on GPU (where Mosaic then declines).
    """
    tokamax = _import_tokamax()
    return tokamax.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, implementation=implementation)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention over (B, L, H, D), no RoPE, by the kernel attention_impl picks."""
    impl = attention_impl(q.dtype)
    if impl == PER_HEAD:
        return per_head_attention(q, k, v)
    name, _, kernel = (impl or "").partition(":")
    if name == TOKAMAX:
        return tokamax_attention(q, k, v, kernel or None)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, pe: jax.Array) -> jax.Array:
    return dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, pe: jax.Array) -> jax.Array:
    """RoPE then softmax attention over (B, L, H, D); returns (B, L, H·D).

    The one place a faster kernel plugs in (see attention_impl). On a mesh it runs per device
    (batch, heads and, with a sequence axis, Ulysses sequence parallelism: see sharding).
    """
    out = sharded_attention(_attend, q, k, v, pe)
    return out.reshape(*out.shape[:2], -1)


class MLPEmbedder(nn.Module):
    """in_layer -> SiLU -> out_layer (time, guidance and pooled-text embedders)."""
    hidden_dim: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Linear(self.hidden_dim, param_dtype=self.param_dtype, name="in_layer")(x)
        return Linear(self.hidden_dim, param_dtype=self.param_dtype, name="out_layer")(nn.silu(x))


class Modulation(nn.Module):
    """AdaLN-Zero: `n` (shift, scale, gate...) vectors of width dim from the conditioning vector."""
    n: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, vec: jax.Array) -> list[jax.Array]:
        dim = vec.shape[-1]
        out = Linear(self.n * dim, param_dtype=self.param_dtype, name="lin")(nn.silu(vec))
        return jnp.split(out[:, None, :], self.n, axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return (1 + scale) * layer_norm(x) + shift
