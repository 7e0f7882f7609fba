"""The tiny text-to-image model trained from scratch on scikit-learn's digits, for quality benchmarks.

Quality claims that need a *trained* model (quantized weights, step caching) measure it on this one:
what notebooks/03_train.ipynb trains (the same CLI settings), reused from --run if it is already there.

    python benchmarks/digits_model.py [--run DIR]     # trains (a few minutes on 2 CPU cores) and prints
                                                      # the classifier accuracy of its samples

In another script:
    from digits_model import trained_model, sample_accuracy
    pipe = FluxPipeline.from_pretrained(trained_model())
    acc = sample_accuracy(pipe)          # the share of 50 samples (5 seeds × 10 digits) read as their digit
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_RUN = Path(os.environ.get("FLUX_JAX_DIGITS_RUN", Path(tempfile.gettempdir()) / "flux_jax_digits"))
SIDE = 32
# notebooks/03_train.ipynb's run: 400 steps of batch 32, a VAE fitted for 100 steps first.
TRAIN_ARGS = ["--init", "demo", "--resolution", str(SIDE), "--max-sequence-length", "16", "--steps", "400",
              "--batch-size", "32", "--learning-rate", "1e-3", "--sigma-sampler", "logit_normal",
              "--caption-dropout", "0.1", "--vae-steps", "100", "--checkpoint-every", "400", "--log-every", "50"]
# How the notebook samples it: true CFG 3 with an empty negative prompt, 20 steps.
SAMPLE_SETTINGS = dict(negative_prompt="", true_cfg_scale=3.0, guidance_scale=1.0, height=SIDE, width=SIDE,
                       num_inference_steps=20, max_sequence_length=16, output_type="np", progress=False)
SEEDS, DIGITS = (0, 1, 2, 3, 4), tuple(range(10))


def trained_model(run: Path = DEFAULT_RUN) -> Path:
    """The model folder of a finished run in `run` (trained now if absent; an interrupted run resumes)."""
    from flux_jax.train.__main__ import main as train_cli
    from flux_jax.train.digits import write_digits

    run = Path(run)
    if not (run / "transformer").is_dir():  # the transformer is written last, atomically
        data = run / "data"
        if not data.is_dir():
            write_digits(data, split="train", side=SIDE)
        if train_cli([*TRAIN_ARGS, "--data", str(data), "--output", str(run)]) != 0:
            raise SystemExit(f"error: training the digits model in {run} failed (see above)")
    return run


def prompts_and_labels() -> tuple[list[str], np.ndarray, list[int]]:
    """(prompts, digit labels, seeds): a row per seed, one picture per digit."""
    from flux_jax.train.digits import digit_prompt

    prompts = [digit_prompt(d) for _ in SEEDS for d in DIGITS]
    return prompts, np.array([d for _ in SEEDS for d in DIGITS]), [s for s in SEEDS for _ in DIGITS]


def sample_accuracy(pipe, **settings) -> float:
    """Share of the 50 samples that the held-out digit classifier labels as the prompted digit."""
    from flux_jax.train.digits import DigitClassifier

    prompts, labels, seeds = prompts_and_labels()
    images = pipe(prompts, seed=seeds, **{**SAMPLE_SETTINGS, **settings}).images
    return DigitClassifier().accuracy(images, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run folder (default: %(default)s)")
    args = ap.parse_args()
    from flux_jax import FluxPipeline

    pipe = FluxPipeline.from_pretrained(trained_model(args.run))
    print(f"{args.run}: classifier accuracy {sample_accuracy(pipe):.1%} (true CFG 3), "
          f"{sample_accuracy(pipe, true_cfg_scale=1.0):.1%} (guidance 1 alone)")


if __name__ == "__main__":
    main()
