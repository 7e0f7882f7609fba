"""Model configurations as frozen dataclasses, with the published FLUX.1 presets."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

LATENT_CHANNELS = 16  # VAE latent channels
PATCH = 2  # latents are packed 2x2 into tokens: 16 * 2 * 2 = 64 channels a token
VAE_DOWNSAMPLE = 8  # pixels per latent, each side
PIXELS_PER_TOKEN = VAE_DOWNSAMPLE * PATCH  # 16: image sides must be multiples of this
TIME_EMBED_DIM = 256  # sinusoidal embedding width of timestep and guidance
TIME_FACTOR = 1000.0  # timesteps and guidance arrive in [0, 1] / natural units; BFL embeds t·1000


REMAT_CHOICES = ("none", "dots", "full")


class _Config:
    """replace / to_dict / from_dict for the frozen config dataclasses below."""

    def replace(self, **kw: Any):
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class FluxConfig(_Config):
    in_channels: int = 64  # packed channels the transformer reads (Fill: 64 + 64 + 256)
    out_channels: int = 64
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    context_in_dim: int = 4096  # T5 width
    vec_in_dim: int = 768  # CLIP pooled width
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    # Training memory: what the backward pass recomputes of each block. "none": keep every
    # activation; "dots": keep linear-layer outputs, recompute the rest; "full": keep only the
    # block's inputs (least memory, about one more forward).
    remat: str = "none"
    # True: each block stack is one nn.scan over params with a leading layer axis (compiles one
    # block). False: blocks unrolled with per-layer params (see model.unstack_layers): longer
    # compile, but XLA no longer copies each layer's weights out of the stack on GPU.
    scan_layers: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")
        if isinstance(self.remat, bool):  # configs saved before remat policies: False / True
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"remat must be one of {REMAT_CHOICES}, got {self.remat!r}")
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


DEV = FluxConfig()
SCHNELL = DEV.replace(guidance_embed=False)
KONTEXT = DEV  # same architecture as dev; the difference is in how it is sampled
FILL = DEV.replace(in_channels=384, out_channels=64)
PRESETS = {"dev": DEV, "schnell": SCHNELL, "kontext": KONTEXT, "fill": FILL}
# A tiny model with the real structure, for --demo and fast tests.
TINY = FluxConfig(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                  context_in_dim=32, vec_in_dim=32, axes_dim=(8, 12, 12))


@dataclasses.dataclass(frozen=True)
class CLIPConfig(_Config):
    """CLIP-L/14 text tower."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2  # transformers' legacy value: 2 means "pool at the argmax token id"



@dataclasses.dataclass(frozen=True)
class T5Config(_Config):
    """T5 v1.1 encoder (XXL by default)."""
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6



@dataclasses.dataclass(frozen=True)
class VAEConfig(_Config):
    """AutoencoderKL as FLUX uses it: 16 latent channels, no quant convs."""
    in_channels: int = 3
    latent_channels: int = LATENT_CHANNELS
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))



DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "f16": "float16"}


def parse_dtype(dtype: Any) -> np.dtype | None:
    """None, a numpy/jnp dtype, or a name ('bf16', 'float32', ...) -> numpy dtype (bf16 via ml_dtypes)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPE_NAMES))}")
        dtype = DTYPE_NAMES[dtype.lower()]
        if dtype == "bfloat16":
            import ml_dtypes
            return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


# Tiny text encoders and VAE matching TINY's widths (context 32 = T5 d_model, pooled 32 = CLIP
# width), for --demo and tests. The VAE keeps 4 levels so it still downsamples 8x.
TINY_CLIP = CLIPConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
TINY_T5 = T5Config(vocab_size=1000, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
TINY_VAE = VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_groups=8)
