"""The persistent compilation cache: a second CLI process with the same shapes compiles nothing big.

Each run is a fresh process (JAX decides once per process whether the cache is used), counting
JAX's own monitoring events of cache hits and misses around flux_jax.sample's main().
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from flux_jax import compile_cache

DRIVER = """
import json, sys
import jax
from flux_jax import compile_cache
from flux_jax.sample import main
compile_cache.MIN_COMPILE_SECS = 0.0  # every program written: counts that do not depend on the machine's load
counts = {"hits": 0, "misses": 0}
def listen(event, **_):
    for name in counts:
        if event == "/jax/compilation_cache/cache_" + name:
            counts[name] += 1
jax.monitoring.register_event_listener(listen)
rc = main(sys.argv[1:])
print("COUNTS " + json.dumps({**counts, "rc": rc, "dir": jax.config.jax_compilation_cache_dir}))
"""


def run_sample(tmp: Path, out: str, env_cache: str, *flags: str) -> dict:
    env = {**os.environ, compile_cache.ENV: env_cache}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    args = ["--demo", "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--seed", "3",
            "--out", str(tmp / out), *flags]
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("COUNTS ")][-1]
    return json.loads(line[len("COUNTS "):])


def test_second_process_reads_its_programs_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = run_sample(tmp_path, "a.png", str(cache))
    written = sorted(cache.glob("*-cache"))  # one file per program compiled (MIN_COMPILE_SECS 0 here)
    assert first["rc"] == 0 and first["dir"] == str(cache)
    assert first["hits"] == 0 and len(written) == first["misses"] >= 1
    second = run_sample(tmp_path, "b.png", str(cache))
    assert second["hits"] == len(written) and second["misses"] == 0  # nothing compiled again
    assert sorted(cache.glob("*-cache")) == written
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png"))
    np.testing.assert_array_equal(a, b)  # a loaded executable computes the same image


def test_no_compile_cache_flag(tmp_path):
    cache = tmp_path / "cache"
    r = run_sample(tmp_path, "a.png", str(cache), "--no-compile-cache")
    assert r["dir"] is None and r["hits"] == r["misses"] == 0 and not cache.exists()


def test_off_value_turns_it_off(monkeypatch, tmp_path):
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(compile_cache.ENV, "off")
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None
        assert compile_cache.enable(tmp_path / "explicit") == tmp_path / "explicit"  # an explicit folder wins
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "explicit")
    finally:  # the rest of this test process as it was
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


def test_default_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / "flux_jax" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.default_dir() == tmp_path / "mine"
