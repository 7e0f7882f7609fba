"""Memory before loading: what each model and each stage of a pipeline call takes, and which schedule fits.

    components = read_pipeline(root)                   # configs and param shapes; no weights read
    est = estimate(components, height=1024, width=1024, dtype="bf16", quantize="int8")
    est.peak(low_memory=False), est.peak(low_memory=True), device_memory()
    plan(components, device_memory(), ...)              # the schedule that fits, or InsufficientMemory

Two schedules (`low_memory`):
  all resident (False)   the four models loaded together and kept;
  never resident together (True)   CLIP, T5 and the VAE loaded first; the text encoders are freed
                          after encoding, then the transformer loads; a call that must encode again
                          frees the transformer first (see FluxPipeline.from_pretrained).
The peak of a schedule is the largest of its stages, each stage being the params resident then plus
what the stage adds (load_stages / run_stages below).

Every number is per device: params by their shardings on the mesh, activations by the batch each
device computes (approximate on meshes with tensor or sequence axes: divided by their sizes).

Param bytes are exact (shapes from the configs and file headers, in the dtype they load in;
quantized kernels as flux_jax.quantize stores them). Loading a component also holds, for a moment,
the tensor being read (loading.assemble writes each layer into its preallocated stack), and float32
copies of it while it is quantized. Activations are a simple model (ActivationModel),
fitted to XLA's compiled memory analysis on CPU and rounded up: the large buffers of the busiest
layer of each model, all alive at once, plus the float copies of weights XLA makes (weight_copies).
Not modelled: the image encoding of the editing pipelines (about the decode's size) and Kontext's
reference tokens (they lengthen the transformer's sequence).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .config import PIXELS_PER_TOKEN, VAE_DOWNSAMPLE, FluxConfig, T5Config, VAEConfig, parse_dtype
from .loading import STACK_NAMES  # layer stacks, see loading.STACKS
from .quantize import MODES as QUANT_MODES, SCALE, is_target, part_shapes
from .tiling import TILE_LATENTS, use_tiling

GB = 1e9  # reported sizes are decimal gigabytes, as model sizes are quoted ("23.8 GB")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = (*TEXT_ENCODERS, "transformer", "vae")
LAYER_PATH = re.compile(rf"^({'|'.join(STACK_NAMES)})_(\d+)/(.+)$")  # per-layer checkpoint paths
CLIP_TOKENS = 77
QUANT_F32_COPIES = 2  # quantize.quantize_kernel's float32 input and qwix's scaled copy of it


# ---------------------------------------------------------------- quantization (as flux_jax.quantize stores it)

QUANT_ORDER = ("int8", "nf4", "int4")  # the mildest first: the one an error suggests


def quant_bits(mode: str) -> int:
    return 4 if QUANT_MODES[mode].packed else 8


def quantized_bytes(shape: tuple[int, ...], mode: str, dtype) -> int:
    """Bytes of a float kernel of `shape` quantized with `mode`: one byte a value (two for 4-bit
    modes, packed) plus its scales in the weight's dtype (see quantize.part_shapes)."""
    parts = part_shapes(shape, mode)
    return math.prod(parts[mode]) + math.prod(parts[SCALE]) * np.dtype(dtype).itemsize


# ---------------------------------------------------------------- reading shapes, not weights

@dataclasses.dataclass(frozen=True)
class Component:
    """A model's config and its params' (shape, dtype) by '/'-joined path, layer stacks stacked."""
    name: str
    config: Any
    params: dict[str, tuple[tuple[int, ...], np.dtype]]


def read_component(path: Path, name: str, **kw) -> Component:
    """Config and param shapes of one component (a converted folder, a diffusers folder or a BFL
    file) from its config and safetensors headers or checkpoint metadata; no weights are read.
    kw: converter options (axes_dim for BFL files)."""
    from convert import component_stream, is_converted
    from convert.core import leaves

    if is_converted(path):
        return _read_converted(path, name)
    config, target, _ = component_stream(name, path, **kw)  # names checked; the pieces are never read
    return Component(name, config, {p: (tuple(s.shape), np.dtype(s.dtype)) for p, s in leaves(target).items()})


def _read_converted(path: Path, name: str) -> Component:
    import json

    from convert import COMPONENTS as CONFIGS
    from convert.core import CONFIG_FILE, PARAMS_DIR, leaves
    from orbax.checkpoint import v1 as ocp1

    meta = json.loads((path / CONFIG_FILE).read_text())
    config = CONFIGS[meta.get("component", name)][2].from_dict(meta["config"])
    stored = leaves(ocp1.metadata(path / PARAMS_DIR).metadata)
    stored = {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in stored.items()}
    return Component(name, config, stack_paths(stored))


def stack_paths(params: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-layer paths (`layers_3/qkv/kernel`) -> stacked ones (`layers/qkv/kernel`, leading layer axis)."""
    out, layers = {}, {}
    for path, (shape, dtype) in params.items():
        m = LAYER_PATH.match(path)
        if m is None:
            out[path] = (shape, dtype)
        else:
            layers.setdefault(f"{m.group(1)}/{m.group(3)}", []).append((shape, dtype))
    out.update({p: ((len(v), *v[0][0]), v[0][1]) for p, v in layers.items()})
    return out


def read_pipeline(root: Path, transformer: Optional[Path] = None, **kw) -> dict[str, Component]:
    """{component: Component} of a FLUX folder; `transformer` replaces root/transformer (kw: its converter options)."""
    root = Path(root)
    out = {name: read_component(root / name, name) for name in (*TEXT_ENCODERS, "vae")}
    out["transformer"] = read_component(Path(transformer) if transformer else root / "transformer", "transformer",
                                        **kw)
    return out


# ---------------------------------------------------------------- params

def _shard_fraction(mesh, path: str, shape: tuple[int, ...]) -> float:
    """The share of a param one device holds on `mesh` (1: replicated or no mesh)."""
    if mesh is None or not shape:
        return 1.0
    from .sharding import param_sharding

    return math.prod(param_sharding(mesh, path, shape).shard_shape(shape)) / math.prod(shape)


def param_bytes(component: Component, dtype=None, quantize: Optional[str] = None, mesh=None,
                under: str = "") -> int:
    """Bytes of `component`'s params on one device, loaded in `dtype` (None: as stored), floating
    kernels quantized with `quantize` where flux_jax.quantize does; only paths starting with `under`."""
    dtype = parse_dtype(dtype)
    total = 0.0
    for path, (shape, stored) in component.params.items():
        if not path.startswith(under):
            continue
        dt = dtype if dtype is not None and jnp.issubdtype(stored, np.floating) else stored
        if quantize is not None and jnp.issubdtype(stored, np.floating) and is_target(component.name, path):
            nbytes = quantized_bytes(shape, quantize, dt)
        else:
            nbytes = math.prod(shape) * np.dtype(dt).itemsize
        total += nbytes * _shard_fraction(mesh, path, shape)
    return math.ceil(total)


def load_overhead(component: Component, dtype=None, quantize: Optional[str] = None, mesh=None,
                  scan_layers: bool = True) -> int:
    """Extra bytes while loading: one tensor in flight (loading.assemble writes each layer's into its
    preallocated stack), and while a kernel is quantized, float32 copies of it (QUANT_F32_COPIES).
    The same whether the transformer's layers are stacked (scan_layers) or not."""
    dtype = parse_dtype(dtype)
    largest = 0.0
    for path, (shape, stored) in component.params.items():
        shape = shape[1:] if path.partition("/")[0] in STACK_NAMES else shape  # a layer's tensor (read one at a time)
        dt = dtype if dtype is not None and jnp.issubdtype(stored, np.floating) else stored
        per_value = np.dtype(dt).itemsize
        if quantize is not None and jnp.issubdtype(stored, np.floating) and is_target(component.name, path):
            per_value += QUANT_F32_COPIES * np.dtype(np.float32).itemsize
        largest = max(largest, math.prod(shape) * per_value * _shard_fraction(mesh, path, shape))
    return math.ceil(largest)


# ---------------------------------------------------------------- activations

@dataclasses.dataclass(frozen=True)
class ActivationModel:
    """Live bytes inside one forward, in units of (rows × tokens × width) elements, fitted to XLA's
    compiled memory analysis on CPU (tests/test_memory.py: the estimate is 1-2.5x what XLA plans).

    Transformer: at a single block's attention, the residual stream, linear1's output (3 + 4 widths:
    q, k, v and the MLP), q and k in float32 for RoPE, v, the attention output, the MLP's GELU and the
    concatenation for linear2 are alive together: `flux_stream` elements of the compute dtype and
    `flux_f32` of float32 a token and width. XLA's attention adds float32 logits and probabilities
    (`attn_f32` × heads × L² a row; one head's with layers.per_head_attention, the CPU default);
    cuDNN's flash attention (GPU, half precision) adds none.
    T5/CLIP: `text_f32` float32 residual-stream copies and `text_wide` copies of the fused q/k/v and
    the gated FFN's two halves a token; T5's position bias is one more heads × L² float32 array.
    VAE decode: `vae_f32` float32 buffers of the largest level (full resolution, 256 channels: a
    GroupNorm in float32 beside the conv input and output) and the mid-block attention's logits.
    Weight copies: see weight_copies (`cpu_dequant` bytes a quantized value, `cpu_copy` the margin).
    """
    flux_stream: float = 26.0
    flux_f32: float = 4.0
    attn_f32: float = 2.0
    text_f32: float = 3.0
    text_wide: float = 1.0
    vae_f32: float = 4.0
    cpu_dequant: float = 1.2  # measured 1.10 (FLUX.1-dev, bf16, unrolled, int8 and int4 alike)
    cpu_copy: float = 1.1


ACTIVATION_MODEL = ActivationModel()


def logit_heads(dtype, platform: str, heads: int) -> int:
    """Heads whose L×L float32 logits one transformer attention holds at once: none with a flash
    kernel (cuDNN's on GPU in half precision; tokamax's Mosaic, Triton and cuDNN), one with
    layers.per_head_attention (CPU) or tokamax's xla_chunked (its 512×1024 chunks of every head: 183 MB
    at 4608 tokens × 24 heads, fp32, as per_head's 179 MB), all with XLA's (jax.nn's or tokamax's); on
    this process's own backend as layers.attention_impl decides (FLUX_JAX_ATTENTION)."""
    if platform == jax.default_backend():
        from .layers import PER_HEAD, TOKAMAX, XLA, attention_impl

        impl = attention_impl(np.dtype(dtype)) or XLA
        if impl in (PER_HEAD, f"{TOKAMAX}:xla_chunked"):
            return 1
        if impl == TOKAMAX:  # tokamax's own pick: its XLA version on CPU, a flash kernel on GPU and TPU
            return heads if platform == "cpu" else 0
        return heads if impl in (XLA, f"{TOKAMAX}:{XLA}") else 0
    if platform == "cpu":
        return 1
    return 0 if platform == "gpu" and np.dtype(dtype).itemsize == 2 else heads


def transformer_activations(cfg: FluxConfig, rows: int, tokens: int, itemsize: int, heads: int,
                            m: ActivationModel = ACTIVATION_MODEL) -> int:
    """Peak bytes of one forward of `rows` × `tokens` (text + image) tokens, `heads` heads' attention
    logits alive at once (see logit_heads)."""
    per_token = cfg.hidden_size * (m.flux_stream * itemsize + m.flux_f32 * 4)
    logits = m.attn_f32 * 4 * heads * tokens ** 2
    return math.ceil(rows * (tokens * per_token + logits))


def text_activations(width: int, inner: int, ffn: int, heads: int, rows: int, tokens: int, itemsize: int,
                     position_bias: bool = False, m: ActivationModel = ACTIVATION_MODEL) -> int:
    """Peak bytes of one layer of a T5/CLIP-style encoder (float32 residual, XLA attention)."""
    per_token = m.text_f32 * 4 * width + m.text_wide * itemsize * (3 * inner + 2 * ffn)
    square = (m.attn_f32 + position_bias) * 4 * heads + 4 * position_bias  # logits (+ bias and its buckets)
    return math.ceil(rows * tokens * (per_token + square * tokens))


def t5_activations(cfg: T5Config, rows: int, tokens: int, itemsize: int) -> int:
    return text_activations(cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.num_heads, rows, tokens, itemsize,
                            position_bias=True)


def clip_activations(cfg, rows: int, itemsize: int) -> int:
    return text_activations(cfg.hidden_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, rows,
                            CLIP_TOKENS, itemsize)


def vae_decode_activations(cfg: VAEConfig, rows: int, latent_h: int, latent_w: int,
                           m: ActivationModel = ACTIVATION_MODEL) -> int:
    """Peak bytes of decoding `rows` latents of latent_h × latent_w (one tile when tiled)."""
    chans = cfg.block_out_channels[::-1]
    # Decoder level i runs at 2^i times the latent size; its upsampler writes chans[i] channels at the next.
    level = lambda i: (latent_h << i) * (latent_w << i)
    largest = max(max(level(i), level(i + 1) if i < len(chans) - 1 else 0) * c for i, c in enumerate(chans))
    logits = m.attn_f32 * 4 * (latent_h * latent_w) ** 2
    return math.ceil(rows * (m.vae_f32 * 4 * largest + logits))


def tiled_decode_activations(cfg: VAEConfig, rows: int, latent_h: int, latent_w: int) -> int:
    """One tile's decode, plus the assembled image and the latents (kept on the host, counted to be safe)."""
    tile = vae_decode_activations(cfg, rows, min(TILE_LATENTS, latent_h), min(TILE_LATENTS, latent_w))
    image = rows * latent_h * latent_w * VAE_DOWNSAMPLE ** 2 * cfg.in_channels * 4
    return tile + image


def weight_copies(component: Component, itemsize: int, quantize: Optional[str], platform: str, mesh=None,
                  scanned: bool = True, under: str = "", m: ActivationModel = ACTIVATION_MODEL) -> int:
    """Bytes of float copies of kernels (under `under`) that XLA keeps during a forward.

    CPU (XLA's compiled memory, FLUX.1-dev and T5-XXL in bf16): a half-precision kernel was converted
    to float32, every layer's alive at once (48.7 GB for the transformer, 19.4 GB for T5), plus one
    layer's slice of a scanned stack. Since matmuls accumulate in float32 (quantize.accumulator) only
    the M = 1 ones (modulations, embedders) and T5's token table are converted (2 bf16 T5-XXL layers,
    77 tokens: 1.94 GB of temporaries, was 2.32); the whole-model count is kept as an upper bound. A
    quantized kernel is dequantized inside a scanned stack's loop one kernel at a time, in the compute
    dtype (2 T5-XXL int8 layers, 512 tokens: 0.29 GB of temporaries in all; its largest kernel is
    0.17 GB); unrolled blocks keep `cpu_dequant` bytes a value alive (13.0 GB, int8 or 4-bit), float32
    ones all 4 bytes; fp8 kernels alike (XLA:CPU upcasts their matmuls' operands: the same temporaries
    as int8's measured, real-width blocks unrolled and T5 scanned). `cpu_copy` is the margin on these.
    GPU/TPU (not measured here): half precision runs natively and a quantized kernel is dequantized
    next to its matmul: one layer's worth (fp8 on Ada/Hopper: none, a float8 GEMM reads it as is).
    """
    cpu = platform == "cpu"
    whole, layer = 0.0, {}  # copies of all layers alive at once; by stack, one layer's (CPU quantized: one kernel's)
    for path, (shape, dtype) in component.params.items():
        quantized = quantize is not None and jnp.issubdtype(dtype, np.floating) and is_target(component.name, path)
        if not (path.startswith(under) and path.endswith("kernel") and (quantized or (cpu and itemsize < 4))):
            continue
        n = math.prod(shape) * _shard_fraction(mesh, path, shape)
        stack = path.partition("/")[0]
        per_layer = n / shape[0] if stack in STACK_NAMES else n
        looped = stack in STACK_NAMES and (scanned or component.name != "transformer")  # the others always scan
        if quantized and looped and cpu:
            layer[stack] = max(layer.get(stack, 0.0), per_layer * itemsize)
        elif quantized and (looped or not cpu):
            layer[stack] = layer.get(stack, 0.0) + per_layer * itemsize
        elif quantized:
            whole += n * (4 if itemsize == 4 else m.cpu_dequant)
        else:
            whole += n * 4
            if looped:
                layer[stack] = layer.get(stack, 0.0) + per_layer * 4
    total = whole + max(layer.values(), default=0.0)
    return math.ceil(m.cpu_copy * total if cpu else total)


# ---------------------------------------------------------------- the estimate

@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per-device bytes: params, load overhead and activations by component, and the schedules' peaks."""
    params: dict[str, int]
    load: dict[str, int]
    activations: dict[str, int]  # "text_encoder" (CLIP), "text_encoder_2" (T5), "transformer", "vae"
    quantize: Optional[str]
    tiled: bool
    height: int
    width: int
    batch: int

    def load_stages(self, low_memory: bool) -> list[tuple[tuple[str, ...], int]]:
        """(resident components, extra bytes) while each component loads, in from_pretrained's order."""
        order = (*TEXT_ENCODERS, "vae") if low_memory else (*TEXT_ENCODERS, "transformer", "vae")
        stages = [(order[:i + 1], self.load[name]) for i, name in enumerate(order)]
        if low_memory:  # the transformer loads once the text encoders are freed
            stages.append((("vae", "transformer"), self.load["transformer"]))
        return stages

    def run_stages(self, low_memory: bool) -> list[tuple[tuple[str, ...], int]]:
        """(resident components, activation bytes) of encoding, denoising and decoding."""
        everything = COMPONENTS
        text = everything if not low_memory else (*TEXT_ENCODERS, "vae")
        image = everything if not low_memory else ("transformer", "vae")
        return [(text, self.activations[name]) for name in TEXT_ENCODERS] + [
            (image, self.activations["transformer"]), (image, self.activations["vae"])]

    def peak(self, low_memory: bool) -> int:
        stages = self.load_stages(low_memory) + self.run_stages(low_memory)
        return max(sum(self.params[c] for c in resident) + extra for resident, extra in stages)

    def describe(self) -> str:
        """A few lines for logs: params, activations and both peaks in GB."""
        gb = lambda d: ", ".join(f"{k} {v / GB:.2f}" for k, v in d.items())
        return (f"params GB: {gb(self.params)}\nactivations GB: {gb(self.activations)}\n"
                f"peak: all resident {self.peak(False) / GB:.2f} GB, never resident together "
                f"{self.peak(True) / GB:.2f} GB ({self.width}x{self.height}, batch {self.batch}, "
                f"quantize {self.quantize or 'none'}, VAE {'tiled' if self.tiled else 'untiled'})")


def estimate(components: dict[str, Component], height: int = 1024, width: int = 1024, batch: int = 1,
             txt_tokens: int = 512, dtype=None, quantize: Optional[str] = None, tiled: Optional[bool] = None,
             mesh=None, scan_layers: bool = True, platform: Optional[str] = None) -> Estimate:
    """Per-device bytes of a pipeline call of `batch` images of height × width with txt_tokens T5 tokens.

    dtype: the params' dtype (None: as stored; the transformer's is the compute dtype); quantize:
    None or a flux_jax.quantize mode; tiled: the VAE decode (None: tiling.use_tiling's rule);
    scan_layers: the transformer's layout; platform: 'cpu', 'gpu' or 'tpu' (None: JAX's default
    backend), for the attention kernel (cuDNN's flash on GPU in half precision) and weight copies.
    """
    if quantize is not None and quantize not in QUANT_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; use one of {', '.join(QUANT_MODES)}")
    dtype = parse_dtype(dtype)
    compute = dtype if dtype is not None else main_dtype(components["transformer"])
    platform = platform or jax.default_backend()
    heads = logit_heads(compute, platform, components["transformer"].config.num_heads)
    s = 4 if platform == "cpu" else np.dtype(compute).itemsize  # XLA:CPU computes half precision in float32
    rows, split = _rows_per_device(batch, mesh), _model_split(mesh)
    tiled = use_tiling(tiled, height, width)
    img_tokens = (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)
    cfg = {name: c.config for name, c in components.items()}
    latent = (height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE)
    decode = tiled_decode_activations if tiled else vae_decode_activations
    copies = lambda name, **kw: weight_copies(components[name], np.dtype(compute).itemsize, quantize, platform, mesh,
                                              **kw)
    activations = {
        "text_encoder": clip_activations(cfg["text_encoder"], rows, s) // split + copies("text_encoder"),
        "text_encoder_2": t5_activations(cfg["text_encoder_2"], rows, txt_tokens, s) // split
        + copies("text_encoder_2"),
        "transformer": transformer_activations(cfg["transformer"], rows, txt_tokens + img_tokens, s, heads) // split
        + copies("transformer", scanned=scan_layers),
        "vae": decode(cfg["vae"], rows, *latent) + copies("vae", under="decoder/"),
    }
    params = {name: param_bytes(components[name], dtype, quantize, mesh) for name in COMPONENTS}
    load = {name: load_overhead(components[name], dtype, quantize, mesh, scan_layers) for name in COMPONENTS}
    return Estimate(params, load, activations, quantize, tiled, height, width, batch)


def main_dtype(component: Component) -> np.dtype:
    """The floating dtype holding most of a component's bytes (its compute dtype when loaded as stored)."""
    by_dtype: dict[np.dtype, int] = {}
    for shape, dt in component.params.values():
        if jnp.issubdtype(dt, np.floating):
            by_dtype[dt] = by_dtype.get(dt, 0) + math.prod(shape) * dt.itemsize
    return max(by_dtype, key=by_dtype.get)


def _rows_per_device(batch: int, mesh) -> int:
    if mesh is None:
        return batch
    from .sharding import batch_shards, padded_batch

    return padded_batch(batch, mesh) // batch_shards(mesh)


def _model_split(mesh) -> int:
    """How many ways a row's activations are split (heads over `tensor`, tokens over `sequence`)."""
    return 1 if mesh is None else mesh.shape["tensor"] * mesh.shape["sequence"]


# ---------------------------------------------------------------- the device

@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    bytes: int  # what one device can still take
    name: str  # for messages: "NVIDIA H100 80GB HBM3", "host RAM"


def host_available() -> int:
    """Host memory this process can still take: MemAvailable, or the cgroup's room if smaller."""
    avail = _meminfo_available()
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = (Path(f).read_text().strip() for f in (limit_file, usage_file))
            if limit.isdigit():
                avail = min(avail, int(limit) - int(usage))
        except OSError:
            continue
    return max(avail, 0)


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory(devices: Optional[Iterable[Any]] = None) -> Optional[DeviceMemory]:
    """What one device can still take: bytes_limit - bytes_in_use on GPU/TPU (the smallest over
    `devices`, default this process's), host RAM shared by the CPU devices on CPU; None if unknown."""
    devices = list(devices) if devices is not None else jax.local_devices()
    if devices[0].platform == "cpu":
        return DeviceMemory(host_available() // len(devices), "host RAM" if len(devices) == 1
                            else f"host RAM shared by {len(devices)} CPU devices")
    stats = [d.memory_stats() for d in devices]
    if any(not s or "bytes_limit" not in s for s in stats):
        return None
    room = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    return DeviceMemory(room, devices[0].device_kind)


# ---------------------------------------------------------------- choosing a schedule

class InsufficientMemory(ValueError):
    """The pipeline cannot fit on the device: the one-line message names the estimate and the fix."""


@dataclasses.dataclass(frozen=True)
class Plan:
    low_memory: bool  # never resident together
    vae_tiling: Optional[bool]  # what the pipeline should set (None: the size rule)
    estimate: Estimate
    available: Optional[DeviceMemory]


def plan(components: dict[str, Component], available: Optional[DeviceMemory], low_memory: Optional[bool] = None,
         vae_tiling: Optional[bool] = None, quantize: Optional[str] = None, scan_quantized: bool = False,
         **kw) -> Plan:
    """The first of (all resident, never resident together) × (VAE tiling by the size rule, tiled)
    that fits in `available`; low_memory / vae_tiling not None fix their choice. Raises
    InsufficientMemory naming the estimate and the mildest quantize mode that would fit.
    scan_quantized: quantized modes would run with scanned blocks (the pipeline's default for them).
    kw: estimate's size and layout arguments."""
    schedules = (False, True) if low_memory is None else (bool(low_memory),)
    tilings = (vae_tiling,) if vae_tiling is not None else (None, True)
    candidates = [(lm, t) for lm in schedules for t in tilings]

    def best(mode: Optional[str]) -> tuple[int, bool, Optional[bool], Estimate]:
        """(peak, low_memory, tiling, estimate) of the first candidate that fits, else of the smallest."""
        tried = []
        for lm, t in candidates:
            layout = {"scan_layers": True} if mode and scan_quantized else {}
            est = estimate(components, quantize=mode, tiled=t, **{**kw, **layout})
            tried.append((est.peak(lm), lm, t, est))
            if available is None or tried[-1][0] <= available.bytes:
                return tried[-1]
        return min(tried, key=lambda c: c[0])

    peak, lm, t, est = best(quantize)
    if available is None or peak <= available.bytes:
        return Plan(lm, t, est, available)
    where = (f"estimated peak {peak / GB:.1f} GB > {available.bytes / GB:.1f} GB available on {available.name} "
             f"({est.width}x{est.height}, batch {est.batch}{', quantize ' + quantize if quantize else ''})")
    smaller = [m for m in QUANT_ORDER if quantize is None or quant_bits(m) < quant_bits(quantize)]
    peaks = {mode: best(mode)[0] for mode in smaller}
    for mode in smaller:
        if peaks[mode] <= available.bytes:
            raise InsufficientMemory(f"{where}; use --quantize {mode} (est. {peaks[mode] / GB:.1f} GB)")
    even = f"; even --quantize {smaller[-1]} needs {min(peaks.values()) / GB:.1f} GB" if smaller else ""
    raise InsufficientMemory(f"{where}{even}: use a smaller size or batch, or more devices (a mesh with fsdp)")
