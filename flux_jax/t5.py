"""T5 v1.1 encoder (transformers' T5EncoderModel), FLUX's per-token text features.

Pre-RMSNorm transformer with gated tanh-GELU FFN, unscaled attention logits and a bucketed
relative-position bias (layer 0's table, shared by every layer). Called without an attention
mask, as FluxPipeline does on max_length-padded ids. Layers run under `nn.scan`.

The residual stream stays float32 whatever the params' dtype (T5's activations are large);
matmuls run in the params' dtype, norm statistics and softmax in float32.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import T5Config
from .layers import Linear, RMSNorm
from .sharding import constrain

TOKENS = ("batch", "length", None)  # logical axes of (B, L, d_model) activations

EMBED_STDDEV = 1.0  # init of the token and bias tables (random use only; converted weights replace it)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int32 bucket of key position - query position, bidirectional (encoder).

    Half the buckets per direction are exact offsets, the rest log-spaced up to max_distance.
    Computed with numpy in float32 at trace time (lengths are static), mirroring transformers'
    arithmetic so that the truncation lands on the same bucket at exact powers of two.
    """
    pos = np.arange(length)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2  # per direction
    max_exact = half // 2
    dist = np.abs(rel)
    log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))  # max: no log(0)
    large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return ((rel > 0) * half + np.where(dist < max_exact, dist, large)).astype(np.int32)


class T5Layer(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)); x float32. Scan signature (x, bias) -> (x, None)."""
    config: T5Config
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
        cfg, dt = self.config, self.param_dtype
        b, n, _ = x.shape
        inner = cfg.num_heads * cfg.d_kv
        h = RMSNorm(dt, cfg.layer_norm_eps, name="attn_norm")(x)
        qkv = Linear(3 * inner, use_bias=False, param_dtype=dt, name="qkv")(h)  # fused q, k, v
        q, k, v = jnp.split(qkv.reshape(b, n, 3 * cfg.num_heads, cfg.d_kv), 3, axis=2)
        # T5 folds 1/sqrt(d) into its init, so logits are not scaled. Logits (float32 even for
        # bf16 q, k), the float32 bias and the softmax stay float32 inside.
        attn = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0)
        x = x + Linear(cfg.d_model, use_bias=False, param_dtype=dt, name="o")(attn.reshape(b, n, inner))
        h = RMSNorm(dt, cfg.layer_norm_eps, name="ffn_norm")(x)
        gate, up = jnp.split(Linear(2 * cfg.d_ff, use_bias=False, param_dtype=dt, name="wi")(h), 2, axis=-1)
        h = jax.nn.gelu(gate, approximate=True) * up  # gelu_new: the tanh approximation
        return constrain(x + Linear(cfg.d_model, use_bias=False, param_dtype=dt, name="wo")(h), TOKENS), None


class T5Encoder(nn.Module):
    """input_ids (B, L) -> last_hidden_state (B, L, d_model), in the params' dtype."""
    config: T5Config
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg, dt = self.config, self.param_dtype
        n = input_ids.shape[-1]
        tokens = self.param("embed_tokens", nn.initializers.normal(EMBED_STDDEV), (cfg.vocab_size, cfg.d_model), dt)
        table = self.param("relative_attention_bias", nn.initializers.normal(EMBED_STDDEV),
                           (cfg.relative_attention_num_buckets, cfg.num_heads), dt)
        buckets = relative_position_buckets(n, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        bias = jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))[None]  # (1, heads, L, L)
        x = constrain(jnp.take(tokens, input_ids, axis=0).astype(jnp.float32), TOKENS)
        layers = nn.scan(T5Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=cfg.num_layers)
        x, _ = layers(cfg, dt, name="layers")(x, bias)
        return RMSNorm(dt, cfg.layer_norm_eps, name="final_norm")(x)
