"""python -m flux_jax.train: fine-tune FLUX (full or LoRA) on a folder of images and captions.

    python -m flux_jax.train --model FLUX.1-dev --data photos/ --lora-rank 16 --output runs/style
    python -m flux_jax.train --init demo --data digits/ --output runs/digits --resolution 32
    python -m flux_jax.train --config run.toml          # the same keys as the flags

Outputs in --output: lora.safetensors (LoRA, diffusers/PEFT keys) or a model folder (full
fine-tuning), plus checkpoints/ (resume by running the same command again), logs/
(TensorBoard) and samples/. Bad input stops before any model loads with `error:` and exit 2.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path
from typing import Optional

from .. import compile_cache, distributed, sharding
from ..config import REMAT_CHOICES
from ..sample import BadInput, add_model_arguments, check_dtype, resolve_model, run_cli
from .data import DataError, scan_folder
from .loss import SIGMA_SAMPLERS, WEIGHTINGS, LossConfig
from .run import TrainingError
from .trainer import SCHEDULES, OptimConfig

INITS = ("demo",)
DEFAULT_SAMPLE_STEPS = 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flux_jax.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of these options (keys as the flags, "
                                                         "with - or _); flags on the command line win")
    add_model_arguments(p)
    p.add_argument("--init", choices=INITS, help="demo: a tiny FLUX trained from scratch, its VAE first fitted "
                                                 "to the images (no download)")
    p.add_argument("--data", metavar="DIR", help="NAME.png + NAME.txt pairs (+ control/NAME.png with --kontext)")
    p.add_argument("--kontext", action="store_true", help="train on (control/NAME, caption, NAME) edit pairs")
    p.add_argument("--output", metavar="DIR", help="run folder: outputs, checkpoints, logs, samples")
    p.add_argument("--cache", metavar="DIR", help="latent and text-embedding cache (default: OUTPUT/cache)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=1, help="images a forward pass (all devices together)")
    g.add_argument("--grad-accum", type=int, default=1, help="forward passes an optimizer step")
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--lr-schedule", choices=SCHEDULES, default="constant")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="global-norm clipping (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.0, help="keep an EMA of the weights (e.g. 0.999) and "
                                                                 "export it; 0: off")
    g.add_argument("--remat", choices=REMAT_CHOICES, default="none", help="recompute activations to save memory")
    g.add_argument("--resolution", type=int, default=512, help="pixel area budget: about RESOLUTION² a image")
    g.add_argument("--caption-dropout", type=float, default=0.0, help="probability of training on the empty caption")
    g.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: 512, schnell 256)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mesh", metavar="SPEC", help="device mesh, e.g. fsdp=8 or data=2,fsdp=4 (default: all data)")
    g = p.add_argument_group("LoRA (omit --lora-rank for full fine-tuning)")
    g.add_argument("--lora-rank", type=int)
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (scale alpha/rank; default: the rank)")
    g.add_argument("--lora-targets", metavar="REGEX", help="param paths to adapt (default: attention, MLPs, "
                                                           "single-block linear1/linear2)")
    g = p.add_argument_group("timesteps and loss")
    g.add_argument("--sigma-sampler", choices=SIGMA_SAMPLERS, default=LossConfig.sigma_sampler)
    g.add_argument("--logit-mean", type=float, default=LossConfig.logit_mean)
    g.add_argument("--logit-std", type=float, default=LossConfig.logit_std)
    g.add_argument("--mode-scale", type=float, default=LossConfig.mode_scale)
    g.add_argument("--shift", type=float, default=LossConfig.shift, help="the fixed shift of --sigma-sampler shift")
    g.add_argument("--weighting", choices=WEIGHTINGS, default=LossConfig.weighting)
    g.add_argument("--guidance", type=float, default=LossConfig.guidance, help="guidance input of dev models")
    g = p.add_argument_group("checkpoints, logs and samples")
    g.add_argument("--checkpoint-every", type=int, default=250)
    g.add_argument("--keep-checkpoints", type=int, default=3)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--sample-every", type=int, default=0, help="steps between sample images (0: at the end only)")
    g.add_argument("--sample-prompt", action="append", help="prompt to sample (repeatable; default: "
                                                            "the first 4 captions of the data)")
    g.add_argument("--sample-seed", type=int, default=0)
    g.add_argument("--sample-steps", type=int, default=DEFAULT_SAMPLE_STEPS)
    g.add_argument("--sample-guidance", type=float, help="guidance of the samples (default: --guidance)")
    g.add_argument("--vae-steps", type=int, help="--init demo: VAE fitting steps")
    g.add_argument("--no-progress", action="store_true")
    distributed.add_arguments(p)
    compile_cache.add_argument(p)
    return p


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """Flags over --config's TOML over defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        try:
            with open(args.config, "rb") as f:
                table = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise BadInput(f"--config {args.config}: cannot read it as TOML ({e})") from None
        known = {a.dest for a in parser._actions}
        settings = {k.replace("-", "_"): v for k, v in table.items()}
        unknown = sorted(set(settings) - known - {"config"})
        if unknown:
            raise BadInput(f"--config {args.config}: unknown keys {unknown}; use the flags' names, e.g. lora_rank")
        parser.set_defaults(**settings)
        args = parser.parse_args(argv)
    return args


def check_args(args: argparse.Namespace) -> tuple[Optional[Path], list]:
    """(model folder or None for --init, examples): everything cheap checked before a model loads."""
    if args.data is None or args.output is None:
        raise BadInput("pass --data DIR (images + captions) and --output DIR")
    if args.init and (args.model or args.demo or args.transformer):
        raise BadInput("--init demo trains a new model: drop --model/--demo/--transformer")
    if args.demo:
        raise BadInput("--demo has random weights; to train a tiny model from scratch use --init demo")
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                 "sample_steps", "resolution"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise BadInput(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.lora_targets is not None:
        try:
            re.compile(args.lora_targets)
        except re.error as e:
            raise BadInput(f"--lora-targets {args.lora_targets!r} is not a regular expression ({e})") from None
    if not 0 <= args.caption_dropout < 1:
        raise BadInput(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    try:
        optim_config(args), loss_config(args)
        if args.mesh:
            sharding.parse_mesh_spec(args.mesh)
    except ValueError as e:
        raise BadInput(str(e)) from None
    root = None if args.init else resolve_model(args)
    examples = scan_folder(args.data, args.resolution, kontext=args.kontext)
    return root, examples


def optim_config(args) -> OptimConfig:
    return OptimConfig(learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, schedule=args.lr_schedule,
                       weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, grad_accum=args.grad_accum,
                       ema_decay=args.ema_decay, remat=args.remat)


def loss_config(args) -> LossConfig:
    return LossConfig(sigma_sampler=args.sigma_sampler, logit_mean=args.logit_mean, logit_std=args.logit_std,
                      mode_scale=args.mode_scale, shift=args.shift, weighting=args.weighting, guidance=args.guidance)


def _train(argv: Optional[list[str]]) -> None:
    args = parse_args(argv)
    distributed.check_arguments(args)
    root, examples = check_args(args)
    compile_cache.configure(args)
    distributed.initialize(args)
    from .job import run_job
    run_job(args, root, examples, check_dtype(args.dtype), optim_config(args), loss_config(args))


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return run_cli(lambda: _train(argv))
    except DataError as e:  # its message lists every problem, one a line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
