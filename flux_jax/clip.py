"""CLIP-L/14 text encoder (transformers' CLIPTextModel), the source of FLUX's pooled text vector.

Pre-LN transformer with learned positions, causal self-attention and quick-GELU. Layers are
stacked under `nn.scan` (params carry a leading layer axis), so compile time does not grow
with depth. Compute is in the params' dtype; LayerNorm statistics and softmax in float32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import CLIPConfig
from .layers import Linear

LEGACY_EOS_ID = 2  # configs older than transformers PR #24773 say 2: pool at the largest token id instead
QUICK_GELU_ALPHA = 1.702  # OpenAI's sigmoid approximation of GELU
EMBED_STDDEV = 0.02


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias; statistics and the affine map in float32, output in param dtype."""
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.param_dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(QUICK_GELU_ALPHA * x)


class CLIPLayer(nn.Module):
    """One pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)). Scan signature (carry, _) -> (carry, None)."""
    config: CLIPConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, None]:
        cfg, dt = self.config, self.param_dtype
        b, n, width = x.shape
        h = LayerNorm(cfg.layer_norm_eps, dt, name="layer_norm1")(x)
        qkv = Linear(3 * width, param_dtype=dt, name="qkv")(h)  # q, k, v fused: one matmul
        q, k, v = jnp.split(qkv.reshape(b, n, 3 * cfg.num_heads, -1), 3, axis=2)
        # Softmax is float32 inside; scale defaults to 1/sqrt(head_dim) as in CLIP.
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, n, width)
        x = x + Linear(width, param_dtype=dt, name="out_proj")(attn)
        h = LayerNorm(cfg.layer_norm_eps, dt, name="layer_norm2")(x)
        h = quick_gelu(Linear(cfg.intermediate_size, param_dtype=dt, name="fc1")(h))
        return x + Linear(width, param_dtype=dt, name="fc2")(h), None


def pool_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Position of the end-of-text token in each row, by transformers' rule.

    Legacy configs (eos_token_id == 2) take the largest id (end-of-text is the last entry of
    CLIP's vocabulary); others the first occurrence of eos_token_id (padding may repeat it).
    argmax returns the first maximum, as torch's does.
    """
    if eos_token_id == LEGACY_EOS_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextEncoder(nn.Module):
    """input_ids (B, L <= max_positions) -> (last_hidden_state (B, L, hidden), pooled (B, hidden))."""
    config: CLIPConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, dt = self.config, self.param_dtype
        if input_ids.shape[-1] > cfg.max_positions:
            raise ValueError(f"CLIP takes at most {cfg.max_positions} tokens, got {input_ids.shape[-1]}")
        init = nn.initializers.normal(EMBED_STDDEV)
        tokens = self.param("token_embedding", init, (cfg.vocab_size, cfg.hidden_size), dt)
        positions = self.param("position_embedding", init, (cfg.max_positions, cfg.hidden_size), dt)
        x = jnp.take(tokens, input_ids, axis=0) + positions[: input_ids.shape[-1]]
        layers = nn.scan(CLIPLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=cfg.num_layers)
        x, _ = layers(cfg, dt, name="layers")(x, None)
        x = LayerNorm(cfg.layer_norm_eps, dt, name="final_layer_norm")(x)
        pooled = jnp.take_along_axis(x, pool_index(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
        return x, pooled
