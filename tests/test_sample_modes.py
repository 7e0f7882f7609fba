"""`python -m flux_jax.sample` with --image / --mask / --strength / --mode: each mode on the demo model,
the auto rule on a real Fill folder, and every bad mode input (exit 2, one line, no file, before loading)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from convert.transformer import FILL_IN_CHANNELS
from flux_jax import sample
from flux_jax.config import DEV
from flux_jax.sample import DEMO_KONTEXT_AREA, MODEL_PARTS, build_parser, main
from pipeline_fixtures import cached_flux_folder
# The helpers and fixtures of the text-to-image tests (no_default_model is autouse here too).
from test_sample import no_default_model, png_text, run_bad, run_ok, shared_demo  # noqa: F401

WIDTH, HEIGHT = 64, 96  # upright input size: 4x6 tokens
STEPS = ["--steps", "2"]
STRENGTH = 0.75  # with 2 steps, 1 runs (a strength below 0.5 would leave none)
EXIF_ORIENTATION = 0x0112
ROTATE_270 = 6  # EXIF "rotate 90° clockwise to view": stored sideways, shown upright


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Input files: an image stored sideways with an EXIF orientation, masks, and unusable files."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, (WIDTH, HEIGHT, 3), np.uint8))  # HEIGHT wide, WIDTH tall
    exif = stored.getexif()
    exif[EXIF_ORIENTATION] = ROTATE_270
    stored.save(d / "photo.png", exif=exif.tobytes())
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[HEIGHT // 4: HEIGHT // 2, WIDTH // 4: WIDTH // 2] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[::2, ::2]).save(d / "half_mask.png")  # another size: resized with a warning
    Image.fromarray(mask[:8, :8]).save(d / "tiny.png")  # under 16 pixels a side
    (d / "garbage.png").write_bytes(rng.bytes(512))
    return {p.stem: p for p in d.iterdir()}


def with_files(argv, inputs) -> list:
    """argv with the names of `inputs` replaced by their paths; other *.png names become missing files."""
    folder = inputs["photo"].parent
    return [inputs.get(a) or (folder / a if str(a).endswith(".png") else a) for a in argv]


def fake_model(folder, in_channels: int, layout: str = "diffusers", model_index: str | None = None):
    """A model folder with every part but no weights: a mode check that passes would fail at loading."""
    for part in MODEL_PARTS:
        (folder / part).mkdir(parents=True)
    transformer = folder / "transformer"
    if layout == "diffusers":
        (transformer / "config.json").write_text(json.dumps({"in_channels": in_channels}))
    elif layout == "converted":
        (transformer / "params").mkdir()
        (transformer / "flux_jax_config.json").write_text(json.dumps({"config": {"in_channels": in_channels}}))
    else:  # BFL file header: img_in.weight is (hidden, in_channels)
        from safetensors.numpy import save_file
        save_file({"model.diffusion_model.img_in.weight": np.zeros((2, in_channels), np.float32)},
                  folder / "flux1.safetensors")
    if model_index:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": model_index}))
    return folder


# ---------------------------------------------------------------- each mode, on the demo model

@pytest.mark.parametrize("mode, argv, expected", [
    # Kontext's height/width give the exact output size (else about 256² pixels on the demo).
    ("kontext", ["--height", HEIGHT, "--width", WIDTH], {}),
    ("img2img", ["--strength", STRENGTH], {"strength": str(STRENGTH)}),
    ("inpaint", ["--mask", "half_mask"], {"mask": "half_mask.png", "strength": "0.6"}),
    ("fill", ["--mode", "fill", "--mask", "mask"], {"mask": "mask.png", "strength": "1.0"}),
])
def test_demo_mode(mode, argv, expected, inputs, tmp_path, capsys, shared_demo):
    out = tmp_path / "out.png"
    err = run_ok(capsys, "--demo", "--prompt", "make it red", "--image", inputs["photo"], "--seed", 3,
                 "--out", out, *STEPS, *with_files(argv, inputs))
    text = png_text(out)
    assert text["mode"] == mode and text["image"] == "photo.png"
    assert {k: text[k] for k in ("mask", "strength") if k in text} == expected
    assert text["size"] == f"{WIDTH}x{HEIGHT}"  # upright: the EXIF orientation was applied
    with Image.open(out) as im:
        assert im.size == (WIDTH, HEIGHT) and np.asarray(im).std() > 0
    # The inpaint case's mask has another size: the pipeline resizes it, its warning shows as one line.
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    expected_warnings = 1 if mode == "inpaint" else 0
    assert len(warnings) == expected_warnings and all("resizing the mask" in w for w in warnings), err


def test_demo_kontext_default_size(inputs):
    """Without --height/--width the demo's Kontext aims at 256² pixels, not Kontext's 1024² (CPU minutes)."""
    args = build_parser().parse_args(["--demo", "--prompt", "x", "--image", str(inputs["photo"])])
    kw = sample.select_mode(args, None).call_kwargs
    assert kw["max_area"] == DEMO_KONTEXT_AREA and kw["height"] is None and kw["image"].size == (WIDTH, HEIGHT)


# ---------------------------------------------------------------- the auto rule on a real Fill folder

@pytest.fixture(scope="module")
def fill_folder():
    return cached_flux_folder("fill")


def test_fill_folder_chosen_by_mask(fill_folder, inputs, tmp_path, capsys):
    out = tmp_path / "fill.png"
    run_ok(capsys, "--model", fill_folder, "--prompt", "a red door", "--image", inputs["photo"],
           "--mask", inputs["mask"], "--seed", 1, "--out", out, *STEPS)
    text = png_text(out)
    assert text["mode"] == "fill" and text["guidance"] == "30.0" and text["model"] == fill_folder.name
    assert text["size"] == f"{WIDTH}x{HEIGHT}"


def test_fill_checked_after_loading_when_unreadable(fill_folder, inputs, tmp_path, capsys, monkeypatch):
    """A checkpoint whose kind cannot be read before loading is checked once loaded."""
    monkeypatch.setattr(sample, "transformer_in_channels", lambda src: None)
    out = tmp_path / "out.png"
    line = run_bad(capsys, "--model", fill_folder, "--prompt", "x", "--image", inputs["photo"], "--out", out,
                   *STEPS, loads=True)
    assert "Fill checkpoint" in line and "--mask" in line
    assert not out.exists()


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, needle", [
    (["--image", "missing.png"], "--image: no such file"),
    (["--image", "garbage"], "--image: cannot read"),
    (["--image", "tiny"], "each side must be"),
    (["--image", "photo", "--mask", "missing.png"], "--mask: no such file"),
    (["--image", "photo", "--mask", "garbage"], "--mask: cannot read"),
    (["--image", "photo", "--strength", "1.5"], "--strength must be from 0 to 1"),
    (["--image", "photo", "--strength", "-0.1"], "--strength must be from 0 to 1"),
    (["--image", "photo", "--strength", "nan"], "--strength must be from 0 to 1"),
    (["--image", "photo", "--strength", "half"], "--strength"),
    (["--mask", "mask"], "--mask needs --image"),
    (["--strength", "0.5"], "not text mode (no --image given)"),
    (["--mode", "kontext", "--image", "photo", "--strength", "0.5"], "not --mode kontext"),
    (["--mode", "text", "--image", "photo"], "--mode text takes no --image"),
    (["--mode", "kontext"], "--mode kontext needs --image"),
    (["--mode", "img2img", "--image", "photo", "--mask", "mask"], "--mask is used by inpaint and fill only"),
    (["--mode", "inpaint", "--image", "photo"], "--mode inpaint needs --mask"),
    (["--mode", "fill", "--image", "photo"], "--mode fill needs --mask"),
    (["--mode", "outpaint"], "invalid choice"),
    (["--image", "photo", "--height", "64"], "--height and --width together"),
])
def test_bad_mode_arguments(argv, needle, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert needle in run_bad(capsys, "--demo", "--prompt", "x", "--out", out, *with_files(argv, inputs))
    assert not out.exists()


@pytest.mark.parametrize("layout", ["diffusers", "converted", "bfl"])
@pytest.mark.parametrize("in_channels, argv, needle", [
    (FILL_IN_CHANNELS, [], "is a FLUX.1 Fill checkpoint: it needs --image and --mask"),
    (FILL_IN_CHANNELS, ["--image", "photo"], "is a FLUX.1 Fill checkpoint: it needs --image and --mask"),
    (FILL_IN_CHANNELS, ["--mode", "inpaint", "--image", "photo", "--mask", "mask"], "use --mode fill"),
    (DEV.in_channels, ["--mode", "fill", "--image", "photo", "--mask", "mask"], "--mode fill needs a FLUX.1 Fill"),
])
def test_mode_against_checkpoint(layout, in_channels, argv, needle, inputs, tmp_path, capsys):
    """The checkpoint's kind is read from its config or header: a contradiction fails before any loading."""
    model = fake_model(tmp_path / "model", in_channels, layout)
    extra = ["--transformer", model / "flux1.safetensors"] if layout == "bfl" else []
    out = tmp_path / "out"
    assert needle in run_bad(capsys, "--model", model, *extra, "--prompt", "x", "--out", out,
                             *with_files(argv, inputs))
    assert not out.exists()


def test_kontext_on_a_dev_folder_warns(inputs, tmp_path, capsys):
    model = fake_model(tmp_path / "model", DEV.in_channels, model_index="FluxPipeline")
    main(["--model", str(model), "--prompt", "x", "--image", str(inputs["photo"]), "--out", str(tmp_path / "o")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not FLUX.1 Kontext" in warnings[0] and "--strength" in warnings[0]


def test_help_explains_the_auto_rule(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--image alone: img2img if --strength is given, else kontext" in text
    assert "--mode {text,kontext,img2img,inpaint,fill}" in text
