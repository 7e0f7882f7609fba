"""Trainable LoRA adapters on the transformer's Linear layers (rank, alpha, a regex of targets).

Targets are chosen by a regex over per-layer param paths ("double_blocks_3/img_attn/qkv",
"single_blocks_0/linear1", ...), in either model layout; the default adapts what diffusers' and
the usual trainers' FLUX LoRAs adapt: attention qkv and output projections, the MLPs, and the
single blocks' fused linear1 / linear2. A LoRA on a fused layer (qkv, linear1) shares its a
across the parts, which diffusers' files express exactly as one LoRA per part with the same
lora_A (see convert/lora.py). Initialised as PEFT does: a ~ kaiming-uniform, b = 0, so training
starts from the base model.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import lora as adapters
from ..config import FluxConfig
from ..model import STACKS

DEFAULT_TARGETS = r"_attn/(qkv|proj)$|_mlp/(fc1|fc2)$|single_blocks_\d+/linear[12]$"


class LoraError(ValueError):
    """Bad LoRA settings: the message names the problem and the fix."""


def _per_layer_kernels(params: dict) -> dict[str, tuple[int, int]]:
    """{per-layer path: (in, out)} of every Linear, from stacked or per-layer params."""
    out = {}
    for path in adapters.linear_paths(params):
        node = params
        for k in path.split("/"):
            node = node[k]
        shape = node["kernel"].shape
        head, _, rest = path.partition("/")
        if head in STACKS:
            out.update({f"{head}_{i}/{rest}": shape[1:] for i in range(shape[0])})
        else:
            out[path] = shape
    return out


def target_paths(params: dict, targets: str = DEFAULT_TARGETS) -> list[str]:
    """The per-layer Linear paths the regex `targets` selects (an error if none)."""
    paths = adapters.matching(_per_layer_kernels(params), targets)
    if not paths:
        raise LoraError(f"LoRA targets {targets!r} match no Linear layer; paths look like "
                        "'double_blocks_0/img_attn/qkv' or 'single_blocks_3/linear1'")
    return paths


def init_lora(params: dict, cfg: FluxConfig, rank: int, alpha: float | None = None,
              targets: str = DEFAULT_TARGETS, seed: int = 0) -> dict:
    """{"lora": ..., "lora_scale": ...} float32 variables in the layout of `params` (cfg.scan_layers).

    alpha: the LoRA alpha (scale alpha / rank); default rank (scale 1). Layers of a scanned stack
    that `targets` leaves out get a = b = 0, whose gradients are 0: they stay exactly zero.
    """
    if not isinstance(rank, int) or rank < 1:
        raise LoraError(f"--lora-rank must be an integer >= 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    shapes = _per_layer_kernels(params)
    rng = np.random.default_rng(seed)
    layers = {}
    for path in target_paths(params, targets):
        fan_in, fan_out = shapes[path]
        bound = 1 / math.sqrt(fan_in)  # torch's kaiming_uniform_(a=sqrt(5)), PEFT's default for lora_A
        layers[path] = adapters.LoraLayer(rng.uniform(-bound, bound, (fan_in, rank)).astype(np.float32),
                                          np.zeros((rank, fan_out), np.float32), alpha / rank)
    return adapters.mix([(layers, 1.0)], cfg)


def save_lora(variables: dict, cfg: FluxConfig, path: str | Path, targets: str = DEFAULT_TARGETS,
              metadata: dict | None = None) -> Path:
    """Write trained variables as a diffusers/PEFT LoRA file (the targeted layers only)."""
    from convert.lora import write_lora

    layers = adapters.layers_of(variables, cfg)
    keep = set(adapters.matching(layers, targets))
    return write_lora({p: layer for p, layer in layers.items() if p in keep}, path, cfg, metadata=metadata)
