"""PyTorch safetensors (diffusers or BFL layouts) -> flux-jax param trees -> Orbax checkpoints.

`convert_to_checkpoint(src, dst)` converts once; `load_component(path)` loads it back fast.
"""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

from flux_jax.config import CLIPConfig, FluxConfig, T5Config, VAEConfig, parse_dtype
from .core import ConversionError, atomic_dir, is_checkpoint, load_checkpoint, save_params

# component folder -> (module, converter function, config class); converters return (params, config)
COMPONENTS = {
    "transformer": ("convert.transformer", "convert_transformer", FluxConfig),
    "text_encoder": ("convert.text_encoders", "convert_clip", CLIPConfig),
    "text_encoder_2": ("convert.text_encoders", "convert_t5", T5Config),
    "vae": ("convert.autoencoder", "convert_vae", VAEConfig),
}
# diffusers classes (config.json `_class_name` or `architectures`) -> component
CLASSES = {"FluxTransformer2DModel": "transformer", "CLIPTextModel": "text_encoder",
           "T5EncoderModel": "text_encoder_2", "AutoencoderKL": "vae"}
COPIED = ("tokenizer", "tokenizer_2", "scheduler")  # small folders used as they are
MODEL_INDEX = "model_index.json"

__all__ = ["ConversionError", "convert_component", "convert_to_checkpoint", "load_component", "detect"]


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


def convert_component(name: str, src: str | Path, dtype: Any = None, **kw) -> tuple[dict, Any]:
    module, fn, _ = COMPONENTS[name]
    return getattr(importlib.import_module(module), fn)(src, dtype=parse_dtype(dtype), **kw)


def _write_component(folder: Path, name: str, src: Path, dtype) -> None:
    params, cfg = convert_component(name, src, dtype, progress=True, scratch=folder / ".scratch")
    meta = {"component": name, "config": cfg.to_dict()}
    if name == "transformer":
        from .transformer import variant
        meta["variant"] = variant(cfg)
    save_params(folder, params, meta)
    del params
    shutil.rmtree(folder / ".scratch", ignore_errors=True)


def convert_to_checkpoint(src: str | Path, dst: str | Path, dtype: Any = None, overwrite: bool = False) -> Path:
    """Convert a diffusers pipeline folder, one component folder, or a BFL file into `dst`.

    A pipeline folder becomes dst/<component>/ for each model plus copies of the tokenizers,
    scheduler and model_index.json, so `FluxPipeline.from_pretrained(dst)` works on it.
    Nothing is left at `dst` if anything fails.
    """
    src = Path(src)
    kind = detect(src)

    def write(tmp: Path) -> None:
        if kind != "pipeline":
            return _write_component(tmp, kind, src, dtype)
        missing = [n for n in (*COMPONENTS, *COPIED) if not (src / n).exists()]
        if missing:
            raise ConversionError(f"{src}: pipeline folder lacks {missing}")
        for name in COMPONENTS:
            (tmp / name).mkdir()
            _write_component(tmp / name, name, src / name, dtype)
        for name in COPIED:
            shutil.copytree(src / name, tmp / name)
        shutil.copy(src / MODEL_INDEX, tmp / MODEL_INDEX)

    return atomic_dir(dst, write, overwrite)


def load_component(path: str | Path, dtype: Any = None) -> tuple[dict, Any]:
    """(numpy params, config) of a component folder written by convert_to_checkpoint."""
    params, meta = load_checkpoint(path, parse_dtype(dtype))
    name = meta.get("component")
    if name not in COMPONENTS:
        raise ConversionError(f"{path}: unknown component {name!r} in its config")
    return params, COMPONENTS[name][2].from_dict(meta["config"])


def is_converted(path: str | Path) -> bool:
    return is_checkpoint(path)
