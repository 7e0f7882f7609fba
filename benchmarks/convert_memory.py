"""Host memory and time of `python -m convert` on a real-size FLUX.1-dev BFL file (23.8 GB bf16).

    python benchmarks/convert_memory.py                 # in the system temp folder; needs ~50 GB free
    python benchmarks/convert_memory.py --dir /data --keep

1. Writes a transformer file with FLUX.1-dev's exact BFL tensor names and torch-layout shapes
   (780 bf16 tensors, no `model.diffusion_model.` prefix), streaming: header first, then each
   tensor's bytes. Values are a repeated block of random normal bf16 (real bytes, no sparse holes;
   the block is larger than any compressor's window).
2. Runs `python -m convert FILE OUT` in a subprocess: peak RSS (the kernel's ru_maxrss of that
   child) and wall time; samples its RssAnon / RssFile to tell heap from mapped file pages.
3. Loads part of OUT back with `convert.load_component(OUT, stacked=False, select=...)` (about
   --load-gb of double blocks: all 23.8 GB as numpy would not fit in RAM beside the page cache
   on a 24 GiB host) in another subprocess: time, GB/s, peak RSS, and checks one tensor against
   the source file.

Prints a markdown table; deletes what it wrote unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

GOAL_RSS_GB = 6.0
BLOCK_BYTES = 64 * 2**20  # repeated random block; zstd's window at its fast levels is at most 8 MB
WRITE_BYTES = 16 * 2**20  # write() size while streaming the file
SAMPLE_S = 0.25  # RSS sampling period of the converter
SAFETENSORS_ALIGN = 8  # safetensors pads its header to a multiple of 8 bytes
GB = 1e9
REPO = Path(__file__).resolve().parent.parent  # `python -m convert` from this checkout


def bfl_tensors(cfg) -> dict[str, tuple[int, ...]]:
    """BFL key -> torch-layout shape, read off our converter's rules and param shapes (and checked against them)."""
    from convert.transformer import bfl_rules
    from flux_jax.model import param_shapes

    shapes = {}
    target = param_shapes(cfg)
    for rule in bfl_rules(cfg):
        node = target
        for part in rule.dst.split("/"):
            node = node[part]
        want = tuple(node.shape) if rule.layer is None else tuple(node.shape)[1:]
        (key,) = rule.src  # BFL files hold q, k, v (and linear1) already fused: one tensor a param
        shape = want[::-1] if rule.dst.endswith("/kernel") else want  # torch Linear is (out, in)
        stand_in = np.broadcast_to(np.zeros((), np.float32), shape)
        assert rule.fn(stand_in).shape == want, f"{key}: torch shape {shape} does not give {want}"
        shapes[key] = shape
    return shapes


def write_bfl_file(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> int:
    """A safetensors file of bf16 tensors, written header first then tensor by tensor; returns its size."""
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(BLOCK_BYTES // 2) * 0.02).astype(ml_dtypes.bfloat16).view(np.uint8)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in sorted(shapes):  # safetensors files list tensors by name
        n = int(np.prod(shapes[key])) * 2
        header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % SAFETENSORS_ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in sorted(shapes):
            lo, hi = header[key]["data_offsets"]
            left, pos = hi - lo, int(rng.integers(0, BLOCK_BYTES // 2)) * 2
            while left:
                n = min(left, WRITE_BYTES, BLOCK_BYTES - pos)
                f.write(block[pos:pos + n].data)
                left -= n
                pos = (pos + n) % BLOCK_BYTES
    return path.stat().st_size


def rss_sampler(pid: int, peaks: dict) -> threading.Thread:
    """Track the peak RssAnon (heap) and RssFile (mapped file pages) of pid until it exits."""
    def run():
        while True:
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except (FileNotFoundError, ProcessLookupError):
                return
            for line in lines:
                name, _, value = line.partition(":")
                if name in ("RssAnon", "RssFile", "VmRSS") and value.strip():
                    peaks[name] = max(peaks.get(name, 0), int(value.split()[0]) * 1024)
            time.sleep(SAMPLE_S)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_measured(cmd: list[str]) -> dict:
    """Run cmd in the checkout; its exit code, wall time, kernel-counted peak RSS, and sampled peaks."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    peaks: dict = {}
    sampler = rss_sampler(proc.pid, peaks)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "output": out, **peaks}


LOAD_SCRIPT = """
import json, resource, sys, time
import numpy as np
from convert import load_component
from convert.core import Reader, leaves

out, src, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
wanted = tuple(f"double_blocks_{i}/" for i in range(n)) + ("img_in/",)
t0 = time.perf_counter()
params, cfg = load_component(out, stacked=False, select=lambda p: p.startswith(wanted))
wall = time.perf_counter() - t0
flat = leaves(params)
ok = np.array_equal(params["img_in"]["kernel"], Reader(src).view("img_in.weight").T)
print(json.dumps({"bytes": sum(v.nbytes for v in flat.values()), "wall_s": wall, "leaves": len(flat),
                  "matches_source": bool(ok), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def drop_caches() -> bool:
    """Empty the page cache (root only), so that reads come from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the file and the checkpoint")
    ap.add_argument("--keep", action="store_true", help="keep the file and the checkpoint")
    ap.add_argument("--load-gb", type=float, default=6.0, help="about this many GB of params to load back (0: skip)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before converting and loading (root)")
    args = ap.parse_args()

    from flux_jax.config import DEV

    work = Path(tempfile.mkdtemp(prefix="convert_memory.", dir=args.dir)).absolute()
    src, out = work / "flux1-dev.safetensors", work / "converted"
    rows = []
    try:
        shapes = bfl_tensors(DEV)
        t0 = time.perf_counter()
        size = write_bfl_file(src, shapes)
        rows.append(("write BFL file", f"{time.perf_counter() - t0:.0f}", "", "",
                     f"{len(shapes)} tensors, {size / GB:.2f} GB"))
        print(f"wrote {src}: {len(shapes)} tensors, {size / GB:.2f} GB", file=sys.stderr, flush=True)

        cold = args.cold and drop_caches()
        conv = run_measured([sys.executable, "-m", "convert", str(src), str(out)])
        if conv["rc"]:
            print(conv["output"][-3000:], file=sys.stderr)
            raise SystemExit(f"conversion failed (exit {conv['rc']})")
        stored = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        verdict = "meets" if conv["peak_rss"] / GB <= GOAL_RSS_GB else "MISSES"
        rows.append(("python -m convert", f"{conv['wall_s']:.0f}", f"{conv['peak_rss'] / GB:.2f}",
                     f"{conv.get('RssAnon', 0) / GB:.2f} / {conv.get('RssFile', 0) / GB:.2f}",
                     f"{verdict} the {GOAL_RSS_GB:g} GB goal; {stored / GB:.2f} GB written"
                     f"{', cold cache' if cold else ''}; {size / GB / conv['wall_s']:.2f} GB/s"))

        if args.load_gb > 0:
            cold = args.cold and drop_caches()
            block = sum(int(np.prod(v)) * 2 for k, v in shapes.items() if k.startswith("double_blocks.0."))
            n_blocks = max(1, min(DEV.depth, int(args.load_gb * GB // block)))
            load = run_measured([sys.executable, "-c", LOAD_SCRIPT, str(out), str(src), str(n_blocks)])
            if load["rc"]:
                print(load["output"][-3000:], file=sys.stderr)
                raise SystemExit(f"loading failed (exit {load['rc']})")
            res = json.loads(load["output"].strip().splitlines()[-1])
            rows.append((f"load_component(stacked=False), {n_blocks} double blocks: {res['bytes'] / GB:.1f} GB",
                         f"{res['wall_s']:.1f}",
                         f"{load['peak_rss'] / GB:.2f}",
                         f"{load.get('RssAnon', 0) / GB:.2f} / {load.get('RssFile', 0) / GB:.2f}",
                         f"{res['leaves']} leaves, {res['bytes'] / GB / res['wall_s']:.2f} GB/s"
                         f"{', cold cache' if cold else ''}; img_in matches the source: {res['matches_source']}"))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print("| step | wall s | peak RSS GB | sampled peak anon / file GB | notes |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
