"""Trace one full-size transformer forward on the GPU (JAX profiler, perfetto JSON) and list the
top kernels by time. Random weights; for finding where the time goes, not for headline numbers.

    python benchmarks/profile_transformer.py OUT_DIR [--depth 19 --single 38 --size 1024 --txt 512]
    python benchmarks/profile_transformer.py OUT_DIR --quantize fp8     # float8 GEMMs (cuBLASLt e4m3 kernels)

The attention kernel is the one flux_jax picks (FLUX_JAX_ATTENTION overrides: see layers.attention_impl).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from flux_jax import quantize as qz
from flux_jax.config import DEV, PIXELS_PER_TOKEN
from flux_jax.model import Flux, param_shapes
from flux_jax.sampling import image_ids, text_ids


def top_kernels(trace_file: str, n: int = 40) -> None:
    events = json.load(gzip.open(trace_file))["traceEvents"]
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e.get("pid") is not None:
            name = e.get("name", "")
            tot[name] += e["dur"]
            cnt[name] += 1
    print(f"{'us total':>10} {'count':>6}  kernel")
    for name, us in tot.most_common(n):
        print(f"{us:>10.0f} {cnt[name]:>6}  {name[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--depth", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--quantize", choices=tuple(qz.MODES), help="the blocks' kernels in this format")
    args = ap.parse_args()
    cfg = DEV.replace(depth=args.depth, depth_single_blocks=args.single)
    shapes = param_shapes(cfg)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), len(jax.tree_util.tree_leaves(shapes))))
    params = jax.tree_util.tree_map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, jnp.bfloat16), shapes)
    params = qz.quantize_tree(params, "transformer", args.quantize)
    h = w = args.size // PIXELS_PER_TOKEN
    rng = np.random.default_rng(0)
    x = {"img": jnp.asarray(rng.standard_normal((1, h * w, 64)), jnp.bfloat16), "img_ids": image_ids(h, w),
         "txt": jnp.asarray(rng.standard_normal((1, args.txt, 4096)), jnp.bfloat16), "txt_ids": text_ids(args.txt),
         "timesteps": jnp.array([0.5]), "y": jnp.asarray(rng.standard_normal((1, 768)), jnp.bfloat16),
         "guidance": jnp.array([3.5])}
    fwd = jax.jit(lambda p, x: Flux(cfg, jnp.bfloat16).apply({"params": p}, **x))
    for _ in range(3):
        fwd(params, x).block_until_ready()
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        fwd(params, x).block_until_ready()
    files = glob.glob(os.path.join(args.out, "**", "*.trace.json.gz"), recursive=True)
    top_kernels(files[0])


if __name__ == "__main__":
    main()
