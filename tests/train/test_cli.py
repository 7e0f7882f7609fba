"""python -m flux_jax.train end to end: bad input, a LoRA run whose file diffusers loads, a demo full run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flux_jax import FluxPipeline
from flux_jax.train.__main__ import main, parse_args
from flux_jax.train.digits import write_digits
from pipeline_fixtures import cached_flux_folder, load_diffusers_pipeline
from torch_ref import rel_err

SIZE = 32
STEPS = 4
IMAGE_TOL = 2 / 255
LATENT_TOL = 1e-4
CALL = dict(height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=16,
            prompt="a photo of the digit 7")


def common(data, out) -> list[str]:
    return ["--data", str(data), "--output", str(out), "--resolution", str(SIZE), "--max-sequence-length", "16",
            "--steps", str(STEPS), "--batch-size", "4", "--checkpoint-every", "2", "--sample-steps", "2",
            "--no-progress"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    write_digits(folder, side=SIZE, limit=8)
    return folder


@pytest.mark.parametrize("argv, message", [
    ([], "pass --data DIR"),
    (["--init", "demo", "--model", "x", "--data", "d", "--output", "o"], "drop --model"),
    (["--init", "demo", "--data", "d", "--output", "o", "--steps", "0"], "--steps must be >= 1"),
    (["--init", "demo", "--data", "d", "--output", "o", "--lora-targets", "("], None),
])
def test_bad_arguments_stop_with_one_error_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:")
    if message:
        assert message in err[-1]


def test_bad_data_lists_every_problem(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")  # no caption
    (tmp_path / "b.png").write_bytes(b"not a picture")
    (tmp_path / "b.txt").write_text("broken")
    assert main(["--init", "demo", "--data", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "a.png" in err and "b.png" in err
    assert not (tmp_path / "out").exists()  # nothing written before the data is good


def test_config_file_gives_defaults_and_flags_win(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('steps = 7\nlearning-rate = 0.002\nlora_rank = 8\n')
    args = parse_args(["--config", str(cfg), "--steps", "9"])
    assert (args.steps, args.learning_rate, args.lora_rank) == (9, 0.002, 8)
    cfg.write_text('stepz = 7\n')
    assert main(["--config", str(cfg)]) == 2
    assert "unknown keys ['stepz']" in capsys.readouterr().err


def test_lora_run_writes_a_file_diffusers_loads_with_the_same_images(digits, tmp_path):
    folder = cached_flux_folder("dev")
    out = tmp_path / "run"
    argv = ["--model", str(folder), "--lora-rank", "4", "--learning-rate", "0.05", *common(digits, out)]
    assert main(argv) == 0
    lora = out / "lora.safetensors"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert len(list((out / "samples" / f"step_{STEPS:06d}").glob("*.png"))) == 4
    assert list((out / "logs").glob("events.out.tfevents.*"))
    from safetensors.numpy import load_file
    keys = load_file(lora)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in keys

    ours, ref = FluxPipeline.from_pretrained(folder), load_diffusers_pipeline(folder, "dev")
    noise = np.asarray(ours.initial_latents(None, 1, (SIZE // 16) ** 2, 0))
    base = ours(latents=noise, output_type="latent", progress=False, **CALL).images
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(lora))
    got = ours(latents=noise, output_type="latent", progress=False, **CALL).images
    want = ref(latents=torch.from_numpy(noise), output_type="latent", **CALL).images
    assert rel_err(got, want) <= LATENT_TOL
    assert rel_err(got, base) > 1e-3, "the trained LoRA changes nothing: the comparison would be vacuous"
    got_img = ours(latents=noise, output_type="np", progress=False, **CALL).images
    want_img = ref(latents=torch.from_numpy(noise), output_type="np", **CALL).images
    assert np.abs(got_img - want_img).max() <= IMAGE_TOL

    # the same command again resumes at the last checkpoint: nothing left to train
    mtime = lora.stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "checkpoints" / "4").is_dir() and lora.stat().st_mtime_ns >= mtime


def test_demo_full_fine_tuning_writes_a_model_folder(digits, tmp_path):
    out = tmp_path / "run"
    assert main(["--init", "demo", "--vae-steps", "5", "--learning-rate", "0.01", *common(digits, out)]) == 0
    trained, base = FluxPipeline.from_pretrained(out), FluxPipeline.from_pretrained(out / "base")
    assert trained.vae_cfg == base.vae_cfg  # the fitted VAE: its latent constants are the data's
    assert base.vae_cfg.scaling_factor != 0.3611
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(*(jax_leaves(p.params) for p in (trained, base)))]
    assert all(moved[:3]) and sum(moved) > len(moved) // 2
    image = trained("a photo of the digit 3", height=SIZE, width=SIZE, num_inference_steps=2, seed=0,
                    guidance_scale=1.0, max_sequence_length=16, output_type="np", progress=False).images[0]
    assert image.shape == (SIZE, SIZE, 3) and np.isfinite(image).all()
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert len(manifest["examples"]) == 8


def jax_leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)
