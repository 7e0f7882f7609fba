"""A tiny random-weight FLUX pipeline built in-process: no download, no torch, no sentencepiece.

    pipe = make_demo_pipeline()            # FluxPipeline with TINY sizes
    image = pipe("a fox", height=256, width=256, num_inference_steps=4, seed=0).images[0]

The pictures are random noise: the weights are random. It exercises the whole pipeline
(tokenizers, both text encoders, the transformer's jitted sampling loop, the VAE decoder) in a
few seconds on a CPU, for `python -m flux_jax.sample --demo`, notebooks and tests.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .autoencoder import AutoencoderKL
from .clip import CLIPTextEncoder
from .config import PRESETS, TINY, TINY_CLIP, TINY_T5, TINY_VAE, VAE_DOWNSAMPLE, parse_dtype
from .model import Flux
from .pipeline import FluxPipeline
from .sampling import ID_AXES
from .t5 import T5Encoder

DEMO_VARIANTS = ("dev", "schnell", "fill")
INIT_TOKENS = 4  # sequence length of the dummy inputs `init` is traced with; param shapes do not depend on it
INIT_PIXELS = 4 * VAE_DOWNSAMPLE  # VAE image side for tracing `init`: any multiple of 8 gives the same shapes
# Random weights are drawn with numpy into the shapes `init` declares (jax.eval_shape: nothing
# runs). Running `init` itself compiles every op of each forward pass: about a minute on 2 cores.
KERNEL_GAIN = 1.0  # kernels ~ N(0, gain² / fan_in): activations keep their scale through the layers
EMBED_STD = 0.02  # embedding tables, as CLIP's and T5's own initialisers
DEMO_NAME = "demo"
NOISE_NOTICE = "the demo model has random weights: its pictures are random noise, not images of the prompt"


def demo_config(variant: str = "dev"):
    """TINY with the guidance embedding and input width of the published `variant`."""
    if variant not in DEMO_VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; use one of {DEMO_VARIANTS}")
    full = PRESETS[variant]
    return TINY.replace(in_channels=full.in_channels, out_channels=full.out_channels,
                        guidance_embed=full.guidance_embed)


@functools.lru_cache(maxsize=None)
def _tokenizer_files() -> dict[str, dict[str, bytes]]:
    """The two tokenizer folders' files, trained once per process (a second or so of Python loops)."""
    from .tokenizers import write_clip_tokenizer, write_t5_tokenizer

    with tempfile.TemporaryDirectory(prefix="flux_demo_tok_") as tmp:
        write_clip_tokenizer(Path(tmp) / "tokenizer", TINY_CLIP.vocab_size)
        write_t5_tokenizer(Path(tmp) / "tokenizer_2", TINY_T5.vocab_size)
        return {d.name: {f.name: f.read_bytes() for f in d.iterdir()} for d in Path(tmp).iterdir()}


def demo_tokenizers():
    """(CLIPTokenizer, T5TokenizerFast) sized for TINY_CLIP / TINY_T5, loaded as from a model folder."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    with tempfile.TemporaryDirectory(prefix="flux_demo_tok_") as tmp:
        for name, files in _tokenizer_files().items():
            (Path(tmp) / name).mkdir()
            for fname, data in files.items():
                (Path(tmp) / name / fname).write_bytes(data)
        return (CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer"),
                T5TokenizerFast.from_pretrained(Path(tmp) / "tokenizer_2"))


def _random_leaf(path, shape, rng: np.random.Generator) -> np.ndarray:
    """Norm scales 1, biases 0, kernels fan-in scaled, embedding tables small: finite, non-saturating noise."""
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "scale":
        return np.ones(shape, np.float32)
    if name == "bias":
        return np.zeros(shape, np.float32)
    if name == "kernel":
        # (in, out), (layers, in, out) under nn.scan, or (kh, kw, in, out) convolutions
        fan_in = shape[-2] * (shape[0] * shape[1] if len(shape) == 4 else 1)
        return (rng.standard_normal(shape) * KERNEL_GAIN / np.sqrt(fan_in)).astype(np.float32)
    return (rng.standard_normal(shape) * EMBED_STD).astype(np.float32)


def random_params(module, seed, dtype, *inputs) -> dict:
    """Params of the tree `module.init(*inputs)` would make, drawn by numpy from `seed` (an int or SeedSequence)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(_random_leaf(path, s.shape, rng), dtype), shapes)


def demo_params(variant: str = "dev", seed: int = 0, dtype=jnp.float32) -> dict:
    """{component: (params, config)} for transformer, text_encoder, text_encoder_2 and vae."""
    cfg = demo_config(variant)
    ids = jnp.zeros((1, INIT_TOKENS), jnp.int32)
    tokens = lambda width: jnp.zeros((1, INIT_TOKENS, width))
    flux_inputs = (tokens(cfg.in_channels), jnp.zeros((INIT_TOKENS, ID_AXES)), tokens(cfg.context_in_dim),
                   jnp.zeros((INIT_TOKENS, ID_AXES)), jnp.zeros((1,)), jnp.zeros((1, cfg.vec_in_dim)),
                   jnp.zeros((1,)) if cfg.guidance_embed else None)
    image = jnp.zeros((1, INIT_PIXELS, INIT_PIXELS, TINY_VAE.in_channels))
    # One numpy stream per component, so changing one model's sizes leaves the others' weights alone.
    seeds = np.random.SeedSequence(seed).spawn(4)
    return {
        "transformer": (random_params(Flux(cfg, dtype), seeds[0], dtype, *flux_inputs), cfg),
        "text_encoder": (random_params(CLIPTextEncoder(TINY_CLIP, dtype), seeds[1], dtype, ids), TINY_CLIP),
        "text_encoder_2": (random_params(T5Encoder(TINY_T5, dtype), seeds[2], dtype, ids), TINY_T5),
        "vae": (random_params(AutoencoderKL(TINY_VAE, dtype), seeds[3], dtype, image), TINY_VAE),
    }


def make_demo_pipeline(variant: str = "dev", cls=FluxPipeline, seed: int = 0, dtype=jnp.float32, **kw):
    """A `cls` pipeline (FluxPipeline or a subclass) around a tiny random-weight `variant` model.

    Dev-like variants use the dynamic (resolution-dependent) shift, schnell none, as their
    published scheduler configs do. Extra keywords go to `cls` (e.g. mesh=).
    """
    dtype = parse_dtype(dtype) or jnp.dtype(jnp.float32)
    tokenizer, tokenizer_2 = demo_tokenizers()
    parts = demo_params(variant, seed, dtype)
    return cls(transformer=parts["transformer"], text_encoder=parts["text_encoder"],
               text_encoder_2=parts["text_encoder_2"], vae=parts["vae"], tokenizer=tokenizer,
               tokenizer_2=tokenizer_2, dynamic_shift=parts["transformer"][1].guidance_embed,
               dtype=dtype, name=DEMO_NAME, **kw)
