"""Streaming safetensors reading, strict tensor accounting, and Orbax checkpoints.

Every converter (transformer, CLIP, T5, VAE) is a list of `Rule`s: which source tensors
make which target leaf. `convert` runs the rules tensor by tensor (memory: the output plus
the tensors of one rule), checks every shape, and fails listing every unused source key and
every unfilled target. Nothing here knows about any particular model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
HEADER_LIMIT = 100 * 2**20  # a real header is a few hundred KB; larger means garbage
CONFIG_FILE = "flux_jax_config.json"
PARAMS_DIR = "params"


class ConversionError(ValueError):
    """A checkpoint that cannot be read or does not match the expected model."""


def _parse_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > HEADER_LIMIT or 8 + n > size:
            raise ConversionError(f"{path}: not a safetensors file, or truncated (header claims {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    end = 0
    for key, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
        end = max(end, info["data_offsets"][1])
    if data_start + end > size:
        raise ConversionError(
            f"{path}: truncated: tensors need {data_start + end} bytes, the file has {size}; re-download it")
    return header, data_start


class Reader:
    """Lazy view of one `.safetensors` file, or a folder of them (sharded with an index json).

    `get` memory-maps and copies out one tensor at a time, so a 24 GB file needs no 24 GB of RAM.
    bf16 tensors come back as `ml_dtypes.bfloat16` arrays.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{path}: no .safetensors files in this folder")
            index = list(path.glob("*.safetensors.index.json"))
            if index:  # every shard the index names must be there
                names = set(json.loads(index[0].read_text())["weight_map"].values())
                missing = sorted(n for n in names if not (path / n).exists())
                if missing:
                    raise ConversionError(f"{path}: shards missing: {', '.join(missing)}; re-download them")
        elif path.is_file():
            files = [path]
        else:
            raise ConversionError(f"{path}: no such file or folder")
        self.path = path
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for file in files:
            header, start = _parse_header(file)
            for key, info in header.items():
                self._where[key] = (file, info, start)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(SAFETENSORS_DTYPES[self._where[key][1]["dtype"]])

    def get(self, key: str) -> np.ndarray:
        file, info, start = self._where[key]
        lo, hi = info["data_offsets"]
        dtype = self.dtype(key)
        shape = tuple(info["shape"])
        if hi - lo != int(np.prod(shape)) * dtype.itemsize:
            raise ConversionError(f"{file}: tensor {key!r} has a corrupt size in the header")
        mm = np.memmap(file, dtype=np.uint8, mode="r", offset=start + lo, shape=(hi - lo,))
        return np.array(mm.view(dtype).reshape(shape))  # copy: the map is released right away


class DictReader:
    """Reader over tensors already in memory (e.g. a torch state_dict as numpy), for `convert`."""

    def __init__(self, tensors: dict[str, np.ndarray], name: str = "state_dict"):
        self.path, self._t = Path(name), tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def __contains__(self, key: str) -> bool:
        return key in self._t

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def get(self, key: str) -> np.ndarray:
        return self._t[key]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Target leaf `dst` ('a/b/kernel') [at `layer` of its leading layer axis] = fn(*src tensors)."""
    dst: str
    src: tuple[str, ...]
    fn: Callable[..., np.ndarray] = lambda x: x
    layer: int | None = None


def linear(prefix: str) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """torch Linear (out, in) -> Flax kernel (in, out); bias as is."""
    return {"kernel": ((f"{prefix}.weight",), lambda w: w.T), "bias": ((f"{prefix}.bias",), lambda b: b)}


def leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        out.update(leaves(v, p) if isinstance(v, dict) else {p: v})
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        *parents, name = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = v
    return tree


def convert(reader: Reader, rules: Sequence[Rule], target: dict, dtype=None, ignore: Sequence[str] = (),
            progress: bool = False, scratch: str | os.PathLike | None = None) -> dict:
    """Fill a param tree shaped like `target` (a tree of objects with .shape) from `reader`.

    dtype: output dtype; None keeps the source dtype (bf16 stays bf16).
    ignore: source keys known to be unused (e.g. buffers such as position_ids).
    progress: show a tqdm bar (a real transformer file takes minutes).
    scratch: a folder for disk-backed (memory-mapped) outputs, so a 24 GB model converts in far less RAM.
    Raises ConversionError listing every problem at once.
    """
    shapes = {p: tuple(v.shape) for p, v in leaves(target).items()}
    out: dict[str, np.ndarray] = {}
    filled: dict[str, set] = {p: set() for p in shapes}
    used: set[str] = set()
    problems: list[str] = []
    for rule in tqdm(rules, desc=f"converting {Path(reader.path).name}", unit="param", disable=not progress,
                     leave=False):
        missing = [k for k in rule.src if k not in reader]
        if missing:
            problems.append(f"missing source tensor(s) {missing} for {rule.dst}")
            continue
        if rule.dst not in shapes:
            problems.append(f"rule targets unknown param {rule.dst}")
            continue
        value = np.asarray(rule.fn(*(reader.get(k) for k in rule.src)))
        used.update(rule.src)
        full = shapes[rule.dst]
        want = full if rule.layer is None else full[1:]
        if value.shape != want:
            problems.append(f"{rule.dst}: expected {want}, got {value.shape} from {list(rule.src)}")
            continue
        if rule.dst not in out:
            out[rule.dst] = _allocate(full, dtype or value.dtype, scratch, len(out))
        if rule.layer is None:
            out[rule.dst][...] = value
        else:
            out[rule.dst][rule.layer] = value
        filled[rule.dst].add(rule.layer)
    for p, full in shapes.items():
        got = filled[p]
        if not got:
            problems.append(f"param {p} {full} not filled")
        elif None not in got and len(got) != full[0]:
            problems.append(f"param {p}: layers {sorted(set(range(full[0])) - got)} not filled")
    unused = sorted(set(reader.keys()) - used - set(ignore))
    if unused:
        problems.append(f"{len(unused)} source tensor(s) unused (another model?): {unused[:20]}"
                        + (" ..." if len(unused) > 20 else ""))
    if problems:
        raise ConversionError(f"{reader.path}: checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return unflatten(out)


def _allocate(shape: tuple[int, ...], dtype, scratch, n: int) -> np.ndarray:
    if scratch is None:
        return np.empty(shape, dtype=dtype)
    Path(scratch).mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(Path(scratch) / f"{n}.npy", mode="w+", dtype=dtype, shape=shape)


def atomic_dir(dst: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run write(tmp) in a temp folder beside dst, then rename it to dst: no partial output on failure."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        write(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def save_params(folder: str | os.PathLike, params: dict, config: dict) -> None:
    """Write params (Orbax) and config json into an existing empty folder."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(folder / PARAMS_DIR, params)
        ckpt.wait_until_finished()
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def save_checkpoint(dst: str | os.PathLike, params: dict, config: dict, overwrite: bool = False) -> Path:
    return atomic_dir(dst, lambda tmp: save_params(tmp, params, config), overwrite)


def is_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def load_checkpoint(path: str | os.PathLike, dtype=None) -> tuple[dict, dict]:
    """(params as numpy arrays, config dict) from a folder written by save_checkpoint."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not is_checkpoint(path):
        raise ConversionError(f"{path}: not a flux-jax checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    config = json.loads((path / CONFIG_FILE).read_text())
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path / PARAMS_DIR)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        abstract = _abstract_numpy(tree, dtype)
        params = ckpt.restore(path / PARAMS_DIR, abstract)
    return params, config


def _abstract_numpy(meta: Any, dtype) -> Any:
    if isinstance(meta, dict):
        return {k: _abstract_numpy(v, dtype) for k, v in meta.items()}
    return np.empty(tuple(meta.shape), dtype=dtype or meta.dtype)
