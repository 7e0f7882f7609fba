"""Launch to the first denoising step: a cold process (empty compilation cache) vs a warm one (same shapes).

    python benchmarks/warm_start.py                        # CPU: a random tiny folder converted to Orbax, 256²
    python benchmarks/warm_start.py --model /ckpt/flux-dev-converted --size 1024 --steps 28 --dtype bf16   # GPU

Each run is a fresh `python -m flux_jax.sample` process (through a small driver that notes when the first
denoising step has finished: the loop's host callback), the clock started just before the process is
launched. Runs: `--no-compile-cache`, then cold and warm with one fresh cache folder. Columns: seconds
from launch to the end of the first denoising step, the CLI's own compile / load / encode times, and the
whole process. The goal (issue: speed) is ≤ 5 s warm on a GPU with a converted checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "FIRST_STEP "
GOAL_S = 5.0

DRIVER = f"""
import json, sys, time
from flux_jax.pipeline import FluxPipeline
seen = {{}}
advance = FluxPipeline._advance
def first_step(self, i):  # the loop's host callback: called once each step has finished
    seen.setdefault("t", time.time())
    return advance(self, i)
FluxPipeline._advance = first_step
from flux_jax.sample import main
rc = main(sys.argv[2:])
print("{MARK}" + json.dumps({{"rc": rc, "first_step": seen.get("t", float("nan")) - float(sys.argv[1])}}))
"""
TIMINGS = re.compile(r"compile ([\d.]+) s, sampling ([\d.]+) s \(load ([\d.]+) s, text encoding ([\d.]+) s")


def converted_tiny_model(tmp: Path) -> Path:
    """A random tiny diffusers folder (tests/pipeline_fixtures.py), converted with `python -m convert`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pipeline_fixtures import make_flux_folder

    src = make_flux_folder(tmp / "flux-tiny", "dev")
    dst = tmp / "flux-tiny-converted"
    subprocess.run([sys.executable, "-m", "convert", str(src), str(dst)], check=True, cwd=ROOT)
    return dst


def launch(args, cache: Path, out: Path, *flags: str) -> dict:
    env = {**os.environ, "FLUX_JAX_COMPILE_CACHE": str(cache)}
    cmd = [sys.executable, "-c", DRIVER, "", "--model", str(args.model), "--prompt", "a red fox in the snow",
           "--width", str(args.size), "--height", str(args.size), "--steps", str(args.steps), "--seed", "0",
           "--out", str(out), "--dtype", args.dtype, *flags]
    t0 = time.time()
    cmd[3] = repr(t0)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        raise SystemExit(f"error: the sample run failed:\n{proc.stderr[-3000:]}")
    row = {**json.loads(lines[-1][len(MARK):]), "wall": wall}
    m = TIMINGS.search(proc.stderr)
    if m:
        row.update(zip(("compile", "sample", "load", "encode"), map(float, m.groups())))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a converted (Orbax) model folder; default: a random tiny one")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="warm_start_"))
    if args.model is None:
        args.model = converted_tiny_model(tmp)
    cache = tmp / "xla-cache"
    runs = [("--no-compile-cache", launch(args, tmp / "unused", tmp / "a.png", "--no-compile-cache")),
            ("cold (empty cache)", launch(args, cache, tmp / "b.png")),
            ("warm (same shapes)", launch(args, cache, tmp / "c.png"))]
    files = sum(1 for _ in cache.glob("*-cache"))
    print(f"model: {args.model}, {args.size}², {args.steps} steps, {args.dtype}; cache: {files} executables, "
          f"{sum(p.stat().st_size for p in cache.iterdir()) / 1e6:.1f} MB")
    print(f"\n{'run':>20} {'launch→1st step s':>17} {'compile s':>9} {'load s':>7} {'encode s':>8} {'process s':>9}")
    for name, r in runs:
        print(f"{name:>20} {r['first_step']:>17.2f} {r.get('compile', float('nan')):>9.2f} "
              f"{r.get('load', float('nan')):>7.2f} {r.get('encode', float('nan')):>8.2f} {r['wall']:>9.2f}")
    warm = runs[-1][1]["first_step"]
    print(f"\nwarm launch→first step {warm:.2f} s (goal ≤ {GOAL_S:.0f} s on a GPU with a converted checkpoint: "
          f"{'met' if warm <= GOAL_S else 'not met'} here)")


if __name__ == "__main__":
    main()
