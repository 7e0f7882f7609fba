"""Peak memory and time per image of FLUX.1-dev at real size, bf16 vs int8 / int4 / nf4 weights.

    python benchmarks/memory.py                     # CPU: peak RSS of `python -m flux_jax.sample`, one 256² step
    python benchmarks/memory.py --gpu               # GPU: peak device memory, 1024², 28 steps, time per image
    python benchmarks/memory.py --model DIR         # an existing folder instead of writing one

The model is a real-size FLUX.1-dev folder in the diffusers layout with random bf16 weights
(benchmarks/realsize.py: ~34 GB, written streaming to --dir, removed at the end unless --keep).
Each mode runs `python -m flux_jax.sample --model DIR --dtype bf16 [--quantize MODE]` in its own
process (two prompts: the second image is the timed one), through a driver that prints the device's
`memory_stats()['peak_bytes_in_use']` at the end. On CPU the peak is the process's peak RSS (the
kernel's ru_maxrss; RssAnon / RssFile sampled), and a run the memory estimate refuses must exit with
one `error:` line, not be killed. On CPU every run gets `--low-memory` (never resident together: the
smallest schedule), since the automatic plan keeps all models resident whenever the host has room. Goals (the small-GPU issue): CPU int8 ≤ 16 GB RSS, int4 ≤ 10 GB, bf16 refused with the clear
error on this 24 GiB host; GPU bf16 ≤ 26 GB, int8 ≤ 14 GB, int4 ≤ 8 GB, int8 within 1.15× of bf16's time.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert_memory import run_measured  # noqa: E402  (exit code, wall time and peak RSS of a child process)
from realsize import write_realsize_folder  # noqa: E402

MODES = ("bf16", "int8", "int4", "nf4")
GOALS_CPU_GB = {"int8": 16.0, "int4": 10.0}
GOALS_GPU_GB = {"bf16": 26.0, "int8": 14.0, "int4": 8.0}
GOAL_INT8_TIME = 1.15  # × bf16's time per image on the GPU
GB = 1e9
MARK = "MEMORY "
DRIVER = f"""
import json, sys
import jax
from flux_jax.sample import main
rc = main(sys.argv[1:])
stats = jax.devices()[0].memory_stats() or {{}}
print("{MARK}" + json.dumps({{"rc": rc, "peak": stats.get("peak_bytes_in_use"), "limit": stats.get("bytes_limit")}}))
"""
TIMINGS = re.compile(r"compile ([\d.]+) s, sampling ([\d.]+) s \(load ([\d.]+) s, text encoding ([\d.]+) s, "
                     r"decoding ([\d.]+) s\)")
PROMPTS = ("a red fox in the snow", "a lighthouse at dusk")


def run_mode(model: Path, mode: str, size: int, steps: int, out: Path, low_memory: bool) -> dict:
    cmd = [sys.executable, "-c", DRIVER, "--model", str(model), "--dtype", "bf16", "--width", str(size),
           "--height", str(size), "--steps", str(steps), "--seed", "0", "--out", str(out / mode),
           "--no-compile-cache", *[a for p in PROMPTS for a in ("--prompt", p)]]
    if mode != "bf16":
        cmd += ["--quantize", mode]
    if low_memory:
        cmd.append("--low-memory")
    r = run_measured(cmd)
    row = {"mode": mode, "rc": r["rc"], "wall_s": r["wall_s"], "rss_gb": r["peak_rss"] / GB,
           "anon_gb": r.get("RssAnon", 0) / GB, "file_gb": r.get("RssFile", 0) / GB}
    lines = r["output"].splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        row["error"] = errors[-1]
    marks = [ln for ln in lines if ln.startswith(MARK)]
    if marks:
        m = json.loads(marks[-1][len(MARK):])
        row["device_gb"] = m["peak"] / GB if m["peak"] else None
    t = TIMINGS.search(r["output"])
    if t:
        compile_s, sample_s, load_s, encode_s, decode_s = map(float, t.groups())
        row.update(compile_s=compile_s, load_s=load_s, s_per_image=(sample_s + encode_s + decode_s) / len(PROMPTS))
    if r["rc"] and not errors:
        row["error"] = f"exit {r['rc']}: " + " | ".join(lines[-3:])[-300:]
    return row


def print_table(rows: list[dict], gpu: bool) -> None:
    goals = GOALS_GPU_GB if gpu else GOALS_CPU_GB
    peak = "device peak GB" if gpu else "peak RSS GB"
    print(f"\n| mode | {peak} | goal | s/image | load s | compile s | process s | result |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        value = r.get("device_gb") if gpu else r["rss_gb"]
        goal = goals.get(r["mode"])
        met = "" if goal is None or value is None else (" met" if value <= goal else " not met")
        fmt = lambda k, f="{:.2f}": f.format(r[k]) if r.get(k) is not None else "-"
        result = r.get("error", "ok")
        print(f"| {r['mode']} | {'-' if value is None else f'{value:.2f}'} | "
              f"{'-' if goal is None else f'≤ {goal:.0f}{met}'} | {fmt('s_per_image')} | {fmt('load_s', '{:.1f}')} | "
              f"{fmt('compile_s', '{:.1f}')} | {r['wall_s']:.0f} | {result} |")
    if gpu:
        by = {r["mode"]: r for r in rows}
        if by.get("bf16", {}).get("s_per_image") and by.get("int8", {}).get("s_per_image"):
            ratio = by["int8"]["s_per_image"] / by["bf16"]["s_per_image"]
            print(f"\nint8 / bf16 time per image: {ratio:.2f} (goal ≤ {GOAL_INT8_TIME})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="1024², 28 steps, device peak memory")
    ap.add_argument("--model", type=Path, help="a FLUX.1-dev-sized folder (default: write a random one)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write it")
    ap.add_argument("--keep", action="store_true", help="keep the written folder")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--size", type=int, help="image side (default: 1024 on --gpu, else 256)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: 28 on --gpu, else 1)")
    ap.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                    help="pass --low-memory (never resident together) to every run (default: on CPU, where the "
                         "automatic plan would keep every model resident whenever the host has room)")
    args = ap.parse_args()
    args.low_memory = not args.gpu if args.low_memory is None else args.low_memory
    size = args.size or (1024 if args.gpu else 256)
    steps = args.steps or (28 if args.gpu else 1)
    model, written = args.model, None
    if model is None:
        written = model = args.dir / "flux-dev-random-bf16"
        print(f"writing {model} ...", flush=True)
        write_realsize_folder(model)
    out = Path(tempfile.mkdtemp(prefix="memory_bench_"))
    try:
        rows = []
        for mode in args.modes:
            print(f"{mode} ...", flush=True)
            rows.append(run_mode(model, mode, size, steps, out, args.low_memory))
            print(f"  {json.dumps(rows[-1])}", flush=True)
        print(f"\nmodel: {model}, {size}², {steps} steps, bf16 compute, {len(PROMPTS)} images a mode, "
              f"{'--low-memory' if args.low_memory else 'automatic schedule'}")
        print_table(rows, args.gpu)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if written is not None and not args.keep:
            shutil.rmtree(written, ignore_errors=True)


if __name__ == "__main__":
    main()
