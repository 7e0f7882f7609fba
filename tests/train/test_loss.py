"""The training loss and its gradients against PyTorch autograd through diffusers' FluxTransformer2DModel.

The reference loss is built the way diffusers' FLUX training scripts build it: x_σ = (1 − σ)·x0 + σ·ε
on NCHW latents, packed with `FluxPipeline._pack_latents`, ids from `_prepare_latent_image_ids`
(Kontext: the condition's tokens appended with ids (1, r, c), predictions sliced to the target),
target ε − x0, `compute_loss_weighting_for_sd3` weights, mean over tokens then over the batch.

Gradients of the torch state dict are brought into our layout by the weight converter itself
(`diffusers_rules`: transposes, concatenations and a permutation, all linear in the tensors), so
every parameter is compared without a second hand-written mapping. LoRA: peft adapters on every
diffusers Linear; a fused layer of ours (qkv, linear1) has one `a` shared by its diffusers parts,
whose gradient is the sum of theirs, and a `b` whose gradient is theirs at the fused rows (the
row placement is convert.lora's, itself read off the same converter rules).
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from convert.core import DictReader, convert
from convert.lora import diffusers_targets
from convert.transformer import diffusers_rules
from flux_jax.config import LATENT_CHANNELS, TINY, FluxConfig
from flux_jax.lora import LoraLayer, mix
from flux_jax.model import Flux, param_shapes, unstack_layers
from flux_jax.train.loss import (SIGMA_EPS, WEIGHTINGS, LossConfig, draw, flow_loss, loss_weights,
                                 sample_sigmas)
from torch_ref import diffusers_transformer, rel_err

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
B, H, W = 2, 4, 6  # target latents (B, H, W, 16): 2 x 3 tokens
COND_HW = (6, 4)  # Kontext condition latents: 3 x 2 tokens (transposed shape: ids must not mix up)
N_TXT = 5
SIGMAS = np.array([0.23, 0.71], np.float32)
GUIDANCE = 1.0
LORA_RANK, LORA_ALPHA = 2, 3.0  # peft scale alpha / r = 1.5: not 1, so a dropped scale shows
SEED = 11
# Each graph here runs once, and XLA's CPU compile of a gradient dominates this file's runtime:
# LLVM at -O0 and the classic (not the MLIR) fusion emitters compile it ~4x faster. Neither
# changes float semantics (results agree to a few ulps); unknown options fall back to defaults.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


# ------------------------------------------------------------------ fixtures


def make_batch(cfg: FluxConfig, kontext: bool, seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {"latents": rng.standard_normal((B, H, W, LATENT_CHANNELS), np.float32),
             "txt": rng.standard_normal((B, N_TXT, cfg.context_in_dim), np.float32),
             "y": rng.standard_normal((B, cfg.vec_in_dim), np.float32)}
    if kontext:
        batch["control"] = rng.standard_normal((B, *COND_HW, LATENT_CHANNELS), np.float32)
    noise = rng.standard_normal((B, H, W, LATENT_CHANNELS), np.float32)
    return batch, noise


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def to_ours(cfg: FluxConfig, tensors: dict[str, np.ndarray]) -> dict:
    """A diffusers-layout tensor dict (weights or their gradients) -> our stacked param layout,
    by the checkpoint converter (which also fails on any tensor left unmapped)."""
    return convert(DictReader(tensors), diffusers_rules(cfg), param_shapes(cfg.replace(scan_layers=True)))


class Case:
    """One model (random perturbed weights) in both frameworks."""

    def __init__(self, cfg: FluxConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.torch = diffusers_transformer(cfg, seed)
        self.params = to_ours(cfg, state_dict_numpy(self.torch))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls: a second intra-op thread only spin-waits (a backward takes seconds, not
    milliseconds, on a busy host)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny() -> Case:
    return Case(TINY, SEED)


# ------------------------------------------------------------------ the two losses


def torch_loss(model, batch: dict, noise: np.ndarray, sigmas: np.ndarray, weighting: str) -> torch.Tensor:
    """The loss as diffusers' FLUX training scripts compute it (NCHW latents, packed tokens)."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    x0 = t(batch["latents"]).permute(0, 3, 1, 2)
    eps = t(noise).permute(0, 3, 1, 2)
    b, c, h, w = x0.shape
    sig = t(sigmas)
    s = sig.view(-1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps
    hidden = FluxPipeline._pack_latents(x_sigma, b, c, h, w)
    n_target = hidden.shape[1]
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    if batch.get("control") is not None:  # as FluxKontextPipeline.prepare_latents / __call__
        cond = t(batch["control"]).permute(0, 3, 1, 2)
        ch, cw = cond.shape[2:]
        cond_ids = FluxPipeline._prepare_latent_image_ids(b, ch // 2, cw // 2, "cpu", torch.float32)
        cond_ids[..., 0] = 1
        hidden = torch.cat([hidden, FluxPipeline._pack_latents(cond, b, c, ch, cw)], dim=1)
        img_ids = torch.cat([img_ids, cond_ids], dim=0)
    txt = t(batch["txt"])
    pred = model(hidden_states=hidden, timestep=sig, guidance=torch.full((b,), GUIDANCE),
                 pooled_projections=t(batch["y"]), encoder_hidden_states=txt,
                 txt_ids=torch.zeros(txt.shape[1], 3), img_ids=img_ids, return_dict=False)[0]
    pred = pred[:, :n_target]
    target = FluxPipeline._pack_latents(eps - x0, b, c, h, w)
    weights = compute_loss_weighting_for_sd3(weighting, sigmas=sig.view(-1, 1, 1))
    loss = torch.mean((weights.float() * (pred.float() - target.float()) ** 2).reshape(b, -1), 1)
    return loss.mean()


def jnp_batch(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def our_loss_fn(cfg: FluxConfig, batch: dict, noise, weighting: str, wrt: str | None = "params"):
    """flow_loss compiled: value_and_grad w.r.t. the `wrt` collection ("params" or "lora"), or,
    with wrt=None, the loss alone; called as f(x, rest) with variables {**rest, wrt: x}."""
    model, lcfg = Flux(cfg), LossConfig(weighting=weighting, guidance=GUIDANCE)
    batch, noise, sigmas = jnp_batch(batch), jnp.asarray(noise), jnp.asarray(SIGMAS)

    def f(x, rest):
        return flow_loss(model, {**rest, wrt or "params": x}, batch, noise, sigmas, lcfg)

    jitted = jax.jit(f if wrt is None else jax.value_and_grad(f))

    def run(x, rest):
        lowered = jitted.lower(x, rest)
        try:
            compiled = lowered.compile(FAST_COMPILE)
        except Exception as e:  # an XLA without these options: only slower
            if "compile option" not in str(e):
                raise
            compiled = lowered.compile()
        return compiled(x, rest)

    return run


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        out.update(flat(v, p) if isinstance(v, dict) else {p: np.asarray(v)})
    return out


def compare(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[float, str]:
    """Worst per-leaf relative error; the leaves must be the same set and no reference ~0."""
    assert sorted(ours) == sorted(ref)
    errs = {}
    for k in ref:
        assert np.linalg.norm(ref[k]) > 1e-8, f"reference gradient of {k} is ~0: the test would prove nothing"
        errs[k] = rel_err(ours[k], ref[k])
    worst = max(errs, key=errs.get)
    return errs[worst], worst


# ------------------------------------------------------------------ 1. loss parity


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_loss_matches_diffusers(tiny, weighting):
    batch, noise = make_batch(tiny.cfg, kontext=False)
    got = our_loss_fn(tiny.cfg, batch, noise, weighting, wrt=None)(tiny.params, {})
    with torch.no_grad():
        ref = torch_loss(tiny.torch, batch, noise, SIGMAS, weighting)
    err = rel_err(got, ref)
    print(f"loss[{weighting}]: ours {float(got):.6f} torch {ref.item():.6f} rel {err:.2e}")
    assert err <= LOSS_TOL, err


# ------------------------------------------------------------------ 2./3. full fine-tuning gradients


# A gradient's trace + compile (~5 s) is this file's main cost: full FT and LoRA each run both
# modes and both layouts, crossed, and a wider model (real head width and RoPE axes) once.
WIDE = FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64,
                  vec_in_dim=48, axes_dim=(16, 56, 56))


@pytest.fixture(scope="module")
def wide() -> Case:
    return Case(WIDE, SEED + 2)


@pytest.mark.parametrize("model,kontext,weighting,scan", [
    ("tiny", False, "cosmap", True), ("tiny", True, "sigma_sqrt", False), ("wide", True, "cosmap", True)],
    ids=["t2i-stacked", "kontext-per-layer", "wide-kontext-stacked"])
def test_full_gradients_match_torch_autograd(request, model, kontext, weighting, scan):
    case: Case = request.getfixturevalue(model)
    cfg = case.cfg.replace(scan_layers=scan)
    batch, noise = make_batch(cfg, kontext, seed=1)
    case.torch.zero_grad(set_to_none=True)
    ref_loss = torch_loss(case.torch, batch, noise, SIGMAS, weighting)
    ref_loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in case.torch.named_parameters()}
    case.torch.zero_grad(set_to_none=True)
    ref = flat(unstack_layers(to_ours(cfg, grads)))  # per-layer: each layer's leaf on its own

    params = case.params if scan else unstack_layers(case.params)
    loss, g = our_loss_fn(cfg, batch, noise, weighting)(params, {})
    g = jax.device_get(g)
    loss_err = rel_err(loss, ref_loss)
    err, worst = compare(flat(unstack_layers(g) if scan else g), ref)
    print(f"full FT {model} {'kontext' if kontext else 't2i'} {'stacked' if scan else 'per-layer'}: "
          f"loss rel {loss_err:.2e}, worst grad rel {err:.2e} ({worst}) over {len(ref)} leaves")
    assert loss_err <= LOSS_TOL, loss_err
    assert err <= GRAD_TOL, (worst, err)


# ------------------------------------------------------------------ 4. LoRA gradients


def random_adapter(targets: dict, seed: int) -> dict:
    """A LoRA on every Linear of ours, with non-zero a AND b (b = 0 would zero a's gradient)."""
    rng = np.random.default_rng(seed)
    adapter = {}
    for path, t in targets.items():
        a = rng.standard_normal((t.in_dim, LORA_RANK)).astype(np.float32) / math.sqrt(t.in_dim)
        b = 0.3 * rng.standard_normal((LORA_RANK, t.out_dim)).astype(np.float32)
        adapter[path] = LoraLayer(a, b, LORA_ALPHA / LORA_RANK)
    return adapter


class LoraCase:
    """diffusers with peft LoRA on every Linear, filled with the numbers of our adapter.

    Which diffusers modules make which rows of our fused Linears: convert.lora.diffusers_targets
    (read off the converter's rules), the mapping the LoRA file reader/writer uses.
    """

    def __init__(self, case: Case):
        import peft

        cfg = case.cfg
        self.cfg, self.params = cfg, case.params
        self.targets = diffusers_targets(cfg)
        model = diffusers_transformer(cfg, case.seed)  # the same base weights as case.params
        linears = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        modules = sorted(p.module for t in self.targets.values() for p in t.parts)
        assert linears == modules, "a diffusers Linear has no LoRA of ours (or the reverse)"
        model.add_adapter(peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights=False,
            target_modules="^(" + "|".join(map(re.escape, modules)) + ")$"))  # exactly these names
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        self.torch = model
        self.adapter = random_adapter(self.targets, case.seed + 1)
        self._fill()

    def _lora(self, name: str):
        mod = self.torch.get_submodule(name)
        return mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.scaling["default"]

    @torch.no_grad()
    def _fill(self):
        """Each part of a fused Linear: lora_A = a.T (tied: the same numbers in every part),
        lora_B = the part's rows of b (transposed); peft's alpha / r = our s."""
        for path, layer in self.adapter.items():
            for part in self.targets[path].parts:
                a, b, scale = self._lora(part.module)
                a.copy_(torch.from_numpy(np.ascontiguousarray(layer.a.T)))
                b.copy_(torch.from_numpy(np.ascontiguousarray(layer.b[:, part.rows].T)))
                assert scale == layer.scale

    def torch_grads(self, batch, noise, weighting) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """(loss, {our path/a|b: gradient}): a's = the sum over the tied diffusers A's, b's = the
        diffusers B's placed at their rows of our fused layer."""
        self.torch.zero_grad(set_to_none=True)
        loss = torch_loss(self.torch, batch, noise, SIGMAS, weighting)
        loss.backward()
        out = {}
        for path, t in self.targets.items():
            ga = np.zeros((t.in_dim, LORA_RANK), np.float32)
            gb = np.full((LORA_RANK, t.out_dim), np.nan, np.float32)
            for part in t.parts:
                da, db, _ = self._lora(part.module)
                ga += da.grad.numpy().T
                gb[:, part.rows] = db.grad.numpy().T
            assert not np.isnan(gb).any(), f"{path}: rows of b no diffusers part covers"
            out[f"{path}/a"], out[f"{path}/b"] = ga, gb
        base = [n for n, p in self.torch.named_parameters() if p.grad is not None and "lora_" not in n]
        assert not base, f"frozen base weights got gradients: {base[:3]}"
        self.torch.zero_grad(set_to_none=True)
        return loss, out


@pytest.fixture(scope="module")
def tiny_lora(tiny) -> LoraCase:
    return LoraCase(tiny)


@pytest.mark.parametrize("kontext,weighting,scan", [(False, "none", False), (True, "cosmap", True)],
                         ids=["t2i-per-layer", "kontext-stacked"])
def test_lora_gradients_match_peft(tiny_lora, kontext, weighting, scan):
    lc = tiny_lora
    cfg = lc.cfg.replace(scan_layers=scan)
    params = lc.params if scan else unstack_layers(lc.params)
    batch, noise = make_batch(cfg, kontext, seed=2)
    ref_loss, ref = lc.torch_grads(batch, noise, weighting)

    variables = mix([(lc.adapter, 1.0)], cfg)
    loss, g = our_loss_fn(cfg, batch, noise, weighting, wrt="lora")(
        variables["lora"], {"params": params, "lora_scale": variables["lora_scale"]})
    g = jax.device_get(g)
    got = flat(unstack_layers(g) if scan else g)
    loss_err = rel_err(loss, ref_loss)
    err, worst = compare(got, ref)
    print(f"LoRA {'kontext' if kontext else 't2i'} {'stacked' if scan else 'per-layer'}: loss rel {loss_err:.2e}, "
          f"worst grad rel {err:.2e} ({worst}) over {len(ref)} leaves")
    assert loss_err <= LOSS_TOL, loss_err
    assert err <= GRAD_TOL, (worst, err)


# ------------------------------------------------------------------ 5. σ samplers and weightings

N_DRAWS = 200_000


def _draw(sampler: str, **kw) -> tuple[np.ndarray, jax.Array]:
    cfg = LossConfig(sigma_sampler=sampler, **kw)
    rng = jax.random.PRNGKey(3)
    return np.asarray(sample_sigmas(rng, N_DRAWS, cfg, image_seq_len=1024), np.float64), rng


def test_uniform_sampler():
    s, rng = _draw("uniform")
    assert abs(s.mean() - 0.5) < 0.005 and abs(np.median(s) - 0.5) < 0.005
    assert s.min() >= np.float32(SIGMA_EPS) and s.max() < 1
    np.testing.assert_allclose(s, np.clip(np.asarray(jax.random.uniform(rng, (N_DRAWS,))), SIGMA_EPS, 1), rtol=0)


def test_logit_normal_sampler_is_diffusers_distribution():
    s, rng = _draw("logit_normal", logit_mean=0.3, logit_std=1.4)
    z = np.asarray(jax.random.normal(rng, (N_DRAWS,)), np.float64)
    np.testing.assert_allclose(s, 1 / (1 + np.exp(-(0.3 + 1.4 * z))), rtol=1e-6, atol=1e-7)
    assert abs(np.median(s) - 1 / (1 + math.exp(-0.3))) < 0.005
    ref = compute_density_for_timestep_sampling("logit_normal", N_DRAWS, logit_mean=0.3, logit_std=1.4,
                                                generator=torch.Generator().manual_seed(0)).numpy()
    q = np.linspace(0.05, 0.95, 19)  # same distribution: quantiles agree to sampling noise
    np.testing.assert_allclose(np.quantile(s, q), np.quantile(ref, q), atol=0.006)
    assert abs(np.median(_draw("logit_normal")[0]) - 0.5) < 0.005


def test_mode_sampler_is_diffusers_formula():
    scale = 1.29
    s, rng = _draw("mode", mode_scale=scale)
    numpy_mode = lambda u: 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
    u = np.asarray(jax.random.uniform(rng, (N_DRAWS,)), np.float64)
    np.testing.assert_allclose(s, np.clip(numpy_mode(u), SIGMA_EPS, 1), rtol=1e-5, atol=1e-6)
    # diffusers' transform on its own uniform draws (same generator state) is the same formula
    ref = compute_density_for_timestep_sampling("mode", 1000, mode_scale=scale,
                                                generator=torch.Generator().manual_seed(1)).numpy()
    u_ref = torch.rand(1000, generator=torch.Generator().manual_seed(1)).numpy().astype(np.float64)
    np.testing.assert_allclose(ref, numpy_mode(u_ref), rtol=1e-5, atol=1e-6)
    q = np.linspace(0.05, 0.95, 19)
    ref = compute_density_for_timestep_sampling("mode", N_DRAWS, mode_scale=scale,
                                                generator=torch.Generator().manual_seed(2)).numpy()
    np.testing.assert_allclose(np.quantile(s, q), np.quantile(ref, q), atol=0.006)


def test_fixed_shift_sampler_is_scheduler_shift():
    shift = 3.0
    s, rng = _draw("shift", shift=shift)
    u = np.asarray(jax.random.uniform(rng, (N_DRAWS,)), np.float64)
    np.testing.assert_allclose(s, np.clip(shift * u / (1 + (shift - 1) * u), SIGMA_EPS, 1), rtol=1e-5, atol=1e-7)
    # the same map as FlowMatchEulerDiscreteScheduler(shift=3)'s training sigmas (the scripts' get_sigmas)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    base = np.linspace(1, 1000, 1000)[::-1] / 1000
    np.testing.assert_allclose(sched.sigmas.numpy(), shift * base / (1 + (shift - 1) * base), rtol=1e-5)
    assert abs(np.median(s) - shift * 0.5 / (1 + (shift - 1) * 0.5)) < 0.005


def test_flux_shift_sampler_is_resolution_shifted_logit_normal():
    s, rng = _draw("flux_shift")
    mu = diffusers_calculate_shift(1024)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    u = torch.sigmoid(torch.from_numpy(np.asarray(jax.random.normal(rng, (N_DRAWS,)), np.float64)))
    np.testing.assert_allclose(s, sched.time_shift(mu, 1.0, u).numpy(), rtol=1e-5, atol=1e-7)
    assert abs(np.median(s) - math.exp(mu) / (math.exp(mu) + 1)) < 0.005  # the shifted 0.5
    # draw(): ε like the latents, and σ for (h/2)·(w/2) tokens (not h·w latent pixels)
    rng, lcfg = jax.random.PRNGKey(5), LossConfig(sigma_sampler="flux_shift")
    noise, sig = draw(rng, (8, 64, 48, 1), lcfg)
    assert noise.shape == (8, 64, 48, 1) and noise.dtype == sig.dtype == jnp.float32
    k_sigma = jax.random.split(rng)[1]
    np.testing.assert_array_equal(sig, sample_sigmas(k_sigma, 8, lcfg, 32 * 24))
    assert np.abs(np.asarray(sig) - np.asarray(sample_sigmas(k_sigma, 8, lcfg, 64 * 48))).max() > 1e-3


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_weightings_are_diffusers(weighting):
    sig = np.linspace(0.01, 0.99, 99).astype(np.float32)
    ref = compute_loss_weighting_for_sd3(weighting, sigmas=torch.from_numpy(sig)).numpy()
    np.testing.assert_allclose(np.asarray(loss_weights(jnp.asarray(sig), weighting)), ref, rtol=1e-6)
