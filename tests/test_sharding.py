"""The mesh, the logical-axis table, and models/pipelines on 8 fake CPU devices vs one device.

Multi-device runs are subprocesses (tests/mesh_check.py): the device count is fixed when jax starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from flux_jax import sharding
from flux_jax.demo import demo_params

HERE = Path(__file__).parent
DEVICES = 8
# XLA:CPU's concurrency-optimised scheduler can order independent collectives differently on
# different fake devices and deadlock (seen with data=2,fsdp=2,tensor=2 on Kontext); real
# accelerators run one stream per device and do not need this.
CPU_FLAGS = f"--xla_force_host_platform_device_count={DEVICES} --xla_cpu_enable_concurrency_optimized_scheduler=false"
PARITY = 1e-5  # fp32: sharded vs single device, relative to the largest value
MESHES = {  # mesh -> what runs on it
    "data=8": "pipeline,models",
    "fsdp=8": "pipeline,models",
    "data=2,fsdp=2,tensor=2": "pipeline,cfg,kontext,models",
    "sequence=4,data=2": "pipeline,models",
}
ALL_STAGES = "pipeline,cfg,kontext,models"


# ---------------------------------------------------------------- in process

def test_parse_mesh_spec():
    assert sharding.parse_mesh_spec("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    assert sharding.parse_mesh_spec("fsdp=-1,tensor=2", 8)["fsdp"] == 4
    assert sharding.parse_mesh_spec(None, 3)["data"] == 3


@pytest.mark.parametrize("spec, message", [("data=3", "multiply to 8"), ("model=2", "axes from"),
                                           ("data=x", "not an integer"), ("data=-1,fsdp=-1", "only one"),
                                           ("data=0", ">= 1"), ("data=3,fsdp=-1", "not a multiple"),
                                           ("data=2,data=4", "twice")])
def test_bad_mesh_specs(spec, message):
    with pytest.raises(sharding.MeshError, match=message):
        sharding.parse_mesh_spec(spec, 8)


def test_logical_spec_uses_an_axis_once_and_only_where_it_divides():
    mesh = {"data": 2, "fsdp": 4, "tensor": 2, "sequence": 1}
    P = jax.sharding.PartitionSpec
    assert sharding.logical_spec(("batch", "length", None), (8, 10, 3), mesh) == P(("fsdp", "data"), None, None)
    assert sharding.logical_spec(("batch",), (4,), mesh) == P("fsdp")  # 8 does not divide 4: fsdp only
    assert sharding.logical_spec(("batch",), (1,), mesh) == P(None)
    assert sharding.logical_spec(("embed", "embed"), (8, 8), mesh) == P("fsdp", None)


@pytest.mark.parametrize("component", ["transformer", "text_encoder", "text_encoder_2"])
def test_every_large_param_has_logical_axes(component):
    """A param left out of PARAM_AXES would be silently replicated: every matrix must match a rule."""
    params, _ = demo_params("dev")[component]
    paths = jax.tree_util.tree_leaves(sharding.tree_paths(params))
    for path, leaf in zip(paths, jax.tree_util.tree_leaves(params)):
        if leaf.ndim >= 2 and not path.endswith(("scale", "bias")):  # norms: replicated, layer axis or not
            axes = sharding.param_axes(path, leaf.ndim)
            assert any(a is not None for a in axes), f"{path} {leaf.shape} matches no PARAM_AXES rule"
            assert "embed" in axes or path.endswith("relative_attention_bias"), (path, axes)


def test_rows_of_process_single_process():
    mesh = sharding.single_device_mesh()
    assert sharding.rows_of_process(mesh, 3) == [0, 1, 2]
    assert sharding.rows_of_process(mesh, 3, process=1) == []


# ---------------------------------------------------------------- 8 fake devices

def _run(spec: str, stages: str, out: Path) -> dict:
    env = {**os.environ, "XLA_FLAGS": CPU_FLAGS, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(HERE / "mesh_check.py"), spec, str(out), stages],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "single.npz"
    _run("single", ALL_STAGES, out)
    return dict(np.load(out))


@pytest.mark.parametrize("spec", list(MESHES))
def test_sharded_equals_single_device(spec, single, tmp_path):
    report = _run(spec, MESHES[spec], tmp_path / "out.npz")
    assert report["devices"] == DEVICES
    got = np.load(tmp_path / "out.npz")
    for name in MESHES[spec].split(","):
        keys = ["t5", "transformer"] if name == "models" else [name]
        for key in keys:
            want = single[key].astype(np.float64)
            assert got[key].shape == want.shape, key
            rel = np.abs(got[key] - want).max() / np.abs(want).max()
            assert rel <= PARITY, f"{spec} {key}: rel {rel:.2e}"
    if spec == "fsdp=8":  # every large param split 8 ways: each device holds 1/8
        assert report["fraction_transformer"] <= 1 / DEVICES + 1e-9
        assert report["fraction_t5"] <= 1 / DEVICES + 1e-9


def test_loading_onto_fsdp8_reads_only_slices(tmp_path):
    """safetensors: every host read of a large tensor is one device's 1/8 slice; Orbax: no whole
    host tensor is ever placed. Both layouts load the exact values, 1/8 of each param per device."""
    env = {**os.environ, "XLA_FLAGS": CPU_FLAGS, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(HERE / "load_check.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, r in report.items():
        assert r["equal"], case
        assert r["share"] <= 1 / DEVICES + 1e-9, case
        assert r["largest_read"] <= 1 / DEVICES + 1e-9, case
    assert report["safetensors_scan"]["largest_read"] > 0  # the watch saw the reads at all
