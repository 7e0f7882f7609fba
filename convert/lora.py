"""LoRA files <-> flux-jax adapters ({our Linear path: LoraLayer}, see flux_jax/lora.py).

    adapter = read_lora("style.safetensors", cfg)     # diffusers/PEFT, kohya, OneTrainer, ComfyUI or XLabs keys
    write_lora(adapter, "out.safetensors", cfg)       # loads in diffusers' FluxPipeline.load_lora_weights

Which module of a file feeds which rows of which of our Linear layers comes from the layout tables
(convert/lora_layouts.py), themselves read off the converter's rules: our transformer fuses q, k, v
(and single blocks' MLP input) into one Linear, so a LoRA on part of a fused layer (diffusers'
to_q) becomes a LoRA on the fused layer whose b is zero outside that part's rows; parts with
independent A's stack their ranks (a = [A_q; A_k; ...], b block-structured). Exact: the fused
layer's output is the parts'. Files are written in diffusers' layout only.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from flux_jax.config import DEV, FluxConfig
from flux_jax.lora import Adapter, LoraLayer
from .core import Reader
from .lora_layouts import (ADAPTER_METADATA, LAYOUTS, LORA_A, LORA_B, MAX_LISTED, TEXT_ENCODER_KEY, WRITE_PREFIX,
                           Layout, LoraError, Part, Target, detect_layout, diffusers_targets, listing, place)

__all__ = ["LAYOUTS", "MAX_LISTED", "Layout", "LoraError", "Part", "Target", "check_lora", "diffusers_state_dict",
           "diffusers_targets", "open_source", "read_lora", "write_lora"]
# Files a LoRA folder may hold: diffusers' save_lora_weights, PEFT's save_pretrained (+ its config).
FOLDER_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
PEFT_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------------------------------------
# Sources: a file, a folder, or an in-memory state dict


@dataclasses.dataclass
class Source:
    """Tensors by name (read on demand, as float32) plus the file's metadata."""
    name: str
    shapes: dict[str, tuple[int, ...]]
    get: Callable[[str], np.ndarray]
    metadata: dict[str, str]
    config: Optional[dict] = None  # PEFT's adapter_config.json, when read from a PEFT folder


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not needed otherwise
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def _file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:  # header only: bf16 tensors need not be decodable
        return dict(f.metadata() or {})


def open_source(source: str | os.PathLike | Mapping[str, Any]) -> Source:
    """A LoRA `.safetensors` file, a folder holding one (diffusers' or PEFT's), or a state dict."""
    if isinstance(source, Mapping):
        tensors = dict(source)
        return Source("state dict", {k: tuple(np.shape(v)) for k, v in tensors.items()},
                      lambda k: _to_numpy(tensors[k]), {})
    path, config = Path(source), None
    if path.is_dir():
        found = [path / f for f in FOLDER_FILES if (path / f).is_file()]
        if not found:
            raise LoraError(f"{path}: no LoRA weights in this folder (looked for {', '.join(FOLDER_FILES)})")
        if (path / PEFT_CONFIG).is_file():
            try:
                config = json.loads((path / PEFT_CONFIG).read_text())
            except (OSError, ValueError) as e:
                raise LoraError(f"{path / PEFT_CONFIG}: unreadable ({e})") from None
        path = found[0]
    elif not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    try:
        reader = Reader(path)
        metadata = _file_metadata(path)
    except Exception as e:  # ConversionError, OSError, or safetensors' own error types
        raise LoraError(f"{path}: not a readable .safetensors LoRA file ({e})") from None
    return Source(str(path), {k: reader.shape(k) for k in reader.keys()},
                  lambda k: np.asarray(reader.get(k), np.float32), metadata, config)


# ---------------------------------------------------------------------------------------------
# Reading


Placed = dict  # {module as the file spells it: (our Target, its rows there)}


def _group(source: Source, cfg: FluxConfig) -> tuple[Layout, dict[str, dict[str, str]], list[str]]:
    """(layout, {module: {"A": key, "B": key, "alpha"?: key}}, text-encoder keys), every other key
    accounted for (else LoraError)."""
    text_encoder = sorted(k for k in source.shapes if TEXT_ENCODER_KEY.match(k))
    keys = [k for k in source.shapes if not TEXT_ENCODER_KEY.match(k)]
    if text_encoder and not keys:
        raise LoraError(f"{source.name}: only text-encoder LoRA keys ({listing(text_encoder)}); flux-jax applies "
                        f"LoRAs to the transformer only")
    layout = detect_layout(keys, source.name, cfg)
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        parsed = layout.parse(key, cfg)
        if parsed is None:
            unknown.append(key)
        else:
            groups.setdefault(parsed[0], {})[parsed[1]] = key
    if unknown:
        raise LoraError(f"{source.name}: {len(unknown)} key(s) that are not LoRA weights of a FLUX transformer "
                        f"Linear layer in the {layout.name} layout: {listing(sorted(unknown))}")
    incomplete = sorted(m for m, g in groups.items() if not {"A", "B"} <= set(g))
    if incomplete:
        raise LoraError(f"{source.name}: modules without both {layout.factors}: {listing(incomplete)}")
    return layout, groups, text_encoder


def _check_shapes(source: Source, groups: dict, placed: Placed) -> None:
    problems = []
    for module, keys in groups.items():
        target, rows = placed[module]
        a, b = source.shapes[keys["A"]], source.shapes[keys["B"]]
        want_in, want_out = target.in_dim, len(rows)
        if len(a) != 2 or len(b) != 2 or a[1] != want_in or b[0] != want_out or a[0] != b[1]:
            problems.append(f"{module}: A {a}, B {b} (want (r, {want_in}), ({want_out}, r))")
        if "alpha" in keys and math.prod(source.shapes[keys["alpha"]]) != 1:
            problems.append(f"{module}: alpha {source.shapes[keys['alpha']]} (want one number)")
    if problems:
        raise LoraError(f"{source.name}: LoRA shapes do not fit this model (a LoRA for another FLUX size?): "
                        f"{listing(sorted(problems))}")


def check_lora(source: str | os.PathLike | Mapping[str, Any], cfg: FluxConfig = DEV) -> None:
    """Raise LoraError unless `source` is a LoRA in a known layout whose every key names a FLUX
    transformer Linear layer (or a text encoder's: read_lora warns of those). Reads only the header
    (no tensors, no model traced); shapes are checked by read_lora."""
    src = open_source(source)
    _group(src, cfg)


def read_lora(source: str | os.PathLike | Mapping[str, Any], cfg: FluxConfig = DEV) -> Adapter:
    """A LoRA file (or folder, or state dict) -> Adapter over our Linear layers of the model `cfg`.

    cfg: the model's config (the pipelines pass theirs); the default, FLUX.1-dev's, has the widths
    and depths of every published FLUX.1 transformer. Keys: any of LAYOUTS. A LoRA on parts of a
    fused layer becomes one LoRA on that layer (ranks stacked, b zero outside each part's rows).
    Text-encoder LoRA keys (kohya's lora_te1_..., ComfyUI's text_encoders....) are left out with a
    warning: we adapt the transformer only, so the images differ from diffusers', which adapts CLIP too.
    """
    src = open_source(source)
    layout, groups, text_encoder = _group(src, cfg)
    if text_encoder:
        warnings.warn(f"{src.name}: {len(text_encoder)} text-encoder LoRA key(s) left out ({listing(text_encoder)}): "
                      f"flux-jax applies LoRAs to the transformer only, so images differ from tools that also "
                      f"adapt the text encoders (diffusers, ComfyUI)", stacklevel=2)
    placed: Placed = {m: place(layout.modules(cfg)[m], cfg) for m in groups}
    _check_shapes(src, groups, placed)
    scales = layout.scales(src, groups)
    by_target: dict[str, list[str]] = {}
    for module in sorted(groups, key=lambda m: placed[m][1][0]):  # in row order: a deterministic rank order
        by_target.setdefault(placed[module][0].path, []).append(module)
    adapter: Adapter = {}
    for path, modules in by_target.items():
        uniform = len({scales[m] for m in modules}) == 1
        a_cols, b_rows = [], []
        for module in modules:
            target, rows = placed[module]
            a_part, b_part = src.get(groups[module]["A"]), src.get(groups[module]["B"])  # (r, in), (out_i, r)
            b = np.zeros((a_part.shape[0], target.out_dim), np.float32)
            b[:, rows] = b_part.T * (1.0 if uniform else scales[module])
            a_cols.append(a_part.T)
            b_rows.append(b)
        adapter[path] = LoraLayer(np.concatenate(a_cols, axis=1), np.concatenate(b_rows, axis=0),
                                  scales[modules[0]] if uniform else 1.0)
    return adapter


# ---------------------------------------------------------------------------------------------
# Writing


def diffusers_state_dict(adapter: Adapter, cfg: FluxConfig = DEV, dtype=np.float32) -> dict[str, np.ndarray]:
    """An Adapter as diffusers/PEFT tensors ("transformer.<module>.lora_A.weight" (r, in), lora_B (out, r)).

    A fused layer's shared a is written once per part, each part's lora_B its rows of b; the
    layer's scale is folded into lora_B (diffusers takes alpha = rank: scale 1).
    """
    targets = diffusers_targets(cfg)
    unknown = sorted(p for p in adapter if p not in targets)
    if unknown:
        raise LoraError(f"adapter layers that are not Linear layers of this model: {listing(unknown)}")
    out = {}
    for path, layer in sorted(adapter.items()):
        target = targets[path]
        a, b = np.asarray(layer.a, np.float32), np.asarray(layer.b, np.float32) * np.float32(layer.scale)
        if a.ndim != 2 or b.shape != (a.shape[1], target.out_dim) or a.shape[0] != target.in_dim:
            raise LoraError(f"adapter layer {path}: a {a.shape}, b {b.shape} do not fit the model "
                            f"(want ({target.in_dim}, r), (r, {target.out_dim})); pass the model's cfg")
        for part in target.parts:
            out[f"{WRITE_PREFIX}{part.module}.{LORA_A}"] = np.ascontiguousarray(a.T, dtype)
            out[f"{WRITE_PREFIX}{part.module}.{LORA_B}"] = np.ascontiguousarray(b[:, part.rows].T, dtype)
    return out


def write_lora(adapter: Adapter, path: str | os.PathLike, cfg: FluxConfig = DEV,
               metadata: Optional[dict[str, str]] = None, dtype=np.float32) -> Path:
    """Write `adapter` as a diffusers LoRA file (see diffusers_state_dict), atomically; returns the path.

    metadata: extra string entries for the safetensors header (e.g. how it was trained).
    """
    from safetensors.numpy import save

    metadata = dict(metadata or {})
    if ADAPTER_METADATA in metadata:
        raise LoraError(f"metadata key {ADAPTER_METADATA!r} is diffusers' LoraConfig: scales are folded into "
                        f"lora_B, so the file must not carry one")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise LoraError(f"metadata must map strings to strings; not: {listing([repr(k) for k in bad])}")
    data = save(diffusers_state_dict(adapter, cfg, dtype), metadata={"format": "pt", **metadata})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a weights file gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
