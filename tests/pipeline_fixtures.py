"""Random-weight FLUX pipeline folders in diffusers' layout, for end-to-end tests without downloads.

`make_flux_folder` writes what a FLUX.1 repo holds (model_index.json, scheduler/, tokenizer/,
tokenizer_2/, text_encoder/, text_encoder_2/, transformer/, vae/) with the TINY sizes of
flux_jax.config, every torch weight perturbed so each one matters. Like the real repos,
transformer/ and text_encoder_2/ are sharded with an index json; everything is float32.
`cached_flux_folder` builds each variant once per process.
"""
from __future__ import annotations

import atexit
import functools
import io
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from flux_jax.config import PRESETS, TINY, TINY_CLIP, TINY_T5, TINY_VAE
from flux_jax.tokenizers import (CORPUS, T5_EOS, T5_PAD, T5_SPECIALS, T5_UNK, write_clip_tokenizer,
                                 write_t5_tokenizer)
from torch_ref import diffusers_transformer, perturb_

PIPELINE_CLASSES = {"dev": "FluxPipeline", "schnell": "FluxPipeline", "fill": "FluxFillPipeline",
                    "kontext": "FluxKontextPipeline"}  # model_index.json's _class_name
VARIANTS = tuple(PIPELINE_CLASSES)
# scheduler/scheduler_config.json of the published repos (Fill and Kontext use dev's).
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
SCHEDULERS = {"dev": DEV_SCHEDULER, "fill": DEV_SCHEDULER, "kontext": DEV_SCHEDULER,
              "schnell": {**DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}}
# Shard counts of the published FLUX.1-dev folders (the other models there are single files). Shards
# are filled greedily tensor by tensor, so a tiny model may get one more.
SHARDS = {"transformer": 3, "text_encoder_2": 2}
VAE_SAMPLE_SIZE = 1024  # as the real vae/config.json; only the tiling heuristics read it
# Legacy ids of FLUX's text_encoder/config.json: eos_token_id 2 makes CLIPTextModel pool at the
# argmax token id (our tokenizer puts eos last), not at the first id equal to eos_token_id.
CLIP_CONFIG_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=TINY_CLIP.eos_token_id)
T5_CONFIG_IDS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# transformers 5 always writes tie_word_embeddings true for T5 (v1.1 then reads scale_decoder_outputs
# false); the published T5 v1.1 config says false, which transformers 5 still reads as v1.1.
T5_CONFIG_AS_PUBLISHED = {"tie_word_embeddings": False}
SPIECE_SEED_VOCAB = 200  # sentencepiece trainer's size before its pieces are replaced (the corpus is small)
TORCH_MODELS = ("vae", "text_encoder", "text_encoder_2", "transformer")
SEED_STRIDE = 10  # model k of folder seed s gets torch seed s * SEED_STRIDE + k


def transformer_config(variant: str):
    """TINY with the input/output widths and guidance flag of the published `variant`."""
    full = PRESETS[variant]
    return TINY.replace(in_channels=full.in_channels, out_channels=full.out_channels,
                        guidance_embed=full.guidance_embed)


def clip_text_encoder(seed: int):
    """transformers CLIPTextModel with TINY_CLIP's sizes."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=TINY_CLIP.vocab_size, hidden_size=TINY_CLIP.hidden_size, projection_dim=TINY_CLIP.hidden_size,
        intermediate_size=TINY_CLIP.intermediate_size, num_hidden_layers=TINY_CLIP.num_layers,
        num_attention_heads=TINY_CLIP.num_heads, max_position_embeddings=TINY_CLIP.max_positions,
        layer_norm_eps=TINY_CLIP.layer_norm_eps, hidden_act="quick_gelu", **CLIP_CONFIG_IDS)
    torch.manual_seed(seed)
    return perturb_(CLIPTextModel(cfg), seed).eval()


def t5_encoder(seed: int):
    """transformers T5EncoderModel, v1.1 flavour (gated GELU, untied embeddings), TINY_T5's sizes."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=TINY_T5.vocab_size, d_model=TINY_T5.d_model, d_kv=TINY_T5.d_kv, d_ff=TINY_T5.d_ff,
        num_layers=TINY_T5.num_layers, num_decoder_layers=TINY_T5.num_layers, num_heads=TINY_T5.num_heads,
        relative_attention_num_buckets=TINY_T5.relative_attention_num_buckets,
        relative_attention_max_distance=TINY_T5.relative_attention_max_distance,
        layer_norm_epsilon=TINY_T5.layer_norm_eps, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        **T5_CONFIG_IDS)
    torch.manual_seed(seed)
    return perturb_(T5EncoderModel(cfg), seed).eval()


def vae(seed: int):
    """diffusers AutoencoderKL as FLUX configures it (16 latents, no quant convs), TINY_VAE's sizes."""
    from diffusers import AutoencoderKL

    levels = len(TINY_VAE.block_out_channels)
    torch.manual_seed(seed)
    model = AutoencoderKL(
        in_channels=TINY_VAE.in_channels, out_channels=TINY_VAE.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=TINY_VAE.block_out_channels, layers_per_block=TINY_VAE.layers_per_block,
        latent_channels=TINY_VAE.latent_channels, norm_num_groups=TINY_VAE.norm_groups,
        sample_size=VAE_SAMPLE_SIZE, scaling_factor=TINY_VAE.scaling_factor, shift_factor=TINY_VAE.shift_factor,
        use_quant_conv=False, use_post_quant_conv=False)
    return perturb_(model, seed).eval()


def write_spiece_model(folder, corpus=CORPUS) -> Path:
    """Write tokenizer_2/spiece.model holding exactly the Unigram vocabulary of folder/tokenizer.json.

    The sentencepiece trainer makes the model proto (trainer and normaliser specs, nmt_nfkc
    like T5's); its pieces are then replaced by tokenizer.json's, so both files give the same
    ids. Only NFKC-sensitive characters differ: spiece.model normalises them, tokenizer.json
    (which is what transformers loads when both exist) does not.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    folder = Path(folder)
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    buf = io.BytesIO()
    ids = {token: i for i, token in enumerate(T5_SPECIALS)}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="unigram", vocab_size=SPIECE_SEED_VOCAB,
        hard_vocab_limit=False, pad_id=ids[T5_PAD], eos_id=ids[T5_EOS], unk_id=ids[T5_UNK], bos_id=-1,
        minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    kind = proto.SentencePiece
    kinds = {T5_PAD: kind.CONTROL, T5_EOS: kind.CONTROL, T5_UNK: kind.UNKNOWN}
    del proto.pieces[:]
    for piece, score in model["vocab"]:
        proto.pieces.add(piece=piece, score=score, type=kinds.get(piece, kind.NORMAL))
    proto.trainer_spec.vocab_size = len(model["vocab"])
    path = folder / "spiece.model"
    path.write_bytes(proto.SerializeToString())
    return path


def write_tokenizers(path) -> None:
    """tokenizer/ (CLIP) and tokenizer_2/ (T5, with spiece.model) under a pipeline folder, sized for TINY_*."""
    path = Path(path)
    write_clip_tokenizer(path / "tokenizer", TINY_CLIP.vocab_size)
    write_t5_tokenizer(path / "tokenizer_2", TINY_T5.vocab_size)
    write_spiece_model(path / "tokenizer_2")


@functools.lru_cache(maxsize=None)
def _tokenizer_source() -> Path:
    """Tokenizers written once per process; every folder gets a copy (they do not depend on the seed)."""
    root = Path(_scratch()) / "_tokenizers"
    write_tokenizers(root)
    return root


def _save_sharded(model, folder: Path, shards: int) -> None:
    """Re-save `model` into `folder` as about `shards` safetensors shards plus an index json."""
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=math.ceil(size / shards))


def _update_json(file: Path, values: dict) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **values}, indent=2, sort_keys=True) + "\n")


def make_flux_folder(path, variant: str = "dev", seed: int = 0) -> Path:
    """Write a complete random-weight diffusers FLUX.1 `variant` pipeline folder at `path`; returns it."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    path = Path(path)
    tokenizers = _tokenizer_source()
    seeds = {name: seed * SEED_STRIDE + k for k, name in enumerate(TORCH_MODELS)}
    pipe = getattr(diffusers, PIPELINE_CLASSES[variant])(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]),
        vae=vae(seeds["vae"]),
        text_encoder=clip_text_encoder(seeds["text_encoder"]),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers / "tokenizer"),
        text_encoder_2=t5_encoder(seeds["text_encoder_2"]),
        tokenizer_2=T5TokenizerFast.from_pretrained(tokenizers / "tokenizer_2"),
        transformer=diffusers_transformer(transformer_config(variant), seeds["transformer"]))
    pipe.save_pretrained(path, safe_serialization=True)
    for name, shards in SHARDS.items():
        _save_sharded(getattr(pipe, name), path / name, shards)
    _update_json(path / "text_encoder_2" / "config.json", T5_CONFIG_AS_PUBLISHED)
    # save_pretrained writes only tokenizer.json + tokenizer_config.json: put back the full folders.
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(path / name)
        shutil.copytree(tokenizers / name, path / name)
    return path


@functools.lru_cache(maxsize=None)
def _scratch() -> str:
    """A temporary folder for this process, removed at exit."""
    root = tempfile.mkdtemp(prefix="flux_fixtures_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.lru_cache(maxsize=None)
def cached_flux_folder(variant: str = "dev", seed: int = 0) -> Path:
    """make_flux_folder, built once per process and (variant, seed); treat the folder as read-only."""
    return make_flux_folder(Path(_scratch()) / f"{variant}-{seed}", variant, seed)


def load_diffusers_pipeline(path, variant: str = "dev"):
    """The diffusers pipeline of a folder from make_flux_folder, in float32, for reference runs."""
    import diffusers

    return getattr(diffusers, PIPELINE_CLASSES[variant]).from_pretrained(path, dtype=torch.float32)
