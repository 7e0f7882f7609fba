"""Run in a subprocess with 8 fake CPU devices: load a transformer onto fsdp=8 and watch the host reads.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/load_check.py WORKDIR

Prints one JSON line: the largest fraction of a large tensor that any single host read (one
make_array_from_callback slice) or placement (device_put of a host array) carried, the largest
per-device share of the loaded params, and whether the loaded values equal the source.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from convert.core import leaves, save_checkpoint
from convert.transformer import bfl_rules
from flux_jax import loading, sharding
from flux_jax.demo import demo_params

LARGE = 4096  # elements: the tensors whose reads are watched
reads: list[float] = []  # fraction of a large tensor in one host->device transfer


def _watch():
    make, put = jax.make_array_from_callback, jax.device_put

    def make_watched(shape, target, callback, *a, **kw):
        size = int(np.prod(shape))

        def cb(idx):
            out = callback(idx)
            if size > LARGE:
                reads.append(np.asarray(out).size / size)
            return out
        return make(shape, target, cb, *a, **kw)

    def put_watched(x, *a, **kw):
        for leaf in jax.tree_util.tree_leaves(x):
            if isinstance(leaf, np.ndarray) and leaf.size > LARGE:
                reads.append(1.0)  # a whole host tensor sent at once
        return put(x, *a, **kw)

    jax.make_array_from_callback, jax.device_put = make_watched, put_watched


def write_bfl(params: dict, cfg, path: Path) -> None:
    """Our params -> a BFL-layout safetensors file (every BFL rule has one source tensor)."""
    flat, tensors = leaves(params), {}
    for rule in bfl_rules(cfg):
        w = np.asarray(flat[rule.dst])
        w = w if rule.layer is None else w[rule.layer]
        tensors[rule.src[0]] = np.ascontiguousarray(w.T if rule.dst.endswith("kernel") else w)
    save_file(tensors, str(path))


def check(params: dict, want: dict) -> dict:
    flat_got, flat_want = leaves(params), leaves(want)
    equal = flat_got.keys() == flat_want.keys() and all(
        np.array_equal(sharding.to_host(flat_got[k]), flat_want[k]) for k in flat_want)
    share = max(max(s.data.size for s in a.addressable_shards) / a.size
                for a in flat_got.values() if a.size > LARGE)
    return {"equal": bool(equal), "share": share}


def main(work: str) -> None:
    work = Path(work)
    params, cfg = demo_params("dev")["transformer"]
    params = jax.tree_util.tree_map(np.asarray, params)
    bfl = work / "flux1-tiny.safetensors"
    write_bfl(params, cfg, bfl)
    save_checkpoint(work / "converted", params, {"component": "transformer", "config": cfg.to_dict()})
    mesh = sharding.make_mesh("fsdp=8")
    _watch()
    report = {}
    for source, path in (("safetensors", bfl), ("orbax", work / "converted")):
        for scan in (True, False):
            reads.clear()
            loaded, _ = loading.load_component(path, "transformer", mesh, scan_layers=scan, axes_dim=cfg.axes_dim) \
                if source == "safetensors" else loading.load_component(path, "transformer", mesh, scan_layers=scan)
            want = params if scan else jax.tree_util.tree_map(np.asarray, _unstack(params))
            report[f"{source}_{'scan' if scan else 'unrolled'}"] = {**check(loaded, want),
                                                                   "largest_read": max(reads, default=0.0)}
    print(json.dumps(report))


def _unstack(params):
    from flux_jax.model import unstack_layers
    return unstack_layers(params)


if __name__ == "__main__":
    main(sys.argv[1])
