"""Shared helpers for parity tests against the PyTorch reference (diffusers / transformers)."""
from __future__ import annotations

import numpy as np
import torch

from flux_jax.config import FluxConfig


def rel_err(ours, ref) -> float:
    """Relative L2 error ||ours - ref|| / ||ref||, in float64."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref.detach().float().numpy() if isinstance(ref, torch.Tensor) else ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised layers (AdaLN-Zero, biases) matter too."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


@torch.no_grad()
def perturb_constants_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Randomize only params torch initializes to a constant (norm scales 1, biases 0), so each matters.

    Randomly initialized ones keep their init scale: adding a fixed 0.02 to full-width T5's q and k
    would make its attention near one-hot and needlessly ill-conditioned.
    """
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if torch.all(p == p.flatten()[0]):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def diffusers_transformer(cfg: FluxConfig, seed: int = 0):
    """A random-weight diffusers FluxTransformer2DModel with the architecture of `cfg`."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed, axes_dims_rope=cfg.axes_dim)
    return perturb_(model, seed).eval()


def diffusers_to_bfl(sd: dict[str, torch.Tensor], cfg: FluxConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """Re-key a diffusers transformer state dict into BFL's single-file layout (as flux1-dev.safetensors)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def lin(dst, *srcs):
        used.update(f"{s}.{p}" for s in srcs for p in ("weight", "bias"))
        out[f"{prefix}{dst}.weight"] = torch.cat([sd[f"{s}.weight"] for s in srcs]).contiguous()
        out[f"{prefix}{dst}.bias"] = torch.cat([sd[f"{s}.bias"] for s in srcs]).contiguous()

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    emb = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if cfg.guidance_embed:
        emb["guidance_in"] = "guidance_embedder"
    for ours, theirs in emb.items():
        lin(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        lin(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")
    for i in range(cfg.depth):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        lin(f"{d}.img_mod.lin", f"{s}.norm1.linear")
        lin(f"{d}.txt_mod.lin", f"{s}.norm1_context.linear")
        lin(f"{d}.img_attn.qkv", f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v")
        lin(f"{d}.txt_attn.qkv", f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj")
        lin(f"{d}.img_attn.proj", f"{s}.attn.to_out.0")
        lin(f"{d}.txt_attn.proj", f"{s}.attn.to_add_out")
        for stream, ff in (("img", "ff"), ("txt", "ff_context")):
            lin(f"{d}.{stream}_mlp.0", f"{s}.{ff}.net.0.proj")
            lin(f"{d}.{stream}_mlp.2", f"{s}.{ff}.net.2")
        for stream, (q, k) in (("img", ("norm_q", "norm_k")), ("txt", ("norm_added_q", "norm_added_k"))):
            out[f"{prefix}{d}.{stream}_attn.norm.query_norm.scale"] = sd[f"{s}.attn.{q}.weight"]
            out[f"{prefix}{d}.{stream}_attn.norm.key_norm.scale"] = sd[f"{s}.attn.{k}.weight"]
            used.update((f"{s}.attn.{q}.weight", f"{s}.attn.{k}.weight"))
    for i in range(cfg.depth_single_blocks):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        lin(f"{d}.linear1", f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp")
        lin(f"{d}.linear2", f"{s}.proj_out")
        lin(f"{d}.modulation.lin", f"{s}.norm.linear")
        out[f"{prefix}{d}.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        out[f"{prefix}{d}.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
        used.update((f"{s}.attn.norm_q.weight", f"{s}.attn.norm_k.weight"))
    scale, shift = sd["norm_out.linear.weight"].chunk(2), sd["norm_out.linear.bias"].chunk(2)
    out[f"{prefix}final_layer.adaLN_modulation.1.weight"] = torch.cat([scale[1], scale[0]]).contiguous()
    out[f"{prefix}final_layer.adaLN_modulation.1.bias"] = torch.cat([shift[1], shift[0]]).contiguous()
    used.update(("norm_out.linear.weight", "norm_out.linear.bias"))
    lin("final_layer.linear", "proj_out")
    assert used == set(sd), f"diffusers tensors not mapped to BFL: {sorted(set(sd) - used)}"
    return out
