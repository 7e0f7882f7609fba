"""Quantization of the transformer's and T5's Linear kernels with qwix: weight-only (int8, int4, nf4),
or fp8 weights and activations (fp8: the matmul itself runs in float8 where the hardware has it).

    pipe = FluxPipeline.from_pretrained(path, dtype="bf16", quantize="int8")   # CLI: --quantize int8
    python -m convert /path/FLUX.1-dev flux-dev-int8 --quantize int8           # saved quantized, loads as is

A quantized kernel replaces the float (in, out) array at ".../kernel" by a dict whose key names its
format, so params stay plain nested dicts and the matmul needs no other configuration:

    {"int8": int8 (in, out),      "scale": (1, out)}       one scale per output channel
    {"int4": uint8 (in/2, out),   "scale": (in/G, out)}    a scale per output and group of G input rows
    {"nf4":  uint8 (in/2, out),   "scale": (in/G, out)}    NormalFloat-4 codes (QLoRA's), grouped alike
    {"fp8":  uint8 (in, out),     "scale": (1, out)}       float8_e4m3fn bits, one scale per output channel

A stacked kernel (L, in, out) (nn.scan layouts) gets a leading L on both, each layer with its own
scales. Scales are symmetric absmax ones computed by qwix in float32 and stored in the weight's
dtype, which is also the compute dtype: `dot` rebuilds qwix's QArray and calls qwix.dot, which for
a float activation dequantizes the weight (qwix.dequantize) right before a float matmul, inside
the jitted model. Values and scales take the kernel's sharding (see sharding.param_axes).

fp8 (Hopper's and Ada's tensor-core format, as torchao's "float8 dynamic row-wise"): the weight is
stored in float8_e4m3fn with a scale per output channel, and each activation row (token) is quantized
to float8_e4m3fn on the fly with its own absmax scale, so the matmul takes two float8 operands (one
lax.dot_general, f8 x f8 -> compute dtype, accumulated in float32 by cuBLASLt on GPU) and both scales
multiply its output. Where the hardware has no float8 GEMM (CPU, pre-Ada GPUs) XLA upcasts the
operands: the same products and float32 sums, slower. Error of one x @ W against float32 for N(0, 1)
inputs: 3.7 % (bf16: 0.17 %); its effect on the model is measured in benchmarks/quantize.py.

4-bit storage: XLA holds a jnp.int4 / uint4 array at one byte a value (measured on CPU: a 1024×1024
int4 array's device buffer is 1 MiB, as int8's; benchmarks/quantize.py prints it for any backend),
so two values are packed into each uint8 byte here (row 2i in the low nibble, 2i+1 in the high one)
and unpacked inside the jitted matmul: 4 bits really are half of int8. Full size (bf16 scales):
FLUX.1-dev's transformer 23.8 GB -> 12.0 GB int8, 6.4 GB int4 / nf4; T5-XXL 9.5 -> 4.9, 2.7 GB.

Why qwix's QArray functions and not its PtqProvider / quantize_model interception (tried with qwix
0.1.8 on the TINY Flux): under nn.scan, quantize_params quantizes a stacked kernel as one tensor,
scales shared across layers (a leading axis of 1, which nn.scan then refuses); its quantized leaves
are `WithAux(QArray)` nodes ('.../kernel/.array/.qvalue'), while Orbax pieces, layer stacking,
param shardings and LoRA address params by '/'-joined paths of plain dicts; and a packed array is
not a valid QArray (values must have the weight's shape). The quantizer and matmul are qwix's still.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Iterable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import qwix

from . import sharding

SCALE = "scale"
GROUP = 64  # input rows a 4-bit scale covers (bitsandbytes' NF4 block size; FLUX's and T5's widths divide it)
NIBBLE = 4
LOW_NIBBLE = 0xF


@dataclasses.dataclass(frozen=True)
class Mode:
    qtype: Any  # qwix's logical type
    group: Optional[int]  # input rows sharing a scale; None: one scale per output channel (all rows)
    packed: bool  # two values a byte
    signed: bool  # two's complement values (int4) or unsigned codes (nf4's table indices)
    activations: bool = False  # activations quantized too (per row, on the fly): a low-precision matmul
    bits: bool = False  # float values stored as their uint8 bits (see _after)


MODES = {
    "int8": Mode(jnp.int8, None, packed=False, signed=True),
    "int4": Mode(jnp.int4, GROUP, packed=True, signed=True),
    "nf4": Mode("nf4", GROUP, packed=True, signed=False),
    "fp8": Mode(jnp.float8_e4m3fn, None, packed=False, signed=True, activations=True, bits=True),
}
FP8_MIN_CAPABILITY = 8.9  # NVIDIA compute capability of the first float8 tensor cores (Ada)
ACTIVATION_SCALE_DTYPE = jnp.float32  # an activation row's scale: float32, so x / scale never overflows e4m3
HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # half-precision compute dtypes (see accumulator)

# Quantized kernels, by component: every Linear kernel inside the repeated blocks (stacked or per
# layer): 99.4 % of FLUX.1-dev's transformer weights and 97.2 % of T5-XXL's. The embedders, input and
# output projections and final layer stay float (0.6 %, and the layers most sensitive to error), as
# do biases, norm scales and T5's token table (read by a gather, not a matmul). CLIP and the VAE:
# not quantized.
TARGETS = {"transformer": re.compile(r"(double_blocks|single_blocks)(_\d+)?/.+/kernel"),
           "text_encoder_2": re.compile(r"layers(_\d+)?/.+/kernel")}


class QuantizeError(ValueError):
    """An unknown mode, or params quantized in another mode than asked: the message names the fix."""


def check_mode(mode: Optional[str]) -> Optional[str]:
    """`mode` if it is None or a known mode, else a QuantizeError listing the modes."""
    if mode is None or mode in MODES:
        return mode
    raise QuantizeError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")


def is_target(component: str, path: str) -> bool:
    """Whether the param at `path` (stacked or per-layer) of `component` is quantized."""
    rule = TARGETS.get(component)
    return bool(rule and rule.fullmatch(path))


def is_quantized(kernel: Any) -> bool:
    """Whether a Linear's kernel param is a quantized dict (a norm's {"scale": ...} is not)."""
    return isinstance(kernel, Mapping) and any(mode in kernel for mode in MODES)


def format_of(kernel: Mapping) -> str:
    """The mode a quantized kernel dict is stored in (its key other than "scale")."""
    return next(mode for mode in MODES if mode in kernel)


def mode_of(params: Any) -> Optional[str]:
    """The mode of the first quantized kernel in a param tree; None if it has none."""
    if not isinstance(params, Mapping):
        return None
    if is_quantized(params):
        return format_of(params)
    return next((m for m in map(mode_of, params.values()) if m), None)


def compute_dtype(kernel: Any):
    """The dtype a Linear computes in: its kernel's, or a quantized kernel's scale's."""
    return kernel[SCALE].dtype if is_quantized(kernel) else kernel.dtype


# ---------------------------------------------------------------- one tensor

def _group(mode: str, rows: int) -> Optional[int]:
    """Rows a scale covers along the input axis: the mode's group where it divides the rows, else all."""
    group = MODES[mode].group
    return group if group and rows % group == 0 and rows > group else None


def part_shapes(shape: tuple[int, ...], mode: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the quantized parts of a kernel of `shape` ((in, out) or (L, in, out))."""
    *lead, rows, cols = shape
    spec, group = MODES[mode], _group(mode, rows)
    return {mode: (*lead, rows // 2 if spec.packed else rows, cols),
            SCALE: (*lead, rows // group if group else 1, cols)}


def param_bytes(shapes: dict, component: str, mode: Optional[str], dtype) -> int:
    """Bytes a float param tree (arrays or ShapeDtypeStructs, stacked or per layer) of `component`
    takes on the devices in `dtype`, quantized in `mode` (None: all float)."""
    from convert.core import leaves

    itemsize = jnp.dtype(dtype).itemsize
    total = 0
    for path, leaf in leaves(shapes).items():
        if mode is None or not is_target(component, path):
            total += math.prod(leaf.shape) * itemsize
            continue
        values, scale = part_shapes(tuple(leaf.shape), mode).values()
        total += math.prod(values) + math.prod(scale) * itemsize  # values: a byte each (int8, packed uint8)
    return total


def quantize_kernel(w: jax.Array, mode: str) -> dict[str, jax.Array]:
    """A float kernel (in, out), or a stack (L, in, out) quantized layer by layer -> its quantized dict.

    Scales: float32 absmax, stored in w's dtype. Values: qwix's rounding, 4-bit ones packed.
    """
    spec = MODES[mode]
    rows = w.ndim - 2
    group = _group(mode, w.shape[rows])
    q = qwix.quantize(w.astype(jnp.float32), spec.qtype,
                      channelwise_axes=[a for a in range(w.ndim) if a != rows],  # outputs (and layers)
                      tiled_axes={rows: group} if group else None, scale_dtype=w.dtype)
    values = pack(q.qvalue) if spec.packed else q.qvalue
    return {mode: jax.lax.bitcast_convert_type(values, jnp.uint8) if spec.bits else values, SCALE: q.scale}


def pack(values: jax.Array) -> jax.Array:
    """4-bit values (..., in, out) -> uint8 (..., in/2, out): row 2i in the low nibble, row 2i+1 in the high."""
    nibbles = jax.lax.bitcast_convert_type(values.astype(jnp.int8), jnp.uint8) & LOW_NIBBLE
    pairs = nibbles.reshape(*values.shape[:-2], values.shape[-2] // 2, 2, values.shape[-1])
    return pairs[..., 0, :] | (pairs[..., 1, :] << NIBBLE)


def unpack(packed: jax.Array, signed: bool) -> jax.Array:
    """uint8 (..., in/2, out) -> the 4-bit values as int8 (..., in, out); `signed`: two's complement nibbles."""
    if signed:  # arithmetic shifts of the int8 byte sign-extend each nibble
        byte = jax.lax.bitcast_convert_type(packed, jnp.int8)
        low, high = (byte << NIBBLE) >> NIBBLE, byte >> NIBBLE
    else:
        low, high = packed & LOW_NIBBLE, packed >> NIBBLE
    pairs = jnp.stack([low, high], axis=-2)
    return pairs.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


def as_qarray(kernel: Mapping) -> qwix.QArray:
    """A quantized kernel dict as qwix's QArray (4-bit values unpacked)."""
    mode = format_of(kernel)
    spec, values = MODES[mode], kernel[mode]
    if spec.packed:
        values = unpack(values, spec.signed)
    if spec.bits:
        values = jax.lax.bitcast_convert_type(values, spec.qtype)
    return qwix.QArray(values, kernel[SCALE], qtype=spec.qtype)


def dequantize(kernel: Mapping) -> jax.Array:
    """The float kernel a quantized one stands for, in its scale's dtype."""
    return qwix.dequantize(as_qarray(kernel))


def dot(x: jax.Array, kernel: Any) -> jax.Array:
    """x @ kernel for a float kernel or a quantized one: weight-only modes dequantize it next to the
    matmul (qwix); fp8 quantizes x's rows too and multiplies in float8 (see quantize_rows)."""
    acc = accumulator(x.dtype)
    if not is_quantized(kernel):
        return jnp.dot(x, kernel, preferred_element_type=acc).astype(x.dtype)
    mode = format_of(kernel)
    spec = MODES[mode]
    # on a mesh, x's first element would cost a collective a layer; a native float8 GEMM reads the
    # weight as it is (nothing to hoist), where the add would cost a copy of it a matmul
    if not sharding.on_mesh() and dequantized_in_matmul(mode):
        kernel = _after(kernel, x)
    if spec.activations:
        return qwix.dot(quantize_rows(x, spec.qtype), as_qarray(kernel),
                        preferred_element_type=acc or x.dtype).astype(x.dtype)
    return qwix.dot(x, as_qarray(kernel), preferred_element_type=acc).astype(x.dtype)


def accumulator(dtype) -> Optional[jnp.dtype]:
    """What a matmul of `dtype` operands asks XLA to return before rounding to `dtype`: float32 for
    half precision on CPU, None (their dtype) otherwise. XLA:CPU hands a bf16 x bf16 -> f32 dot to
    YNNPACK as it is (AVX512-BF16 kernels where the host has them) but computes bf16 -> bf16 by
    converting both operands to f32 first: FLUX's linear1 shape (1152 x 3072 x 15360) 0.29 s vs 0.68 s
    on 2 Zen 4 cores (torch bf16: 0.29 s), the same float32 arithmetic. GPUs and TPUs accumulate in
    float32 and write the half dtype from the one GEMM."""
    return jnp.float32 if jnp.dtype(dtype) in HALF and jax.default_backend() == "cpu" else None


def dequantized_in_matmul(mode: Optional[str]) -> bool:
    """Whether `mode`'s kernels become float next to each matmul on this backend: the weight-only
    modes everywhere, fp8 where there is no float8 GEMM (XLA upcasts its operands)."""
    return mode is not None and not (MODES[mode].activations and native_fp8())


@functools.lru_cache(maxsize=None)
def native_fp8() -> bool:
    """Whether the default device multiplies float8 matrices in hardware: NVIDIA GPUs of compute
    capability 8.9 and up (Ada, Hopper, Blackwell). Elsewhere XLA upcasts the operands."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    return device.platform == "gpu" and capability is not None and float(capability) >= FP8_MIN_CAPABILITY


def quantize_rows(x: jax.Array, qtype) -> qwix.QArray:
    """x (..., in) quantized to `qtype` with one absmax scale per row (every axis but the last)."""
    return qwix.quantize(x, qtype, channelwise_axes=list(range(x.ndim - 1)), scale_dtype=ACTIVATION_SCALE_DTYPE)


def _after(kernel: Mapping, x: jax.Array) -> dict:
    """`kernel` with 0 added to its values, a 0 computed from x (a NaN or inf converts to 0 too), so
    that its dequantization waits for x. Without it XLA dequantizes every weight of a forward up front
    and hoists them out of a sampling loop, holding the whole model in float. Measured on CPU (XLA's
    temporaries of the compiled function): six int8 4096² layers in a row, 403 MB -> 67 MB (one
    layer's); a jitted 4-step Euler loop over 1 + 1 real-width FLUX blocks in fp32, 1.93 GB -> 0.57 GB.
    The add is on integers: fp8 values are stored as their uint8 bits for that (an fp8 add is upcast,
    to f16 on CPU, and that upcast of every weight hoisted out of the loop: 16 fp8 512² layers in a
    fori_loop, 9 layers' f32 bytes of temporaries; with the uint8 add, 1)."""
    mode = format_of(kernel)
    zero = (x.reshape(-1)[0] * 0).astype(kernel[mode].dtype)
    return {**kernel, mode: kernel[mode] + zero}


# ---------------------------------------------------------------- trees and streams

@functools.lru_cache(maxsize=None)
def _quantizer(mode: str, shardings: Optional[tuple[tuple[str, Any], ...]]):
    """quantize_kernel jitted for `mode`, its outputs placed on `shardings` (None: where JAX puts them)."""
    fn = functools.partial(quantize_kernel, mode=mode)
    return jax.jit(fn) if shardings is None else jax.jit(fn, out_shardings=dict(shardings))


def quantize_array(w: jax.Array, path: str, mode: str, mesh=None) -> dict[str, jax.Array]:
    """quantize_kernel on the devices holding w; with a mesh, values and scales get their param shardings."""
    shardings = None if mesh is None else tuple(
        (k, sharding.param_sharding(mesh, f"{path}/{k}", s)) for k, s in part_shapes(w.shape, mode).items())
    return _quantizer(mode, shardings)(w)


def quantize_pieces(pieces: Iterable[tuple[str, Any]], component: str, mode: Optional[str],
                    mesh=None) -> Iterator[tuple[str, Any]]:
    """(path, array) pieces with each targeted float kernel replaced, as it comes, by its parts
    (path/MODE, path/scale); its float array is dropped before the next piece is read. Other
    pieces (and kernels already quantized) pass through; mode None passes everything."""
    for path, value in pieces:
        if mode is None or not is_target(component, path):
            yield path, value
            continue
        parts = quantize_array(value, path, mode, mesh)
        del value  # the float tensor goes now: at most one is alive beside the quantized ones
        for key, part in parts.items():
            yield f"{path}/{key}", part


def quantize_tree(params: dict, component: str, mode: Optional[str], mesh=None) -> dict:
    """A whole param tree (stacked or per layer) with `component`'s target kernels quantized;
    one already quantized in `mode` comes back as it is, one in another mode is refused."""
    from convert.core import leaves, unflatten

    found = mode_of(params)
    if mode is None or found == mode:
        return params
    if found is not None:
        raise QuantizeError(f"the {component} params are quantized {found} already; cannot make them {mode}")
    return unflatten(dict(quantize_pieces(leaves(params).items(), component, check_mode(mode), mesh)))
