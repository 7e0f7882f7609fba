"""LoRA file layouts: which key of a LoRA file is which factor of which rows of which of our Linear layers.

LoRA files spell module names in one of a few ways (LAYOUTS, one row each):

    diffusers/PEFT    transformer.transformer_blocks.0.attn.to_q.lora_A.weight      lora_B     alpha
    kohya sd-scripts  lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight        lora_up    alpha
    OneTrainer        lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight  lora_up  alpha
    ComfyUI/BFL names diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight  (or lora_A / lora_B)
    XLabs             double_blocks.0.processor.qkv_lora1.down.weight                up         (no alpha)

Each spelling names canonical modules, diffusers' or BFL's, and those name rows of our layers through
the converter's own rules (diffusers_rules, bfl_rules in convert/transformer.py): our transformer keeps
BFL's names and fuses q, k, v (and single blocks' MLP input) as BFL does, so a BFL module is one of our
Linear layers whole, and a diffusers module (to_q) a block of its rows. A layout needs no detector of
its own: a file is in the layout its keys parse in (no key parses in two).

The scale of a module is alpha / rank where the file has an alpha (kohya's rule), else 1; the
diffusers layout takes alpha from the LoraConfig saved with the file first (PEFT's rule).
Text-encoder keys (TEXT_ENCODER_KEY) belong to no layout: read_lora leaves them out with a warning.
Where diffusers 0.42 drops part of a kohya file (its embedder and final-layer LoRAs, converted without
the "transformer." prefix so never loaded, and the final layer's alpha) we apply it as sd-scripts and
ComfyUI do.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

from flux_jax.config import FluxConfig
from .core import layer_path, leaves
from .transformer import bfl_rules, diffusers_rules

MAX_LISTED = 10  # keys named in an error message; the rest are counted
# Module-name prefixes of the diffusers/PEFT layout, stripped in this order: pipeline-level
# files (FluxPipeline.save_lora_weights) carry "transformer.", PEFT's own saves "base_model.model.".
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.")
WRITE_PREFIX = "transformer."  # what diffusers' FluxPipeline.load_lora_weights routes to the transformer
LORA_A, LORA_B, ALPHA = "lora_A.weight", "lora_B.weight", "alpha"
# diffusers' pipeline saves put the PEFT LoraConfig (lora_alpha, alpha_pattern...) as JSON here.
ADAPTER_METADATA = "lora_adapter_metadata"
# Key endings -> which factor: A (rank, in) "down", B (out, rank) "up", or the scalar alpha.
PEFT_ENDINGS = (("." + LORA_A, "A"), ("." + LORA_B, "B"), ("." + ALPHA, "alpha"))
KOHYA_ENDINGS = ((".lora_down.weight", "A"), (".lora_up.weight", "B"), ("." + ALPHA, "alpha"))
XLABS_ENDINGS = ((".down.weight", "A"), (".up.weight", "B"))  # x-flux's LoRALinearLayer saves no alpha
KOHYA_PREFIX = "lora_unet_"  # sd-scripts: "lora_unet_" + the BFL module name with "." -> "_"
ONETRAINER_PREFIX = "lora_transformer_"  # OneTrainer: "lora_transformer_" + the diffusers name, "." -> "_"
# ComfyUI saves BFL names under its model's "diffusion_model."; PEFT on a BFL model (fal's Kontext
# trainer) under "base_model.model."; BFL's own LoRAs have none.
BFL_PREFIXES = ("diffusion_model.", "base_model.model.")
XLABS_PREFIXES = ("diffusion_model.",)
# XLabs' (x-flux) LoRA processors of a double block, by the BFL module each adapts: image (1) and text (2)
# attention's qkv and output projection. A single block's qkv_lora adapts the q, k, v rows of linear1
# (not its MLP rows) and proj_lora adapts linear2, as diffusers reads them.
XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
                "proj_lora2": "txt_attn.proj"}
# Text-encoder LoRA keys: kohya's lora_te_/lora_te1_ (CLIP-L), lora_te2_/lora_te3_ (T5), ComfyUI's
# text_encoders.clip_l/t5xxl, diffusers' text_encoder(_2) with its model's own module roots.
TEXT_ENCODER_KEY = re.compile(r"lora_te\d*_|text_encoders\.|text_encoder(_2)?\.(text_model|encoder|shared)\.")


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model: the message names the problem."""


def listing(names: Sequence[str]) -> str:
    """The first MAX_LISTED names, then how many more."""
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" (and {len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


# ---------------------------------------------------------------------------------------------
# Which torch modules make which of our Linear layers


@dataclasses.dataclass(frozen=True)
class Part:
    """One torch Linear inside one of ours: its output row k is our output row rows[k]."""
    module: str  # "transformer_blocks.3.attn.to_q" (diffusers) or "double_blocks.3.img_attn.qkv" (BFL)
    rows: np.ndarray


@dataclasses.dataclass(frozen=True)
class Target:
    """One of our Linear layers (per-layer path) as one checkpoint layout's modules make it."""
    path: str  # "double_blocks_3/img_attn/qkv"
    in_dim: int
    out_dim: int
    parts: tuple[Part, ...]


def _part_widths(n: int, out_dim: int, cfg: FluxConfig) -> list[int]:
    """Output widths of the n torch Linears fused into one of ours: every fused part but the
    last is an attention projection (hidden_size wide); the last takes the rest (v, or proj_mlp)."""
    return [cfg.hidden_size] * (n - 1) + [out_dim - cfg.hidden_size * (n - 1)]


@functools.lru_cache(maxsize=8)
def _kernel_shapes(cfg: FluxConfig) -> dict[str, tuple[int, ...]]:
    from flux_jax.model import param_shapes

    return {p: s.shape for p, s in leaves(param_shapes(cfg.replace(scan_layers=True))).items()}


def _targets(rules, cfg: FluxConfig) -> dict[str, Target]:
    """{our per-layer Linear path: Target} from a converter's rules.

    Row placement is read off each rule by running its function on row numbers, so reordering
    rules (norm_out's swapped halves) need no second table.
    """
    shapes = _kernel_shapes(cfg)
    targets = {}
    for rule in rules:
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
def diffusers_targets(cfg: FluxConfig) -> dict[str, Target]:
    """{our per-layer Linear path: Target} for `cfg`, its parts diffusers' modules (to_q, to_k...)."""
    return _targets(diffusers_rules(cfg), cfg)


@functools.lru_cache(maxsize=8)
def bfl_targets(cfg: FluxConfig) -> dict[str, Target]:
    """{our per-layer Linear path: Target} for `cfg`, each one BFL module (double_blocks.0.img_attn.qkv)."""
    return _targets(bfl_rules(cfg), cfg)


@functools.lru_cache(maxsize=8)
def _parts(cfg: FluxConfig) -> dict[str, tuple[Target, Part]]:
    """{canonical module, diffusers' or BFL's name (the two never clash): (our Target, its Part)}."""
    return {part.module: (target, part) for targets in (diffusers_targets(cfg), bfl_targets(cfg))
            for target in targets.values() for part in target.parts}


def place(modules: tuple[str, ...], cfg: FluxConfig) -> tuple[Target, np.ndarray]:
    """Our layer, and its rows, that the concatenated outputs of canonical `modules` are."""
    found = [_parts(cfg)[m] for m in modules]
    if len({target.path for target, _ in found}) != 1:
        raise AssertionError(f"{modules} are not parts of one layer")
    return found[0][0], np.concatenate([part.rows for _, part in found])


# ---------------------------------------------------------------------------------------------
# How each layout spells its modules: {module as the file spells it: canonical modules, in row order}
# (from the rules alone, no shapes traced: check_lora reads a file's header before any model exists).


def _rule_modules(rules) -> list[str]:
    """The torch Linears behind a converter's kernel rules ("transformer_blocks.0.attn.to_q")."""
    return [s[:-len(".weight")] for r in rules if r.dst.endswith("/kernel") for s in r.src]


def _spelled(rules_of: Callable[[FluxConfig], list], prefix: str = "", fold: bool = False):
    """A module table spelling each module of `rules_of(cfg)` as prefix + its name, "." -> "_" if fold."""
    @functools.lru_cache(maxsize=8)
    def modules(cfg: FluxConfig) -> dict[str, tuple[str, ...]]:
        names = _rule_modules(rules_of(cfg))
        table = {prefix + (n.replace(".", "_") if fold else n): (n,) for n in names}
        if len(table) != len(names):
            raise AssertionError(f"module names clash once spelled with {prefix!r}")
        return table
    return modules


@functools.lru_cache(maxsize=8)
def _xlabs_modules(cfg: FluxConfig) -> dict[str, tuple[str, ...]]:
    table = {f"double_blocks.{i}.processor.{name}": (f"double_blocks.{i}.{bfl}",)
             for i in range(cfg.depth) for name, bfl in XLABS_DOUBLE.items()}
    for i in range(cfg.depth_single_blocks):
        table[f"single_blocks.{i}.processor.qkv_lora"] = tuple(f"single_transformer_blocks.{i}.attn.to_{p}"
                                                               for p in "qkv")
        table[f"single_blocks.{i}.processor.proj_lora"] = (f"single_blocks.{i}.linear2",)
    return table


# ---------------------------------------------------------------------------------------------
# Scales: (source, {module: {"A": key, "B": key, "alpha"?: key}}) -> {module: scale}


def _alpha_scale(source, keys: dict[str, str]) -> float:
    """alpha / rank (rank: lora_A's rows) where the module has an alpha, else 1 (alpha = rank)."""
    if "alpha" not in keys:
        return 1.0
    return float(np.asarray(source.get(keys["alpha"])).reshape(())) / source.shapes[keys["A"]][0]


def _alpha_scales(source, groups: dict) -> dict[str, float]:
    """alpha / rank per module (kohya's rule; diffusers' converters fold the same factor into the weights)."""
    return {module: _alpha_scale(source, keys) for module, keys in groups.items()}


def _peft_config(source) -> Optional[dict]:
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


def _diffusers_scales(source, groups: dict) -> dict[str, float]:
    """alpha / rank per module from the saved LoraConfig (rsLoRA: alpha / sqrt(rank)), else kohya's rule."""
    config = _peft_config(source)
    if config is None:
        return _alpha_scales(source, groups)
    scales = {}
    for module, keys in groups.items():
        rank = source.shapes[keys["A"]][0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
        scales[module] = float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return scales


# ---------------------------------------------------------------------------------------------
# The layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """One file layout: key = [prefix] + module as the layout spells it + ending."""
    name: str
    prefixes: tuple[str, ...]  # stripped where present, in this order
    endings: tuple[tuple[str, str], ...]  # (key ending, "A" | "B" | "alpha")
    modules: Callable[[FluxConfig], dict[str, tuple[str, ...]]]  # spelled module -> canonical modules
    scales: Callable[[Any, dict], dict[str, float]]

    def parse(self, key: str, cfg: FluxConfig) -> Optional[tuple[str, str]]:
        """(module as spelled, "A" | "B" | "alpha"), or None for a key this layout does not know."""
        modules = self.modules(cfg)
        for prefix in self.prefixes:
            key = key.removeprefix(prefix)
        for ending, kind in self.endings:
            if key.endswith(ending) and key[:-len(ending)] in modules:
                return key[:-len(ending)], kind
        return None

    @property
    def factors(self) -> str:
        """How the layout names A and B, for messages: "lora_A and lora_B"."""
        a, b = (next(e for e, k in self.endings if k == kind).strip(".").removesuffix(".weight") for kind in "AB")
        return f"{a} and {b}"


LAYOUTS = (
    Layout("diffusers/PEFT", DIFFUSERS_PREFIXES, PEFT_ENDINGS, _spelled(diffusers_rules), _diffusers_scales),
    Layout("kohya sd-scripts", (), KOHYA_ENDINGS, _spelled(bfl_rules, KOHYA_PREFIX, fold=True), _alpha_scales),
    Layout("OneTrainer", (), KOHYA_ENDINGS, _spelled(diffusers_rules, ONETRAINER_PREFIX, fold=True), _alpha_scales),
    Layout("ComfyUI/BFL names", BFL_PREFIXES, KOHYA_ENDINGS + PEFT_ENDINGS, _spelled(bfl_rules), _alpha_scales),
    Layout("XLabs", XLABS_PREFIXES, XLABS_ENDINGS, _xlabs_modules, _alpha_scales),
)


def detect_layout(keys: Sequence[str], name: str, cfg: FluxConfig) -> Layout:
    """The layout in which most of `keys` parse (first in LAYOUTS on a tie); LoraError if none parses any."""
    counts = [sum(layout.parse(k, cfg) is not None for k in keys) for layout in LAYOUTS]
    if not any(counts):
        raise LoraError(f"{name}: not a LoRA in a known layout for a FLUX transformer (known: "
                        f"{', '.join(lo.name for lo in LAYOUTS)}); its keys start {listing(sorted(keys))}")
    return LAYOUTS[counts.index(max(counts))]
