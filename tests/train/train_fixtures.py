"""Small pieces the training tests share: a tiny model's params, an in-memory cache, step-by-step runs."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flux_jax.config import TINY
from flux_jax.demo import random_params
from flux_jax.model import Flux

CFG = TINY.replace(scan_layers=False)  # the layout pipelines use on CPU
TOKENS = 4  # text tokens
LATENT = (4, 4, 16)  # a 32x32 image


def tiny_params(seed: int = 0) -> dict:
    """Random float32 params of CFG, drawn with numpy (no jitted init to compile)."""
    tokens = lambda width: jnp.zeros((1, TOKENS, width))
    ids = jnp.zeros((TOKENS, 3))
    return random_params(Flux(CFG), seed, jnp.float32, tokens(CFG.in_channels), ids, tokens(CFG.context_in_dim),
                         ids, jnp.zeros((1,)), jnp.zeros((1, CFG.vec_in_dim)), jnp.zeros((1,)))


class MemoryCache:
    """What the loader reads (see data.CacheLike), as deterministic random arrays: no encoders needed."""

    def __init__(self, n: int = 12, kontext: bool = False, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.buckets = [(32, 32)] * n
        self.rows = [{"latents": rng.standard_normal(LATENT).astype(np.float32),
                      "txt": rng.standard_normal((TOKENS, CFG.context_in_dim)).astype(np.float32),
                      "y": rng.standard_normal(CFG.vec_in_dim).astype(np.float32),
                      **({"control": rng.standard_normal(LATENT).astype(np.float32)} if kontext else {})}
                     for _ in range(n)]
        self.empty = (np.zeros((TOKENS, CFG.context_in_dim), np.float32), np.zeros(CFG.vec_in_dim, np.float32))

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int) -> dict:
        return dict(self.rows[i])

    def empty_caption(self):
        return self.empty


class Interrupted(Exception):
    pass


class StopAfter:
    """A data iterator that raises Interrupted when asked for batch n + 1 (a run killed after n steps),
    or hands out NaN latents from batch `nan_from` on. get_state/set_state pass through."""

    def __init__(self, it, n: int | None = None, nan_from: int | None = None):
        self.it, self.n, self.nan_from, self.taken = it, n, nan_from, 0

    def __next__(self):
        if self.n is not None and self.taken == self.n:
            raise Interrupted
        self.taken += 1
        batch = next(self.it)
        if self.nan_from is not None and self.taken >= self.nan_from:
            batch = {**batch, "latents": np.full_like(batch["latents"], np.nan)}
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)
