"""Load one component's params straight onto the device mesh, in bounded host memory.

Sources: a converted (Orbax) folder, restored by Orbax with the target shardings so each host
reads only the slices its devices hold; or PyTorch safetensors (a diffusers folder or a BFL
file), converted tensor by tensor: each tensor is placed with its NamedSharding as soon as it
is read, and identity/transpose tensors are read only where a local device needs them (slices
of the memory map). Host memory beyond what the devices hold stays at about one tensor.

Stacked layer params (nn.scan layouts) are assembled on the devices from per-layer pieces.
With `quantize`, each targeted kernel is quantized on its devices right after it is placed, and its
float copy dropped (flux_jax/quantize.py): the float model never exists whole, anywhere.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import quantize as qz, sharding

# Param stacks with a leading layer axis, by component (the transformer's only when scanned).
STACKS = {"transformer": ("double_blocks", "single_blocks"), "text_encoder": ("layers",),
          "text_encoder_2": ("layers",), "vae": ()}


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


def assemble(mesh: Mesh, pieces: Iterable[tuple[str, jax.Array]], stacks: tuple[str, ...]) -> dict:
    """Per-layer (path, array) pieces -> a nested param dict, stacking the `stacks` on the devices."""
    from convert.core import unflatten

    flat: dict[str, jax.Array] = {}
    layers: dict[str, dict[int, jax.Array]] = {}
    for path, arr in pieces:
        split = _split(path, stacks)
        if split is None:
            flat[path] = arr
        else:
            layers.setdefault(split[0], {})[split[1]] = arr
    for path, by_layer in layers.items():
        n = len(by_layer)
        if sorted(by_layer) != list(range(n)):
            raise LoadError(f"{path}: layers {sorted(set(range(max(by_layer) + 1)) - set(by_layer))} missing")
        parts = [by_layer.pop(i) for i in range(n)]
        target = sharding.param_sharding(mesh, path, (n, *parts[0].shape))
        flat[path] = jax.jit(lambda *a: jnp.stack(a), out_shardings=target)(*parts)
        del parts  # the per-layer copies go as soon as the stack exists
    return unflatten(flat)


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
    stacks = STACKS[name] if (name != "transformer" or scan_layers) else ()
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
        params = assemble(mesh, qz.quantize_pieces(pieces, name, quantize, mesh), stacks)
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
        return leaves(tree).items(), cfg

    def groups() -> Iterable:
        for group in dict.fromkeys(p.partition("/")[0] for p in stored_paths(path)):
            tree, _ = load_converted(path, dtype, sharding=target, stacked=False,
                                     select=lambda p: p.partition("/")[0] == group)
            flat = leaves(tree)
            del tree
            for p in list(flat):
                yield p, flat.pop(p)

    return groups(), load_converted(path, select=lambda p: False)[1]  # the config alone: nothing selected
