"""End-to-end parity of flux_jax.FluxPipeline with diffusers' FluxPipeline on random-weight folders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convert import convert_to_checkpoint
from flux_jax import FluxPipeline, PipelineError
from flux_jax.config import TINY
from pipeline_fixtures import cached_flux_folder, load_diffusers_pipeline
from torch_ref import diffusers_to_bfl, rel_err

IMAGE_TOL = 2 / 255  # max |Δ| of float images in [0, 1]
LATENT_TOL = 1e-4  # relative L2 of the packed final latents
H, W = 48, 80  # non-square, 3 x 5 tokens
STEPS = 3
SEQ = 24  # T5 tokens


@pytest.fixture(scope="module")
def dev():
    folder = cached_flux_folder("dev")
    return folder, load_diffusers_pipeline(folder, "dev"), FluxPipeline.from_pretrained(folder)


def noise(batch: int, h: int = H, w: int = W, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, (h // 16) * (w // 16), 64, generator=torch.Generator().manual_seed(seed))


def compare(ref, ours, latents: torch.Tensor, **kw) -> None:
    """Both pipelines from the same packed noise: images within 2/255, latents within 1e-4."""
    kw = {"height": H, "width": W, "num_inference_steps": STEPS, "max_sequence_length": SEQ, **kw}
    want = ref(latents=latents, output_type="latent", **kw).images
    got = ours(latents=latents.numpy(), output_type="latent", progress=False, **kw).images
    assert rel_err(got, want) <= LATENT_TOL
    want = ref(latents=latents, output_type="np", **kw).images
    got = ours(latents=latents.numpy(), output_type="np", progress=False, **kw).images
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= IMAGE_TOL


def test_single_prompt_non_square(dev):
    _, ref, ours = dev
    compare(ref, ours, noise(1), prompt="a red fox in the snow", guidance_scale=3.5)


def test_batch_of_two_prompts_and_images_per_prompt(dev):
    _, ref, ours = dev
    compare(ref, ours, noise(4, seed=1), prompt=["a red fox", "a blue whale at sea"], num_images_per_prompt=2,
            guidance_scale=2.0)


def test_true_cfg_with_negative_prompt(dev):
    _, ref, ours = dev
    compare(ref, ours, noise(1, seed=2), prompt="a castle", negative_prompt="blurry, low quality",
            true_cfg_scale=4.0, guidance_scale=3.5)


def test_custom_sigmas_and_prompt_2(dev):
    _, ref, ours = dev
    compare(ref, ours, noise(1, seed=3), prompt="a castle", prompt_2="a castle on a hill at dawn",
            sigmas=[1.0, 0.8, 0.45, 0.2], num_inference_steps=4)


def test_transformer_as_bfl_file(dev, tmp_path):
    folder, ref, _ = dev
    save_file(diffusers_to_bfl(ref.transformer.state_dict(), TINY, "model.diffusion_model."),
              tmp_path / "flux1-tiny.safetensors")
    ours = FluxPipeline.from_pretrained(folder, transformer=tmp_path / "flux1-tiny.safetensors")
    compare(ref, ours, noise(1, seed=4), prompt="a lighthouse")


def test_converted_folder_and_low_memory(dev, tmp_path):
    folder, ref, _ = dev
    convert_to_checkpoint(folder, tmp_path / "converted")
    ours = FluxPipeline.from_pretrained(tmp_path / "converted", low_memory=True)
    compare(ref, ours, noise(1, seed=5), prompt="a lighthouse")
    assert ours.clip_params is None and ours.t5_params is None  # freed after each call, reloaded on the next


def test_schnell():
    folder = cached_flux_folder("schnell")
    ref, ours = load_diffusers_pipeline(folder, "schnell"), FluxPipeline.from_pretrained(folder)
    assert ours.variant == "schnell" and not ours.dynamic_shift
    compare(ref, ours, noise(2, seed=6), prompt=["a cat", "a dog"], guidance_scale=0.0)


def test_seeded_noise_is_reproducible_and_outputs_are_pil(dev):
    _, _, ours = dev
    kw = dict(prompt="a cat", height=32, width=32, num_inference_steps=2, max_sequence_length=SEQ, progress=False)
    a = ours(seed=7, output_type="np", **kw).images
    b = ours(seed=7, output_type="np", **kw).images
    np.testing.assert_array_equal(a, b)
    pil = ours(seed=7, **kw).images
    assert pil[0].size == (32, 32) and pil[0].mode == "RGB"


@pytest.mark.parametrize("kw, match", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(height=0), "height"),
    (dict(width=10**6), "width"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(prompt=[]), "prompt"),
    (dict(max_sequence_length=10**4), "max_sequence_length"),
    (dict(latents=np.zeros((1, 3, 64), np.float32)), "latents must be packed noise"),
])
def test_bad_input_raises_clear_errors(dev, kw, match):
    _, _, ours = dev
    kw = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 2, **kw}
    with pytest.raises(PipelineError, match=match):
        ours(progress=False, **kw)


def test_size_not_multiple_of_16_rounds_down_with_warning(dev):
    _, _, ours = dev
    with pytest.warns(UserWarning, match="multiples of 16"):
        out = ours("a cat", height=40, width=36, num_inference_steps=1, output_type="np", progress=False,
                   max_sequence_length=SEQ)
    assert out.images.shape == (1, 32, 32, 3)


def test_incomplete_folder_names_missing_piece(tmp_path, dev):
    import shutil
    folder, _, _ = dev
    shutil.copytree(folder, tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "vae")
    with pytest.raises(PipelineError, match="missing vae"):
        FluxPipeline.from_pretrained(tmp_path / "broken")


def test_scanned_blocks_as_on_tpu(dev):
    """scan_layers=True (stacked params under nn.scan; the default on TPUs) gives the reference's output too."""
    folder, ref, default = dev
    assert not default.cfg.scan_layers and "double_blocks_0" in default.params  # CPU default: unrolled
    ours = FluxPipeline.from_pretrained(folder, scan_layers=True)
    assert ours.cfg.scan_layers and "double_blocks" in ours.params
    compare(ref, ours, noise(1, seed=8), prompt="a red fox")
