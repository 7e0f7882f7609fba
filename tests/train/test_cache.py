"""flux_jax.train.cache: encoding a folder once with a tiny random pipeline, reuse, invalidation, Kontext."""
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from flux_jax import sharding
from flux_jax.demo import make_demo_pipeline
from flux_jax.pipeline import jit_apply
from flux_jax.train import cache as cache_mod
from flux_jax.train.cache import Cache, CacheError, build_cache, load_arrays, save_arrays
from flux_jax.train.data import DataError, Example, epoch_size, load_pixels, make_iterator, scan_folder

RESOLUTION = 64  # buckets (64, 64) and (48, 80) below: latents 8x8 and 6x10
MAX_LEN = 16
# name: (PIL size (w, h), caption); three squares and two 5:3 landscapes
IMAGES = {"a": ((64, 64), "a red square"), "b": ((70, 60), "blue"), "c": ((50, 50), ""),
          "d": ((96, 48), "a wide field"), "e": ((100, 60), "a wider field at dusk")}


def write_image(path, size, seed):
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)


@pytest.fixture(scope="module")
def pipe():
    return make_demo_pipeline()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "control").mkdir()
    for i, (name, (size, caption)) in enumerate(IMAGES.items()):
        write_image(root / f"{name}.png", size, i)
        write_image(root / "control" / f"{name}.png", size, 100 + i)
        (root / f"{name}.txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def built(folder, pipe, tmp_path_factory):
    return build_cache(scan_folder(folder, RESOLUTION), pipe, tmp_path_factory.mktemp("cache"), MAX_LEN,
                       progress=False, resolution=RESOLUTION)


@pytest.fixture
def counted(pipe, monkeypatch):
    """Counts of text-encoder and VAE calls made through the pipeline."""
    calls = {"text": 0, "vae": 0}
    encode_prompt, jit_apply = pipe.encode_prompt, cache_mod.jit_apply

    def count_text(*a, **kw):
        calls["text"] += 1
        return encode_prompt(*a, **kw)

    def count_vae(*a):
        calls["vae"] += 1
        return jit_apply(*a)

    monkeypatch.setattr(pipe, "encode_prompt", count_text)
    monkeypatch.setattr(cache_mod, "jit_apply", count_vae)
    return calls


def copy_folder(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "data")


def mtimes(cache_dir):
    return {p.name: p.stat().st_mtime_ns for p in (cache_dir / "entries").iterdir()}


def test_cache_layout_shapes_and_manifest(built, folder):
    assert built.names == ["a", "b", "c", "d", "e"] and len(built) == 5
    assert built.buckets == [(64, 64)] * 3 + [(48, 80)] * 2 and not built.kontext
    for i, (h, w) in enumerate(built.buckets):
        entry = built.load(i)
        assert set(entry) == {"latents", "txt", "y"}
        assert entry["latents"].shape == (h // 8, w // 8, 16) and entry["latents"].dtype == np.float32
        assert entry["txt"].shape == (MAX_LEN, 32) and entry["y"].shape == (32,)
    txt, y = built.empty_caption()
    assert txt.shape == (MAX_LEN, 32) and y.shape == (32,)
    m = json.loads((built.root / "manifest.json").read_text())
    assert (m["model"], m["variant"], m["max_sequence_length"], m["resolution"]) == ("demo", "dev", MAX_LEN, 64)
    src = m["examples"][3]
    assert src["name"] == "d" and src["bucket"] == [48, 80] and src["caption"] == "a wide field"
    st = (folder / "d.png").stat()
    assert src["sources"]["image"] == [st.st_size, st.st_mtime_ns] and src["sources"]["control"] is None
    assert Cache.open(built.root).names == built.names


def test_entries_equal_encoding_directly_with_the_pipeline(built, folder, pipe):
    """Batched, padded, sliced, scaled and stored, each entry must still be its own image's and caption's
    encoding. The direct calls put each example in another row of a batch of ENCODE_BATCH (the
    compiled shape: no new compile), and scale with the VAE config's constants."""
    rows = cache_mod.ENCODE_BATCH
    for bucket in ((64, 64), (48, 80)):
        idx = [i for i, b in enumerate(built.buckets) if b == bucket][::-1]  # reversed: other rows than the cache's
        names = [built.names[i] for i in idx]
        pixels = np.zeros((rows, *bucket, 3), np.float32)
        pixels[:len(idx)] = [load_pixels(folder / f"{n}.png", bucket) for n in names]
        with jax.set_mesh(pipe.mesh):
            z = jit_apply(pipe.vae, "encode", pipe.vae_params, sharding.put_batch(pipe.mesh, pixels))
        z = (np.asarray(z) - pipe.vae_cfg.shift_factor) * pipe.vae_cfg.scaling_factor
        captions = [IMAGES[n][1] for n in names]
        txt, y = pipe.encode_prompt(captions + [""] * (rows - len(idx)), max_sequence_length=MAX_LEN)
        for row, i in enumerate(idx):
            entry = built.load(i)
            np.testing.assert_allclose(entry["latents"], z[row], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(entry["txt"], np.asarray(txt)[row], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(entry["y"], np.asarray(y)[row], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(built.empty_caption()[0], np.asarray(txt)[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(built.empty_caption()[1], np.asarray(y)[-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(built.load(0)["txt"], built.load(1)["txt"])  # captions differ, so must these
    assert not np.allclose(built.load(0)["latents"], built.load(1)["latents"])


def test_second_build_encodes_nothing(built, folder, pipe, counted):
    before = mtimes(built.root)
    again = build_cache(scan_folder(folder, RESOLUTION), pipe, built.root, MAX_LEN, progress=False)
    assert counted == {"text": 0, "vae": 0}
    assert mtimes(built.root) == before and again.names == built.names


def test_changed_files_and_settings_rebuild_only_what_is_stale(folder, pipe, counted, tmp_path):
    data = copy_folder(folder, tmp_path)
    out = tmp_path / "cache"
    build_cache(scan_folder(data, RESOLUTION), pipe, out, MAX_LEN, progress=False)
    old = Cache.open(out).load(1)["latents"]
    before, counted["text"], counted["vae"] = mtimes(out), 0, 0

    write_image(data / "b.png", (72, 60), seed=99)  # new pixels, same bucket
    (data / "d.txt").write_text("a different caption")
    cache = build_cache(scan_folder(data, RESOLUTION), pipe, out, MAX_LEN, progress=False)
    after = mtimes(out)
    assert {n for n in after if after[n] != before[n]} == {"b.npz", "d.npz"}
    assert counted == {"text": 2, "vae": 2}  # b and d are in different buckets: one call each
    assert not np.allclose(cache.load(1)["latents"], old)

    counted["text"] = 0
    cache = build_cache(scan_folder(data, RESOLUTION), pipe, out, 8, progress=False)  # another max_sequence_length
    assert all(mtimes(out)[n] != after[n] for n in after)
    assert counted["text"] == 3  # the empty caption and one call per bucket
    assert cache.load(0)["txt"].shape == (8, 32) and cache.empty_caption()[0].shape == (8, 32)

    (data / "e.png").unlink()
    (data / "e.txt").unlink()
    cache = build_cache(scan_folder(data, RESOLUTION), pipe, out, 8, progress=False)
    assert cache.names == ["a", "b", "c", "d"] and "e.npz" not in mtimes(out)


def test_a_killed_build_resumes(built, folder, pipe, counted, tmp_path):
    out = shutil.copytree(built.root, tmp_path / "cache")
    (out / "manifest.json").unlink()
    (out / "entries" / "a.npz").unlink()
    (out / "entries" / "e.npz").write_bytes(b"torn write")
    (out / "entries" / "c.npz.1234.tmp").write_bytes(b"left by a killed run")
    with pytest.raises(CacheError, match="build the cache first"):
        Cache.open(out)
    before = mtimes(out)
    cache = build_cache(scan_folder(folder, RESOLUTION), pipe, out, MAX_LEN, progress=False)
    after = mtimes(out)
    assert set(after) == {f"{n}.npz" for n in IMAGES}
    assert {n for n in after if after[n] != before.get(n)} == {"a.npz", "e.npz"}
    assert counted["vae"] == 2
    np.testing.assert_array_equal(cache.load(4)["latents"], built.load(4)["latents"])


def test_freed_text_encoders_are_only_needed_for_stale_entries(built, folder, pipe, monkeypatch, tmp_path):
    monkeypatch.setattr(pipe, "clip_params", None)
    monkeypatch.setattr(pipe, "t5_params", None)
    assert build_cache(scan_folder(folder, RESOLUTION), pipe, built.root, MAX_LEN, progress=False).names == built.names
    with pytest.raises(CacheError, match="text encoders were freed"):
        build_cache(scan_folder(folder, RESOLUTION), pipe, tmp_path, MAX_LEN, progress=False)


def test_bf16_and_other_dtypes_round_trip_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"bf16": np.array([1.0, -0.0, np.inf, np.nan, 1e-40, 3.14159], ml_dtypes.bfloat16),
              "f16": rng.standard_normal((2, 3)).astype(np.float16),
              "f32": rng.standard_normal((4,)).astype(np.float32)}
    save_arrays(tmp_path / "x.npz", arrays, {"any": "record"})
    back = load_arrays(tmp_path / "x.npz")
    assert list(tmp_path.iterdir()) == [tmp_path / "x.npz"]  # the temporary file was renamed
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape
        np.testing.assert_array_equal(back[k].view(f"u{a.dtype.itemsize}"), a.view(f"u{a.dtype.itemsize}"))


def test_kontext_cache_stores_control_latents_and_the_loader_batches_them(built, folder, pipe, tmp_path):
    cache = build_cache(scan_folder(folder, RESOLUTION, kontext=True), pipe, tmp_path / "k", MAX_LEN, progress=False)
    assert cache.kontext and Cache.open(tmp_path / "k").kontext and cache.names == built.names
    # The control images as targets of a plain cache: its latents are what "control" must hold.
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for name in IMAGES:
        shutil.copy(folder / "control" / f"{name}.png", swapped / f"{name}.png")
        shutil.copy(folder / f"{name}.txt", swapped)
    controls = build_cache(scan_folder(swapped, RESOLUTION), pipe, tmp_path / "c", MAX_LEN, progress=False)
    for i in range(len(cache)):
        entry = cache.load(i)
        assert entry["control"].shape == entry["latents"].shape
        np.testing.assert_allclose(entry["control"], controls.load(i)["latents"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(entry["latents"], built.load(i)["latents"], rtol=1e-5, atol=1e-5)
        assert not np.allclose(entry["control"], entry["latents"])
    batch = next(make_iterator(cache, batch_size=2, seed=0))
    assert batch["control"].dtype == np.float32 and batch["control"].shape == batch["latents"].shape


def test_loader_over_a_real_cache_yields_its_entries(built):
    it = make_iterator(built, batch_size=2, seed=0)
    seen = set()
    for _ in range(epoch_size(built, 2)):  # 2 + 1 batches
        batch = next(it)
        for row in range(2):
            match = [i for i in range(len(built)) if built.load(i)["latents"].shape == batch["latents"].shape[1:]
                     and np.array_equal(built.load(i)["latents"], batch["latents"][row])]
            assert len(match) == 1
            np.testing.assert_array_equal(batch["txt"][row], built.load(match[0])["txt"])
            seen.add(match[0])
    assert seen == set(range(5))


def test_bad_inputs_are_refused(built, folder, pipe, tmp_path):
    with pytest.raises(CacheError, match="build the cache first"):
        Cache.open(tmp_path)
    with pytest.raises(DataError, match="no examples"):
        build_cache([], pipe, tmp_path, MAX_LEN)
    ex = scan_folder(folder, RESOLUTION)
    with pytest.raises(DataError, match="names repeat"):
        build_cache([ex[0], ex[0]], pipe, tmp_path, MAX_LEN)
    mixed = [ex[0], Example("z", ex[1].image_path, "c", folder / "control" / "b.png", ex[1].bucket)]
    with pytest.raises(DataError, match="some examples have a control image"):
        build_cache(mixed, pipe, tmp_path, MAX_LEN)
