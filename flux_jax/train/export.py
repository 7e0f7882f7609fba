"""What a training run leaves behind: a model folder (full fine-tuning) or a LoRA file.

A full fine-tuning run's OUT/ is a model folder `FluxPipeline.from_pretrained(OUT)` and
`python -m flux_jax.sample --model OUT` load: the components that were not trained are written
(or hard-linked from the source model) before training starts, the trained transformer at the
end. Every write is atomic (temp, then rename).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import jax

from .. import distributed, sharding
from ..config import FluxConfig

COMPONENTS = ("text_encoder", "text_encoder_2", "vae")
TOKENIZERS = ("tokenizer", "tokenizer_2")
MODEL_INDEX = "model_index.json"
SCHEDULER = "scheduler"
# scheduler/scheduler_config.json as the published repos hold it; schnell turns the dynamic shift off.
SCHEDULER_CONFIG = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                        max_image_seq_len=4096)


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder, hard-linking files where the file system allows (a 9.5 GB T5 costs nothing)."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def prepare_model_folder(out: Path, pipe, source: Optional[Path], kontext: bool = False) -> None:
    """Write everything of a model folder but the transformer into `out` (skipping what is there).

    source: the model folder training started from (its files are linked), or None for a model
    built in memory (--init demo: its params are written as converted checkpoints).
    """
    from convert.core import atomic_dir, save_checkpoint

    if not distributed.is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    params = {"text_encoder": (pipe.clip_params, pipe.clip_cfg), "text_encoder_2": (pipe.t5_params, pipe.t5_cfg),
              "vae": (pipe.vae_params, pipe.vae_cfg)}
    for name in (*COMPONENTS, *TOKENIZERS, SCHEDULER):
        if (out / name).exists():
            continue
        if source is not None and (source / name).exists():
            atomic_dir(out / name, lambda tmp, name=name: (tmp.rmdir(), _link_tree(source / name, tmp)))
        elif name in COMPONENTS:
            tree, cfg = params[name]
            save_checkpoint(out / name, jax.tree_util.tree_map(sharding.to_host, tree), {"component": name, "config": cfg.to_dict()})
        elif name in TOKENIZERS:
            tok = pipe.tokenizer if name == "tokenizer" else pipe.tokenizer_2
            atomic_dir(out / name, lambda tmp, tok=tok: tok.save_pretrained(tmp))
        else:
            config = {**SCHEDULER_CONFIG, "use_dynamic_shifting": pipe.dynamic_shift, "shift": pipe.static_shift
                      if not pipe.dynamic_shift else SCHEDULER_CONFIG["shift"]}
            atomic_dir(out / name, lambda tmp, c=config: _write_json(tmp / "scheduler_config.json", c))
    if not (out / MODEL_INDEX).exists():
        if source is not None and (source / MODEL_INDEX).is_file():
            shutil.copy(source / MODEL_INDEX, out / MODEL_INDEX)
        else:
            _write_json(out / MODEL_INDEX, {"_class_name": "FluxKontextPipeline" if kontext else "FluxPipeline"})


def write_transformer(out: Path, params: dict, cfg: FluxConfig) -> Path:
    """The trained transformer as a converted checkpoint out/transformer (replacing an older one).

    Every process takes part (params may be sharded across hosts); the main process writes.
    """
    from convert.core import Piece, atomic_dir, leaves, save_params, unstack_layers
    from convert.transformer import variant

    cfg = cfg.replace(remat="none")
    flat = leaves(unstack_layers(params) if cfg.scan_layers else params)
    pieces = (Piece(path, sharding.to_host(value)) for path, value in flat.items())
    if not distributed.is_main():
        for _ in pieces:  # the gathers are collectives: every process runs them
            pass
        return out / "transformer"
    meta = {"component": "transformer", "config": cfg.to_dict(), "variant": variant(cfg)}
    return atomic_dir(out / "transformer", lambda tmp: save_params(tmp, pieces, meta), overwrite=True)
