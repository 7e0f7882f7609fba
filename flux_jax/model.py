"""The FLUX.1 transformer: 19 double-stream blocks then 38 single-stream blocks, under nn.scan.

Param layout (plain nested dict; blocks carry a leading layer axis):
  img_in, txt_in, time_in, vector_in, guidance_in (dev only)
  double_blocks/{img,txt}_mod/lin, {img,txt}_attn/{qkv,norm/{query,key}_norm,proj}, {img,txt}_mlp/{fc1,fc2}
  single_blocks/modulation/lin, linear1 ([q, k, v, mlp] fused), norm/{query,key}_norm, linear2
  final_modulation/lin ([shift, scale]), final_linear
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import FluxConfig
from .sharding import constrain
from .layers import LORA, LORA_SCALE, Linear, MLPEmbedder, Modulation, RMSNorm, attention, layer_norm, modulate, rope, timestep_embedding

N_MOD_DOUBLE = 6  # shift, scale, gate for attention, then for the MLP
N_MOD_SINGLE = 3  # shift, scale, gate
N_MOD_FINAL = 2  # shift, scale
STACKS = ("double_blocks", "single_blocks")
LAYER_COLLECTIONS = ("params", LORA, LORA_SCALE)  # the variables that carry a leading layer axis under nn.scan
# Where a forward can stop and resume (training-free step caching, flux_jax/cache.py): the inputs, the
# (img, txt) streams after the first double block, the image tokens after the last block, the output.
INPUT, FIRST_BLOCK, BLOCKS, VELOCITY = "input", "first_block", "blocks", "velocity"
STAGES = (INPUT, FIRST_BLOCK, BLOCKS, VELOCITY)
TOKENS = ("batch", "length", None)  # logical axes of (B, L, hidden) activations (see sharding)


class QKNorm(nn.Module):
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return (RMSNorm(self.param_dtype, name="query_norm")(q),
                RMSNorm(self.param_dtype, name="key_norm")(k))


def split_heads(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, L, 3·H·D) -> three (B, L, H, D)."""
    b, l, _ = qkv.shape
    q, k, v = jnp.split(qkv.reshape(b, l, 3, num_heads, -1), 3, axis=2)
    return q[:, :, 0], k[:, :, 0], v[:, :, 0]


class StreamAttention(nn.Module):
    """One stream's half of a double block's attention: fused qkv, QK norm, output projection."""
    cfg: FluxConfig
    param_dtype: jnp.dtype

    def setup(self):
        d = self.cfg.hidden_size
        self.qkv = Linear(3 * d, use_bias=self.cfg.qkv_bias, param_dtype=self.param_dtype)
        self.norm = QKNorm(self.param_dtype)
        self.proj = Linear(d, param_dtype=self.param_dtype)

    def __call__(self, x: jax.Array):
        q, k, v = split_heads(self.qkv(x), self.cfg.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


class DoubleBlock(nn.Module):
    """Separate weights for img and txt; one joint attention over [txt, img]."""
    cfg: FluxConfig
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, carry, vec: jax.Array, pe: jax.Array):
        img, txt = carry
        d, pd = self.cfg.hidden_size, self.param_dtype
        img_mod = Modulation(N_MOD_DOUBLE, pd, name="img_mod")(vec)
        txt_mod = Modulation(N_MOD_DOUBLE, pd, name="txt_mod")(vec)
        img_attn = StreamAttention(self.cfg, pd, name="img_attn")
        txt_attn = StreamAttention(self.cfg, pd, name="txt_attn")

        img_q, img_k, img_v = img_attn(modulate(img, img_mod[0], img_mod[1]))
        txt_q, txt_k, txt_v = txt_attn(modulate(txt, txt_mod[0], txt_mod[1]))
        joint = [jnp.concatenate(pair, axis=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))]
        attn = attention(*joint, pe)
        n_txt = txt.shape[1]

        img = img + img_mod[2] * img_attn.proj(attn[:, n_txt:])
        img = img + img_mod[5] * FeedForward(self.cfg.mlp_hidden, d, pd, name="img_mlp")(
            modulate(img, img_mod[3], img_mod[4]))
        txt = txt + txt_mod[2] * txt_attn.proj(attn[:, :n_txt])
        txt = txt + txt_mod[5] * FeedForward(self.cfg.mlp_hidden, d, pd, name="txt_mlp")(
            modulate(txt, txt_mod[3], txt_mod[4]))
        return (constrain(img, TOKENS), constrain(txt, TOKENS)), None


class FeedForward(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""
    hidden: int
    out: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(Linear(self.hidden, param_dtype=self.param_dtype, name="fc1")(x), approximate=True)
        return Linear(self.out, param_dtype=self.param_dtype, name="fc2")(x)


class SingleBlock(nn.Module):
    """Parallel attention + MLP on the joint sequence: linear1 -> (q, k, v, mlp); linear2([attn, gelu(mlp)])."""
    cfg: FluxConfig
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, vec: jax.Array, pe: jax.Array):
        d, pd = self.cfg.hidden_size, self.param_dtype
        shift, scale, gate = Modulation(N_MOD_SINGLE, pd, name="modulation")(vec)
        h = Linear(3 * d + self.cfg.mlp_hidden, param_dtype=pd, name="linear1")(modulate(x, shift, scale))
        q, k, v = split_heads(h[..., :3 * d], self.cfg.num_heads)
        q, k = QKNorm(pd, name="norm")(q, k)
        mlp = nn.gelu(h[..., 3 * d:], approximate=True)
        out = Linear(d, param_dtype=pd, name="linear2")(jnp.concatenate([attention(q, k, v, pe), mlp], axis=-1))
        return constrain(x + gate * out, TOKENS), None


# What the backward pass keeps of a block's forward (the rest is recomputed): see FluxConfig.remat.
REMAT_POLICIES = {"full": None,  # nothing but the block's inputs
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}  # linear-layer outputs


def _remat(block: type[nn.Module], cfg: FluxConfig) -> type[nn.Module]:
    if cfg.remat == "none":
        return block
    return nn.remat(block, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])


def _stack(block: type[nn.Module], cfg: FluxConfig, n: int) -> type[nn.Module]:
    """Run `n` copies of `block` as one scanned block over params (and LoRA adapters) with a leading layer axis."""
    return nn.scan(_remat(block, cfg), variable_axes={c: 0 for c in LAYER_COLLECTIONS},
                   split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast), length=n)


def _run_blocks(block: type[nn.Module], cfg: FluxConfig, pd, n: int, name: str, carry, vec, pe,
                layers: Optional[range] = None):
    """n blocks over `carry`: one scanned module (params stacked), or n modules named name_0..name_{n-1}.

    layers: only these blocks of the n (step caching runs the first one apart); under scan they
    see their slice of the stacked variables.
    """
    layers = range(n) if layers is None else layers
    if not layers:
        return carry
    if cfg.scan_layers:
        stack = _stack(block, cfg, len(layers))
        if len(layers) != n:
            part = lambda tree: jax.tree_util.tree_map(lambda a: a[layers.start:layers.stop], tree)
            stack = nn.map_variables(stack, LAYER_COLLECTIONS, trans_in_fn=part)
        return stack(cfg, pd, name=name)(carry, vec, pe)[0]
    cls = _remat(block, cfg)
    for i in layers:
        carry, _ = cls(cfg, pd, name=f"{name}_{i}")(carry, vec, pe)
    return carry


def unstack_layers(params: dict) -> dict:
    """Stacked params (scan_layers=True) -> per-layer ones (scan_layers=False): double_blocks_0, ..."""
    out = {k: v for k, v in params.items() if k not in STACKS}
    for name in STACKS:
        n = jax.tree_util.tree_leaves(params[name])[0].shape[0]
        out.update({f"{name}_{i}": jax.tree_util.tree_map(lambda a: a[i], params[name]) for i in range(n)})
    return out


def _check_stages(start: str, stop: str, streams) -> None:
    if start not in STAGES or stop not in STAGES or STAGES.index(start) >= STAGES.index(stop):
        raise ValueError(f"Flux: cannot run from {start!r} to {stop!r}: start and stop are two of {STAGES}, "
                         "start first")
    if (streams is None) != (start == INPUT):
        raise ValueError(f"Flux: start={start!r} needs streams from a run that stopped there (and only then)")


def _batched_ids(ids: jax.Array, batch: int, name: str) -> jax.Array:
    if ids.ndim == 2:  # one set of ids for the whole batch, as diffusers passes them
        ids = jnp.broadcast_to(ids[None], (batch, *ids.shape))
    if ids.ndim != 3:
        raise ValueError(f"{name} must be (L, n_axes) or (B, L, n_axes), got shape {ids.shape}")
    return ids


class Flux(nn.Module):
    """FLUX.1 transformer. Returns the velocity for the image tokens, (B, L_img, out_channels).

    img: packed noisy latents (B, L_img, C); img_cond: channels concatenated to img (Fill);
    cond_seq: extra tokens appended after img whose predictions are dropped (Kontext);
    timesteps: sigma in [0, 1], (B,); guidance: natural units (e.g. 3.5), (B,), dev only;
    y: pooled CLIP (B, vec_in_dim); txt: T5 states (B, L_txt, context_in_dim);
    pe: optional precomputed `rope(ids)` for ids [txt, img, cond_seq], to hoist it out of a sampling loop.

    start, stop (keyword-only, static): run one part of the model, between two of STAGES (step
    caching). Stopping at FIRST_BLOCK returns the (img, txt) streams before and after the first
    double block, at BLOCKS the image tokens after the last block (B, L_img, hidden); starting at
    FIRST_BLOCK takes `streams` = (img, txt) after the first double block, at BLOCKS the image
    tokens. Pass the other inputs as for a whole forward: the cheap embeddings of t, guidance and
    y are recomputed; the default (INPUT to VELOCITY) is the whole forward.
    """
    cfg: FluxConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, img_cond=None,
                 cond_seq=None, cond_seq_ids=None, pe: Optional[jax.Array] = None, *,
                 start: str = INPUT, stop: str = VELOCITY, streams=None):
        cfg, pd = self.cfg, self.param_dtype
        self._check_shapes(img, txt, timesteps, y, guidance, img_cond, cond_seq, cond_seq_ids)
        _check_stages(start, stop, streams)
        b, n_img = img.shape[:2]
        if img_cond is not None:
            img = jnp.concatenate([img, img_cond], axis=-1)
        if cond_seq is not None:
            img = jnp.concatenate([img, cond_seq], axis=1)
        if pe is None:
            ids = [_batched_ids(txt_ids, b, "txt_ids"), _batched_ids(img_ids, b, "img_ids")]
            if cond_seq is not None:
                ids.append(_batched_ids(cond_seq_ids, b, "cond_seq_ids"))
            pe = rope(jnp.concatenate(ids, axis=1), cfg.axes_dim, cfg.theta)

        if start == INPUT:
            img = constrain(Linear(cfg.hidden_size, param_dtype=pd, name="img_in")(img), TOKENS)
            txt = constrain(Linear(cfg.hidden_size, param_dtype=pd, name="txt_in")(txt), TOKENS)
        vec = MLPEmbedder(cfg.hidden_size, pd, name="time_in")(timestep_embedding(timesteps))
        if cfg.guidance_embed:
            vec = vec + MLPEmbedder(cfg.hidden_size, pd, name="guidance_in")(timestep_embedding(guidance))
        vec = vec + MLPEmbedder(cfg.hidden_size, pd, name="vector_in")(y)

        doubles = functools.partial(_run_blocks, DoubleBlock, cfg, pd, cfg.depth, "double_blocks")
        if start == INPUT:
            if stop == FIRST_BLOCK:
                return (img, txt), doubles((img, txt), vec, pe, range(1))
            (img, txt) = doubles((img, txt), vec, pe)
        elif start == FIRST_BLOCK:
            (img, txt) = doubles(streams, vec, pe, range(1, cfg.depth))
        if start == BLOCKS:
            img = streams
        else:
            x = constrain(jnp.concatenate([txt, img], axis=1), TOKENS)
            x = _run_blocks(SingleBlock, cfg, pd, cfg.depth_single_blocks, "single_blocks", x, vec, pe)
            img = x[:, txt.shape[1]:txt.shape[1] + n_img]  # Kontext condition tokens are dropped here
            if stop == BLOCKS:
                return img

        shift, scale = Modulation(N_MOD_FINAL, pd, name="final_modulation")(vec)
        return Linear(cfg.out_channels, param_dtype=pd, name="final_linear")(modulate(img, shift, scale))

    def _check_shapes(self, img, txt, timesteps, y, guidance, img_cond, cond_seq, cond_seq_ids):
        cfg = self.cfg
        b = img.shape[0]
        c_img = img.shape[-1] + (0 if img_cond is None else img_cond.shape[-1])
        problems = []
        if img.ndim != 3 or c_img != cfg.in_channels:
            problems.append(f"img (+ img_cond) must be (B, L, {cfg.in_channels}), got {img.shape}"
                            + ("" if img_cond is None else f" + {img_cond.shape}"))
        if img_cond is not None and img_cond.shape[:2] != img.shape[:2]:
            problems.append(f"img_cond must be (B, L) = {img.shape[:2]} like img, got {img_cond.shape}")
        if txt.ndim != 3 or txt.shape[0] != b or txt.shape[-1] != cfg.context_in_dim:
            problems.append(f"txt must be ({b}, L_txt, {cfg.context_in_dim}), got {txt.shape}")
        if y.shape != (b, cfg.vec_in_dim):
            problems.append(f"y must be ({b}, {cfg.vec_in_dim}), got {y.shape}")
        if timesteps.shape != (b,):
            problems.append(f"timesteps must be ({b},), got {timesteps.shape}")
        if cfg.guidance_embed and (guidance is None or guidance.shape != (b,)):
            problems.append(f"this model embeds guidance: guidance must be ({b},), got "
                            f"{None if guidance is None else guidance.shape}")
        if cond_seq is not None and (cond_seq.shape[0] != b or cond_seq.shape[-1] != img.shape[-1]
                                     or cond_seq_ids is None):
            problems.append(f"cond_seq must be ({b}, L_cond, {img.shape[-1]}) with cond_seq_ids, got {cond_seq.shape}")
        if problems:
            raise ValueError("Flux: " + "; ".join(problems))


def init_params(cfg: FluxConfig, rng: jax.Array, param_dtype=jnp.float32, n_txt: int = 4, n_img: int = 4) -> dict:
    """Random params (for tests and the demo model); shapes do not depend on n_txt / n_img."""
    b = 1
    img = jnp.zeros((b, n_img, cfg.in_channels))
    ids = jnp.zeros((n_img, 3))
    txt = jnp.zeros((b, n_txt, cfg.context_in_dim))
    t = jnp.zeros((b,))
    g = jnp.zeros((b,)) if cfg.guidance_embed else None
    return Flux(cfg, param_dtype).init(rng, img, ids, txt, jnp.zeros((n_txt, 3)), t,
                                       jnp.zeros((b, cfg.vec_in_dim)), g)["params"]


def param_shapes(cfg: FluxConfig, param_dtype=jnp.float32) -> dict:
    """The param tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), param_dtype))
