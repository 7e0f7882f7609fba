"""Multi-host start-up (flux_jax.distributed) and real multi-process runs: two processes on localhost,
4 CPU devices each, make the same PNGs as one process on one device, each writing only its own."""
from __future__ import annotations

import argparse
import re

import pytest
from jax._src import cloud_tpu_init, xla_bridge

import flux_jax.demo
from flux_jax import distributed, generate, sample
from flux_jax.distributed import DistributedError
from generate_helpers import FAST, cached_demo, finish, free_port, manifest, png_bytes, start, write_prompts

GLOO_CHATTER = "[Gloo] "
PROMPTS = [f"a small {animal}" for animal in ("fox", "owl", "cat", "dog", "eel", "bee", "elk", "yak", "emu", "ant")]


def flags(*argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


# ---------------------------------------------------------------- flags and detection

@pytest.mark.parametrize("argv, needle", [
    (["--coordinator", "h:1"], "needs --num-processes and --process-id"),
    (["--num-processes", "2", "--process-id", "0"], "needs --coordinator"),
    (["--coordinator", "h", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "h:0", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "h:70000", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], "--num-processes"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "-1"], "from 0 to 1"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "from 0 to 1"),
])
def test_bad_flags(argv, needle):
    with pytest.raises(DistributedError, match=re.escape(needle)):
        distributed.check_arguments(flags(*argv))


def test_good_flags():
    assert distributed.check_arguments(flags()) is False
    for address in ("10.0.0.1:7777", "node-3.cluster:1", "[::1]:8476"):
        assert distributed.check_arguments(flags("--coordinator", address, "--num-processes", 4, "--process-id", 3))


@pytest.fixture
def fake_jax_distributed(monkeypatch):
    """Record jax.distributed.initialize calls instead of making them (this process has started JAX)."""
    calls = []
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr("jax.distributed.initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)
    monkeypatch.delenv(distributed.SLURM_STEP_TASKS, raising=False)
    return calls


def test_initialize_what_is_found(fake_jax_distributed, monkeypatch):
    calls = fake_jax_distributed
    assert distributed.initialize(flags()) is None and calls == []  # one process: nothing done
    monkeypatch.setenv(distributed.SLURM_STEP_TASKS, "1")  # an srun step of one task, or salloc
    assert distributed.initialize(flags()) is None and calls == []
    monkeypatch.setenv(distributed.SLURM_STEP_TASKS, "4")
    assert distributed.initialize(flags()) == "SLURM" and calls == [{}]  # JAX's own detection fills in all
    monkeypatch.delenv(distributed.SLURM_STEP_TASKS)
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    assert distributed.initialize(flags()) == "Cloud TPU" and calls == [{}, {}]
    # flags win, and name everything
    assert distributed.initialize(flags("--coordinator", "h:9", "--num-processes", 2, "--process-id", 1)) == "flags"
    assert calls[-1] == dict(coordinator_address="h:9", num_processes=2, process_id=1)


def test_join_failure_is_one_error(fake_jax_distributed, monkeypatch):
    def unreachable(**kw):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out\nmore detail")
    monkeypatch.setattr("jax.distributed.initialize", unreachable)
    with pytest.raises(DistributedError, match=r"cannot join the job at h:9 as process 1 of 2: RuntimeError"):
        distributed.initialize(flags("--coordinator", "h:9", "--num-processes", 2, "--process-id", 1))


def test_started_backend_is_refused(monkeypatch):
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="before anything touches JAX devices"):
        distributed.initialize(flags("--coordinator", "h:9", "--num-processes", 2, "--process-id", 1))


def test_partial_flags_in_sample_and_generate(tmp_path, capsys):
    for main in (sample.main, generate.main):
        prompts = write_prompts(tmp_path / "p.txt", ["x"])
        argv = ["--demo", "--prompt-file" if main is sample.main else "--prompts", str(prompts),
                "--out", str(tmp_path / "out"), "--process-id", "1"]
        assert main(argv) == sample.EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --process-id needs --coordinator and --num-processes") and "\n" not in err
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- two processes on localhost

def job(*argv, processes: int, devices: int, module: str = "flux_jax.generate"):
    """Start `processes` processes of one job on localhost, `devices` CPU devices each; their results."""
    address = f"127.0.0.1:{free_port()}"
    procs = [start(module, *argv, "--coordinator", address, "--num-processes", processes, "--process-id", i,
                   devices=devices) for i in range(processes)]
    return [finish(p) for p in procs]


def test_two_processes_eight_devices_match_one_device(tmp_path, capsys, monkeypatch):
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS)  # 10: a full batch of 8, then 2 and 6 padding rows
    out = tmp_path / "two"
    results = job("--prompts", prompts, "--out", out, "--mesh", "data=8", "--batch-size", 8, "--seed", 3, *FAST,
                  processes=2, devices=4)
    for code, _, err in results:
        assert code == 0, err

    monkeypatch.setattr(flux_jax.demo, "make_demo_pipeline", cached_demo)
    ref = tmp_path / "one"
    assert generate.main(["--prompts", str(prompts), "--out", str(ref), "--batch-size", "1", "--seed", "3",
                          *FAST]) == 0, capsys.readouterr().err
    expected, got = png_bytes(ref), png_bytes(out)
    assert len(expected) == len(PROMPTS) and got.keys() == expected.keys()
    assert [name for name in expected if got[name] != expected[name]] == []

    # Each image written once, by one process; both wrote some; only process 0 showed progress.
    records = manifest(out)
    assert sorted(r["index"] for r in records) == list(range(len(PROMPTS)))
    by_process = {p: sorted(r["index"] for r in records if r["process"] == p) for p in (0, 1)}
    assert by_process[0] and by_process[1], by_process
    for p, (_, _, err) in enumerate(results):
        assert f"process {p}: wrote {len(by_process[p])} images" in err, err
    assert "img/s" in results[0][2] and "img/s" not in results[1][2] and "generating" not in results[1][2]


def test_sample_in_two_processes(tmp_path, capsys, monkeypatch):
    """sample joins the job with the same flags; the processes agree on a drawn seed; process 0 writes."""
    results = job("--prompt", "a fox", "--out", tmp_path / "two", *FAST, processes=2, devices=1,
                  module="flux_jax.sample")
    for code, _, err in results:
        assert code == 0, err
    seeds = {re.search(r"seed: (\d+)", err).group(1) for _, _, err in results}
    assert len(seeds) == 1, seeds
    seed = seeds.pop()
    # stdout lists the written files (gloo's C++ code prints its connections there too: not ours)
    written = [[line for line in out.splitlines() if not line.startswith(GLOO_CHATTER)] for _, out, _ in results]
    assert written == [[str(tmp_path / "two" / f"flux_{seed}_0.png")], []]
    monkeypatch.setattr(flux_jax.demo, "make_demo_pipeline", cached_demo)
    ref = tmp_path / "one.png"
    assert sample.main(["--prompt", "a fox", "--seed", seed, "--out", str(ref), *FAST]) == 0
    assert (tmp_path / "two" / f"flux_{seed}_0.png").read_bytes() == ref.read_bytes()
