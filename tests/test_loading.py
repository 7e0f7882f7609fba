"""flux_jax.loading.assemble: per-layer pieces written into preallocated, donated layer stacks.

The real-size effect (FLUX.1-dev int4 transformer: 6.42 GB of params loaded at 7.25 GB RSS, 11.36 GB
when the pieces were stacked at the end) is measured by benchmarks/memory.py; here the mechanism.
"""
from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import sharding
from flux_jax.config import TINY, TINY_T5
from flux_jax.loading import LoadError, _write_layer, assemble, layer_counts

LAYERS = 3
SHAPES = {"qkv/kernel": ((8, 24), jnp.float32), "proj/kernel/int8": ((8, 24), jnp.int8), "norm/scale": ((8,), jnp.float32)}


def layer(path: str, i: int) -> np.ndarray:
    shape, dtype = SHAPES[path]
    return (np.arange(np.prod(shape)).reshape(shape) + 100 * i).astype(dtype)


def all_pieces(order=None):
    keys = [(f"blocks_{i}/{p}", p, i) for i in range(LAYERS) for p in SHAPES]
    return [keys[k] for k in (order or range(len(keys)))]


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh()


def test_layers_in_any_order_give_the_stack(mesh):
    order = list(np.random.default_rng(0).permutation(LAYERS * len(SHAPES)))
    pieces = [(path, jnp.asarray(layer(p, i))) for path, p, i in all_pieces(order)]
    pieces.append(("final/bias", jnp.ones(4)))  # not a stack: passes through
    params = assemble(mesh, pieces, {"blocks": LAYERS})
    for p in SHAPES:
        node = params["blocks"]
        for k in p.split("/"):
            node = node[k]
        np.testing.assert_array_equal(node, np.stack([layer(p, i) for i in range(LAYERS)]))
        assert node.dtype == SHAPES[p][1]
    np.testing.assert_array_equal(params["final"]["bias"], np.ones(4))


def test_each_piece_is_dropped_once_written(mesh):
    """The old assemble kept every piece until the end and stacked then: twice the params at the peak."""
    gc.collect()
    base = live_bytes()
    stacks = sum(np.prod(s) * np.dtype(d).itemsize * LAYERS for s, d in SHAPES.values())
    largest = max(np.prod(s) * np.dtype(d).itemsize for s, d in SHAPES.values())
    given: list[weakref.ref] = []

    def stream():
        for path, p, i in all_pieces():
            assert all(r() is None for r in given), "a piece written into its stack is still alive"
            assert live_bytes() - base <= stacks, "more than the stacks alive between pieces"
            arr = jnp.asarray(layer(p, i))
            given.append(weakref.ref(arr))
            yield path, arr
            del arr

    params = assemble(mesh, stream(), {"blocks": LAYERS})
    assert live_bytes() - base <= stacks + largest
    assert params["blocks"]["proj"]["kernel"]["int8"].shape == (LAYERS, 8, 24)


def test_a_layer_is_written_in_place(mesh):
    stack = jnp.zeros((LAYERS, 8, 24), jnp.float32)
    pointer = stack.unsafe_buffer_pointer()
    out = _write_layer(stack.sharding)(stack, jnp.ones((8, 24)), np.int32(1))
    assert stack.is_deleted() and out.unsafe_buffer_pointer() == pointer  # donated: no second stack
    np.testing.assert_array_equal(out[1], 1.0)
    np.testing.assert_array_equal(out[0], 0.0)


@pytest.mark.parametrize("pieces, message", [
    ([("blocks_0/w", np.zeros(2)), ("blocks_2/w", np.zeros(2))], "blocks/w: layers [1] missing"),
    ([("blocks_3/w", np.zeros(2))], "blocks_3/w: layer 3 of a model with 3"),
    ([("blocks_0/w", np.zeros(2)), ("blocks_1/w", np.zeros(3))], "blocks_1/w: shape (3,) differs from the other layers' (2,)"),
])
def test_bad_layers_are_named(mesh, pieces, message):
    with pytest.raises(LoadError) as e:
        assemble(mesh, [(p, jnp.asarray(v)) for p, v in pieces], {"blocks": LAYERS})
    assert str(e.value) == message


def test_layer_counts_come_from_the_config():
    assert layer_counts("transformer", TINY) == {"double_blocks": TINY.depth, "single_blocks": TINY.depth_single_blocks}
    assert layer_counts("transformer", TINY, scan_layers=False) == {}
    assert layer_counts("text_encoder_2", TINY_T5) == {"layers": TINY_T5.num_layers}
    assert layer_counts("vae", None) == {}
