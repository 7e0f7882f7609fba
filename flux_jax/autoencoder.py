"""FLUX's VAE: diffusers' AutoencoderKL with 16 latent channels and no quant convs, in NHWC.

Module and param names mirror diffusers' state-dict keys (`down_blocks_0/resnets_1/conv1` is
`down_blocks.0.resnets.1.conv1`), so the converter maps every name mechanically.
GroupNorm statistics are float32; everything else computes in the params' dtype.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import VAEConfig
from .layers import Linear

NORM_EPS = 1e-6  # diffusers' VAE GroupNorms (resnets, attention, conv_norm_out)
SAME = ((1, 1), (1, 1))  # 3x3 conv keeping the size
VALID = ((0, 0), (0, 0))  # 1x1 shortcut conv
# diffusers' Downsample2D(padding=0) pads right and bottom by one, then runs a stride-2 3x3 conv.
DOWN_PAD = ((0, 1), (0, 1))
DOWN_STRIDE = 2
UP_FACTOR = 2  # nearest-neighbour upsampling, each side


class Conv(nn.Module):
    """2-D conv over NHWC with an HWIO kernel, computed in the kernel's dtype."""
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: tuple = SAME
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, (self.stride, self.stride), self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


class GroupNorm(nn.Module):
    """GroupNorm over (..., C) with a learned affine; statistics in float32, output in the params' dtype."""
    groups: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
        # Reduce over every spatial axis and the channels within a group, per sample.
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = g.mean(axes, keepdims=True)
        var = jnp.square(g - mean).mean(axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(x.shape)
        return (y * scale + bias).astype(scale.dtype)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv where the width changes)."""
    features: int
    groups: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(param_dtype=self.param_dtype)
        h = Conv(self.features, name="conv1", **kw)(nn.silu(GroupNorm(self.groups, name="norm1", **kw)(x)))
        h = Conv(self.features, name="conv2", **kw)(nn.silu(GroupNorm(self.groups, name="norm2", **kw)(h)))
        if x.shape[-1] != self.features:
            x = Conv(self.features, kernel_size=1, padding=VALID, name="conv_shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, head as wide as the channels, residual."""
    groups: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(param_dtype=self.param_dtype)
        t = GroupNorm(self.groups, name="group_norm", **kw)(x).reshape(b, h * w, 1, c)  # (B, L, heads=1, C)
        q, k, v = (Linear(c, name=n, **kw)(t) for n in ("to_q", "to_k", "to_v"))
        # XLA's attention, not layers.attention_impl's cuDNN flash: the head is C = 512 wide, beyond cuDNN's
        # head-dim limit. Scale 1/sqrt(C), logits and softmax in float32 (1 GiB of logits at 1024² pixels).
        o = jax.nn.dot_product_attention(q, k, v)
        return x + Linear(c, name="to_out_0", **kw)(o).reshape(x.shape)


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution."""
    groups: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(groups=self.groups, param_dtype=self.param_dtype)
        x = ResnetBlock(x.shape[-1], name="resnets_0", **kw)(x)
        x = AttnBlock(name="attentions_0", **kw)(x)
        return ResnetBlock(x.shape[-1], name="resnets_1", **kw)(x)


class Downsample(nn.Module):
    features: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv(self.features, stride=DOWN_STRIDE, padding=DOWN_PAD, param_dtype=self.param_dtype,
                    name="conv")(x)


class Upsample(nn.Module):
    features: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        f = UP_FACTOR
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, f, w, f, c)).reshape(b, h * f, w * f, c)
        return Conv(self.features, param_dtype=self.param_dtype, name="conv")(x)


class Block(nn.Module):
    """ResNets, then an optional 2x resampling: diffusers' DownEncoderBlock2D / UpDecoderBlock2D."""
    features: int
    num_resnets: int
    groups: int
    resample: Optional[str] = None  # "down", "up" or None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_resnets):
            x = ResnetBlock(self.features, self.groups, self.param_dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample(self.features, self.param_dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.features, self.param_dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, C) -> moments (B, H/8, W/8, 2 * latent): mean then log-variance."""
    config: VAEConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(param_dtype=self.param_dtype)
        chans = cfg.block_out_channels
        h = Conv(chans[0], name="conv_in", **kw)(x)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            h = Block(c, cfg.layers_per_block, cfg.norm_groups, None if last else "down",
                      name=f"down_blocks_{i}", **kw)(h)
        h = MidBlock(cfg.norm_groups, name="mid_block", **kw)(h)
        h = nn.silu(GroupNorm(cfg.norm_groups, name="conv_norm_out", **kw)(h))
        return Conv(2 * cfg.latent_channels, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latents (B, h, w, latent) -> image (B, 8h, 8w, C)."""
    config: VAEConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(param_dtype=self.param_dtype)
        chans = cfg.block_out_channels[::-1]
        h = Conv(chans[0], name="conv_in", **kw)(z)
        h = MidBlock(cfg.norm_groups, name="mid_block", **kw)(h)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            # The decoder's blocks hold one ResNet more than the encoder's.
            h = Block(c, cfg.layers_per_block + 1, cfg.norm_groups, None if last else "up",
                      name=f"up_blocks_{i}", **kw)(h)
        h = nn.silu(GroupNorm(cfg.norm_groups, name="conv_norm_out", **kw)(h))
        return Conv(cfg.in_channels, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """FLUX's VAE. Images NHWC in [-1, 1]; latents NHWC, 8x smaller each side, unscaled.

    `init` / `__call__` run encode then decode (to create every param); use
    `apply(v, x, method=AutoencoderKL.encode)` or `method=AutoencoderKL.decode`.
    """
    config: VAEConfig
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, self.param_dtype)
        self.decoder = Decoder(self.config, self.param_dtype)

    def encode(self, x: jax.Array) -> jax.Array:
        """Posterior mean (B, H/8, W/8, latent); FLUX encodes to the mean, it does not sample."""
        return self.encoder(x)[..., :self.config.latent_channels]

    def decode(self, z: jax.Array) -> jax.Array:
        """Image (B, 8h, 8w, C), in the params' dtype."""
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


def scale_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    """VAE latents -> the transformer's latent space."""
    return (z - cfg.shift_factor) * cfg.scaling_factor


def unscale_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    """The transformer's latent space -> VAE latents (inverse of scale_latents)."""
    return z / cfg.scaling_factor + cfg.shift_factor
