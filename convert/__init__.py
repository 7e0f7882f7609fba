"""PyTorch safetensors (diffusers or BFL layouts) -> flux-jax param trees -> Orbax checkpoints.

`convert_to_checkpoint(src, dst)` converts once, streaming tensor by tensor (a 24 GB transformer
in a few GB of RAM); `load_component(path)` loads it back fast, onto devices if given shardings.
`component_stream` hands out the converted tensors one by one, for a caller that places them itself.
With `quantize` (flux_jax/quantize.py), the transformer's and T5's block kernels are saved quantized,
tensor by tensor as they stream; the folder's config names the mode.
"""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from flux_jax import quantize as qz
from flux_jax.config import CLIPConfig, FluxConfig, T5Config, VAEConfig, parse_dtype
from .core import (CONFIG_FILE, ConversionError, Piece, Plan, atomic_dir, convert, is_checkpoint, load_checkpoint,
                   materialize, piece_shapes, save_params, stream)

# component folder -> (module, planner function, config class); planners take (src, **kw) and return a Plan
COMPONENTS = {
    "transformer": ("convert.transformer", "plan_transformer", FluxConfig),
    "text_encoder": ("convert.text_encoders", "plan_clip", CLIPConfig),
    "text_encoder_2": ("convert.text_encoders", "plan_t5", T5Config),
    "vae": ("convert.autoencoder", "plan_vae", VAEConfig),
}
# diffusers classes (config.json `_class_name` or `architectures`) -> component
CLASSES = {"FluxTransformer2DModel": "transformer", "CLIPTextModel": "text_encoder",
           "T5EncoderModel": "text_encoder_2", "AutoencoderKL": "vae"}
COPIED = ("tokenizer", "tokenizer_2", "scheduler")  # small folders used as they are
MODEL_INDEX = "model_index.json"
QUANTIZE_KEY = "quantize"  # in a component's config json: the mode its kernels were saved in

__all__ = ["ConversionError", "component_stream", "convert_component", "convert_to_checkpoint", "load_component",
           "detect", "is_converted", "stored_paths", "stored_quantization"]


def detect(src: str | Path) -> str:
    """'pipeline', or the component name of a single-model folder / BFL file."""
    src = Path(src)
    if src.is_file():
        return "transformer"  # BFL single file (flux1-dev.safetensors & co.)
    if (src / MODEL_INDEX).is_file():
        return "pipeline"
    cfg = src / "config.json"
    if not cfg.is_file():
        raise ConversionError(f"{src}: neither a .safetensors file nor a folder with config.json or {MODEL_INDEX}")
    d = json.loads(cfg.read_text())
    names = [d.get("_class_name")] + list(d.get("architectures") or [])
    for name in names:
        if name in CLASSES:
            return CLASSES[name]
    raise ConversionError(f"{src}: unsupported model class {names}; expected one of {sorted(CLASSES)}")


def _plan(name: str, src: str | Path, **kw) -> Plan:
    if name not in COMPONENTS:
        raise ConversionError(f"unknown component {name!r}; expected one of {sorted(COMPONENTS)}")
    module, fn, _ = COMPONENTS[name]
    return getattr(importlib.import_module(module), fn)(src, **kw)


def component_stream(name: str, src: str | Path, dtype: Any = None, progress: bool = False,
                     **kw) -> tuple[Any, dict, Iterator[Piece]]:
    """(config, target shapes, pieces) of one component: a diffusers component folder or a BFL file.

    Every name is checked before this returns (ConversionError listing all problems); shapes are
    checked as pieces come, and the iterator raises after its last piece if any was wrong.
    target shapes: the STACKED param tree as jax.ShapeDtypeStructs, in the dtype the pieces come in.
    pieces: per-layer paths (`double_blocks_3/...`). dtype None (preferred) keeps the source dtype
    and identity/transpose tensors as lazy file views, so a consumer reading `value[idx]` reads only
    those pages and casts only its slice; a dtype casts each piece whole as it comes.
    kw: for the component's planner, e.g. axes_dim for a BFL file of a non-standard head width.
    """
    plan = _plan(name, src, **kw)
    dtype = parse_dtype(dtype)
    pieces = stream(plan.reader, plan.rules, plan.target, plan.ignore, progress)
    if dtype is not None:
        pieces = (Piece(path, materialize(value, dtype)) for path, value in pieces)
    return plan.config, piece_shapes(plan, dtype), pieces


def convert_component(name: str, src: str | Path, dtype: Any = None, progress: bool = False,
                      **kw) -> tuple[dict, Any]:
    """(numpy params in the stacked layout, config) of one component, converted in memory."""
    plan = _plan(name, src, **kw)
    return convert(plan.reader, plan.rules, plan.target, parse_dtype(dtype), plan.ignore, progress), plan.config


def _write_component(folder: Path, name: str, component: tuple[Any, dict, Iterator[Piece]], dtype,
                     quantize: str | None = None) -> None:
    """Stream one component's pieces (from component_stream) into a checkpoint in `folder`, cast as
    written (float params only); with `quantize`, its target kernels are quantized one by one first."""
    cfg, _, pieces = component
    meta = {"component": name, "config": cfg.to_dict()}
    if name == "transformer":
        from .transformer import variant
        meta["variant"] = variant(cfg)
    if quantize and name in qz.TARGETS:
        meta[QUANTIZE_KEY] = quantize
        # quantized on the default device, one kernel at a time, and fetched back for writing
        pieces = ((p, np.asarray(v)) for p, v in qz.quantize_pieces(pieces, name, quantize))
    save_params(folder, pieces, meta, dtype=parse_dtype(dtype))


def convert_to_checkpoint(src: str | Path, dst: str | Path, dtype: Any = None, overwrite: bool = False,
                          quantize: str | None = None) -> Path:
    """Convert a diffusers pipeline folder, one component folder, or a BFL file into `dst`.

    quantize: a flux_jax.quantize mode (int8, int4, nf4, fp8) for the transformer's and T5's block kernels.

    A pipeline folder becomes dst/<component>/ for each model plus copies of the tokenizers,
    scheduler and model_index.json, so `FluxPipeline.from_pretrained(dst)` works on it.
    Every component's names are checked before anything is written; tensors stream from the
    source into Orbax parts (memory: a few GB whatever the model size). Nothing is left at `dst`
    if anything fails.
    """
    src = Path(src)
    kind = detect(src)
    parse_dtype(dtype)  # bad names fail before any work
    qz.check_mode(quantize)
    if kind == "pipeline":
        missing = [n for n in (*COMPONENTS, *COPIED) if not (src / n).exists()]
        if missing:
            raise ConversionError(f"{src}: pipeline folder lacks {missing}")
        components = {name: component_stream(name, src / name, progress=True) for name in COMPONENTS}
    else:
        components = {kind: component_stream(kind, src, progress=True)}

    def write(tmp: Path) -> None:
        if kind != "pipeline":
            return _write_component(tmp, kind, components[kind], dtype, quantize)
        for name, component in components.items():
            (tmp / name).mkdir()
            _write_component(tmp / name, name, component, dtype, quantize)
        for name in COPIED:
            shutil.copytree(src / name, tmp / name)
        shutil.copy(src / MODEL_INDEX, tmp / MODEL_INDEX)

    return atomic_dir(dst, write, overwrite)


def load_component(path: str | Path, dtype: Any = None, sharding: Callable | None = None,
                   stacked: bool = True, select: Callable[[str], bool] | None = None) -> tuple[dict, Any]:
    """(params, config) of a component folder written by convert_to_checkpoint.

    stacked=True: numpy params in the stacked layout (scanned models). stacked=False: the
    per-layer layout, as numpy, or with sharding (path, shape, dtype) -> Sharding as jax Arrays
    restored onto the devices. select: only the params whose per-layer path it accepts.
    See core.load_checkpoint.
    """
    params, meta = load_checkpoint(path, parse_dtype(dtype), sharding, stacked, select)
    name = meta.get("component")
    if name not in COMPONENTS:
        raise ConversionError(f"{path}: unknown component {name!r} in its config")
    return params, COMPONENTS[name][2].from_dict(meta["config"])


def is_converted(path: str | Path) -> bool:
    return is_checkpoint(path)


def stored_quantization(path: str | Path) -> str | None:
    """The quantization mode a converted component folder was saved in; None for float weights."""
    return json.loads((Path(path) / CONFIG_FILE).read_text()).get(QUANTIZE_KEY)


def stored_paths(path: str | Path) -> list[str]:
    """The per-layer param paths of a converted component folder; only its metadata is read."""
    paths: list[str] = []
    load_checkpoint(path, select=lambda p: paths.append(p) is not None)  # notes each path, selects none
    return paths
