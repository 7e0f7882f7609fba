"""The train step and loop: learning, exact resume, NaN stop, EMA, FSDP on 8 fake devices = 1 device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax.train.data import make_iterator
from flux_jax.train.loss import LossConfig
from flux_jax.train.lora import init_lora
from flux_jax.train.run import CHECKPOINTS, LOGS, RunConfig, TrainingError, train
from flux_jax.train.trainer import OptimConfig, Trainer, lr_schedule
from train_fixtures import CFG, Interrupted, MemoryCache, StopAfter, tiny_params

HERE = Path(__file__).resolve().parent
STEPS = 6
BATCH = 4
OPTIM = OptimConfig(learning_rate=3e-3, warmup_steps=2, schedule="cosine", grad_accum=2, ema_decay=0.9)
RUN = RunConfig(steps=STEPS, checkpoint_every=2, keep_checkpoints=2, log_every=1)
CPU_FLAGS = "--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false"


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module", params=["full", "lora"])
def trainer(request, params):
    lora = init_lora(params, CFG, rank=4, alpha=8.0, seed=1) if request.param == "lora" else None
    return Trainer(CFG, OPTIM, LossConfig(), STEPS, dtype=jnp.float32, lora=lora)


def _run(trainer, params, out, stop_after=None, nan_from=None):
    state, frozen = trainer.init(params, seed=0)
    data = StopAfter(make_iterator(MemoryCache(), BATCH * OPTIM.grad_accum, seed=0, caption_dropout=0.25),
                     stop_after, nan_from)
    return train(trainer, state, frozen, data, out, RUN, progress=False), frozen


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def test_resumed_run_equals_uninterrupted_bit_for_bit(trainer, params, tmp_path):
    whole, _ = _run(trainer, params, tmp_path / "a")
    with pytest.raises(Interrupted):
        _run(trainer, params, tmp_path / "b", stop_after=STEPS - 1)  # killed after step 5: checkpoint 4 kept
    assert sorted(int(p.name) for p in (tmp_path / "b" / CHECKPOINTS).iterdir() if p.name.isdigit()) == [2, 4]
    resumed, _ = _run(trainer, params, tmp_path / "b")
    a, b = _host(whole), _host(resumed)
    assert int(b["step"]) == STEPS and set(a) == set(b) == {"step", "trainable", "opt", "ema", "rng"}
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert np.array_equal(x, y), jax.tree_util.keystr(path)
    # and training did something: the weights moved from where they started
    start, _ = trainer.init(params, seed=0)
    moved = [not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(_host(start["trainable"])),
                                                      jax.tree_util.tree_leaves(a["trainable"]))]
    assert sum(moved) >= len(moved) // 2
    # TensorBoard event files were written for each run
    assert list((tmp_path / "a" / LOGS).glob("events.out.tfevents.*"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trainer, params, tmp_path):
    with pytest.raises(TrainingError, match=r"step 3: the loss is nan.*last good checkpoint is step 2"):
        _run(trainer, params, tmp_path, nan_from=3)
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.isdigit()) == ["2"]


def test_lr_schedule_warmup_then_cosine():
    s = lr_schedule(OptimConfig(learning_rate=1.0, warmup_steps=4, schedule="cosine"), 12)
    assert [float(s(i)) for i in (0, 2, 4)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(s(8)) == pytest.approx(0.5) and float(s(12)) == pytest.approx(0.0)
    c = lr_schedule(OptimConfig(learning_rate=2e-4), 100)
    assert float(c(0)) == float(c(99)) == pytest.approx(2e-4)


def test_bad_settings_are_refused(params):
    with pytest.raises(ValueError, match="schedule must be one of"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="remat must be one of"):
        OptimConfig(remat="some")
    with pytest.raises(ValueError, match="match no Linear layer"):
        init_lora(params, CFG, rank=4, targets="nothing_like_this")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp_on_8_devices_equals_one_device(tmp_path, mode):
    env = {**os.environ, "XLA_FLAGS": CPU_FLAGS, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(HERE / "fsdp_check.py"), mode], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["rel"] <= 1e-5, result  # relative L2 over all trained weights
    assert result["worst_leaf_rel"] <= 5e-5, result
    assert result["moved"], "three steps changed nothing: the comparison would be vacuous"
    if mode == "full":  # FSDP: every large param and its Adam moments split 8 ways
        assert result["largest_shard_fraction"] == pytest.approx(1 / 8)
