"""The train state and the one jitted, buffer-donating train step (full fine-tuning or LoRA).

State (a plain dict, what Orbax saves): step, trainable (float32 master weights: the
transformer's params, or the LoRA a/b), opt (optax AdamW state), ema (optional), rng.
Frozen inputs (never donated): the base params in the compute dtype for LoRA, and the LoRA
scales. The step computes in the compute dtype (bf16 on accelerators), the loss and the
optimizer in float32; gradient accumulation runs the micro-batches in a lax.scan inside the
step; the mesh shards it (batch over data/fsdp, params by the logical-axis rules: FSDP when the
fsdp axis is > 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from .. import sharding
from ..config import REMAT_CHOICES, FluxConfig
from ..layers import LORA, LORA_SCALE
from ..model import Flux
from .loss import LossConfig, draw, flow_loss

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"  # after warmup: constant, or cosine decay to 0 at the last step
    weight_decay: float = 1e-4  # AdamW, as diffusers' training scripts
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping; 0 turns it off
    grad_accum: int = 1  # micro-batches a step (the loader's batch is batch_size * grad_accum)
    ema_decay: float = 0.0  # 0: no EMA copy of the trained weights
    remat: str = "none"  # see FluxConfig.remat

    def __post_init__(self):
        problems = []
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.remat not in REMAT_CHOICES:
            problems.append(f"remat must be one of {REMAT_CHOICES}, got {self.remat!r}")
        if not self.learning_rate > 0:
            problems.append(f"learning rate must be > 0, got {self.learning_rate}")
        if self.grad_accum < 1 or self.warmup_steps < 0:
            problems.append("grad_accum must be >= 1 and warmup_steps >= 0")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if problems:
            raise ValueError("; ".join(problems))


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant or cosine decay to 0 at total_steps."""
    after = max(total_steps - cfg.warmup_steps, 1)
    main = (optax.constant_schedule(cfg.learning_rate) if cfg.schedule == "constant"
            else optax.cosine_decay_schedule(cfg.learning_rate, after))
    if cfg.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    return optax.chain(*clip, optax.adamw(lr_schedule(cfg, total_steps), cfg.b1, cfg.b2, cfg.eps,
                                          weight_decay=cfg.weight_decay))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


class Trainer:
    """Builds the state and the jitted step for one model and one way of training.

    model_cfg: the transformer's config (its scan_layers says the params' layout). dtype: the
    compute dtype. lora: None for full fine-tuning, else the LoRA variables from
    train.lora.init_lora (its "lora" part is trained, the base params stay frozen in `dtype`).
    """

    def __init__(self, model_cfg: FluxConfig, optim: OptimConfig, loss: LossConfig, total_steps: int,
                 dtype=jnp.bfloat16, mesh=None, lora: Optional[dict] = None):
        self.cfg = model_cfg.replace(remat=optim.remat)
        self.optim, self.loss_cfg, self.total_steps = optim, loss, total_steps
        self.dtype = jnp.dtype(dtype)
        self.mesh = sharding.single_device_mesh() if mesh is None else mesh
        self.model = Flux(self.cfg, self.dtype)
        self.tx = optimizer(optim, total_steps)
        self.schedule = lr_schedule(optim, total_steps)
        self.lora = lora
        self._step = None

    @property
    def is_lora(self) -> bool:
        return self.lora is not None

    # ------------------------------------------------------------------ state
    def init(self, params: dict, seed: int) -> tuple[dict, dict]:
        """(state, frozen) on the mesh from the base params (any dtype, on the mesh or on the host)."""
        # Copies: the step donates the state's buffers, and the caller's arrays must survive it.
        whole = lambda tree: jax.tree_util.tree_map(
            lambda a: sharding.put(jnp.array(a, jnp.float32, copy=True), sharding.replicated(self.mesh)), tree)
        if self.is_lora:
            frozen = {"params": sharding.put_params(self.mesh, _cast(params, self.dtype)),
                      LORA_SCALE: whole(self.lora[LORA_SCALE])}
            trainable = whole(self.lora[LORA])
        else:
            frozen = {}
            trainable = sharding.put_params(self.mesh, jax.tree_util.tree_map(
                lambda a: jnp.array(a, jnp.float32, copy=True), params))
        with jax.set_mesh(self.mesh):  # Adam's moments sharded as their params (FSDP shards them too)
            opt = jax.jit(self.tx.init, out_shardings=self._opt_shardings(trainable))(trainable)
        state = {"step": sharding.put(jnp.zeros((), jnp.int32), sharding.replicated(self.mesh)),
                 "trainable": trainable, "opt": opt,
                 "rng": sharding.put(jax.random.key_data(jax.random.PRNGKey(seed)), sharding.replicated(self.mesh))}
        if self.optim.ema_decay:
            state["ema"] = jax.tree_util.tree_map(jnp.copy, trainable)
        return state, frozen

    def _opt_shardings(self, trainable: dict):
        params = jax.tree_util.tree_map(lambda a: a.sharding, trainable)
        return optax.tree_map_params(self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, trainable), params,
                                     transform_non_params=lambda _: sharding.replicated(self.mesh))

    def variables(self, trainable: dict, frozen: dict) -> dict:
        """The model's variables in the compute dtype from trainable (masters) + frozen."""
        if self.is_lora:
            return {"params": frozen["params"], LORA: trainable, LORA_SCALE: frozen[LORA_SCALE]}
        return {"params": _cast(trainable, self.dtype)}

    # ------------------------------------------------------------------ the step
    def _loss(self, trainable, frozen, batch, key):
        noise, sigmas = draw(key, batch["latents"].shape, self.loss_cfg)
        return flow_loss(self.model, self.variables(trainable, frozen), batch, noise, sigmas, self.loss_cfg)

    def _train_step(self, state: dict, frozen: dict, batch: dict) -> tuple[dict, dict]:
        accum = self.optim.grad_accum
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        # (B·A, ...) -> (A, B, ...) taking every A-th row, so each device holds rows of every micro-batch.
        micro = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a.reshape(-1, accum, *a.shape[1:]), 0, 1), batch)
        grad_fn = jax.value_and_grad(self._loss)

        def one(carry, xs):
            loss, grads = grad_fn(state["trainable"], frozen, *xs)
            return (carry[0] + loss, jax.tree_util.tree_map(jnp.add, carry[1], grads)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["trainable"])
        (loss, grads), _ = jax.lax.scan(one, (jnp.zeros((), jnp.float32), zeros),
                                        (micro, jax.random.split(key, accum)))
        loss, grads = loss / accum, jax.tree_util.tree_map(lambda g: g / accum, grads)
        updates, opt = self.tx.update(grads, state["opt"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        new = {**state, "step": state["step"] + 1, "trainable": trainable, "opt": opt}
        if "ema" in state:
            d = self.optim.ema_decay
            new["ema"] = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state["ema"], trainable)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": self.schedule(state["step"])}
        return new, metrics

    def step(self, state: dict, frozen: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step (jitted once; `state` is donated: use the returned one)."""
        if self._step is None:
            shardings = jax.tree_util.tree_map(lambda a: a.sharding, state)
            self._step = jax.jit(self._train_step, donate_argnums=0,
                                 out_shardings=(shardings, sharding.replicated(self.mesh)))
        with jax.set_mesh(self.mesh):
            return self._step(state, frozen, self.put_batch(batch))

    def put_batch(self, batch: dict) -> dict:
        return {k: sharding.put_batch(self.mesh, v) for k, v in batch.items() if v is not None}

    def trained_variables(self, state: dict, frozen: dict, ema: bool = True) -> dict:
        """The model's variables after training (EMA weights when kept and ema=True)."""
        trainable = state["ema"] if ema and "ema" in state else state["trainable"]
        return self.variables(trainable, frozen)

    def abstract_state(self, state: dict) -> Any:
        """ShapeDtypeStructs with shardings: the restore target for Orbax."""
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
