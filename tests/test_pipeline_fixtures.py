"""The random-weight FLUX folders of pipeline_fixtures: layout, tokenizers, and diffusers running them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from PIL import Image

from flux_jax.config import TINY_CLIP, TINY_T5
from flux_jax.tokenizers import (CLIP_BOS, CLIP_EOS, CLIP_END_OF_WORD, CLIP_MAX_LENGTH, CORPUS, DEFAULT_VOCAB_SIZE,
                                 bytes_to_unicode)
from pipeline_fixtures import (PIPELINE_CLASSES, SCHEDULERS, SHARDS, cached_flux_folder, load_diffusers_pipeline,
                               transformer_config)

REPO = Path(__file__).resolve().parents[1]
VOCAB = DEFAULT_VOCAB_SIZE  # what the tiny text encoders embed, checked below
CLIP_BOS_ID, CLIP_EOS_ID = VOCAB - 2, VOCAB - 1
T5_PAD_ID, T5_EOS_ID, T5_UNK_ID = 0, 1, 2
SIZE = 64  # image side: 4x4 packed tokens, a multiple of 16 as FLUX needs
STEPS = 2
T5_LENGTH = 32  # T5 padding length in the token tests (FLUX pads to 256 or 512)
PROMPTS = [*CORPUS[:4], CORPUS[-1], "  Two\tspaces,  a TAB and café naïve 123!  ", "x " * 100]
# CLIP's tokenisation regex (openai/CLIP simple_tokenizer.py).
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.I)


@pytest.fixture(scope="module")
def dev() -> Path:
    return cached_flux_folder("dev")


def reference_clip_ids(text: str, folder: Path) -> list[int]:
    """CLIP's original pure-Python BPE over vocab.json and merges.txt (no ftfy: inputs are plain text)."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(m.split()): r for r, m in enumerate(merges)}
    byte_symbols = bytes_to_unicode()
    ids = [vocab[CLIP_BOS]]
    for token in CLIP_PATTERN.findall(" ".join(text.split()).lower()):
        word = [byte_symbols[b] for b in token.encode("utf-8")]
        word[-1] += CLIP_END_OF_WORD
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            fused, i = [], 0
            while i < len(word):
                if tuple(word[i:i + 2]) == pair:
                    fused.append(word[i] + word[i + 1])
                    i += 2
                else:
                    fused.append(word[i])
                    i += 1
            word = fused
        ids += [vocab[symbol] for symbol in word]
    return ids + [vocab[CLIP_EOS]]


def padded(ids: list[int], length: int, pad: int, eos: int) -> list[int]:
    """`ids` truncated (keeping the final eos) and padded to `length`, as FLUX's tokenizer calls do."""
    return ids[:length - 1] + [eos] if len(ids) > length else ids + [pad] * (length - len(ids))


def folder_with(src: Path, dst: Path, names: list[str]) -> Path:
    """A copy of only `names` from tokenizer folder `src`, to load the same tokenizer another way."""
    dst.mkdir()
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("variant", sorted(PIPELINE_CLASSES))
def test_folder_layout(variant):
    assert TINY_CLIP.vocab_size == TINY_T5.vocab_size == VOCAB
    path = cached_flux_folder(variant)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASSES[variant]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    scheduler = json.loads((path / "scheduler/scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in SCHEDULERS[variant]} == SCHEDULERS[variant]
    for name in SHARDS:  # sharded like the published repos, nothing left unsharded
        weights = json.loads(next((path / name).glob("*.safetensors.index.json")).read_text())["weight_map"]
        files = {f.name for f in (path / name).glob("*.safetensors")}
        assert set(weights.values()) == files and len(files) > 1
    transformer = json.loads((path / "transformer/config.json").read_text())
    cfg = transformer_config(variant)
    assert (transformer["in_channels"], transformer["guidance_embeds"]) == (cfg.in_channels, cfg.guidance_embed)
    clip = json.loads((path / "text_encoder/config.json").read_text())
    t5 = json.loads((path / "text_encoder_2/config.json").read_text())
    assert (clip["vocab_size"], clip["eos_token_id"], t5["vocab_size"]) == (VOCAB, TINY_CLIP.eos_token_id, VOCAB)
    assert (t5["feed_forward_proj"], t5["tie_word_embeddings"]) == ("gated-gelu", False)  # T5 v1.1
    assert t5["d_model"] == TINY_T5.d_model
    assert {p.name for p in (path / "tokenizer").iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"}
    assert {p.name for p in (path / "tokenizer_2").iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"}


def test_clip_pools_at_eos(dev):
    """eos_token_id 2 (legacy) pools at the argmax id: the first eos, since eos is the largest id and pads."""
    from transformers import CLIPTextModel, CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(dev / "tokenizer")(
        PROMPTS[:2], padding="max_length", max_length=CLIP_MAX_LENGTH, return_tensors="pt").input_ids
    with torch.no_grad():
        out = CLIPTextModel.from_pretrained(dev / "text_encoder")(ids)
    first_eos = (ids == CLIP_EOS_ID).int().argmax(-1)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(len(ids)), first_eos])


# ---------------------------------------------------------------- tokenizers


def test_clip_tokenizer(dev, tmp_path):
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    folder = dev / "tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    symbols = list(bytes_to_unicode().values())
    assert list(vocab)[:2 * len(symbols)] == symbols + [s + CLIP_END_OF_WORD for s in symbols]
    assert len(vocab) == VOCAB and (vocab[CLIP_BOS], vocab[CLIP_EOS]) == (CLIP_BOS_ID, CLIP_EOS_ID)
    # Real FLUX tokenizer/ folders hold only vocab.json + merges.txt: that must load to the same tokenizer.
    bpe_only = folder_with(folder, tmp_path / "bpe", ["vocab.json", "merges.txt", "tokenizer_config.json"])
    loaded = [CLIPTokenizer.from_pretrained(folder), CLIPTokenizerFast.from_pretrained(folder),
              CLIPTokenizer.from_pretrained(bpe_only)]
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for tok in loaded:
        assert len(tok) == VOCAB and tok.model_max_length == CLIP_MAX_LENGTH
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (CLIP_BOS_ID, CLIP_EOS_ID, CLIP_EOS_ID)
    for text in PROMPTS:
        want = padded(reference_clip_ids(text, folder), CLIP_MAX_LENGTH, CLIP_EOS_ID, CLIP_EOS_ID)
        assert want[0] == CLIP_BOS_ID and want[-1] == CLIP_EOS_ID
        for tok in loaded:
            got = tok(text, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True).input_ids
            assert got == want, (text, type(tok))
        assert padded(raw.encode(text).ids, CLIP_MAX_LENGTH, CLIP_EOS_ID, CLIP_EOS_ID) == want


def test_t5_tokenizer(dev, tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import T5Tokenizer, T5TokenizerFast

    folder = dev / "tokenizer_2"
    spiece_only = folder_with(folder, tmp_path / "spm", ["spiece.model", "tokenizer_config.json"])
    loaded = [T5TokenizerFast.from_pretrained(folder), T5Tokenizer.from_pretrained(spiece_only)]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert (sp.vocab_size(), sp.pad_id(), sp.eos_id(), sp.unk_id()) == (VOCAB, T5_PAD_ID, T5_EOS_ID, T5_UNK_ID)
    for tok in loaded:
        assert len(tok) == VOCAB
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (T5_PAD_ID, T5_EOS_ID, T5_UNK_ID)
    for text in [*PROMPTS, *CORPUS]:
        want = padded(sp.encode(text) + [T5_EOS_ID], T5_LENGTH, T5_PAD_ID, T5_EOS_ID)
        for tok in loaded:
            got = tok(text, padding="max_length", max_length=T5_LENGTH, truncation=True).input_ids
            assert got == want, (text, type(tok))
        assert padded(raw.encode(text).ids, T5_LENGTH, T5_PAD_ID, T5_EOS_ID) == want
    ids = loaded[0]("Zürich").input_ids
    assert ids[-1] == T5_EOS_ID and T5_UNK_ID in ids  # ü is outside the tiny vocabulary


SENTENCEPIECE_FREE = textwrap.dedent("""
    import json, sys
    sys.modules["sentencepiece"] = None  # any import of it now fails
    from transformers import CLIPTokenizer, T5TokenizerFast
    from flux_jax.tokenizers import write_clip_tokenizer, write_t5_tokenizer
    out, fixture_t5, text = sys.argv[1:]
    clip = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out + "/tokenizer"))
    t5 = T5TokenizerFast.from_pretrained(write_t5_tokenizer(out + "/tokenizer_2"))
    # A full tokenizer_2/ holds spiece.model too: tokenizer.json must be what gets loaded.
    t5_full = T5TokenizerFast.from_pretrained(fixture_t5)
    print(json.dumps([tok(text).input_ids for tok in (clip, t5, t5_full)]))
""")


def test_tokenizers_without_sentencepiece(dev, tmp_path):
    """In a fresh process with sentencepiece unimportable, the writers give the fixture's exact files."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", SENTENCEPIECE_FREE, str(tmp_path), str(dev / "tokenizer_2"),
                          PROMPTS[0]], capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr
    clip, t5, t5_full = json.loads(run.stdout.splitlines()[-1])
    assert clip == CLIPTokenizer.from_pretrained(dev / "tokenizer")(PROMPTS[0]).input_ids
    assert t5 == t5_full == T5TokenizerFast.from_pretrained(dev / "tokenizer_2")(PROMPTS[0]).input_ids
    for name in ("tokenizer", "tokenizer_2"):  # deterministic across processes, byte for byte
        for file in (tmp_path / name).iterdir():
            assert file.read_bytes() == (dev / name / file.name).read_bytes(), file


# ---------------------------------------------------------------- diffusers runs the folders


def run_kwargs(variant: str) -> dict:
    """Arguments the variant's diffusers pipeline needs besides the prompt: a conditioning image for Fill/Kontext."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.fromarray(np.tile((np.arange(SIZE) >= SIZE // 2).astype(np.uint8) * 255, (SIZE, 1)))
    # Kontext would otherwise resize to about a megapixel.
    kontext = dict(image=image, max_area=SIZE * SIZE, _auto_resize=False)
    return {"fill": dict(image=image, mask_image=mask), "kontext": kontext}.get(variant, {})


@pytest.mark.parametrize("variant", sorted(PIPELINE_CLASSES))
def test_diffusers_runs_folder(variant):
    pipe = load_diffusers_pipeline(cached_flux_folder(variant), variant)
    pipe.set_progress_bar_config(disable=True)
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())
    images = pipe(prompt=PROMPTS[0], height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np",
                  generator=torch.Generator().manual_seed(0), **run_kwargs(variant)).images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all() and images.std() > 0
