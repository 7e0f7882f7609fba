"""Conversion failure modes and the `python -m convert` CLI: clear errors, nothing left at DST."""
from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convert import convert_to_checkpoint, load_component
from convert.core import ConversionError, Reader
from convert.transformer import convert_transformer
from flux_jax.config import TINY
from torch_ref import diffusers_to_bfl, diffusers_transformer


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)], capture_output=True, text=True)


def test_truncated_file_fails_clearly(tmp_path, bfl_file):
    data = bfl_file.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        Reader(bad)
    res = run_cli(bad, tmp_path / "out")
    assert res.returncode == 2 and "truncated" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temp folder left behind"


def test_garbage_file_fails_clearly(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ConversionError, match="not a safetensors file|corrupt"):
        Reader(bad)


def test_missing_tensor_is_listed(tmp_path, tiny_state):
    sd = diffusers_to_bfl(tiny_state, TINY)
    del sd["single_blocks.1.linear2.weight"]
    save_file(sd, tmp_path / "missing.safetensors")
    with pytest.raises(ConversionError, match=r"single_blocks\.1\.linear2\.weight"):
        convert_transformer(tmp_path / "missing.safetensors", axes_dim=TINY.axes_dim)


def test_extra_and_misshaped_tensors_are_listed(tmp_path, tiny_state):
    sd = diffusers_to_bfl(tiny_state, TINY)
    sd["lora_unet_extra.weight"] = torch.zeros(3)
    sd["double_blocks.0.img_attn.proj.weight"] = torch.zeros(5, 5)
    save_file(sd, tmp_path / "odd.safetensors")
    with pytest.raises(ConversionError) as e:
        convert_transformer(tmp_path / "odd.safetensors", axes_dim=TINY.axes_dim)
    assert "lora_unet_extra.weight" in str(e.value) and "double_blocks/img_attn/proj/kernel" in str(e.value)


def test_file_of_another_model_fails(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "vae.safetensors")
    res = run_cli(tmp_path / "vae.safetensors", tmp_path / "out")
    assert res.returncode == 2 and "not a FLUX transformer" in res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_round_trip_keeps_bf16(tmp_path, tiny_state):
    model = diffusers_transformer(TINY, seed=5).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "transformer")
    res = run_cli(tmp_path / "transformer", tmp_path / "ckpt")
    assert res.returncode == 0, res.stderr
    params, cfg = load_component(tmp_path / "ckpt")
    assert cfg == TINY
    kernel = params["single_blocks"]["linear1"]["kernel"]
    assert kernel.dtype == ml_dtypes.bfloat16
    sd = diffusers_to_bfl(model.state_dict(), TINY)
    want = sd["single_blocks.1.linear1.weight"].float().numpy().T
    np.testing.assert_array_equal(kernel[1].astype(np.float32), want)
    meta = json.loads((tmp_path / "ckpt" / "flux_jax_config.json").read_text())
    assert meta["variant"] == "dev"
    assert run_cli(tmp_path / "transformer", tmp_path / "ckpt").returncode == 2  # exists: refuse
    # --dtype converts
    assert run_cli(tmp_path / "transformer", tmp_path / "ckpt32", "--dtype", "fp32").returncode == 0
    assert load_component(tmp_path / "ckpt32")[0]["img_in"]["kernel"].dtype == np.float32



def test_cli_quantize_keeps_values_and_casts_scales(tmp_path):
    """--quantize int4 with --dtype bf16: packed 4-bit values stay uint8, only float params are cast;
    the mode is in the config (loading reads it); a bad mode is one error line, nothing written."""
    model = diffusers_transformer(TINY, seed=5)
    model.save_pretrained(tmp_path / "transformer")
    res = run_cli(tmp_path / "transformer", tmp_path / "ckpt", "--quantize", "int4", "--dtype", "bf16")
    assert res.returncode == 0, res.stderr
    params, _ = load_component(tmp_path / "ckpt")
    kernel = params["single_blocks"]["linear1"]["kernel"]
    rows, cols = TINY.hidden_size, 3 * TINY.hidden_size + TINY.mlp_hidden
    assert kernel["int4"].dtype == np.uint8 and kernel["int4"].shape == (TINY.depth_single_blocks, rows // 2, cols)
    assert kernel["scale"].dtype == ml_dtypes.bfloat16 and params["img_in"]["kernel"].dtype == ml_dtypes.bfloat16
    assert json.loads((tmp_path / "ckpt" / "flux_jax_config.json").read_text())["quantize"] == "int4"
    res = run_cli(tmp_path / "transformer", tmp_path / "bad", "--quantize", "int3")
    assert res.returncode == 2 and "invalid choice: 'int3'" in res.stderr and not (tmp_path / "bad").exists()
