"""Run in a subprocess with N fake CPU devices: models and pipelines on a mesh vs one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_check.py "data=2,fsdp=2,tensor=2" \
        out.npz pipeline,models

Writes the outputs to out.npz and prints one JSON line with the per-device param fractions.
The flag must be set before jax is imported, hence a process of its own (see test_sharding.py).
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import flux_jax.demo as demo  # noqa: E402
from flux_jax import FluxKontextPipeline, FluxPipeline, sharding  # noqa: E402
from flux_jax.config import TINY  # noqa: E402

# 4 heads (TINY has 2) so that tensor=2 x sequence=2 or sequence=4 can split them.
CFG4 = dict(num_heads=4, axes_dim=(4, 6, 6))
SIZE = 64  # 4x4 tokens; with 512 text tokens the joint length is 528 (Kontext 544): divisible by 8
STEPS = 2


def _config(variant="dev"):
    return _base_config(variant).replace(**CFG4)


_base_config = demo.demo_config
demo.demo_config = _config


def pipelines(mesh):
    return (demo.make_demo_pipeline("dev", FluxPipeline, mesh=mesh),
            demo.make_demo_pipeline("dev", FluxKontextPipeline, mesh=mesh))


def run(pipes, stages: set, batch: int) -> dict:
    text, kontext = pipes
    prompts = [f"prompt {i}" for i in range(batch)]
    image = np.linspace(0, 1, SIZE * SIZE * 3, dtype=np.float32).reshape(SIZE, SIZE, 3)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=list(range(batch)), progress=False)
    out = {}
    if "pipeline" in stages:
        out["pipeline"] = text(prompts, output_type="latent", **kw).images
    if "cfg" in stages:  # true CFG doubles the batch; decoded images come back whole
        out["cfg"] = text(prompts, negative_prompt="blurry", true_cfg_scale=2.0, output_type="np", **kw).images
    if "kontext" in stages:  # reference tokens lengthen the joint sequence
        out["kontext"] = kontext(image=image, prompt=prompts, output_type="latent", max_area=SIZE * SIZE, **kw).images
    return out


def t5_and_transformer(pipe, mesh, batch: int):
    """Raw model outputs (jitted under the mesh) for one fixed input."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, pipe.t5_cfg.vocab_size, (batch, 16)).astype(np.int32)
    with jax.set_mesh(mesh):
        t5 = jax.jit(lambda p, i: pipe.t5.apply({"params": p}, i))(pipe.t5_params, sharding.put_batch(mesh, ids))
    cfg = pipe.cfg
    n_img = 16
    img = rng.normal(size=(batch, n_img, cfg.in_channels)).astype(np.float32)
    txt = rng.normal(size=(batch, 16, cfg.context_in_dim)).astype(np.float32)
    img_ids = np.stack([np.zeros(n_img), np.arange(n_img) // 4, np.arange(n_img) % 4], -1).astype(np.float32)
    vec = rng.normal(size=(batch, cfg.vec_in_dim)).astype(np.float32)
    t = np.full((batch,), 0.7, np.float32)
    args = [sharding.put_batch(mesh, a) for a in (img, txt, vec, t, t * 5)]
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, img, txt, y, t, g: pipe.transformer.apply(
            {"params": p}, img, img_ids, txt, np.zeros((16, 3), np.float32), t, y, g))(pipe.params, *args)
    return {"t5": sharding.to_host(t5), "transformer": sharding.to_host(out)}


def largest_fraction(params) -> float:
    """Largest share of any big (> 4096 elements) param that one device holds."""
    fractions = [max(s.data.size for s in p.addressable_shards) / p.size
                 for p in jax.tree_util.tree_leaves(params) if p.size > 4096]
    return max(fractions)


def main(spec: str, out: str, stages: str, batch: int = 4) -> None:
    """Write the outputs of `stages` (comma-separated) on mesh `spec` ('single': one device) to `out` (.npz)."""
    stages = set(stages.split(","))
    mesh = sharding.single_device_mesh() if spec == "single" else sharding.make_mesh(spec)
    pipes = pipelines(mesh)
    got = run(pipes, stages, batch)
    if "models" in stages:
        got.update(t5_and_transformer(pipes[0], mesh, batch))
    np.savez(out, **got)
    print(json.dumps({"fraction_transformer": largest_fraction(pipes[0].params),
                      "fraction_t5": largest_fraction(pipes[0].t5_params), "devices": len(jax.devices())}))


if __name__ == "__main__":
    main(*sys.argv[1:4], *(int(a) for a in sys.argv[4:]))
