"""Quantization (flux_jax/quantize.py): weight-only int8, int4 and nf4, and fp8 weights and activations,
against bf16, in error and bytes (fp8's speed needs a Hopper GPU: benchmarks/transformer.py --gpu --quantize fp8).

    python benchmarks/quantize.py                    # everything below (CPU: a few minutes; training
                                                     # the digits model first, if needed: several more)
    python benchmarks/quantize.py --skip-digits      # (a) and the byte tables only

(a) One transformer forward at FLUX's real width (3072, 1 double + 2 single blocks, random weights,
    256², 128 text tokens): relative L2 error of each quantized model's output against the float
    model, both computing in bf16, and both in fp32 (the quantization error alone; bf16's own error
    against fp32 is printed for scale), and the bytes its params take on the device.
(b) The tiny text-to-image model trained on the digits (benchmarks/digits_model.py): classifier
    accuracy of its 50 samples (true CFG 3, 20 steps) in fp32, bf16 and each mode (bf16 compute),
    and the images' mean / max absolute difference from the bf16 ones. Its T5 is the demo's random
    one (only the transformer is trained), 2 layers 32 wide: a chaotic function that 4-bit weights
    change by ~50 % (int8: 3.5 %), so the 4-bit modes and fp8 are also run with the transformer alone quantized.
(c) XLA's temporaries for a jitted 4-step sampling loop over the blocks of (a) (compiled, not run):
    dequantized weights must not all be alive at once (on a GPU/TPU, run this to check the backend).
Also: the full FLUX.1-dev transformer's and T5-XXL's bytes per mode (computed from their shapes), and
the bytes a jnp.int4 array takes on this backend's devices (why 4-bit values are packed here).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits_model beside this file

MODES = ("int8", "int4", "nf4", "fp8")
TRANSFORMER_ONLY = ("int4", "nf4", "fp8")  # also run with T5 left in bf16 (see (b))
GB = 1e9


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def device_bytes(tree) -> int:
    import jax
    return sum(a.addressable_data(0).on_device_size_in_bytes() for a in jax.tree_util.tree_leaves(tree))


def int4_storage() -> None:
    import jax.numpy as jnp

    from flux_jax import quantize as qz

    shape = (1024, 1024)
    arrays = {"jnp.int8": jnp.zeros(shape, jnp.int8), "jnp.int4 (qwix's int4 values)": jnp.zeros(shape, jnp.int4),
              "jnp.uint4 (qwix's nf4 codes)": jnp.zeros(shape, jnp.uint4),
              "packed uint8 (ours)": qz.pack(jnp.zeros(shape, jnp.int4))}
    print(f"\n4-bit storage on {arrays['jnp.int8'].devices().pop().platform}: device bytes of 2^20 values")
    for name, a in arrays.items():
        on_device = a.addressable_data(0).on_device_size_in_bytes()
        per_value = on_device / np.prod(shape)
        print(f"  {name:<30} {on_device:>9,d} B  ({per_value:.2f} B a value; .nbytes says {a.nbytes:,d})")


def full_size_bytes() -> None:
    import jax
    import jax.numpy as jnp

    from flux_jax import quantize as qz
    from flux_jax.config import DEV, T5Config
    from flux_jax.model import param_shapes
    from flux_jax.t5 import T5Encoder

    t5 = jax.eval_shape(lambda: T5Encoder(T5Config()).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    shapes = {"transformer": param_shapes(DEV), "text_encoder_2": t5["params"]}
    print("\nfull-size params on the devices (GB), from their shapes; CLIP and the VAE stay 16-bit")
    print(f"  {'component':<16} {'bf16':>7} " + " ".join(f"{m:>7}" for m in MODES) + "   share quantized")
    for name, tree in shapes.items():
        sizes = [qz.param_bytes(tree, name, m, jnp.bfloat16) / GB for m in (None, *MODES)]
        total = sum(np.prod(l.shape) for l in jax.tree_util.tree_leaves(tree))
        from convert.core import leaves
        share = sum(np.prod(l.shape) for p, l in leaves(tree).items() if qz.is_target(name, p)) / total
        print(f"  {name:<16} " + " ".join(f"{s:>7.2f}" for s in sizes) + f"   {share:.1%} of {total / 1e9:.2f} B")


def real_width(args) -> None:
    import jax
    import jax.numpy as jnp

    from flux_jax import quantize as qz
    from flux_jax.config import DEV, PIXELS_PER_TOKEN
    from flux_jax.model import Flux, param_shapes
    from flux_jax.sampling import image_ids, text_ids

    cfg = DEV.replace(depth=args.depth, depth_single_blocks=args.single)
    side = args.size // PIXELS_PER_TOKEN
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, side * side, cfg.in_channels), np.float32), image_ids(side, side),
         rng.standard_normal((1, args.txt, cfg.context_in_dim), np.float32), text_ids(args.txt),
         np.array([0.7], np.float32), rng.standard_normal((1, cfg.vec_in_dim), np.float32),
         np.array([3.5], np.float32))

    # Random weights as demo.py draws them (kernels N(0, 1/fan_in)), plus small random biases and
    # norm scales near 1 so that every param matters; drawn on the device, leaf by leaf.
    def draw(path, s, key):
        name = path[-1].key
        if name == "kernel":
            return jax.random.normal(key, s.shape) / np.sqrt(s.shape[-2])
        return (name == "scale") + 0.02 * jax.random.normal(key, s.shape)

    shapes = param_shapes(cfg)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), len(jax.tree_util.tree_leaves(shapes))))
    params = jax.tree_util.tree_map_with_path(lambda p, s: draw(p, s, next(keys)), shapes)
    forward = lambda dtype, p: np.asarray(jax.jit(lambda p, x: Flux(cfg, dtype).apply({"params": p}, *x))(p, x),
                                          np.float32)
    t0 = time.perf_counter()
    refs, errors, sizes = {}, {}, {}  # errors[mode, dtype]: against the float model computing in dtype
    for dtype in (jnp.float32, jnp.bfloat16):
        params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
        refs[dtype] = forward(dtype, params)
        for mode in MODES:  # scales in the compute dtype, as loading makes them
            q = qz.quantize_tree(params, "transformer", mode)
            errors[mode, dtype] = rel(forward(dtype, q), refs[dtype])
            sizes[mode] = device_bytes(q)
            del q
    print(f"\n(a) one forward, width {cfg.hidden_size}, {args.depth} double + {args.single} single blocks, "
          f"{args.size}², {args.txt} text tokens, random weights ({time.perf_counter() - t0:.0f} s)")
    print(f"  rel. L2 error of the output against the float model computing in the same dtype (bf16 itself "
          f"is {rel(refs[jnp.bfloat16], refs[jnp.float32]):.2e} from fp32); bf16 params "
          f"{device_bytes(params) / GB:.3f} GB")
    print(f"  {'weights':<8} {'bf16 compute':>13} {'fp32 compute':>13} {'param GB (bf16)':>16}")
    for mode in MODES:
        print(f"  {mode:<8} {errors[mode, jnp.bfloat16]:>13.2e} {errors[mode, jnp.float32]:>13.2e} "
              f"{sizes[mode] / GB:>16.3f}")


def loop_memory(args) -> None:
    """XLA's temporaries for a jitted 4-step Euler loop over the real-width blocks (compiled, not run):
    a quantized model must not hold all its weights dequantized (see quantize._after)."""
    import jax
    import jax.numpy as jnp

    from flux_jax import quantize as qz
    from flux_jax.config import DEV, PIXELS_PER_TOKEN
    from flux_jax.model import Flux, param_shapes
    from flux_jax.sampling import denoise, image_ids, model_timesteps, text_ids

    cfg = DEV.replace(depth=args.depth, depth_single_blocks=args.single, scan_layers=False)
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), param_shapes(cfg))
    side = args.size // PIXELS_PER_TOKEN
    sigmas = np.linspace(1, 0, 5, dtype=np.float32)
    ids, n_img = (text_ids(args.txt), image_ids(side, side)), side * side
    inputs = (jax.ShapeDtypeStruct((1, n_img, cfg.in_channels), jnp.float32),
              jax.ShapeDtypeStruct((1, args.txt, cfg.context_in_dim), jnp.bfloat16),
              jax.ShapeDtypeStruct((1, cfg.vec_in_dim), jnp.bfloat16))

    def loop(params, x, txt, y):
        model = Flux(cfg, jnp.bfloat16)
        velocity = lambda x, t: model.apply({"params": params}, x.astype(jnp.bfloat16), ids[1], txt, ids[0], t, y,
                                            jnp.full((1,), 3.5))
        return denoise(velocity, x, jnp.asarray(sigmas), jnp.asarray(model_timesteps(sigmas)))

    print(f"\n(c) XLA temporaries of a jitted 4-step loop over the blocks of (a), bf16 compute (compiled only)")
    print(f"  {'weights':<8} {'param GB':>9} {'temp GB':>8}")
    for mode in (None, *MODES):
        params = jax.eval_shape(lambda p: qz.quantize_tree(p, "transformer", mode), shapes)
        temp = jax.jit(loop).lower(params, *inputs).compile().memory_analysis().temp_size_in_bytes
        size = sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params))
        print(f"  {mode or 'bf16':<8} {size / GB:>9.3f} {temp / GB:>8.3f}")


def digits(args) -> None:
    from digits_model import SAMPLE_SETTINGS, prompts_and_labels, trained_model
    from flux_jax import FluxPipeline, quantize as qz
    from flux_jax.train.digits import DigitClassifier

    run = trained_model(args.run)
    prompts, labels, seeds = prompts_and_labels()
    classifier = DigitClassifier()
    results = {}
    runs = [("fp32", "fp32", None), ("bf16", "bf16", None)] + [(m, "bf16", m) for m in MODES] + [
        (f"{m}, transformer only", "bf16", m) for m in TRANSFORMER_ONLY]
    for name, dtype, mode in runs:
        if name.endswith("only"):  # T5 left in bf16: this tiny T5 has random weights, see the docstring
            pipe = FluxPipeline.from_pretrained(run, dtype=dtype)
            pipe.params = qz.quantize_tree(pipe.params, "transformer", mode, pipe.mesh)
        else:
            pipe = FluxPipeline.from_pretrained(run, dtype=dtype, quantize=mode)
        images = pipe(prompts, seed=seeds, **SAMPLE_SETTINGS).images
        results[name] = (classifier.accuracy(images, labels), images)
        del pipe
    print(f"\n(b) digits model ({run}): {len(prompts)} samples, classifier accuracy; image error vs bf16")
    print(f"  {'weights':<24} {'accuracy':>9} {'mean |Δ|':>9} {'max |Δ|':>9}")
    base = results["bf16"][1]
    for name, (acc, images) in results.items():
        diff = np.abs(images - base)
        print(f"  {name:<24} {acc:>9.1%} {diff.mean():>9.4f} {diff.max():>9.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-width", action="store_true", help="skip (a) and (c), the real-width model")
    ap.add_argument("--skip-digits", action="store_true", help="skip (b), the digits model")
    ap.add_argument("--depth", type=int, default=1, help="double blocks for (a) (default 1)")
    ap.add_argument("--single", type=int, default=2, help="single blocks for (a) (default 2)")
    ap.add_argument("--size", type=int, default=256, help="image side for (a), pixels (default 256)")
    ap.add_argument("--txt", type=int, default=128, help="text tokens for (a) (default 128)")
    ap.add_argument("--run", type=Path, default=None, help="digits run folder (default: digits_model's)")
    args = ap.parse_args()
    int4_storage()
    full_size_bytes()
    if not args.skip_width:
        real_width(args)
        loop_memory(args)
    if not args.skip_digits:
        if args.run is None:
            from digits_model import DEFAULT_RUN
            args.run = DEFAULT_RUN
        digits(args)


if __name__ == "__main__":
    main()
