"""python -m flux_jax.sample: FLUX.1 text-to-image and image-conditioned generation from the command line.

    python -m flux_jax.sample --prompt "a red fox in the snow" --out fox.png
    python -m flux_jax.sample --demo --prompt "anything" --out demo/   # tiny random model: noise
    python -m flux_jax.sample --model FLUX.1-Kontext-dev --image cat.png --prompt "give the cat a red hat"
    python -m flux_jax.sample --image photo.png --strength 0.7 --prompt "a watercolour"          # img2img
    python -m flux_jax.sample --model FLUX.1-Fill-dev --image room.png --mask sofa.png --prompt "a red sofa"
    python -m flux_jax.sample --prompt "a fox, watercolour" --lora style.safetensors:0.8    # LoRAs (repeatable)
    python -m flux_jax.sample --prompt "a red fox" --quantize int8     # transformer and T5 weights in int8

Modes (--mode, or chosen from the arguments and the checkpoint; see AUTO_RULE): text-to-image,
Kontext editing, img2img, inpaint (any checkpoint) and Fill (a FLUX.1 Fill checkpoint).

Bad input (a missing model piece, a corrupt weights file, impossible sizes, an unreadable image,
a mode the checkpoint cannot run...) gets one `error: ...` line on stderr and exit code 2, and no
output file. Cheap checks run before the model loads, so a typo costs no loading time; the
checkpoint's kind is read from its config or safetensors header for that. Written files go to
stdout, one a line.

Multi-host: --coordinator, --num-processes and --process-id (or a TPU pod / srun step, found
automatically: see flux_jax.distributed); every process computes the images, process 0 writes them.
For many prompts, `python -m flux_jax.generate` spreads them over the hosts and resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

from convert import is_converted
from convert.core import CONFIG_FILE, Reader
from convert.lora import LoraError, check_lora
from convert.transformer import BFL_PREFIX, FILL_IN_CHANNELS

from . import compile_cache, distributed
from .cache import CacheError, parse_cache
from .config import PIXELS_PER_TOKEN, FluxConfig, parse_dtype
from .images import default_size, load_image
from .img2img import DEFAULT_STRENGTH, FluxImg2ImgPipeline
from .inpaint import FILL_STRENGTH, FluxFillPipeline, FluxInpaintPipeline
from .kontext import FluxKontextPipeline
from .pipeline import DEFAULTS, MAX_SIDE, FluxPipeline, PipelineError
from .quantize import MODES as QUANTIZE_MODES

EXIT_BAD_INPUT = 2
MODEL_ENV = "FLUX_JAX_MODEL"
HF_REPO = "black-forest-labs/FLUX.1-dev"  # the default model, if the Hugging Face cache holds it
MODEL_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "transformer")
MAX_SEED = 2**32 - 1  # JAX keys keep 32 bits of the seed without x64: larger seeds would collide
DEMO_DEFAULTS = dict(height=256, width=256, num_inference_steps=4)  # seconds on a CPU, not minutes
DEMO_KONTEXT_AREA = DEMO_DEFAULTS["height"] * DEMO_DEFAULTS["width"]  # Kontext's own default is 1024² pixels
FILE_PATTERN = "flux_{seed}_{index}.png"  # image names when --out is a folder
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}  # --out names refused: PNG only
DEFAULT_LORA_SCALE = 1.0
VAE_TILING = {"auto": None, "on": True, "off": False}  # --vae-tiling -> the pipelines' vae_tiling


class BadInput(Exception):
    """Reported as one `error:` line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error and exits; we want one line and a return code
        raise BadInput(message)


# ---------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m flux_jax.sample", description="Generate images with FLUX.1 in JAX.")
    add_model_arguments(p)
    add_lora_argument(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="text prompt; repeat for several")
    p.add_argument("--prompt-file", metavar="FILE", help="file with one prompt per non-empty line")
    p.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt (needs --true-cfg above 1)")
    p.add_argument("--true-cfg", type=float, default=1.0, metavar="SCALE",
                   help="true classifier-free guidance scale (default 1: off)")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int, metavar="PX",
                       help="pixels, a multiple of 16 (default 1024; demo 256; image modes: see below)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="denoising steps (default: dev 28, schnell 4, fill 50; demo 4)")
    p.add_argument("--guidance", type=float, metavar="SCALE",
                   help="guidance scale (default: dev 3.5, fill 30; schnell: none)")
    p.add_argument("--seed", type=int, metavar="N", help="random seed (default: random; printed and stored in the PNG)")
    add_cache_argument(p)
    p.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt (default 1)")
    p.add_argument("--out", default=".", metavar="PATH",
                   help=f"a .png file (several images: NAME_0.png, NAME_1.png...) or a folder (files {FILE_PATTERN}); "
                        "existing files are replaced (default: the current folder)")
    add_mode_arguments(p)
    add_memory_arguments(p)
    distributed.add_arguments(p)
    compile_cache.add_argument(p)
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Which model, and how it is held: --model/--demo, --transformer, --dtype, --low-memory, --quantize
    (shared with generate)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH",
                     help=f"FLUX.1 folder (diffusers layout or converted by `python -m convert`); "
                          f"default: ${MODEL_ENV}, else {HF_REPO} from the Hugging Face cache")
    src.add_argument("--demo", action="store_true",
                     help="tiny random-weight model built in-process (no download): its pictures are random noise")
    p.add_argument("--transformer", metavar="PATH",
                   help="transformer weights to use instead of the model's: a BFL .safetensors file, "
                        "a diffusers transformer/ folder or a converted one")
    p.add_argument("--dtype", metavar="NAME", help="bf16, fp16 or fp32 (default: bf16 on GPU/TPU, fp32 on CPU)")
    p.add_argument("--low-memory", action=argparse.BooleanOptionalAction,
                   help="never hold the text encoders and the transformer in memory together (default: only when "
                        "all models together would not fit)")
    p.add_argument("--quantize", choices=tuple(QUANTIZE_MODES),
                   help="quantization of the transformer's and T5's block kernels, applied while loading: "
                        "weight-only int8 (per output channel), int4, nf4 (groups of 64); or fp8 weights and "
                        "activations (float8 matmuls on Ada/Hopper GPUs, emulated elsewhere); a model converted "
                        "with --quantize loads quantized without it")


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """--vae-tiling and --no-memory-check (shared with generate; see flux_jax.memory and flux_jax.tiling)."""
    p.add_argument("--vae-tiling", choices=tuple(VAE_TILING), default="auto",
                   help="decode the image in overlapping tiles: auto (above 2048x2048 pixels, or when memory "
                        "needs it), on or off")
    p.add_argument("--no-memory-check", action="store_true",
                   help="load without first checking that the estimated peak memory fits on the device")


def memory_options(args: argparse.Namespace, batch: int) -> dict:
    """from_pretrained's memory keywords: the size to check the estimate for, tiling, the check itself."""
    return dict(height=args.height, width=args.width, batch=batch, vae_tiling=VAE_TILING[args.vae_tiling],
                check_memory=not args.no_memory_check)


def add_lora_argument(p: argparse.ArgumentParser) -> None:
    """--lora FILE[:SCALE], repeatable (shared with generate; load_pipeline applies them)."""
    p.add_argument("--lora", action="append", default=[], type=lora_argument, metavar="FILE[:SCALE]",
                   help=f"a LoRA (.safetensors in diffusers/PEFT, kohya, OneTrainer, ComfyUI or XLabs keys, or a "
                        f"folder holding one) applied at SCALE "
                        f"(default {DEFAULT_LORA_SCALE:g}); repeat for several")


def add_cache_argument(p: argparse.ArgumentParser) -> None:
    """--cache SPEC: training-free step caching (shared with generate; see flux_jax/cache.py)."""
    p.add_argument("--cache", type=cache_argument, metavar="SPEC",
                   help="skip work on steps close to the previous ones: fbcache:THRESHOLD (e.g. fbcache:0.08) "
                        "or taylorseer:INTERVAL[:ORDER] (e.g. taylorseer:4:2); default: every step computed")


def cache_argument(text: str):
    try:
        return parse_cache(text)
    except CacheError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def lora_argument(text: str) -> tuple[str, float]:
    """--lora FILE[:SCALE] -> (FILE, SCALE), the file's keys checked (header only: no model needed yet).

    Only a number after the last ':' is a scale; any other suffix is part of the file name.
    """
    path, scale = text, DEFAULT_LORA_SCALE
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass  # not a number: part of the file name
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"{text}: the scale must be a finite number, as FILE:0.8")
    try:
        check_lora(path)
    except LoraError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path, scale


# ---------------------------------------------------------------- image modes

@dataclasses.dataclass(frozen=True)
class ModeSpec:
    """What a mode takes: --image, --mask (both required when taken), --strength; whether it needs a Fill model."""
    pipeline: type
    image: bool = False
    mask: bool = False
    strength: bool = False
    fill: bool = False


MODES = {
    "text": ModeSpec(FluxPipeline),
    "kontext": ModeSpec(FluxKontextPipeline, image=True),
    "img2img": ModeSpec(FluxImg2ImgPipeline, image=True, strength=True),
    "inpaint": ModeSpec(FluxInpaintPipeline, image=True, mask=True, strength=True),
    "fill": ModeSpec(FluxFillPipeline, image=True, mask=True, strength=True, fill=True),
}
STRENGTH_MODES = ", ".join(name for name, spec in MODES.items() if spec.strength)
AUTO_RULE = ("Without --mode, the mode follows from the arguments and the checkpoint: "
             "no --image: text (text-to-image); "
             "--image with --mask: fill on a FLUX.1 Fill checkpoint, else inpaint; "
             "--image alone: img2img if --strength is given, else kontext (editing by instruction: use a "
             "FLUX.1 Kontext checkpoint). A Fill checkpoint runs fill only. "
             "Output size: the input image's (floored to multiples of 16; kontext: about 1024² pixels at its "
             "aspect ratio, demo 256²) unless --height and --width are both given. "
             "--demo builds a Fill model for --mode fill, else a dev one (so --mask gives inpaint).")


@dataclasses.dataclass
class Mode:
    """What to run: the pipeline class, extra __call__ keywords, extra PNG metadata, the demo variant to build."""
    pipeline: type = FluxPipeline
    call_kwargs: dict = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=lambda: {"mode": "text"})
    demo_variant: str = "dev"
    name: str = "text"


def add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("image modes", AUTO_RULE)
    g.add_argument("--mode", choices=tuple(MODES), help="what to generate (default: chosen as above)")
    g.add_argument("--image", metavar="FILE", help="input image (any format Pillow reads; EXIF orientation applied)")
    g.add_argument("--mask", metavar="FILE", help="inpaint/fill mask, white = repaint (resized to the image, "
                                                  "with a warning, if its size differs)")
    g.add_argument("--strength", type=float, metavar="S",
                   help=f"{STRENGTH_MODES}: how much of the image to redraw, 0 to 1 "
                        f"(default {DEFAULT_STRENGTH}; fill {FILL_STRENGTH}: start from pure noise)")


def auto_mode(args: argparse.Namespace, fill_model: Optional[bool]) -> str:
    """The mode AUTO_RULE picks; fill_model None (unknown) counts as not Fill: the load then tells."""
    if args.image is None:
        return "text"
    if args.mask is not None:
        return "fill" if fill_model else "inpaint"
    return "img2img" if args.strength is not None else "kontext"


def check_mode_inputs(name: str, args: argparse.Namespace) -> None:
    """--image, --mask and --strength as mode `name` takes them."""
    spec, which = MODES[name], f"--mode {name}" if args.mode else f"{name} mode"
    if spec.image and args.image is None:
        raise BadInput(f"{which} needs --image")
    if not spec.image and args.image is not None:
        raise BadInput(f"{which} takes no --image")
    if spec.mask and args.mask is None:
        raise BadInput(f"{which} needs --mask (white = repaint)")
    if not spec.mask and args.mask is not None:
        raise BadInput(f"--mask is used by inpaint and fill only, not {which}")
    if not spec.strength and args.strength is not None:
        why = "" if args.mode or args.image else " (no --image given)"
        raise BadInput(f"--strength is used by {STRENGTH_MODES} only, not {which}{why}")


def check_checkpoint(name: str, fill_model: Optional[bool], source: object) -> None:
    """Refuse a mode the checkpoint cannot run: fill needs a Fill model, which runs nothing else. None: unknown."""
    spec = MODES[name]
    if spec.fill and fill_model is False:
        raise BadInput(f"--mode fill needs a FLUX.1 Fill checkpoint (transformer in_channels {FILL_IN_CHANNELS}); "
                       f"{source} is not one: use --mode inpaint")
    if not spec.fill and fill_model:
        fix = "use --mode fill (or no --mode)" if spec.mask else "it needs --image and --mask (white = repaint)"
        raise BadInput(f"{source} is a FLUX.1 Fill checkpoint: {fix}")


def transformer_source(args: argparse.Namespace, root: Path) -> Path:
    return Path(args.transformer) if args.transformer else root / "transformer"


def transformer_in_channels(src: Path) -> Optional[int]:
    """in_channels of the transformer at `src`, from its config or safetensors header (no weights read).

    None if it cannot be told: loading then reports what is wrong with the files.
    """
    default = FluxConfig.in_channels  # what the loaders assume when a config leaves it out
    try:
        if src.is_file():  # BFL single file: img_in.weight is (hidden, in_channels)
            reader = Reader(src)
            prefix = BFL_PREFIX if any(k.startswith(BFL_PREFIX) for k in reader.keys()) else ""
            return reader.shape(f"{prefix}img_in.weight")[1]
        if is_converted(src):
            return json.loads((src / CONFIG_FILE).read_text())["config"].get("in_channels", default)
        return json.loads((src / "config.json").read_text()).get("in_channels", default)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def is_fill_model(args: argparse.Namespace, root: Optional[Path]) -> Optional[bool]:
    """Whether the checkpoint is a Fill model, before loading it; the demo model is built for the mode."""
    if root is None:
        return args.mode == "fill"
    in_channels = transformer_in_channels(transformer_source(args, root))
    return None if in_channels is None else in_channels == FILL_IN_CHANNELS


def warn_if_not_kontext(root: Path) -> None:
    """Kontext shares dev's architecture, so only model_index.json can tell a dev folder run by mistake."""
    try:
        cls = json.loads((root / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return
    if cls and cls != FluxKontextPipeline.__name__:
        warnings.warn(f"{root} holds a {cls}, not FLUX.1 Kontext: kontext mode edits by instruction only with "
                      f"a Kontext checkpoint (for img2img pass --strength)")


def read_input(path: str, option: str, image_mode: str = "RGB"):
    """The PIL image in `path` (upright, in `image_mode`); unreadable files are bad input."""
    try:
        return load_image(path, mode=image_mode, name=option)
    except PipelineError as e:
        raise BadInput(str(e)) from None


def select_mode(args: argparse.Namespace, root: Optional[Path]) -> Mode:
    """The Mode the arguments ask for (AUTO_RULE without --mode) on the model at `root` (None: the demo).

    Runs before the model loads: checks the mode's inputs against the checkpoint's kind, reads the images.
    """
    if args.mask is not None and args.image is None:
        raise BadInput("--mask needs --image")
    if args.strength is not None and not 0 <= args.strength <= 1:
        raise BadInput(f"--strength must be from 0 to 1, got {args.strength}")
    fill_model = is_fill_model(args, root)
    name = args.mode or auto_mode(args, fill_model)
    spec = MODES[name]
    check_mode_inputs(name, args)
    check_checkpoint(name, fill_model, transformer_source(args, root) if root else "the demo model")
    mode = Mode(spec.pipeline, metadata={"mode": name}, demo_variant="fill" if spec.fill else "dev", name=name)
    if not spec.image:
        return mode
    if (args.height is None) != (args.width is None):
        raise BadInput(f"{name} mode takes --height and --width together, or neither (the input image's size)")
    image = read_input(args.image, "--image")
    try:
        default_size(image, "--image")
    except PipelineError as e:
        raise BadInput(str(e)) from None
    # height/width None: the pipeline's size rules, not the text-to-image defaults.
    kw = dict(image=image, height=args.height, width=args.width)
    mode.metadata["image"] = Path(args.image).name
    if spec.mask:
        kw["mask_image"] = read_input(args.mask, "--mask", "L")
        mode.metadata["mask"] = Path(args.mask).name
    if spec.strength:
        kw["strength"] = args.strength
        mode.metadata["strength"] = spec.pipeline.default_strength if args.strength is None else args.strength
    if name == "kontext":
        # Kontext reads height/width as an aspect ratio at max_area pixels: their product makes them exact.
        if args.height is not None:
            kw["max_area"] = args.height * args.width
        elif args.demo:
            kw["max_area"] = DEMO_KONTEXT_AREA
        if root is not None and not args.transformer:
            warn_if_not_kontext(root)
    mode.call_kwargs = kw
    return mode


# ---------------------------------------------------------------- checks before loading

def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if any(not p.strip() for p in prompts):
        raise BadInput("--prompt is empty")
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise BadInput(f"--prompt-file {args.prompt_file} has no prompts (one per non-empty line)")
        prompts += lines
    if not prompts:
        raise BadInput("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def check_side(name: str, side: int) -> None:
    if not PIXELS_PER_TOKEN <= side <= MAX_SIDE:
        raise BadInput(f"{name} must be from {PIXELS_PER_TOKEN} to {MAX_SIDE} pixels, got {side}")


def check_seed(name: str, seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise BadInput(f"{name} must be from 0 to {MAX_SEED}, got {seed}")


def check_options(args: argparse.Namespace) -> None:
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            check_side(f"--{name}", getattr(args, name))
    if args.steps is not None and args.steps < 1:
        raise BadInput(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise BadInput(f"--num-images must be at least 1, got {args.num_images}")
    if args.seed is not None:
        check_seed("--seed", args.seed)
    if args.negative_prompt is not None and args.true_cfg <= 1:
        raise BadInput("--negative-prompt is used only with --true-cfg above 1 (e.g. --true-cfg 4)")
    if args.true_cfg > 1 and args.negative_prompt is None:
        raise BadInput("--true-cfg above 1 needs --negative-prompt")
    if args.demo and args.transformer:
        raise BadInput("--transformer cannot be used with --demo")


def check_out(out: str) -> Path:
    """The output path, checked: a .png file, or a folder (made when the first image is written)."""
    path = Path(out)
    suffix = "" if path.is_dir() else path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        raise BadInput(f"--out {out}: only PNG is written; use a .png name or a folder")
    if suffix != ".png" and path.exists() and not path.is_dir():
        raise BadInput(f"--out {out} exists and is not a folder")
    folder = path.parent if suffix == ".png" else path
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise BadInput(f"--out {out}: cannot write into {existing}")
    return path


def check_dtype(name: Optional[str]):
    try:
        return parse_dtype(name) if name else default_dtype()
    except ValueError as e:
        raise BadInput(f"--dtype: {e}") from None


def default_dtype():
    import jax
    return parse_dtype("fp32" if jax.default_backend() == "cpu" else "bf16")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, found as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"


def cached_snapshot(repo: str = HF_REPO) -> Optional[Path]:
    """The cache snapshot of `repo` that `refs/main` names, else the newest; None if it is not cached."""
    root = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    ref = root / "refs" / "main"
    if ref.is_file():
        named = root / "snapshots" / ref.read_text().strip()
        if named.is_dir():
            return named
    snapshots = [p for p in (root / "snapshots").glob("*") if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime, default=None)


def resolve_model(args: argparse.Namespace) -> Path:
    """The model folder to load, checked for every piece the pipeline needs."""
    model = args.model or os.environ.get(MODEL_ENV) or cached_snapshot()
    if model is None:
        raise BadInput(f"no model: pass --model PATH, set {MODEL_ENV}, download {HF_REPO} "
                       f"(huggingface-cli download {HF_REPO}), or try --demo")
    root = Path(model)
    if not root.is_dir():
        raise BadInput(f"{root}: no such model folder")
    needed = [n for n in MODEL_PARTS if not (n == "transformer" and args.transformer)]
    missing = [f"{n}/" for n in needed if not (root / n).is_dir()]
    if missing:
        raise BadInput(f"{root}: incomplete model folder: missing {', '.join(missing)}")
    if args.transformer and not Path(args.transformer).exists():
        raise BadInput(f"--transformer {args.transformer}: no such file or folder")
    return root


def model_label(root: Path, transformer: Optional[str]) -> str:
    """A short name for the PNG metadata: the hub repo for a cache snapshot, else the folder's name."""
    repo = root.parent.parent.name
    label = repo[len("models--"):].replace("--", "/") if repo.startswith("models--") else root.name
    return f"{label} + {Path(transformer).name}" if transformer else label


# ---------------------------------------------------------------- loading, generating, writing

def load_pipeline(args, root: Optional[Path], mode: Mode, dtype, **kw) -> tuple[FluxPipeline, str]:
    """(pipeline with the --lora adapters, model label), of the model folder `root` or the demo model;
    bad model or LoRA files are bad input. Extra keywords (generate's mesh=) go to the loader."""
    if args.quantize:
        kw["quantize"] = args.quantize
    pipe, label = _load_model(args, root, mode, dtype, **kw)
    quantized = f" [{pipe.quantize}]" if pipe.quantize else ""  # also a checkpoint saved quantized
    return pipe, label + quantized + apply_loras(pipe, args.lora)


def _load_model(args, root: Optional[Path], mode: Mode, dtype, batch: int = 1, **kw) -> tuple[FluxPipeline, str]:
    if root is None:
        from .demo import NOISE_NOTICE, make_demo_pipeline
        print(f"note: {NOISE_NOTICE}", file=sys.stderr)
        pipe = make_demo_pipeline(mode.demo_variant, cls=mode.pipeline, dtype=dtype, **kw)
        pipe.vae_tiling = VAE_TILING[args.vae_tiling]
        return pipe, "demo (random weights)"
    print(f"loading {root}", file=sys.stderr)
    try:
        pipe = mode.pipeline.from_pretrained(root, dtype=dtype, transformer=args.transformer,
                                             low_memory=args.low_memory, **memory_options(args, batch), **kw)
    except PipelineError as e:
        raise BadInput(str(e)) from None
    except Exception as e:  # corrupt files surface as many types (safetensors, orbax, json, tokenizers)
        raise BadInput(f"cannot load the model from {root}: {type(e).__name__}: {e}") from None
    return pipe, model_label(root, args.transformer)


def apply_loras(pipe: FluxPipeline, loras: list[tuple[str, float]]) -> str:
    """Load every --lora into `pipe` and run them all at their scales; returns their label for the PNGs."""
    if not loras:
        return ""
    names = []
    try:
        for path, _ in loras:
            pipe.load_lora_weights(path)  # each becomes the one active adapter: collect their names
            names += pipe.get_active_adapters()
        pipe.set_adapters(names, [scale for _, scale in loras])
    except PipelineError as e:
        raise BadInput(f"--lora: {e}") from None
    return "".join(f" + {Path(path).name}:{scale:g}" for path, scale in loras)


def call_kwargs(args, mode: Mode) -> dict:
    """The pipeline's __call__ keywords; None leaves a value to the pipeline's defaults for its variant."""
    kw = dict(height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
              negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg,
              num_images_per_prompt=args.num_images, cache=args.cache)
    if args.demo:
        kw.update({k: v for k, v in DEMO_DEFAULTS.items() if kw[k] is None})
    return {**kw, **mode.call_kwargs}


def output_paths(out: Path, seed: int, n: int) -> list[Path]:
    if out.suffix.lower() == ".png" and not out.is_dir():
        return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]
    return [out / FILE_PATTERN.format(seed=seed, index=i) for i in range(n)]


def png_info(prompt: str, seed: int, steps: int, guidance: float, image, label: str, index: int = 0,
             num_images: int = 1, negative_prompt: Optional[str] = None, true_cfg: float = 1.0,
             mode_metadata: Optional[dict] = None, cache=None) -> dict:
    """The PNG text chunks of an image: what reproduces it with `sample` (shared with generate, whose
    files are then byte-identical to sample's for the same prompt, seed and settings)."""
    # seed, index and num_images reproduce an image: each prompt's batch starts from the seed.
    extra = dict(negative_prompt=negative_prompt, true_cfg=true_cfg) if negative_prompt else {}
    extra.update({"cache": str(cache)} if cache else {})
    return dict(prompt=prompt, seed=seed, steps=steps, guidance=guidance, size="%dx%d" % image.size, model=label,
                index=index, num_images=num_images, software="flux-jax", **extra,
                **(mode_metadata or {"mode": "text"}))


def save_png(image, path: Path, info: dict) -> None:
    """Write `image` with `info` as PNG text chunks; atomically, so no half-written file is ever seen."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(key, str(value))  # non-Latin-1 text goes to an iTXt chunk
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a picture should get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def generate(args, prompts: list[str], out: Path, root: Optional[Path], mode: Mode, dtype) -> None:
    """Load the model (the demo one if `root` is None), run every prompt, write the PNGs, print timings."""
    # A drawn seed is process 0's on every process of a multi-host job: they compute one batch together.
    seed = args.seed if args.seed is not None else distributed.from_main(int.from_bytes(os.urandom(4), "little"))
    paths = iter(output_paths(out, seed, len(prompts) * args.num_images))
    print(f"seed: {seed}", file=sys.stderr)
    t0 = time.perf_counter()
    pipe, label = load_pipeline(args, root, mode, dtype, batch=args.num_images)
    load_s = time.perf_counter() - t0
    check_checkpoint(mode.name, pipe.variant == "fill", label)  # when its kind could not be read before loading

    kw = call_kwargs(args, mode)
    defaults = DEFAULTS[pipe.variant]
    steps = kw["num_inference_steps"] or defaults["num_inference_steps"]
    guidance = defaults["guidance_scale"] if kw["guidance_scale"] is None else kw["guidance_scale"]
    main_process = distributed.is_main()  # in a multi-host job every process has every image: one writes
    totals: dict[str, float] = {}
    for prompt in prompts:
        try:
            result = pipe(prompt=prompt, seed=seed, **kw)  # by name: Kontext takes the image first
        except PipelineError as e:
            raise BadInput(str(e)) from None
        for key, value in result.timings.items():
            totals[key] = totals.get(key, 0.0) + value
        for j, image in enumerate(result.images):
            info = png_info(prompt, seed, steps, guidance, image, label, j, args.num_images, args.negative_prompt,
                            args.true_cfg, mode.metadata, args.cache)
            path = next(paths)
            if main_process:
                save_png(image, path, info)
                print(path)
    t = lambda key: totals.get(key, 0.0)
    image = f"image encoding {t('encode_image'):.1f} s, " if "encode_image" in totals else ""
    if args.cache:
        print(f"{args.cache}: {t('steps_computed'):.0f} of {t('steps'):.0f} steps computed", file=sys.stderr)
    print(f"compile {t('compile'):.1f} s, sampling {t('sample'):.1f} s (load {load_s:.1f} s, "
          f"text encoding {t('encode'):.1f} s, {image}decoding {t('decode'):.1f} s)", file=sys.stderr)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {one_line(message)}", file=sys.stderr)


def one_line(message) -> str:
    return re.sub(r"\s*\n\s*", " ", str(message)).strip()


@contextlib.contextmanager
def one_line_warnings():
    """Warnings as one `warning: ...` line each on stderr, every distinct one shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # also resets which warnings were already shown
        warnings.showwarning = _one_line_warning
        yield


def run_cli(body: Callable[[], object]) -> int:
    """A CLI's exit code: 0, or 2 with one `error:` line for bad input; warnings one line each."""
    try:
        with one_line_warnings():
            body()
    except (BadInput, distributed.DistributedError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    return 0


def _sample(argv: Optional[list[str]]) -> None:
    args = build_parser().parse_args(argv)
    # Everything cheap is checked before the model loads, and before other hosts are waited for.
    distributed.check_arguments(args)
    prompts = read_prompts(args)
    check_options(args)
    out = check_out(args.out)
    root = None if args.demo else resolve_model(args)
    mode = select_mode(args, root)
    compile_cache.configure(args)
    distributed.initialize(args)  # JAX devices are touched from here on (check_dtype asks the backend)
    generate(args, prompts, out, root, mode, check_dtype(args.dtype))


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(lambda: _sample(argv))


if __name__ == "__main__":
    sys.exit(main())
