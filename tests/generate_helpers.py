"""Shared by test_generate.py and test_distributed.py: one cached demo pipeline per (variant, mesh) for
the whole session, command-line runs in child processes with N CPU devices, and output readers."""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import flux_jax.demo

SIZE = 64  # pixels: 4x4 tokens, fast everywhere
STEPS = 2
FAST = ["--demo", "--height", str(SIZE), "--width", str(SIZE), "--steps", str(STEPS)]
CHILD_TIMEOUT = 600  # seconds; a child that hangs (a peer that never came) fails the test instead of the suite

_make_demo = flux_jax.demo.make_demo_pipeline


@functools.lru_cache(maxsize=None)
def cached_demo(variant="dev", cls=None, seed=0, dtype=None, mesh=None):
    """make_demo_pipeline, once per arguments: the compiled functions of a pipeline are reused."""
    kw = {} if mesh is None else {"mesh": mesh}
    return _make_demo(variant, cls=cls, seed=seed, dtype=dtype, **kw)


def child_env(devices: int = 1) -> dict:
    """The environment of a child process with `devices` CPU devices (XLA reads the flag when jax starts)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                                 if not f.startswith("--xla_force_host_platform_device_count")]
                                + [f"--xla_force_host_platform_device_count={devices}"])
    return env


def start(module: str, *args, devices: int = 1) -> subprocess.Popen:
    """`python -m module args...` in a child process with `devices` CPU devices; text stdout/stderr pipes."""
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], env=child_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a child; killed if it outlives CHILD_TIMEOUT."""
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[killed after {CHILD_TIMEOUT} s]"
    return proc.returncode, out, err


def run(module: str, *args, devices: int = 1) -> tuple[int, str, str]:
    return finish(start(module, *args, devices=devices))


def free_port() -> int:
    """A TCP port free on localhost now (the OS picks it), for a coordinator."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def png_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}
