"""Training-free step caching inside the one jitted denoising loop: First-Block Cache and TaylorSeer.

    pipe("a red fox", cache="fbcache:0.08")       # or "taylorseer:4:2"; --cache on sample and generate

Nearby denoising steps compute nearly the same transformer features. Both methods run the
expensive part of the model on some steps only and stand in for it on the others with what
earlier steps computed. Both always compute the first and the last step, decide inside the
compiled loop (one `lax.cond` between the full and the cached path: no host round trip, one
compilation per setting), carry their state in the loop, and count the steps they computed (the
pipelines report it as timings["steps_computed"]).

fbcache:THRESHOLD -- First-Block Cache (ParaAttention; diffusers' FirstBlockCache)
    Every step runs the embeddings and the first double block. Its image-stream residual
    r = output - input is compared with r_prev, the residual of the last *fully computed* step
    (as both references do, so a drift that builds up over skipped steps forces a full one):
    rel. L1 = mean|r - r_prev| / mean|r_prev|. Above THRESHOLD the rest of the model runs and the
    residual of the remaining blocks (image tokens after the last block minus after the first)
    is stored; otherwise the stored one is added to the first block's output. The final layer runs
    on every step. One decision per batch: the means run over every image of the batch and, with
    true CFG, over both branches (one batched forward), so they all compute or all reuse, as in
    diffusers. 0 computes every step; higher thresholds skip more (typical: 0.05 to 0.2).

taylorseer:INTERVAL[:ORDER] -- TaylorSeer (Liu et al. 2025, arXiv:2503.06923; diffusers' TaylorSeerCache)
    Steps 0..ORDER, every step i with i % INTERVAL == 0 and the last step run the whole model and
    keep the image tokens after the last block (the final layer's input). The other steps run
    no block at all: those tokens are extrapolated from the last ORDER + 1 full steps with
    divided differences in t (Newton form: exact for features polynomial in t up to degree
    ORDER), then the final layer runs at the step's own t. ORDER 1 (default) or 2; INTERVAL 1
    computes every step. Where we differ from diffusers, on purpose: it predicts every attention
    module's output (the MLPs still run), or in its lite mode the model's output, with Taylor terms
    from differences in the step index. We predict one feature, the final layer's input, so a
    predicted step runs no block and the timestep modulation of the final layer stays exact
    (memory: ORDER + 1 copies of the image tokens), in t, the model's timestep, whose spacing
    varies along FLUX's shifted schedule.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from .model import BLOCKS, FIRST_BLOCK

FBCACHE, TAYLORSEER = "fbcache", "taylorseer"
MAX_ORDER = 2
FORMS = (f"'{FBCACHE}:THRESHOLD' (a number >= 0, e.g. {FBCACHE}:0.08) or '{TAYLORSEER}:INTERVAL[:ORDER]' "
         f"(INTERVAL an integer >= 1, ORDER 1 or {MAX_ORDER}, e.g. {TAYLORSEER}:4:2)")
COUNT = "computed"  # the state's count of fully computed steps
# forward(img, t, start=..., stop=..., streams=...): the transformer on the step's other inputs (see Flux's stages).
Forward = Callable[..., Any]
Step = Callable[..., tuple]  # step(img, t, i, state) -> (model output, state)


class CacheError(ValueError):
    """A cache setting that is not one of FORMS."""


@dataclasses.dataclass(frozen=True)
class FirstBlockCache:
    """First-Block Cache: reuse the rest of the model while the first block's residual changes little."""
    threshold: float

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise CacheError(f"{FBCACHE} threshold must be a number >= 0, got {self.threshold!r}; use {FORMS}")

    def __str__(self) -> str:
        return f"{FBCACHE}:{self.threshold:g}"

    def initial_state(self, forward: Forward, img: jax.Array, t: jax.Array) -> dict:
        (_, (first, _)) = jax.eval_shape(lambda: forward(img, t, stop=FIRST_BLOCK))
        rest = (*first.shape[:1], img.shape[1], *first.shape[2:])  # the generated tokens only (no Kontext reference)
        return {COUNT: jnp.int32(0), "first": jnp.zeros(first.shape, jnp.float32),
                "rest": jnp.zeros(rest, jnp.float32)}

    def step(self, forward: Forward, img, t, i, last: int, state: dict):
        before, after = forward(img, t, stop=FIRST_BLOCK)  # the (img, txt) streams around the first block
        first = after[0].astype(jnp.float32) - before[0].astype(jnp.float32)  # its image-stream residual
        compute = always_computed(i, last) | (relative_l1(first, state["first"]) > self.threshold)
        head = after[0][:, :img.shape[1]]  # the generated image's tokens after the first block

        def full(state):
            tokens = forward(img, t, start=FIRST_BLOCK, stop=BLOCKS, streams=after)
            return tokens, {**state, "first": first, "rest": tokens.astype(jnp.float32) - head.astype(jnp.float32)}

        def reuse(state):
            return (head.astype(jnp.float32) + state["rest"]).astype(head.dtype), state

        tokens, state = jax.lax.cond(compute, full, reuse, state)
        return forward(img, t, start=BLOCKS, streams=tokens), counted(state, compute)


@dataclasses.dataclass(frozen=True)
class TaylorSeer:
    """TaylorSeer: full steps every `interval`, the final layer's input extrapolated in t between them."""
    interval: int
    order: int = 1

    def __post_init__(self):
        for name, low, high in (("interval", 1, None), ("order", 1, MAX_ORDER)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low \
                    or (high and value > high):
                raise CacheError(f"{TAYLORSEER} {name} must be an integer from {low}{f' to {high}' if high else ''}, "
                                 f"got {value!r}; use {FORMS}")

    def __str__(self) -> str:
        return f"{TAYLORSEER}:{self.interval}:{self.order}"

    def computes(self, i, last: int):
        """Whether step i runs the whole model (a bool array: i may be traced)."""
        return always_computed(i, last) | (i <= self.order) | (i % self.interval == 0)

    def initial_state(self, forward: Forward, img: jax.Array, t: jax.Array) -> dict:
        tokens = jax.eval_shape(lambda: forward(img, t, stop=BLOCKS))
        points = self.order + 1
        return {COUNT: jnp.int32(0), "differences": jnp.zeros((points, *tokens.shape), jnp.float32),
                "times": jnp.zeros((points,), jnp.float32), "updates": jnp.int32(0)}

    def step(self, forward: Forward, img, t, i, last: int, state: dict):
        time = t[0].astype(jnp.float32)  # one timestep for the whole batch
        compute = self.computes(i, last)
        dtype = jax.eval_shape(lambda: forward(img, t, stop=BLOCKS)).dtype

        def full(state):
            tokens = forward(img, t, stop=BLOCKS)
            differences, times = newton_update(state["differences"], state["times"], state["updates"],
                                               tokens.astype(jnp.float32), time)
            return tokens, {**state, "differences": differences, "times": times, "updates": state["updates"] + 1}

        def predict(state):
            return newton_extrapolate(state["differences"], state["times"], time).astype(dtype), state

        tokens, state = jax.lax.cond(compute, full, predict, state)
        return forward(img, t, start=BLOCKS, streams=tokens), counted(state, compute)


StepCache = Union[FirstBlockCache, TaylorSeer]


def parse_cache(spec: Union[str, StepCache, None]) -> Optional[StepCache]:
    """A cache setting of FORMS (or a config already, or None: no caching) -> its config; CacheError if not."""
    if spec is None or isinstance(spec, (FirstBlockCache, TaylorSeer)):
        return spec
    if not isinstance(spec, str):
        raise CacheError(f"cache must be a string such as {FORMS}, got {type(spec).__name__}")
    name, *args = spec.strip().lower().split(":")
    try:
        if name == FBCACHE and len(args) == 1:
            return FirstBlockCache(float(args[0]))
        if name == TAYLORSEER and len(args) in (1, 2):
            return TaylorSeer(*(int(a) for a in args))
    except CacheError:
        raise
    except ValueError:  # not a number
        pass
    raise CacheError(f"unknown cache setting {spec!r}: use {FORMS}")


def cached_model(cache: StepCache, forward: Forward, img: jax.Array, t: jax.Array,
                 num_steps: int) -> tuple[Step, dict]:
    """(step, initial state) for a sampling loop of num_steps: step(img, t, i, state) -> (model output, state).

    img, t: the model's inputs of a step (for shapes); carry the state from step to step (see
    sampling.denoise's `state`) and read steps_computed(state) at the end.
    """
    last = num_steps - 1
    return (lambda img, t, i, state: cache.step(forward, img, t, i, last, state)), \
        cache.initial_state(forward, img, t)


def steps_computed(state: dict) -> jax.Array:
    return state[COUNT]


def always_computed(i, last: int):
    """The first and the last step always run the whole model: the start fixes the picture's layout,
    the end its details, and nothing before the first step can stand in for it."""
    return (i == 0) | (i == last)


def counted(state: dict, compute) -> dict:
    return {**state, COUNT: state[COUNT] + compute.astype(jnp.int32)}


def relative_l1(x: jax.Array, reference: jax.Array) -> jax.Array:
    """mean|x - reference| / mean|reference| over everything (infinite for a zero reference)."""
    change = jnp.mean(jnp.abs(x - reference))
    size = jnp.mean(jnp.abs(reference))
    return jnp.where(size > 0, change / jnp.where(size > 0, size, 1), jnp.inf)


def newton_update(differences: jax.Array, times: jax.Array, updates, value: jax.Array, time):
    """(differences, times) of the newest points after adding (time, value), newest first.

    differences[k] is the divided difference f[t_0, ..., t_k] over the newest k + 1 times; those
    that need more points than the `updates` seen so far (plus this one) are zero.
    """
    new = [value]
    for k in range(1, differences.shape[0]):
        known = updates >= k
        span = jnp.where(known, time - times[k - 1], 1)
        new.append(jnp.where(known, (new[k - 1] - differences[k - 1]) / span, 0))
    return jnp.stack(new), jnp.concatenate([time[None], times[:-1]])


def newton_extrapolate(differences: jax.Array, times: jax.Array, time) -> jax.Array:
    """The Newton polynomial through the stored points at `time`: sum_k f[t_0..t_k] prod_{j<k} (time - t_j)."""
    value, factor = differences[0], 1.0
    for k in range(1, differences.shape[0]):
        factor = factor * (time - times[k - 1])
        value = value + factor * differences[k]
    return value
