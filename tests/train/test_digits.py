"""scikit-learn's digits as training data: splits, rendering, image-caption folders, and the judge classifier."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flux_jax.train.digits import (CONTROL_DIR, MIRROR_PROMPT, DigitClassifier, digit_images, digit_prompt,
                                   load_digits, to_source_levels, write_digits)

N_DIGITS = 1797  # sklearn's digits
SIDE = 32
CLASSIFIER_MIN_ACCURACY = 0.95  # measured 0.992 on the train split, which the classifier never saw
LIMIT = 6
CHIRAL_DIGITS = (3, 5, 6, 7)  # digits whose mirror image reads as no digit of their class


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier()


@pytest.fixture(scope="module")
def train():
    return digit_images("train", SIDE)


def test_splits_partition_the_data_set():
    (a, la), (b, lb) = load_digits("train"), load_digits("holdout")
    assert len(a) + len(b) == N_DIGITS and abs(len(a) - len(b)) <= 1
    assert a.shape[1:] == (8, 8) and a.max() == 16 and a.min() == 0
    assert set(la) == set(lb) == set(range(10))
    # no holdout image appears in the train split
    train_rows = {row.tobytes() for row in a}
    assert not any(row.tobytes() in train_rows for row in b)


def test_unknown_split():
    with pytest.raises(ValueError, match="holdout"):
        digit_images("test")


def test_images_are_white_digits_on_black(train):
    images, labels = train
    assert images.shape == (len(load_digits("train")[0]), SIDE, SIDE, 3) and images.dtype == np.uint8
    assert labels.shape == (len(images),)
    assert np.array_equal(images[..., 0], images[..., 2])  # grey, as RGB
    # white ink on a mostly black ground; sklearn's digits leave the left and right columns empty
    assert images.max() == 255 and images.mean() < 100 and (images < 30).mean() > 0.4
    assert images[:, :, :2].mean() < 5 and images[:, :, -2:].mean() < 5
    # smooth upscaling: more than the 17 source grey levels survive
    assert len(np.unique(images)) > 100


def test_prompt_format():
    assert digit_prompt(3) == "a photo of the digit 3"
    assert digit_prompt(np.int64(0)) == "a photo of the digit 0"


def test_write_text_to_image_folder(tmp_path, train):
    written = write_digits(tmp_path, limit=LIMIT)
    images, labels = train
    assert [label for _, label in written] == list(labels[:LIMIT])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{name}.{ext}" for name, _ in written for ext in ("png", "txt"))
    for i, (name, label) in enumerate(written):
        assert (tmp_path / f"{name}.txt").read_text() == digit_prompt(label)
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{name}.png")), images[i])


def test_write_kontext_mirror_folder(tmp_path, train):
    written = write_digits(tmp_path, split="train", limit=LIMIT, kontext=True)
    images, _ = train
    assert sorted(p.name for p in (tmp_path / CONTROL_DIR).iterdir()) == sorted(f"{n}.png" for n, _ in written)
    for i, (name, _) in enumerate(written):
        control = np.asarray(Image.open(tmp_path / CONTROL_DIR / f"{name}.png"))
        target = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert np.array_equal(control, images[i]) and np.array_equal(target, images[i][:, ::-1])
        assert not np.array_equal(target, control)  # digits are not mirror-symmetric
        assert (tmp_path / f"{name}.txt").read_text() == MIRROR_PROMPT


def test_write_rejects_bad_limit(tmp_path):
    with pytest.raises(ValueError, match="limit"):
        write_digits(tmp_path, limit=0)


def test_classifier_recognises_unseen_digits(classifier, train):
    images, labels = train
    accuracy = classifier.accuracy(images, labels)
    assert accuracy > CLASSIFIER_MIN_ACCURACY, accuracy


def test_classifier_accepts_floats_and_any_side(classifier, train):
    images, labels = train
    subset = slice(0, 200)
    as_uint8 = classifier.predict(images[subset])
    assert np.array_equal(classifier.predict(images[subset].astype(np.float32) / 255), as_uint8)
    small, _ = digit_images("train", 16)
    assert np.mean(classifier.predict(small[subset]) == labels[subset]) > CLASSIFIER_MIN_ACCURACY
    assert np.mean(classifier.predict(images[subset, ..., 0]) == as_uint8) == 1.0  # (N, H, W) grey


def test_classifier_sees_orientation(classifier, train):
    # judging the Kontext mirror task needs a classifier that tells a digit from its mirror image
    images, labels = train
    chiral = np.isin(labels, CHIRAL_DIGITS)
    assert classifier.accuracy(images[chiral][:, :, ::-1], labels[chiral]) < 0.2  # measured 0.0


def test_source_levels_round_trip(train):
    images, _ = train
    grey, _ = load_digits("train")
    levels = to_source_levels(images[:50])
    # box-downsampling the bicubic upscale recovers the 8x8 grey levels to within ~1 level of 16
    assert np.abs(levels - grey[:50].reshape(50, -1)).mean() < 1.0
