"""Kontext learns an edit: a tiny FLUX trained from scratch on "mirror the digit" pairs mirrors unseen digits.

(Text-to-image learning — samples of "a photo of the digit d" recognised by a classifier — is proven
by notebooks/03_train.ipynb, which tests/test_notebooks_03.py runs and checks.)
"""
from __future__ import annotations

import numpy as np

from flux_jax import FluxKontextPipeline
from flux_jax.train.__main__ import main
from flux_jax.train.digits import MIRROR_PROMPT, digit_images, write_digits

SIDE = 32
TRAIN_PAIRS = 256
TEST_DIGITS = 20
BASELINE_FRACTION = 0.5  # trained error must be below half the do-nothing error


def test_kontext_learns_to_mirror_digits(tmp_path):
    data, out = tmp_path / "pairs", tmp_path / "run"
    write_digits(data, side=SIDE, limit=TRAIN_PAIRS, kontext=True)
    argv = ["--init", "demo", "--kontext", "--data", str(data), "--output", str(out), "--resolution", str(SIDE),
            "--max-sequence-length", "8", "--steps", "500", "--batch-size", "32", "--learning-rate", "2e-3",
            "--vae-steps", "150", "--sigma-sampler", "logit_normal", "--checkpoint-every", "500",
            "--sample-steps", "2", "--no-progress"]
    assert main(argv) == 0
    pipe = FluxKontextPipeline.from_pretrained(out)
    images, _ = digit_images("holdout", SIDE)
    images = images[:TEST_DIGITS]
    mirrored = images[:, :, ::-1] / 255.0
    edited = np.stack([pipe(im, MIRROR_PROMPT, height=SIDE, width=SIDE, num_inference_steps=20, guidance_scale=1.0,
                            seed=i, max_sequence_length=8, auto_resize=False, output_type="np",
                            progress=False).images[0] for i, im in enumerate(images)])
    error = np.abs(edited - mirrored).mean()
    baseline = np.abs(images / 255.0 - mirrored).mean()
    print(f"mirror task: mean |Δ| {error:.4f} vs do-nothing {baseline:.4f}")
    assert error < BASELINE_FRACTION * baseline, (error, baseline)
