"""Training-free step caching (flux_jax/cache.py): steps computed, time and quality per setting.

    python benchmarks/cache.py                      # CPU: the tiny model trained on the digits, 28 steps
    python benchmarks/cache.py --gpu                # FLUX.1-dev size, random weights, bf16, 1024², 28 steps
    python benchmarks/cache.py --gpu --hidden 128 --depth 2 --single 2 --side 128 --txt 32 --dtype fp32   # same path, tiny

Default mode: the model benchmarks/digits_model.py trains (trained there the first time, a few
minutes), sampled as its notebook does (true CFG 3, 50 pictures: 5 seeds x 10 digits, one batch)
with 28 steps; for each setting: steps computed of 28, sampling seconds (best of --repeats, compile
excluded), the held-out classifier's accuracy, and the images' max / mean absolute difference from
the uncached ones (pixels in [0, 1]).

--gpu: only the jitted denoising loop (what caching changes) at full size with random weights
(drawn on the device), from random text embeddings: steps computed and seconds per image. Random
weights make FBCache's decisions unlike a trained model's: read the time per computed or skipped
step from it, not how many steps a real model skips.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits_model.py, beside this file

STEPS = 28
FBCACHE_THRESHOLDS = (0.05, 0.08, 0.12, 0.2)
TAYLORSEER_SETTINGS = ("taylorseer:2", "taylorseer:3", "taylorseer:4", "taylorseer:3:2", "taylorseer:4:2")
SETTINGS = (None, *(f"fbcache:{t}" for t in FBCACHE_THRESHOLDS), *TAYLORSEER_SETTINGS)
HEAD_DIM = 128  # FLUX.1's; --hidden keeps it (and its RoPE axes), so the head count is hidden / 128
WEIGHT_STD = 0.02  # random weights for --gpu, as benchmarks/transformer.py --no-torch draws them


class Recording:
    """A pipeline that keeps its last output: sample_accuracy returns the accuracy alone."""

    def __init__(self, pipe):
        self.pipe, self.last = pipe, None

    def __call__(self, *args, **kw):
        self.last = self.pipe(*args, **kw)
        return self.last


def digits_table(settings, repeats: int) -> None:
    from digits_model import trained_model, sample_accuracy

    from flux_jax import FluxPipeline

    pipe = Recording(FluxPipeline.from_pretrained(trained_model()))
    print(f"digits model, 50 samples (true CFG 3), {STEPS} steps, best of {repeats}")
    print(f"| cache | steps computed | sample s | speed-up | accuracy | image max abs err | image mean abs err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for cache in settings:
        accuracy, seconds = None, []
        for _ in range(repeats):
            accuracy = sample_accuracy(pipe, num_inference_steps=STEPS, cache=cache)
            seconds.append(pipe.last.timings["sample"])
        images, t = pipe.last.images, min(seconds)
        base = (images, t) if base is None else base
        err = np.abs(images - base[0])
        print(f"| {cache or 'none'} | {pipe.last.timings['steps_computed']} / {STEPS} | {t:.3f} | "
              f"{base[1] / t:.2f}x | {accuracy:.0%} | {err.max():.4f} | {err.mean():.5f} |", flush=True)


def random_pipeline(args):
    """A FluxPipeline around a random-weight transformer of the asked size (tiny text encoders and VAE:
    only the denoising loop runs)."""
    import jax

    from flux_jax import FluxPipeline
    from flux_jax.config import DEV, parse_dtype
    from flux_jax.demo import demo_params
    from flux_jax.model import param_shapes
    from flux_jax.pipeline import default_scan_layers

    dtype = parse_dtype(args.dtype)
    hidden = args.hidden or DEV.hidden_size
    if hidden % HEAD_DIM:
        raise SystemExit(f"error: --hidden must be a multiple of {HEAD_DIM} (FLUX's head width), got {hidden}")
    cfg = DEV.replace(hidden_size=hidden, num_heads=hidden // HEAD_DIM, depth=args.depth,
                      depth_single_blocks=args.single, scan_layers=default_scan_layers())
    shapes = param_shapes(cfg, dtype)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), len(jax.tree_util.tree_leaves(shapes))))
    params = jax.tree_util.tree_map(lambda s: WEIGHT_STD * jax.random.normal(next(keys), s.shape, dtype), shapes)
    tiny = demo_params("dev", dtype=dtype)
    return FluxPipeline((params, cfg), tiny["text_encoder"], tiny["text_encoder_2"], tiny["vae"], None, None,
                        dtype=dtype, name="random")


def loop_table(args, settings) -> None:
    import jax
    import jax.numpy as jnp

    from flux_jax.config import PIXELS_PER_TOKEN
    from flux_jax.sampling import image_ids

    t0 = time.perf_counter()
    pipe = random_pipeline(args)
    cfg = pipe.cfg
    side = args.side // PIXELS_PER_TOKEN
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, side * side, cfg.out_channels)).astype(np.float32)
    txt = jnp.asarray(rng.standard_normal((1, args.txt, cfg.context_in_dim)), pipe.dtype)
    y = jnp.asarray(rng.standard_normal((1, cfg.vec_in_dim)), pipe.dtype)
    sigmas = pipe.schedule(STEPS, side * side)
    print(f"{cfg.depth} double + {cfg.depth_single_blocks} single blocks, width {cfg.hidden_size}, {args.dtype}, "
          f"{args.side}², {args.txt} text tokens, {STEPS} steps, on {jax.devices()[0].device_kind} "
          f"(weights ready in {time.perf_counter() - t0:.1f} s); median of {args.repeats}")
    print("| cache | steps computed | compile s | s / image | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    base = None
    for cache in settings:
        run = lambda: pipe.denoise_latents(noise, txt, y, sigmas, 3.5, image_ids(side, side), progress=False,
                                           cache=cache)[1]
        first = run()
        timings = [run() for _ in range(args.repeats)]
        t = statistics.median(x["sample"] for x in timings)
        base = t if base is None else base
        print(f"| {cache or 'none'} | {first['steps_computed']} / {STEPS} | {first['compile']:.1f} | {t:.3f} | "
              f"{base / t:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the denoising loop at full size with random weights")
    ap.add_argument("--cache", action="append", metavar="SPEC",
                    help="settings to compare with no cache (repeatable; default: fbcache at "
                         f"{', '.join(map(str, FBCACHE_THRESHOLDS))} and {', '.join(TAYLORSEER_SETTINGS)})")
    ap.add_argument("--repeats", type=int, default=3)
    g = ap.add_argument_group("--gpu sizes (default FLUX.1-dev's)")
    g.add_argument("--hidden", type=int, help=f"width, a multiple of {HEAD_DIM} (default 3072)")
    g.add_argument("--depth", type=int, default=19, help="double blocks")
    g.add_argument("--single", type=int, default=38, help="single blocks")
    g.add_argument("--side", type=int, default=1024, help="image side in pixels")
    g.add_argument("--txt", type=int, default=512, help="text tokens")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    settings = (None, *args.cache) if args.cache else SETTINGS
    if args.gpu:
        loop_table(args, settings)
    else:
        digits_table(settings, args.repeats)


if __name__ == "__main__":
    main()
