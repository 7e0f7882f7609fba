"""flux_jax.layers: the CPU attention (per_head_attention) against jax.nn.dot_product_attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import layers


def qkv(dtype, b=2, length=37, heads=3, dim=16):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal((b, length, heads, dim)), dtype) for _ in range(3))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_per_head_attention_is_xla_attention(dtype, tol):
    q, k, v = qkv(dtype)
    got, want = layers.per_head_attention(q, k, v), jax.nn.dot_product_attention(q, k, v)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_per_head_attention_gradients():
    q, k, v = qkv(jnp.float32)
    loss = lambda f: lambda *a: (f(*a) * jnp.arange(16.0)).sum()  # weights every channel differently
    got = jax.grad(loss(layers.per_head_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_attention_impl_by_backend(monkeypatch):
    monkeypatch.delenv("FLUX_JAX_ATTENTION", raising=False)
    assert layers.attention_impl(jnp.float32) == layers.PER_HEAD  # this test runs on CPU
    monkeypatch.setenv("FLUX_JAX_ATTENTION", "xla")
    assert layers.attention_impl(jnp.float32) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("FLUX_JAX_ATTENTION")
    assert layers.attention_impl(jnp.bfloat16) == "cudnn" and layers.attention_impl(jnp.float32) is None
