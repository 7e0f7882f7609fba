"""Real images that ship in a pip package: scikit-learn's 8x8 handwritten digits, for tests and demos.

    images, labels = digit_images("train", side=32)         # uint8 (N, 32, 32, 3), white on black
    write_digits("data/digits", limit=64)                    # NAME.png + NAME.txt "a photo of the digit 3"
    write_digits("data/mirror", kontext=True)                # control/NAME.png -> NAME.png mirrored
    DigitClassifier().predict(images)                        # labels; trained on the other split only

The 1797 digits are split by index parity: even indices ("train") are for the generator,
odd ones ("holdout") for the classifier that judges the generator's pictures, so the judge
never saw the images the generator learnt from.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import numpy as np

SPLITS = ("train", "holdout")
SOURCE_MAX = 16  # sklearn's digits are 8x8 grey levels 0..16 (16 = ink)
SOURCE_SIDE = 8
DEFAULT_SIDE = 32  # 2x2 tokens of 16 pixels: the smallest size whose latents are more than one token
MIRROR_PROMPT = "mirror the digit"
CONTROL_DIR = "control"  # Kontext pairs: the condition image, under the same name as its target
# SVC with an RBF kernel on the 64 grey levels: ~99% on unseen sklearn digits (a linear model ~96%).
SVC_GAMMA = 0.001
SVC_C = 10.0


def digit_prompt(digit: int) -> str:
    """The caption of a digit image; generator training and evaluation must use the same words."""
    return f"a photo of the digit {int(digit)}"


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits data set comes with scikit-learn: pip install scikit-learn") from None
    return load_digits()


@functools.lru_cache(maxsize=None)
def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 (N, 8, 8) grey levels 0..16, int labels) of one split: even ('train') or odd ('holdout') indices."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; use one of {SPLITS}")
    data = _sklearn_digits()
    rows = slice(SPLITS.index(split), None, 2)
    images, labels = data.images[rows], data.target[rows]
    images.flags.writeable = labels.flags.writeable = False  # cached: callers share these arrays
    return images, labels


def upscale(grey: np.ndarray, side: int) -> np.ndarray:
    """(N, 8, 8) levels 0..16 -> uint8 (N, side, side, 3): bicubic, so strokes stay smooth, not blocky."""
    from PIL import Image

    levels = np.clip(np.round(grey * (255 / SOURCE_MAX)), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(g).resize((side, side), Image.BICUBIC)) for g in levels])
    return np.repeat(big[..., None], 3, axis=-1)


def digit_images(split: str = "train", side: int = DEFAULT_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, side, side, 3) white digits on black, int labels (N,)) of `split`."""
    if not isinstance(side, (int, np.integer)) or side < SOURCE_SIDE:
        raise ValueError(f"side must be an integer >= {SOURCE_SIDE} pixels, got {side!r}")
    grey, labels = load_digits(split)
    return upscale(grey, int(side)), np.array(labels)


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1], the VAE's input range."""
    return np.asarray(images, np.float32) / 127.5 - 1


def write_digits(folder, split: str = "train", side: int = DEFAULT_SIDE, limit: Optional[int] = None,
                 kontext: bool = False) -> list[tuple[str, int]]:
    """Write an image-caption folder of `split`'s digits; returns [(name, label)] in order.

    Text-to-image: NAME.png with NAME.txt = digit_prompt(label). kontext=True: a mirror-edit
    task: control/NAME.png is the digit, NAME.png its left-right mirror, NAME.txt = MIRROR_PROMPT.
    """
    from PIL import Image

    images, labels = digit_images(split, side)
    if limit is not None:
        if not isinstance(limit, (int, np.integer)) or limit < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        images, labels = images[:limit], labels[:limit]
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    if kontext:
        (root / CONTROL_DIR).mkdir(exist_ok=True)
    written = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{split}_{i:04d}"
        if kontext:
            Image.fromarray(image).save(root / CONTROL_DIR / f"{name}.png")
            Image.fromarray(np.ascontiguousarray(image[:, ::-1])).save(root / f"{name}.png")
            caption = MIRROR_PROMPT
        else:
            Image.fromarray(image).save(root / f"{name}.png")
            caption = digit_prompt(label)
        (root / f"{name}.txt").write_text(caption)
        written.append((name, int(label)))
    return written


def to_source_levels(images: np.ndarray) -> np.ndarray:
    """Images of any side -> (N, 64) grey levels 0..16 at 8x8, as sklearn's digits are.

    Accepts uint8 (0..255) or float in [0, 1], (N, H, W, 3) or (N, H, W). Downsampling
    averages each source pixel's area (PIL's BOX), undoing `upscale` up to its smoothing.
    """
    from PIL import Image

    x = np.asarray(images)
    if x.ndim == 4:
        x = x.mean(-1)
    if x.ndim != 3:
        raise ValueError(f"images must be (N, H, W, 3) or (N, H, W), got shape {np.shape(images)}")
    unit = x / 255.0 if np.issubdtype(np.asarray(images).dtype, np.integer) else x
    unit = np.clip(unit.astype(np.float32), 0, 1)
    small = np.stack([np.asarray(Image.fromarray(u).resize((SOURCE_SIDE, SOURCE_SIDE), Image.BOX))
                      for u in unit])
    return small.reshape(len(small), -1) * SOURCE_MAX


class DigitClassifier:
    """An RBF-kernel SVC trained on the holdout split's digits, rendered at `side` and brought back to 8x8.

    Training on the round trip (upscale, then to_source_levels) puts it in the same input
    distribution as the pictures it will judge; predict accepts any side.
    """

    def __init__(self, split: str = "holdout", side: int = DEFAULT_SIDE):
        try:
            from sklearn.svm import SVC
        except ImportError:
            raise ImportError("DigitClassifier needs scikit-learn: pip install scikit-learn") from None
        images, labels = digit_images(split, side)
        self.split = split
        self.model = SVC(gamma=SVC_GAMMA, C=SVC_C).fit(to_source_levels(images), labels)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Labels (N,) of white-on-black digit images: uint8 or float [0, 1], (N, H, W, 3) or (N, H, W)."""
        return self.model.predict(to_source_levels(images)).astype(np.int64)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))
