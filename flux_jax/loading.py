"""Load one component's params straight onto the device mesh, in bounded host memory.

Sources: a converted (Orbax) folder, restored by Orbax with the target shardings so each host
reads only the slices its devices hold; or PyTorch safetensors (a diffusers folder or a BFL
file), converted tensor by tensor: each tensor is placed with its NamedSharding as soon as it
is read, and identity/transpose tensors are read only where a local device needs them (slices
of the memory map). Host memory beyond what the devices hold stays at about one tensor.

Stacked layer params (nn.scan layouts) are assembled on the devices from per-layer pieces, each
written into its preallocated stack as it comes.
With `quantize`, each targeted kernel is quantized on its devices right after it is placed, and its
float copy dropped (flux_jax/quantize.py): the float model never exists whole, anywhere.
"""
from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import quantize as qz, sharding

# Param stacks with a leading layer axis, by component (the transformer's only when scanned), each
# with the config field holding its number of layers.
STACKS = {"transformer": {"double_blocks": "depth", "single_blocks": "depth_single_blocks"},
          "text_encoder": {"layers": "num_layers"}, "text_encoder_2": {"layers": "num_layers"}, "vae": {}}
STACK_NAMES = tuple(dict.fromkeys(stack for stacks in STACKS.values() for stack in stacks))


class LoadError(ValueError):
    """A component that cannot be loaded: the message names the file and the problem."""


def place(mesh: Mesh, path: str, value: Any, dtype=None) -> jax.Array:
    """One host tensor (possibly a lazy memory-mapped view) -> a global array with its param sharding.

    Each local device's slice is read and cast on its own: a lazy view is never read whole.
    """
    dtype = np.dtype(dtype or value.dtype)
    target = sharding.param_sharding(mesh, path, value.shape)
    return jax.make_array_from_callback(tuple(value.shape), target,
                                        lambda idx: np.ascontiguousarray(np.asarray(value[idx]), dtype=dtype))


def _split(path: str, stacks: tuple[str, ...]) -> Optional[tuple[str, int]]:
    """'double_blocks_3/img_mlp/...' -> ('double_blocks/img_mlp/...', 3) when double_blocks is a stack."""
    head, _, rest = path.partition("/")
    m = re.fullmatch(r"(.+)_(\d+)", head)
    if m and m.group(1) in stacks:
        return f"{m.group(1)}/{rest}", int(m.group(2))
    return None


def assemble(mesh: Mesh, pieces: Iterable[tuple[str, jax.Array]], stacks: Mapping[str, int]) -> dict:
    """Per-layer (path, array) pieces -> a nested param dict, the `stacks` ({name: layers}) stacked on
    the devices. A stacked leaf is allocated whole when its first layer arrives and each layer is
    written into it in place (a donated buffer) and dropped: memory holds the params plus one piece."""
    from convert.core import unflatten

    flat: dict[str, jax.Array] = {}
    written: dict[str, set[int]] = {}
    for path, arr in pieces:
        split = _split(path, tuple(stacks))
        if split is None:
            flat[path] = arr
            continue
        key, i = split
        n = stacks[key.partition("/")[0]]
        if i >= n:
            raise LoadError(f"{path}: layer {i} of a model with {n}")
        if key not in flat:
            target = sharding.param_sharding(mesh, key, (n, *arr.shape))
            flat[key] = jnp.zeros((n, *arr.shape), arr.dtype, device=target)
            written[key] = set()
        if arr.shape != flat[key].shape[1:]:
            raise LoadError(f"{path}: shape {arr.shape} differs from the other layers' {flat[key].shape[1:]}")
        flat[key] = _write_layer(flat[key].sharding)(flat[key], arr, np.int32(i))
        written[key].add(i)
        del arr  # the per-layer copy goes as soon as it is written
    for key, got in written.items():
        missing = set(range(stacks[key.partition("/")[0]])) - got
        if missing:
            raise LoadError(f"{key}: layers {sorted(missing)} missing")
    release_host_memory()
    return unflatten(flat)


@functools.lru_cache(maxsize=None)
def _write_layer(target):
    """stack, layer, i -> the stack with layer i replaced, in the stack's (donated) buffer, on `target`."""
    return jax.jit(lambda stack, layer, i: jax.lax.dynamic_update_index_in_dim(stack, layer.astype(stack.dtype), i, 0),
                   donate_argnums=0, out_shardings=target)


def release_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim): host buffers under malloc's mmap
    threshold (a layer's smaller tensors) stay in the process's heap when freed, counted in its RSS,
    and a component's load or release would leave gigabytes there. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def layer_counts(name: str, cfg: Any, scan_layers: bool = True) -> dict[str, int]:
    """{stack: layers} of component `name` with config `cfg` (the transformer's stacks only when scanned)."""
    if name == "transformer" and not scan_layers:
        return {}
    return {stack: getattr(cfg, field) for stack, field in STACKS[name].items()}


def load_component(path: Path, name: str, mesh: Mesh, dtype=None, scan_layers: bool = True,
                   progress: bool = False, quantize: Optional[str] = None, **kw) -> tuple[dict, Any]:
    """(params on `mesh`, config) for one component from a converted folder, a diffusers folder or a BFL file.

    dtype: cast on load (None: as stored). scan_layers: the transformer's layout (stacked or per layer).
    quantize: a flux_jax.quantize mode for the component's target kernels (none for CLIP and the VAE);
    a folder converted with --quantize loads as it was saved, with quantize None or the same mode.
    kw: converter options (axes_dim for BFL files).
    """
    from convert import ConversionError, component_stream, is_converted, stored_quantization

    dtype = None if dtype is None else np.dtype(dtype)
    try:
        if is_converted(path):
            stored = stored_quantization(path)
            if quantize and stored and quantize != stored:
                raise LoadError(f"{path} was saved quantized {stored}: load it with quantize {stored} (or none), "
                                f"or convert the float weights again with --quantize {quantize}")
            by_group = bool(quantize and not stored and name in qz.TARGETS)
            pieces, cfg = _converted_pieces(path, mesh, dtype, by_group)
        else:
            cfg, _, stream = component_stream(name, path, progress=progress, **kw)
            pieces = ((p.path, place(mesh, p.path, p.value, dtype)) for p in stream)
        params = assemble(mesh, qz.quantize_pieces(pieces, name, quantize, mesh), layer_counts(name, cfg, scan_layers))
    except ConversionError as e:
        raise LoadError(str(e)) from None
    if name == "transformer":
        cfg = cfg.replace(scan_layers=scan_layers)
    return params, cfg


def _converted_pieces(path: Path, mesh: Mesh, dtype, by_group: bool) -> tuple[Iterable, Any]:
    """(per-layer (path, array) pieces on `mesh`, config) of a converted folder.

    by_group: restored one top-level group (a block, an embedder) at a time, each leaf handed over
    and forgotten, so that quantizing them holds at most one block in float; else all at once.
    """
    from convert import load_component as load_converted, stored_paths
    from convert.core import leaves

    target = lambda p, shape, _: sharding.param_sharding(mesh, p, shape)
    if not by_group:
        tree, cfg = load_converted(path, dtype, sharding=target, stacked=False)
        flat = leaves(tree)
        del tree
        # Each handed over and forgotten, a stack's layers one after another: the stacks being filled
        # replace the pieces already restored instead of coming on top of them.
        order = sorted(flat, key=lambda p: _split(p, STACK_NAMES) or (p, 0))
        return ((p, flat.pop(p)) for p in order), cfg

    def groups() -> Iterable:
        for group in dict.fromkeys(p.partition("/")[0] for p in stored_paths(path)):
            tree, _ = load_converted(path, dtype, sharding=target, stacked=False,
                                     select=lambda p: p.partition("/")[0] == group)
            flat = leaves(tree)
            del tree
            for p in list(flat):
                yield p, flat.pop(p)

    return groups(), load_converted(path, select=lambda p: False)[1]  # the config alone: nothing selected
