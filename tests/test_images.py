"""flux_jax.images: reading, resizing and normalising inputs exactly as diffusers' VaeImageProcessor."""
from __future__ import annotations

import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from flux_jax.images import default_size, load_image, prepare_image, prepare_mask
from flux_jax.pipeline import PipelineError

SCALE = 16  # the Flux pipelines' VaeImageProcessor(vae_scale_factor=8 * 2)
EXIF_ORIENTATION = 0x0112
ROTATED_90_CW = 6  # EXIF: the stored pixels must be turned 90° clockwise to show upright


def picture(h: int = 80, w: int = 112, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def soft_mask(h: int = 80, w: int = 112) -> Image.Image:
    """A diagonal ramp: resizing moves values across 0.5, so binarisation is exercised."""
    ramp = (np.arange(h)[:, None] / h + np.arange(w)[None] / w) / 2
    return Image.fromarray((ramp * 255).astype(np.uint8), mode="L")


def test_image_resized_and_normalised_like_diffusers():
    pil = picture()
    want = VaeImageProcessor(vae_scale_factor=SCALE).preprocess(pil, height=64, width=96)
    got = prepare_image(load_image(pil), 64, 96)
    assert got.shape == (1, 64, 96, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want.permute(0, 2, 3, 1).numpy())


def test_mask_resized_and_binarised_like_diffusers():
    proc = VaeImageProcessor(vae_scale_factor=SCALE, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True)
    mask = soft_mask()
    want = proc.preprocess(mask, height=64, width=96)[:, 0].numpy()
    got = prepare_mask(load_image(mask, mode="L"), 64, 96)
    np.testing.assert_array_equal(got, want)
    assert set(np.unique(got)) == {0.0, 1.0}


def test_default_size_floors_to_16_like_diffusers():
    pil = picture(85, 121)
    assert default_size(pil) == VaeImageProcessor(vae_scale_factor=SCALE).get_default_height_width(pil) == (80, 112)


def test_path_array_and_pil_inputs_agree(tmp_path):
    pil = picture(32, 48)
    pil.save(tmp_path / "a.png")
    a = np.asarray(pil)
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), a, a / 255.0, pil.convert("RGBA")):
        np.testing.assert_array_equal(np.asarray(load_image(source)), a)
    grey = load_image(a[..., 0], mode="L")
    assert grey.mode == "L" and np.array_equal(np.asarray(grey), a[..., 0])
    assert np.asarray(load_image(np.ones((16, 16), bool), mode="L")).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    pil = picture(16, 32)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CW
    pil.save(tmp_path / "rotated.png", exif=exif)
    got = load_image(tmp_path / "rotated.png")
    assert got.size == (16, 32)  # PIL's (width, height): turned upright
    np.testing.assert_array_equal(np.asarray(got), np.asarray(pil.transpose(Image.Transpose.ROTATE_270)))


def test_mask_of_another_size_is_resized_with_a_warning():
    with pytest.warns(UserWarning, match="resizing the mask"):
        m = prepare_mask(soft_mask(40, 56), 64, 96, image_size=(112, 80))
    assert m.shape == (1, 64, 96)


@pytest.mark.parametrize("source, message", [
    ("missing.png", "no such file"),
    ("not_an_image.png", "cannot read"),
    (np.zeros((4, 4, 2), np.uint8), "must be"),
    (np.full((4, 4, 3), 1.5), r"\[0, 1\]"),
    (np.zeros((4, 4, 3), np.int64), "dtype"),
    (42, "file path, a PIL image or a numpy array"),
])
def test_bad_inputs_raise_one_clear_error(tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(PipelineError, match=message):
        load_image(source)


def test_too_small_image_is_refused():
    with pytest.raises(PipelineError, match="each side must be from 16"):
        default_size(picture(8, 64))
