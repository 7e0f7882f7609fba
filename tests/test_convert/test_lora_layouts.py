"""LoRA files in the other common layouts (convert/lora_layouts.py): kohya sd-scripts, OneTrainer,
ComfyUI (BFL names under "diffusion_model."), XLabs.

Two proofs per layout, both against diffusers as the reference for what each key means:
- key semantics, over every module the layout can name: read_lora of a random file equals read_lora
  of the same file after diffusers' own converter has turned it into diffusers keys (the diffusers
  layout itself is proven against PEFT in tests/test_lora.py);
- end to end: a random file (double and single blocks, parts of fused layers, alpha != rank) loaded
  with load_lora_weights in diffusers' FluxPipeline and in ours gives the same latents and images.

diffusers' kohya converter hard-codes FLUX.1's widths for splitting single blocks' linear1
([3072] * 3 + [12288]); the `kohya_converter` fixture runs it with the tiny model's widths instead.
Where diffusers drops keys it converted (kohya embedders and final layer: its converter leaves them
without the "transformer." prefix, so load_lora_weights ignores them; and the final layer's alpha)
we apply them as sd-scripts and ComfyUI do; those are proven at the converter level only.
"""
from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from convert.lora import LoraError, check_lora, read_lora
from flux_jax import sample as sample_cli
from flux_jax.config import TINY
from test_lora import (B_STD, CALL, MIN_EFFECT, PNG_TOL, SEED, SIZE, STEPS, assert_same_effect, cli_demo,  # noqa: F401
                       compare, deltas, pipes, reset)
from torch_ref import diffusers_to_bfl, diffusers_transformer, rel_err

H, MLP = TINY.hidden_size, TINY.mlp_hidden
FULL_LINEAR1_DIMS = "dims=[3072, 3072, 3072, 12288]"  # in diffusers' kohya converter
KOHYA, COMFY, XLABS_PREFIX, ONETRAINER = "lora_unet_", "diffusion_model.", "diffusion_model.", "lora_transformer_"
ENDINGS = {"kohya": (".lora_down.weight", ".lora_up.weight", ".alpha"),
           "peft": (".lora_A.weight", ".lora_B.weight", ".alpha"),
           "xlabs": (".down.weight", ".up.weight", None)}
SPLIT = 3  # sd-scripts' split_qkv saves a qkv LoRA as one rank-3r LoRA whose up is block-diagonal

# End-to-end files: (module as the layout names it, rank, alpha), BFL names for kohya and ComfyUI. All
# make the same ranks on the same layers of ours, so one compiled sampler serves them all.
KOHYA_MODULES = [("double_blocks.0.img_attn.qkv", 4, 2.0), ("double_blocks.0.img_attn.proj", 3, 6.0),
                 ("double_blocks.1.txt_attn.qkv", 2 * SPLIT, 3.0), ("double_blocks.1.txt_attn.proj", 2, 1.0),
                 ("single_blocks.0.linear1", 4, 3.0)]
KOHYA_SPLIT = "double_blocks.1.txt_attn.qkv"
COMFY_MODULES = [(name, rank, None if name == KOHYA_SPLIT else 1.5 * rank) for name, rank, _ in KOHYA_MODULES]
# diffusers reads OneTrainer's attention modules only (and requires alphas); q alone is part of a fused layer.
ONETRAINER_MODULES = [("transformer_blocks.0.attn.to_q", 4, 8.0), ("transformer_blocks.0.attn.to_out.0", 3, 6.0),
                      ("transformer_blocks.1.attn.add_k_proj", 3, 6.0),
                      ("transformer_blocks.1.attn.add_v_proj", 3, 9.0),
                      ("transformer_blocks.1.attn.to_add_out", 2, 4.0),
                      ("single_transformer_blocks.0.attn.to_q", 2, 4.0),
                      ("single_transformer_blocks.0.attn.to_v", 2, 6.0)]
# XLabs: (module, (out, in), rank); no alpha. A single block's qkv_lora makes linear1's q, k, v rows only.
XLABS_MODULES = [("double_blocks.0.processor.qkv_lora1", (3 * H, H), 4),
                 ("double_blocks.0.processor.proj_lora1", (H, H), 3),
                 ("double_blocks.1.processor.qkv_lora2", (3 * H, H), 6),
                 ("double_blocks.1.processor.proj_lora2", (H, H), 2),
                 ("single_blocks.0.processor.qkv_lora", (3 * H, H), 4)]
E2E_GAIN = 3  # end-to-end files adapt few layers: larger updates, so that their effect shows (MIN_EFFECT)
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
             "attn.to_out.0", "attn.to_add_out")
# Top-level modules diffusers' OneTrainer converter reads besides the blocks' attention.
ONETRAINER_TOP = ("x_embedder", "context_embedder", "norm_out.linear", "proj_out",
                  "time_text_embed.timestep_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
                  "time_text_embed.text_embedder.linear_1")


# ---------------------------------------------------------------- writing random files


def fold(name: str) -> str:
    return name.replace(".", "_")


def lora_tensors(spelled: str, shape, rank: int, alpha, style: str, g, split: int = 1,
                 gain: float = 1) -> dict[str, torch.Tensor]:
    """One module's random factors (down ~ N(0, 1/in), up ~ N(0, (gain B_STD)²)); with split, up is
    block-diagonal: each of `split` row blocks has its own rank / split columns (sd-scripts' split_qkv)."""
    out_dim, in_dim = shape
    down_end, up_end, alpha_end = ENDINGS[style]
    up = torch.randn(out_dim, rank, generator=g) * B_STD * gain
    if split > 1:
        rows, cols = out_dim // split, rank // split
        mask = torch.block_diag(*[torch.ones(rows, cols)] * split)
        up = up * mask
    sd = {spelled + down_end: torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5, spelled + up_end: up}
    if alpha is not None:
        sd[spelled + alpha_end] = torch.tensor(float(alpha))
    return sd


def write(modules, spell, shapes, style: str, seed: int, split=None, gain: float = 1) -> dict[str, torch.Tensor]:
    """A state dict of random LoRA factors for (name, rank, alpha) `modules`, keys spell(name)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, rank, alpha in modules:
        sd.update(lora_tensors(spell(name), shapes[name], rank, alpha, style, g, SPLIT if name == split else 1, gain))
    return sd


def xlabs(modules, prefix: str = "", seed: int = 0, gain: float = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v for name, shape, rank in modules
            for k, v in lora_tensors(prefix + name, shape, rank, None, "xlabs", g, gain=gain).items()}


def bfl_linears(model, cfg=TINY) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear of a diffusers transformer, by its BFL name (torch_ref's re-keying)."""
    bfl = diffusers_to_bfl(model.state_dict(), cfg)
    return {k[:-len(".weight")]: tuple(v.shape) for k, v in bfl.items() if k.endswith(".weight") and v.ndim == 2}


def diffusers_linears(model) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def shapes(pipes):
    """(out, in) of every Linear of the pipelines' transformer, by BFL name and by diffusers name."""
    return {**bfl_linears(pipes.ref.transformer, pipes.ours.cfg), **diffusers_linears(pipes.ref.transformer)}


@pytest.fixture(scope="module")
def kohya_converter():
    """diffusers' kohya/ComfyUI/OneTrainer converter with linear1 split at the tiny model's widths,
    also in diffusers' FluxPipeline.load_lora_weights for this module's tests."""
    from diffusers.loaders import lora_conversion_utils, lora_pipeline

    source = inspect.getsource(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)
    assert FULL_LINEAR1_DIMS in source, "diffusers' converter changed: revisit this fixture"
    namespace = dict(vars(lora_conversion_utils))
    exec(compile(source.replace(FULL_LINEAR1_DIMS, f"dims=[{H}, {H}, {H}, {MLP}]"), lora_conversion_utils.__file__,
                 "exec"), namespace)
    converter = namespace["_convert_kohya_flux_lora_to_diffusers"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", converter)
        yield converter


@pytest.fixture(scope="module")
def files(pipes, shapes, kohya_converter, tmp_path_factory):
    """One end-to-end LoRA file per layout (kohya_converter: diffusers loads them with it)."""
    tmp = tmp_path_factory.mktemp("layouts")
    sds = {"kohya": write(KOHYA_MODULES, lambda n: KOHYA + fold(n), shapes, "kohya", 10, KOHYA_SPLIT, E2E_GAIN),
           "comfyui": write(COMFY_MODULES, lambda n: COMFY + n, shapes, "kohya", 11, gain=E2E_GAIN),
           "onetrainer": write(ONETRAINER_MODULES, lambda n: ONETRAINER + fold(n), shapes, "kohya", 12, gain=E2E_GAIN),
           "xlabs": xlabs(XLABS_MODULES, seed=13, gain=E2E_GAIN)}
    for name, sd in sds.items():
        save_file(sd, tmp / f"{name}.safetensors")
    return {name: tmp / f"{name}.safetensors" for name in sds}


# ---------------------------------------------------------------- key semantics, every module


@pytest.fixture(scope="module")
def model():
    return diffusers_transformer(TINY)


def test_kohya_and_comfyui_every_module_as_diffusers_converts(model, kohya_converter):
    """Every BFL Linear of TINY (embedders, modulations, final layer, a split_qkv one), alphas != ranks
    (none on the final layer: diffusers ignores those), as sd-scripts and ComfyUI spell them."""
    modules = bfl_linears(model)
    final = {n for n in modules if n.startswith("final_layer")}
    spec = [(n, SPLIT * (1 + i % 2), None if n in final else 0.5 + i % 4) for i, n in enumerate(modules)]
    split = "double_blocks.0.txt_attn.qkv"
    for spell, seed in ((lambda n: KOHYA + fold(n), 0), (lambda n: COMFY + n, 1)):
        sd = write(spec, spell, modules, "kohya", seed, split)
        want = read_lora(kohya_converter(dict(sd)), TINY)
        assert_same_effect(read_lora(sd, TINY), want)
    # ComfyUI's PEFT-style endings (which diffusers does not read) mean the same as lora_down / lora_up.
    peft = write(spec, lambda n: COMFY + n, modules, "peft", 1, split)
    assert_same_effect(read_lora(peft, TINY), want)
    # BFL names bare or under PEFT's base_model.model. (fal's Kontext trainer) too.
    for prefix in ("", "base_model.model."):
        assert_same_effect(read_lora({prefix + k[len(COMFY):]: v for k, v in peft.items()}, TINY), want)


def test_onetrainer_every_module(model, kohya_converter):
    """What diffusers converts (attention, embedders, norm_out with its swapped halves) as it does;
    every module (feed-forward, modulations, proj_mlp too) as the same names in diffusers' layout."""
    shapes = diffusers_linears(model)
    sd = write([(n, 1 + i % 3, 0.5 + i % 4) for i, n in enumerate(shapes)], lambda n: ONETRAINER + fold(n),
               shapes, "kohya", 2)
    of = lambda names: {k: v for n in names for k, v in sd.items() if k.startswith(f"{ONETRAINER}{fold(n)}.")}
    converted = of(n for n in shapes if n.endswith(ATTENTION) or n in ONETRAINER_TOP)
    assert_same_effect(read_lora(converted, TINY), read_lora(kohya_converter(dict(converted)), TINY))
    renamed = {n + k[len(ONETRAINER + fold(n)):].replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v
               for n in shapes for k, v in of([n]).items()}
    assert_same_effect(read_lora(sd, TINY), read_lora(renamed, TINY))


def test_xlabs_every_module_as_diffusers_converts():
    """Every XLabs processor of TINY, with and without ComfyUI's prefix; no alpha (scale 1)."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    modules = [(f"double_blocks.{i}.processor.{p}", (3 * H if p.startswith("qkv") else H, H), 1 + (i + j) % 3)
               for i in range(TINY.depth) for j, p in enumerate(("qkv_lora1", "proj_lora1", "qkv_lora2", "proj_lora2"))]
    modules += [(f"single_blocks.{i}.processor.{p}", shape, 2 + i)
                for i in range(TINY.depth_single_blocks)
                for p, shape in (("qkv_lora", (3 * H, H)), ("proj_lora", (H, H + MLP)))]
    for prefix in ("", XLABS_PREFIX):
        sd = xlabs(modules, prefix, seed=3)
        got = read_lora(sd, TINY)
        assert_same_effect(got, read_lora(_convert_xlabs_flux_lora_to_diffusers(dict(sd)), TINY))
    linear1 = deltas(got)["single_blocks_0/linear1"]
    assert linear1[:, :3 * H].any() and not linear1[:, 3 * H:].any()  # q, k, v rows only, not the MLP's


# ---------------------------------------------------------------- end to end, each layout


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "onetrainer", "xlabs"])
def test_pipeline_matches_diffusers(pipes, files, layout):
    reset(pipes)
    for pipe in (pipes.ref, pipes.ours):
        pipe.load_lora_weights(str(files[layout]), adapter_name=layout)
    got = compare(pipes)  # latents rel <= 1e-4, images max |d| <= 2/255
    assert rel_err(got, pipes.base) > MIN_EFFECT
    if layout == "onetrainer":  # to_q alone: only the q rows of the fused qkv change
        qkv = deltas(read_lora(files[layout], pipes.ours.cfg))["double_blocks_0/img_attn/qkv"]
        assert qkv[:, :H].any() and not qkv[:, H:].any()
    reset(pipes)


def test_cli_accepts_a_kohya_file(cli_demo, files, tmp_path, capsys):
    """sample --demo --lora kohya.safetensors:0.8 gives diffusers' image at weight 0.8."""
    pipes = cli_demo
    out = tmp_path / "fox.png"
    args = ["--demo", "--seed", SEED, "--height", SIZE, "--width", SIZE, "--steps", STEPS, "--prompt", CALL["prompt"],
            "--lora", f"{files['kohya']}:0.8", "--out", out]
    assert sample_cli.main([str(a) for a in args]) == 0, capsys.readouterr().err
    pipes.ref.load_lora_weights(str(files["kohya"]), adapter_name="kohya")
    pipes.ref.set_adapters("kohya", 0.8)
    want = pipes.ref(latents=torch.from_numpy(pipes.noise), output_type="np", **CALL).images[0]
    assert np.abs(np.asarray(Image.open(out)) / 255 - want).max() <= PNG_TOL


# ---------------------------------------------------------------- what is refused, what is left out


def test_unknown_keys_are_listed(model):
    modules = bfl_linears(model)
    sd = write([("double_blocks.0.img_attn.qkv", 2, 1.0)], lambda n: KOHYA + fold(n), modules, "kohya", 4)
    extra = {f"{KOHYA}double_blocks_0_img_attn_norm_query_norm.lora_down.weight": torch.zeros(1, 8),  # not a Linear
             f"{KOHYA}double_blocks_0_img_attn_qkv.dora_scale": torch.zeros(1, H),  # DoRA
             f"{KOHYA}double_blocks_7_img_attn_qkv.lora_down.weight": torch.zeros(1, H)}  # no such block
    with pytest.raises(LoraError, match=r"3 key\(s\) that are not LoRA weights .* in the kohya sd-scripts layout: "
                                        r"lora_unet_double_blocks_0_img_attn_norm_query_norm"):
        read_lora({**sd, **extra}, TINY)
    with pytest.raises(LoraError, match="without both lora_down and lora_up: lora_unet_double_blocks_0_img_attn_qkv"):
        check_lora({k: v for k, v in sd.items() if "lora_up" not in k}, TINY)
    alpha = {k.replace("down.weight", "alpha"): torch.tensor(1.0) for k in xlabs(XLABS_MODULES[:1]) if "down" in k}
    with pytest.raises(LoraError, match=r"1 key\(s\) .* XLabs layout: double_blocks.0.processor.qkv_lora1.alpha"):
        read_lora({**xlabs(XLABS_MODULES[:1]), **alpha}, TINY)  # x-flux saves no alpha
    with pytest.raises(LoraError, match="not a LoRA in a known layout"):
        check_lora({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 8)}, TINY)  # SDXL
    with pytest.raises(LoraError, match=r"alpha \(2,\) \(want one number\)"):
        read_lora({**sd, f"{KOHYA}double_blocks_0_img_attn_qkv.alpha": torch.ones(2)}, TINY)


def test_text_encoder_keys_are_left_out_with_a_warning(model):
    """kohya's lora_te1_ (CLIP) keys: the transformer part loads, a warning names the rest."""
    modules = bfl_linears(model)
    sd = write([("single_blocks.1.linear1", 2, 1.0)], lambda n: KOHYA + fold(n), modules, "kohya", 5)
    te = {f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_{x}.weight": torch.zeros(1, 1)
          for x in ("down", "up")}
    check_lora({**sd, **te}, TINY)  # accepted up front (the CLI's check)
    with pytest.warns(UserWarning, match=r"2 text-encoder LoRA key\(s\) left out \(lora_te1_text_model_encoder"):
        got = read_lora({**sd, **te}, TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_effect(got, read_lora(sd, TINY))
    with pytest.raises(LoraError, match="only text-encoder LoRA keys"):
        check_lora(te, TINY)
