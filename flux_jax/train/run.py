"""The training loop: steps, checkpoints (Orbax CheckpointManager, exact resume), metrics, samples.

A run in OUT/ keeps checkpoints/ (the last N: state and the data iterator's position),
logs/ (TensorBoard event files) and samples/step_NNNNNN/ (PNGs from fixed prompts and seeds).
Started again with the same OUT/, it resumes from the latest checkpoint: the same batches, the
same noise and the same updates as a run that was never stopped (bit for bit on CPU).
A non-finite loss stops the run with TrainingError; no checkpoint is written after it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from .. import distributed
from .trainer import Trainer

CHECKPOINTS, LOGS, SAMPLES = "checkpoints", "logs", "samples"
# sampler(step, variables) -> {file stem: float image (H, W, 3) in [0, 1]}
Sampler = Callable[[int, dict], dict]


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): the message says where the last good checkpoint is."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 1000
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int = 0  # 0: samples only at the end (when a sampler is given)


class _Metrics:
    """Fetches each step's metrics one step late (the device runs ahead), stops on a non-finite loss."""

    def __init__(self, writer, bar, images_per_step: int, log_every: int, checkpoints: Callable[[], str]):
        self.writer, self.bar, self.images, self.log_every = writer, bar, images_per_step, log_every
        self.checkpoints = checkpoints
        self.pending: Optional[tuple[int, dict]] = None
        self.window: list[tuple[int, dict]] = []
        self.t0 = time.perf_counter()

    def push(self, step: int, metrics: dict) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        """Check (and log) the pending step's metrics: blocks until that step has run."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        values = {k: float(v) for k, v in metrics.items()}
        if not math.isfinite(values["loss"]):
            raise TrainingError(f"step {step}: the loss is {values['loss']}; stopping. {self.checkpoints()} "
                                "Lower --learning-rate, or raise --max-grad-norm clipping, then resume.")
        self.window.append((step, values))
        self.bar.update(1)
        if step % self.log_every == 0:
            self._log(step)

    def _log(self, step: int) -> None:
        dt = time.perf_counter() - self.t0
        n = len(self.window)
        mean = {k: float(np.mean([v[k] for _, v in self.window])) for k in self.window[-1][1]}
        mean.update({"steps_per_s": n / dt, "images_per_s": n * self.images / dt})
        if self.writer is not None:
            for k, v in mean.items():
                self.writer.add_scalar(f"train/{k}", v, step)
        self.bar.set_postfix(loss=f"{mean['loss']:.4f}", lr=f"{mean['lr']:.2e}", grad_norm=f"{mean['grad_norm']:.3f}",
                             steps_s=f"{mean['steps_per_s']:.2f}", img_s=f"{mean['images_per_s']:.1f}")
        self.window, self.t0 = [], time.perf_counter()


def checkpoint_manager(out: Path, run: RunConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=run.keep_checkpoints, create=True)
    return ocp.CheckpointManager((out / CHECKPOINTS).absolute(), options=options, item_names=("state", "data"))


def restore(mgr, trainer: Trainer, state: dict, data_iter) -> tuple[dict, int]:
    """(state, step) from the latest checkpoint, the data iterator moved to where it was; or (state, 0)."""
    import orbax.checkpoint as ocp

    step = mgr.latest_step()
    if step is None:
        return state, 0
    got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(trainer.abstract_state(state)),
                                                    data=ocp.args.JsonRestore()))
    data_iter.set_state(got["data"])
    return got["state"], step


def save_samples(out: Path, step: int, images: dict, writer) -> None:
    from PIL import Image

    folder = out / SAMPLES / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        tmp = folder / f".{name}.png.tmp"
        Image.fromarray(pixels).save(tmp, format="PNG")
        tmp.replace(folder / f"{name}.png")
        if writer is not None:
            writer.add_image(f"samples/{name}", pixels, step, dataformats="HWC")


def train(trainer: Trainer, state: dict, frozen: dict, data_iter, out: str | Path, run: RunConfig,
          sampler: Optional[Sampler] = None, images_per_step: int = 1, progress: bool = True) -> dict:
    """Run (or resume) training to run.steps; returns the final state. Checkpoints every
    run.checkpoint_every steps and at the end; samples every run.sample_every steps and at the end."""
    import orbax.checkpoint as ocp

    out = Path(out)
    mgr = checkpoint_manager(out, run)
    state, start = restore(mgr, trainer, state, data_iter)
    main = distributed.is_main()
    writer = None
    if main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(out / LOGS))
    bar = tqdm(total=run.steps, initial=start, desc="training", disable=not progress or not main)
    last_good = lambda: (f"The last good checkpoint is step {mgr.latest_step()} in {out / CHECKPOINTS}."
                         if mgr.latest_step() is not None else "No checkpoint was written.")
    metrics = _Metrics(writer, bar, images_per_step, run.log_every, last_good)
    try:
        for step in range(start + 1, run.steps + 1):
            state, m = trainer.step(state, frozen, next(data_iter))
            metrics.push(step, m)
            if step % run.checkpoint_every == 0 or step == run.steps:
                metrics.flush()  # never save a state whose loss was not finite
                mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=ocp.args.JsonSave(data_iter.get_state())))
            if sampler is not None and ((run.sample_every and step % run.sample_every == 0) or step == run.steps):
                images = sampler(step, trainer.trained_variables(state, frozen))
                if main:
                    save_samples(out, step, images, writer)
        metrics.flush()
    finally:
        mgr.wait_until_finished()
        bar.close()
        if writer is not None:
            writer.close()
    return state
