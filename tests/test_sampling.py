"""Sampling parity with diffusers' FluxPipeline / FlowMatchEulerDiscreteScheduler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flux_jax import sampling as S
from flux_jax.config import LATENT_CHANNELS, VAE_DOWNSAMPLE

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps  # noqa: E402

# scheduler_config.json of FLUX.1-dev and FLUX.1-schnell.
DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
SCHNELL_SCHEDULER = dict(DEV_SCHEDULER, shift=1.0, use_dynamic_shifting=False)


def diffusers_sigmas(config, num_steps, image_seq_len, sigmas=None):
    """The scheduler state FluxPipeline.__call__ builds (its step 5, verbatim in effect)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(image_seq_len, config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler


@pytest.mark.parametrize("config,steps,height,width,sigmas,shift", [
    (DEV_SCHEDULER, 28, 1024, 1024, None, True),
    (DEV_SCHEDULER, 50, 768, 1360, None, True),
    (DEV_SCHEDULER, 20, 512, 512, None, True),
    (SCHNELL_SCHEDULER, 4, 1024, 1024, None, False),
    (DEV_SCHEDULER, 5, 1024, 768, [1.0, 0.8, 0.5, 0.2, 0.05], True),
    (DEV_SCHEDULER, 3, 512, 512, [1.0, 0.5, 0.0], True),  # a 0 sigma: 1/t = inf in both
])
@pytest.mark.filterwarnings("ignore:divide by zero")  # diffusers' own 1/0 for the 0 sigma
def test_schedule_matches_diffusers(config, steps, height, width, sigmas, shift):
    seq_len = (height // 16) * (width // 16)
    ref = diffusers_sigmas(config, steps, seq_len, sigmas)
    ours = S.get_schedule(None if sigmas else steps, seq_len, shift=shift, sigmas=sigmas)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,) and ours[-1] == 0
    np.testing.assert_array_equal(ours, ref.sigmas.numpy())  # bitwise
    # What the pipeline hands the transformer: t.to(latents.dtype) / 1000.
    for torch_dtype, jax_dtype in [(torch.float32, jnp.float32), (torch.bfloat16, jnp.bfloat16)]:
        fed = (ref.timesteps.to(torch_dtype) / 1000).float().numpy()
        np.testing.assert_array_equal(np.asarray(S.model_timesteps(ours, jax_dtype), np.float32), fed)


def test_calculate_shift_matches_diffusers():
    for n in (256, 1024, 4080, 4096, 8192):
        assert S.calculate_shift(n) == calculate_shift(n)


def test_schedule_rejects_wrong_length():
    with pytest.raises(ValueError):
        S.get_schedule(4, 1024, sigmas=[1.0, 0.5])


@pytest.mark.parametrize("h,w", [(4, 4), (6, 10), (64, 48)])
def test_pack_unpack_match_diffusers(h, w):
    nchw = torch.randn(2, LATENT_CHANNELS, h, w, generator=torch.Generator().manual_seed(h * w))
    ref_tokens = FluxPipeline._pack_latents(nchw, 2, LATENT_CHANNELS, h, w)
    nhwc = jnp.asarray(nchw.permute(0, 2, 3, 1).numpy())
    tokens = S.pack(nhwc)
    np.testing.assert_array_equal(np.asarray(tokens), ref_tokens.numpy())
    H, W = h * VAE_DOWNSAMPLE, w * VAE_DOWNSAMPLE
    ref_back = FluxPipeline._unpack_latents(ref_tokens, H, W, VAE_DOWNSAMPLE)
    back = S.unpack(tokens, H, W)
    np.testing.assert_array_equal(np.asarray(back), ref_back.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.asarray(back), np.asarray(nhwc))


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (64, 85)])
def test_ids_match_diffusers(h, w):
    ref = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32).numpy()
    ours = S.image_ids(h, w)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)
    kontext = S.image_ids(h, w, index=1)
    assert (kontext[:, 0] == 1).all() and np.array_equal(kontext[:, 1:], ref[:, 1:])
    np.testing.assert_array_equal(S.text_ids(7), np.zeros((7, 3), np.float32))


# XLA contracts x + dt * v (and a*x + b*t) into FMAs, torch/numpy don't: about 1 ulp a step.
EULER_TOL = dict(rtol=1e-5, atol=1e-5)

# A linear velocity field that also depends on t, the same formula in torch and JAX.
A, B_T = -0.7, 0.3


def velocity_jax(x, t):
    return A * x + B_T * t[:, None, None]


def velocity_torch(x, t):
    return A * x + B_T * t[:, None, None]


def start_state(batch=2, tokens=16, channels=64):
    return np.random.RandomState(0).randn(batch, tokens, channels).astype(np.float32)


def numpy_euler(x, sigmas, timesteps):
    for i in range(len(sigmas) - 1):
        v = (np.float32(A) * x + np.float32(B_T) * timesteps[i]).astype(np.float32)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def run_denoise(x0, sigmas, **kw):
    fn = jax.jit(lambda x, s, t: S.denoise(velocity_jax, x, s, t, **kw))
    return np.asarray(fn(x0, sigmas, S.model_timesteps(sigmas)))


def test_denoise_matches_numpy_euler():
    x0, sigmas = start_state(), S.get_schedule(28, 4096)
    ref = numpy_euler(x0, sigmas, S.model_timesteps(sigmas))
    np.testing.assert_allclose(run_denoise(x0, sigmas), ref, **EULER_TOL)


def test_denoise_matches_diffusers_scheduler_loop():
    x0, steps = start_state(), 28
    scheduler = diffusers_sigmas(DEV_SCHEDULER, steps, 4096)
    scheduler.set_begin_index(0)
    latents = torch.from_numpy(x0)
    for t in scheduler.timesteps:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        v = velocity_torch(latents, timestep / 1000)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    sigmas = S.get_schedule(steps, 4096)
    # The plain float32 Euler loop IS the scheduler's step, bit for bit.
    np.testing.assert_array_equal(numpy_euler(x0, sigmas, S.model_timesteps(sigmas)), latents.numpy())
    np.testing.assert_allclose(run_denoise(x0, sigmas), latents.numpy(), **EULER_TOL)


def test_denoise_untraced_default_timesteps_and_traced_error():
    x0, sigmas = start_state(), S.get_schedule(4, 1024, shift=False)
    np.testing.assert_array_equal(np.asarray(S.denoise(velocity_jax, x0, sigmas)), run_denoise(x0, sigmas))
    with pytest.raises(ValueError):
        jax.jit(lambda x, s: S.denoise(velocity_jax, x, s))(x0, sigmas)


def test_progress_called_each_step_and_hook_applied():
    x0, sigmas = start_state(), S.get_schedule(6, 1024)
    seen = []
    hook = lambda i, x: x.at[:, 0].set(i.astype(jnp.float32))  # noqa: E731
    out = run_denoise(x0, sigmas, progress=seen.append, step_hook=hook)
    jax.effects_barrier()
    assert [int(i) for i in seen] == list(range(6))
    np.testing.assert_array_equal(out[:, 0], np.full_like(out[:, 0], 5.0))
    callback, bar = S.tqdm_progress(6, "test")
    run_denoise(x0, sigmas, progress=callback)
    jax.effects_barrier()
    assert bar.n == 6
    bar.close()


def test_cfg_velocity():
    pos, neg = np.float32([1.0, 2.0]), np.float32([0.5, -1.0])
    np.testing.assert_allclose(S.cfg_velocity(pos, neg, 4.0), neg + 4.0 * (pos - neg))
    np.testing.assert_array_equal(S.cfg_velocity(pos, neg, 1.0), pos)
