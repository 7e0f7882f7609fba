"""Step caching (flux_jax/cache.py): the model's stages compose to the whole forward (as FBCache and as
TaylorSeer split it); threshold 0 gives the uncached latents; a huge threshold computes the first and
last steps only, exactly as a hand-written loop does (true CFG: one batch, one decision); the FBCache
decision agrees with numpy on the residuals the loop saw, and its step counter with a count on the
host; TaylorSeer extrapolates polynomials of its order exactly; bad settings get one clear error;
--cache on the CLIs."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import flux_jax.demo
from flux_jax import FluxPipeline, generate, sample
from flux_jax.cache import (CacheError, FirstBlockCache, TaylorSeer, cached_model, parse_cache, relative_l1,
                            steps_computed)
from flux_jax.config import parse_dtype
from flux_jax.layers import rope
from flux_jax.model import BLOCKS, FIRST_BLOCK, Flux, unstack_layers
from flux_jax.sampling import cfg_velocity, denoise, get_schedule, image_ids, model_timesteps, text_ids
from generate_helpers import cached_demo

PROMPT = "a red fox"
SIDE, TOKENS = 64, 16  # pixels, image tokens (4 x 4)
STEPS = 6
# As `sample --demo --height 64 --width 64 --steps 6` runs (512 text tokens): the CLI tests reuse these compilations.
SETTINGS = dict(height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=3.5, output_type="latent",
                progress=False)
TRUE_CFG = dict(negative_prompt="blurry", true_cfg_scale=3.0)
EXACT = dict(rtol=1e-5, atol=1e-5)  # fp32: the same operations, fused differently (measured ≤ 1.3e-6)


# ---------------------------------------------------------------- the model's stages

def demo_pipeline() -> FluxPipeline:
    """The pipeline `sample --demo` makes (the CLI tests below share it and its compilations)."""
    return cached_demo("dev", cls=FluxPipeline, dtype=parse_dtype("fp32"))


@functools.lru_cache(maxsize=None)
def tiny_model():
    """(Flux module, params, inputs by name): the demo's transformer (TINY: 2 double blocks, so "the rest"
    starts at 1), unrolled as on GPUs (the pipeline tests run the scanned layout), with Kontext reference
    tokens, so the image stream is longer than the generated image."""
    pipe = demo_pipeline()
    cfg = pipe.cfg.replace(scan_layers=False)
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    batch, n_txt, n_ref = 2, 5, 8
    inputs = dict(img=normal(batch, TOKENS, cfg.in_channels), img_ids=image_ids(4, 4),
                  txt=normal(batch, n_txt, cfg.context_in_dim), txt_ids=text_ids(n_txt),
                  timesteps=jnp.full((batch,), 0.7), y=normal(batch, cfg.vec_in_dim), guidance=jnp.full((batch,), 3.5),
                  cond_seq=normal(batch, n_ref, cfg.in_channels),
                  cond_seq_ids=jnp.broadcast_to(image_ids(2, 4, index=1), (batch, n_ref, 3)))
    return Flux(cfg), unstack_layers(pipe.params), inputs


def model_forward(model, params, inputs):
    """forward(img, t, **stage), the interface the cache runs the model through."""
    def forward(img, t, **stage):
        return model.apply({"params": params}, **{**inputs, "img": img, "timesteps": t}, **stage)
    return forward


def test_stages_compose_to_the_whole_forward():
    model, params, inputs = tiny_model()
    forward = model_forward(model, params, inputs)

    @jax.jit
    def parts(img, t):
        (before, after) = forward(img, t, stop=FIRST_BLOCK)
        tokens = forward(img, t, start=FIRST_BLOCK, stop=BLOCKS, streams=after)
        in_two = forward(img, t, start=BLOCKS, streams=forward(img, t, stop=BLOCKS))  # as TaylorSeer splits it
        return forward(img, t), forward(img, t, start=BLOCKS, streams=tokens), in_two, tokens, before, after

    whole, in_three, in_two, tokens, before, after = parts(inputs["img"], inputs["timesteps"])
    np.testing.assert_allclose(in_three, whole, **EXACT)
    np.testing.assert_allclose(in_two, whole, **EXACT)
    hidden = model.cfg.hidden_size
    assert before[0].shape == after[0].shape == (2, TOKENS + 8, hidden)  # with the reference tokens
    assert tokens.shape == (2, TOKENS, hidden)
    assert float(relative_l1(after[0], before[0])) > 0.01  # the first block does something


def test_stage_arguments_are_checked():
    model, params, inputs = tiny_model()
    forward = model_forward(model, params, inputs)
    img, t = inputs["img"], inputs["timesteps"]
    with pytest.raises(ValueError, match="cannot run from 'blocks' to 'first_block'"):
        forward(img, t, start=BLOCKS, stop=FIRST_BLOCK, streams=img)
    with pytest.raises(ValueError, match="needs streams"):
        forward(img, t, start=FIRST_BLOCK)


# ---------------------------------------------------------------- the cached loop, on the model

def cached_loop(cache, forward, x0, sigmas):
    """(latents, steps computed): `cache` around `forward` in the jitted Euler loop, as the pipeline runs it."""
    timesteps = model_timesteps(sigmas)

    @jax.jit
    def run(x0):
        step, state = cached_model(cache, forward, x0, jnp.full(x0.shape[:1], timesteps[0]), len(sigmas) - 1)
        x, state = denoise(step, x0, sigmas, timesteps, state=state)
        return x, steps_computed(state)

    x, computed = run(x0)
    return np.asarray(x), int(computed)


def recording(forward, seen: dict):
    """`forward`, noting on the host each step's first-block residual and which steps ran the rest (by t)."""
    def wrapped(img, t, **stage):
        out = forward(img, t, **stage)
        if stage.get("stop") == FIRST_BLOCK:
            before, after = out  # (img, txt) streams around the first double block
            jax.debug.callback(lambda t, r: seen["residual"].__setitem__(float(t[0]), np.array(r)), t,
                               after[0] - before[0])
        if stage.get("start") == FIRST_BLOCK:  # only on the full path
            jax.debug.callback(lambda t: seen["full"].append(float(t[0])), t)
        return out
    return wrapped


def numpy_fbcache(residuals: list[np.ndarray], threshold: float) -> list[bool]:
    """First-Block Cache's decisions, written again: compare with the last fully computed step's residual."""
    last, reference, computed = len(residuals) - 1, None, []
    for i, r in enumerate(residuals):
        r = r.astype(np.float64)
        compute = i in (0, last) or np.abs(r - reference).mean() / np.abs(reference).mean() > threshold
        if compute:
            reference = r
        computed.append(compute)
    return computed


def test_fbcache_decisions_and_count_match_numpy():
    model, params, inputs = tiny_model()
    sigmas = get_schedule(10, TOKENS)
    timesteps = [float(t) for t in model_timesteps(sigmas)]
    threshold = 0.6  # this random model's first-block residual changes by 0.42 to 0.77 a step

    seen = {"residual": {}, "full": []}
    _, computed = cached_loop(FirstBlockCache(threshold), recording(model_forward(model, params, inputs), seen),
                              inputs["img"], sigmas)
    expected = numpy_fbcache([seen["residual"][t] for t in timesteps], threshold)
    assert [t in seen["full"] for t in timesteps] == expected
    assert computed == len(seen["full"]) == sum(expected)
    assert 2 < computed < len(timesteps)  # both outcomes happened


@pytest.mark.parametrize("order, degree", [(1, 1), (2, 2), (1, 2)])
def test_taylorseer_extrapolates_polynomials_of_its_order_exactly(order, degree):
    rng = np.random.default_rng(order + degree)
    coefficients = jnp.asarray(rng.standard_normal((degree + 1, 2, 3, 4)), jnp.float32)
    feature = lambda t: sum(c * t ** k for k, c in enumerate(coefficients))  # polynomial in t
    full_steps = []

    def forward(img, t, start=None, stop=None, streams=None):
        if stop == BLOCKS:
            jax.debug.callback(lambda t: full_steps.append(float(t[0])), t)
            return feature(t[0])
        assert start == BLOCKS
        return streams  # the "final layer": shows the tokens

    cache = TaylorSeer(interval=4, order=order)
    timesteps = model_timesteps(get_schedule(12, 4096))  # unevenly spaced, as FLUX's shifted schedule is
    img = jnp.zeros((2, 3, 4))
    step, state = cached_model(cache, forward, img, jnp.full((2,), timesteps[0]), len(timesteps))
    step = jax.jit(step)
    errors = []
    for i, t in enumerate(timesteps):
        out, state = step(img, jnp.full((2,), t), jnp.int32(i), state)
        errors.append(float(jnp.abs(out - feature(jnp.float32(t))).max()))
    expected_full = [i for i in range(len(timesteps)) if i <= order or i % 4 == 0 or i == len(timesteps) - 1]
    assert full_steps == [float(timesteps[i]) for i in expected_full]
    assert int(steps_computed(state)) == len(expected_full) < len(timesteps)
    if order >= degree:
        assert max(errors) < 1e-4, errors
    else:  # a line through a parabola's points misses it: the check can fail
        assert max(errors) > 1e-2, errors


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("spec, config", [("fbcache:0.08", FirstBlockCache(0.08)), (" FBCache:1e9 ", FirstBlockCache(1e9)),
                                          ("taylorseer:4", TaylorSeer(4, 1)), ("taylorseer:3:2", TaylorSeer(3, 2)),
                                          (None, None), (TaylorSeer(2), TaylorSeer(2))])
def test_parse(spec, config):
    assert parse_cache(spec) == config


@pytest.mark.parametrize("spec", ["fbcache", "fbcache:fast", "fbcache:-0.1", "fbcache:nan", "fbcache:0.1:2",
                                  "taylorseer", "taylorseer:0", "taylorseer:2:3", "taylorseer:1.5", "teacache:0.1",
                                  "", 0.08])
def test_bad_settings_name_the_accepted_forms(spec):
    with pytest.raises(CacheError) as e:
        parse_cache(spec)
    assert "fbcache:THRESHOLD" in str(e.value) and "taylorseer:INTERVAL[:ORDER]" in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def pipe():
    return demo_pipeline()


@pytest.fixture(scope="module")
def noise():
    return np.asarray(jax.random.normal(jax.random.PRNGKey(3), (1, TOKENS, 64)))


@pytest.fixture(scope="module")
def uncached(pipe, noise):
    return pipe(PROMPT, latents=noise, **SETTINGS)


def test_uncached_reports_every_step(uncached):
    assert uncached.timings["steps_computed"] == uncached.timings["steps"] == STEPS


def test_threshold_zero_matches_uncached(pipe, noise, uncached):
    out = pipe(PROMPT, latents=noise, cache="fbcache:0", **SETTINGS)
    assert out.timings["steps_computed"] == STEPS
    np.testing.assert_allclose(out.images, uncached.images, **EXACT)


def test_huge_threshold_with_true_cfg_computes_first_and_last_step_only(pipe, noise):
    out = pipe(PROMPT, cache="fbcache:1e9", **TRUE_CFG, latents=noise, **SETTINGS)
    assert out.timings["steps_computed"] == 2

    # By hand: the positive and negative branches in one batch (one decision for both); steps 0 and 5
    # run everything, steps 1-4 add step 0's residual of the later blocks to their first block's output.
    (txt, y), (neg_txt, neg_y) = (pipe.encode_prompt(p, max_sequence_length=512)
                                  for p in (PROMPT, TRUE_CFG["negative_prompt"]))
    txt, y = jnp.concatenate([txt, neg_txt]), jnp.concatenate([y, neg_y])
    sigmas = pipe.schedule(STEPS, TOKENS)
    ids = np.concatenate([text_ids(txt.shape[1]), image_ids(4, 4)])
    pe = rope(jnp.asarray(ids)[None], pipe.cfg.axes_dim, pipe.cfg.theta)
    f = lambda x, t, **stage: pipe.transformer.apply({"params": pipe.params}, jnp.concatenate([x, x]), None, txt,
                                                     None, jnp.full((2,), t), y, jnp.full((2,), 3.5), pe=pe, **stage)
    guided = lambda v: cfg_velocity(v[:1], v[1:], TRUE_CFG["true_cfg_scale"])

    @jax.jit
    def step(x, t, rest):  # (velocity computed, velocity from `rest`, this step's residual of the later blocks)
        _, after = f(x, t, stop=FIRST_BLOCK)
        tokens = f(x, t, start=FIRST_BLOCK, stop=BLOCKS, streams=after)
        return (guided(f(x, t, start=BLOCKS, streams=tokens)), guided(f(x, t, start=BLOCKS, streams=after[0] + rest)),
                tokens - after[0])

    x = every = jnp.asarray(noise)  # every: all steps computed
    rest = jnp.zeros((2, TOKENS, pipe.cfg.hidden_size))
    for i, t in enumerate(model_timesteps(sigmas)):
        computed, cached, residual = step(x, t, rest)
        rest = residual if i == 0 else rest
        x = x + (sigmas[i + 1] - sigmas[i]) * (computed if i in (0, STEPS - 1) else cached)
        every = every + (sigmas[i + 1] - sigmas[i]) * step(every, t, rest)[0]
    np.testing.assert_allclose(out.images, x, rtol=1e-5, atol=1e-5)
    assert np.abs(out.images - every).max() > 1e-3  # the cache changed something


def test_bad_cache_fails_before_any_work(pipe):
    with pytest.raises(CacheError, match="fbcache:THRESHOLD"):
        pipe(PROMPT, cache="fbcache", **SETTINGS)


# ---------------------------------------------------------------- the command lines

@pytest.fixture
def shared_demo(monkeypatch, tmp_path_factory):
    monkeypatch.setattr(flux_jax.demo, "make_demo_pipeline", cached_demo)
    monkeypatch.delenv(sample.MODEL_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty_hub")))


def test_sample_cli(tmp_path, capsys, shared_demo):
    out = tmp_path / "fox.png"
    argv = ["--demo", "--prompt", PROMPT, "--seed", "3", "--height", str(SIDE), "--width", str(SIDE),
            "--steps", str(STEPS), "--negative-prompt", TRUE_CFG["negative_prompt"], "--true-cfg", "3",
            "--out", str(out)]
    code = sample.main([*argv, "--cache", "fbcache:1e9"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"fbcache:1e+09: 2 of {STEPS} steps computed" in err
    with Image.open(out) as im:
        assert im.text["cache"] == "fbcache:1e+09"

    assert sample.main([*argv, "--cache", "fbcache:fast"]) == sample.EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument --cache: unknown cache setting 'fbcache:fast'")


def test_generate_cli(tmp_path, capsys, shared_demo, monkeypatch):
    # sample's pipeline (one device either way): the sampler compiled above is reused.
    monkeypatch.setattr(flux_jax.demo, "make_demo_pipeline", lambda *a, mesh=None, **kw: cached_demo(*a, **kw))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "negative_prompt": TRUE_CFG["negative_prompt"]}) + "\n")
    code = generate.main(["--demo", "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--height", str(SIDE),
                          "--width", str(SIDE), "--steps", str(STEPS), "--true-cfg", "3", "--cache", "fbcache:1e9"])
    assert code == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "000000.png") as im:
        assert im.text["cache"] == "fbcache:1e+09"
    assert json.loads((tmp_path / "out" / generate.MANIFEST).read_text())["prompt"] == PROMPT
