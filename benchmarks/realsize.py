"""A real-size FLUX.1-dev folder in the diffusers layout with random bf16 weights, written streaming.

    python benchmarks/realsize.py DIR          # ~34 GB: transformer 23.8 GB (3 shards), T5-XXL 9.5 GB (2 shards),
                                               # CLIP-L, the VAE, offline tokenizers, scheduler, model_index.json
    python benchmarks/realsize.py DIR --double 1 --single 2 --t5-layers 1   # real widths, few blocks (1.8 GB)

Values do not matter (memory and conversion benchmarks, never quality): each tensor is a slice of one
repeated block of random normal bf16, written header first then tensor by tensor, so the host never
holds more than a block. Which tensors each file holds, and every config.json, come from a tiny folder
made by tests/pipeline_fixtures.py (the same diffusers/transformers classes), the real shapes from those
classes built on torch's meta device with the published sizes (flux_jax.config's defaults).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert_memory import write_bfl_file  # noqa: E402  (a streaming safetensors writer of bf16 tensors)

# Shards as the published FLUX.1-dev folder has them.
SHARDS = {"transformer": 3, "text_encoder_2": 2, "text_encoder": 1, "vae": 1}
GB = 1e9


def published_sizes() -> dict[str, dict]:
    """config.json overrides that turn the tiny fixture configs into FLUX.1-dev's."""
    from flux_jax.config import DEV, CLIPConfig, T5Config, VAEConfig

    clip, t5, vae = CLIPConfig(), T5Config(), VAEConfig()
    return {
        "transformer": dict(num_layers=DEV.depth, num_single_layers=DEV.depth_single_blocks,
                            attention_head_dim=DEV.head_dim, num_attention_heads=DEV.num_heads,
                            joint_attention_dim=DEV.context_in_dim, pooled_projection_dim=DEV.vec_in_dim,
                            axes_dims_rope=list(DEV.axes_dim)),
        "text_encoder": dict(vocab_size=clip.vocab_size, hidden_size=clip.hidden_size, projection_dim=clip.hidden_size,
                             intermediate_size=clip.intermediate_size, num_hidden_layers=clip.num_layers,
                             num_attention_heads=clip.num_heads, max_position_embeddings=clip.max_positions),
        "text_encoder_2": dict(vocab_size=t5.vocab_size, d_model=t5.d_model, d_kv=t5.d_kv, d_ff=t5.d_ff,
                               num_layers=t5.num_layers, num_decoder_layers=t5.num_layers, num_heads=t5.num_heads),
        "vae": dict(block_out_channels=list(vae.block_out_channels), layers_per_block=vae.layers_per_block,
                    norm_num_groups=vae.norm_groups, scaling_factor=vae.scaling_factor, shift_factor=vae.shift_factor),
    }


def meta_shapes(name: str, config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the component `name` built from `config` on the meta device (no memory)."""
    import torch

    if name in ("transformer", "vae"):
        import diffusers

        cls = getattr(diffusers, {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL"}[name])
        with torch.device("meta"):
            model = cls.from_config(config)
    else:
        import transformers

        cls_name = {"text_encoder": ("CLIPTextConfig", "CLIPTextModel"),
                    "text_encoder_2": ("T5Config", "T5EncoderModel")}[name]
        cfg = getattr(transformers, cls_name[0]).from_dict(config)
        with torch.device("meta"):
            model = getattr(transformers, cls_name[1])(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def saved_keys(folder: Path) -> list[str]:
    """The tensor names in a component folder's safetensors files (tied weights are saved once)."""
    from safetensors import safe_open

    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            keys += list(st.keys())
    return keys


def split_shards(shapes: dict[str, tuple[int, ...]], n: int) -> list[list[str]]:
    """Keys in name order cut into n shards of about equal bytes."""
    keys = sorted(shapes)
    total = sum(math.prod(shapes[k]) for k in keys)
    shards, current, size = [], [], 0
    for k in keys:
        current.append(k)
        size += math.prod(shapes[k])
        if size >= total * (len(shards) + 1) / n and len(shards) < n - 1:
            shards.append(current)
            current = []
    return shards + [current] if current else shards


def write_component(src: Path, dst: Path, name: str, overrides: dict, seed: int) -> int:
    """dst/ = src/ (the tiny component) with published sizes: config.json and streamed shards; returns bytes."""
    tiny_config = json.loads((src / "config.json").read_text())
    config = {**tiny_config, **overrides}
    shapes = meta_shapes(name, config)
    # Names save_pretrained leaves out (tied weights), as it did for the tiny component; the rest are saved.
    dropped = set(meta_shapes(name, tiny_config)) - set(saved_keys(src))
    shapes = {k: v for k, v in shapes.items() if k not in dropped}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    stem = "diffusion_pytorch_model" if name in ("transformer", "vae") else "model"
    shards = split_shards(shapes, SHARDS[name])
    files = [f"{stem}.safetensors"] if len(shards) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = 0
    for i, (file, part) in enumerate(zip(files, shards)):
        print(f"  {name}/{file}: {len(part)} tensors ...", flush=True)
        total += write_bfl_file(dst / file, {k: shapes[k] for k in part}, seed=seed * 100 + i)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(2 * math.prod(s) for s in shapes.values())},
                 "weight_map": {k: f for f, part in zip(files, shards) for k in part}}
        (dst / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


def write_realsize_folder(path: Path, seed: int = 0, double: Optional[int] = None, single: Optional[int] = None,
                          t5_layers: Optional[int] = None) -> dict[str, int]:
    """Write the folder at `path` (replacing nothing: it must not exist); returns bytes by component.
    double, single, t5_layers: fewer blocks than published (None: as published), all widths real."""
    from pipeline_fixtures import make_flux_folder

    path = Path(path)
    if path.exists():
        raise SystemExit(f"error: {path} exists; pass a new folder")
    tmp = Path(tempfile.mkdtemp(prefix="flux_realsize_"))
    try:
        tiny = make_flux_folder(tmp / "tiny", "dev")
        part = path.with_name(path.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(tiny, part, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "config.json"))
        shutil.copy(tiny / "model_index.json", part / "model_index.json")
        sizes, configs = {}, published_sizes()
        depths = {"transformer": dict(num_layers=double, num_single_layers=single), "text_encoder_2": dict(
            num_layers=t5_layers, num_decoder_layers=t5_layers)}
        for name, fields in depths.items():
            configs[name].update({k: v for k, v in fields.items() if v is not None})
        for k, (name, overrides) in enumerate(configs.items()):
            sizes[name] = write_component(tiny / name, part / name, name, overrides, seed * 10 + k)
        part.rename(path)  # complete or absent
        return sizes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--double", type=int, help="double-stream blocks (default: 19, as published)")
    ap.add_argument("--single", type=int, help="single-stream blocks (default: 38)")
    ap.add_argument("--t5-layers", type=int, help="T5 encoder layers (default: 24)")
    args = ap.parse_args()
    sizes = write_realsize_folder(args.dir, double=args.double, single=args.single, t5_layers=args.t5_layers)
    print(", ".join(f"{k} {v / GB:.2f} GB" for k, v in sizes.items()), f"= {sum(sizes.values()) / GB:.1f} GB")


if __name__ == "__main__":
    main()
