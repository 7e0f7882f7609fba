"""Whole text-to-image pipeline: flux-jax vs diffusers on the same checkpoint, in one run.

    python benchmarks/pipeline.py                         # random tiny diffusers-layout folder, CPU
    python benchmarks/pipeline.py --model /path/FLUX.1-dev --size 1024 --steps 28 --dtype bf16   # real weights
    python benchmarks/realsize.py /tmp/flux-rw --double 1 --single 2 --t5-layers 1     # real widths, few blocks
    python benchmarks/pipeline.py --model /tmp/flux-rw --size 256 512 --repeats 2

JAX's first call (tracing + XLA compilation) is reported apart; the table compares warm calls:
median seconds per image over --repeats, both pipelines from the same packed initial noise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers-layout FLUX folder; default: a random tiny one built here")
    ap.add_argument("--size", type=int, nargs="+", default=[256], help="image sides, each compared in turn")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import torch
    from diffusers import FluxPipeline as TorchFluxPipeline

    from flux_jax import FluxPipeline

    torch.set_num_threads(args.threads)
    if args.model:
        folder = Path(args.model)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from pipeline_fixtures import make_flux_folder
        folder = make_flux_folder(Path(tempfile.mkdtemp()) / "flux-tiny", "dev")
    tdtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = TorchFluxPipeline.from_pretrained(folder, torch_dtype=tdtype).to(device)
    ref.set_progress_bar_config(disable=True)
    ours = FluxPipeline.from_pretrained(folder, dtype=args.dtype)

    rows = []
    for size in args.size:
        n_tok = (size // 16) ** 2
        latents = torch.randn(1, n_tok, 64, generator=torch.Generator().manual_seed(0))
        kw = dict(prompt="a red fox in the snow", height=size, width=size, num_inference_steps=args.steps,
                  output_type="np")
        t0 = time.perf_counter()
        first = ours(latents=latents.numpy(), progress=False, **kw)
        t_first = time.perf_counter() - t0
        t_jax, out = timed(lambda: ours(latents=latents.numpy(), progress=False, **kw), args.repeats)
        t_torch, want = timed(lambda: ref(latents=latents.to(device, tdtype), **kw).images, args.repeats)
        rows.append((size, t_first, first.timings["compile"], t_torch, t_jax, out.timings,
                     float(np.abs(out.images - want).max())))

    print(f"model: {folder.name}, {args.steps} steps, {args.dtype}; warm calls, median of {args.repeats}")
    print("\n| image | diffusers s | flux-jax s | jax/torch | encode s | sample s | decode s | first call s "
          "(compile s) | max abs image diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, t_first, t_compile, t_torch, t_jax, t, diff in rows:
        print(f"| {size}² | {t_torch:.3f} | {t_jax:.3f} | {t_jax / t_torch:.2f} | {t['encode']:.3f} | "
              f"{t['sample']:.3f} | {t['decode']:.3f} | {t_first:.2f} ({t_compile:.2f}) | {diff:.1e} |")


if __name__ == "__main__":
    main()
