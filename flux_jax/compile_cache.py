"""Persistent XLA compilation cache: a second process with the same shapes loads its executables from disk.

Compiling the denoising loop of the full model takes tens of seconds (unrolled blocks on a GPU) and
is the same work every run; JAX can keep compiled executables in a folder keyed by the program, its
shapes, the jax/XLA versions and the devices. The command-line tools turn this on by default in a
user cache folder (`--no-compile-cache` turns it off); in Python, `flux_jax.compile_cache.enable()`
does (a library import changes no global JAX setting by itself). The folder can be moved with
FLUX_JAX_COMPILE_CACHE=DIR, or the cache turned off everywhere with FLUX_JAX_COMPILE_CACHE=off. A folder the user set themselves
(jax.config.update("jax_compilation_cache_dir", ...) or JAX_COMPILATION_CACHE_DIR) is left alone.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import jax

ENV = "FLUX_JAX_COMPILE_CACHE"  # a folder, or one of OFF_VALUES
OFF_VALUES = ("0", "off", "false", "no", "none")
# Only programs that took this long to compile are written: the many small jitted helpers (placing and
# stacking params) compile in milliseconds and would only add files.
MIN_COMPILE_SECS = 0.5


def default_dir() -> Path:
    """$FLUX_JAX_COMPILE_CACHE, else $XDG_CACHE_HOME/flux_jax/xla, else ~/.cache/flux_jax/xla."""
    if os.environ.get(ENV) and os.environ[ENV].lower() not in OFF_VALUES:
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flux_jax" / "xla"


def disabled_by_env() -> bool:
    return os.environ.get(ENV, "").lower() in OFF_VALUES and bool(os.environ.get(ENV))


def enable(path: str | os.PathLike | None = None) -> Optional[Path]:
    """Turn the cache on in `path` (default: default_dir()); returns the folder in use, None if it is off.

    Works at any time in a process: executables compiled before are simply not in it.
    """
    from jax.experimental.compilation_cache import compilation_cache

    current = jax.config.jax_compilation_cache_dir
    if current:  # the user's own choice, or an earlier call
        return Path(current)
    if path is None and disabled_by_env():
        return None
    folder = Path(path).expanduser() if path is not None else default_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used: decide again
    return folder


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-compile-cache", action="store_true",
                        help=f"do not read or write compiled programs in {default_dir()} (persistent "
                             f"compilation cache; the folder can be set with {ENV}=DIR)")


def configure(args: argparse.Namespace) -> Optional[Path]:
    """The CLIs' start-up: the cache on unless --no-compile-cache."""
    return None if args.no_compile_cache else enable()
