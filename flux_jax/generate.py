"""python -m flux_jax.generate: a batch job of many prompts over every device of every host.

    python -m flux_jax.generate --prompts prompts.txt --out images/
    python -m flux_jax.generate --prompts prompts.jsonl --out images/ --mesh data=2,fsdp=4 --batch-size 16
    python -m flux_jax.generate --demo --prompts prompts.txt --out demo/      # tiny random model: noise
    python -m flux_jax.generate --prompts prompts.txt --out images/ --lora style.safetensors:0.8

Prompt files: text, one prompt a non-empty line; or JSONL (a .jsonl name, or a file whose first
non-space character is `{`), one object a line with "prompt" and optionally "seed",
"negative_prompt" (used with --true-cfg above 1), "height" and "width".

Prompt i (counting non-empty lines from 0) gets seed --seed + i unless its line gives one, and its
noise is drawn from that seed alone, so its image does not depend on the mesh, the batch size or
the number of processes, and is `python -m flux_jax.sample --seed S` of that prompt and settings
(byte for byte: the PNGs carry sample's metadata). Bit for bit only where the per-device batch is
the same: XLA compiles other kernels for other shapes (on CPU, a row reduction's summation order
changes with the row count), which can move a pixel by one level. It is written to DIR/{i:06d}.png, atomically, and DIR/manifest.jsonl gets a
line for it (index, prompt, seed, file, seconds, process). A rerun skips the prompts whose PNG
exists, so a killed job resumes where it stopped; if every PNG exists no model is loaded.

Batches: the global --batch-size (default: the mesh's batch shards, data x fsdp) is split over
the devices of every host; prompts of one size and of one kind (with or without a negative prompt)
are batched together, in file order; a short last batch is padded with copies of its last prompt
(one compiled shape for the whole group), and the copies are dropped. Every process computes
every batch together, and writes the images of the rows its devices hold.

Bad input gets one `error: ...` line on stderr and exit code 2, before any model loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import jax

from . import compile_cache, distributed
from .pipeline import DEFAULTS, PipelineError
from .sample import (DEMO_DEFAULTS, EXIT_BAD_INPUT, IMAGE_SUFFIXES, BadInput, Mode, _Parser, add_cache_argument,
                     add_lora_argument, add_memory_arguments,
                     add_model_arguments, check_checkpoint, check_dtype, check_out, check_seed, check_side,
                     is_fill_model, load_pipeline, png_info, resolve_model, run_cli,
                     save_png, transformer_source)

MANIFEST = "manifest.jsonl"
FILE_PATTERN = "{index:06d}.png"
DEFAULT_SEED = 0  # a job is reproducible unless asked otherwise
JSONL_SUFFIX = ".jsonl"
JSONL_KEYS = ("prompt", "seed", "negative_prompt", "height", "width")
JSONL_EXAMPLE = '{"prompt": "a red fox", "seed": 7}'


@dataclasses.dataclass(frozen=True)
class Item:
    """One prompt of the job. height/width None: the model's default size."""
    index: int
    prompt: str
    seed: int
    negative_prompt: Optional[str] = None
    height: Optional[int] = None
    width: Optional[int] = None

    @property
    def file(self) -> str:
        return FILE_PATTERN.format(index=self.index)

    @property
    def group(self) -> tuple:
        """Items batched together share a shape and a branch structure (true CFG or not)."""
        return self.height, self.width, self.negative_prompt is not None


# ---------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m flux_jax.generate",
                description="Generate one image per prompt of a file with FLUX.1 in JAX, over all devices and hosts.")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="one prompt a non-empty line, or JSONL: " + JSONL_EXAMPLE + " with optional "
                        "negative_prompt, height, width")
    p.add_argument("--out", required=True, metavar="DIR",
                   help=f"folder for {FILE_PATTERN.format(index=0)}, ... and {MANIFEST}; existing images are kept "
                        "and their prompts skipped (a rerun resumes)")
    p.add_argument("--mesh", metavar="SPEC",
                   help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor, sequence; -1 takes the devices "
                        "left; default: all devices on data)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="images per step of the job, over all hosts: a multiple of the mesh's data x fsdp "
                        "(default: data x fsdp, one image per batch shard)")
    add_model_arguments(p)
    add_lora_argument(p)
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int, metavar="PX",
                       help="pixels, a multiple of 16, for lines that give none (default 1024; demo 256)")
    p.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: dev 28, schnell 4; demo 4)")
    p.add_argument("--guidance", type=float, metavar="SCALE", help="guidance scale (default: dev 3.5; schnell: none)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="N",
                   help=f"prompt i gets seed N + i unless its JSONL line gives one (default {DEFAULT_SEED})")
    add_cache_argument(p)
    p.add_argument("--true-cfg", type=float, default=1.0, metavar="SCALE",
                   help="true classifier-free guidance scale for the lines with a negative_prompt (needed above 1 "
                        "when a line has one)")
    add_memory_arguments(p)
    distributed.add_arguments(p)
    compile_cache.add_argument(p)
    return p


def check_options(args: argparse.Namespace) -> None:
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            check_side(f"--{name}", getattr(args, name))
    if args.steps is not None and args.steps < 1:
        raise BadInput(f"--steps must be at least 1, got {args.steps}")
    check_seed("--seed", args.seed)
    if args.batch_size is not None and args.batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.demo and args.transformer:
        raise BadInput("--transformer cannot be used with --demo")


def check_out_dir(out: str) -> Path:
    """The output folder: not a file name; it or its nearest existing parent writable (sample's check)."""
    path = Path(out)
    if not path.is_dir() and path.suffix.lower() in IMAGE_SUFFIXES | {".png"}:
        raise BadInput(f"--out {out}: give a folder; the images are named {FILE_PATTERN.format(index=0)}, ...")
    return check_out(out)


# ---------------------------------------------------------------- the prompt file

def read_items(args: argparse.Namespace) -> list[Item]:
    """The prompts of --prompts with their seeds and sizes, every line checked."""
    path = Path(args.prompts)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first prompt
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read --prompts {args.prompts}: {e}") from None
    jsonl = path.suffix.lower() == JSONL_SUFFIX or text.lstrip().startswith("{")
    default_size = (DEMO_DEFAULTS["height"], DEMO_DEFAULTS["width"]) if args.demo else (None, None)
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{args.prompts} line {number}"
        fields = parse_jsonl_line(line, where) if jsonl else {"prompt": line.strip()}
        index = len(items)
        seed = fields.get("seed", args.seed + index)
        check_seed(f"{where}: seed" + ("" if "seed" in fields else f" (--seed {args.seed} + index {index})"), seed)
        negative = fields.get("negative_prompt")
        if negative is not None and args.true_cfg <= 1:
            raise BadInput(f"{where}: negative_prompt is used only with --true-cfg above 1 (e.g. --true-cfg 4)")
        height, width = (fields.get(k, getattr(args, k)) for k in ("height", "width"))
        items.append(Item(index, fields["prompt"], seed, negative,
                          default_size[0] if height is None else height, default_size[1] if width is None else width))
    if not items:
        raise BadInput(f"--prompts {args.prompts} has no prompts (one per non-empty line)")
    if args.true_cfg > 1 and all(item.negative_prompt is None for item in items):
        raise BadInput("--true-cfg above 1 needs lines with a negative_prompt (JSONL), and no line has one")
    return items


def parse_jsonl_line(line: str, where: str) -> dict:
    """A JSONL line's fields, checked; `where` names the line in messages."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInput(f"{where}: not JSON ({e.msg} at column {e.colno}); each line is like {JSONL_EXAMPLE}") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{where}: expected a JSON object like {JSONL_EXAMPLE}, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in JSONL_KEYS]
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(JSONL_KEYS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInput(f"{where}: needs a non-empty \"prompt\" string")
    fields = {"prompt": prompt}
    negative = obj.get("negative_prompt")
    if negative is not None:
        if not isinstance(negative, str) or not negative.strip():
            raise BadInput(f"{where}: negative_prompt must be a non-empty string (or left out)")
        fields["negative_prompt"] = negative
    for key in ("seed", "height", "width"):
        if obj.get(key) is None:
            continue
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, int):  # bool is an int to Python, not to the user
            raise BadInput(f"{where}: {key} must be an integer, got {json.dumps(value)}")
        if key != "seed":  # seeds are checked with the default ones
            check_side(f"{where}: {key}", value)
        fields[key] = value
    return fields


# ---------------------------------------------------------------- what is done already

class Manifest:
    """DIR/manifest.jsonl: one JSON line per written image, appended with one os.write on an O_APPEND
    file, so lines of concurrent processes never interleave (on a local file system; NFS does not
    promise it across hosts)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[int, dict] = {}
        self._newline_first = False  # a line torn by a kill gets no line glued to it
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise BadInput(f"cannot read {path}: {e}") from None
        self._newline_first = bool(data) and not data.endswith(b"\n")
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.records.setdefault(int(record["index"]), record)
            except (ValueError, KeyError, TypeError):
                print(f"warning: {path} line {number} is not a manifest record (torn by a kill?): ignored",
                      file=sys.stderr)

    def check(self, items: list[Item]) -> None:
        """Refuse a folder written from another prompt list: its images would pass for this job's.

        Listed images are checked by their lines; PNGs without one (a kill came between the two
        writes, or another job's files) by their own text chunks.
        """
        for index, record in sorted(self.records.items()):
            item = items[index] if 0 <= index < len(items) else None
            if item is None or record.get("prompt") != item.prompt or record.get("seed") != item.seed:
                now = "has no such prompt" if item is None else f"gives {item.prompt!r} with seed {item.seed}"
                raise BadInput(f"{self.path} lists image {index} as {record.get('prompt')!r} with seed "
                               f"{record.get('seed')}, but the prompt file {now}: use another --out")
        for item in items:
            png = self.path.parent / item.file
            if item.index in self.records or not png.is_file():
                continue
            text = png_text(png)
            if text.get("prompt") != item.prompt or text.get("seed") != str(item.seed):
                raise BadInput(f"{png} shows {text.get('prompt')!r} with seed {text.get('seed')}, but the prompt "
                               f"file gives {item.prompt!r} with seed {item.seed}: use another --out")

    def append(self, item: Item, seconds: Optional[float], process: int) -> None:
        """Add the line of `item`, unless it has one: an image remade after its PNG was deleted keeps its line."""
        if item.index in self.records:
            return
        record = dict(index=item.index, prompt=item.prompt, seed=item.seed, file=item.file,
                      seconds=None if seconds is None else round(seconds, 3), process=process)
        data = ("\n" if self._newline_first else "") + json.dumps(record, ensure_ascii=False) + "\n"
        data = data.encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            if os.write(fd, data) != len(data):  # a short write: disk full; the next run redoes the line
                raise OSError(f"short write to {self.path}")
        finally:
            os.close(fd)
        self._newline_first = False
        self.records[item.index] = record


def png_text(path: Path) -> dict:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}))
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e}; delete it to have it made again") from None


def existing_images(out: Path, items: list[Item]):
    """(P, n) bool: which PNGs each process sees. One view for all, so all plan the same batches even
    where hosts have their own disks or stale views of a shared one."""
    import numpy as np

    seen = np.array([(out / item.file).is_file() for item in items], np.uint8)
    if jax.process_count() == 1:
        return seen[None].astype(bool)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(seen)).astype(bool)


def catch_up(manifest: Manifest, items: list[Item], seen) -> None:
    """Manifest lines for PNGs written just before a kill took their line; the first process seeing one writes it."""
    import numpy as np

    me = jax.process_index()
    for item in items:
        first = int(np.argmax(seen[:, item.index]))
        if seen[first, item.index] and first == me:
            manifest.append(item, None, me)


# ---------------------------------------------------------------- the job

def plan_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Batches of at most batch_size items of one group each; groups in order of their first item."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


def job_mesh(args: argparse.Namespace):
    """(mesh, global batch size), checked against the devices of every host."""
    from .sharding import MeshError, batch_shards, make_mesh

    try:
        mesh = make_mesh(args.mesh)
    except MeshError as e:
        raise BadInput(f"--mesh: {e}") from None
    shards = batch_shards(mesh)
    batch_size = shards if args.batch_size is None else args.batch_size
    if batch_size % shards:
        raise BadInput(f"--batch-size {batch_size} must be a multiple of the mesh's batch shards "
                       f"(data x fsdp = {shards})")
    return mesh, batch_size


def mesh_text(mesh) -> str:
    return ",".join(f"{axis}={n}" for axis, n in mesh.shape.items() if n > 1) or "one device"


def run(args, todo: list[Item], out: Path, manifest: Manifest, root: Optional[Path], mesh,
        batch_size: int, dtype) -> int:
    """Load the model, generate `todo` batch by batch, write this process's images; returns how many it wrote."""
    from tqdm.auto import tqdm

    from .sharding import rows_of_process

    main_process, me = distributed.is_main(), jax.process_index()
    pipe, label = load_pipeline(args, root, Mode(), dtype, mesh=mesh, batch=batch_size)
    check_checkpoint("text", pipe.variant == "fill", label)  # when its kind could not be read before loading
    defaults = DEFAULTS[pipe.variant]
    steps = args.steps or (DEMO_DEFAULTS["num_inference_steps"] if args.demo else defaults["num_inference_steps"])
    guidance = defaults["guidance_scale"] if args.guidance is None else args.guidance
    mine = set(rows_of_process(mesh, batch_size))  # every batch has batch_size rows: padded below
    written = 0
    bar = tqdm(total=len(todo), unit="img", desc="generating", disable=not main_process, file=sys.stderr)
    try:
        for batch in plan_batches(todo, batch_size):
            rows = batch + [batch[-1]] * (batch_size - len(batch))  # one shape a group: no recompiling
            negative = [item.negative_prompt for item in rows] if batch[0].negative_prompt is not None else None
            t0 = time.perf_counter()
            try:
                images = pipe(prompt=[item.prompt for item in rows], seed=[item.seed for item in rows],
                              height=batch[0].height, width=batch[0].width, num_inference_steps=steps,
                              guidance_scale=args.guidance, negative_prompt=negative,
                              true_cfg_scale=args.true_cfg if negative else 1.0, output_type="pil",
                              progress=False, cache=args.cache).images
            except PipelineError as e:
                raise BadInput(str(e)) from None
            seconds = (time.perf_counter() - t0) / len(batch)
            for j, item in enumerate(batch):  # the padding rows are left out here
                if j not in mine:
                    continue
                info = png_info(item.prompt, item.seed, steps, guidance, images[j], label,
                                negative_prompt=item.negative_prompt, true_cfg=args.true_cfg, cache=args.cache)
                save_png(images[j], out / item.file, info)
                manifest.append(item, seconds, me)  # after the PNG: a kill between the two is caught up on resume
                written += 1
            bar.update(len(batch))
    finally:
        bar.close()
    return written


def _job(argv: Optional[list[str]]) -> None:
    args = build_parser().parse_args(argv)
    # Everything that needs no device is checked before joining the other hosts.
    distributed.check_arguments(args)
    check_options(args)
    items = read_items(args)
    out = check_out_dir(args.out)
    root = None if args.demo else resolve_model(args)
    if root is not None:  # generate is text-to-image: a Fill checkpoint cannot run it
        check_checkpoint("text", is_fill_model(args, root), transformer_source(args, root))
    manifest = Manifest(out / MANIFEST)
    manifest.check(items)
    compile_cache.configure(args)
    distributed.initialize(args)  # JAX devices are touched from here on
    mesh, batch_size = job_mesh(args)
    dtype = check_dtype(args.dtype)

    t0 = time.perf_counter()
    seen = existing_images(out, items)
    catch_up(manifest, items, seen)
    todo = [item for item in items if not seen[:, item.index].any()]
    say = (lambda message: print(message, file=sys.stderr)) if distributed.is_main() else (lambda _: None)
    if not todo:
        say(f"all {len(items)} images are in {out} already: nothing to do")
        return
    say(f"{len(todo)} of {len(items)} images to make ({len(items) - len(todo)} in {out} already), "
        f"batches of {batch_size} on {mesh.devices.size} devices (mesh {mesh_text(mesh)})")
    written = run(args, todo, out, manifest, root, mesh, batch_size, dtype)
    seconds = time.perf_counter() - t0
    say(f"{len(todo)} images in {seconds:.1f} s ({len(todo) / seconds:.2f} img/s, model loading included)")
    print(f"process {jax.process_index()}: wrote {written} images", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(lambda: _job(argv))


if __name__ == "__main__":
    sys.exit(main())
