"""CLIP text encoder: converter + Flax model against transformers' CLIPTextModel (random weights)."""
from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from convert.core import ConversionError, load_checkpoint, save_checkpoint
from convert.text_encoders import CLIP_PREFIX, convert_clip, convert_t5
from flux_jax.clip import LEGACY_EOS_ID, CLIPTextEncoder
from flux_jax.config import CLIPConfig
from torch_ref import perturb_constants_, rel_err

FP32_TOL = 1e-5
BF16_TOL = 2e-2
WEIGHTS = "model.safetensors"
TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=16)
TINY_EOS = 99  # legacy configs: end-of-text is the largest id of the vocabulary
NEW_EOS = 7  # a non-legacy eos id below most token ids, so "largest id" would pool elsewhere


def make_clip(folder, eos_token_id: int, seed: int = 0, **sizes) -> CLIPTextModel:
    """A random, perturbed CLIPTextModel saved to `folder` (safetensors)."""
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**sizes, eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1)).eval()
    perturb_constants_(model)
    model.save_pretrained(folder)
    return model


def token_ids(vocab: int, length: int, eos_positions: list[int], eos: int, seed: int = 0) -> np.ndarray:
    """Rows of random tokens, each ended by eos at its position and padded with eos (as FLUX's tokenizer)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(NEW_EOS + 1, vocab - 1, size=(len(eos_positions), length))
    for row, pos in zip(ids, eos_positions):
        row[pos:] = eos
    return ids


def torch_clip(model: CLIPTextModel, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(ids))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def jax_clip(params: dict, cfg: CLIPConfig, ids: np.ndarray, param_dtype=jnp.float32):
    model = CLIPTextEncoder(cfg, param_dtype=param_dtype)
    hidden, pooled = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    return np.asarray(hidden.astype(jnp.float32)), np.asarray(pooled.astype(jnp.float32))


def assert_parity(params, cfg, model, ids, tol=FP32_TOL, param_dtype=jnp.float32) -> None:
    hidden, pooled = jax_clip(params, cfg, ids, param_dtype)
    ref_hidden, ref_pooled = torch_clip(model, ids)
    assert rel_err(hidden, ref_hidden) <= tol
    assert rel_err(pooled, ref_pooled) <= tol


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """(torch model, folder) of a tiny CLIP with the legacy eos_token_id 2, as FLUX's config has."""
    folder = tmp_path_factory.mktemp("clip_legacy")
    return make_clip(folder, LEGACY_EOS_ID, **TINY), folder


@pytest.mark.parametrize("length", [TINY["max_position_embeddings"], 10])
def test_legacy_eos_parity(legacy, length):
    model, folder = legacy
    params, cfg = convert_clip(folder)
    assert cfg.eos_token_id == LEGACY_EOS_ID and cfg.num_layers == TINY["num_hidden_layers"]
    assert params["layers"]["qkv"]["kernel"].shape == (3, 32, 96)  # stacked layers, fused q, k, v
    assert_parity(params, cfg, model, token_ids(TINY["vocab_size"], length, [3, length - 1, 1], TINY_EOS))


def test_new_eos_pools_first_eos(tmp_path):
    model = make_clip(tmp_path, NEW_EOS, seed=1, **TINY)
    params, cfg = convert_clip(tmp_path)
    ids = token_ids(TINY["vocab_size"], 12, [2, 11, 5], NEW_EOS)
    assert_parity(params, cfg, model, ids)
    # The rule matters: pooling at the largest id would pick another position here.
    _, pooled = jax_clip(params, cfg, ids)
    hidden, _ = torch_clip(model, ids)
    assert rel_err(pooled, hidden[np.arange(3), ids.argmax(-1)]) > 0.1


def test_bf16_params(legacy):
    model, folder = legacy
    params, cfg = convert_clip(folder, dtype=ml_dtypes.bfloat16)
    assert params["layers"]["fc1"]["kernel"].dtype == ml_dtypes.bfloat16
    ids = token_ids(TINY["vocab_size"], 16, [4, 15], TINY_EOS)
    assert_parity(params, cfg, model, ids, tol=BF16_TOL, param_dtype=jnp.bfloat16)


def test_transformers4_layout(legacy, tmp_path):
    """FLUX's files nest keys under text_model. and may carry the position_ids buffer."""
    model, folder = legacy
    shutil.copy(folder / "config.json", tmp_path)
    tensors = {CLIP_PREFIX + k: v for k, v in load_file(folder / WEIGHTS).items()}
    tensors[CLIP_PREFIX + "embeddings.position_ids"] = np.arange(TINY["max_position_embeddings"])[None]
    save_file(tensors, tmp_path / WEIGHTS)
    params, cfg = convert_clip(tmp_path)
    assert_parity(params, cfg, model, token_ids(TINY["vocab_size"], 16, [6], TINY_EOS))


def test_checkpoint_round_trip(legacy, tmp_path):
    model, folder = legacy
    params, cfg = convert_clip(folder)
    save_checkpoint(tmp_path / "clip", params, cfg.to_dict())
    loaded, config = load_checkpoint(tmp_path / "clip", stacked=True)
    assert CLIPConfig.from_dict(config) == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_missing_and_extra_tensors_are_listed(legacy, tmp_path):
    _, folder = legacy
    shutil.copy(folder / "config.json", tmp_path)
    tensors = load_file(folder / WEIGHTS)
    del tensors["encoder.layers.1.mlp.fc2.bias"]
    tensors["text_projection.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, tmp_path / WEIGHTS)
    with pytest.raises(ConversionError) as err:
        convert_clip(tmp_path)
    assert "encoder.layers.1.mlp.fc2.bias" in str(err.value)
    assert "text_projection.weight" in str(err.value)


def test_clip_folder_is_not_t5(legacy):
    with pytest.raises(ConversionError, match="clip_text_model"):
        convert_t5(legacy[1])


@pytest.mark.slow
def test_real_width_layer(tmp_path):
    """One CLIP-L layer at full width over the full 77 positions."""
    sizes = dict(vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                 num_attention_heads=12, max_position_embeddings=77)
    model = make_clip(tmp_path, LEGACY_EOS_ID, seed=2, **sizes)
    params, cfg = convert_clip(tmp_path)
    assert_parity(params, cfg, model, token_ids(1000, 77, [20, 76], 999))
