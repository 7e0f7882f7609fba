"""flux_jax.layers: the CPU attention (per_head_attention) against jax.nn.dot_product_attention, tokamax's
attention (FLUX_JAX_ATTENTION=tokamax[:<implementation>]) against both and a float64 reference."""
from __future__ import annotations

import subprocess
import sys

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


# --- tokamax (FLUX_JAX_ATTENTION=tokamax[:<implementation>]) -----------------------------------------------

TOKAMAX_ON_CPU = ["tokamax:xla", "tokamax:xla_chunked", "tokamax"]  # plain tokamax falls back to xla on CPU


def rope_attention_f64(q, k, v, pe) -> np.ndarray:
    """RoPE then softmax attention in float64 NumPy: the reference none of the kernels share code with."""
    q, k, v, pe = (np.asarray(x, np.float64) for x in (q, k, v, pe))

    def rot(x):
        x = x.reshape(*x.shape[:-1], -1, 2)
        cos, sin = pe[:, :, None, :, 0], pe[:, :, None, :, 1]
        return np.stack([x[..., 0] * cos - x[..., 1] * sin, x[..., 0] * sin + x[..., 1] * cos], -1).reshape(v.shape)

    logits = np.einsum("bqhd,bkhd->bhqk", rot(q), rot(k)) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    out = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
    return out.reshape(*out.shape[:2], -1)


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def qkv_pe(length: int, b=1, heads=2, dim=16):
    q, k, v = qkv(jnp.float32, b, length, heads, dim)
    ids = np.random.default_rng(1).uniform(0, 40, (b, length, 3))
    return q, k, v, layers.rope(jnp.asarray(ids), (4, 6, 6), 10_000)


@pytest.fixture
def tokamax_calls(monkeypatch) -> list:
    """The implementation argument of every layers.tokamax_attention call (when tracing)."""
    calls, tokamax_attention = [], layers.tokamax_attention
    monkeypatch.setattr(layers, "tokamax_attention", lambda *a: calls.append(a[3]) or tokamax_attention(*a))
    return calls


def set_attention(monkeypatch, impl):
    """FLUX_JAX_ATTENTION=impl (None: unset, flux_jax's own choice)."""
    if impl:
        monkeypatch.setenv("FLUX_JAX_ATTENTION", impl)
    else:
        monkeypatch.delenv("FLUX_JAX_ATTENTION", raising=False)


def attend_with(monkeypatch, impl, *args):
    """layers.attention in a fresh jit (the kernel is chosen when tracing) under FLUX_JAX_ATTENTION=impl."""
    set_attention(monkeypatch, impl)
    return jax.jit(lambda *a: layers.attention(*a))(*args)


# 1100 tokens: several of xla_chunked's (512 query, 1024 key) chunks, with remainders
@pytest.mark.parametrize("length", [37, 1100])
@pytest.mark.parametrize("impl", TOKAMAX_ON_CPU)
def test_tokamax_attention_is_the_attention(monkeypatch, tokamax_calls, impl, length):
    q, k, v, pe = qkv_pe(length)
    want = rope_attention_f64(q, k, v, pe)
    current = attend_with(monkeypatch, None, q, k, v, pe)  # per_head_attention on CPU
    assert not tokamax_calls
    got = attend_with(monkeypatch, impl, q, k, v, pe)
    assert tokamax_calls == [impl.partition(":")[2] or None]
    assert got.dtype == jnp.float32
    assert rel(current, want) <= 1e-6  # the reference itself is right
    assert rel(got, want) <= 1e-6
    assert rel(got, current) <= 1e-5


@pytest.mark.parametrize("impl", ["tokamax:xla", "tokamax:xla_chunked"])
def test_tokamax_attention_gradients(impl):
    q, k, v = qkv(jnp.float32, b=1, length=600)  # > one 512-row query chunk
    loss = lambda f: lambda *a: (f(*a) * jnp.arange(16.0)).sum()
    tokamax = lambda q, k, v: layers.tokamax_attention(q, k, v, impl.partition(":")[2])
    got = jax.jit(jax.grad(loss(tokamax), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(layers.per_head_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert rel(g, w) <= 1e-5


def test_tokamax_model_forward_is_the_default(monkeypatch, tokamax_calls):
    from flux_jax.config import TINY
    from flux_jax.model import Flux

    rng = np.random.default_rng(2)
    n_img, n_txt = 12, 5
    x = dict(img=rng.standard_normal((2, n_img, 64)), img_ids=rng.uniform(0, 4, (n_img, 3)),
             txt=rng.standard_normal((2, n_txt, TINY.context_in_dim)), txt_ids=np.zeros((n_txt, 3)),
             timesteps=rng.uniform(0, 1, 2), y=rng.standard_normal((2, TINY.vec_in_dim)), guidance=np.full(2, 3.5))
    x = {name: jnp.asarray(a, jnp.float32) for name, a in x.items()}
    model = Flux(TINY)
    shapes = jax.eval_shape(model.init, jax.random.key(0), **x)["params"]
    leaves, tree = jax.tree_util.tree_flatten(shapes)  # random everywhere (init zeroes the AdaLN gates)
    params = tree.unflatten([jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype) for s in leaves])
    outs = {}
    for impl in (None, "tokamax:xla"):
        set_attention(monkeypatch, impl)
        outs[impl] = jax.jit(lambda p, x: model.apply({"params": p}, **x))(params, x)  # fresh jit: traced anew
    assert tokamax_calls and set(tokamax_calls) == {"xla"}  # only the tokamax forward went through tokamax
    assert float(jnp.abs(outs[None]).mean()) > 0.1  # not a degenerate output
    assert rel(outs["tokamax:xla"], outs[None]) <= 1e-5


def test_unknown_attention_is_one_clear_error(monkeypatch):
    from flux_jax import memory

    monkeypatch.setenv("FLUX_JAX_ATTENTION", "flash")
    # (?m): while tracing, JAX appends lines of its own
    msg = r"(?m)^FLUX_JAX_ATTENTION='flash': expected one of xla, cudnn, per_head, tokamax, tokamax:.*xla_chunked$"
    with pytest.raises(ValueError, match=msg):
        layers.attention_impl(jnp.float32)
    with pytest.raises(ValueError, match=msg):
        attend_with(monkeypatch, "flash", *qkv_pe(8))  # raised when tracing, not deep inside jax.nn
    with pytest.raises(ValueError, match=msg):
        memory.logit_heads(jnp.float32, "cpu", 24)


def test_tokamax_missing_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokamax", None)  # import tokamax fails as if not installed
    msg = r"(?m)^FLUX_JAX_ATTENTION=tokamax needs .*: pip install tokamax \(or flux-jax\[tokamax\]\)$"
    with pytest.raises(ModuleNotFoundError, match=msg):
        attend_with(monkeypatch, "tokamax", *qkv_pe(8))


def test_tokamax_under_an_argparse_command_line(monkeypatch):
    """tokamax parses sys.argv as absl flags on first use unless they are parsed: not a flux_jax CLI's."""
    from absl import flags

    monkeypatch.setattr(sys, "argv", ["flux-jax", "--steps", "4", "-o", "out.png"])
    flags.FLAGS.unparse_flags()  # as in a fresh process
    q, k, v, pe = qkv_pe(8)
    assert rel(attend_with(monkeypatch, "tokamax", q, k, v, pe), rope_attention_f64(q, k, v, pe)) <= 1e-6


def test_flux_jax_does_not_import_tokamax():
    code = "import sys, flux_jax.model, flux_jax.pipeline; print('tokamax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("impl, heads", [(None, 1), ("per_head", 1), ("xla", 24), ("tokamax", 24), ("tokamax:xla", 24),
                                         ("tokamax:xla_chunked", 1), ("tokamax:mosaic", 0), ("cudnn", 0)])
def test_logit_heads_follow_the_attention(monkeypatch, impl, heads):
    from flux_jax import memory

    set_attention(monkeypatch, impl)
    assert memory.logit_heads(jnp.float32, "cpu", 24) == heads  # this process's backend: what attention_impl picks
