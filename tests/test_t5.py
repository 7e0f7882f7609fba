"""T5 v1.1 encoder: converter + Flax model against transformers' T5EncoderModel (random weights, no mask)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from convert.core import ConversionError, load_checkpoint, save_checkpoint
from convert.text_encoders import T5_EMBEDS, convert_t5
from flux_jax.config import T5Config
from flux_jax.t5 import T5Encoder, relative_position_buckets
from torch_ref import perturb_constants_, rel_err

FP32_TOL = 1e-5
BF16_TOL = 2e-2
PAD_ID = 0
TINY = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3)
TINY_SHARD = "8KB"  # forces a sharded checkpoint with an index json
# Longer than relative_attention_max_distance (128), so the clamped far buckets are exercised.
TINY_LENGTH = 160


def make_t5(folder, seed: int = 0, shard: str = TINY_SHARD, **sizes) -> T5EncoderModel:
    """A random, perturbed v1.1 T5EncoderModel saved to `folder`, sharded."""
    torch.manual_seed(seed)
    model = T5EncoderModel(HFT5Config(**sizes, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    perturb_constants_(model)
    model.save_pretrained(folder, max_shard_size=shard)
    assert list(folder.glob("*.safetensors.index.json")), "expected a sharded checkpoint"
    return model


def token_ids(vocab: int, length: int, lengths: list[int], seed: int = 0) -> np.ndarray:
    """Random rows padded with PAD_ID after each row's length (max_length padding, no mask)."""
    ids = np.random.default_rng(seed).integers(PAD_ID + 1, vocab, size=(len(lengths), length))
    for row, n in zip(ids, lengths):
        row[n:] = PAD_ID
    return ids


def torch_t5(model: T5EncoderModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).last_hidden_state.numpy()


def jax_t5(params: dict, cfg: T5Config, ids: np.ndarray, param_dtype=jnp.float32) -> np.ndarray:
    out = jax.jit(T5Encoder(cfg, param_dtype=param_dtype).apply)({"params": params}, jnp.asarray(ids))
    return np.asarray(out.astype(jnp.float32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_tiny")
    return make_t5(folder, **TINY), folder


@pytest.fixture(scope="module")
def tiny_ids():
    return token_ids(TINY["vocab_size"], TINY_LENGTH, [TINY_LENGTH, 20])


@pytest.mark.parametrize("length,buckets,max_distance", [(600, 32, 128), (50, 8, 20)])
def test_buckets_match_transformers(length, buckets, max_distance):
    pos = torch.arange(length)
    ref = T5Attention._relative_position_bucket(pos[None, :] - pos[:, None], True, buckets, max_distance)
    np.testing.assert_array_equal(relative_position_buckets(length, buckets, max_distance), ref.numpy())


def test_fp32_parity(tiny, tiny_ids):
    model, folder = tiny
    params, cfg = convert_t5(folder)
    assert cfg.num_layers == TINY["num_layers"]
    assert params["layers"]["wi"]["kernel"].shape == (3, 32, 96)  # stacked layers, fused wi_0 and wi_1
    assert rel_err(jax_t5(params, cfg, tiny_ids), torch_t5(model, tiny_ids)) <= FP32_TOL


def test_bf16_params(tiny, tiny_ids):
    model, folder = tiny
    params, cfg = convert_t5(folder, dtype=ml_dtypes.bfloat16)
    assert params["layers"]["qkv"]["kernel"].dtype == ml_dtypes.bfloat16
    assert rel_err(jax_t5(params, cfg, tiny_ids, jnp.bfloat16), torch_t5(model, tiny_ids)) <= BF16_TOL


def _rewrite(folder, edit) -> None:
    """Apply edit(tensors) to every shard of the checkpoint in `folder`, in place."""
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard)


def test_embed_tokens_name(tiny, tiny_ids, tmp_path):
    """Files may name the tied token table encoder.embed_tokens (alone or beside shared)."""
    model, folder = tiny
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())

    def rename(tensors):
        if T5_EMBEDS[0] in tensors:
            tensors[T5_EMBEDS[1]] = tensors.pop(T5_EMBEDS[0])
    _rewrite(tmp_path, rename)
    params, cfg = convert_t5(tmp_path)
    assert rel_err(jax_t5(params, cfg, tiny_ids), torch_t5(model, tiny_ids)) <= FP32_TOL


def test_checkpoint_round_trip(tiny, tmp_path):
    params, cfg = convert_t5(tiny[1])
    save_checkpoint(tmp_path / "t5", params, cfg.to_dict())
    loaded, config = load_checkpoint(tmp_path / "t5", stacked=True)
    assert T5Config.from_dict(config) == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_wrong_tensors_are_listed(tiny, tmp_path):
    _, folder = tiny
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    missing, foreign = "encoder.block.2.layer.1.DenseReluDense.wo.weight", "text_model.final_layer_norm.weight"

    def edit(tensors):
        tensors.pop(missing, None)
        tensors[foreign] = np.ones(4, np.float32)  # e.g. CLIP weights beside a T5 config
    _rewrite(tmp_path, edit)
    with pytest.raises(ConversionError) as err:
        convert_t5(tmp_path)
    assert missing in str(err.value) and foreign in str(err.value)


def test_t5_v1_0_is_refused(tiny, tmp_path):
    config = json.loads((tiny[1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "relu"}))
    with pytest.raises(ConversionError, match="gated-gelu"):
        convert_t5(tmp_path)


@pytest.mark.slow
def test_real_width_layer(tmp_path):
    """One T5-XXL layer at full width (4096, 64 heads x 64, d_ff 10240)."""
    sizes = dict(vocab_size=256, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=1)
    model = make_t5(tmp_path, seed=1, shard="300MB", **sizes)
    params, cfg = convert_t5(tmp_path)
    ids = token_ids(sizes["vocab_size"], 128, [128, 30])
    assert rel_err(jax_t5(params, cfg, ids), torch_t5(model, ids)) <= FP32_TOL
