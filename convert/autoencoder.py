"""FLUX VAE weights, diffusers layout (`vae/config.json` + safetensors) -> AutoencoderKL params.

Our module names mirror diffusers' keys, so the rules come from our own param tree:
`encoder/down_blocks_0/resnets_1/conv1/kernel` <- `encoder.down_blocks.0.resnets.1.conv1.weight`.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flux_jax.autoencoder import AutoencoderKL
from flux_jax.config import VAEConfig
from .core import ConversionError, Plan, Reader, Rule, convert, leaves, linear

CONFIG_NAME = "config.json"
SUBFOLDER = "vae"  # where the VAE lives inside a diffusers pipeline folder
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers' AutoencoderKL defaults, for keys a config.json leaves out (diffusers reads it the same way).
DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": [DOWN_BLOCK], "up_block_types": [UP_BLOCK],
    "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4,
    "norm_num_groups": 32, "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None,
    "latents_std": None, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}


def vae_config_from_diffusers(d: dict) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKL config; ConversionError naming every non-FLUX feature."""
    d = {**DIFFUSERS_DEFAULTS, **d}
    chans = list(d["block_out_channels"])
    n = len(chans)
    problems = []
    for key in ("use_quant_conv", "use_post_quant_conv"):
        if d[key]:
            problems.append(f"{key} is true (FLUX's VAE has no {key[4:]})")
    if list(d["down_block_types"]) != [DOWN_BLOCK] * n:
        problems.append(f"down_block_types {d['down_block_types']} (FLUX: {n} x {DOWN_BLOCK})")
    if list(d["up_block_types"]) != [UP_BLOCK] * n:
        problems.append(f"up_block_types {d['up_block_types']} (FLUX: {n} x {UP_BLOCK})")
    if d["act_fn"] != "silu":
        problems.append(f"act_fn {d['act_fn']!r} (FLUX: 'silu')")
    if not d["mid_block_add_attention"]:
        problems.append("mid_block_add_attention is false (FLUX's mid-block has attention)")
    if d["out_channels"] != d["in_channels"]:
        problems.append(f"out_channels {d['out_channels']} != in_channels {d['in_channels']}")
    if any(c % d["norm_num_groups"] for c in chans):
        problems.append(f"norm_num_groups {d['norm_num_groups']} does not divide block_out_channels {chans}")
    if d["latents_mean"] is not None or d["latents_std"] is not None:
        problems.append("latents_mean / latents_std are set (FLUX scales latents by shift_factor and scaling_factor)")
    if problems:
        raise ConversionError("not FLUX's VAE layout: " + "; ".join(problems))
    return VAEConfig(in_channels=d["in_channels"], latent_channels=d["latent_channels"], block_out_channels=chans,
                     layers_per_block=d["layers_per_block"], norm_groups=d["norm_num_groups"],
                     scaling_factor=d["scaling_factor"], shift_factor=d["shift_factor"] or 0.0)


@functools.lru_cache(maxsize=4)
def vae_param_shapes(cfg: VAEConfig) -> dict:
    """Our param tree (without the 'params' level) as ShapeDtypeStructs; nothing is allocated."""
    side = 2 ** (len(cfg.block_out_channels) - 1)  # smallest image the encoder can shrink
    x = jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: AutoencoderKL(cfg).init(jax.random.key(0), x), x)["params"]


def _torch_key(module_path: str) -> str:
    """'encoder/down_blocks_0/to_out_0' -> 'encoder.down_blocks.0.to_out.0': a trailing _N is a list index."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in module_path.split("/"))


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in, kh, kw) -> HWIO (kh, kw, in, out)."""
    return w.transpose(2, 3, 1, 0)


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    """One rule per leaf of our param tree, from the diffusers key of the same name."""
    rules = []
    for path, leaf in leaves(vae_param_shapes(cfg)).items():
        module, name = path.rsplit("/", 1)
        prefix = _torch_key(module)
        if name == "kernel" and len(leaf.shape) == 4:
            rules.append(Rule(path, (f"{prefix}.weight",), _conv_kernel))
        elif name == "kernel":
            rules.append(Rule(path, *linear(prefix)["kernel"]))
        else:  # as is; GroupNorm's weight is our scale
            rules.append(Rule(path, (f"{prefix}.{'weight' if name == 'scale' else name}",)))
    return rules


def plan_vae(src_folder: str | Path) -> Plan:
    """What converting a diffusers VAE folder, or a pipeline folder holding `vae/`, takes."""
    folder = Path(src_folder)
    if (folder / SUBFOLDER / CONFIG_NAME).is_file():
        folder = folder / SUBFOLDER
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise ConversionError(f"{folder}: no {CONFIG_NAME}; expected a diffusers VAE folder (or one holding vae/)")
    cfg = vae_config_from_diffusers(json.loads(config_file.read_text()))
    return Plan(Reader(folder), vae_rules(cfg), vae_param_shapes(cfg), cfg)


def convert_vae(src_folder, dtype=None, progress: bool = False) -> tuple[dict, VAEConfig]:
    """(params, config) from a diffusers VAE folder, or a pipeline folder holding `vae/`.

    dtype: params dtype (e.g. jnp.bfloat16); None keeps the file's.
    """
    plan = plan_vae(src_folder)
    return convert(plan.reader, plan.rules, plan.target, dtype, plan.ignore, progress), plan.config
