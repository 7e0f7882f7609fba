"""LoRA files <-> flux-jax adapters ({our Linear path: LoraLayer}, see flux_jax/lora.py).

    adapter = read_lora("style.safetensors", cfg)     # diffusers / PEFT keys
    write_lora(adapter, "out.safetensors", cfg)       # loads in diffusers' FluxPipeline.load_lora_weights

Which diffusers module feeds which rows of which of our Linear layers comes from one place, the
converter's `diffusers_rules` (see `diffusers_targets`): our transformer fuses diffusers' q, k, v
(and single blocks' proj_mlp) into one Linear, so a LoRA on part of a fused layer becomes a LoRA on
the fused layer whose b is zero outside that part's rows; parts with independent A's stack their
ranks (a = [A_q; A_k; ...], b block-structured). Exact: the fused layer's output is the parts'.

File layouts are detected from the keys (LAYOUTS); only diffusers/PEFT's is read now, kohya,
XLabs and ComfyUI layouts are added as further entries.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from flux_jax.config import DEV, FluxConfig
from flux_jax.lora import Adapter, LoraLayer
from .core import Reader, layer_path, leaves
from .transformer import diffusers_rules

# Module-name prefixes of the diffusers/PEFT layout, stripped in this order: pipeline-level
# files (FluxPipeline.save_lora_weights) carry "transformer.", PEFT's own saves "base_model.model.".
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.")
WRITE_PREFIX = "transformer."  # what diffusers' FluxPipeline.load_lora_weights routes to the transformer
LORA_A, LORA_B, ALPHA = "lora_A.weight", "lora_B.weight", "alpha"
# diffusers' pipeline saves put the PEFT LoraConfig (lora_alpha, alpha_pattern...) as JSON here.
ADAPTER_METADATA = "lora_adapter_metadata"
# Files a LoRA folder may hold: diffusers' save_lora_weights, PEFT's save_pretrained (+ its config).
FOLDER_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
PEFT_CONFIG = "adapter_config.json"
MAX_LISTED = 10  # keys named in an error message; the rest are counted


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model: the message names the problem."""


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" (and {len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


# ---------------------------------------------------------------------------------------------
# Which diffusers modules make which of our Linear layers


@dataclasses.dataclass(frozen=True)
class Part:
    """One diffusers Linear inside one of ours: its output row k is our output row rows[k]."""
    module: str  # "transformer_blocks.3.attn.to_q"
    rows: np.ndarray


@dataclasses.dataclass(frozen=True)
class Target:
    """One of our Linear layers (per-layer path) as diffusers' modules make it."""
    path: str  # "double_blocks_3/img_attn/qkv"
    in_dim: int
    out_dim: int
    parts: tuple[Part, ...]


def _part_widths(n: int, out_dim: int, cfg: FluxConfig) -> list[int]:
    """Output widths of the n diffusers Linears fused into one of ours: every fused part but the
    last is an attention projection (hidden_size wide); the last takes the rest (v, or proj_mlp)."""
    return [cfg.hidden_size] * (n - 1) + [out_dim - cfg.hidden_size * (n - 1)]


@functools.lru_cache(maxsize=8)
def diffusers_targets(cfg: FluxConfig) -> dict[str, Target]:
    """{our per-layer Linear path: Target} for `cfg`, from the converter's diffusers rules.

    Row placement is read off each rule by running its function on row numbers, so reordering
    rules (norm_out's swapped halves) need no second table.
    """
    from flux_jax.model import param_shapes

    shapes = {p: s.shape for p, s in leaves(param_shapes(cfg.replace(scan_layers=True))).items()}
    targets = {}
    for rule in diffusers_rules(cfg):
        if not rule.dst.endswith("/kernel"):
            continue
        in_dim, out_dim = shapes[rule.dst][-2:]
        modules = [s[:-len(".weight")] for s in rule.src]
        widths = _part_widths(len(modules), out_dim, cfg)
        starts = np.cumsum([0] + widths)
        # The kernel rule maps torch weights (out, in) to our (in, out): fed a column of source row
        # numbers per module, it returns the source row behind each of our output rows.
        order = np.asarray(rule.fn(*(np.arange(s, s + w)[:, None] for s, w in zip(starts, widths))))[0]
        if sorted(order.tolist()) != list(range(out_dim)):
            raise AssertionError(f"rule for {rule.dst} is not a row permutation")
        ours = np.argsort(order)  # our row of each source row
        path = layer_path(rule.dst[:-len("/kernel")], rule.layer)
        targets[path] = Target(path, in_dim, out_dim,
                               tuple(Part(m, ours[s:s + w]) for m, s, w in zip(modules, starts, widths)))
    return targets


@functools.lru_cache(maxsize=8)
def _modules(cfg: FluxConfig) -> dict[str, tuple[Target, int]]:
    """{diffusers module name: (our Target, index of its part)}."""
    return {part.module: (t, i) for t in diffusers_targets(cfg).values() for i, part in enumerate(t.parts)}


@functools.lru_cache(maxsize=8)
def _module_names(cfg: FluxConfig) -> frozenset[str]:
    """The diffusers Linear modules of `cfg`'s transformer, from the rules alone (no shapes traced)."""
    return frozenset(s[:-len(".weight")] for r in diffusers_rules(cfg) if r.dst.endswith("/kernel") for s in r.src)


# ---------------------------------------------------------------------------------------------
# Sources: a file, a folder, or an in-memory state dict


@dataclasses.dataclass
class Source:
    """Tensors by name (read on demand, as float32) plus the file's metadata."""
    name: str
    shapes: dict[str, tuple[int, ...]]
    get: Callable[[str], np.ndarray]
    metadata: dict[str, str]
    config: Optional[dict] = None  # PEFT's adapter_config.json, when read from a PEFT folder


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not needed otherwise
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def _file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:  # header only: bf16 tensors need not be decodable
        return dict(f.metadata() or {})


def open_source(source: str | os.PathLike | Mapping[str, Any]) -> Source:
    """A LoRA `.safetensors` file, a folder holding one (diffusers' or PEFT's), or a state dict."""
    if isinstance(source, Mapping):
        tensors = dict(source)
        return Source("state dict", {k: tuple(np.shape(v)) for k, v in tensors.items()},
                      lambda k: _to_numpy(tensors[k]), {})
    path, config = Path(source), None
    if path.is_dir():
        found = [path / f for f in FOLDER_FILES if (path / f).is_file()]
        if not found:
            raise LoraError(f"{path}: no LoRA weights in this folder (looked for {', '.join(FOLDER_FILES)})")
        if (path / PEFT_CONFIG).is_file():
            try:
                config = json.loads((path / PEFT_CONFIG).read_text())
            except (OSError, ValueError) as e:
                raise LoraError(f"{path / PEFT_CONFIG}: unreadable ({e})") from None
        path = found[0]
    elif not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    try:
        reader = Reader(path)
        metadata = _file_metadata(path)
    except Exception as e:  # ConversionError, OSError, or safetensors' own error types
        raise LoraError(f"{path}: not a readable .safetensors LoRA file ({e})") from None
    return Source(str(path), {k: reader.shape(k) for k in reader.keys()},
                  lambda k: np.asarray(reader.get(k), np.float32), metadata, config)


# ---------------------------------------------------------------------------------------------
# Layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """One file layout: whether a key set is in it, and how its keys name modules."""
    name: str
    matches: Callable[[Sequence[str]], bool]
    # key -> (module name, "A" | "B" | "alpha"), or None for a key the layout does not know
    parse_key: Callable[[str], Optional[tuple[str, str]]]
    # (source, {module: {"A", "B", "alpha"?: key}}) -> {module: scale}
    scales: Callable[[Source, dict], dict[str, float]]


def _diffusers_key(key: str) -> Optional[tuple[str, str]]:
    for prefix in DIFFUSERS_PREFIXES:
        key = key.removeprefix(prefix)
    for suffix, kind in ((LORA_A, "A"), (LORA_B, "B"), (ALPHA, "alpha")):
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], kind
    return None


def _peft_config(source: Source) -> Optional[dict]:
    """The LoraConfig the file was saved with: PEFT folder's json, or diffusers' file metadata."""
    if source.config is not None:
        return source.config
    raw = source.metadata.get(ADAPTER_METADATA)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise LoraError(f"{source.name}: corrupt {ADAPTER_METADATA} metadata (not JSON)") from None
    # Pipeline-level saves prefix each key with the component ("transformer.lora_alpha").
    prefixed = {k[len(WRITE_PREFIX):]: v for k, v in meta.items() if k.startswith(WRITE_PREFIX)}
    return prefixed or meta


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: a pattern matches a module name ending in it (as PEFT's get_pattern_key)."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default


def _diffusers_scales(source: Source, groups: dict) -> dict[str, float]:
    """alpha / rank per module: from the saved LoraConfig, else `.alpha` keys, else 1 (alpha = rank)."""
    config = _peft_config(source)
    scales = {}
    for module, keys in groups.items():
        rank = source.shapes[keys["A"]][0]
        if config is not None:
            alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
            root = math.sqrt(rank) if config.get("use_rslora") else rank
            scales[module] = float(alpha) / root
        elif "alpha" in keys:
            scales[module] = float(np.asarray(source.get(keys["alpha"])).reshape(())) / rank
        else:
            scales[module] = 1.0
    return scales


LAYOUTS = (
    Layout("diffusers/PEFT", lambda keys: any(k.endswith((LORA_A, LORA_B)) for k in keys), _diffusers_key,
           _diffusers_scales),
)


def detect_layout(keys: Sequence[str], name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.matches(keys):
            return layout
    raise LoraError(f"{name}: not a LoRA in a known layout (known: {', '.join(lo.name for lo in LAYOUTS)}); "
                    f"its keys start {_listing(sorted(keys))}")


def _group(source: Source, layout: Layout, cfg: FluxConfig) -> dict[str, dict[str, str]]:
    """{module: {"A": key, "B": key, "alpha": key}}, every key accounted for (else LoraError)."""
    modules = _module_names(cfg)
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in source.shapes:
        parsed = layout.parse_key(key)
        if parsed is None or parsed[0] not in modules:
            unknown.append(key)
        else:
            groups.setdefault(parsed[0], {})[parsed[1]] = key
    if unknown:
        raise LoraError(f"{source.name}: {len(unknown)} key(s) that are not LoRA weights of a FLUX transformer "
                        f"Linear layer: {_listing(sorted(unknown))}")
    incomplete = sorted(m for m, g in groups.items() if not {"A", "B"} <= set(g))
    if incomplete:
        raise LoraError(f"{source.name}: modules without both lora_A and lora_B: {_listing(incomplete)}")
    return groups


def _check_shapes(source: Source, groups: dict, cfg: FluxConfig) -> None:
    problems = []
    for module, keys in groups.items():
        target, i = _modules(cfg)[module]
        a, b = source.shapes[keys["A"]], source.shapes[keys["B"]]
        want_in, want_out = target.in_dim, len(target.parts[i].rows)
        if len(a) != 2 or len(b) != 2 or a[1] != want_in or b[0] != want_out or a[0] != b[1]:
            problems.append(f"{module}: lora_A {a}, lora_B {b} (want (r, {want_in}), ({want_out}, r))")
    if problems:
        raise LoraError(f"{source.name}: LoRA shapes do not fit this model (a LoRA for another FLUX size?): "
                        f"{_listing(sorted(problems))}")


def check_lora(source: str | os.PathLike | Mapping[str, Any], cfg: FluxConfig = DEV) -> None:
    """Raise LoraError unless `source` is a LoRA in a known layout whose every key names a FLUX
    transformer Linear layer. Reads only the header (no tensors); shapes are checked by read_lora."""
    src = open_source(source)
    _group(src, detect_layout(list(src.shapes), src.name), cfg)


def read_lora(source: str | os.PathLike | Mapping[str, Any], cfg: FluxConfig = DEV) -> Adapter:
    """A LoRA file (or folder, or state dict) -> Adapter over our Linear layers of the model `cfg`.

    cfg: the model's config (the pipelines pass theirs); the default, FLUX.1-dev's, has the widths
    and depths of every published FLUX.1 transformer. Keys: see LAYOUTS. A LoRA on parts of a fused
    layer becomes one LoRA on that layer (ranks stacked, b zero outside each part's rows).
    """
    src = open_source(source)
    layout = detect_layout(list(src.shapes), src.name)
    groups = _group(src, layout, cfg)
    _check_shapes(src, groups, cfg)
    scales = layout.scales(src, groups)
    by_target: dict[str, list[tuple[int, str]]] = {}
    for module in groups:
        target, i = _modules(cfg)[module]
        by_target.setdefault(target.path, []).append((i, module))
    adapter: Adapter = {}
    for path, found in by_target.items():
        target = diffusers_targets(cfg)[path]
        found.sort()
        uniform = len({scales[m] for _, m in found}) == 1
        a_cols, b_rows = [], []
        for i, module in found:
            a_part, b_part = src.get(groups[module]["A"]), src.get(groups[module]["B"])  # (r, in), (out_i, r)
            b = np.zeros((a_part.shape[0], target.out_dim), np.float32)
            b[:, target.parts[i].rows] = b_part.T * (1.0 if uniform else scales[module])
            a_cols.append(a_part.T)
            b_rows.append(b)
        adapter[path] = LoraLayer(np.concatenate(a_cols, axis=1), np.concatenate(b_rows, axis=0),
                                  scales[found[0][1]] if uniform else 1.0)
    return adapter


# ---------------------------------------------------------------------------------------------
# Writing


def diffusers_state_dict(adapter: Adapter, cfg: FluxConfig = DEV, dtype=np.float32) -> dict[str, np.ndarray]:
    """An Adapter as diffusers/PEFT tensors ("transformer.<module>.lora_A.weight" (r, in), lora_B (out, r)).

    A fused layer's shared a is written once per part, each part's lora_B its rows of b; the
    layer's scale is folded into lora_B (diffusers takes alpha = rank: scale 1).
    """
    targets = diffusers_targets(cfg)
    unknown = sorted(p for p in adapter if p not in targets)
    if unknown:
        raise LoraError(f"adapter layers that are not Linear layers of this model: {_listing(unknown)}")
    out = {}
    for path, layer in sorted(adapter.items()):
        target = targets[path]
        a, b = np.asarray(layer.a, np.float32), np.asarray(layer.b, np.float32) * np.float32(layer.scale)
        if a.ndim != 2 or b.shape != (a.shape[1], target.out_dim) or a.shape[0] != target.in_dim:
            raise LoraError(f"adapter layer {path}: a {a.shape}, b {b.shape} do not fit the model "
                            f"(want ({target.in_dim}, r), (r, {target.out_dim})); pass the model's cfg")
        for part in target.parts:
            out[f"{WRITE_PREFIX}{part.module}.{LORA_A}"] = np.ascontiguousarray(a.T, dtype)
            out[f"{WRITE_PREFIX}{part.module}.{LORA_B}"] = np.ascontiguousarray(b[:, part.rows].T, dtype)
    return out


def write_lora(adapter: Adapter, path: str | os.PathLike, cfg: FluxConfig = DEV,
               metadata: Optional[dict[str, str]] = None, dtype=np.float32) -> Path:
    """Write `adapter` as a diffusers LoRA file (see diffusers_state_dict), atomically; returns the path.

    metadata: extra string entries for the safetensors header (e.g. how it was trained).
    """
    from safetensors.numpy import save

    metadata = dict(metadata or {})
    if ADAPTER_METADATA in metadata:
        raise LoraError(f"metadata key {ADAPTER_METADATA!r} is diffusers' LoraConfig: scales are folded into "
                        f"lora_B, so the file must not carry one")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise LoraError(f"metadata must map strings to strings; not: {_listing([repr(k) for k in bad])}")
    data = save(diffusers_state_dict(adapter, cfg, dtype), metadata={"format": "pt", **metadata})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a weights file gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
