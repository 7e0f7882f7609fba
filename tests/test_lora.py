"""LoRA: diffusers/PEFT files read and written (convert/lora.py), parity with diffusers' own LoRA
loading for the transformer (both layouts) and the pipeline (load, weights, two adapters, fuse,
unload), and `--lora` on the command line.

Three LoRAs for the TINY model: P made by PEFT and saved by diffusers' save_lora_weights (with its
LoraConfig: alpha, rank and alpha patterns), H written by hand in diffusers keys (parts of fused
layers only, `.alpha` keys, mixed ranks), B a random Adapter over every one of our Linear layers
written by write_lora (what the trainer writes).
"""
from __future__ import annotations

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import flux_jax.demo
from convert.core import DictReader, convert
from convert.lora import (LoraError, check_lora, diffusers_state_dict, diffusers_targets, read_lora,
                          write_lora)
from convert.transformer import diffusers_rules
from flux_jax import FluxPipeline, PipelineError
from flux_jax import generate as generate_cli
from flux_jax import sample as sample_cli
from flux_jax.config import DEV, TINY
from flux_jax.lora import LoraLayer, fuse, mix
from flux_jax.model import Flux, param_shapes, unstack_layers
from pipeline_fixtures import cached_flux_folder, load_diffusers_pipeline
from torch_ref import diffusers_transformer, rel_err

IMAGE_TOL = 2 / 255  # max |Δ| of float images in [0, 1]
PNG_TOL = IMAGE_TOL + 0.5 / 255  # a PNG adds its rounding to the nearest level
LATENT_TOL = 1e-4  # relative L2 of the packed final latents
MODEL_TOL = 1e-5  # relative L2 of one transformer forward in float32
MIN_EFFECT = 0.05  # relative change a LoRA must make, so that a parity check cannot pass by doing nothing
B_STD = 0.3  # lora_B entries (lora_A ~ N(0, 1/in)): updates about as large as the weights themselves
SIZE, STEPS, SEED = 32, 2, 7  # 2 x 2 tokens; the CLI test runs the same shapes (no extra compile)
CALL = dict(prompt="a red fox in the snow", height=SIZE, width=SIZE, num_inference_steps=STEPS)

# P: PEFT's target suffixes, default rank and alpha and per-module patterns (scale alpha / rank).
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.2",
                "ff_context.net.0.proj", "proj_mlp", "proj_out", "norm1.linear", "norm_out.linear", "x_embedder",
                "linear_1"]
PEFT_RANK, PEFT_ALPHA = 4, 8
PEFT_RANKS, PEFT_ALPHAS = {"to_k": 2, "proj_mlp": 3}, {"to_v": 3}
# H: parts of fused layers (q alone, k and v together, single-block k, proj_mlp alone) and the rest.
HAND_MODULES = ["context_embedder", "time_text_embed.guidance_embedder.linear_2",
                "time_text_embed.text_embedder.linear_2", "transformer_blocks.0.attn.to_q",
                "transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_v",
                "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.1.norm1_context.linear",
                "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.ff_context.net.2",
                "transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.0.attn.to_k",
                "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.norm.linear",
                "single_transformer_blocks.0.proj_out", "norm_out.linear", "proj_out"]
HAND_RANKS = (1, 2, 3)
HAND_ALPHA = 2.0
OUR_RANK, OUR_SCALE = 3, 0.5


# ---------------------------------------------------------------- the LoRAs


def hand_lora(model, seed: int = 0, prefix: str = "transformer.", alpha=HAND_ALPHA) -> dict[str, torch.Tensor]:
    """H: diffusers keys written by hand, independent A's for parts of fused layers."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, name in enumerate(HAND_MODULES):
        lin, r = model.get_submodule(name), HAND_RANKS[k % len(HAND_RANKS)]
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(r, lin.in_features, generator=g) / lin.in_features ** 0.5
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(lin.out_features, r, generator=g) * B_STD
        if alpha is not None:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return sd


@torch.no_grad()
def peft_lora_file(folder, seed: int = 1):
    """P: a PEFT LoRA on a diffusers transformer, saved as diffusers' training scripts save it."""
    from diffusers import FluxPipeline as DiffusersFlux
    from peft import LoraConfig, get_peft_model_state_dict

    model = diffusers_transformer(TINY, seed)
    config = LoraConfig(r=PEFT_RANK, lora_alpha=PEFT_ALPHA, target_modules=PEFT_TARGETS, rank_pattern=PEFT_RANKS,
                        alpha_pattern=PEFT_ALPHAS, init_lora_weights=False)
    model.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        elif "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * B_STD)
    DiffusersFlux.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model),
                                    transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def our_adapter(cfg, seed: int = 2, rank: int = OUR_RANK, scale: float = OUR_SCALE) -> dict:
    """B: a random Adapter over every Linear of our transformer (fused layers whole), with a scale."""
    rng = np.random.default_rng(seed)
    return {path: LoraLayer((rng.standard_normal((t.in_dim, rank)) / np.sqrt(t.in_dim)).astype(np.float32),
                            (rng.standard_normal((rank, t.out_dim)) * B_STD / scale).astype(np.float32), scale)
            for path, t in diffusers_targets(cfg).items()}


def deltas(adapter: dict) -> dict[str, np.ndarray]:
    """Each layer's kernel update a · scale · b, (in, out): what an adapter does."""
    return {p: (layer.a.astype(np.float64) * layer.scale) @ layer.b for p, layer in adapter.items()}


def assert_same_effect(got: dict, want: dict) -> None:
    got, want = deltas(got), deltas(want)
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)


# ---------------------------------------------------------------- reading and writing


def test_write_read_round_trip_and_keys(tmp_path):
    adapter = our_adapter(TINY)
    path = write_lora(adapter, tmp_path / "b.safetensors", TINY, metadata={"steps": "100"})
    assert_same_effect(read_lora(path, TINY), adapter)
    sd = diffusers_state_dict(adapter, TINY)
    modules = {p.module for t in diffusers_targets(TINY).values() for p in t.parts}
    assert set(sd) == {f"transformer.{m}.lora_{x}.weight" for m in modules for x in "AB"}
    qkv = adapter["double_blocks_1/img_attn/qkv"]  # shared a, each part its rows of b, scale folded in
    d = TINY.hidden_size
    np.testing.assert_array_equal(sd["transformer.transformer_blocks.1.attn.to_k.lora_A.weight"], qkv.a.T)
    np.testing.assert_allclose(sd["transformer.transformer_blocks.1.attn.to_k.lora_B.weight"],
                               (qkv.b[:, d:2 * d] * qkv.scale).T, rtol=1e-6)
    assert not list(tmp_path.glob(".*"))  # the temp file of the atomic write is gone


def test_prefixes_alpha_and_partial_fused_layers():
    model = diffusers_transformer(TINY)
    sd = hand_lora(model)
    base = read_lora(sd, TINY)
    for prefix in ("", "base_model.model."):  # no component prefix; PEFT's own saves
        assert_same_effect(read_lora(hand_lora(model, prefix=prefix), TINY), base)
    unscaled = read_lora(hand_lora(model, alpha=None), TINY)  # no alpha: scale 1
    d = TINY.hidden_size
    # to_q alone fills the q columns of the fused qkv; k and v stay zero. Its rank is 1: scale alpha / 1.
    q_a, q_b = (sd[f"transformer.transformer_blocks.0.attn.to_q.lora_{x}.weight"].numpy() for x in "AB")
    qkv = deltas(base)["double_blocks_0/img_attn/qkv"]
    np.testing.assert_allclose(qkv[:, :d], HAND_ALPHA * (q_b @ q_a).T, rtol=1e-5, atol=1e-7)
    assert not qkv[:, d:].any()
    # norm_out emits [scale, shift], ours [shift, scale]
    n_a, n_b = (sd[f"transformer.norm_out.linear.lora_{x}.weight"].numpy() for x in "AB")
    mod = deltas(unscaled)["final_modulation/lin"]
    np.testing.assert_allclose(mod, np.concatenate([(n_b @ n_a).T[:, d:], (n_b @ n_a).T[:, :d]], 1), rtol=1e-5)
    # k and v with independent A's: ranks stack, each part only its own rows of b
    kv = unscaled["double_blocks_1/img_attn/qkv"]
    k_a, k_b, v_a, v_b = (sd[f"transformer.transformer_blocks.1.attn.to_{p}.lora_{x}.weight"].numpy()
                          for p in "kv" for x in "AB")
    assert kv.rank == len(k_a) + len(v_a)
    np.testing.assert_array_equal(kv.a, np.concatenate([k_a.T, v_a.T], 1))
    np.testing.assert_array_equal(kv.b[:len(k_a), d:2 * d], k_b.T)
    np.testing.assert_array_equal(kv.b[len(k_a):, 2 * d:], v_b.T)
    assert not kv.b[:len(k_a), 2 * d:].any() and not kv.b[len(k_a):, :2 * d].any() and not kv.b[:, :d].any()


def test_peft_folder_config_and_metadata_scales(tmp_path):
    """alpha from PEFT's adapter_config.json (folder) or diffusers' file metadata, with patterns."""
    path = peft_lora_file(tmp_path / "p")
    adapter = read_lora(path, TINY)
    assert adapter["double_blocks_0/img_mlp/fc2"].scale == PEFT_ALPHA / PEFT_RANK
    assert adapter["single_blocks_0/linear1"].scale == 1.0  # parts of unequal scale: folded into b
    # the same tensors in a PEFT folder: adapter_model.safetensors + adapter_config.json
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])  # "transformer.lora_alpha": ...
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({k.replace("transformer.", "base_model.model.", 1): v for k, v in load_file(str(path)).items()},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({k.removeprefix("transformer."): v
                                                            for k, v in config.items()}))
    assert_same_effect(read_lora(folder, TINY), adapter)


def test_unknown_and_unfit_keys_are_named(tmp_path):
    model = diffusers_transformer(TINY)
    sd = hand_lora(model)
    extra = {f"text_encoder.layer_{i}.lora_A.weight": torch.zeros(1, 2) for i in range(12)}
    with pytest.raises(LoraError, match=r"12 key\(s\) .*text_encoder.layer_0.lora_A.weight.*\(and 2 more\)"):
        read_lora({**sd, **extra}, TINY)
    with pytest.raises(LoraError, match="without both lora_A and lora_B: transformer_blocks.0.attn.to_q"):
        read_lora({k: v for k, v in sd.items() if "to_q.lora_B" not in k}, TINY)
    with pytest.raises(LoraError, match="another FLUX size"):
        read_lora(sd, DEV)  # a TINY LoRA read for FLUX.1-dev's widths
    with pytest.raises(LoraError, match="not a LoRA in a known layout"):
        read_lora({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, TINY)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoraError, match="not a readable .safetensors"):
        check_lora(tmp_path / "junk.safetensors")
    with pytest.raises(LoraError, match="no such LoRA file"):
        check_lora(tmp_path / "missing.safetensors")
    with pytest.raises(LoraError, match="not Linear layers of this model"):
        write_lora({"double_blocks_9/img_attn/qkv": LoraLayer(np.zeros((64, 1)), np.zeros((1, 192)))},
                   tmp_path / "x.safetensors", TINY)
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- the transformer, both layouts


def flux_inputs(cfg, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h, w, n_txt = 3, 4, 5
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return dict(img=rng.standard_normal((1, h * w, cfg.in_channels), np.float32),
                img_ids=np.stack([np.zeros(h * w), r.ravel(), c.ravel()], -1).astype(np.float32),
                txt=rng.standard_normal((1, n_txt, cfg.context_in_dim), np.float32),
                txt_ids=np.zeros((n_txt, 3), np.float32), timesteps=np.array([0.6], np.float32),
                y=rng.standard_normal((1, cfg.vec_in_dim), np.float32), guidance=np.array([3.5], np.float32))


@torch.no_grad()
def torch_forward(model, x: dict) -> np.ndarray:
    t = lambda a: torch.from_numpy(np.asarray(a))
    return model(hidden_states=t(x["img"]), encoder_hidden_states=t(x["txt"]), pooled_projections=t(x["y"]),
                 timestep=t(x["timesteps"]), img_ids=t(x["img_ids"]), txt_ids=t(x["txt_ids"]),
                 guidance=t(x["guidance"]), return_dict=False)[0].numpy()


def jax_forward(cfg, params, x: dict, lora: dict) -> np.ndarray:
    return np.asarray(jax.jit(Flux(cfg).apply)({"params": params, **lora}, **{k: jnp.asarray(v) for k, v in x.items()}))


def test_transformer_parity_scanned_and_fusing_in_both_layouts(tmp_path):
    """H (parts of fused layers, alphas) at 1 plus B (our file) at 0.5 on the scanned transformer
    (layers an adapter skips are zero-padded in the stack); fusing gives the same kernels from
    stacked and per-layer variables: the update both adapters make. (The pipeline tests run unrolled.)"""
    from diffusers import FluxPipeline as DiffusersFlux

    scanned, unrolled = TINY.replace(scan_layers=True), TINY.replace(scan_layers=False)
    model = diffusers_transformer(TINY, seed=3)
    params = convert(DictReader({k: v.numpy() for k, v in model.state_dict().items()}), diffusers_rules(TINY),
                     param_shapes(scanned))
    x = flux_inputs(TINY)
    base = torch_forward(model, x)
    hand_file, ours_file = tmp_path / "h.safetensors", tmp_path / "b.safetensors"
    save_file(hand_lora(model), hand_file)
    write_lora(our_adapter(TINY), ours_file, TINY)

    ref = DiffusersFlux(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    ref.load_lora_weights(str(hand_file), adapter_name="hand")
    ref.load_lora_weights(str(ours_file), adapter_name="ours")
    ref.set_adapters(["hand", "ours"], [1.0, 0.5])
    want = torch_forward(model, x)
    assert rel_err(want, base) > MIN_EFFECT

    adapters = [(read_lora(hand_file, TINY), 1.0), (our_adapter(TINY), 0.5)]  # B itself, not read back
    assert rel_err(jax_forward(scanned, params, x, mix(adapters, scanned)), want) <= MODEL_TOL

    layers = unstack_layers(params)
    from_stacked = unstack_layers(jax.jit(fuse)(params, mix(adapters, scanned)))  # jit: one compile, not 70
    from_layers = jax.jit(fuse)(layers, mix(adapters, unrolled))
    update = {p: sum(w * deltas(a).get(p, 0) for a, w in adapters) for p in diffusers_targets(TINY)}
    for path, delta in update.items():
        node = lambda tree: functools.reduce(lambda n, k: n[k], path.split("/"), tree)["kernel"]
        np.testing.assert_allclose(node(from_stacked), node(layers) + delta, rtol=1e-5, atol=1e-6, err_msg=path)
        np.testing.assert_array_equal(node(from_stacked), node(from_layers), err_msg=path)


# ---------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """diffusers' and our pipeline on the same tiny folder, the LoRA files, and our image without LoRA."""
    tmp = tmp_path_factory.mktemp("lora")
    folder = cached_flux_folder("dev")
    ref, ours = load_diffusers_pipeline(folder, "dev"), FluxPipeline.from_pretrained(folder)
    p = peft_lora_file(tmp / "p")
    b = write_lora(our_adapter(ours.cfg), tmp / "b.safetensors", ours.cfg)
    noise = np.asarray(ours.initial_latents(None, 1, (SIZE // 16) ** 2, SEED))
    base = ours(latents=noise, output_type="latent", progress=False, **CALL).images
    return types.SimpleNamespace(ref=ref, ours=ours, p=p, b=b, noise=noise, base=base)


def reset(pipes) -> None:
    for pipe in (pipes.ref, pipes.ours):
        pipe.unload_lora_weights()


def compare(pipes, *, ref=None) -> np.ndarray:
    """diffusers and us from the same noise: latents within 1e-4, images within 2/255; our latents back."""
    ref = ref or pipes.ref
    latents = torch.from_numpy(pipes.noise)
    want = ref(latents=latents, output_type="latent", **CALL).images
    got = pipes.ours(latents=pipes.noise, output_type="latent", progress=False, **CALL).images
    assert rel_err(got, want) <= LATENT_TOL
    want_img = ref(latents=latents, output_type="np", **CALL).images
    got_img = pipes.ours(latents=pipes.noise, output_type="np", progress=False, **CALL).images
    assert np.abs(got_img - want_img).max() <= IMAGE_TOL
    return got


def load_both(pipes) -> None:
    """P and B into both pipelines, P first, so that [P, B] is the rank order of every mix below
    (one compiled sampler for all of them, and for the CLI test)."""
    reset(pipes)
    for pipe in (pipes.ref, pipes.ours):
        pipe.load_lora_weights(str(pipes.p), adapter_name="peft")
        pipe.load_lora_weights(str(pipes.b), adapter_name="ours")
        assert pipe.get_active_adapters() == ["ours"]  # the last loaded runs alone, as in diffusers


def test_pipeline_two_adapters_and_weights_match_diffusers(pipes):
    """P (made by PEFT, saved by diffusers) and B (written by write_lora, as the trainer writes)
    load in both; the same images at any weights, and new weights compile nothing."""
    load_both(pipes)
    assert pipes.ours.get_list_adapters() == {"transformer": ["peft", "ours"]}
    for pipe in (pipes.ref, pipes.ours):
        pipe.set_adapters(["peft", "ours"])
    full = compare(pipes)
    assert rel_err(full, pipes.base) > MIN_EFFECT
    n_compiled = len(pipes.ours._compiled)
    for weights in (0.5, [0.7, 0.4], [0.0, 1.0]):  # one for all; one each; B alone in effect
        for pipe in (pipes.ref, pipes.ours):
            pipe.set_adapters(["peft", "ours"], weights)
        assert rel_err(compare(pipes), full) > MIN_EFFECT
    assert len(pipes.ours._compiled) == n_compiled  # new weights, same shapes: nothing recompiled


def test_pipeline_fuse_unfuse_unload(pipes):
    load_both(pipes)
    weights = [0.7, 0.4]
    run = lambda: pipes.ours(latents=pipes.noise, output_type="latent", progress=False, **CALL).images
    pipes.ours.set_adapters(["peft", "ours"], [w * 0.5 for w in weights])
    side_half = run()
    for pipe in (pipes.ref, pipes.ours):
        pipe.set_adapters(["peft", "ours"], weights)
    side = run()
    for pipe in (pipes.ref, pipes.ours):
        pipe.fuse_lora(lora_scale=0.5)
    assert pipes.ours.lora_variables == {}  # no side branch once fused
    fused = compare(pipes)
    assert rel_err(fused, pipes.base) > MIN_EFFECT
    assert rel_err(fused, side_half) <= LATENT_TOL  # fusing changes nothing but where the update lives
    with pytest.raises(PipelineError, match="fused into the model; call unfuse_lora"):
        pipes.ours.set_adapters("ours", 1.0)
    with pytest.raises(PipelineError, match="fused into the model; call unfuse_lora"):
        pipes.ours.load_lora_weights(str(pipes.b), adapter_name="again")
    for pipe in (pipes.ref, pipes.ours):
        pipe.unfuse_lora()
    # The side branch is back at the set weights (diffusers keeps lora_scale in it; see LoraMixin).
    assert pipes.ours.get_active_adapters() == ["peft", "ours"]
    assert rel_err(run(), side) <= LATENT_TOL
    pipes.ours.fuse_lora()
    pipes.ours.unload_lora_weights()  # fused: the update is subtracted, base weights back
    assert pipes.ours.get_list_adapters() == {} and pipes.ours.lora_variables == {}
    assert rel_err(run(), pipes.base) <= LATENT_TOL


def test_pipeline_lora_errors(pipes):
    reset(pipes)
    ours = pipes.ours
    ours.load_lora_weights(str(pipes.p), adapter_name="peft")
    with pytest.raises(PipelineError, match="'peft' is already in use"):
        ours.load_lora_weights(str(pipes.p), adapter_name="peft")
    with pytest.raises(PipelineError, match="unknown or repeated adapter names"):
        ours.set_adapters(["peft", "nope"])
    ours.load_lora_weights(str(pipes.b))
    with pytest.raises(PipelineError, match="2 adapters but 1 weights"):
        ours.set_adapters(["peft", "default_1"], [0.5])
    with pytest.raises(PipelineError, match="a weight must be a finite number"):
        ours.set_adapters("peft", float("nan"))
    with pytest.raises(PipelineError, match="do not fit this model"):
        ours.load_lora_weights({"x_embedder.lora_A.weight": torch.zeros(2, 65),
                                "x_embedder.lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(PipelineError, match="no such LoRA file"):
        ours.load_lora_weights("missing.safetensors")
    assert ours.get_active_adapters() == ["default_1"]  # failed loads change nothing
    ours.unload_lora_weights()
    assert ours.get_list_adapters() == {}


# ---------------------------------------------------------------- the command line


@pytest.fixture
def cli_demo(pipes, monkeypatch):
    """--demo runs `pipes.ours` (a dev pipeline of the demo's TINY shapes): its compiled sampler is reused."""
    reset(pipes)
    monkeypatch.setattr(flux_jax.demo, "make_demo_pipeline", lambda *a, **kw: pipes.ours)
    yield pipes
    reset(pipes)


def test_cli_loras_match_diffusers(cli_demo, tmp_path, capsys):
    """sample --demo --lora P:0.7 --lora B:0.4 gives diffusers' image; generate the same PNG."""
    pipes = cli_demo
    out = tmp_path / "fox.png"
    common = ["--demo", "--seed", SEED, "--height", SIZE, "--width", SIZE, "--steps", STEPS,
              "--lora", f"{pipes.p}:0.7", "--lora", f"{pipes.b}:.4"]
    assert sample_cli.main([str(a) for a in common + ["--prompt", CALL["prompt"], "--out", out]]) == 0, \
        capsys.readouterr().err
    assert pipes.ours.lora_state.active == [("default_0", 0.7), ("default_1", 0.4)]
    assert Image.open(out).text["model"] == f"demo (random weights) + {pipes.p.name}:0.7 + {pipes.b.name}:0.4"
    png = np.asarray(Image.open(out)) / 255
    reference = lambda: pipes.ref(latents=torch.from_numpy(pipes.noise), output_type="np", **CALL).images[0]
    assert np.abs(png - reference()).max() > MIN_EFFECT  # the LoRAs show
    for path in (pipes.p, pipes.b):
        pipes.ref.load_lora_weights(str(path))
    pipes.ref.set_adapters(["default_0", "default_1"], [0.7, 0.4])
    assert np.abs(png - reference()).max() <= PNG_TOL

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(CALL["prompt"] + "\n")
    reset(pipes)
    job = common + ["--prompts", prompts, "--out", tmp_path / "job"]
    assert generate_cli.main([str(a) for a in job]) == 0, capsys.readouterr().err
    assert (tmp_path / "job" / "000000.png").read_bytes() == out.read_bytes()  # generate = sample, byte for byte


@pytest.mark.parametrize("main", [sample_cli.main, generate_cli.main], ids=["sample", "generate"])
@pytest.mark.parametrize("value, message", [
    ("missing.safetensors", "no such LoRA file"),
    ("{b}:nan", "scale must be a finite number"),
    ("{junk}:0.5", "not a LoRA in a known layout"),
    ("{b}:x", "no such LoRA file"),  # a non-number suffix is part of the file name
])
def test_cli_bad_lora_is_one_error_line(main, value, message, tmp_path, capsys):
    b = write_lora(our_adapter(TINY, rank=1), tmp_path / "b.safetensors", TINY)
    save_file({"foo.weight": torch.zeros(1)}, tmp_path / "junk.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    args = ["--demo", "--lora", value.format(b=b, junk=tmp_path / "junk.safetensors"), "--out", tmp_path / "o"]
    args += ["--prompt", "a fox"] if main is sample_cli.main else ["--prompts", prompts]
    assert main([str(a) for a in args]) == sample_cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --lora:") and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_lora_argument_scale_and_file_names(tmp_path):
    b = write_lora(our_adapter(TINY, rank=1), tmp_path / "b.safetensors", TINY)
    assert sample_cli.lora_argument(str(b)) == (str(b), 1.0)
    assert sample_cli.lora_argument(f"{b}:-0.25") == (str(b), -0.25)
    odd = write_lora(our_adapter(TINY, rank=1), tmp_path / "style:v2.safetensors", TINY)
    assert sample_cli.lora_argument(str(odd)) == (str(odd), 1.0)
    assert sample_cli.lora_argument(f"{odd}:2") == (str(odd), 2.0)


def test_cli_lora_for_another_model_fails_after_loading(cli_demo, tmp_path, capsys):
    model = diffusers_transformer(TINY.replace(hidden_size=32, num_heads=2, axes_dim=(4, 6, 6)))
    save_file(hand_lora(model, alpha=None), tmp_path / "other.safetensors")
    code = sample_cli.main(["--demo", "--prompt", "a fox", "--lora", str(tmp_path / "other.safetensors"),
                            "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == sample_cli.EXIT_BAD_INPUT and err[-1].startswith("error: --lora:") and "another FLUX size" in err[-1]
    assert sum(line.startswith("error:") for line in err) == 1 and not (tmp_path / "o.png").exists()
