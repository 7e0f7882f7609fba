"""Parity of flux_jax.autoencoder.AutoencoderKL with diffusers' AutoencoderKL (FLUX layout) on random weights."""
from __future__ import annotations

import functools
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from convert import component_stream
from convert.autoencoder import CONFIG_NAME, convert_vae, vae_config_from_diffusers
from convert.core import ConversionError, leaves, load_checkpoint, save_checkpoint, unflatten
from flux_jax.autoencoder import NORM_EPS, AutoencoderKL, GroupNorm, scale_latents, unscale_latents
from flux_jax.config import VAE_DOWNSAMPLE, VAEConfig
from torch_ref import perturb_, rel_err

FP32_TOL = 1e-5
# diffusers' own bf16 run of the tiny net is 2.1-2.3% off its fp32 output (on CPU and on an H100): the random,
# untrained net amplifies rounding. At real widths on an H100 our bf16 is 1.4-1.7% off fp32.
BF16_TOL = 3e-2
GN_OFFSET, GN_BF16_TOL = 30.0, 1e-2  # bf16 output rounding alone is ~0.3%
MIN_EFFECT = 1e-3  # a wrong weight must move the output at least this much (relative)
TINY_WIDTHS, TINY_GROUPS = (32, 32, 64, 64), 8
REAL_WIDTHS, REAL_GROUPS = (128, 256, 512, 512), 32
IMAGE_HW = (64, 96)  # non-square, so a transposed H/W shows
REAL_IMAGE_HW = (32, 48)
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# vae/config.json of black-forest-labs/FLUX.1-dev, as published.
FLUX_DEV_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 16,
    "latents_mean": None, "latents_std": None, "layers_per_block": 2, "mid_block_add_attention": True,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def diffusers_vae(widths: tuple[int, ...], groups: int, seed: int = 0) -> diffusers.AutoencoderKL:
    """A random-weight diffusers AutoencoderKL with FLUX's structure at the given widths."""
    torch.manual_seed(seed)
    n = len(widths)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=widths, layers_per_block=2,
        latent_channels=16, norm_num_groups=groups, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False)
    return perturb_(vae, seed).eval()


def saved_and_converted(vae, folder) -> tuple[dict, VAEConfig]:
    vae.save_pretrained(folder, safe_serialization=True)
    return convert_vae(folder)


@functools.cache  # one compile per (config, dtype); dtype has no default, so the cache key is always the same
def jax_fns(cfg: VAEConfig, dtype):
    """Jitted (encode, decode) taking (params, array)."""
    model = AutoencoderKL(cfg, dtype)
    return tuple(jax.jit(lambda p, x, m=m: model.apply({"params": p}, x, method=m))
                 for m in (AutoencoderKL.encode, AutoencoderKL.decode))


def images(hw, batch=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, *hw, 3)).astype(np.float32)


def latents(hw, batch=2, seed=1) -> np.ndarray:
    h, w = (s // VAE_DOWNSAMPLE for s in hw)
    return np.random.default_rng(seed).normal(size=(batch, h, w, 16)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@torch.no_grad()
def torch_encode(vae, x: np.ndarray) -> np.ndarray:
    return vae.encode(nchw(x)).latent_dist.mean.numpy().transpose(0, 2, 3, 1)


@torch.no_grad()
def torch_decode(vae, z: np.ndarray) -> np.ndarray:
    return vae.decode(nchw(z)).sample.numpy().transpose(0, 2, 3, 1)


def check_parity(vae, params, cfg, hw, tol, dtype=jnp.float32, batch=2) -> tuple[float, float]:
    encode, decode = jax_fns(cfg, dtype)
    x, z = images(hw, batch), latents(hw, batch)
    errs = (rel_err(np.asarray(encode(params, x), np.float32), torch_encode(vae, x)),
            rel_err(np.asarray(decode(params, z), np.float32), torch_decode(vae, z)))
    print(f"rel L2 encode {errs[0]:.2e} decode {errs[1]:.2e}")
    assert max(errs) <= tol, errs
    return errs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch vae, its diffusers folder, our params, config)."""
    vae = diffusers_vae(TINY_WIDTHS, TINY_GROUPS)
    folder = tmp_path_factory.mktemp("tiny_vae")
    return (vae, folder, *saved_and_converted(vae, folder))


def test_tiny_parity(tiny):
    vae, _, params, cfg = tiny
    assert cfg == VAEConfig(block_out_channels=TINY_WIDTHS, norm_groups=TINY_GROUPS)
    check_parity(vae, params, cfg, IMAGE_HW, FP32_TOL)


def test_bf16_params(tiny):
    vae, folder, _, _ = tiny
    params, cfg = convert_vae(folder, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in leaves(params).values())
    encode, _ = jax_fns(cfg, jnp.bfloat16)
    assert encode(params, images(IMAGE_HW)).dtype == jnp.bfloat16
    check_parity(vae, params, cfg, IMAGE_HW, BF16_TOL, jnp.bfloat16)


@pytest.mark.parametrize("leaf", ["encoder/mid_block/attentions_0/to_q/kernel",
                                  "decoder/mid_block/attentions_0/to_k/kernel"])
def test_parity_check_catches_a_wrong_weight(tiny, leaf):
    """Negative control: the attention logits are not washed out, so the parity tests can fail."""
    _, _, params, cfg = tiny
    flat = leaves(params)
    wrong = {**flat, leaf: flat[leaf] * 1.5}
    fn = jax_fns(cfg, jnp.float32)[0 if leaf.startswith("encoder") else 1]
    x = images(IMAGE_HW) if leaf.startswith("encoder") else latents(IMAGE_HW)
    assert rel_err(fn(unflatten(wrong), x), np.asarray(fn(params, x))) > MIN_EFFECT


def test_group_norm_statistics_are_float32():
    """An offset large against the spread: statistics taken in bf16 lose the spread, float32 ones keep it."""
    x = (GN_OFFSET + np.random.default_rng(0).normal(size=(2, 8, 12, 32))).astype(jnp.bfloat16)
    norm = GroupNorm(TINY_GROUPS, jnp.bfloat16)
    got = norm.apply(norm.init(jax.random.key(0), x), x)
    assert got.dtype == jnp.bfloat16
    ref = torch.nn.functional.group_norm(nchw(x.astype(np.float64)), TINY_GROUPS, eps=NORM_EPS)
    assert rel_err(np.asarray(got, np.float32), ref.numpy().transpose(0, 2, 3, 1)) <= GN_BF16_TOL


def test_checkpoint_round_trip(tiny, tmp_path):
    _, _, params, cfg = tiny
    save_checkpoint(tmp_path / "ckpt", params, cfg.to_dict())
    loaded, config = load_checkpoint(tmp_path / "ckpt")
    assert VAEConfig.from_dict(config) == cfg
    ours, back = leaves(params), leaves(loaded)
    assert ours.keys() == back.keys()
    for k in ours:
        np.testing.assert_array_equal(back[k], ours[k], err_msg=k)


def rewritten(src, dst, edit) -> None:
    """Copy the diffusers folder src to dst with its tensors changed by edit(dict)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, dst / WEIGHTS_FILE)


def test_missing_tensor_is_named(tiny, tmp_path):
    key = "decoder.mid_block.attentions.0.to_k.weight"
    rewritten(tiny[1], tmp_path / "bad", lambda t: t.pop(key))
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        convert_vae(tmp_path / "bad")


def test_extra_tensor_is_named(tiny, tmp_path):
    """quant_conv weights with a config that says there is none: unused, so refused."""
    rewritten(tiny[1], tmp_path / "bad", lambda t: t.update({"quant_conv.weight": np.ones((32, 32, 1, 1), np.float32)}))
    with pytest.raises(ConversionError, match=r"unused.*quant_conv\.weight"):
        convert_vae(tmp_path / "bad")


def test_pipeline_folder_is_accepted(tiny, tmp_path):
    shutil.copytree(tiny[1], tmp_path / "vae")
    assert convert_vae(tmp_path)[1] == tiny[3]


def test_streamed_pieces_are_lazy_and_match(tiny):
    """The CLI streams pieces: conv kernels (a transpose) and norms (as is) stay views of the file."""
    _, _, pieces = component_stream("vae", tiny[1])
    ours = leaves(tiny[2])
    got = dict(pieces)
    assert got.keys() == ours.keys()
    for k, v in got.items():
        assert isinstance(v, np.memmap), k
        np.testing.assert_array_equal(v, ours[k], err_msg=k)


def test_flux_dev_config():
    assert vae_config_from_diffusers(FLUX_DEV_CONFIG) == VAEConfig()


@pytest.mark.parametrize("change, problem", [
    ({"use_quant_conv": True}, "use_quant_conv"),
    ({"use_post_quant_conv": True}, "use_post_quant_conv"),
    ({"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention"),
    ({"norm_num_groups": 24}, "norm_num_groups"),
    ({"latents_mean": [0.0] * 16}, "latents_mean"),
])
def test_non_flux_config_is_refused(change, problem):
    with pytest.raises(ConversionError, match=problem):
        vae_config_from_diffusers({**FLUX_DEV_CONFIG, **change})


def test_missing_config_is_refused(tmp_path):
    with pytest.raises(ConversionError, match=CONFIG_NAME):
        convert_vae(tmp_path)


def test_latent_scaling_round_trip():
    cfg = VAEConfig()
    z = latents(IMAGE_HW)
    np.testing.assert_allclose(scale_latents(z, cfg), (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(scale_latents(z, cfg), cfg), z, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_real_width_parity(tmp_path):
    """FLUX's real channel widths and groups (84M params) at a small non-square image."""
    vae = diffusers_vae(REAL_WIDTHS, REAL_GROUPS)
    params, cfg = saved_and_converted(vae, tmp_path)
    assert cfg == VAEConfig()
    check_parity(vae, params, cfg, REAL_IMAGE_HW, FP32_TOL, batch=1)
