"""`--init demo`: the tiny VAE fitted to real digits, its latent constants, and the pipeline around it."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from flux_jax.autoencoder import scale_latents
from flux_jax.config import TINY_VAE
from flux_jax.demo import DEMO_NAME, demo_params
from flux_jax.sampling import pack
from flux_jax.train.demo import demo_pipeline, encode_means, fit_vae, reconstruct
from flux_jax.train.digits import DigitClassifier, digit_images, digit_prompt, to_unit_range

N_FIT = 512  # train-split digits the VAE is fitted on; the next N_UNSEEN are unseen by it and the classifier
N_UNSEEN = 256
STEPS = 150  # half the default fit, to keep the module's tests fast
SIDE = 32
# Mean absolute pixel error in [0, 1] units on the unseen digits, measured at 150 steps: 0.046
# (300 steps: 0.026); the random VAE's: 0.42.
MAX_ERROR = 0.08
MIN_IMPROVEMENT = 5.0  # x lower error than the random VAE
# The classifier reads 99.2% of the unseen originals and 98.0% of their 150-step reconstructions.
MIN_RECOGNISED = 0.93
FEW = 64  # images for the quick checks: one encode chunk
UNIT_TOLERANCE = 0.1  # scaled latents of unseen digits: |mean| and |std - 1| (measured < 0.01)


@pytest.fixture(scope="module")
def digits():
    images, labels = digit_images("train", SIDE)
    x = to_unit_range(images)
    unseen = slice(N_FIT, N_FIT + N_UNSEEN)
    return x[:N_FIT], x[unseen], images[unseen], labels[unseen]


@pytest.fixture(scope="module")
def fitted(digits):
    return fit_vae(digits[0], steps=STEPS, progress=False)


@pytest.fixture(scope="module")
def pipe(digits, fitted):
    return demo_pipeline(digits[0], vae=fitted, progress=False)


def pixel_error(reconstructed, x) -> float:
    return float(np.abs(reconstructed - x).mean() / 2)  # [-1, 1] -> [0, 1] units


def test_fit_beats_the_random_vae(digits, fitted):
    _, unseen, _, _ = digits
    random_vae = fit_vae(digits[0], steps=0, progress=False)  # the same random draw, not trained
    err = pixel_error(reconstruct(*fitted, unseen), unseen)
    err_random = pixel_error(reconstruct(*random_vae, unseen), unseen)
    assert err < MAX_ERROR and err * MIN_IMPROVEMENT < err_random, (err, err_random)


def test_reconstructions_are_recognised(digits, fitted):
    _, unseen, originals, labels = digits
    classifier = DigitClassifier()
    recon = (reconstruct(*fitted, unseen) + 1) / 2
    accuracy = classifier.accuracy(recon, labels)
    assert accuracy >= MIN_RECOGNISED, (accuracy, classifier.accuracy(originals, labels))


def test_latent_constants_give_unit_latents(digits, fitted):
    params, cfg = fitted
    assert (cfg.shift_factor, cfg.scaling_factor) != (TINY_VAE.shift_factor, TINY_VAE.scaling_factor)
    assert cfg.replace(shift_factor=0, scaling_factor=1) == TINY_VAE.replace(shift_factor=0, scaling_factor=1)
    z = scale_latents(encode_means(params, cfg, digits[1]), cfg)  # digits the constants were not fitted on
    assert abs(float(z.mean())) < UNIT_TOLERANCE and abs(float(z.std()) - 1) < UNIT_TOLERANCE


def test_fit_is_deterministic(digits, fitted):
    # same seed, same random draw and batches: the same params (the fixture's compiled step again)
    a, cfg_a = fit_vae(digits[0][:FEW], steps=2, progress=False)
    b, cfg_b = fit_vae(digits[0][:FEW], steps=2, progress=False)
    assert cfg_a == cfg_b and all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                        jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("bad, match", [(np.zeros((2, SIDE, SIDE, 3), np.uint8), "float"),
                                        (np.full((2, SIDE, SIDE, 3), 2.0, np.float32), r"\[-1, 1\]"),
                                        (np.zeros((2, 24, 24, 3), np.float32), "multiples of 16")])
def test_fit_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        fit_vae(bad, steps=1, progress=False)


def test_pipeline_runs_end_to_end(pipe, fitted):
    assert pipe.name == DEMO_NAME and pipe.variant == "dev" and pipe.vae_cfg == fitted[1]
    random_transformer = demo_params("dev")["transformer"][0]
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(pipe.params),
                                                    jax.tree_util.tree_leaves(random_transformer)))
    images = pipe(digit_prompt(3), height=SIDE, width=SIDE, num_inference_steps=2, seed=0, guidance_scale=1.0,
                  output_type="np", progress=False).images
    assert images.shape == (1, SIDE, SIDE, 3) and np.isfinite(images).all()


def test_pipeline_decodes_scaled_digit_latents(pipe, digits, fitted):
    # the pipeline's unscale + decode inverts encode + the fitted scaling: a trained transformer's
    # unit-variance latents come out as digits
    _, unseen, _, _ = digits
    z = scale_latents(encode_means(*fitted, unseen[:1]), fitted[1])
    decoded = pipe.decode(pack(z), SIDE, SIDE)
    np.testing.assert_allclose(decoded, (reconstruct(*fitted, unseen[:1]) + 1) / 2, atol=1e-4)


def test_pipeline_fits_its_own_vae(digits):
    p = demo_pipeline(digits[0][:FEW], vae_steps=1, progress=False)  # reuses the fixture's compiled step
    start, _ = fit_vae(digits[0][:FEW], steps=0, progress=False)
    changed = [not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(p.vae_params),
                                                        jax.tree_util.tree_leaves(start))]
    # one adam step moves every param with a gradient (attention's key bias has none: softmax ignores it)
    assert sum(changed) > 0.9 * len(changed) and p.vae_cfg.shift_factor != TINY_VAE.shift_factor
