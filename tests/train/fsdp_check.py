"""Run with 8 fake CPU devices: 3 train steps with FSDP (fsdp=8) vs one device; prints one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train/fsdp_check.py full|lora
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flux_jax import sharding  # noqa: E402
from flux_jax.train.data import make_iterator  # noqa: E402
from flux_jax.train.loss import LossConfig  # noqa: E402
from flux_jax.train.lora import init_lora  # noqa: E402
from flux_jax.train.trainer import OptimConfig, Trainer  # noqa: E402
from train_fixtures import CFG, MemoryCache, tiny_params  # noqa: E402

STEPS = 3
BATCH = 8  # one row a device
# Adam's first steps move each weight by about ±lr whatever its gradient's size, so a near-zero
# gradient whose last bits differ between reduction orders flips a weight by 2·lr (measured: 2e-4
# relative after 3 steps with eps 1e-8, while losses and gradient norms agree to 1e-7). An eps
# above that noise floor keeps the comparison about the sharded computation.
EPS = 1e-2


def run(mesh, mode):
    params = tiny_params()
    lora = init_lora(params, CFG, rank=4, seed=1) if mode == "lora" else None
    trainer = Trainer(CFG, OptimConfig(learning_rate=5e-4, grad_accum=2, eps=EPS), LossConfig(), STEPS, dtype=jnp.float32,
                      mesh=mesh, lora=lora)
    state, frozen = trainer.init(params, seed=0)
    start = jax.tree_util.tree_map(np.asarray, state["trainable"])
    data = make_iterator(MemoryCache(16), BATCH * 2, seed=0)
    for _ in range(STEPS):
        state, _ = trainer.step(state, frozen, next(data))
    return start, state


def main():
    mode = sys.argv[1]
    start, one = run(sharding.single_device_mesh(), mode)
    _, eight = run(sharding.make_mesh("fsdp=8"), mode)
    rels, diff2, norm2 = {}, 0.0, 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one["trainable"]),
                            jax.tree_util.tree_leaves(eight["trainable"])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rels[jax.tree_util.keystr(path)] = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
        diff2, norm2 = diff2 + float(np.sum((a - b) ** 2)), norm2 + float(np.sum(a ** 2))
    worst = max(rels, key=rels.get)
    moved = any(not np.array_equal(x, np.asarray(y)) for x, y in
                zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(one["trainable"])))
    big = [a for a in jax.tree_util.tree_leaves(eight) if a.size >= 4096]
    fraction = max((a.addressable_shards[0].data.size / a.size for a in big), default=None)
    print(json.dumps({"devices": jax.device_count(), "rel": (diff2 / norm2) ** 0.5, "worst_leaf_rel": rels[worst],
                      "worst": worst, "moved": moved,
                      "largest_shard_fraction": fraction}))


if __name__ == "__main__":
    main()
