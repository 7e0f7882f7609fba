"""LoRA adapters on the transformer's Linear layers: y = x·W + b + ((x·a)·s)·b_lora.

An adapter is {path: LoraLayer} over our (fused) Linear layers, in per-layer paths
("double_blocks_3/img_attn/qkv", "single_blocks_0/linear1", ...). The model reads adapters from
two variable collections beside "params" (see layers.Linear):

    {"params": params, "lora": {path: {"a": (in, R), "b": (R, out)}}, "lora_scale": {path: {"s": (R,)}}}

in the model's layout (stacked (L, ...) when cfg.scan_layers). Several adapters are mixed by
concatenating their ranks; each rank column's scale is the adapter's weight times its own
scale (alpha / rank), so changing weights never changes shapes (nothing recompiles).
A LoRA on part of a fused layer (diffusers' to_q alone) is a LoRA on the fused layer whose b is
zero outside that part (see convert/lora.py). Pipelines get diffusers' LoRA methods (load_lora_weights,
set_adapters, fuse_lora...) from LoraMixin at the end of this file.
"""
from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import sharding
from .config import FluxConfig
from .layers import LORA, LORA_SCALE
from .model import STACKS


@dataclasses.dataclass
class LoraLayer:
    """One Linear's low-rank update a @ b · scale; a (in, r), b (r, out)."""
    a: np.ndarray
    b: np.ndarray
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.a.shape[-1]


Adapter = dict  # {per-layer path: LoraLayer}


def split_layer(path: str) -> tuple[str, int | None]:
    """'double_blocks_3/img_attn/qkv' -> ('double_blocks/img_attn/qkv', 3); other paths -> (path, None)."""
    head, _, rest = path.partition("/")
    m = re.fullmatch(r"(.+)_(\d+)", head)
    if m and m.group(1) in STACKS:
        return f"{m.group(1)}/{rest}", int(m.group(2))
    return path, None


def _nest(flat: dict[str, dict]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path.split("/"):
            node = node.setdefault(k, {})
        node.update(leaf)
    return out


def _flat(tree: dict, leaf_keys: set[str], prefix: str = "") -> dict[str, dict]:
    """{path: {leaf: array}} for the dicts of `tree` whose keys are leaf_keys."""
    if set(tree) <= leaf_keys and all(not isinstance(v, dict) for v in tree.values()):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, leaf_keys, f"{prefix}/{k}" if prefix else k))
    return out


def n_layers(cfg: FluxConfig, stack: str) -> int:
    return cfg.depth if stack == "double_blocks" else cfg.depth_single_blocks


def mix(adapters: Sequence[tuple[Adapter, float]], cfg: FluxConfig, dtype=jnp.float32) -> dict:
    """Weighted adapters -> {"lora": ..., "lora_scale": ...} variables in the model's layout.

    Ranks concatenate per layer. Stacked (scanned) layers need one rank across the stack: layers
    an adapter does not touch get zero columns (a = b = 0), which add nothing.
    """
    columns: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for adapter, weight in adapters:
        for path, layer in adapter.items():
            s = np.full((layer.rank,), weight * layer.scale, np.float32)
            columns.setdefault(path, []).append((layer.a, layer.b, s))
    merged = {p: tuple(np.concatenate(parts, axis=i) for i, parts in zip((-1, -2, -1), zip(*cols)))
              for p, cols in columns.items()}
    if cfg.scan_layers:
        merged = _stack_layers(merged, cfg)
    lora = {p: {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)} for p, (a, b, _) in merged.items()}
    scale = {p: {"s": jnp.asarray(s, jnp.float32)} for p, (_, _, s) in merged.items()}
    return {LORA: _nest(lora), LORA_SCALE: _nest(scale)}


def _stack_layers(merged: dict[str, tuple], cfg: FluxConfig) -> dict[str, tuple]:
    """Per-layer (a, b, s) -> stacked (L, ...) for the block stacks, zero-padded to the largest rank."""
    out, stacked = {}, {}
    for path, abs_ in merged.items():
        base, layer = split_layer(path)
        if layer is None:
            out[path] = abs_
        else:
            stacked.setdefault(base, {})[layer] = abs_
    for base, layers in stacked.items():
        rank = max(a.shape[-1] for a, _, _ in layers.values())
        a0, b0, _ = next(iter(layers.values()))
        n = n_layers(cfg, base.split("/")[0])
        a = np.zeros((n, a0.shape[0], rank), np.float32)
        b = np.zeros((n, rank, b0.shape[1]), np.float32)
        s = np.zeros((n, rank), np.float32)
        for i, (ai, bi, si) in layers.items():
            r = ai.shape[-1]
            a[i, :, :r], b[i, :r], s[i, :r] = ai, bi, si
        out[base] = (a, b, s)
    return out


def layers_of(variables: dict, cfg: FluxConfig) -> Adapter:
    """{"lora", "lora_scale"} variables (either layout) -> an adapter in per-layer paths, each
    column's scale folded into b (file formats carry one scale a layer)."""
    ab = _flat(variables[LORA], {"a", "b"})
    ss = _flat(variables[LORA_SCALE], {"s"})
    out: Adapter = {}
    for path, leaf in ab.items():
        a, b = np.asarray(leaf["a"], np.float32), np.asarray(leaf["b"], np.float32)
        s = np.asarray(ss[path]["s"], np.float32)
        b = b * s[..., :, None]
        if path.split("/")[0] in STACKS:
            for i in range(a.shape[0]):
                stack, _, rest = path.partition("/")
                out[f"{stack}_{i}/{rest}"] = LoraLayer(a[i], b[i])
        else:
            out[path] = LoraLayer(a, b)
    return out


def fuse(params: dict, variables: dict) -> dict:
    """params with each adapted kernel replaced by kernel + a·diag(s)·b (same layout as variables)."""
    ab = _flat(variables[LORA], {"a", "b"})
    ss = _flat(variables[LORA_SCALE], {"s"})
    flat = {path: leaf for path, leaf in _flat(params, {"kernel", "bias", "scale"}).items()}
    missing = sorted(set(ab) - set(flat))
    if missing:
        raise ValueError(f"LoRA layers with no matching param: {missing[:5]}")
    fused = dict(flat)
    for path, leaf in ab.items():
        k = flat[path]["kernel"]
        delta = jnp.einsum("...ir,...r,...ro->...io", leaf["a"].astype(jnp.float32),
                           ss[path]["s"].astype(jnp.float32), leaf["b"].astype(jnp.float32))
        fused[path] = {**flat[path], "kernel": (k.astype(jnp.float32) + delta).astype(k.dtype)}
    return _nest(fused)


def linear_paths(params: dict) -> list[str]:
    """Paths of every Linear (a dict holding a 2-D, or stacked 3-D, kernel) in a param tree."""
    return sorted(p for p, leaf in _flat(params, {"kernel", "bias", "scale"}).items()
                  if "kernel" in leaf and leaf["kernel"].ndim in (2, 3))


def matching(paths: Iterable[str], pattern: str) -> list[str]:
    """The paths whose text matches the regex `pattern` (re.search)."""
    rx = re.compile(pattern)
    return [p for p in paths if rx.search(p)]


def _weight(w, what: str) -> float:
    """w as a float, or a PipelineError naming `what` (bools and NaN are not weights)."""
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not np.isfinite(w):
        raise _pipeline_error(f"{what} must be a finite number, got {w!r}")
    return float(w)


def _pipeline_error(message: str) -> Exception:
    from .pipeline import PipelineError  # pipeline imports this module: imported when needed
    return PipelineError(message)


@dataclasses.dataclass
class LoraState:
    """A pipeline's adapters: loaded (by name, in load order), active (name, weight), and what runs."""
    adapters: dict = dataclasses.field(default_factory=dict)  # {name: Adapter}
    active: list = dataclasses.field(default_factory=list)  # [(name, weight)]
    variables: dict = dataclasses.field(default_factory=dict)  # side branch on the mesh; {} when none or fused
    # (name, weight) merged into the params by fuse_lora; unfuse_lora subtracts the same update again
    fused: Optional[list] = None


class LoraMixin:
    """diffusers' LoRA methods for FluxPipeline (and so its editing subclasses), same names and meanings.

    Needs self.params, self.cfg, self.dtype and self.mesh. Adapters run as a side branch beside the
    params (variables passed to the jitted sampler); only the active ones, mixed by concatenating
    ranks. set_adapters with new weights keeps every shape: nothing recompiles; changing which
    adapters are active (or loading one) changes the ranks and compiles the sampler once more.

    Differences from diffusers 0.42: while fused, loading and set_adapters are refused (unfuse_lora
    first); unload_lora_weights after fuse_lora restores the base weights (diffusers keeps the
    fused ones; here fuse_lora alone already drops the side branch); after fuse_lora(lora_scale=s)
    and unfuse_lora the adapters run at the weights set_adapters gave (diffusers leaves them
    multiplied by s). Unfusing subtracts the merged update, as diffusers (PEFT) does: exact in
    float32, within a rounding step of each weight in bf16. The original params are not kept (that
    would double the transformer's memory).
    """

    @property
    def lora_state(self) -> LoraState:
        if "_lora_state" not in self.__dict__:
            self._lora_state = LoraState()
        return self._lora_state

    @property
    def lora_variables(self) -> dict:
        """The LoRA variable collections the transformer runs with ({} without an active side branch)."""
        return self.lora_state.variables

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: Optional[str] = None):
        """Load a LoRA (a .safetensors file, a folder holding one, or a state dict) and make it the
        only active adapter, weight 1, as diffusers does. Names default to default_0, default_1, ..."""
        from convert.lora import LoraError, read_lora

        state = self._lora_unfused("load_lora_weights")
        name = f"default_{len(state.adapters)}" if adapter_name is None else adapter_name
        if not isinstance(name, str) or not name:
            raise _pipeline_error(f"adapter_name must be a non-empty string, got {name!r}")
        if name in state.adapters:
            raise _pipeline_error(f"adapter name {name!r} is already in use; pass another adapter_name "
                                  f"(loaded: {', '.join(state.adapters)})")
        try:
            adapter = read_lora(pretrained_model_name_or_path_or_dict, self.cfg)  # shapes checked against cfg
        except LoraError as e:
            raise _pipeline_error(str(e)) from None
        state.adapters[name] = adapter
        self._lora_activate([(name, 1.0)])

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """Run exactly the named adapters, each at its weight (a float for all, or one per name; None: 1)."""
        state = self._lora_unfused("set_adapters")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in state.adapters]
        if unknown or len(set(names)) != len(names):
            raise _pipeline_error(f"set_adapters: unknown or repeated adapter names {unknown or names}; "
                                  f"loaded: {', '.join(state.adapters) or 'none'}")
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise _pipeline_error(f"set_adapters: {len(names)} adapters but {len(weights)} weights")
        weights = [_weight(1.0 if w is None else w, "set_adapters: a weight") for w in weights]
        self._lora_activate(list(zip(names, weights)))

    def get_active_adapters(self) -> list[str]:
        return [name for name, _ in self.lora_state.active]

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Loaded adapter names by component, as diffusers (only the transformer takes LoRAs here)."""
        return {"transformer": list(self.lora_state.adapters)} if self.lora_state.adapters else {}

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Merge the active adapters (weights times lora_scale) into the transformer's params; the
        side branch is dropped, so sampling costs what it costs without LoRA."""
        state = self._lora_unfused("fuse_lora")
        if getattr(self, "quantize", None):
            raise _pipeline_error(f"fuse_lora: the transformer is quantized ({self.quantize}), so its adapters run "
                                  "as a side branch; set_adapters changes their weights")
        if not state.active:
            raise _pipeline_error("fuse_lora: no active adapter; load_lora_weights or set_adapters first")
        lora_scale = _weight(lora_scale, "fuse_lora: lora_scale")
        merged = [(n, w * lora_scale) for n, w in state.active]
        self._lora_merge(merged, 1.0)
        state.fused, state.variables = merged, {}

    def unfuse_lora(self) -> None:
        """Undo fuse_lora: subtract the merged update, run the active adapters as a side branch again."""
        state = self.lora_state
        if state.fused is None:
            return
        self._lora_merge(state.fused, -1.0)
        state.fused = None
        self._lora_activate(state.active)

    def unload_lora_weights(self) -> None:
        """Remove every adapter; fused ones are subtracted from the params first (base weights back)."""
        self.unfuse_lora()
        self._lora_state = LoraState()

    # ---------------------------------------------------------------- helpers
    def _lora_unfused(self, what: str) -> LoraState:
        if self.lora_state.fused is not None:
            raise _pipeline_error(f"{what}: LoRA weights are fused into the model; call unfuse_lora() first")
        return self.lora_state

    def _lora_mix(self, active: list[tuple[str, float]], dtype) -> dict:
        """The variables of `active` adapters, replicated on the mesh ({} for none)."""
        if not active:
            return {}
        variables = mix([(self.lora_state.adapters[n], w) for n, w in active], self.cfg, dtype)
        return jax.tree_util.tree_map(lambda x: sharding.put(x, sharding.replicated(self.mesh)), variables)

    def _lora_merge(self, adapters: list[tuple[str, float]], sign: float) -> None:
        """Add (sign 1) or subtract (-1) the adapters' update to the params, computed in float32;
        the update is recomputed rather than kept, so nothing stays on the devices for unfusing."""
        update = self._lora_mix(adapters, jnp.float32)
        update[LORA_SCALE] = jax.tree_util.tree_map(lambda s: sign * s, update[LORA_SCALE])
        self.params = sharding.put_params(self.mesh, fuse(self.params, update))

    def _lora_activate(self, active: list[tuple[str, float]]) -> None:
        self.lora_state.active = list(active)
        self.lora_state.variables = self._lora_mix(self.lora_state.active, self.dtype)
