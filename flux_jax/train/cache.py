"""Encode the training set once: T5/CLIP text embeddings and VAE latents on disk, so training never
holds the text encoders (call `pipe.free_text_encoders()` after `build_cache`).

    cache = build_cache(examples, pipe, "cache/", max_sequence_length=512, resolution=1024)
    cache = Cache.open("cache/")
    cache.load(0)          # {"latents": (h, w, 16), "txt": (L, D), "y": (D_pooled,)[, "control": (h, w, 16)]}
    cache.empty_caption()  # (txt, y) of "" for caption dropout

Layout: `entries/NAME.npz` per example, `empty_caption.npz`, and `manifest.json` (model, variant,
dtype, encoder configs, max_sequence_length, resolution, and each example's name, bucket and source
fingerprints). Latents are the scaled VAE posterior means, unpacked (h = H/8), as the pipelines
encode images. Arrays keep the encoder's dtype: numpy cannot save bfloat16 (np.save writes it as
raw void bytes), so every array is stored as its raw bits (unsigned ints of the same width) with
its dtype name in the entry's metadata, and viewed back on load, bit-exact for any dtype.

Resuming and staleness: each entry embeds a record of what made it (the encoder settings, its
bucket, its caption, the size and mtime_ns of its source files) and is written to a temporary file
then renamed, so a file present under its name is complete. `build_cache` re-encodes exactly the
entries whose record differs from what the current examples and pipeline would write (all of
them when the model or max_sequence_length changed) and skips the rest.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from .. import sharding
from ..autoencoder import scale_latents
from ..config import parse_dtype
from ..pipeline import jit_apply, pad_rows
from .data import CAPTION_EXT, DataError, Example, load_pixels

FORMAT = 1  # bump when the layout or the meaning of an entry changes: old caches then rebuild
MANIFEST = "manifest.json"
ENTRIES = "entries"
EMPTY_CAPTION = "empty_caption.npz"
META_KEY = "__meta__"  # the JSON string an .npz carries beside its arrays
TMP_SUFFIX = ".tmp"
ENCODE_BATCH = 4  # examples per encoder call; every call has this many rows, so one compile per bucket
LOAD_THREADS = 4  # PIL decodes and resizes outside the GIL


class CacheError(ValueError):
    """A cache folder that cannot be read: the message names the fix."""


# ---------------------------------------------------------------- storage

def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def save_arrays(path: Path, arrays: dict[str, np.ndarray], record: dict) -> None:
    """Write arrays (any dtype, bf16 included) and a JSON record to path atomically (temp file + rename)."""
    meta = {"dtypes": {k: a.dtype.name for k, a in arrays.items()}, "record": record}
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **{k: _bits(a) for k, a in arrays.items()}, **{META_KEY: np.array(json.dumps(meta))})
    os.replace(tmp, path)


def _meta(npz) -> dict:
    return json.loads(str(npz[META_KEY]))


# np.load parses each header with ast.literal_eval, which CPython 3.11 cannot run in several threads
# at once ("SystemError: AST constructor recursion depth mismatch"): grain's reader threads take turns.
_LOAD_LOCK = threading.Lock()


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays save_arrays wrote, in their original dtypes."""
    with _LOAD_LOCK, np.load(path) as npz:
        dtypes = _meta(npz)["dtypes"]
        return {k: npz[k].view(parse_dtype(name)) for k, name in dtypes.items()}


def read_record(path: Path) -> Optional[dict]:
    """The record of an entry, or None if it is missing or unreadable (a torn write: re-encode it)."""
    try:
        with np.load(path) as npz:
            return _meta(npz)["record"]
    except (OSError, ValueError, KeyError, EOFError):
        return None


# ---------------------------------------------------------------- what an entry depends on

def fingerprint(path: Optional[Path]) -> Optional[list[int]]:
    """[size, mtime_ns] of a source file: a changed file gets re-encoded."""
    if path is None:
        return None
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def encoder_settings(pipe, max_sequence_length: int) -> dict:
    """Everything besides the example itself that its entry depends on."""
    return {"format": FORMAT, "model": pipe.name, "variant": pipe.variant, "dtype": np.dtype(pipe.dtype).name,
            "max_sequence_length": max_sequence_length, "vae": pipe.vae_cfg.to_dict(),
            "t5": pipe.t5_cfg.to_dict(), "clip": pipe.clip_cfg.to_dict()}


def example_record(example: Example, settings: dict) -> dict:
    """The record its entry must carry to be current (the caption itself by hash: the file may be absent)."""
    caption_file = example.image_path.with_suffix(CAPTION_EXT)
    sources = {"image": fingerprint(example.image_path), "control": fingerprint(example.control_path),
               "caption": fingerprint(caption_file) if caption_file.is_file() else None}
    return _as_json({"settings": settings, "name": example.name, "bucket": list(example.bucket),
                     "caption_sha1": hashlib.sha1(example.caption.encode()).hexdigest(), "sources": sources})


def _as_json(record: dict) -> dict:
    """The record as it reads back from disk (tuples become lists), so the two compare equal."""
    return json.loads(json.dumps(record))


# ---------------------------------------------------------------- encoding

def _encode_text(pipe, captions: list[str], max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(txt (n, L, D), y (n, D_pooled)) in pipe.dtype; captions padded to ENCODE_BATCH rows."""
    n = len(captions)
    padded = captions + [captions[-1]] * (ENCODE_BATCH - n)
    txt, y = pipe.encode_prompt(padded, max_sequence_length=max_sequence_length)
    return sharding.to_host(txt)[:n], sharding.to_host(y)[:n]


def _encode_pixels(pipe, pixels: np.ndarray) -> np.ndarray:
    """Pixels (n, H, W, 3) in [-1, 1] -> scaled latents (n, H/8, W/8, 16) in pipe.dtype."""
    n = len(pixels)
    rows = sharding.padded_batch(ENCODE_BATCH, pipe.mesh)
    x = sharding.put_batch(pipe.mesh, pad_rows(pixels.astype(pipe.dtype), rows))
    with jax.set_mesh(pipe.mesh):
        z = jit_apply(pipe.vae, "encode", pipe.vae_params, x)
    z = scale_latents(sharding.to_host(z)[:n].astype(np.float32), pipe.vae_cfg)  # scaled in float32
    return np.asarray(z).astype(pipe.dtype)


def _load_all(pool: ThreadPoolExecutor, paths: list[Path], bucket: tuple[int, int]) -> np.ndarray:
    try:
        return np.stack(list(pool.map(lambda p: load_pixels(p, bucket), paths)))
    except ValueError as e:  # load_image's PipelineError: a file broken past what PIL's verify checks
        raise DataError(f"{e}; fix or remove the file and run again") from None


def _chunks(examples: Sequence[Example]) -> list[list[Example]]:
    """ENCODE_BATCH-sized groups, each of one bucket."""
    by_bucket: dict[tuple[int, int], list[Example]] = {}
    for ex in examples:
        by_bucket.setdefault(ex.bucket, []).append(ex)
    return [group[i:i + ENCODE_BATCH] for group in by_bucket.values() for i in range(0, len(group), ENCODE_BATCH)]


def _check_examples(examples: Sequence[Example]) -> bool:
    """Whether the examples are Kontext pairs; raises on an empty list, repeated names or a mix."""
    if not examples:
        raise DataError("no examples to cache: scan a folder holding NAME.png + NAME.txt pairs")
    names = [ex.name for ex in examples]
    if len(set(names)) != len(names):
        raise DataError(f"example names repeat ({sorted(n for n in set(names) if names.count(n) > 1)[:5]}); "
                        f"each name is one cache entry: rename the files")
    with_control = {ex.control_path is not None for ex in examples}
    if len(with_control) > 1:
        raise DataError("some examples have a control image and some do not: use one kind per cache")
    return with_control.pop()


def build_cache(examples: Sequence[Example], pipe, out_dir, max_sequence_length: int, progress: bool = True,
                resolution: Optional[int] = None) -> "Cache":
    """Encode every example whose entry is missing or stale into out_dir; returns the opened Cache.

    pipe: a FluxPipeline; its text encoders are needed only when something is stale (so a run
    over a complete cache works after pipe.free_text_encoders()). resolution is recorded in the
    manifest only (each example's bucket already depends on it). Single host: with several
    processes, only one should write.
    """
    kontext = _check_examples(examples)
    max_sequence_length = pipe.check_max_sequence_length(max_sequence_length)
    root = Path(out_dir)
    (root / ENTRIES).mkdir(parents=True, exist_ok=True)
    settings = _as_json(encoder_settings(pipe, max_sequence_length))
    records = {ex.name: example_record(ex, settings) for ex in examples}
    wanted = {f"{ex.name}.npz" for ex in examples}
    leftovers = [p for p in (root / ENTRIES).iterdir() if p.name not in wanted]  # removed examples, temp files
    for p in leftovers + list(root.glob(f"*{TMP_SUFFIX}")):
        p.unlink()
    stale = [ex for ex in examples if read_record(root / ENTRIES / f"{ex.name}.npz") != records[ex.name]]
    empty_record = {"settings": settings, "caption": ""}
    empty_stale = read_record(root / EMPTY_CAPTION) != empty_record
    if (stale or empty_stale) and pipe.clip_params is None and pipe.reload_text_encoders is None:
        raise CacheError(f"{root}: {len(stale)} entries need encoding but the pipeline's text encoders were freed; "
                         f"call build_cache before pipe.free_text_encoders()")

    if empty_stale:
        txt, y = _encode_text(pipe, [""], max_sequence_length)
        save_arrays(root / EMPTY_CAPTION, {"txt": txt[0], "y": y[0]}, empty_record)

    bar = tqdm(total=len(stale), desc="caching", unit="image", disable=not progress or jax.process_index() != 0)
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        for chunk in _chunks(stale):
            bucket = chunk[0].bucket
            arrays = {"latents": _encode_pixels(pipe, _load_all(pool, [ex.image_path for ex in chunk], bucket))}
            if kontext:
                arrays["control"] = _encode_pixels(pipe, _load_all(pool, [ex.control_path for ex in chunk], bucket))
            arrays["txt"], arrays["y"] = _encode_text(pipe, [ex.caption for ex in chunk], max_sequence_length)
            for row, ex in enumerate(chunk):
                save_arrays(root / ENTRIES / f"{ex.name}.npz", {k: a[row] for k, a in arrays.items()},
                            records[ex.name])
            bar.update(len(chunk))
    bar.close()

    _write_manifest(root, {**settings, "resolution": resolution, "kontext": kontext, "examples": [
        {"name": ex.name, "bucket": list(ex.bucket), "caption": ex.caption, "sources": records[ex.name]["sources"]}
        for ex in examples]})
    return Cache.open(root)


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / f"{MANIFEST}.{os.getpid()}{TMP_SUFFIX}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)


# ---------------------------------------------------------------- reading

class Cache:
    """A built cache folder: examples in manifest order, loaded from disk on demand (thread-safe)."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.names: list[str] = [e["name"] for e in manifest["examples"]]
        self.buckets: list[tuple[int, int]] = [tuple(e["bucket"]) for e in manifest["examples"]]
        self.kontext: bool = manifest["kontext"]
        self._empty: Optional[tuple[np.ndarray, np.ndarray]] = None

    @classmethod
    def open(cls, out_dir) -> "Cache":
        root = Path(out_dir)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except (OSError, ValueError):
            raise CacheError(f"{root}: no readable {MANIFEST}; build the cache first (build_cache)") from None
        if manifest.get("format") != FORMAT:
            raise CacheError(f"{root}: cache format {manifest.get('format')}, this code reads {FORMAT}; "
                             f"run build_cache again to rebuild it")
        missing = [e["name"] for e in manifest["examples"] if not (root / ENTRIES / f"{e['name']}.npz").is_file()]
        if missing or not (root / EMPTY_CAPTION).is_file():
            raise CacheError(f"{root}: {len(missing)} entries missing ({missing[:3]}...) or no {EMPTY_CAPTION}; "
                             f"run build_cache again to complete it")
        return cls(root, manifest)

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> dict[str, np.ndarray]:
        """{"latents": (h, w, 16), "txt": (L, D), "y": (D_pooled,)[, "control"]}, in the encoder's dtype."""
        return load_arrays(self.root / ENTRIES / f"{self.names[i]}.npz")

    def empty_caption(self) -> tuple[np.ndarray, np.ndarray]:
        """(txt (L, D), y (D_pooled,)) of the empty caption, for caption dropout."""
        if self._empty is None:
            arrays = load_arrays(self.root / EMPTY_CAPTION)
            self._empty = (arrays["txt"], arrays["y"])
        return self._empty
