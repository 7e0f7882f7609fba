"""Training data: an image-caption folder, aspect-ratio buckets, and the batch loader over the cache.

    examples = scan_folder("data/cats", resolution=1024)              # DataError listing every problem
    cache = build_cache(examples, pipe, "data/cats/.cache", 512)        # see cache.py
    it = make_iterator(cache, batch_size=4, seed=0, caption_dropout=0.1)
    batch = next(it)   # {"latents": (B, h, w, 16) float32, "txt": (B, L, D), "y": (B, D_pooled)[, "control"]}
    state = it.get_state()                                              # JSON; it.set_state(state) resumes

Folder layout: NAME.png / .jpg / .jpeg / .webp (any case) with its caption in NAME.txt (UTF-8,
surrounding whitespace stripped, may be empty). Kontext pairs also need the condition image
control/NAME.<image ext>, fitted to its target's bucket. Only the folder's top level is read;
hidden files, and a .txt or control image without a target image, are ignored.

Buckets: every (h, w) with sides multiples of `step` (16 px: one token), h·w <= resolution², aspect
w/h from 1:4 to 4:1, and maximal: neither side can grow by a step without passing the area budget;
plus the largest square (not maximal when resolution is not a multiple of 16: 1000 gives 992x992).
An image takes the bucket nearest its own aspect ratio (in log space, so 1:2 and 2:1 are equally
far from 1:1; ties: the larger area), is resized with Lanczos to cover it and centre-cropped.

Batches: every batch holds examples of one bucket. Epoch e shuffles each bucket with a seed of
(seed, e), cuts it into batches (a last partial batch wraps around within its bucket, so nothing
is skipped) and shuffles the batch order; epochs repeat forever. Global batch g is a pure function
of (seed, g), so grain's iterator state (the next g) resumes exactly.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import grain
import numpy as np
from PIL import Image

from ..config import PIXELS_PER_TOKEN
from ..images import RESAMPLE, load_image, prepare_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXT = ".txt"
CONTROL_DIR = "control"
MAX_ASPECT = 4.0  # buckets span aspect ratios (w/h) from 1/MAX_ASPECT to MAX_ASPECT
MAX_LISTED = 20  # problems listed one per line in a DataError; the rest are counted
EXIF_ORIENTATION = 0x0112
EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
# Independent random streams derived from the user's seed (SeedSequence entropy tags).
SHUFFLE_STREAM = 1
DROPOUT_STREAM = 2
DEFAULT_THREADS = 2  # grain reader threads: a batch is a few np.load calls
DEFAULT_PREFETCH = 4  # batches read ahead; grain's default (500) would hold GBs of T5 states


class DataError(ValueError):
    """Training data that cannot be used: the message lists every problem found."""


@dataclass(frozen=True)
class Example:
    name: str  # file stem: the key of its cache entry
    image_path: Path
    caption: str
    control_path: Optional[Path]  # Kontext condition image, None for text-to-image
    bucket: tuple[int, int]  # (height, width) in pixels


# ---------------------------------------------------------------- buckets

def make_buckets(resolution: int, step: int = PIXELS_PER_TOKEN) -> list[tuple[int, int]]:
    """Maximal (h, w), sides multiples of `step`, h·w <= resolution², aspect 1:4 to 4:1, and the
    largest square; sorted by h."""
    if step < PIXELS_PER_TOKEN or step % PIXELS_PER_TOKEN:
        raise DataError(f"bucket step {step} must be a positive multiple of {PIXELS_PER_TOKEN} pixels")
    if resolution < step:
        raise DataError(f"resolution {resolution} is below the bucket step {step}: use at least {step}")
    area = resolution * resolution
    longest = lambda other: area // other // step * step  # largest side that keeps the area budget
    side = resolution // step * step
    buckets = {(side, side)}  # not maximal when resolution is not a multiple of step, but square images need it
    for h in range(step, area // step + 1, step):
        w = longest(h)
        if w >= step and longest(w) == h and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
            buckets.add((h, w))
    return sorted(buckets)


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (log scale) the image's; ties: the larger area."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - aspect), -b[0] * b[1], b[0]))


def crop_box(width: int, height: int, bucket: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred (left, top, right, bottom) region of a width x height image with the bucket's aspect."""
    bh, bw = bucket
    if width * bh > height * bw:  # wider than the bucket: crop the sides
        cw = height * bw / bh
        return ((width - cw) / 2, 0.0, (width + cw) / 2, float(height))
    ch = width * bh / bw
    return (0.0, (height - ch) / 2, float(width), (height + ch) / 2)


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize (Lanczos) to cover the bucket and centre-crop, in one resample of the crop region."""
    bh, bw = bucket
    if image.size == (bw, bh):
        return image
    return image.resize((bw, bh), resample=RESAMPLE, box=crop_box(image.width, image.height, bucket))


def load_pixels(path, bucket: tuple[int, int]) -> np.ndarray:
    """An image file -> float32 (h, w, 3) in [-1, 1], upright (EXIF), fitted to the bucket."""
    image = fit_to_bucket(load_image(path, name=Path(path).name), bucket)
    return prepare_image(image, *bucket)[0]


# ---------------------------------------------------------------- scanning a folder

def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) as load_image will see it (EXIF-rotated); raises if PIL cannot read the file."""
    with Image.open(path) as im:
        im.verify()  # checks the file's structure (PNG CRCs, ...); the object is unusable afterwards
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(EXIF_ORIENTATION, 1) in EXIF_TRANSPOSED:
            w, h = h, w
    return h, w


def _check_image(path: Path, problems: list[str], label: str) -> Optional[tuple[int, int]]:
    try:
        return _image_size(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        problems.append(f"{label}: cannot read as an image ({type(e).__name__}: {e})")
        return None


def _images_by_name(folder: Path, problems: list[str], where: str = "") -> dict[str, Path]:
    """{stem: path} of the image files directly in folder; two images with one name are a problem."""
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):  # ._x.png: macOS
            found.setdefault(p.stem, []).append(p)
    for stem, paths in found.items():
        if len(paths) > 1:
            problems.append(f"{where}{stem}: several images share the name ({', '.join(p.name for p in paths)}); "
                            f"keep one")
    return {stem: paths[0] for stem, paths in found.items() if len(paths) == 1}


def _raise_problems(folder: Path, problems: list[str]) -> None:
    if not problems:
        return
    lines = [f"{folder}: {len(problems)} problem(s) in the training data; fix them and run again:"]
    lines += [f"  {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    raise DataError("\n".join(lines))


def scan_folder(folder, resolution: int, kontext: bool = False, step: int = PIXELS_PER_TOKEN) -> list[Example]:
    """Every image-caption pair of `folder` (sorted by name), each opened and checked, with its bucket.

    Raises DataError listing all problems at once: unreadable images, missing captions, missing
    control images (kontext=True), several images with one name, or no images at all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder; pass a folder of NAME.png + NAME.txt pairs")
    buckets = make_buckets(resolution, step)
    problems: list[str] = []
    images = _images_by_name(folder, problems)
    controls: dict[str, Path] = {}
    if kontext:
        if (folder / CONTROL_DIR).is_dir():
            controls = _images_by_name(folder / CONTROL_DIR, problems, f"{CONTROL_DIR}/")
        elif images:
            problems.append(f"no {CONTROL_DIR}/ folder: Kontext training needs {CONTROL_DIR}/NAME.png "
                            f"beside each NAME.png")
    if not images and not problems:
        problems.append(f"no images ({', '.join(IMAGE_EXTS)}) found; each needs a caption file NAME{CAPTION_EXT}")
    examples = []
    for name, path in images.items():
        size = _check_image(path, problems, path.name)
        caption = None
        caption_path = path.with_suffix(CAPTION_EXT)
        if not caption_path.is_file():
            problems.append(f"{path.name}: no caption file {caption_path.name} (an empty file is allowed)")
        else:
            try:
                caption = caption_path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                problems.append(f"{caption_path.name}: cannot read as UTF-8 text ({e})")
        control = controls.get(name) if kontext else None
        if kontext and (folder / CONTROL_DIR).is_dir() and control is None:
            problems.append(f"{path.name}: no control image {CONTROL_DIR}/{name}.* (Kontext training needs one)")
        if control is not None and _check_image(control, problems, f"{CONTROL_DIR}/{control.name}") is None:
            control = None
        if size is not None and caption is not None and (control is not None or not kontext):
            examples.append(Example(name, path, caption, control, choose_bucket(*size, buckets)))
    _raise_problems(folder, problems)
    return examples


# ---------------------------------------------------------------- batches over the cache

class CacheLike(Protocol):
    """What the loader reads: cache.Cache, or anything with the same members."""
    buckets: Sequence[tuple[int, int]]

    def __len__(self) -> int: ...
    def load(self, i: int) -> dict[str, np.ndarray]: ...
    def empty_caption(self) -> tuple[np.ndarray, np.ndarray]: ...


def _bucket_members(buckets: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Example indices of each distinct bucket, buckets in sorted order (a stable plan for a seed)."""
    keys = sorted(set(map(tuple, buckets)))
    return [np.array([i for i, b in enumerate(buckets) if tuple(b) == k], np.int64) for k in keys]


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def epoch_size(cache: CacheLike, batch_size: int) -> int:
    """Batches per epoch: each bucket's examples in ceil(n / batch_size) batches."""
    _check_batch_size(batch_size)
    return sum(-(-len(m) // batch_size) for m in _bucket_members(cache.buckets))


def epoch_plan(buckets: Sequence[tuple[int, int]], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The example indices of each batch of `epoch`, in order: one bucket per batch, all examples once."""
    rng = np.random.default_rng((SHUFFLE_STREAM, seed, epoch))
    batches = []
    for members in _bucket_members(buckets):
        order = rng.permutation(members)
        n_batches = -(-len(order) // batch_size)
        rows = np.resize(order, n_batches * batch_size)  # np.resize repeats cyclically: the wrap-around
        batches += list(rows.reshape(n_batches, batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def dropout_mask(seed: int, batch_index: int, batch_size: int, p: float) -> np.ndarray:
    """Rows of global batch `batch_index` whose caption is dropped: row r from the stream (seed, g)."""
    if p <= 0:
        return np.zeros(batch_size, bool)
    return np.random.default_rng((DROPOUT_STREAM, seed, batch_index)).random(batch_size) < p


class BatchReader:
    """Global batch index -> batch dict; a pure function of (cache, batch_size, seed, index)."""

    def __init__(self, cache: CacheLike, batch_size: int, seed: int, caption_dropout: float = 0.0):
        _check_batch_size(batch_size)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be an integer >= 0, got {seed!r}")
        if not 0 <= caption_dropout <= 1:
            raise DataError(f"caption_dropout is a probability from 0 to 1, got {caption_dropout!r}")
        if len(cache) == 0:
            raise DataError("the cache holds no examples: build it from a non-empty folder")
        self.cache, self.batch_size, self.seed, self.p = cache, int(batch_size), int(seed), float(caption_dropout)
        self.buckets = [tuple(b) for b in cache.buckets]
        self.epoch_size = epoch_size(cache, batch_size)
        self.empty_txt, self.empty_y = cache.empty_caption()
        # Reader threads ask for neighbouring batches: keep the current and next epoch's plans.
        self.plan = functools.lru_cache(maxsize=2)(
            lambda epoch: epoch_plan(self.buckets, self.batch_size, self.seed, epoch))

    def signature(self) -> dict:
        """What the batch order depends on: stored with the iterator state to detect a changed plan."""
        buckets = hashlib.sha1(json.dumps([list(b) for b in self.buckets]).encode()).hexdigest()[:16]
        return {"examples": len(self.buckets), "epoch_size": self.epoch_size, "batch_size": self.batch_size,
                "seed": self.seed, "caption_dropout": self.p, "buckets_sha1": buckets}

    def __call__(self, index: int, _=None) -> dict[str, np.ndarray]:
        epoch, k = divmod(int(index), self.epoch_size)
        rows = self.plan(epoch)[k]
        items = [self.cache.load(int(i)) for i in rows]
        batch = {key: np.stack([it[key] for it in items]) for key in items[0]}
        for key in ("latents", "control"):
            if key in batch:
                batch[key] = batch[key].astype(np.float32)
        drop = dropout_mask(self.seed, int(index), len(rows), self.p)
        batch["txt"][drop] = self.empty_txt
        batch["y"][drop] = self.empty_y
        return batch


class _CheckedIterator(grain.DatasetIterator):
    """grain's iterator, its state tagged with the plan's signature; a mismatch on restore warns."""

    def __init__(self, parent: grain.DatasetIterator, signature: dict):
        super().__init__(parent)
        self._signature = signature

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return {"batches": self._parent.get_state(), "plan": self._signature}

    def set_state(self, state: dict) -> None:
        if state.get("plan") != self._signature:
            warnings.warn(f"the data iterator state was saved for another dataset or loader settings "
                          f"({state.get('plan')} now {self._signature}): continuing at the same batch index, "
                          f"so the order differs from an uninterrupted run", stacklevel=2)
        self._parent.set_state(state["batches"])


def make_dataset(cache: CacheLike, batch_size: int, seed: int, caption_dropout: float = 0.0) -> grain.MapDataset:
    """An infinite grain MapDataset: element g is global batch g (epoch g // epoch_size)."""
    return _dataset(BatchReader(cache, batch_size, seed, caption_dropout))


def _dataset(reader: BatchReader) -> grain.MapDataset:
    # range(E).repeat() is infinite (len sys.maxsize); map_with_index gets the global index and the
    # reader's plan handles epochs. (Not grain's shuffle: it reseeds epoch e with seed + e, so seed
    # s's second epoch would be seed s+1's first.)
    return grain.MapDataset.range(reader.epoch_size).repeat().map_with_index(reader)


def make_iterator(cache: CacheLike, batch_size: int, seed: int, caption_dropout: float = 0.0, *,
                  num_threads: int = DEFAULT_THREADS, prefetch: int = DEFAULT_PREFETCH) -> grain.DatasetIterator:
    """A checkpointable iterator of batch dicts: get_state() is JSON, set_state() resumes exactly.

    Single host: every process reads the whole global batch. For several hosts each would read
    only its rows of each batch (BatchReader's rows), with the same plan.
    """
    reader = BatchReader(cache, batch_size, seed, caption_dropout)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return _CheckedIterator(iter(_dataset(reader).to_iter_dataset(options)), reader.signature())
