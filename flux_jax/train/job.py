"""One training job, as `python -m flux_jax.train` runs it: model -> cache -> train -> outputs.

The text encoders run once, to fill the cache (and encode the sample prompts); they are freed
before the transformer trains. Full fine-tuning writes the untrained components of the model
folder first, the transformer last; LoRA writes OUT/lora.safetensors.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import distributed, sharding
from ..kontext import FluxKontextPipeline
from ..pipeline import FluxPipeline, PipelineError
from ..sample import BadInput
from . import export
from .cache import build_cache
from .data import load_pixels, make_iterator
from .lora import DEFAULT_TARGETS, LoraError, init_lora, save_lora
from .run import RunConfig, train
from .loss import LossConfig
from .trainer import OptimConfig, Trainer

LORA_FILE = "lora.safetensors"
CACHE_DIR = "cache"
DEFAULT_SAMPLES = 4  # distinct captions of the data sampled during training when no --sample-prompt given
DEMO_VARIANT = "dev"
DEMO_BASE = "base"  # --init demo: the initial model folder, in OUT


def demo_images(examples, resolution: int) -> np.ndarray:
    """The training images (targets and controls) as squares of the resolution, for fitting the demo VAE."""
    side = resolution // 16 * 16
    paths = [ex.image_path for ex in examples] + [ex.control_path for ex in examples if ex.control_path]
    return np.stack([load_pixels(p, (side, side)) for p in paths])


def write_demo_base(args, examples, out: Path, dtype, mesh) -> Path:
    """--init demo: build the tiny model (VAE fitted to the images) once, as the model folder OUT/base.

    LoRA files apply to it; a resumed run loads it instead of fitting the VAE again.
    """
    base = out / DEMO_BASE
    if not (base / "transformer").exists():
        from .demo import VAE_STEPS, demo_pipeline
        pipe = demo_pipeline(demo_images(examples, args.resolution), DEMO_VARIANT, seed=args.seed,
                             vae_steps=args.vae_steps or VAE_STEPS, dtype=dtype, mesh=mesh,
                             progress=not args.no_progress)
        export.prepare_model_folder(base, pipe, None, kontext=args.kontext)
        export.write_transformer(base, pipe.params, pipe.cfg)
    distributed.barrier("demo base written")
    return base


def load_model(args, root: Optional[Path], examples, dtype, mesh) -> tuple[FluxPipeline, Path]:
    """(pipeline, the model folder it came from); --init demo writes its model folder first."""
    cls = FluxKontextPipeline if args.kontext else FluxPipeline
    if root is None:
        root = write_demo_base(args, examples, Path(args.output), dtype, mesh)
    try:
        # check_memory=False: training's memory is not the inference estimate, and it needs pipe.params loaded
        return cls.from_pretrained(root, dtype=dtype, transformer=args.transformer, mesh=mesh, check_memory=False), root
    except PipelineError as e:
        raise BadInput(str(e)) from None


def sample_prompts(args, examples) -> list[str]:
    if args.sample_prompt:
        return list(args.sample_prompt)
    captions = list(dict.fromkeys(ex.caption for ex in examples))
    return captions[:DEFAULT_SAMPLES]


def make_sampler(pipe: FluxPipeline, trainer: Trainer, args, prompts: list[str], examples, max_len: int):
    """sampler(step, variables) -> {name: image}: the fixed prompts (and, Kontext, their examples'
    control images) at the first example's bucket size, with the trained weights."""
    h, w = examples[0].bucket
    controls = {ex.caption: ex.control_path for ex in examples if ex.control_path}
    guidance = args.guidance if args.sample_guidance is None else args.sample_guidance

    def sample(step: int, variables: dict) -> dict:
        images = {}
        with pipe.using_variables(variables):
            for i, prompt in enumerate(prompts):
                kw = dict(height=h, width=w, num_inference_steps=args.sample_steps, guidance_scale=guidance,
                          seed=args.sample_seed, max_sequence_length=max_len, output_type="np", progress=False)
                if args.kontext:
                    out = pipe(str(controls.get(prompt) or examples[0].control_path), prompt, auto_resize=False, **kw)
                else:
                    out = pipe(prompt, **kw)
                images[f"prompt{i}_seed{args.sample_seed}"] = out.images[0]
        return images

    return sample


def run_job(args: argparse.Namespace, root: Optional[Path], examples, dtype, optim: OptimConfig,
            loss: LossConfig) -> None:
    out = Path(args.output)
    mesh = sharding.make_mesh(args.mesh) if args.mesh else sharding.make_mesh()
    pipe, root = load_model(args, root, examples, dtype, mesh)
    if pipe.variant == "fill":
        raise BadInput(f"{root} is a FLUX.1 Fill model: training takes dev, schnell or Kontext models "
                       "(Fill's mask channels are not built here)")
    max_len = pipe.check_max_sequence_length(args.max_sequence_length or
                                             (256 if pipe.variant == "schnell" else 512))
    lora_mode = args.lora_rank is not None
    if not lora_mode:
        export.prepare_model_folder(out, pipe, root, kontext=args.kontext)
    cache = build_cache(examples, pipe, Path(args.cache or out / CACHE_DIR), max_len, progress=not args.no_progress,
                        resolution=args.resolution)
    prompts = sample_prompts(args, examples)
    pipe.remember_prompts(prompts, max_len)
    pipe.free_text_encoders()

    targets = args.lora_targets or DEFAULT_TARGETS
    try:
        lora = init_lora(pipe.params, pipe.cfg, args.lora_rank, args.lora_alpha, targets, args.seed) \
            if lora_mode else None
    except LoraError as e:
        raise BadInput(str(e)) from None
    trainer = Trainer(pipe.cfg, optim, loss, args.steps, dtype=dtype, mesh=mesh, lora=lora)
    state, frozen = trainer.init(pipe.params, args.seed)
    if not lora_mode:
        pipe.params = None  # the trainer holds float32 masters; the pipeline's copy would only take memory
    data = make_iterator(cache, args.batch_size * args.grad_accum, args.seed, args.caption_dropout)
    run = RunConfig(steps=args.steps, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                    log_every=args.log_every, sample_every=args.sample_every)
    sampler = make_sampler(pipe, trainer, args, prompts, examples, max_len)
    state = train(trainer, state, frozen, data, out, run, sampler, images_per_step=args.batch_size * args.grad_accum,
                  progress=not args.no_progress)

    variables = trainer.trained_variables(state, frozen)
    if lora_mode:
        path = save_lora(variables, pipe.cfg, out / LORA_FILE, targets) if distributed.is_main() else None
        written = f"LoRA {path}"
    else:
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.dtype(dtype)), variables["params"])
        export.write_transformer(out, params, pipe.cfg)
        written = f"model folder {out} (python -m flux_jax.sample --model {out})"
    if distributed.is_main():
        print(f"trained {args.steps} steps: {written}")
