"""`python -m flux_jax.sample` end to end: the demo model, real folders (diffusers, converted, BFL
transformer), output naming and PNG metadata, and every kind of bad input (exit 2, one line, no file)."""
from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flux_jax.demo
from flux_jax import sample
import convert.transformer
from convert import convert_to_checkpoint
from flux_jax.sample import EXIT_BAD_INPUT, MODEL_ENV, main
from pipeline_fixtures import cached_flux_folder, transformer_config

SIZE = 64  # pixels: 4x4 tokens, fast everywhere
STEPS = 2
FAST = ["--height", str(SIZE), "--width", str(SIZE), "--steps", str(STEPS)]
METADATA = ("prompt", "seed", "steps", "guidance", "size", "model", "mode")


@pytest.fixture(autouse=True)
def no_default_model(monkeypatch, tmp_path_factory):
    """No test may find a real model in this machine's environment or Hugging Face cache."""
    monkeypatch.delenv(MODEL_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty_hub")))


@pytest.fixture
def shared_demo(monkeypatch):
    """One demo pipeline per (variant, class, dtype) for the whole module: its compiled functions are reused."""
    monkeypatch.setattr(flux_jax.demo, "make_demo_pipeline", _cached_demo)


@functools.lru_cache(maxsize=None)
def _cached_demo(variant="dev", cls=None, seed=0, dtype=None):
    return _make_demo(variant, cls=cls, seed=seed, dtype=dtype)


_make_demo = flux_jax.demo.make_demo_pipeline


@pytest.fixture(scope="module")
def dev() -> Path:
    return cached_flux_folder("dev")


@pytest.fixture(scope="module")
def dev_image(dev, tmp_path_factory) -> np.ndarray:
    """The dev folder's image for prompt 'a fox', seed 7: what the converted and BFL runs must reproduce."""
    out = tmp_path_factory.mktemp("dev") / "fox.png"
    assert main(["--model", str(dev), "--prompt", "a fox", "--seed", "7", "--out", str(out), *FAST]) == 0
    return np.asarray(Image.open(out))


def run_ok(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def run_bad(capsys, *argv, loads: bool = False) -> str:
    """Run main expecting bad input: exit 2, no traceback, one `error:` line (the only line unless it `loads`)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    if not loads:
        assert len(lines) == 1, err
    return lines[-1]


def png_text(path: Path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


# ---------------------------------------------------------------- the demo model

# Every demo run makes 2 images a prompt: one batch shape, so the shared pipeline compiles once.
TWO = ["--num-images", "2"]


def test_demo_writes_pngs_with_metadata(tmp_path, capsys, shared_demo):
    err = run_ok(capsys, "--demo", "--prompt", "a red fox, café", "--seed", 5, "--out", tmp_path / "fox.png",
                 *TWO, *FAST)
    assert "random noise" in err and "seed: 5" in err
    assert "compile" in err and "sampling" in err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["fox_0.png", "fox_1.png"]  # index suffixes; no temp file left behind
    text = png_text(tmp_path / names[0])
    assert set(METADATA) <= set(text)
    assert text["prompt"] == "a red fox, café" and text["seed"] == "5"
    assert text["steps"] == str(STEPS) and text["size"] == f"{SIZE}x{SIZE}" and text["guidance"] == "3.5"
    assert "demo" in text["model"] and text["mode"] == "text"
    first, second = (np.asarray(Image.open(tmp_path / n)) for n in names)
    assert first.shape == (SIZE, SIZE, 3) and first.std() > 0
    assert not np.array_equal(first, second)  # two images of one prompt: different noise


def test_folder_naming_and_several_prompts(tmp_path, capsys, shared_demo):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n   \na dog\n", encoding="utf-8")
    out = tmp_path / "images"  # created on demand
    run_ok(capsys, "--demo", "--prompt", "a bird", "--prompt-file", prompts, "--seed", 11, "--out", out, *TWO, *FAST)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"flux_11_{i}.png" for i in range(6)]
    assert [png_text(out / n)["prompt"] for n in names] == ["a bird"] * 2 + ["a cat"] * 2 + ["a dog"] * 2
    # An image's place in its prompt's batch: with seed and --num-images, what reproduces it.
    assert [png_text(out / n)["index"] for n in names] == ["0", "1"] * 3


def test_random_seed_is_printed_and_stored(tmp_path, capsys, shared_demo):
    err = run_ok(capsys, "--demo", "--prompt", "x", "--out", tmp_path, *TWO, *FAST)
    seed = next(line for line in err.splitlines() if line.startswith("seed: ")).split()[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"flux_{seed}_{i}.png" for i in range(2)]
    assert png_text(tmp_path / f"flux_{seed}_0.png")["seed"] == seed


def test_size_rounding_warns_in_one_line(tmp_path, capsys, shared_demo):
    err = run_ok(capsys, "--demo", "--prompt", "x", "--height", SIZE + 8, "--width", SIZE, "--steps", STEPS,
                 "--out", tmp_path, *TWO)
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{SIZE}x{SIZE}" in warning[0], err
    assert all(Image.open(p).size == (SIZE, SIZE) for p in tmp_path.iterdir())


# ---------------------------------------------------------------- real folders

def test_diffusers_folder(dev_image):
    assert dev_image.shape == (SIZE, SIZE, 3)


@pytest.fixture(scope="module")
def converted(dev, tmp_path_factory) -> Path:
    return convert_to_checkpoint(dev, tmp_path_factory.mktemp("converted") / "converted")


def test_converted_folder_matches(converted, dev_image, tmp_path, capsys):
    out = tmp_path / "fox.png"
    # Twice the prompt with --low-memory: the freed text encoders are reloaded for the second one.
    run_ok(capsys, "--model", converted, "--prompt", "a fox", "--prompt", "a fox", "--seed", 7, "--out", out,
           "--low-memory", *FAST)
    for name in ("fox_0.png", "fox_1.png"):
        assert np.abs(np.asarray(Image.open(tmp_path / name)).astype(int) - dev_image).max() <= 1
        assert png_text(tmp_path / name)["model"] == "converted"


def test_bfl_transformer_file(dev, dev_image, tmp_path, capsys, monkeypatch):
    """A model folder without transformer/ works with --transformer BFL-file, and gives the same image."""
    from safetensors.torch import load_file, save_file
    from torch_ref import diffusers_to_bfl

    # BFL files carry no RoPE axes; the converter knows those of the published head width only.
    cfg = transformer_config("dev")
    monkeypatch.setitem(convert.transformer.DEFAULT_AXES, cfg.head_dim, cfg.axes_dim)
    sd = {k: v for f in sorted((dev / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}
    bfl = tmp_path / "flux1-tiny.safetensors"
    save_file(diffusers_to_bfl(sd, cfg), bfl)
    model = tmp_path / "no-transformer"
    shutil.copytree(dev, model, ignore=shutil.ignore_patterns("transformer"))
    out = tmp_path / "out"
    run_ok(capsys, "--model", model, "--transformer", bfl, "--prompt", "a fox", "--seed", 7, "--out", out, *FAST)
    image = out / "flux_7_0.png"
    assert np.abs(np.asarray(Image.open(image)).astype(int) - dev_image).max() <= 1
    assert png_text(image)["model"] == "no-transformer + flux1-tiny.safetensors"


def test_model_from_hf_cache(dev, tmp_path, monkeypatch, capsys):
    """No --model: the cache snapshot refs/main names is used (here incomplete, so the error names it)."""
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev"
    for rev in ("aaaa", "bbbb"):
        (repo / "snapshots" / rev).mkdir(parents=True)
    shutil.copytree(dev / "tokenizer", repo / "snapshots" / "aaaa" / "tokenizer")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaaa")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert sample.cached_snapshot() == repo / "snapshots" / "aaaa"
    line = run_bad(capsys, "--prompt", "x", "--out", tmp_path / "o.png")
    assert "snapshots/aaaa" in line and "missing tokenizer_2/, text_encoder/" in line
    (repo / "refs" / "main").unlink()
    assert sample.cached_snapshot() in {repo / "snapshots" / r for r in ("aaaa", "bbbb")}
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing"))
    assert sample.cached_snapshot() is None


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, needle", [
    (["--demo", "--prompt", "x", "--steps", "0"], "--steps"),
    (["--demo", "--prompt", "x", "--steps", "two"], "--steps"),
    (["--demo", "--prompt", "x", "--height", "0"], "--height"),
    (["--demo", "--prompt", "x", "--width", "-64"], "--width"),
    (["--demo", "--prompt", "x", "--width", "100000"], "--width"),
    (["--demo", "--prompt", "x", "--height", "8"], "--height"),
    (["--demo", "--prompt", "x", "--num-images", "0"], "--num-images"),
    (["--demo", "--prompt", "x", "--seed", "-1"], "--seed"),
    (["--demo", "--prompt", "x", "--seed", str(2**40)], "--seed"),
    (["--demo", "--prompt", "x", "--dtype", "int8"], "dtype"),
    (["--demo", "--prompt", "x", "--negative-prompt", "blur"], "--true-cfg"),
    (["--demo", "--prompt", "x", "--true-cfg", "4"], "--negative-prompt"),
    (["--demo"], "no prompt"),
    (["--demo", "--prompt", "  "], "empty"),
    (["--demo", "--prompt", "x", "--model", "/m"], "not allowed with"),
    (["--demo", "--prompt", "x", "--transformer", "/t.safetensors"], "--transformer"),
    (["--prompt", "x"], "no model"),
    (["--model", "/no/such/folder", "--prompt", "x"], "no such model folder"),
    (["--demo", "--prompt", "x", "--bogus"], "--bogus"),
])
def test_bad_arguments(argv, needle, tmp_path, capsys):
    out = tmp_path / "out"
    line = run_bad(capsys, *argv, "--out", out)
    assert needle in line
    assert not out.exists()


def test_bad_prompt_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in run_bad(capsys, "--demo", "--prompt-file", empty, "--out", tmp_path / "o")
    assert "cannot read" in run_bad(capsys, "--demo", "--prompt-file", tmp_path / "missing.txt", "--out", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_bad_out(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "not a folder" in run_bad(capsys, "--demo", "--prompt", "x", "--out", tmp_path / "file")
    assert "PNG" in run_bad(capsys, "--demo", "--prompt", "x", "--out", tmp_path / "x.jpg")
    assert "cannot write" in run_bad(capsys, "--demo", "--prompt", "x", "--out", tmp_path / "file" / "x.png")


@pytest.mark.parametrize("missing", ["transformer", "vae", "tokenizer_2"])
def test_incomplete_model_folder(dev, missing, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(dev, model, ignore=shutil.ignore_patterns(missing))
    line = run_bad(capsys, "--model", model, "--prompt", "x", "--out", tmp_path / "out", *FAST)
    assert f"missing {missing}/" in line
    assert not (tmp_path / "out").exists()


def test_truncated_shard(dev, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(dev, model)
    shard = sorted((model / "transformer").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    line = run_bad(capsys, "--model", model, "--prompt", "x", "--out", tmp_path / "out", *FAST, loads=True)
    assert "truncated" in line and shard.name in line
    assert not (tmp_path / "out").exists()


def test_truncated_converted_checkpoint(converted, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(converted, model)
    for chunk in (model / "transformer").rglob("d/*"):
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    line = run_bad(capsys, "--model", model, "--prompt", "x", "--out", tmp_path / "out", *FAST, loads=True)
    assert "cannot load the model" in line
    assert not (tmp_path / "out").exists()


def test_garbage_transformer_file(dev, tmp_path, capsys):
    garbage = tmp_path / "flux1-dev.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    line = run_bad(capsys, "--model", dev, "--transformer", garbage, "--prompt", "x", "--out", tmp_path / "out",
                   *FAST, loads=True)
    assert "safetensors" in line
    assert not (tmp_path / "out").exists()


def test_help_and_module_entry_point():
    assert main(["--help"]) == 0
    proc = subprocess.run([sys.executable, "-m", "flux_jax.sample", "--demo", "--steps", "0", "--prompt", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == EXIT_BAD_INPUT and proc.stderr.strip().startswith("error: --steps"), proc.stderr
