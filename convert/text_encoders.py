"""Text encoder weights -> our param trees: CLIP-L (`text_encoder/`) and T5 v1.1 (`text_encoder_2/`).

Both read a transformers model folder (config.json + safetensors, sharded or not), as found in
a diffusers FLUX folder. q, k, v are fused into one kernel, and so are T5's two FFN inputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flux_jax.clip import CLIPTextEncoder
from flux_jax.config import CLIPConfig, T5Config
from flux_jax.t5 import T5Encoder
from .core import ConversionError, Plan, Reader, Rule, convert

HF_CONFIG = "config.json"
CLIP_PREFIX = "text_model."  # transformers 4.x files (FLUX's) nest CLIPTextModel under it; 5.x does not
CLIP_BUFFERS = ("embeddings.position_ids",)  # a non-weight buffer some older files include
CLIP_ACT = "quick_gelu"
T5_FFN = "gated-gelu"  # v1.1; v1.0's ReLU FFN is not supported
T5_EMBEDS = ("shared.weight", "encoder.embed_tokens.weight")  # tied: files hold either or both
T5_BIAS_TABLE = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
# transformers config.json key -> our config field
CLIP_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
               "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
               "num_attention_heads": "num_heads", "max_position_embeddings": "max_positions",
               "layer_norm_eps": "layer_norm_eps", "eos_token_id": "eos_token_id"}
T5_FIELDS = {"vocab_size": "vocab_size", "d_model": "d_model", "d_kv": "d_kv", "num_heads": "num_heads",
             "d_ff": "d_ff", "num_layers": "num_layers",
             "relative_attention_num_buckets": "relative_attention_num_buckets",
             "relative_attention_max_distance": "relative_attention_max_distance",
             "layer_norm_epsilon": "layer_norm_eps"}


def _fused_bias(*bs: np.ndarray) -> np.ndarray:
    """Biases concatenated along outputs; a single one comes back as is (a lazy file view stays lazy)."""
    return bs[0] if len(bs) == 1 else np.concatenate(bs, axis=0)


def _fused_kernel(*ws: np.ndarray) -> np.ndarray:
    """torch Linears (out, in), stacked along outputs -> one Flax kernel (in, sum of outs)."""
    return _fused_bias(*ws).T


def _linear(dst: str, srcs: list[str], layer: int | None = None, bias: bool = True) -> list[Rule]:
    """Rules for one of our Linears from one or more torch Linears (fused along outputs)."""
    rules = [Rule(f"{dst}/kernel", tuple(f"{s}.weight" for s in srcs), _fused_kernel, layer)]
    if bias:
        rules.append(Rule(f"{dst}/bias", tuple(f"{s}.bias" for s in srcs), _fused_bias, layer))
    return rules


def _layer_norm(dst: str, src: str, layer: int | None = None) -> list[Rule]:
    return [Rule(f"{dst}/scale", (f"{src}.weight",), layer=layer), Rule(f"{dst}/bias", (f"{src}.bias",), layer=layer)]


def clip_rules(cfg: CLIPConfig, prefix: str = CLIP_PREFIX) -> list[Rule]:
    """transformers CLIPTextModel tensors (keys under `prefix`) -> CLIPTextEncoder params."""
    emb = f"{prefix}embeddings"
    rules = [Rule("token_embedding", (f"{emb}.token_embedding.weight",)),
             Rule("position_embedding", (f"{emb}.position_embedding.weight",))]
    for i in range(cfg.num_layers):
        src = f"{prefix}encoder.layers.{i}"
        rules += _layer_norm("layers/layer_norm1", f"{src}.layer_norm1", i)
        rules += _linear("layers/qkv", [f"{src}.self_attn.{n}_proj" for n in "qkv"], i)
        rules += _linear("layers/out_proj", [f"{src}.self_attn.out_proj"], i)
        rules += _layer_norm("layers/layer_norm2", f"{src}.layer_norm2", i)
        rules += _linear("layers/fc1", [f"{src}.mlp.fc1"], i)
        rules += _linear("layers/fc2", [f"{src}.mlp.fc2"], i)
    return rules + _layer_norm("final_layer_norm", f"{prefix}final_layer_norm")


def t5_rules(cfg: T5Config, embed_key: str = T5_EMBEDS[0]) -> list[Rule]:
    """transformers T5EncoderModel tensors -> T5Encoder params (token table read from `embed_key`)."""
    rules = [Rule("embed_tokens", (embed_key,)), Rule("relative_attention_bias", (T5_BIAS_TABLE,))]
    for i in range(cfg.num_layers):
        attn, ffn = f"encoder.block.{i}.layer.0", f"encoder.block.{i}.layer.1"
        rules.append(Rule("layers/attn_norm/scale", (f"{attn}.layer_norm.weight",), layer=i))
        rules += _linear("layers/qkv", [f"{attn}.SelfAttention.{n}" for n in "qkv"], i, bias=False)
        rules += _linear("layers/o", [f"{attn}.SelfAttention.o"], i, bias=False)
        rules.append(Rule("layers/ffn_norm/scale", (f"{ffn}.layer_norm.weight",), layer=i))
        rules += _linear("layers/wi", [f"{ffn}.DenseReluDense.wi_0", f"{ffn}.DenseReluDense.wi_1"], i, bias=False)
        rules += _linear("layers/wo", [f"{ffn}.DenseReluDense.wo"], i, bias=False)
    return rules + [Rule("final_norm/scale", ("encoder.final_layer_norm.weight",))]


def _check_model_type(d: dict, expected: str) -> None:
    got = d.get("model_type")
    if got is not None and got != expected:
        raise ConversionError(f"config.json describes a {got!r} model, expected {expected!r}")


def _fields(d: dict, names: dict[str, str]) -> dict:
    """Our config kwargs from a transformers config dict; absent keys keep our (FLUX) defaults."""
    return {ours: d[theirs] for theirs, ours in names.items() if theirs in d}


def clip_config_from_hf(d: dict) -> CLIPConfig:
    """CLIPConfig from the config.json of a transformers CLIPTextModel."""
    _check_model_type(d, "clip_text_model")
    if d.get("hidden_act", CLIP_ACT) != CLIP_ACT:
        raise ConversionError(f"CLIP hidden_act {d['hidden_act']!r} is not supported (only {CLIP_ACT!r})")
    return CLIPConfig(**_fields(d, CLIP_FIELDS))


def t5_config_from_hf(d: dict) -> T5Config:
    """T5Config from the config.json of a transformers T5EncoderModel (v1.1 only)."""
    _check_model_type(d, "t5")
    if d.get("feed_forward_proj") != T5_FFN:
        raise ConversionError(f"T5 feed_forward_proj {d.get('feed_forward_proj')!r} is not supported: "
                              f"only v1.1 ({T5_FFN!r})")
    return T5Config(**_fields(d, T5_FIELDS))


def _read_hf_config(folder: str | Path) -> dict:
    path = Path(folder) / HF_CONFIG
    if not path.is_file():
        raise ConversionError(f"{folder}: no {HF_CONFIG}; expected a transformers model folder "
                              "(text_encoder/ or text_encoder_2/ of a diffusers FLUX folder)")
    return json.loads(path.read_text())


def _param_shapes(model) -> dict:
    """Param tree of ShapeDtypeStructs, without allocating anything."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def plan_clip(src_folder: str | Path) -> Plan:
    """What converting a transformers CLIPTextModel folder takes."""
    cfg = clip_config_from_hf(_read_hf_config(src_folder))
    reader = Reader(src_folder)
    prefix = CLIP_PREFIX if any(k.startswith(CLIP_PREFIX) for k in reader.keys()) else ""
    return Plan(reader, clip_rules(cfg, prefix), _param_shapes(CLIPTextEncoder(cfg)), cfg,
                ignore=[prefix + b for b in CLIP_BUFFERS])


def plan_t5(src_folder: str | Path) -> Plan:
    """What converting a transformers T5EncoderModel folder takes."""
    cfg = t5_config_from_hf(_read_hf_config(src_folder))
    reader = Reader(src_folder)
    present = [k for k in T5_EMBEDS if k in reader]
    embed_key = present[0] if present else T5_EMBEDS[0]  # none present: the check reports it missing
    return Plan(reader, t5_rules(cfg, embed_key), _param_shapes(T5Encoder(cfg)), cfg, ignore=present[1:])


def _run(plan: Plan, dtype, progress: bool) -> tuple[dict, object]:
    return convert(plan.reader, plan.rules, plan.target, dtype, plan.ignore, progress), plan.config


def convert_clip(src_folder: str | Path, dtype=None, progress: bool = False) -> tuple[dict, CLIPConfig]:
    """(numpy param tree, config) from a transformers CLIPTextModel folder; dtype None keeps the file's."""
    return _run(plan_clip(src_folder), dtype, progress)


def convert_t5(src_folder: str | Path, dtype=None, progress: bool = False) -> tuple[dict, T5Config]:
    """(numpy param tree, config) from a transformers T5EncoderModel folder; dtype None keeps the file's."""
    return _run(plan_t5(src_folder), dtype, progress)
