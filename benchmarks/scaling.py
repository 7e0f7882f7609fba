"""Scale-out: the batch job over 1, 2, 4, 8 devices, and one full-size forward split two ways.

    python benchmarks/scaling.py                          # the job on 1, 2, 4, 8 fake CPU devices (a few minutes)
    python benchmarks/scaling.py --fsdp                   # data=N and fsdp=N meshes
    python benchmarks/scaling.py --platform gpu --devices 1 2 4 8     # the job on real GPUs of this host
    python benchmarks/scaling.py --convert-rss            # also the peak RSS row of benchmarks/convert_memory.py
    python benchmarks/scaling.py --gpu                    # FLUX.1-dev forward at 2048², sequence=N vs data=N
    python benchmarks/scaling.py --gpu --tiny             # the same code path on 4 fake CPU devices, tiny model

1. The job: `python -m flux_jax.generate --demo` (or --model DIR) in a subprocess per device count N,
   on a fixed prompt file, mesh data=N (and fsdp=N with --fsdp), global batch N x --per-device.
   Images/s comes from the job's own manifest.jsonl: each line carries its batch's seconds per
   image (the pipeline call only: no model loading, no PNG writing). The first --warmup batches
   hold tracing and XLA compilation and are left out; images/s = timed images / their summed
   seconds. On CPU the N devices are fake (XLA_FLAGS=--xla_force_host_platform_device_count=N)
   and share this host's cores: the table then shows the overhead of sharding, not a speed-up.
2. --convert-rss: runs benchmarks/convert_memory.py (a 23.8 GB FLUX.1-dev BFL file through
   `python -m convert`; ~50 GB of disk, minutes) and prints its peak-RSS row.
3. --gpu (meant for a multi-GPU or TPU host): the full FLUX.1-dev transformer (flux_jax.config.DEV,
   scan_layers=False, random bf16 weights placed with sharding.put_params) one forward at 2048²:
   16,384 image + 512 text = 16,896 tokens; mesh sequence=N (batch 1, Ulysses attention) vs
   data=N (batch N, one image a device). Median s/forward over --repeats after compilation,
   tokens/s, and matmul TFLOP/s per device. --tiny runs it on fake CPU devices with a tiny config,
   to prove the code path, not to time anything.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_FLAGS = "--xla_force_host_platform_device_count={n} --xla_cpu_enable_concurrency_optimized_scheduler=false"
CPU_NOTE = ("fake CPU devices share this host's {cores} cores: the table shows the overhead of sharding "
            "the job over N devices, not scaling (each device gets 1/N of the same cores)")
# TPU chips of one host a process sees: TPU_CHIPS_PER_PROCESS_BOUNDS by chip count (v4/v5 VMs).
TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}


# ---------------------------------------------------------------- 1. the batch job

def device_env(platform_name: str, n: int) -> dict:
    """The child's environment: N devices of `platform_name` visible, and nothing else."""
    env = dict(os.environ)
    if platform_name == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + CPU_FLAGS.format(n=n)).strip()
    elif platform_name == "gpu":
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(n)]
        if len(ids) < n:
            raise SystemExit(f"CUDA_VISIBLE_DEVICES={visible} has fewer than {n} GPUs")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
    elif platform_name == "tpu":
        if n not in TPU_BOUNDS:
            raise SystemExit(f"--platform tpu: device counts {sorted(TPU_BOUNDS)} only, got {n}")
        env.update(TPU_VISIBLE_CHIPS=",".join(map(str, range(n))), TPU_CHIPS_PER_PROCESS_BOUNDS=TPU_BOUNDS[n],
                   TPU_PROCESS_BOUNDS="1,1,1")
    return env


def write_prompts(path: Path, n: int) -> None:
    subjects = ["a red fox", "a lighthouse", "a bowl of ramen", "a city at night", "an old map", "a cat"]
    styles = ["in the snow", "at dawn", "watercolor", "35mm photo", "isometric", "oil painting"]
    path.write_text("".join(f"{subjects[i % len(subjects)]}, {styles[i // len(subjects) % len(styles)]}, #{i}\n"
                            for i in range(n)))


def read_manifest(path: Path) -> dict[int, float]:
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["index"]: r["seconds"] for r in records}


def run_job(args, n: int, spec: str, batch: int, prompts: Path, work: Path) -> dict:
    """One generate job; its images/s over the batches after the warm-up ones."""
    out = work / f"{spec.replace('=', '')}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "flux_jax.generate", "--prompts", str(prompts), "--out", str(out),
           "--mesh", spec, "--batch-size", str(batch), "--height", str(args.size), "--width", str(args.size),
           "--steps", str(args.steps), "--seed", str(args.seed)]
    cmd += ["--model", args.model] if args.model else ["--demo"]
    cmd += shlex.split(args.job_args)
    print(f"[{n} device{'s' * (n > 1)}, {spec}, batch {batch}] {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=device_env(args.platform, n), capture_output=True, text=True,
                          timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"generate failed on {n} devices, mesh {spec} (exit {proc.returncode})")
    seconds = read_manifest(out / "manifest.jsonl")
    n_images = len(seconds)
    # Batches are consecutive prompts (one size, one kind); every line of a batch has its s/image.
    timed = [seconds[i] for i in range(args.warmup * batch, n_images)]
    first = sum(seconds[i] for i in range(min(batch, n_images)))
    if not timed:
        raise SystemExit(f"{n_images} prompts make no batch after {args.warmup} warm-up ones of {batch}: "
                         f"raise --images")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"devices": n, "mesh": spec, "batch": batch, "images_per_s": len(timed) / sum(timed),
            "timed": len(timed), "first_batch_s": first, "wall_s": wall}


def job_table(args) -> list[str]:
    counts = args.devices or [1, 2, 4, 8]
    axes = ["data"] + (["fsdp"] if args.fsdp else [])
    max_batch = max(counts) * args.per_device
    n_prompts = max(args.images, (args.warmup + 3) * max_batch)  # 3 timed batches at least, on the most devices
    work = Path(tempfile.mkdtemp(prefix="flux_scaling."))
    prompts = work / "prompts.txt"
    write_prompts(prompts, n_prompts)
    rows, same_batch = [], {}
    try:
        for n in counts:
            for axis in axes if n > 1 else axes[:1]:  # on one device every mesh is the same
                rows.append(run_job(args, n, f"{axis}={n}", n * args.per_device, prompts, work))
            if n == 1:
                same_batch[args.per_device] = rows[-1]["images_per_s"]
        if args.same_batch:  # one device at each larger global batch: what batching alone gives
            for batch in sorted({r["batch"] for r in rows} - set(same_batch)):
                same_batch[batch] = run_job(args, 1, "data=1", batch, prompts, work)["images_per_s"]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    base = same_batch.get(args.per_device)

    lines = []
    if args.platform == "cpu":
        lines.append("NOTE: " + CPU_NOTE.format(cores=os.cpu_count()) + ".")
    lines += [f"job: python -m flux_jax.generate {'--model ' + args.model if args.model else '--demo'}, "
              f"{n_prompts} prompts, {args.size}x{args.size}, {args.steps} steps, {args.per_device} images a device "
              f"a batch; images/s from manifest.jsonl over the batches after the first {args.warmup} "
              f"(compilation and model loading not counted)", "",
              "| devices | mesh | batch | images/s | speed-up vs 1 device | 1 device, same batch: images/s "
              "| speed-up vs it | timed images | first batch s | job wall s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        speedup = f"{r['images_per_s'] / base:.2f}" if base else "n/a"
        same = same_batch.get(r["batch"])
        same_text = (f"{same:.2f} | {r['images_per_s'] / same:.2f}" if same else "n/a | n/a")
        lines.append(f"| {r['devices']} | {r['mesh']} | {r['batch']} | {r['images_per_s']:.2f} | {speedup} | "
                     f"{same_text} | {r['timed']} | {r['first_batch_s']:.1f} | {r['wall_s']:.1f} |")
    lines += ["", f"speed-up vs 1 device: against 1 device at batch {args.per_device} (the same images a device); "
                  "vs 1 device, same batch: against 1 device computing the whole global batch (batching alone)",
              "load average (1, 5, 15 min) after the runs: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())]
    return lines


# ---------------------------------------------------------------- 2. convert_memory.py's peak RSS

def convert_rss(args) -> list[str]:
    script = Path(args.convert_script)
    if not script.is_file():
        return [f"--convert-rss: {script} is not there; no conversion row"]
    cmd = [sys.executable, str(script), *shlex.split(args.convert_args)]
    print(f"[convert] {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # its progress goes to our stderr
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:])
        raise SystemExit(f"{script.name} failed (exit {proc.returncode})")
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    if len(table) < 2:
        raise SystemExit(f"{script.name} printed no table:\n{proc.stdout[-2000:]}")
    rows = [line for line in table[2:] if "python -m convert" in line] or table[2:]
    return [f"{script.relative_to(ROOT) if script.is_relative_to(ROOT) else script}: `python -m convert` "
            f"of a real-size FLUX.1-dev BFL file", "", *table[:2], *rows]


# ---------------------------------------------------------------- 3. one full-size forward, two meshes

def flops_fn():
    """benchmarks/transformer.py's matmul FLOP count (one definition for both benchmarks)."""
    spec = importlib.util.spec_from_file_location("_transformer_bench", Path(__file__).with_name("transformer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.flops


def random_params(cfg, mesh, dtype, seed: int = 0):
    """Random weights drawn on the first device, one top-level module at a time, placed with put_params.

    Top level at a time: the device holds at most one block's draw beside the placed tree.
    """
    import jax
    import jax.numpy as jnp

    from flux_jax import sharding
    from flux_jax.model import param_shapes

    shapes = param_shapes(cfg, dtype)
    key = jax.random.PRNGKey(seed)
    params = {}
    for i, name in enumerate(sorted(shapes)):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes[name])
        keys = jax.random.split(jax.random.fold_in(key, i), len(leaves))
        draws = [jnp.ones(s.shape, s.dtype) if getattr(path[-1], "key", "") == "scale"  # norm scales
                 else jnp.zeros(s.shape, s.dtype) if s.ndim == 1  # biases
                 else 0.02 * jax.random.normal(k, s.shape, s.dtype) for k, (path, s) in zip(keys, leaves)]
        params.update(sharding.put_params(mesh, {name: jax.tree_util.tree_unflatten(treedef, draws)}, dtype))
        del draws
    return params


def forward_table(args) -> list[str]:
    if args.tiny and args.platform_forward == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                   + CPU_FLAGS.format(n=max(args.devices or [4]))).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flux_jax import sharding
    from flux_jax.config import DEV, PIXELS_PER_TOKEN, TINY
    from flux_jax.model import Flux
    from flux_jax.sampling import image_ids, text_ids

    if args.tiny:
        cfg = TINY.replace(num_heads=4, axes_dim=(4, 6, 6), scan_layers=False)
        side, n_txt = args.fwd_size or 128, args.txt or 64
    else:
        cfg = DEV.replace(scan_layers=False)
        side, n_txt = args.fwd_size or 2048, args.txt or 512
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    all_devices = jax.devices()
    counts = args.devices or [len(all_devices)]
    if max(counts) > len(all_devices):
        raise SystemExit(f"--devices {max(counts)}: only {len(all_devices)} devices here")
    hw = side // PIXELS_PER_TOKEN
    n_img = hw * hw
    flops = flops_fn()
    model = Flux(cfg, dtype)
    kind = all_devices[0].device_kind
    print(f"forward: {'TINY (heads 4)' if args.tiny else 'FLUX.1-dev'}, {cfg.depth}+{cfg.depth_single_blocks} "
          f"blocks unrolled, {side}x{side}: {n_img} image + {n_txt} text = {n_img + n_txt} tokens, {args.dtype}, "
          f"{len(all_devices)} x {kind}, jax {jax.__version__}", file=sys.stderr, flush=True)

    def inputs(batch: int):
        rng = np.random.default_rng(0)  # row 0 is the same for every batch size
        rows = [dict(img=rng.standard_normal((n_img, cfg.in_channels), np.float32),
                     txt=rng.standard_normal((n_txt, cfg.context_in_dim), np.float32),
                     y=rng.standard_normal((cfg.vec_in_dim,), np.float32)) for _ in range(batch)]
        x = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        x.update(timesteps=np.full((batch,), 0.7, np.float32), guidance=np.full((batch,), 3.5, np.float32))
        return x

    rows, first_out = [], None
    for n in counts:
        devices = all_devices[:n]
        for axis in args.meshes:
            spec = f"{axis}={n}"
            batch = n if axis in sharding.LOGICAL_RULES["batch"] else 1
            mesh = sharding.make_mesh(spec, devices)
            t0 = time.perf_counter()
            params = random_params(cfg, mesh, dtype)
            jax.block_until_ready(params)
            t_params = time.perf_counter() - t0
            x = inputs(batch)
            jx = {k: sharding.put_batch(mesh, v.astype(dtype) if k in ("img", "txt", "y") else v)
                  for k, v in x.items()}
            ids = (image_ids(hw, hw), text_ids(n_txt))
            with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fwd = jax.jit(lambda p, x, img_ids, txt_ids: model.apply(
                    {"params": p}, x["img"], img_ids, x["txt"], txt_ids, x["timesteps"], x["y"],
                    x["guidance"] if cfg.guidance_embed else None))
                t0 = time.perf_counter()
                compiled = fwd.lower(params, jx, *ids).compile()
                t_compile = time.perf_counter() - t0
                out = compiled(params, jx, *ids)
                out.block_until_ready()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    compiled(params, jx, *ids).block_until_ready()
                    times.append(time.perf_counter() - t0)
            unsplit = any("runs unsplit" in str(w.message) for w in caught)
            row0 = np.asarray(sharding.to_host(out)[0], np.float64)
            if first_out is None:
                first_out = row0
            diff = np.linalg.norm(row0 - first_out) / max(np.linalg.norm(first_out), 1e-30)
            s = statistics.median(times)
            tokens = batch * (n_img + n_txt)
            tf = flops(cfg.depth, cfg.depth_single_blocks, cfg.hidden_size, cfg.mlp_ratio, n_txt, n_img, batch) / 1e12
            rows.append(dict(devices=n, mesh=spec + (" (attention unsplit!)" if unsplit else ""), batch=batch,
                             tokens=tokens, s=s, tokens_per_s=tokens / s, s_per_image=s / batch,
                             tflops_dev=tf / s / n, compile=t_compile, params=t_params, diff=diff,
                             finite=bool(np.isfinite(row0).all())))
            print(f"  {spec}: {s:.4f} s/forward, compile {t_compile:.1f} s, weights {t_params:.1f} s",
                  file=sys.stderr, flush=True)
            del params, jx, out, compiled

    lines = []
    if args.tiny:
        lines.append("NOTE: --tiny: a tiny config on fake CPU devices that share the host's cores: this proves the "
                     "code path; its times mean nothing.")
    lines += [f"forward: {'TINY, 4 heads' if args.tiny else 'FLUX.1-dev'} transformer, "
              f"{cfg.depth}+{cfg.depth_single_blocks} blocks unrolled, random {args.dtype} weights, "
              f"{side}x{side} = {n_img} image + {n_txt} text tokens a row; {kind}; median of {args.repeats} "
              f"after compilation; rel. diff: row 0's output against the first row of this table", "",
              "| devices | mesh | batch | tokens | s/forward | tokens/s | s/image | TFLOP/s/device | compile s "
              "| rel. diff | finite |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['mesh']} | {r['batch']} | {r['tokens']} | {r['s']:.4f} | "
                     f"{r['tokens_per_s']:.0f} | {r['s_per_image']:.4f} | {r['tflops_dev']:.2f} | "
                     f"{r['compile']:.1f} | {r['diff']:.1e} | {r['finite']} |")
    return lines


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", metavar="N",
                    help="device counts (job default: 1 2 4 8; --gpu default: all devices of this host)")
    ap.add_argument("--platform", choices=["cpu", "gpu", "tpu"], default="cpu",
                    help="the job's devices: cpu = N fake CPU devices (default); gpu = the first N of "
                         "CUDA_VISIBLE_DEVICES; tpu = N chips of this TPU VM (TPU_VISIBLE_CHIPS, 1/2/4/8)")
    ap.add_argument("--fsdp", action="store_true", help="also run the job on mesh fsdp=N")
    ap.add_argument("--per-device", type=int, default=2, metavar="K", help="images a device a batch (global N*K)")
    ap.add_argument("--images", type=int, default=64,
                    help="prompts in the file (raised to fill warm-up + 3 batches on the most devices)")
    ap.add_argument("--warmup", type=int, default=1, help="batches left out of images/s (compilation)")
    ap.add_argument("--size", type=int, default=128, help="image side of the job, pixels")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps of the job")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", metavar="DIR", help="a real model folder for the job instead of --demo")
    ap.add_argument("--job-args", default="", metavar="ARGS", help="more arguments for flux_jax.generate")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds one job may take")
    ap.add_argument("--keep", action="store_true", help="keep the prompt file and the images")
    ap.add_argument("--no-same-batch", dest="same_batch", action="store_false",
                    help="skip the 1-device runs at each larger global batch")
    ap.add_argument("--no-job", action="store_true", help="skip the batch job (e.g. with --gpu or --convert-rss)")

    ap.add_argument("--convert-rss", action="store_true",
                    help="also run benchmarks/convert_memory.py (~50 GB of disk, minutes) and print its peak RSS")
    ap.add_argument("--convert-script", default=str(ROOT / "benchmarks" / "convert_memory.py"), help=argparse.SUPPRESS)
    ap.add_argument("--convert-args", default="", metavar="ARGS",
                    help="arguments for convert_memory.py, e.g. '--dir /data --cold'")

    ap.add_argument("--gpu", action="store_true",
                    help="meant for a multi-GPU/TPU host: the full FLUX.1-dev forward at 2048² (16,896 tokens) on "
                         "meshes sequence=N and data=N, in this process on its real devices; implies --no-job")
    ap.add_argument("--tiny", action="store_true",
                    help="with --gpu: tiny config (TINY, 4 heads), 128² + 64 text tokens, on 4 fake CPU devices: "
                         "checks the code path on a CPU-only machine")
    ap.add_argument("--meshes", nargs="+", default=["sequence", "data"], choices=["sequence", "data", "fsdp", "tensor"],
                    help="--gpu: mesh axes to compare, each over all N devices")
    ap.add_argument("--fwd-size", type=int, help="--gpu: image side (default 2048; --tiny 128)")
    ap.add_argument("--txt", type=int, help="--gpu: text tokens (default 512; --tiny 64)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="--gpu: weights and activations")
    ap.add_argument("--repeats", type=int, default=3, help="--gpu: timed forwards")
    args = ap.parse_args()
    if args.tiny and not args.gpu:
        ap.error("--tiny goes with --gpu")
    args.platform_forward = "cpu" if args.tiny else None

    date = datetime.date.today().isoformat()
    print(f"# scaling, {date}, {platform.node()}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, python {platform.python_version()}; load average before: "
          + ", ".join(f"{x:.1f}" for x in os.getloadavg()), flush=True)
    if not (args.gpu or args.no_job):
        print()
        print("\n".join(job_table(args)), flush=True)
    if args.convert_rss:
        print()
        print("\n".join(convert_rss(args)), flush=True)
    if args.gpu:
        print()
        print("\n".join(forward_table(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
