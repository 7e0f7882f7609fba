"""FLUX transformer weights, diffusers or BFL layout -> our param tree (fused qkv, fused linear1).

Both sources map into one layout: BFL's names with q, k, v fused (fewer, larger matmuls).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from flux_jax.config import FluxConfig
from .core import ConversionError, Plan, Reader, Rule, convert

BFL_PREFIX = "model.diffusion_model."
DEFAULT_AXES = {128: (16, 56, 56)}  # head dim -> RoPE axes of every published FLUX.1
FILL_IN_CHANNELS = 384


def _cat(*ws: np.ndarray) -> np.ndarray:
    """Concatenate along outputs; a single tensor comes back as is (a lazy file view stays lazy)."""
    return ws[0] if len(ws) == 1 else np.concatenate(ws, axis=0)


def _swap_halves(w: np.ndarray) -> np.ndarray:
    """diffusers' norm_out emits [scale, shift]; ours (BFL's) is [shift, scale]."""
    a, b = np.split(w, 2, axis=0)
    return np.concatenate([b, a], axis=0)


def _linear(dst: str, src: str | list[str], layer: Optional[int] = None, fn=None) -> list[Rule]:
    """Rules for one Linear, from one torch Linear or several concatenated along outputs."""
    srcs = [src] if isinstance(src, str) else src
    fn = fn or (lambda x: x)
    return [Rule(f"{dst}/kernel", tuple(f"{s}.weight" for s in srcs), lambda *w: fn(_cat(*w)).T, layer),
            Rule(f"{dst}/bias", tuple(f"{s}.bias" for s in srcs), lambda *b: fn(_cat(*b)), layer)]


def _qk_norm(dst: str, q: str, k: str, layer: int) -> list[Rule]:
    return [Rule(f"{dst}/query_norm/scale", (q,), layer=layer), Rule(f"{dst}/key_norm/scale", (k,), layer=layer)]


def _embedders(names: dict[str, tuple[str, str, str]], cfg: FluxConfig) -> list[Rule]:
    rules = []
    for ours, (src, first, second) in names.items():
        if ours == "guidance_in" and not cfg.guidance_embed:
            continue
        rules += _linear(f"{ours}/in_layer", f"{src}.{first}") + _linear(f"{ours}/out_layer", f"{src}.{second}")
    return rules


def diffusers_rules(cfg: FluxConfig) -> list[Rule]:
    rules = _linear("img_in", "x_embedder") + _linear("txt_in", "context_embedder")
    rules += _embedders({"time_in": ("time_text_embed.timestep_embedder", "linear_1", "linear_2"),
                         "guidance_in": ("time_text_embed.guidance_embedder", "linear_1", "linear_2"),
                         "vector_in": ("time_text_embed.text_embedder", "linear_1", "linear_2")}, cfg)
    for i in range(cfg.depth):
        p, d = f"transformer_blocks.{i}", "double_blocks"
        for stream, mod, qkv, norms, out, ff in (
                ("img", "norm1", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0", "ff"),
                ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"),
                 ("norm_added_q", "norm_added_k"), "to_add_out", "ff_context")):
            rules += _linear(f"{d}/{stream}_mod/lin", f"{p}.{mod}.linear", i)
            rules += _linear(f"{d}/{stream}_attn/qkv", [f"{p}.attn.{n}" for n in qkv], i)
            rules += _qk_norm(f"{d}/{stream}_attn/norm", *(f"{p}.attn.{n}.weight" for n in norms), i)
            rules += _linear(f"{d}/{stream}_attn/proj", f"{p}.attn.{out}", i)
            rules += _linear(f"{d}/{stream}_mlp/fc1", f"{p}.{ff}.net.0.proj", i)
            rules += _linear(f"{d}/{stream}_mlp/fc2", f"{p}.{ff}.net.2", i)
    for i in range(cfg.depth_single_blocks):
        p, d = f"single_transformer_blocks.{i}", "single_blocks"
        rules += _linear(f"{d}/modulation/lin", f"{p}.norm.linear", i)
        rules += _linear(f"{d}/linear1", [f"{p}.attn.to_q", f"{p}.attn.to_k", f"{p}.attn.to_v", f"{p}.proj_mlp"], i)
        rules += _qk_norm(f"{d}/norm", f"{p}.attn.norm_q.weight", f"{p}.attn.norm_k.weight", i)
        rules += _linear(f"{d}/linear2", f"{p}.proj_out", i)
    rules += _linear("final_modulation/lin", "norm_out.linear", fn=_swap_halves)
    rules += _linear("final_linear", "proj_out")
    return rules


def bfl_rules(cfg: FluxConfig, prefix: str = "") -> list[Rule]:
    names = {"img_in": "img_in", "txt_in": "txt_in", "final_linear": "final_layer.linear",
             "final_modulation/lin": "final_layer.adaLN_modulation.1"}
    rules = [r for ours, src in names.items() for r in _linear(ours, prefix + src)]
    rules += _embedders({n: (prefix + n, "in_layer", "out_layer") for n in ("time_in", "guidance_in", "vector_in")},
                        cfg)
    for i in range(cfg.depth):
        p, d = f"{prefix}double_blocks.{i}", "double_blocks"
        for s in ("img", "txt"):
            rules += _linear(f"{d}/{s}_mod/lin", f"{p}.{s}_mod.lin", i)
            rules += _linear(f"{d}/{s}_attn/qkv", f"{p}.{s}_attn.qkv", i)
            rules += _qk_norm(f"{d}/{s}_attn/norm", f"{p}.{s}_attn.norm.query_norm.scale",
                              f"{p}.{s}_attn.norm.key_norm.scale", i)
            rules += _linear(f"{d}/{s}_attn/proj", f"{p}.{s}_attn.proj", i)
            rules += _linear(f"{d}/{s}_mlp/fc1", f"{p}.{s}_mlp.0", i)
            rules += _linear(f"{d}/{s}_mlp/fc2", f"{p}.{s}_mlp.2", i)
    for i in range(cfg.depth_single_blocks):
        p, d = f"{prefix}single_blocks.{i}", "single_blocks"
        rules += _linear(f"{d}/modulation/lin", f"{p}.modulation.lin", i)
        rules += _linear(f"{d}/linear1", f"{p}.linear1", i)
        rules += _qk_norm(f"{d}/norm", f"{p}.norm.query_norm.scale", f"{p}.norm.key_norm.scale", i)
        rules += _linear(f"{d}/linear2", f"{p}.linear2", i)
    return rules


def config_from_diffusers(d: dict) -> FluxConfig:
    if d.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
        raise ConversionError(f"expected a FluxTransformer2DModel config, got {d.get('_class_name')!r}")
    heads, head_dim = d.get("num_attention_heads", 24), d.get("attention_head_dim", 128)
    return FluxConfig(
        in_channels=d.get("in_channels", 64), out_channels=d.get("out_channels") or d.get("in_channels", 64),
        hidden_size=heads * head_dim, num_heads=heads, depth=d.get("num_layers", 19),
        depth_single_blocks=d.get("num_single_layers", 38), context_in_dim=d.get("joint_attention_dim", 4096),
        vec_in_dim=d.get("pooled_projection_dim", 768), axes_dim=tuple(d.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=d.get("guidance_embeds", False))


def _count(keys: list[str], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def config_from_bfl(reader: Reader, prefix: str, axes_dim=None) -> FluxConfig:
    """Read the architecture off the tensors' names and shapes (BFL files carry no config)."""
    need = [f"{prefix}img_in.weight", f"{prefix}txt_in.weight", f"{prefix}vector_in.in_layer.weight",
            f"{prefix}double_blocks.0.img_attn.norm.query_norm.scale", f"{prefix}double_blocks.0.img_mlp.0.weight"]
    missing = [k for k in need if k not in reader]
    if missing:
        raise ConversionError(f"{reader.path}: not a FLUX transformer checkpoint: missing {missing}")
    hidden, in_ch = reader.shape(need[0])
    head_dim = reader.shape(need[3])[0]
    axes_dim = axes_dim or DEFAULT_AXES.get(head_dim)
    if axes_dim is None:
        raise ConversionError(f"{reader.path}: head dim {head_dim} has no known RoPE axes; pass axes_dim")
    keys = reader.keys()
    return FluxConfig(
        in_channels=in_ch, out_channels=reader.shape(f"{prefix}final_layer.linear.weight")[0],
        hidden_size=hidden, num_heads=hidden // head_dim, mlp_ratio=reader.shape(need[4])[0] / hidden,
        depth=_count(keys, f"{prefix}double_blocks."), depth_single_blocks=_count(keys, f"{prefix}single_blocks."),
        context_in_dim=reader.shape(need[1])[1], vec_in_dim=reader.shape(need[2])[1], axes_dim=tuple(axes_dim),
        guidance_embed=f"{prefix}guidance_in.in_layer.weight" in reader)


def variant(cfg: FluxConfig) -> str:
    if cfg.in_channels == FILL_IN_CHANNELS:
        return "fill"
    return "dev" if cfg.guidance_embed else "schnell"


def plan_transformer(src: str | Path, axes_dim=None) -> Plan:
    """What converting a diffusers `transformer/` folder or a BFL single `.safetensors` file takes.

    axes_dim: RoPE axes, needed only for a BFL file of a non-standard head width.
    """
    from flux_jax.model import param_shapes

    src = Path(src)
    reader = Reader(src)
    if src.is_dir():
        cfg_file = src / "config.json"
        if not cfg_file.is_file():
            raise ConversionError(f"{src}: no config.json; is this a diffusers transformer/ folder?")
        cfg = config_from_diffusers(json.loads(cfg_file.read_text()))
        rules = diffusers_rules(cfg)
    else:
        prefix = BFL_PREFIX if any(k.startswith(BFL_PREFIX) for k in reader.keys()) else ""
        cfg = config_from_bfl(reader, prefix, axes_dim)
        rules = bfl_rules(cfg, prefix)
    return Plan(reader, rules, param_shapes(cfg), cfg)


def convert_transformer(src: str | Path, dtype=None, axes_dim=None, progress: bool = False) -> tuple[dict, FluxConfig]:
    """(numpy params, stacked; config) from a diffusers `transformer/` folder or a BFL single `.safetensors` file.

    axes_dim: RoPE axes, needed only for a BFL file of a non-standard head width.
    """
    plan = plan_transformer(src, axes_dim)
    return convert(plan.reader, plan.rules, plan.target, dtype, plan.ignore, progress), plan.config
