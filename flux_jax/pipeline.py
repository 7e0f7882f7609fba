"""FluxPipeline: prompt -> image in JAX, with the keywords and meanings of diffusers' FluxPipeline.

    pipe = FluxPipeline.from_pretrained("/path/to/FLUX.1-dev", dtype="bf16")
    image = pipe("a red fox in the snow", seed=0).images[0]

Loads a diffusers-layout folder (converting on the fly) or a folder written by `python -m convert`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import memory, quantize as qz, sharding, tiling
from .autoencoder import AutoencoderKL, scale_latents, unscale_latents
from .cache import StepCache, cached_model, parse_cache, steps_computed
from .clip import CLIPTextEncoder
from .config import CLIPConfig, FluxConfig, PIXELS_PER_TOKEN, T5Config, VAEConfig, VAE_DOWNSAMPLE, parse_dtype
from .layers import rope
from .loading import LoadError, load_component
from .lora import LoraMixin
from .model import Flux
from .sampling import cfg_velocity, denoise, get_schedule, image_ids, model_timesteps, text_ids, unpack
from .t5 import T5Encoder

CLIP_MAX_LENGTH = 77
MAX_SEED = 2**32
MAX_SIDE = 4096  # pixels; beyond this attention over (side/16)² tokens is far outside what FLUX was trained on
OUTPUT_TYPES = ("pil", "np", "latent")
# Defaults by variant (as BFL/diffusers recommend); None of the user's keywords means "use these".
DEFAULTS = {
    "dev": dict(height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5, max_sequence_length=512),
    "schnell": dict(height=1024, width=1024, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256),
    "fill": dict(height=1024, width=1024, num_inference_steps=50, guidance_scale=30.0, max_sequence_length=512),
}
SCHNELL_MAX_SEQUENCE = 256
Prompt = Union[str, Sequence[str]]


@functools.partial(jax.jit, static_argnums=(0, 1))
def jit_apply(module, method: str, params: dict, *args):
    """module.method(*args) under jit; keyed on the (hashable) module, so pipelines share compilations."""
    return module.apply({"params": params}, *args, method=getattr(type(module), method))


def default_scan_layers(quantize: Optional[str] = None) -> bool:
    """Unrolled blocks on GPU and CPU, where XLA copies each layer's weights out of a scanned stack
    (16 ms of a 141 ms H100 forward; measured faster unrolled on CPU too); scanned on TPU.

    Weights that are dequantized next to their matmuls (quantize.dequantized_in_matmul) are scanned
    everywhere: unrolled, XLA dequantizes every layer's kernels up front (compiled memory of one
    FLUX.1-dev int8 forward on CPU: 13.0 GB unrolled, 0.49 GB scanned). fp8 on a GPU with float8
    GEMMs has nothing to dequantize, so it stays unrolled there.
    """
    return qz.dequantized_in_matmul(quantize) or jax.default_backend() == "tpu"


class PipelineError(ValueError):
    """Bad input to a pipeline: the message names the problem and the fix."""


@dataclasses.dataclass
class FluxPipelineOutput:
    images: Any  # list of PIL images, float32 (B, H, W, 3) in [0, 1], or packed latents (B, L, 64)
    timings: dict = dataclasses.field(default_factory=dict)  # seconds: encode, compile, sample, decode


def _as_list(prompt: Optional[Prompt], name: str) -> Optional[list[str]]:
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PipelineError(f"{name} must be a string or a non-empty list of strings")
    return prompts


def _load_tokenizers(root: Path):
    from transformers import CLIPTokenizer, T5TokenizerFast

    for name in ("tokenizer", "tokenizer_2"):
        if not (root / name).is_dir():
            raise PipelineError(f"{root}: missing {name}/ folder; is this a complete FLUX model folder?")
    return CLIPTokenizer.from_pretrained(root / "tokenizer"), T5TokenizerFast.from_pretrained(root / "tokenizer_2")


def load_params(path: Path, name: str, mesh, dtype, scan_layers: bool = True, quantize: Optional[str] = None,
                **kw) -> tuple[dict, Any]:
    """(params on `mesh`, config) for one component: a converted folder, a diffusers folder or a BFL file.

    Each tensor goes onto the devices as it is read (see loading), quantized there if asked;
    scan_layers=False (transformer only) keeps per-layer params, so the devices never hold both layouts.
    """
    if not path.exists():
        raise PipelineError(f"{path}: missing {name}; is this a complete FLUX model folder?")
    try:
        return load_component(path, name, mesh, dtype, scan_layers, quantize=quantize, **kw)
    except LoadError as e:
        raise PipelineError(str(e)) from None


def _check_quantize(mode: Optional[str]) -> Optional[str]:
    try:
        return qz.check_mode(mode)
    except qz.QuantizeError as e:
        raise PipelineError(str(e)) from None


def _read_shapes(root: Path, transformer: Path, kw: dict) -> Optional[dict]:
    """memory.read_pipeline (configs and param shapes, no weights), or None when a file cannot be
    read: loading then reports precisely what is wrong."""
    try:
        return memory.read_pipeline(root, transformer, **kw)
    except (OSError, ValueError, KeyError):
        return None


def _plan_memory(shapes: dict, size: dict, low_memory: Optional[bool], vae_tiling: Optional[bool]) -> memory.Plan:
    """The schedule that fits on this process's devices (memory.plan) for `size` (estimate's keywords;
    height and width None: the variant's defaults); PipelineError naming the fix if none does."""
    from convert.transformer import variant

    d = DEFAULTS[variant(shapes["transformer"].config)]
    size = {**size, "height": size["height"] or d["height"], "width": size["width"] or d["width"],
            "txt_tokens": d["max_sequence_length"]}
    available = memory.device_memory(size["mesh"].local_devices)
    try:
        plan = memory.plan(shapes, available, low_memory, vae_tiling, **size)
    except memory.InsufficientMemory as e:
        raise PipelineError(str(e)) from None
    if plan.low_memory and low_memory is None:
        warnings.warn(f"all models together need about {plan.estimate.peak(False) / memory.GB:.1f} GB, more than "
                      f"the {available.bytes / memory.GB:.1f} GB available on {available.name}: the text encoders "
                      f"and the transformer take turns in memory (low_memory; a call that encodes prompts again "
                      f"reloads both); low_memory=False (--no-low-memory) turns this off", stacklevel=3)
    return plan


def pad_rows(x, n: int):
    """x with its last row repeated up to n rows: batches fill the mesh's batch shards evenly."""
    extra = n - x.shape[0]
    if extra <= 0:
        return x
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _repeat_rows(x: jax.Array, n: int, repeat: int, total: int) -> jax.Array:
    """First n rows, each repeated `repeat` times, padded to `total` rows (one jitted op: global arrays)."""
    return pad_rows(jnp.repeat(x[:n], repeat, axis=0), total)


def _bfl_axes(root: Path, transformer) -> dict:
    """A BFL file carries no config: take RoPE axes from the folder's transformer config if there is one."""
    f = root / "transformer" / "config.json"
    if not Path(transformer).is_file() or not f.is_file():
        return {}
    axes = json.loads(f.read_text()).get("axes_dims_rope")
    return {"axes_dim": tuple(axes)} if axes else {}


def _scheduler_shift(root: Path, cfg: FluxConfig) -> tuple[bool, float]:
    """(dynamic shift?, static shift) from scheduler/scheduler_config.json; FLUX.1 defaults if absent."""
    f = root / "scheduler" / "scheduler_config.json"
    d = json.loads(f.read_text()) if f.is_file() else {}
    dynamic = d.get("use_dynamic_shifting", cfg.guidance_embed)
    return bool(dynamic), float(d.get("shift", 1.0))


class FluxPipeline(LoraMixin):
    """Text-to-image. Components are Flax modules with their params as plain dicts; LoRA methods as diffusers'."""

    # Set by from_pretrained: the transformer's loader when it is never resident with the text encoders.
    reload_transformer: Optional[Callable[[], tuple]] = None
    vae_tiling: Optional[bool] = None  # decode in tiles: True/False always/never, None above TILING_MIN_PIXELS

    def __init__(self, transformer: tuple[dict, FluxConfig], text_encoder: tuple[dict, CLIPConfig],
                 text_encoder_2: tuple[dict, T5Config], vae: tuple[dict, VAEConfig], tokenizer, tokenizer_2,
                 dynamic_shift: bool = True, static_shift: float = 1.0, dtype=None,
                 reload_text_encoders: Optional[Callable[[], tuple]] = None, name: str = "flux", mesh=None,
                 quantize: Optional[str] = None):
        # Every model on the mesh (default: all devices on the data axis); loaded params already are.
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        place = lambda part: (sharding.put_params(self.mesh, part[0]), part[1])
        (self.params, self.cfg), (self.clip_params, self.clip_cfg) = place(transformer), place(text_encoder)
        (self.t5_params, self.t5_cfg), (self.vae_params, self.vae_cfg) = place(text_encoder_2), place(vae)
        # Weight-only quantization of params given in float (from_pretrained quantizes while loading)
        quantize = _check_quantize(quantize)
        self.params = qz.quantize_tree(self.params, "transformer", quantize, self.mesh)
        self.t5_params = qz.quantize_tree(self.t5_params, "text_encoder_2", quantize, self.mesh)
        self.quantize = qz.mode_of(self.params)  # also set by a checkpoint saved quantized
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.dynamic_shift, self.static_shift = dynamic_shift, static_shift
        self.dtype = jnp.dtype(dtype) if dtype is not None else next(  # a quantized tree's first leaf may be int8
            a.dtype for a in jax.tree_util.tree_leaves(self.params) if jnp.issubdtype(a.dtype, jnp.floating))
        self.reload_text_encoders = reload_text_encoders  # set when low_memory frees them after each use
        self.remembered: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # see remember_prompts
        self.name = name
        self.transformer = Flux(self.cfg, self.dtype)  # cfg.scan_layers says how self.params are laid out
        self.vae = AutoencoderKL(self.vae_cfg, self.dtype)
        self.clip = CLIPTextEncoder(self.clip_cfg, self.dtype)
        self.t5 = T5Encoder(self.t5_cfg, self.dtype)
        self._compiled: dict = {}
        self._bar = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None, transformer: str | Path | None = None,
                        low_memory: Optional[bool] = None, scan_layers: Optional[bool] = None, mesh=None,
                        quantize: Optional[str] = None, check_memory: bool = True, height: Optional[int] = None,
                        width: Optional[int] = None, batch: int = 1, vae_tiling: Optional[bool] = None, **kw):
        """Load a diffusers-layout FLUX folder or a converted one.

        dtype: jnp dtype or name ('bf16', 'fp32'); default: as stored.
        transformer: a BFL single file, a diffusers transformer/ folder or a converted one, used
        instead of path/transformer. low_memory: never hold the text encoders and the transformer
        together: the transformer loads once the prompts are encoded and CLIP and T5 freed; a later
        call that must encode again frees it and reloads both (remember_prompts avoids that); None
        (default): only when all models together would not fit (see check_memory).
        scan_layers: run the block stacks under nn.scan (fast compile) or unrolled with per-layer
        params (9% faster forward on an H100 but ~30 s compile); default: scanned on TPU and when
        quantized (but fp8 on Ada/Hopper), unrolled elsewhere (see default_scan_layers). mesh: a
        jax.sharding.Mesh with sharding.MESH_AXES (see sharding.make_mesh); default: all devices on
        the data axis. Each tensor goes straight onto the mesh with its sharding as it is read.
        quantize: 'int8', 'int4', 'nf4' or 'fp8' (see flux_jax/quantize.py): the transformer's and
        T5's block kernels quantized, each as it is placed (fp8: activations too, float8 matmuls);
        a folder converted with --quantize loads as it was saved (quantize None or the same mode).
        check_memory: before loading anything, estimate the peak memory (flux_jax.memory) of images
        of height x width (default: the variant's, 1024²), `batch` at a time, against what the
        devices have; choose low_memory and VAE tiling by it where they are None, or fail at once
        with the fix (a quantize mode). vae_tiling: decode in overlapping tiles (flux_jax.tiling);
        None: above tiling.TILING_MIN_PIXELS, or where the estimate needs it.
        """
        root = Path(path)
        if not root.is_dir():
            raise PipelineError(f"{root}: no such model folder; pass --model PATH or set FLUX_JAX_MODEL")
        dtype = parse_dtype(dtype)
        quantize = _check_quantize(quantize)
        tokenizers = _load_tokenizers(root)
        mesh = sharding.make_mesh() if mesh is None else mesh
        encoders = lambda: (load_params(root / "text_encoder", "text_encoder", mesh, dtype),
                            load_params(root / "text_encoder_2", "text_encoder_2", mesh, dtype, quantize=quantize))
        scan = default_scan_layers(quantize) if scan_layers is None else scan_layers
        tr_path = Path(transformer) if transformer else root / "transformer"
        tr_kw = _bfl_axes(root, transformer) if transformer else {}
        load_transformer = lambda: load_params(tr_path, "transformer", mesh, dtype, scan, quantize, **tr_kw)
        shapes = _read_shapes(root, tr_path, tr_kw)  # None if unreadable: loading then says what is wrong
        if check_memory and shapes is not None:
            plan = _plan_memory(shapes, dict(height=height, width=width, batch=batch, dtype=dtype, quantize=quantize,
                                             mesh=mesh, scan_layers=scan, scan_quantized=scan_layers is None),
                                low_memory, vae_tiling)
            low_memory, vae_tiling = plan.low_memory, plan.vae_tiling
        deferred = bool(low_memory) and shapes is not None  # the transformer loads after encoding
        clip, t5 = encoders()
        vae = load_params(root / "vae", "vae", mesh, dtype)
        tr = (None, shapes["transformer"].config.replace(scan_layers=scan)) if deferred else load_transformer()
        dynamic, static = _scheduler_shift(root, tr[1])
        pipe = cls(tr, clip, t5, vae, *tokenizers, dynamic_shift=dynamic, static_shift=static,
                   dtype=dtype if dtype is not None or not deferred else memory.main_dtype(shapes["transformer"]),
                   reload_text_encoders=encoders if low_memory else None, name=root.name, mesh=mesh,
                   quantize=None if deferred else quantize, **kw)
        if deferred:
            pipe.reload_transformer, pipe.quantize = load_transformer, quantize
        pipe.vae_tiling = vae_tiling
        return pipe

    @property
    def variant(self) -> str:
        if self.cfg.in_channels > self.cfg.out_channels:
            return "fill"
        return "dev" if self.cfg.guidance_embed else "schnell"

    # ------------------------------------------------------------------ text
    def _tokenize(self, tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
        return np.asarray(tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                    return_tensors="np")["input_ids"], np.int32)

    def encode_prompt(self, prompt: Prompt, prompt_2: Optional[Prompt] = None, num_images_per_prompt: int = 1,
                      max_sequence_length: int = 512) -> tuple[jax.Array, jax.Array]:
        """(T5 states (B·N, L, 4096), pooled CLIP (B·N, 768)); prompt_2 (T5) defaults to prompt."""
        prompts = _as_list(prompt, "prompt")
        prompts_2 = _as_list(prompt_2, "prompt_2") or prompts
        if len(prompts_2) != len(prompts):
            raise PipelineError(f"prompt_2 has {len(prompts_2)} entries, prompt has {len(prompts)}")
        n = len(prompts)
        keys = [(p, p2, max_sequence_length) for p, p2 in zip(prompts, prompts_2)]
        if all(k in self.remembered for k in keys):
            rows = [np.concatenate([self.remembered[k][i] for k in keys]) for i in (0, 1)]
            total = sharding.padded_batch(n * num_images_per_prompt, self.mesh)
            return tuple(sharding.put_batch(self.mesh, pad_rows(np.repeat(r, num_images_per_prompt, axis=0), total))
                         for r in rows)
        if self.clip_params is None:
            if self.reload_text_encoders is None:
                raise PipelineError("the text encoders were freed: encode prompts with remember_prompts() first")
            if self.reload_transformer is not None:
                self.params = None  # never resident together: load_transformer brings it back
            (self.clip_params, _), (self.t5_params, _) = self.reload_text_encoders()
        ids = lambda tok, p, length: sharding.put_batch(
            self.mesh, pad_rows(self._tokenize(tok, p, length), sharding.padded_batch(n, self.mesh)))
        with jax.set_mesh(self.mesh):
            _, y = jit_apply(self.clip, "__call__", self.clip_params, ids(self.tokenizer, prompts, CLIP_MAX_LENGTH))
            txt = jit_apply(self.t5, "__call__", self.t5_params, ids(self.tokenizer_2, prompts_2, max_sequence_length))
            # Rows padded to fill the batch shards; `finish` drops the padding.
            total = sharding.padded_batch(n * num_images_per_prompt, self.mesh)
            return tuple(_repeat_rows(a.astype(self.dtype), n, num_images_per_prompt, total) for a in (txt, y))

    def free_text_encoders(self) -> None:
        self.clip_params = self.t5_params = None

    def load_transformer(self) -> None:
        """Load the transformer if the never-resident-together schedule freed it (see from_pretrained)."""
        if self.params is None and self.reload_transformer is not None:
            self.params, _ = self.reload_transformer()
            self.quantize = qz.mode_of(self.params)
            if self.lora_state.fused is not None:  # fused adapters were merged into the freed copy
                self._lora_merge(self.lora_state.fused, 1.0)

    def _lora_merge(self, adapters, sign: float) -> None:
        if self.params is not None:  # else merged by load_transformer
            super()._lora_merge(adapters, sign)

    @contextlib.contextmanager
    def using_variables(self, variables: dict):
        """Within the block, the transformer runs with `variables` ({"params"[, "lora", "lora_scale"]}),
        e.g. the weights of a training run, without copying them into the pipeline."""
        saved = self.params, self.lora_state.variables
        self.params = variables["params"]
        self.lora_state.variables = {k: v for k, v in variables.items() if k != "params"}
        try:
            yield self
        finally:
            self.params, self.lora_state.variables = saved

    def remember_prompts(self, prompts: Sequence[str], max_sequence_length: int = 512) -> None:
        """Encode `prompts` now and keep their embeddings (on the host), so they can be sampled after
        free_text_encoders() (training keeps T5 out of memory this way)."""
        txt, y = (sharding.to_host(a) for a in self.encode_prompt(list(prompts), max_sequence_length=max_sequence_length))
        for i, p in enumerate(prompts):
            self.remembered[(p, p, max_sequence_length)] = (txt[i:i + 1], y[i:i + 1])

    # ------------------------------------------------------------------ sizes and schedule
    def check_size(self, height: int, width: int) -> tuple[int, int]:
        for name, side in (("height", height), ("width", width)):
            if not isinstance(side, (int, np.integer)) or side < PIXELS_PER_TOKEN or side > MAX_SIDE:
                raise PipelineError(f"{name} must be an integer from {PIXELS_PER_TOKEN} to {MAX_SIDE} pixels, "
                                    f"got {side!r}")
        h, w = (int(s) // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN for s in (height, width))
        if (h, w) != (height, width):
            warnings.warn(f"height and width must be multiples of {PIXELS_PER_TOKEN}: using {h}x{w} instead of "
                          f"{height}x{width} (as diffusers does)", stacklevel=3)
        return h, w

    def schedule(self, num_steps: Optional[int], image_seq_len: int, sigmas=None) -> np.ndarray:
        if sigmas is None and (not isinstance(num_steps, (int, np.integer)) or num_steps < 1):
            raise PipelineError(f"num_inference_steps must be an integer >= 1, got {num_steps!r}")
        s = get_schedule(None if sigmas is not None else num_steps, image_seq_len, shift=self.dynamic_shift,
                         sigmas=sigmas)
        if not self.dynamic_shift and self.static_shift != 1.0:  # FlowMatchEulerDiscreteScheduler's static shift
            k = np.float32(self.static_shift)
            s = (k * s / (1 + (k - 1) * s)).astype(np.float32)
        return s

    # ------------------------------------------------------------------ denoising
    def _advance(self, i) -> None:
        """Host callback from inside the jitted loop, once per step."""
        if self._bar is not None:
            self._bar.update(max(0, int(i) + 1 - self._bar.n))  # unordered on a mesh: never step back

    def _sampler(self, n_steps: int, true_cfg: bool, cache: Optional[StepCache] = None):
        """One jitted function: the whole Euler loop around the transformer (compiled once per shape).

        It returns (latents, steps that ran the whole model): n_steps, or fewer with a step cache.
        """
        model = self.transformer

        def run(params, lora, x, txt, y, guidance, sigmas, timesteps, ids, cfg_scale, cond, hook_args):
            pe = rope(ids[None], self.cfg.axes_dim, self.cfg.theta)  # one table, broadcast over the batch
            kw = {} if cond is None else cond

            def forward(img, t, **stage):  # stage: start/stop/streams, to run part of the model (see Flux)
                return model.apply({"params": params, **lora}, img, None, txt, None, t, y, guidance, pe=pe,
                                   **kw, **stage)

            def inputs(x, t):
                img = x.astype(self.dtype)
                if true_cfg:  # positive and negative branches in one batched forward
                    img, t = jnp.concatenate([img, img]), jnp.concatenate([t, t])
                return img, t

            def guided(v):
                if true_cfg:
                    v_pos, v_neg = jnp.split(v.astype(jnp.float32), 2)
                    return cfg_velocity(v_pos, v_neg, cfg_scale)
                return v

            hook = None if hook_args is None else (lambda i, x: self.step_hook(i, x, sigmas, hook_args))
            loop = functools.partial(denoise, x=x, sigmas=sigmas, timesteps=timesteps, progress=self._advance,
                                     step_hook=hook)
            if cache is None:
                return loop(lambda x, t: guided(forward(*inputs(x, t)))), jnp.int32(n_steps)
            step, state = cached_model(cache, forward, *inputs(x, jnp.broadcast_to(timesteps[0], x.shape[:1])),
                                       n_steps)

            def velocity(x, t, i, state):
                v, state = step(*inputs(x, t), i, state)
                return guided(v), state

            x, state = loop(velocity, state=state)
            return x, steps_computed(state)

        return run

    def step_hook(self, i, x, sigmas, hook_args):  # overridden by the inpainting pipeline
        return x

    def denoise_latents(self, latents: jax.Array, txt: jax.Array, y: jax.Array, sigmas: np.ndarray,
                        guidance_scale: float, img_ids: np.ndarray, true_cfg_scale: float = 1.0,
                        neg: Optional[tuple[jax.Array, jax.Array]] = None, cond: Optional[dict] = None,
                        cond_ids: Optional[np.ndarray] = None, hook_args: Any = None,
                        progress: bool = True, cache: Union[str, StepCache, None] = None) -> tuple[jax.Array, dict]:
        """Run the jitted sampler; returns (final latents float32, {'compile': s, 'sample': s, 'steps_computed': n}).

        cache: training-free step caching (see flux_jax/cache.py), e.g. "fbcache:0.08"; steps_computed
        counts the steps that ran the whole model.
        """
        cache = parse_cache(cache)
        true_cfg = neg is not None
        if true_cfg:
            txt, y = jnp.concatenate([txt, neg[0]]), jnp.concatenate([y, neg[1]])
        n = txt.shape[0]
        guidance = np.full((n,), guidance_scale, np.float32) if self.cfg.guidance_embed else None
        ids = np.concatenate([text_ids(txt.shape[1]), img_ids] + ([cond_ids] if cond_ids is not None else []))
        if cond is not None and true_cfg:
            cond = {k: (jnp.concatenate([v, v]) if hasattr(v, "shape") else v) for k, v in cond.items()}
        n_steps = len(sigmas) - 1
        # Explicit placement: batch over the batch shards, params as loaded, the schedule replicated.
        batched = lambda tree: jax.tree_util.tree_map(lambda a: sharding.put_batch(self.mesh, a), tree)
        whole = lambda a: sharding.put(a, sharding.replicated(self.mesh))
        # LoRA side branch (see LoraMixin): its shapes are in the key below, its weights are not.
        args = (self.params, self.lora_variables, batched(jnp.asarray(latents, jnp.float32)), batched(txt),
                batched(y), batched(guidance),
                whole(np.asarray(sigmas, np.float32)), whole(model_timesteps(sigmas, self.dtype)), whole(ids),
                whole(np.float32(true_cfg_scale)), batched(cond), batched(hook_args))
        # One executable per step count, branch structure and input shapes; compile timed apart.
        key = str((n_steps, true_cfg, cache, jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), args[1:])))
        timings = {"compile": 0.0}
        if key not in self._compiled:
            t0 = time.perf_counter()
            shardings = jax.tree_util.tree_map(lambda a: a.sharding, args)
            sampler = jax.jit(self._sampler(n_steps, true_cfg, cache), in_shardings=shardings,
                              out_shardings=(args[2].sharding, sharding.replicated(self.mesh)))
            with jax.set_mesh(self.mesh):
                self._compiled[key] = sampler.lower(*args).compile()
            timings["compile"] = time.perf_counter() - t0
        self._bar = tqdm(total=n_steps, desc="denoising", disable=not progress or jax.process_index() != 0)
        try:
            t0 = time.perf_counter()
            out, computed = self._compiled[key](*args)
            out.block_until_ready()
            timings["sample"] = time.perf_counter() - t0
            timings["steps_computed"], timings["steps"] = int(computed), n_steps
        finally:
            self._bar.close()
            self._bar = None
        return out, timings

    # ------------------------------------------------------------------ the call
    def __call__(self, prompt: Prompt, prompt_2: Optional[Prompt] = None, negative_prompt: Optional[Prompt] = None,
                 negative_prompt_2: Optional[Prompt] = None, true_cfg_scale: float = 1.0,
                 height: Optional[int] = None, width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 sigmas: Optional[Sequence[float]] = None, guidance_scale: Optional[float] = None,
                 num_images_per_prompt: int = 1, seed: Optional[int] = None, latents=None,
                 max_sequence_length: Optional[int] = None, output_type: str = "pil",
                 progress: bool = True, cache: Union[str, StepCache, None] = None) -> FluxPipelineOutput:
        """Text to image, with diffusers' keywords; cache: training-free step caching, e.g. "fbcache:0.08"
        or "taylorseer:4:2" (see flux_jax/cache.py; timings["steps_computed"] counts the full steps)."""
        cache = parse_cache(cache)  # a bad setting fails before any work
        d = DEFAULTS[self.variant]
        height, width = self.check_size(d["height"] if height is None else height,
                                        d["width"] if width is None else width)
        steps, guidance_scale, max_len = self.call_settings(num_inference_steps, sigmas, guidance_scale,
                                                            max_sequence_length, output_type, num_images_per_prompt)
        h_tok, w_tok = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
        sigma_schedule = self.schedule(steps, h_tok * w_tok, sigmas)

        batch = len(_as_list(prompt, "prompt")) * num_images_per_prompt
        x = self.initial_latents(latents, batch, h_tok * w_tok, seed)  # checked before any heavy work

        txt, y, neg, t_encode = self.encode_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2,
                                                    true_cfg_scale, num_images_per_prompt, max_len)
        timings = {"encode": t_encode}

        out, t = self.denoise_latents(x, txt, y, sigma_schedule, guidance_scale, image_ids(h_tok, w_tok),
                                      true_cfg_scale, neg, progress=progress, cache=cache)
        timings.update(t)
        return self.finish(out, height, width, output_type, timings, batch)

    # ------------------------------------------------------------------ shared by the editing pipelines
    def call_settings(self, num_inference_steps: Optional[int], sigmas, guidance_scale: Optional[float],
                      max_sequence_length: Optional[int], output_type: str,
                      num_images_per_prompt: int) -> tuple[int, float, int]:
        """(steps, guidance, max_sequence_length): the user's keywords or the variant's defaults, checked."""
        d = DEFAULTS[self.variant]
        steps = num_inference_steps if num_inference_steps is not None else (
            len(sigmas) if sigmas is not None else d["num_inference_steps"])
        guidance_scale = d["guidance_scale"] if guidance_scale is None else float(guidance_scale)
        max_len = self.check_max_sequence_length(
            d["max_sequence_length"] if max_sequence_length is None else max_sequence_length)
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise PipelineError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        return steps, guidance_scale, max_len

    def encode_prompts(self, prompt: Prompt, prompt_2: Optional[Prompt], negative_prompt: Optional[Prompt],
                       negative_prompt_2: Optional[Prompt], true_cfg_scale: float, num_images_per_prompt: int,
                       max_len: int) -> tuple[jax.Array, jax.Array, Optional[tuple[jax.Array, jax.Array]], float]:
        """(txt, y, negative (txt, y) or None, seconds): both prompts encoded, text encoders freed if low_memory."""
        t0 = time.perf_counter()
        txt, y = self.encode_prompt(prompt, prompt_2, num_images_per_prompt, max_len)
        neg = None
        if true_cfg_scale > 1 and negative_prompt is not None:
            neg_list = _as_list(negative_prompt, "negative_prompt")
            n_prompts = len(_as_list(prompt, "prompt"))
            if len(neg_list) == 1 and n_prompts > 1:
                neg_list = neg_list * n_prompts
            neg = self.encode_prompt(neg_list, negative_prompt_2, num_images_per_prompt, max_len)
        if self.reload_text_encoders is not None:
            self.free_text_encoders()
        self.load_transformer()
        return txt, y, neg, time.perf_counter() - t0

    def check_max_sequence_length(self, n: int) -> int:
        limit = SCHNELL_MAX_SEQUENCE if self.variant == "schnell" else 512
        if not isinstance(n, int) or not 1 <= n <= limit:
            raise PipelineError(f"max_sequence_length must be an integer from 1 to {limit}, got {n!r}")
        return n

    def initial_latents(self, latents, batch: int, seq_len: int, seed) -> jax.Array:
        """The packed initial noise, on the mesh: the user's (as diffusers takes it), or drawn from `seed`.

        seed: an int (one draw of shape (batch, L, C)), or one int per image, each row then drawn
        on its own as a batch of one with that seed (batch jobs: an image's noise is independent
        of its batch). Rows are padded to fill the mesh's batch shards; `finish` drops them.
        """
        channels = self.cfg.out_channels
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (batch, seq_len, channels):
                raise PipelineError(f"latents must be packed noise of shape {(batch, seq_len, channels)}, "
                                    f"got {latents.shape}")
        else:
            seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
            if len(seeds) not in (1, batch):
                raise PipelineError(f"seed: give one int, or one per image ({batch}), got {len(seeds)}")
            for s in seeds:
                if s is not None and not (isinstance(s, (int, np.integer)) and 0 <= s < MAX_SEED):
                    # without x64, larger seeds would silently wrap onto others
                    raise PipelineError(f"seed must be an integer from 0 to {MAX_SEED - 1}, got {s!r}")
            draw = lambda s, n: np.asarray(jax.random.normal(
                jax.random.PRNGKey(np.random.SeedSequence().entropy % MAX_SEED if s is None else s),
                (n, seq_len, channels), jnp.float32))
            latents = draw(seeds[0], batch) if len(seeds) == 1 else np.concatenate([draw(s, 1) for s in seeds])
        return sharding.put_batch(self.mesh, pad_rows(latents, sharding.padded_batch(batch, self.mesh)))

    def decode(self, latents: jax.Array, height: int, width: int) -> np.ndarray:
        """Packed latents -> float32 (B, H, W, 3) images in [0, 1], the whole batch on every process."""
        z = unscale_latents(unpack(latents, height, width), self.vae_cfg).astype(self.dtype)
        decode = lambda z: sharding.to_host(jit_apply(self.vae, "decode", self.vae_params, z))
        with jax.set_mesh(self.mesh):
            if tiling.use_tiling(self.vae_tiling, height, width):  # one compiled tile; the image assembled on the host
                img = tiling.decode_tiled(lambda tile: decode(sharding.put_batch(self.mesh, tile)), sharding.to_host(z))
            else:
                img = decode(z)
        return np.clip(img.astype(np.float32) / 2 + 0.5, 0, 1)

    def finish(self, latents: jax.Array, height: int, width: int, output_type: str, timings: dict, batch: int):
        """The first `batch` rows (the rest pad the mesh's batch shards) as output_type."""
        if output_type == "latent":
            return FluxPipelineOutput(sharding.to_host(latents)[:batch], timings)
        t0 = time.perf_counter()
        images = self.decode(latents, height, width)[:batch]
        timings["decode"] = time.perf_counter() - t0
        if output_type == "np":
            return FluxPipelineOutput(images, timings)
        from PIL import Image
        return FluxPipelineOutput([Image.fromarray((im * 255).round().astype(np.uint8)) for im in images], timings)
