"""Parity of flux_jax.model.Flux with diffusers' FluxTransformer2DModel on random weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convert.core import load_checkpoint, save_checkpoint
from convert.transformer import BFL_PREFIX, convert_transformer
from flux_jax.config import DEV, TINY, FluxConfig
from flux_jax.model import Flux
from torch_ref import diffusers_to_bfl, diffusers_transformer, rel_err

FP32_TOL = 1e-5
BF16_TOL = 2e-2
N_TXT = 7


def grid_ids(h: int, w: int, index: float = 0.0) -> np.ndarray:
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([np.full(h * w, index), r.ravel(), c.ravel()], -1).astype(np.float32)


def make_inputs(cfg: FluxConfig, h: int, w: int, batch: int = 2, cond_hw=None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n_noise = cfg.out_channels
    x = {
        "img": rng.standard_normal((batch, h * w, n_noise), np.float32),
        "img_ids": grid_ids(h, w),
        "txt": rng.standard_normal((batch, N_TXT, cfg.context_in_dim), np.float32),
        "txt_ids": np.zeros((N_TXT, 3), np.float32),
        "timesteps": rng.uniform(0, 1, batch).astype(np.float32),
        "y": rng.standard_normal((batch, cfg.vec_in_dim), np.float32),
        "guidance": np.full(batch, 3.5, np.float32) if cfg.guidance_embed else None,
    }
    if cfg.in_channels > n_noise:  # Fill: masked-image latents and mask concatenated on channels
        x["img_cond"] = rng.standard_normal((batch, h * w, cfg.in_channels - n_noise), np.float32)
    if cond_hw:  # Kontext: reference-image tokens appended to the sequence, ids (1, r, c)
        x["cond_seq"] = rng.standard_normal((batch, cond_hw[0] * cond_hw[1], n_noise), np.float32)
        x["cond_seq_ids"] = grid_ids(*cond_hw, index=1.0)
    return x


@torch.no_grad()
def reference(model, x: dict) -> np.ndarray:
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))
    img, ids = x["img"], x["img_ids"]
    if "img_cond" in x:
        img = np.concatenate([img, x["img_cond"]], -1)
    if "cond_seq" in x:
        img, ids = np.concatenate([img, x["cond_seq"]], 1), np.concatenate([ids, x["cond_seq_ids"]], 0)
    out = model(hidden_states=t(img), encoder_hidden_states=t(x["txt"]), pooled_projections=t(x["y"]),
                timestep=t(x["timesteps"]), img_ids=t(ids), txt_ids=t(x["txt_ids"]), guidance=t(x["guidance"]),
                return_dict=False)[0]
    return out[:, :x["img"].shape[1]].numpy()


def ours(cfg: FluxConfig, params, x: dict, dtype=jnp.float32) -> np.ndarray:
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)
    x = {k: None if v is None else jnp.asarray(v) for k, v in x.items()}
    return np.asarray(jax.jit(Flux(cfg, dtype).apply)({"params": params}, **x), np.float32)


def diffusers_folder(tmp_path, model):
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True, max_shard_size="200KB")
    return tmp_path / "transformer"


TINY_CASES = {
    "dev-square": (TINY, (4, 4), None),
    "schnell-nonsquare": (TINY.replace(guidance_embed=False), (3, 5), None),
    "kontext-tokens": (TINY, (2, 4), (3, 2)),
    "fill-channels": (TINY.replace(in_channels=64 + 64 + 256, out_channels=64), (4, 2), None),
}


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_parity_diffusers_layout(tmp_path, case):
    cfg, hw, cond = TINY_CASES[case]
    model = diffusers_transformer(cfg)
    params, got_cfg = convert_transformer(diffusers_folder(tmp_path, model))
    assert got_cfg == cfg
    x = make_inputs(cfg, *hw, cond_hw=cond)
    err = rel_err(ours(cfg, params, x), reference(model, x))
    assert err <= FP32_TOL, err


@pytest.mark.parametrize("prefix", ["", BFL_PREFIX])
def test_tiny_parity_bfl_layout(tmp_path, prefix):
    cfg = TINY
    model = diffusers_transformer(cfg, seed=1)
    save_file(diffusers_to_bfl(model.state_dict(), cfg, prefix), tmp_path / "flux1-tiny.safetensors")
    params, got_cfg = convert_transformer(tmp_path / "flux1-tiny.safetensors", axes_dim=cfg.axes_dim)
    assert got_cfg == cfg
    x = make_inputs(cfg, 3, 4, cond_hw=(2, 2))
    assert rel_err(ours(cfg, params, x), reference(model, x)) <= FP32_TOL


def test_orbax_round_trip_and_bf16(tmp_path):
    cfg = TINY
    model = diffusers_transformer(cfg, seed=2)
    params, _ = convert_transformer(diffusers_folder(tmp_path, model))
    save_checkpoint(tmp_path / "ckpt", params, {"config": cfg.to_dict()})
    restored, meta = load_checkpoint(tmp_path / "ckpt", stacked=True)
    assert FluxConfig.from_dict(meta["config"]) == cfg
    x = make_inputs(cfg, 4, 3)
    ref = reference(model, x)
    assert rel_err(ours(cfg, restored, x), ref) <= FP32_TOL
    assert rel_err(ours(cfg, restored, x, jnp.bfloat16), ref) <= BF16_TOL


def test_scaled_fractional_ids_match_reference(tmp_path):
    """RoPE takes fractional ids (research on scaled positions): still the reference's function."""
    cfg = TINY
    model = diffusers_transformer(cfg, seed=3)
    params, _ = convert_transformer(diffusers_folder(tmp_path, model))
    x = make_inputs(cfg, 3, 3)
    x["img_ids"] = x["img_ids"] * 0.37
    assert rel_err(ours(cfg, params, x), reference(model, x)) <= FP32_TOL


def test_shape_errors_name_expected_shapes():
    cfg = TINY
    params = jax.eval_shape(lambda: Flux(cfg).init(jax.random.PRNGKey(0), **{
        k: None if v is None else jnp.asarray(v) for k, v in make_inputs(cfg, 2, 2).items()}))
    x = make_inputs(cfg, 2, 2)
    x["img"] = x["img"][..., :10]
    with pytest.raises(ValueError, match=r"img \(\+ img_cond\) must be \(B, L, 64\)"):
        Flux(cfg).apply(params, **x)
    x = make_inputs(cfg, 2, 2)
    x["guidance"] = None
    with pytest.raises(ValueError, match="guidance must be"):
        Flux(cfg).apply(params, **x)


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_real_width_parity(tmp_path, guidance):
    """Real width (24 x 128, context 4096, pooled 768, axes 16/56/56), 1 double + 1 single block."""
    cfg = DEV.replace(depth=1, depth_single_blocks=1, guidance_embed=guidance)
    model = diffusers_transformer(cfg, seed=4)
    if guidance:
        model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
        params, got = convert_transformer(tmp_path / "transformer")
    else:
        save_file(diffusers_to_bfl(model.state_dict(), cfg, BFL_PREFIX), tmp_path / "flux1-schnell.safetensors")
        params, got = convert_transformer(tmp_path / "flux1-schnell.safetensors")
    assert got == cfg
    x = make_inputs(cfg, 6, 10, batch=1, cond_hw=(4, 4) if guidance else None)
    assert rel_err(ours(cfg, params, x), reference(model, x)) <= FP32_TOL


def test_unrolled_layers_match_reference(tmp_path):
    """scan_layers=False (per-layer params, the GPU default of the pipeline) computes the same function."""
    from flux_jax.model import unstack_layers

    cfg = TINY
    model = diffusers_transformer(cfg, seed=6)
    params, _ = convert_transformer(diffusers_folder(tmp_path, model))
    x = make_inputs(cfg, 3, 4, cond_hw=(2, 2))
    got = ours(cfg.replace(scan_layers=False), unstack_layers(params), x)
    assert rel_err(got, reference(model, x)) <= FP32_TOL
