"""Fixtures shared by the conversion tests: a tiny FLUX transformer as a BFL single file."""
from __future__ import annotations

import pytest
from safetensors.torch import save_file

from flux_jax.config import TINY
from torch_ref import diffusers_to_bfl, diffusers_transformer


@pytest.fixture(scope="module")
def tiny_state():
    return diffusers_transformer(TINY, seed=5).state_dict()


@pytest.fixture
def bfl_file(tmp_path, tiny_state):
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(diffusers_to_bfl(tiny_state, TINY), path)
    return path
