"""Weight-only quantization (flux_jax/quantize.py): one layer against a numpy reference and against
float, 4-bit packing, what the devices hold, quantizing while loading (tensor by tensor: the float
tree never exists whole), scanned = unrolled, a LoRA side branch on a quantized base, folders
converted quantized, and --quantize on the command line."""
from __future__ import annotations

import functools
import gc
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from convert import convert_to_checkpoint
from convert.core import leaves
from flux_jax import FluxPipeline, PipelineError, sharding
from flux_jax import generate as generate_cli
from flux_jax import quantize as qz
from flux_jax import sample as sample_cli
from flux_jax.loading import LoadError, load_component
from flux_jax.lora import LoraLayer, mix
from flux_jax.model import Flux, param_shapes, unstack_layers
from flux_jax.sampling import image_ids, text_ids
from flux_jax.sharding import single_device_mesh
from pipeline_fixtures import cached_flux_folder
from torch_ref import rel_err

MODES = tuple(qz.MODES)
# x @ W for W (512, 768) ~ N(0, 1), relative L2 error against float. Rounding with step s has RMS
# error s / sqrt(12): int8's s is absmax / 127.5 over a column of 512 (absmax ~3.2 sigma): 0.72 %;
# int4's is absmax / 7.5 over groups of 64 (~2.5 sigma): 9.6 %. NF4's levels are normal quantiles,
# denser near 0 where most weights are: a little better. Measured: int8 0.74 %, int4 10.3 %, nf4
# 9.2 % (groups of 128: 11.1 %, 9.6 %); bounds about 1.15x (int8: the 1 % goal).
# fp8 (weights and activations in float8_e4m3fn, 3 mantissa bits: a relative step of 2^-3 at most,
# rounding RMS ~2.6 % each side): measured 3.73 %.
LAYER_TOL = {"int8": 0.01, "int4": 0.12, "nf4": 0.106, "fp8": 0.043}
# The tiny int8 pipeline's final latents and images against float (2 steps, 64², fp32 compute), and
# the tiny transformer's output with nf4 weights. Measured: latents 0.053 %, images 0.22/255; nf4 2.1 %.
INT8_LATENT_TOL, INT8_IMAGE_TOL, NF4_MODEL_TOL = 0.005, 2 / 255, 0.05
# A LoRA's effect on the nf4 base against its effect on the float base, relative to the output.
# Measured 1.2 % (the LoRA itself changes the output by 10 %: a side branch left out would fail).
LORA_TOL = 0.04
MIN_EFFECT = 0.05  # the LoRA must change the output this much, so that the comparison means something
# The QLoRA paper's NormalFloat-4 levels (Appendix E), the reference's own copy.
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
INT_RANGE = {"int8": (-128, 127), "int4": (-8, 7)}
# float8_e4m3fn: largest value, mantissa bits, exponent of the smallest normal (2^-6)
E4M3_MAX, E4M3_MANTISSA_BITS, E4M3_MIN_EXP = 448.0, 3, -6
ROUNDING_MARGIN = 1e-4  # see reference
SIZE, STEPS, SEED = 64, 2, 3
CALL = dict(prompt="a red fox", height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=SEED, max_sequence_length=16,
            progress=False)


def reference(w: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(the dequantized kernel each mode must give, where rounding may go either way): symmetric
    absmax scales per output and group of rows; integers rounded to nearest and clipped, NF4 at the
    nearest level. XLA's w / scale can differ from numpy's in the last bit, so values within 1e-4
    of a rounding boundary (at -absmax: -(qmax + 1/2), a tie) may land on either side."""
    rows, cols = w.shape
    group = qz.MODES[mode].group or rows
    blocks = w.astype(np.float64).reshape(rows // group, group, cols)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    if mode == "fp8":  # float8_e4m3fn values of w / (absmax / 448), rounded to nearest even
        ratio = blocks / (absmax / E4M3_MAX)
        levels = ratio.astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * (absmax / E4M3_MAX)
        exponent = np.maximum(np.floor(np.log2(np.maximum(np.abs(ratio), 1e-30))), E4M3_MIN_EXP)
        step = 2.0 ** (exponent - E4M3_MANTISSA_BITS)
        margin = np.abs(np.abs(ratio / step - np.floor(ratio / step)) - 0.5)
    elif mode == "nf4":
        ratio = blocks / absmax
        levels = NF4_LEVELS[np.abs(ratio[..., None] - NF4_LEVELS).argmin(-1)] * absmax
        margin = np.abs(ratio[..., None] - (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).min(-1)
    else:
        lo, hi = INT_RANGE[mode]
        scale = absmax / (hi + 0.5)  # qwix's bound: the top value's bucket is as wide as the others
        ratio = blocks / scale
        levels = np.clip(np.round(ratio), lo, hi) * scale
        margin = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5)
    return levels.reshape(w.shape), (margin < ROUNDING_MARGIN).reshape(w.shape)


@pytest.mark.parametrize("mode", MODES)
def test_layer_matches_reference_and_error_bound(mode):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 768)).astype(np.float32)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    q = qz.quantize_kernel(jnp.asarray(w), mode)
    assert {k: v.shape for k, v in q.items()} == qz.part_shapes(w.shape, mode)
    got = np.asarray(qz.dequantize(q))
    want, either = reference(w, mode)
    assert either.mean() < 0.02  # mostly ±absmax, one in a group of 64
    np.testing.assert_allclose(got[~either], want[~either], rtol=0, atol=1e-5 * np.abs(w).max())
    assert rel_err(qz.dot(jnp.asarray(x), q), x @ w) <= LAYER_TOL[mode]


def test_stack_is_quantized_layer_by_layer():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 128, 64)), jnp.float32)
    quantize = jax.jit(qz.quantize_kernel, static_argnums=1)
    for mode in MODES:
        stacked = quantize(w, mode)
        for i in range(3):
            alone = quantize(w[i], mode)
            for key in stacked:
                np.testing.assert_array_equal(stacked[key][i], alone[key])


def test_weights_are_dequantized_one_layer_at_a_time():
    """XLA's temporaries for a chain of quantized layers, alone and in a loop (as the sampler runs
    them): about one layer's float weights, not all of them (see quantize._after)."""
    n, layers = 512, 6
    kernels = [jax.eval_shape(lambda: qz.quantize_kernel(jnp.zeros((n, n)), "int8")) for _ in range(layers)]
    x = jax.ShapeDtypeStruct((8, n), jnp.float32)

    def chain(ks, x):
        for k in ks:
            x = jnp.tanh(qz.dot(x, k))
        return x

    one_layer = n * n * 4
    for fn in (chain, lambda ks, x: jax.lax.fori_loop(0, 3, lambda i, x: chain(ks, x), x)):
        temp = jax.jit(fn).lower(kernels, x).compile().memory_analysis().temp_size_in_bytes
        assert temp < 1.5 * one_layer


def test_quantized_parts_are_sharded_like_their_kernel():
    """Values and scales take the kernel's logical axes; a mesh axis splits them where it divides."""
    mesh = {"fsdp": 4, "tensor": 2}
    spec = lambda path, shape: sharding.logical_spec(sharding.param_axes(path, len(shape)), shape, mesh)
    kernel = "double_blocks_0/img_attn/qkv/kernel"  # (embed, heads): fsdp on its rows, tensor on its columns
    assert spec(kernel, (3072, 9216)) == P("fsdp", "tensor")
    for mode in MODES:  # int8 scales (1, 9216): rows whole; 4-bit values (1536, ...), scales (48, ...): split
        for part, shape in qz.part_shapes((3072, 9216), mode).items():
            assert spec(f"{kernel}/{part}", shape) == P("fsdp" if shape[0] > 1 else None, "tensor")
    assert spec("single_blocks/linear2/kernel/scale", (38, 240, 3072)) == P(None, "tensor", "fsdp")  # stacked
    assert spec("layers/wo/kernel/int8", (24, 10240, 4096)) == P(None, "tensor", "fsdp")  # T5


def test_packing_every_byte():
    codes = np.arange(256, dtype=np.uint8).reshape(2, 128).T.reshape(128, 2)  # every byte once
    for signed in (True, False):
        values = qz.unpack(jnp.asarray(codes), signed)
        nibbles = np.stack([codes & 15, codes >> 4], 1).reshape(256, 2).astype(np.int8)
        want = np.where(nibbles > 7, nibbles - 16, nibbles) if signed else nibbles
        np.testing.assert_array_equal(values, want)
        np.testing.assert_array_equal(qz.pack(values), codes)


def test_bad_modes_fail_before_loading(tmp_path):
    with pytest.raises(PipelineError, match="int8, int4, nf4"):
        FluxPipeline.from_pretrained(tmp_path, quantize="int3")  # an empty folder: the mode is checked first
    with pytest.raises(qz.QuantizeError, match="int8, int4, nf4"):
        convert_to_checkpoint(cached_flux_folder("dev") / "transformer", tmp_path / "out", quantize="fp4")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- loading


def device_bytes(tree) -> int:
    return sum(a.addressable_data(0).on_device_size_in_bytes() for a in jax.tree_util.tree_leaves(tree))


def target_parts(params: dict) -> dict[str, dict]:
    """{kernel path: its quantized dict} of a param tree."""
    parts: dict[str, dict] = {}
    for path, value in leaves(params).items():
        kernel, _, key = path.rpartition("/")
        if kernel.endswith("/kernel"):
            parts.setdefault(kernel, {})[key] = value
    return parts


@pytest.fixture(scope="module")
def dev():
    return cached_flux_folder("dev")


@pytest.fixture(scope="module")
def pipes(dev):
    """The tiny dev pipeline in float32 and int8 (quantized while loading); scanned (compiles faster)."""
    return {mode: FluxPipeline.from_pretrained(dev, quantize=mode, scan_layers=True) for mode in (None, "int8")}


@pytest.fixture(scope="module")
def nf4(dev):
    """The tiny transformer loaded in nf4, stacked (each layer quantized, then stacked): (params, config)."""
    return load_component(dev / "transformer", "transformer", single_device_mesh(), quantize="nf4", scan_layers=True)


@functools.lru_cache(maxsize=None)
def forward(cfg):
    return jax.jit(lambda variables, x: Flux(cfg).apply(variables, *x))


def model_inputs(cfg, seed: int = 0, side: int = 4, n_txt: int = 5) -> tuple:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, side * side, cfg.in_channels), np.float32), image_ids(side, side),
            rng.standard_normal((1, n_txt, cfg.context_in_dim), np.float32), text_ids(n_txt),
            np.array([0.6], np.float32), rng.standard_normal((1, cfg.vec_in_dim), np.float32),
            np.array([3.5], np.float32))


def check_quantized(params: dict, float_params: dict, component: str, mode: str) -> None:
    """Target kernels, and only they, hold `mode`'s parts with the right dtypes, shapes and device bytes."""
    parts = target_parts(params)
    assert parts and all(qz.is_target(component, p) for p in parts)
    floats = leaves(float_params)
    storage = jnp.int8 if mode == "int8" else jnp.uint8  # fp8: its bits
    for path, part in parts.items():
        shape = floats[path].shape
        assert part[mode].dtype == storage and part[qz.SCALE].dtype == floats[path].dtype
        assert {k: v.shape for k, v in part.items()} == qz.part_shapes(shape, mode)
        # what the device holds: a byte a value for int8, half a byte for 4-bit (packed)
        packed = 2 if qz.MODES[mode].packed else 1
        assert part[mode].addressable_data(0).on_device_size_in_bytes() == np.prod(shape) // packed
    kept = [v for p, v in leaves(params).items() if p.rpartition("/")[0] not in parts]
    assert kept and all(jnp.issubdtype(v.dtype, jnp.floating) for v in kept)  # the rest: float, as loaded
    assert device_bytes(params) == qz.param_bytes(float_params, component, mode, jnp.float32)
    ratio = sum(map(device_bytes, parts.values())) / sum(device_bytes(floats[p]) for p in parts)
    assert ratio < (0.2 if qz.MODES[mode].packed else 0.3)  # of float32: 1/4, 1/8, + scales (32-row T5: 1/32)


def test_params_are_quantized_on_the_devices(pipes, nf4):
    pipe, float_pipe = pipes["int8"], pipes[None]
    assert pipe.quantize == "int8" and float_pipe.quantize is None
    check_quantized(pipe.params, float_pipe.params, "transformer", "int8")
    check_quantized(pipe.t5_params, float_pipe.t5_params, "text_encoder_2", "int8")
    check_quantized(nf4[0], float_pipe.params, "transformer", "nf4")


def test_int8_images_close_to_float(pipes):
    latents = {m: pipe(output_type="latent", **CALL).images for m, pipe in pipes.items()}
    assert 0 < rel_err(latents["int8"], latents[None]) <= INT8_LATENT_TOL
    images = {m: pipes[None].decode(jnp.asarray(z), SIZE, SIZE) for m, z in latents.items()}
    assert np.abs(images["int8"] - images[None]).max() <= INT8_IMAGE_TOL
    with pytest.raises(PipelineError, match="quantized"):  # LoRAs stay a side branch there
        pipes["int8"].fuse_lora()


def test_scanned_and_unrolled_agree_with_a_lora_side_branch(pipes, nf4):
    """nf4 (packed) kernels: layers quantized one by one while loading, then stacked, are the stacked
    float kernels quantized layer by layer; scanned and unrolled outputs agree, near the float ones
    (4-bit error) but not equal; a LoRA side branch on the quantized base changes the output as it
    does on the float base, within that error."""
    scanned, cfg = nf4
    jax.tree_util.tree_map(np.testing.assert_array_equal, scanned,
                           qz.quantize_tree(pipes[None].params, "transformer", "nf4"))
    unrolled, cfg_u = unstack_layers(scanned), cfg.replace(scan_layers=False)
    rng = np.random.default_rng(1)
    adapter = {p: LoraLayer(rng.standard_normal((cfg.hidden_size, 2)).astype(np.float32) / 8,
                            rng.standard_normal((2, n)).astype(np.float32) / 2)
               for p, n in (("double_blocks_1/img_attn/qkv", 3 * cfg.hidden_size),
                            ("single_blocks_0/linear1", 3 * cfg.hidden_size + cfg.mlp_hidden))}
    x = model_inputs(cfg)
    # without the LoRA: the same adapter at weight 0 (same shapes: one compilation a base)
    run = lambda c, params, w: np.asarray(forward(c)({"params": params, **mix([(adapter, w)], c)}, x))
    out = {(base, w): run(c, params, w) for base, (params, c) in
           (("nf4", nf4), ("per layer", (unrolled, cfg_u)), ("float", (pipes[None].params, cfg))) for w in (0.0, 1.0)}
    for w in (0.0, 1.0):
        assert rel_err(out["per layer", w], out["nf4", w]) <= 1e-6
        assert 0 < rel_err(out["nf4", w], out["float", w]) <= NF4_MODEL_TOL
    assert rel_err(out["float", 1.0], out["float", 0.0]) > MIN_EFFECT
    nf4_effect = out["nf4", 1.0] - out["nf4", 0.0]
    assert rel_err(out["float", 0.0] + nf4_effect, out["float", 1.0]) <= LORA_TOL


def float_bytes_alive() -> int:
    return sum(a.nbytes for a in jax.live_arrays() if jnp.issubdtype(a.dtype, jnp.floating))


@pytest.mark.parametrize("source", ["diffusers", "converted"])
def test_loading_never_holds_the_float_tree(dev, pipes, source, tmp_path, monkeypatch):
    """While loading with quantize, the float bytes alive at each quantization stay within what the
    result keeps in float (non-target params, scales) plus one tensor (one block, from a converted
    float folder, read block by block), well below the float tree's bytes. Same params either way."""
    path = dev / "transformer"
    if source == "converted":
        path = convert_to_checkpoint(path, tmp_path / "float")
    gc.collect()
    baseline = float_bytes_alive()
    peaks, sizes = [], []
    quantize_array = qz.quantize_array

    def watched(w, *args, **kw):
        peaks.append(float_bytes_alive() - baseline)
        sizes.append(w.nbytes)
        return quantize_array(w, *args, **kw)

    monkeypatch.setattr(qz, "quantize_array", watched)
    params, cfg = load_component(path, "transformer", single_device_mesh(), quantize="int8", scan_layers=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, pipes["int8"].params)
    shapes = param_shapes(cfg)  # float32, stacked: a block is a stack's n-th
    whole = qz.param_bytes(shapes, "transformer", None, jnp.float32)
    block = max(qz.param_bytes(shapes[s], "", None, jnp.float32) // n
                for s, n in (("double_blocks", cfg.depth), ("single_blocks", cfg.depth_single_blocks)))
    kept = sum(a.nbytes for a in jax.tree_util.tree_leaves(params) if jnp.issubdtype(a.dtype, jnp.floating))
    stacked = {"double_blocks", "single_blocks"}
    assert len(peaks) == sum(v.shape[0] if p.split("/")[0] in stacked else 1  # one call a kernel of a layer
                             for p, v in leaves(shapes).items() if qz.is_target("transformer", p))
    assert max(peaks) <= kept + (max(sizes) if source == "diffusers" else block) < whole / 2


def test_converted_quantized_loads_as_saved(dev, pipes, tmp_path):
    saved = convert_to_checkpoint(dev, tmp_path / "int8", dtype="fp32", quantize="int8")
    meta = json.loads((saved / "transformer" / "flux_jax_config.json").read_text())
    assert meta["quantize"] == "int8"
    assert "quantize" not in json.loads((saved / "vae" / "flux_jax_config.json").read_text())
    pipe = FluxPipeline.from_pretrained(saved, scan_layers=True)  # no quantize=: as saved
    assert pipe.quantize == "int8"
    for got, want in ((pipe.params, pipes["int8"].params), (pipe.t5_params, pipes["int8"].t5_params)):
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)  # the same values: the same images
    with pytest.raises(LoadError, match="saved quantized int8.*quantize int8"):
        load_component(saved / "transformer", "transformer", single_device_mesh(), quantize="nf4")


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_cli_quantize(tmp_path, capsys, mode):
    out = tmp_path / "fox.png"
    code = sample_cli.main(["--demo", "--quantize", mode, "--prompt", "a fox", "--seed", "1", "--height", "32",
                            "--width", "32", "--steps", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    with Image.open(out) as image:
        assert image.text["model"] == f"demo (random weights) [{mode}]"
    assert sample_cli.main(["--demo", "--quantize", "int3", "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "int8" in err and len(err.splitlines()) == 1
    args = generate_cli.build_parser().parse_args(["--prompts", "p", "--out", "o", "--quantize", "nf4"])
    assert args.quantize == "nf4"  # generate shares sample's model arguments and loader


# ---------------------------------------------------------------- fp8: weights and activations

# The tiny transformer's output with fp8 kernels against float32: measured 0.58-0.65 % over three
# inputs (a matmul's 3.7 % error is diluted by the residual stream and the float embedders).
FP8_MODEL_TOL = 0.01


@pytest.fixture(scope="module")
def fp8(dev):
    """The tiny transformer loaded in fp8 (quantized while loading), stacked: (params, config)."""
    return load_component(dev / "transformer", "transformer", single_device_mesh(), quantize="fp8", scan_layers=True)


def test_fp8_multiplies_in_float8(fp8, pipes, dev, tmp_path):
    """Every target kernel is a float8 x float8 dot_general in the lowered forward (no float fallback),
    the output stays near float's; a folder converted with --quantize fp8 loads the same params."""
    params, cfg = fp8
    check_quantized(params, pipes[None].params, "transformer", "fp8")
    x = model_inputs(cfg)
    hlo = forward(cfg).lower({"params": params}, x).as_text()
    f8_dots = [line for line in hlo.splitlines() if "dot_general" in line and line.count("xf8E4M3FN>") == 2]
    # in the scanned blocks: double: img and txt mod/lin, qkv, proj, fc1, fc2; single: modulation/lin, linear1, linear2
    assert len(f8_dots) == 2 * 5 + 3
    got, want = (np.asarray(forward(cfg)({"params": p}, x)) for p in (params, pipes[None].params))
    assert 0 < rel_err(got, want) <= FP8_MODEL_TOL
    saved = convert_to_checkpoint(dev / "transformer", tmp_path / "fp8", quantize="fp8")
    loaded, _ = load_component(saved, "transformer", single_device_mesh(), scan_layers=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


class FakeDevice:
    def __init__(self, platform: str, compute_capability: str | None = None):
        self.platform, self.compute_capability = platform, compute_capability


@pytest.mark.parametrize("device, native", [(FakeDevice("gpu", "9.0"), True), (FakeDevice("gpu", "8.9"), True),
                                            (FakeDevice("gpu", "8.0"), False), (FakeDevice("cpu"), False),
                                            (FakeDevice("tpu"), False)])
def test_fp8_where_the_hardware_multiplies_float8(device, native, monkeypatch):
    """Ada/Hopper and later: fp8 kernels go to the GEMM as they are (no add ordering them after x,
    which would copy every weight a matmul) and the blocks stay unrolled; elsewhere they are
    upcast like a dequantization, so ordered and scanned as the weight-only modes."""
    from flux_jax.pipeline import default_scan_layers

    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    qz.native_fp8.cache_clear()
    try:
        assert qz.native_fp8() is native
        assert qz.dequantized_in_matmul("fp8") is not native and qz.dequantized_in_matmul("int8")
        assert not qz.dequantized_in_matmul(None)
        assert default_scan_layers("fp8") is not native or device.platform == "tpu"
        kernel = qz.quantize_kernel(jnp.ones((64, 32)), "fp8")
        hlo = jax.jit(lambda x, k: qz.dot(x, k)).lower(jnp.ones((4, 64)), kernel).as_text()  # a fresh trace
        assert ("stablehlo.add" in hlo) is not native  # _after's add on the weight's bits
    finally:
        qz.native_fp8.cache_clear()
