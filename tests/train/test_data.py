"""flux_jax.train.data: folder scanning, aspect buckets, resize + crop, and the grain batch loader."""
import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from flux_jax.train.data import (DataError, Example, choose_bucket, dropout_mask, epoch_plan, epoch_size,
                                 fit_to_bucket, load_pixels, make_buckets, make_dataset, make_iterator,
                                 scan_folder)

EXIF_ROTATE_90 = 6  # "rotate 90 CW to view": width and height swap


def write_image(path, size=(48, 32), seed=0, fmt=None):
    """Random RGB noise of PIL size (w, h)."""
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format=fmt)
    return a


def write_pair(folder, name, caption="a photo", ext=".png", size=(48, 32), seed=0):
    write_image(folder / f"{name}{ext}", size, seed)
    (folder / f"{name}.txt").write_text(caption)


# ---------------------------------------------------------------- scanning

def test_scan_reads_pairs_case_insensitive_extensions_and_captions(tmp_path):
    write_pair(tmp_path, "b", caption="  two cats \n", ext=".PNG", size=(64, 32))
    write_pair(tmp_path, "a", caption="", ext=".jpeg")
    (tmp_path / "orphan.txt").write_text("a caption without an image is ignored")
    write_image(tmp_path / "notes" / "deep.png")  # subfolders are not read
    examples = scan_folder(tmp_path, resolution=64)
    assert [e.name for e in examples] == ["a", "b"]
    assert examples[0].caption == "" and examples[1].caption == "two cats"
    assert examples[1].image_path == tmp_path / "b.PNG" and examples[1].control_path is None
    assert examples[1].bucket == (48, 80)  # aspect 2: 80/48 is nearer than 128/32


def test_scan_kontext_finds_control_of_any_extension_and_ignores_extra_controls(tmp_path):
    write_pair(tmp_path, "x")
    write_image(tmp_path / "control" / "x.WEBP", fmt="WEBP")
    write_image(tmp_path / "control" / "unused.png")  # a control without a target is fine
    (ex,) = scan_folder(tmp_path, resolution=64, kontext=True)
    assert ex.control_path == tmp_path / "control" / "x.WEBP"
    (plain,) = scan_folder(tmp_path, resolution=64)  # without kontext the control folder is not used
    assert plain.control_path is None


def test_scan_lists_every_problem_in_one_error(tmp_path):
    write_pair(tmp_path, "good")
    write_image(tmp_path / "nocaption.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "broken.txt").write_text("x")
    write_pair(tmp_path, "twice", ext=".png")
    write_image(tmp_path / "twice.jpg")
    write_pair(tmp_path, "nocontrol")
    for name in ("good", "nocaption", "broken", "twice"):
        write_image(tmp_path / "control" / f"{name}.png")
    (tmp_path / "control" / "broken_control.png").write_bytes(b"junk")
    write_pair(tmp_path, "broken_control")
    with pytest.raises(DataError) as e:
        scan_folder(tmp_path, resolution=64, kontext=True)
    lines = str(e.value).splitlines()
    assert str(tmp_path) in lines[0] and "5 problem" in lines[0]
    body = "\n".join(lines[1:])
    for expected in ("nocaption.png: no caption file nocaption.txt", "broken.png: cannot read as an image",
                     "twice: several images share the name", "nocontrol.png: no control image control/nocontrol",
                     "control/broken_control.png: cannot read"):
        assert expected in body, (expected, body)
    assert len(lines) == 6


def test_scan_caps_the_listing(tmp_path):
    for i in range(25):
        write_image(tmp_path / f"img{i:02d}.png", size=(16, 16))
    with pytest.raises(DataError) as e:
        scan_folder(tmp_path, resolution=32)
    lines = str(e.value).splitlines()
    assert "25 problem" in lines[0] and lines[-1].strip() == "... and 5 more" and len(lines) == 1 + 20 + 1


def test_scan_empty_or_missing_folder(tmp_path):
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        scan_folder(tmp_path, resolution=64)
    with pytest.raises(DataError, match="no such data folder"):
        scan_folder(tmp_path / "absent", resolution=64)
    write_pair(tmp_path, "a")
    with pytest.raises(DataError, match="no control/ folder"):
        scan_folder(tmp_path, resolution=64, kontext=True)


def test_scan_uses_exif_orientation_for_the_bucket(tmp_path):
    a = np.zeros((32, 96, 3), np.uint8)  # stored landscape, shown portrait
    exif = Image.Exif()
    exif[0x0112] = EXIF_ROTATE_90
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif)
    (tmp_path / "r.txt").write_text("x")
    (ex,) = scan_folder(tmp_path, resolution=64)
    assert ex.bucket[0] > ex.bucket[1]
    assert load_pixels(ex.image_path, ex.bucket).shape == (*ex.bucket, 3)


# ---------------------------------------------------------------- buckets

@pytest.mark.parametrize("resolution", [64, 256, 1000, 1024])
def test_buckets_are_maximal_multiples_of_16_within_area_and_aspect(resolution):
    buckets = make_buckets(resolution)
    area = resolution ** 2
    assert buckets and sorted(buckets) == buckets and set(buckets) == {(w, h) for h, w in buckets}
    side = resolution // 16 * 16
    assert (side, side) in buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0 and h * w <= area
        assert 1 / 4 <= w / h <= 4
        if (h, w) != (side, side):
            assert (h + 16) * w > area and h * (w + 16) > area  # no side can grow


def test_known_bucket_sets_and_choices():
    assert make_buckets(64) == [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]
    b1024 = make_buckets(1024)
    assert choose_bucket(1080, 1920, b1024) == (768, 1360)  # 16:9 -> aspect 1.771
    assert choose_bucket(1920, 1080, b1024) == (1360, 768)
    assert choose_bucket(500, 500, b1024) == (1024, 1024)
    assert choose_bucket(100, 1000, b1024) == (512, 2048)  # beyond 4:1: the widest bucket
    assert choose_bucket(700, 700, make_buckets(1000)) == (992, 992)  # 1000 is no multiple of 16
    # nearest aspect in log space: no other bucket is nearer
    for h, w in [(333, 517), (900, 700), (123, 456)]:
        best = choose_bucket(h, w, b1024)
        dist = lambda b: abs(math.log(b[1] / b[0]) - math.log(w / h))
        assert all(dist(best) <= dist(b) for b in b1024)


def test_bucket_arguments_are_checked():
    with pytest.raises(DataError, match="multiple of 16"):
        make_buckets(256, step=24)
    with pytest.raises(DataError, match="resolution 8"):
        make_buckets(8)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in make_buckets(512, step=64))


# ---------------------------------------------------------------- resize + crop

def test_crop_without_scaling_is_exact(tmp_path):
    a = write_image(tmp_path / "n.png", size=(48, 32))  # 48 wide, 32 high -> (32, 32): drop 8 columns each side
    px = load_pixels(tmp_path / "n.png", (32, 32))
    assert px.dtype == np.float32 and px.shape == (32, 32, 3)
    np.testing.assert_array_equal(px, a[:, 8:40].astype(np.float32) / 255 * 2 - 1)
    tall = np.random.default_rng(1).integers(0, 256, (64, 32, 3), dtype=np.uint8)  # crop rows instead
    out = np.asarray(fit_to_bucket(Image.fromarray(tall), (32, 32)))
    np.testing.assert_array_equal(out, tall[16:48])


def test_resize_covers_the_bucket_and_keeps_the_centre():
    # 128x64 image: outer quarters black (cropped away), the centre square red on top, green below.
    a = np.zeros((64, 128, 3), np.uint8)
    a[:32, 32:96] = (255, 0, 0)
    a[32:, 32:96] = (0, 255, 0)
    out = np.asarray(fit_to_bucket(Image.fromarray(a), (16, 16))).astype(int)  # downscale x4 after the crop
    assert out.shape == (16, 16, 3)
    inner = slice(2, 14)  # away from the borders, where Lanczos sees the black beyond the crop
    assert (out[1:6, inner, 0] > 240).all() and (out[1:6, inner, 1] < 15).all()
    assert (out[10:15, inner, 1] > 240).all() and (out[10:15, inner, 0] < 15).all()
    profile = out.max(-1).mean(0)  # brightness by column: black would bleed into one side if off-centre
    np.testing.assert_allclose(profile, profile[::-1], atol=1)
    assert profile.min() > 200


# ---------------------------------------------------------------- the loader

class FakeCache:
    """Cache-like: example i has latents full of i, txt/y full of i + 1; the empty caption is zeros."""
    L, D = 3, 4

    def __init__(self, buckets, control=False):
        self.buckets = list(buckets)
        self.control = control

    def __len__(self):
        return len(self.buckets)

    def load(self, i):
        h, w = self.buckets[i]
        d = {"latents": np.full((h // 8, w // 8, 16), i, np.float16),
             "txt": np.full((self.L, self.D), i + 1, np.float32), "y": np.full((self.D,), i + 1, np.float32)}
        if self.control:
            d["control"] = -d["latents"]
        return d

    def empty_caption(self):
        return np.zeros((self.L, self.D), np.float32), np.zeros((self.D,), np.float32)


BUCKETS = [(16, 16)] * 5 + [(16, 32)] * 3 + [(32, 16)] * 1  # 9 examples; batch 2 -> 3 + 2 + 1 batches


def take(it, n):
    return [next(it) for _ in range(n)]


def ids(batch):
    return batch["latents"][:, 0, 0, 0].astype(int).tolist()


def test_every_batch_is_one_bucket_and_an_epoch_sees_every_example():
    cache = FakeCache(BUCKETS)
    assert epoch_size(cache, 2) == 6 and epoch_size(cache, 4) == 4 and epoch_size(cache, 100) == 3
    it = make_iterator(cache, batch_size=2, seed=0)
    epochs = [take(it, 6), take(it, 6)]
    for batches in epochs:
        seen = Counter()
        for b in batches:
            assert b["latents"].dtype == np.float32 and set(b) == {"latents", "txt", "y"}
            rows = ids(b)
            assert len({BUCKETS[i] for i in rows}) == 1
            assert b["latents"].shape == (2, *(s // 8 for s in BUCKETS[rows[0]]), 16)
            np.testing.assert_array_equal(b["txt"][:, 0, 0], np.array(rows) + 1)  # rows stay aligned
            seen.update(rows)
        assert set(seen) == set(range(9))
        # 12 rows for 9 examples: the 3 extra fill partial batches by wrapping within their bucket
        assert sum(seen.values()) == 12 and sum(c - 1 for c in seen.values()) == 3
    assert [ids(b) for b in epochs[0]] != [ids(b) for b in epochs[1]]  # reshuffled each epoch


def test_wraparound_when_a_bucket_is_smaller_than_the_batch():
    plan = epoch_plan([(16, 16)] * 3, batch_size=8, seed=0, epoch=0)
    assert len(plan) == 1 and sorted(Counter(plan[0].tolist()).values()) == [2, 3, 3]


def test_order_is_reproducible_for_a_seed_and_differs_across_seeds():
    cache = FakeCache(BUCKETS)
    order = lambda seed: [ids(b) for b in take(make_iterator(cache, 2, seed), 12)]
    assert order(3) == order(3)
    assert order(3) != order(4)
    # epoch e of seed s is not epoch e-1 of seed s+1 (as grain's own shuffle would make it)
    plan = lambda seed, epoch: [p.tolist() for p in epoch_plan(BUCKETS, 2, seed, epoch)]
    assert plan(5, 1) != plan(6, 0) and plan(5, 1) == plan(5, 1)


def test_caption_dropout_rate_and_reproducibility():
    cache = FakeCache([(16, 16)] * 7)
    p, n_batches, bs = 0.3, 150, 4
    batches = take(make_iterator(cache, bs, seed=1, caption_dropout=p), n_batches)
    dropped = []
    for b in batches:
        rows = np.array(ids(b))
        is_empty = (b["txt"] == 0).all(axis=(1, 2))
        assert ((b["y"] == 0).all(axis=1) == is_empty).all()  # txt and y dropped together
        kept = ~is_empty
        np.testing.assert_array_equal(b["txt"][kept, 0, 0], rows[kept] + 1)
        dropped += is_empty.tolist()
    rate = np.mean(dropped)
    assert abs(rate - p) < 0.06, rate  # 600 rows: std ~0.019
    again = take(make_iterator(cache, bs, seed=1, caption_dropout=p), n_batches)
    assert all(np.array_equal(a["txt"], b["txt"]) for a, b in zip(batches, again))
    assert not dropout_mask(1, 0, 64, 0.0).any() and dropout_mask(1, 0, 64, 1.0).all()
    assert not np.array_equal(dropout_mask(1, 0, 64, 0.5), dropout_mask(2, 0, 64, 0.5))


@pytest.mark.parametrize("threads", [0, 3])
def test_iterator_state_resumes_exactly(threads):
    cache = FakeCache(BUCKETS, control=True)
    it = make_iterator(cache, 2, seed=7, caption_dropout=0.5, num_threads=threads)
    take(it, 8)  # past the first epoch (6 batches)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 7)
    fresh = make_iterator(cache, 2, seed=7, caption_dropout=0.5, num_threads=threads)
    take(fresh, 1)  # a used iterator is repositioned too
    fresh.set_state(state)
    for a, b in zip(expected, take(fresh, 7)):
        assert a.keys() == b.keys() == {"latents", "txt", "y", "control"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert (expected[0]["control"] == -expected[0]["latents"]).all()


def test_the_dataset_is_random_access_by_global_batch_index():
    cache = FakeCache(BUCKETS)
    batches = take(make_iterator(cache, 2, seed=2, caption_dropout=0.5), 15)
    ds = make_dataset(cache, 2, seed=2, caption_dropout=0.5)
    for g in (0, 5, 6, 14):
        assert ids(ds[g]) == ids(batches[g]) and np.array_equal(ds[g]["txt"], batches[g]["txt"])


def test_restoring_another_plan_warns():
    state = make_iterator(FakeCache(BUCKETS), 2, seed=0).get_state()
    with pytest.warns(UserWarning, match="another dataset or loader settings"):
        make_iterator(FakeCache(BUCKETS), 3, seed=0).set_state(state)


def test_loader_arguments_are_checked():
    cache = FakeCache(BUCKETS)
    for kw, msg in [(dict(batch_size=0), "batch_size"), (dict(seed=-1), "seed"),
                    (dict(caption_dropout=1.5), "caption_dropout")]:
        args = dict(batch_size=2, seed=0, caption_dropout=0.0) | kw
        with pytest.raises(DataError, match=re.escape(msg)):
            make_iterator(cache, **args)
    with pytest.raises(DataError, match="no examples"):
        make_iterator(FakeCache([]), 2, 0)


def test_example_is_frozen(tmp_path):
    ex = Example("a", tmp_path / "a.png", "c", None, (16, 16))
    with pytest.raises(AttributeError):
        ex.caption = "other"
