"""The device mesh, ONE table of logical-axis rules, and the helpers that place arrays on the mesh.

    mesh = make_mesh("data=2,fsdp=4")          # axes left out have size 1; -1 fills the rest
    with jax.set_mesh(mesh): ...               # model code reads the mesh from the context

Mesh axes:
  data      batch (data parallel): params replicated along it
  fsdp      batch too, and params sharded along it (fully sharded data parallel)
  tensor    attention heads and MLP width (tensor parallel)
  sequence  the joint [txt, img] token axis; attention swaps it for heads (Ulysses all-to-all)

Every parameter and activation axis has a logical name; LOGICAL_RULES maps names to mesh axes.
Parameters get their logical names in one place, PARAM_AXES, by the end of their path; model
code names activation axes only through `constrain`, a no-op when no mesh is set.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
FILL = -1  # in a mesh spec: this axis takes the devices the others leave

# logical axis -> mesh axes it is split over (empty: replicated). The one table.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("fsdp", "data"),
    "length": ("sequence",),
    "act_heads": ("tensor",),
    # parameters
    "embed": ("fsdp",),  # the model width (3072; T5 4096; CLIP 768)
    "heads": ("tensor",),  # fused q/k/v outputs, attention output inputs
    "mlp": ("tensor",),  # MLP hidden width, modulation vectors
    "vocab": ("tensor",),
    # VAE convolutions: 84M params, while its activations are the largest of any model here:
    # replicated weights, batch-split activations (a channel split costs collectives per layer).
    "conv_in": (),
    "conv_out": (),
}

# (regex on the end of a param path, logical names of its trailing dims). First match wins; a
# bias takes the last name of its kernel; other 1-D params (norm scales) and leading layer axes
# are replicated. Paths are '/'-joined, stacked ("double_blocks/...") or per layer ("double_blocks_3/...").
PARAM_AXES: tuple[tuple[str, tuple[Optional[str], ...]], ...] = (
    # FLUX transformer
    (r"(img_in|txt_in|in_layer)/kernel$", (None, "embed")),
    (r"(qkv|linear1)/kernel$", ("embed", "heads")),
    (r"(proj|linear2|out_layer)/kernel$", ("heads", "embed")),
    (r"(fc1|lin)/kernel$", ("embed", "mlp")),
    (r"fc2/kernel$", ("mlp", "embed")),
    (r"final_linear/kernel$", ("embed", None)),
    # T5 and CLIP (their qkv and fc1/fc2 share the rules above)
    (r"(embed_tokens|token_embedding)$", ("vocab", "embed")),
    (r"position_embedding$", (None, "embed")),
    (r"relative_attention_bias$", (None, None)),
    (r"(o|out_proj)/kernel$", ("heads", "embed")),
    (r"wi/kernel$", ("embed", "mlp")),
    (r"wo/kernel$", ("mlp", "embed")),
    # VAE: 3x3 and 1x1 convolutions (kh, kw, in, out); attention linears
    (r"(conv\w*|conv_shortcut)/kernel$", (None, None, "conv_in", "conv_out")),
    (r"(to_q|to_k|to_v)/kernel$", ("conv_in", "conv_out")),
    (r"to_out_0/kernel$", ("conv_out", "conv_in")),
)


class MeshError(ValueError):
    """A mesh spec that does not fit the devices: the message names the fix."""


# ---------------------------------------------------------------- the mesh

def parse_mesh_spec(spec: Optional[str], n_devices: int) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1, 'sequence': 1}; None: all devices on data."""
    sizes = {a: 1 for a in MESH_AXES}
    if not spec:
        sizes["data"] = n_devices
        return sizes
    given = {}
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in MESH_AXES:
            raise MeshError(f"bad mesh spec {spec!r}: use AXIS=N pairs joined by commas, axes from {MESH_AXES}")
        if name in given:
            raise MeshError(f"bad mesh spec {spec!r}: axis {name} given twice")
        try:
            given[name] = int(value)
        except ValueError:
            raise MeshError(f"bad mesh spec {spec!r}: {name}={value} is not an integer") from None
        if given[name] < 1 and given[name] != FILL:
            raise MeshError(f"bad mesh spec {spec!r}: sizes are >= 1, or -1 to take the remaining devices")
    fills = [a for a, n in given.items() if n == FILL]
    if len(fills) > 1:
        raise MeshError(f"bad mesh spec {spec!r}: only one axis can be -1")
    fixed = math.prod(n for n in given.values() if n != FILL)
    if fills:
        if n_devices % fixed:
            raise MeshError(f"mesh {spec!r}: {n_devices} devices are not a multiple of {fixed}")
        given[fills[0]] = n_devices // fixed
    sizes.update(given)
    if math.prod(sizes.values()) != n_devices:
        raise MeshError(f"mesh {spec!r} has {math.prod(sizes.values())} devices but {n_devices} are present; "
                        f"make the sizes multiply to {n_devices} (or use -1 for one axis)")
    return sizes


def make_mesh(spec: Optional[str] = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh with axes MESH_AXES over `devices` (default: all, every host's) sized by `spec`.

    Devices are laid out by mesh_utils so that the inner axes (tensor, sequence) get the fastest
    links; across TPU slices (several slice_index values) the data axis spans the slices.
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if n_slices > 1:
        if sizes["data"] % n_slices:
            raise MeshError(f"{n_slices} TPU slices: the data axis ({sizes['data']}) must be a multiple of them")
        per_slice = (sizes["data"] // n_slices, *shape[1:])
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, (n_slices, 1, 1, 1), devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):  # topologies it has no layout for
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def single_device_mesh() -> Mesh:
    return make_mesh(None, jax.devices()[:1])


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: a global batch must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])


def padded_batch(n: int, mesh: Mesh) -> int:
    k = batch_shards(mesh)
    return -(-n // k) * k


# ---------------------------------------------------------------- logical axes -> specs

def logical_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh_shape: dict[str, int]) -> P:
    """PartitionSpec for an array of `shape` whose dims have logical names `axes`.

    A mesh axis is used only where it divides the dim (else that dim stays whole along it), and
    at most once per array, so any shape gets a valid spec.
    """
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        chosen, size = [], 1
        for a in LOGICAL_RULES.get(name, ()) if name else ():
            n = mesh_shape.get(a, 1)
            if n > 1 and a not in used and dim % (size * n) == 0:
                chosen.append(a)
                size *= n
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*out)


def param_axes(path: str, ndim: int) -> tuple[Optional[str], ...]:
    """Logical names of a param's dims from PARAM_AXES (leading layer axes: None).

    The parts of a quantized kernel (".../kernel/int8", ".../kernel/scale": see flux_jax/quantize.py)
    take the kernel's names: packed values and group scales split where their shorter dims allow.
    """
    key = path[:-len("bias")] + "kernel" if path.endswith("/bias") else re.sub(r"/kernel/\w+$", "/kernel", path)
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, key):
            if path.endswith("/bias"):
                axes = axes[-1:]
            if len(axes) > ndim:
                break
            return (None,) * (ndim - len(axes)) + tuple(axes)
    return (None,) * ndim


def param_sharding(mesh: Mesh, path: str, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(param_axes(path, len(shape)), shape, dict(mesh.shape)))


def tree_paths(tree: Any) -> Any:
    """The same tree with each leaf replaced by its '/'-joined path."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp), tree)


def param_shardings(mesh: Mesh, params: Any) -> Any:
    """NamedSharding for every leaf of a param tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map(lambda p, a: param_sharding(mesh, p, a.shape), tree_paths(params), params)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Leading dim over the batch axes where it divides (a batch of 1 is replicated), the rest whole."""
    return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (len(shape) - 1), shape, dict(mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------- placing and fetching

def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) -> a global array; each device gets only its slice.

    Arrays already on the mesh are resharded by JAX instead (no host round trip).
    """
    if isinstance(x, jax.Array) and (not x.is_fully_addressable or jax.process_count() == 1):
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_batch(mesh: Mesh, x: Any) -> jax.Array:
    return put(x, batch_sharding(mesh, np.shape(x)))


def put_params(mesh: Mesh, params: Any, dtype=None) -> Any:
    """Place a param tree (numpy or jax leaves) on the mesh with its PARAM_AXES shardings, cast to dtype."""
    def place(path, leaf):
        leaf = leaf if dtype is None or leaf.dtype == dtype else (
            leaf.astype(dtype) if isinstance(leaf, jax.Array) else np.asarray(leaf, dtype))
        return put(leaf, param_sharding(mesh, path, leaf.shape))
    return jax.tree_util.tree_map(place, tree_paths(params), params)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array as numpy on every process (gathered across hosts if needed)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def rows_of_process(mesh: Mesh, n_rows: int, process: Optional[int] = None) -> list[int]:
    """Rows of a batch of n_rows (sharded as put_batch does) that `process` (default: this one) computes.

    A row held by several devices (replicated along tensor/sequence) belongs to the process of
    the first of them in mesh order, so every row has exactly one owner.
    """
    process = jax.process_index() if process is None else process
    sharding = batch_sharding(mesh, (n_rows,))
    owner = [None] * n_rows
    for device in mesh.devices.flat:
        rows = range(n_rows)[sharding.devices_indices_map((n_rows,))[device][0]]
        for r in rows:
            if owner[r] is None:
                owner[r] = device.process_index
    return [r for r in range(n_rows) if owner[r] == process]


# ---------------------------------------------------------------- inside model code

def current_mesh_shape() -> dict[str, int]:
    """Axis sizes of the mesh set with jax.set_mesh ({} when none)."""
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(mesh.shape)


def on_mesh() -> bool:
    """Whether a mesh of more than one device is set (else sharding annotations are no-ops)."""
    return math.prod(current_mesh_shape().values()) > 1


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
    """Pin an activation's sharding by logical axis names; a no-op without a (multi-device) mesh."""
    if not on_mesh():
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, current_mesh_shape()))


_warned: set = set()


def sharded_attention(attend: Callable, q: jax.Array, k: jax.Array, v: jax.Array, pe: jax.Array) -> jax.Array:
    """attend(q, k, v, pe) -> (B, L, H, D), run per device with shard_map on the current mesh.

    Batch over the batch axes, heads over tensor. With a sequence axis, each device enters with
    L/s tokens of every head and swaps them (all-to-all) for all L tokens of H/s heads: Ulysses
    sequence parallelism; attention itself then needs no communication.
    """
    if not on_mesh():
        return attend(q, k, v, pe)
    shape = current_mesh_shape()
    b, length, heads, _ = q.shape
    spec = logical_spec(("batch", "length", "act_heads", None), q.shape, shape)
    seq = shape.get("sequence", 1)
    tensor = shape.get("tensor", 1) if spec[2] else 1
    if seq > 1 and (spec[1] is None or (heads // tensor) % seq):
        key = (length, heads, seq)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"sequence axis {seq} must divide the joint length ({length}) and the heads per device "
                          f"({heads // tensor}): this attention runs unsplit along the sequence", stacklevel=3)
        spec = P(spec[0], None, spec[2], None)
        seq = 1
    pe_spec = logical_spec(("batch", "length" if seq > 1 else None, None, None), pe.shape, shape)

    def local(q, k, v, pe):
        if seq > 1:  # (b, L/s, h, d) -> (b, L, h/s, d): every token of h/s heads
            q, k, v = (jax.lax.all_to_all(t, "sequence", 2, 1, tiled=True) for t in (q, k, v))
            pe = jax.lax.all_gather(pe, "sequence", axis=1, tiled=True)
            return jax.lax.all_to_all(attend(q, k, v, pe), "sequence", 1, 2, tiled=True)
        return attend(q, k, v, pe)

    return jax.shard_map(local, in_specs=(spec, spec, spec, pe_spec), out_specs=spec)(q, k, v, pe)
