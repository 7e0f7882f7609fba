"""Streaming safetensors reading, strict tensor accounting, and streamed Orbax checkpoints.

Every converter (transformer, CLIP, T5, VAE) is a list of `Rule`s: which source tensors make
which target leaf. `stream` checks every name up front, then yields the target tensor by tensor
as `Piece`s (lazy memory-mapped views where a rule only transposes), checking every shape.
`save_params` writes pieces to Orbax in bounded parts, so a 24 GB model converts in a few GB of RAM;
`convert` assembles them into an in-memory tree instead. Nothing here knows about any particular model.

Two layouts of a param tree: STACKED (what the converters target and scanned models use: one
`double_blocks` subtree whose leaves have a leading layer axis) and PER-LAYER (what checkpoints
store and pieces name: `double_blocks_0`, `double_blocks_1`, ...). `stack_layers` and
`unstack_layers` go between them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from flux_jax.config import parse_dtype

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
HEADER_LIMIT = 100 * 2**20  # a real header is a few hundred KB; larger means garbage
CONFIG_FILE = "flux_jax_config.json"
PARAMS_DIR = "params"
# Checkpoint formats (the "format" key of CONFIG_FILE; absent means 1):
#   1: params/ written by ocp.StandardCheckpointer in one go, stacked layout.
#   2: params/ written by Orbax partial saves (ocp.v1.partial), per-layer layout.
FORMAT = 2
# Host memory per Orbax partial save. Tensorstore gathers each part into chunk buffers while
# writing it, so writing costs about 2 x PART_BYTES (and one piece) above the process's baseline.
PART_BYTES = 2**30
# Stored chunk size: a host restoring a sharded model reads chunks covering its own slices,
# so smaller chunks mean less read beyond them (a whole FLUX linear1 kernel is 132 MB).
CHUNK_BYTES = 16 * 2**20
# zstd shrinks bf16 weights only ~20% but halves restore throughput on a 2-core host; loading fast
# is the point of converting.
COMPRESS = False
# Source rows copied at a time when materializing a transposed 2-D view: the block stays in cache
# and a file map is read in its own order (a plain strided copy is ~2.5x slower).
TRANSPOSE_ROWS = 64
# Top-level names of layer stacks in our models (FLUX block stacks, T5/CLIP encoder layers).
STACKS = ("double_blocks", "single_blocks", "layers")
LAYER_KEY = re.compile(r"^(.+)_(\d+)$")  # "double_blocks_3" -> ("double_blocks", "3")
# Temp folders of atomic_dir: ".{dst.name}.tmp-{pid}-{random}@{host}", so that a later run on the
# same host can tell an interrupted (e.g. OOM-killed) conversion's leftovers from a running one.
TMP_NAME = r"^\.{name}\.tmp-(\d+)-[a-z0-9_]+@(.+)$"
# Before that naming, tempfile.mkdtemp made ".{dst.name}.XXXXXXXX" with no pid: such a folder is
# taken as stale only when nothing in it changed for STALE_AGE_S (a conversion takes minutes).
LEGACY_TMP_NAME = r"^\.{name}\.[a-z0-9_]{{8}}$"
STALE_AGE_S = 24 * 3600


class ConversionError(ValueError):
    """A checkpoint that cannot be read or does not match the expected model."""


# ---------------------------------------------------------------------------------------------
# Reading


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

    `view` memory-maps one tensor (nothing is read until used), `get` copies one out, so a 24 GB
    file needs no 24 GB of RAM. bf16 tensors come back as `ml_dtypes.bfloat16` arrays.
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

    def view(self, key: str) -> np.ndarray:
        """Read-only np.memmap of one tensor: pages are read when touched, and unmapped with the array."""
        file, info, start = self._where[key]
        lo, hi = info["data_offsets"]
        dtype, shape = self.dtype(key), self.shape(key)
        if hi - lo != int(np.prod(shape)) * dtype.itemsize:
            raise ConversionError(f"{file}: tensor {key!r} has a corrupt size in the header")
        if hi == lo:  # mmap cannot map zero bytes
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=start + lo, shape=shape)

    def get(self, key: str) -> np.ndarray:
        return np.array(self.view(key))  # a copy: the map is released right away


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

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._t[key].dtype)

    def view(self, key: str) -> np.ndarray:
        v = np.asarray(self._t[key]).view()
        v.flags.writeable = False  # like Reader's maps: pieces must not write into the source
        return v

    def get(self, key: str) -> np.ndarray:
        return self._t[key]


# ---------------------------------------------------------------------------------------------
# Rules, pieces, conversion


@dataclasses.dataclass(frozen=True)
class Rule:
    """Target leaf `dst` ('a/b/kernel') [at `layer` of its leading layer axis] = fn(*src tensors).

    fn gets read-only memory-mapped views: one that only transposes or returns its input keeps
    the result lazy (read when used); one that combines tensors materializes its result.
    """
    dst: str
    src: tuple[str, ...]
    fn: Callable[..., np.ndarray] = lambda x: x
    layer: int | None = None


class Piece(NamedTuple):
    """One target tensor: `path` in the per-layer layout ('double_blocks_3/img_mlp/fc1/kernel'),
    `value` in the source dtype, a lazy memory-mapped view where the rule allows it."""
    path: str
    value: np.ndarray


class Plan(NamedTuple):
    """One converter's job: the source, its rules, the stacked target tree and the model config."""
    reader: Any  # Reader or DictReader
    rules: Sequence[Rule]
    target: dict
    config: Any
    ignore: Sequence[str] = ()


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


def layer_path(dst: str, layer: int | None) -> str:
    """'double_blocks/img_mlp/fc1/kernel', 3 -> 'double_blocks_3/img_mlp/fc1/kernel' (model.unstack_layers' names)."""
    if layer is None:
        return dst
    top, sep, rest = dst.partition("/")
    return f"{top}_{layer}{sep}{rest}"


def _shapes(target: dict) -> dict[str, tuple[int, ...]]:
    return {p: tuple(v.shape) for p, v in leaves(target).items()}


def _fail(reader, problems: list[str]) -> ConversionError:
    return ConversionError(f"{reader.path}: checkpoint does not match the model:\n  " + "\n  ".join(problems))


def _apply(rule: Rule, args: list[np.ndarray], full: tuple[int, ...]) -> tuple[np.ndarray | None, str | None]:
    """(value, None), or (None, the problem) when the sources do not combine into the target's shape."""
    where = rule.dst if rule.layer is None else f"{rule.dst} (layer {rule.layer})"
    try:
        value = rule.fn(*args)
    except ValueError as e:  # e.g. concatenating tensors of unequal widths
        return None, f"{where}: cannot combine {list(rule.src)}: {e}"
    value = value if isinstance(value, np.ndarray) else np.asarray(value)
    want = full if rule.layer is None else full[1:]
    if value.shape != want:
        return None, f"{where}: expected {want}, got {value.shape} from {list(rule.src)}"
    return value, None


def _name_problems(reader, rules: Sequence[Rule], shapes: dict, ignore: Sequence[str]) -> list[str]:
    """Everything wrong that names alone show: missing or unused tensors, unknown or unfilled params."""
    problems: list[str] = []
    used: set[str] = set()
    filled: dict[str, set] = {p: set() for p in shapes}
    for rule in rules:
        missing = [k for k in rule.src if k not in reader]
        used.update(k for k in rule.src if k in reader)
        if missing:
            problems.append(f"missing source tensor(s) {missing} for {layer_path(rule.dst, rule.layer)}")
        if rule.dst not in shapes:
            problems.append(f"rule targets unknown param {rule.dst}")
            continue
        full, got = shapes[rule.dst], filled[rule.dst]
        if rule.layer is not None and not (full and 0 <= rule.layer < full[0]):
            problems.append(f"{rule.dst}: layer {rule.layer} out of range for shape {full}")
        elif rule.layer in got or (got and (rule.layer is None or None in got)):
            problems.append(f"{layer_path(rule.dst, rule.layer)}: filled by more than one rule")
        got.add(rule.layer)
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
    return problems


def _dry_shape_problems(reader, rules: Sequence[Rule], shapes: dict) -> list[str]:
    """Shape problems found without reading data: rules run on zero-stride stand-ins of the sources.

    Only used when names already failed, so that one error still lists every problem.
    """
    problems = []
    for rule in rules:
        if rule.dst in shapes and all(k in reader for k in rule.src):
            args = [np.broadcast_to(np.zeros((), reader.dtype(k)), reader.shape(k)) for k in rule.src]
            problems += [p for p in [_apply(rule, args, shapes[rule.dst])[1]] if p]
    return problems


def stream(reader, rules: Sequence[Rule], target: dict, ignore: Sequence[str] = (),
           progress: bool = False) -> Iterator[Piece]:
    """The pieces of a param tree shaped like `target` (a STACKED tree of objects with .shape), in rule order.

    Checks every name before returning (missing source tensors, rules targeting unknown params,
    unused source tensors, params or layers no rule fills) and raises one ConversionError listing
    them all. Pieces keep the source dtype; an identity or transpose rule yields a lazy view of
    the file. A piece of the wrong shape is skipped; after the last piece a ConversionError lists
    every shape problem.
    ignore: source keys known to be unused (e.g. buffers such as position_ids).
    progress: show a tqdm bar (a real transformer file takes minutes).
    """
    shapes = _shapes(target)
    problems = _name_problems(reader, rules, shapes, ignore)
    if problems:
        raise _fail(reader, problems + _dry_shape_problems(reader, rules, shapes))
    return _pieces(reader, rules, shapes, progress)


def _pieces(reader, rules: Sequence[Rule], shapes: dict, progress: bool) -> Iterator[Piece]:
    problems = []
    bar = tqdm(total=len(rules), desc=f"converting {Path(reader.path).name}", unit="param",
               disable=not progress, leave=False)
    try:
        for rule in rules:
            value, problem = _apply(rule, [reader.view(k) for k in rule.src], shapes[rule.dst])
            bar.update()
            if problem:
                problems.append(problem)
            else:
                yield Piece(layer_path(rule.dst, rule.layer), value)
    finally:
        bar.close()
    if problems:
        raise _fail(reader, problems)


def copy_into(out: np.ndarray, value: np.ndarray) -> np.ndarray:
    """out[...] = value (casting), reading a transposed 2-D view block by block in its source's order."""
    if value.ndim == 2 and not value.flags.c_contiguous and value.T.flags.c_contiguous:
        src = value.T
        for i in range(0, src.shape[0], TRANSPOSE_ROWS):
            out[:, i:i + TRANSPOSE_ROWS] = src[i:i + TRANSPOSE_ROWS].T
    else:
        out[...] = value
    return out


def cast_dtype(stored, dtype=None) -> np.dtype:
    """The dtype a param stored as `stored` is saved or restored in when `dtype` is asked: integer
    params (quantized values, see flux_jax/quantize.py) keep theirs, as do all with dtype None."""
    stored = np.dtype(stored)
    return stored if dtype is None or stored.kind in "iu" else np.dtype(dtype)


def materialize(value: np.ndarray, dtype=None) -> np.ndarray:
    """A C-ordered in-memory copy of a piece's value (a lazy view is read once), cast to dtype."""
    return copy_into(np.empty(value.shape, np.dtype(dtype or value.dtype)), value)


def convert(reader, rules: Sequence[Rule], target: dict, dtype=None, ignore: Sequence[str] = (),
            progress: bool = False) -> dict:
    """A numpy param tree in the STACKED layout of `target`, from `stream`'s pieces.

    dtype: output dtype; None keeps the source dtype (bf16 stays bf16).
    Memory: the output plus one rule's tensors. Raises ConversionError listing every problem.
    """
    shapes = _shapes(target)
    where = {layer_path(r.dst, r.layer): (r.dst, r.layer) for r in rules}
    out: dict[str, np.ndarray] = {}
    for path, value in stream(reader, rules, target, ignore, progress):
        dst, layer = where[path]
        if dst not in out:
            out[dst] = np.empty(shapes[dst], dtype or value.dtype)
        copy_into(out[dst] if layer is None else out[dst][layer], value)
    return unflatten(out)


def piece_shapes(plan: Plan, dtype=None) -> dict:
    """plan.target (stacked) as jax.ShapeDtypeStructs in the dtype pieces come in: `dtype`, else the source's."""
    import jax

    source = {}
    for rule in plan.rules:  # fns combine tensors of one dtype and keep it
        if rule.src and rule.src[0] in plan.reader:
            source.setdefault(rule.dst, plan.reader.dtype(rule.src[0]))
    return unflatten({p: jax.ShapeDtypeStruct(tuple(v.shape), np.dtype(dtype or source.get(p, v.dtype)))
                      for p, v in leaves(plan.target).items()})


# ---------------------------------------------------------------------------------------------
# Layouts


def _stack_length(sub: Any) -> int | None:
    """n if `sub` is a subtree whose leaves all have the leading axis n, else None."""
    if not isinstance(sub, dict):
        return None
    lead = {tuple(v.shape)[:1] if hasattr(v, "shape") else () for v in leaves(sub).values()}
    return lead.pop()[0] if len(lead) == 1 and () not in lead else None


def unstack_layers(tree: dict, names: Sequence[str] = STACKS) -> dict:
    """Stacked -> per-layer: each top-level subtree NAME in `names` whose leaves share a leading
    axis n becomes NAME_0 .. NAME_{n-1} (views, no copies). Anything else is kept as is."""
    out = {}
    for key, sub in tree.items():
        n = _stack_length(sub) if key in names else None
        if n is None:
            out[key] = sub
            continue
        flat = leaves(sub)
        for i in range(n):
            out[f"{key}_{i}"] = unflatten({p: v[i] for p, v in flat.items()})
    return out


def stack_layers(tree: dict, names: Sequence[str] = STACKS) -> dict:
    """Per-layer -> stacked (numpy): top-level NAME_0 .. NAME_{n-1} (NAME in `names`) become NAME
    with a leading axis n. Raises ValueError if a layer is missing or layers differ in their params."""
    return unflatten(_stack_flat(leaves(tree), names))


def _stack_flat(flat: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """stack_layers on a flat {path: array}; pops what it stacks from `flat`, so that a caller who
    hands over its only reference holds one copy of each stacked leaf, not two."""
    groups: dict[str, dict[int, list[str]]] = {}
    for path in flat:
        top, _, rest = path.partition("/")
        m = LAYER_KEY.match(top)
        if m and m[1] in names:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), []).append(rest)
    out = {p: v for p, v in flat.items() if LAYER_KEY.sub(r"\1", p.partition("/")[0]) not in groups}
    for name, layers in groups.items():
        n = len(layers)
        if sorted(layers) != list(range(n)):
            raise ValueError(f"{name}: layers {sorted(layers)} are not 0..{n - 1}; the checkpoint lacks a layer")
        if any(p == name or p.startswith(f"{name}/") for p in out):
            raise ValueError(f"{name}: both a stacked {name} and per-layer {name}_N entries; keep one layout")
        first = sorted(layers[0])
        for i in range(1, n):
            if sorted(layers[i]) != first:
                raise ValueError(f"{name}_{i}: params differ from {name}_0's; cannot stack them")
        for rest in layers[0]:
            keys = [f"{name}_{i}/{rest}" if rest else f"{name}_{i}" for i in range(n)]
            shape, dtype = np.shape(flat[keys[0]]), flat[keys[0]].dtype
            stacked = np.empty((n, *shape), dtype)
            for i, key in enumerate(keys):  # each layer is dropped once copied: one leaf's layers at a time
                if np.shape(flat[key]) != shape:
                    raise ValueError(f"{key}: shape {np.shape(flat[key])} differs from layer 0's {shape}")
                stacked[i] = flat.pop(key)
            out[f"{name}/{rest}" if rest else name] = stacked
    return out


def tree_pieces(params: dict, stacks: Sequence[str] = STACKS) -> Iterator[Piece]:
    """Pieces of an in-memory tree, stacked (subtrees named in `stacks` are split per layer) or per-layer."""
    for path, value in leaves(unstack_layers(params, stacks)).items():
        yield Piece(path, value)


# ---------------------------------------------------------------------------------------------
# Output folders


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())


def _tree_stats(path: Path) -> tuple[int, float]:
    """(bytes, newest mtime) of everything under path."""
    size, newest = 0, path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            size += st.st_size if name in files else 0
            newest = max(newest, st.st_mtime)
    return size, newest


def remove_stale_temps(dst: str | os.PathLike) -> list[Path]:
    """Delete temp folders of earlier conversions to `dst` that died (killed, out of memory).

    A folder of ours is stale when it was made on this host by a pid that no longer runs;
    a legacy one (no pid in its name) when nothing in it changed for STALE_AGE_S.
    Prints one line to stderr for each folder removed; returns them.
    """
    dst = Path(dst).absolute()
    if not dst.parent.is_dir():
        return []
    ours = re.compile(TMP_NAME.format(name=re.escape(dst.name)))
    legacy = re.compile(LEGACY_TMP_NAME.format(name=re.escape(dst.name)))
    removed = []
    for path in dst.parent.iterdir():
        if path.is_symlink() or not path.is_dir():
            continue
        if m := ours.match(path.name):
            if m[2] != _host() or _alive(int(m[1])):
                continue
            why = f"pid {m[1]} is gone"
            size, _ = _tree_stats(path)
        elif legacy.match(path.name):
            size, newest = _tree_stats(path)
            if time.time() - newest < STALE_AGE_S:
                continue
            why = f"untouched for {(time.time() - newest) / 3600:.0f} h"
        else:
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed stale temp folder {path} ({size / 2**30:.2f} GiB) of an interrupted conversion ({why})",
              file=sys.stderr)
        removed.append(path)
    return removed


def atomic_dir(dst: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run write(tmp) in a temp folder beside dst, then rename it to dst: no partial output on failure.

    A process killed before cleaning up (SIGKILL, out of memory) leaves its temp folder behind;
    the next atomic_dir for the same dst removes it (see remove_stale_temps).
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", suffix=f"@{_host()}", dir=dst.parent))
    try:
        write(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _orbax_context():
    from orbax.checkpoint import v1 as ocp1

    ctx = ocp1.Context()
    ctx.array.saving.use_compression = COMPRESS
    ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    # Orbax copies host arrays in case the caller changes them during an async save; ours are
    # private to save_params and every save blocks, so that copy would only double the memory.
    ctx.memory.deepcopy_host_arrays = False
    return ctx


def save_params(folder: str | os.PathLike, pieces: Iterable[Piece], config: dict, dtype=None,
                part_bytes: int = PART_BYTES) -> None:
    """Write pieces (per-layer paths) as an Orbax checkpoint `folder/params`, plus the config json.

    Streams: pieces are copied out (float ones cast to `dtype`: see cast_dtype) into parts of at
    most `part_bytes` (or one piece, if larger), each written with one Orbax partial save, so
    host memory stays near 2 x part_bytes (a part and its chunk buffers) whatever the model size.
    The config json gets "format": FORMAT.
    """
    from orbax.checkpoint import v1 as ocp1

    folder = Path(folder).absolute()
    target = folder / PARAMS_DIR
    # Orbax keeps a partial save session beside the target until finalize; a leftover one would
    # be merged into this checkpoint
    stale = sorted(folder.glob(f"{PARAMS_DIR}.partial_save*"))
    if stale:
        raise FileExistsError(f"{stale[0]}: an unfinished save (interrupted run?) is there; delete it or save elsewhere")
    dtype = parse_dtype(dtype)
    part: dict[str, np.ndarray] = {}
    size, seen = 0, set()

    def flush():
        nonlocal part, size
        if part:
            ocp1.partial.save(target, unflatten(part))
        part, size = {}, 0

    with _orbax_context():
        for path, value in pieces:
            if path in seen:
                raise ValueError(f"save_params: piece {path!r} given twice; each param path must come once")
            seen.add(path)
            dt = cast_dtype(value.dtype, dtype)
            nbytes = int(np.prod(value.shape)) * dt.itemsize
            if size and size + nbytes > part_bytes:
                flush()
            # our own C-ordered copy: reads a lazy view once and lets its file map go with it
            part[path] = materialize(np.asarray(value), dt)
            size += part[path].nbytes
            del value
        flush()
        if not seen:
            raise ValueError(f"save_params: no pieces to save into {folder}")
        ocp1.partial.finalize(target)
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "format": FORMAT}, indent=2))


def save_checkpoint(dst: str | os.PathLike, params: dict, config: dict, overwrite: bool = False,
                    stacks: Sequence[str] = STACKS) -> Path:
    """Write an in-memory param tree (stacked or per-layer) as a checkpoint folder `dst` (format 2).

    stacks: top-level subtrees stored split per layer (when their leaves share a leading axis).
    """
    return atomic_dir(dst, lambda tmp: save_params(tmp, tree_pieces(params, stacks), config), overwrite)


def is_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def load_checkpoint(path: str | os.PathLike, dtype=None, sharding: Callable | None = None,
                    stacked: bool = False, select: Callable[[str], bool] | None = None) -> tuple[dict, dict]:
    """(params, config dict) from a folder written by save_checkpoint / save_params.

    params come in the PER-LAYER layout; stacked=True restacks them (numpy only).
    dtype: cast on restore (see cast_dtype: integer params keep theirs); None keeps the stored dtype.
    sharding: None gives numpy arrays. A callable (path, shape, dtype) -> jax.sharding.Sharding,
    path per-layer and '/'-joined, gives jax Arrays restored straight onto those shardings, each
    host reading only what its devices hold.
    select: restore only the params whose per-layer path it accepts (format 1 reads all first).
    Params are restored in groups of about PART_BYTES, so the host holds what it returns plus
    about one group's read buffers.
    """
    path = Path(path).absolute()
    if not is_checkpoint(path):
        raise ConversionError(f"{path}: not a flux-jax checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    if stacked and sharding is not None:
        raise ValueError("load_checkpoint: stacked=True restacks numpy arrays only; pass stacked=False with sharding")
    config = json.loads((path / CONFIG_FILE).read_text())
    fmt = config.get("format", 1)
    dtype = parse_dtype(dtype)
    keep = select or (lambda p: True)
    if fmt == 1:
        params = _load_format1(path / PARAMS_DIR, dtype)
        if stacked and select is None:
            return params, config
        flat = {p: v for p, v in leaves(unstack_layers(params)).items() if keep(p)}  # views of params
        del params
        if sharding is not None:
            flat = {p: _put(v, sharding(p, v.shape, v.dtype)) for p, v in flat.items()}
    elif fmt == FORMAT:
        flat = _load_format2(path / PARAMS_DIR, dtype, sharding, keep)
    else:
        raise ConversionError(f"{path}: checkpoint format {fmt!r} is newer than this flux-jax reads ({FORMAT}); "
                              "upgrade flux-jax or convert again")
    # _stack_flat frees each per-layer leaf as it stacks it: `flat` holds the only references
    return unflatten(_stack_flat(flat, STACKS) if stacked else flat), config


def _load_format2(folder: Path, dtype, sharding, keep: Callable[[str], bool],
                  part_bytes: int = PART_BYTES) -> dict[str, Any]:
    """{per-layer path: param}, restored in groups of about part_bytes (Orbax partial loads):
    one load of everything holds all chunk read buffers at once, 1.6x the params on the host."""
    import jax
    from orbax.checkpoint import v1 as ocp1

    def abstract(p: str, meta) -> Any:
        shape, dt = tuple(meta.shape), cast_dtype(meta.dtype, dtype)
        if sharding is None:
            return np.empty(shape, dt)  # untouched: costs address space only
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding(p, shape, dt))

    out: dict[str, Any] = {}
    group: dict[str, Any] = {}
    size = 0

    def flush():
        nonlocal group, size
        if group:
            out.update(leaves(ocp1.load(folder, unflatten(group))))
        group, size = {}, 0

    ctx = ocp1.Context()
    ctx.pytree.loading.partial_load = True  # each load restores only the leaves its group names
    with ctx:
        for p, meta in leaves(ocp1.metadata(folder).metadata).items():
            if not keep(p):
                continue
            nbytes = int(np.prod(meta.shape)) * cast_dtype(meta.dtype, dtype).itemsize
            if size and size + nbytes > part_bytes:
                flush()
            group[p] = abstract(p, meta)
            size += nbytes
        flush()
    return out


def _load_format1(folder: Path, dtype) -> dict:
    """Stacked numpy params from a format-1 checkpoint (ocp.StandardCheckpointer)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(folder)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        abstract = unflatten({p: np.empty(tuple(m.shape), dtype or m.dtype) for p, m in leaves(tree).items()})
        return ckpt.restore(folder, abstract)


def _put(value: np.ndarray, sharding) -> Any:
    """value onto `sharding`, each device given only its own slice."""
    import jax

    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
