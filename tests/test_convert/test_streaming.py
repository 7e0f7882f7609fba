"""Streamed conversion and checkpoints: lazy pieces, eager name checks, format 2 (and 1) round trips,
stale temp folders, and host memory bounded while writing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from convert import component_stream, load_component
from convert.core import (CONFIG_FILE, PARAMS_DIR, STALE_AGE_S, ConversionError, DictReader, Rule,
                          atomic_dir, convert, leaves, load_checkpoint, save_checkpoint, save_params, stack_layers,
                          stream, unstack_layers)
from convert.transformer import convert_transformer, plan_transformer
from flux_jax.config import TINY

SDS = jax.ShapeDtypeStruct


def assert_trees_equal(a: dict, b: dict) -> None:
    fa, fb = leaves(a), leaves(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def is_file_view(a: np.ndarray) -> bool:
    """Backed by a memory map of the file (read when touched), not by a copy."""
    return isinstance(a, np.memmap) and not a.flags.writeable


# A small generic model: one plain param and a stack of 3 layers.
TARGET = {"emb": SDS((4, 2), np.float32), "blocks": {"w": SDS((3, 2, 5), np.float32)}}


def source(rng=np.random.default_rng(0)) -> dict[str, np.ndarray]:
    return {"emb.weight": rng.standard_normal((4, 2), np.float32),
            **{f"blocks.{i}.w": rng.standard_normal((5, 2), np.float32) for i in range(3)}}


def rules() -> list[Rule]:
    return [Rule("emb", ("emb.weight",))] + [Rule("blocks/w", (f"blocks.{i}.w",), lambda w: w.T, i) for i in range(3)]


# ------------------------------------------------------------------ stream


def test_stream_yields_lazy_views_equal_to_convert(bfl_file):
    plan = plan_transformer(bfl_file, TINY.axes_dim)
    pieces = list(stream(plan.reader, plan.rules, plan.target))
    # a BFL file needs no fusing: every piece is the file's tensor, or its transpose, unread
    assert all(is_file_view(v) for _, v in pieces), [p for p, v in pieces if not is_file_view(v)]
    kernel = dict(pieces)["double_blocks_1/img_mlp/fc1/kernel"]
    assert kernel.shape == (TINY.hidden_size, TINY.mlp_hidden) and kernel.dtype == np.float32
    want = unstack_layers(convert_transformer(bfl_file, axes_dim=TINY.axes_dim)[0])
    assert [p for p, _ in pieces] == list(leaves(want))  # one piece per per-layer leaf, nothing twice
    assert_trees_equal(dict(pieces), leaves(want))


def test_fused_pieces_are_one_tensor(tmp_path):
    """diffusers' separate q, k, v become one materialized kernel; single Linears stay lazy."""
    from torch_ref import diffusers_transformer

    diffusers_transformer(TINY, seed=1).save_pretrained(tmp_path / "transformer")
    cfg, shapes, pieces = component_stream("transformer", tmp_path / "transformer")
    got = dict(pieces)
    qkv, proj = got["double_blocks_0/img_attn/qkv/kernel"], got["double_blocks_0/img_attn/proj/kernel"]
    assert not isinstance(qkv, np.memmap) and qkv.shape == (TINY.hidden_size, 3 * TINY.hidden_size)
    assert is_file_view(proj)
    assert shapes["double_blocks"]["img_attn"]["qkv"]["kernel"].shape == (TINY.depth,) + qkv.shape
    assert cfg == TINY


def test_name_problems_fail_before_the_first_piece():
    src = source()
    src["stray.weight"] = np.zeros(3, np.float32)  # unused
    del src["blocks.2.w"]  # missing
    src["blocks.1.w"] = np.zeros((7, 2), np.float32)  # misshaped: listed too, though found without reading
    bad = rules()[:3] + [Rule("blocks/w", ("blocks.2.w",), lambda w: w.T, 2), Rule("nope", ("emb.weight",)),
                         Rule("blocks/w", ("emb.weight",), layer=5)]
    target = {**TARGET, "head": SDS((2,), np.float32)}  # filled by no rule
    with pytest.raises(ConversionError) as e:
        stream(DictReader(src), bad, target)  # raises on the call, before anything is iterated
    msg = str(e.value)
    for problem in ("['blocks.2.w']", "unknown param nope", "layer 5 out of range", "param head (2,) not filled",
                    "stray.weight", "blocks/w (layer 1): expected (2, 5), got (2, 7)"):
        assert problem in msg, problem


def test_shape_problems_fail_after_the_last_piece():
    src = source()
    src["blocks.0.w"] = np.zeros((5, 3), np.float32)
    src["blocks.2.w"] = np.zeros((6, 2), np.float32)
    pieces = stream(DictReader(src), rules(), TARGET)  # names are fine: no error yet
    got = []
    with pytest.raises(ConversionError) as e:
        for piece in pieces:
            got.append(piece.path)
    assert got == ["emb", "blocks_1/w"]  # every good piece came first
    assert "blocks/w (layer 0): expected (2, 5), got (3, 5)" in str(e.value)
    assert "blocks/w (layer 2): expected (2, 5), got (2, 6)" in str(e.value)


def test_convert_builds_the_stacked_tree_and_casts():
    src = source()
    out = convert(DictReader(src), rules(), TARGET, dtype=ml_dtypes.bfloat16)
    assert out["blocks"]["w"].shape == (3, 2, 5) and out["blocks"]["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out["blocks"]["w"][2], src["blocks.2.w"].T.astype(ml_dtypes.bfloat16))


def test_component_stream_checks_names_eagerly_and_casts(tmp_path, tiny_state):
    from safetensors.torch import save_file
    from torch_ref import diffusers_to_bfl

    sd = diffusers_to_bfl(tiny_state, TINY)
    save_file(sd, tmp_path / "ok.safetensors")
    cfg, shapes, pieces = component_stream("transformer", tmp_path / "ok.safetensors", dtype="bf16",
                                           axes_dim=TINY.axes_dim)
    assert shapes["img_in"]["kernel"].dtype == ml_dtypes.bfloat16
    assert all(v.dtype == ml_dtypes.bfloat16 for _, v in pieces)
    del sd["double_blocks.1.txt_mlp.2.bias"]
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError, match=r"double_blocks\.1\.txt_mlp\.2\.bias"):
        component_stream("transformer", tmp_path / "bad.safetensors", axes_dim=TINY.axes_dim)


# ------------------------------------------------------------------ layouts


def test_stack_and_unstack_layers():
    tree = {"double_blocks": {"a": {"kernel": np.arange(24.0).reshape(3, 2, 4)}, "b": np.arange(3.0)},
            "layers": {"w": np.ones((2, 5))}, "down_blocks_0": {"w": np.ones(2)}, "img_in": np.zeros(2)}
    per_layer = unstack_layers(tree)
    assert sorted(per_layer) == ["double_blocks_0", "double_blocks_1", "double_blocks_2", "down_blocks_0",
                                 "img_in", "layers_0", "layers_1"]
    np.testing.assert_array_equal(per_layer["double_blocks_2"]["a"]["kernel"], tree["double_blocks"]["a"]["kernel"][2])
    assert_trees_equal(stack_layers(per_layer), tree)
    del per_layer["double_blocks_1"]
    with pytest.raises(ValueError, match=r"double_blocks: layers \[0, 2\]"):
        stack_layers(per_layer)


# ------------------------------------------------------------------ checkpoints


PART_BYTES = 2**19  # small parts, so that a layer's params span several partial saves


@pytest.fixture
def converted(tmp_path, bfl_file):
    """(checkpoint folder, stacked params it holds) of the tiny BFL file, converted by streaming."""
    cfg, _, pieces = component_stream("transformer", bfl_file, axes_dim=TINY.axes_dim)
    meta = {"component": "transformer", "config": cfg.to_dict()}
    out = atomic_dir(tmp_path / "ckpt", lambda tmp: save_params(tmp, pieces, meta, part_bytes=PART_BYTES))
    return out, convert_transformer(bfl_file, axes_dim=TINY.axes_dim)[0]


def test_format2_round_trip(converted):
    path, params = converted
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["format"] == 2 and meta["component"] == "transformer"
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp folders left
    per_layer, cfg = load_component(path, stacked=False)
    assert "double_blocks_1" in per_layer and "double_blocks" not in per_layer
    assert_trees_equal(per_layer, unstack_layers(params))
    stacked, _ = load_component(path)
    assert_trees_equal(stacked, params)
    one, _ = load_component(path, stacked=False, select=lambda p: p.startswith("double_blocks_1/"))
    assert_trees_equal(one, {"double_blocks_1": per_layer["double_blocks_1"]})
    bf16, _ = load_component(path, dtype="bf16", stacked=False)
    kernel = bf16["single_blocks_1"]["linear1"]["kernel"]
    assert kernel.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(kernel, params["single_blocks"]["linear1"]["kernel"][1].astype(ml_dtypes.bfloat16))


def test_sharded_restore(converted):
    path, params = converted
    mesh = jax.make_mesh((1,), ("model",))
    asked = []

    def sharding(p, shape, dtype):
        asked.append((p, shape, dtype))
        return NamedSharding(mesh, PartitionSpec(*(["model"] + [None] * (len(shape) - 1))[:len(shape)]))

    got, _ = load_component(path, dtype="bf16", sharding=sharding, stacked=False)
    kernel = got["double_blocks_1"]["img_mlp"]["fc1"]["kernel"]
    assert isinstance(kernel, jax.Array) and kernel.dtype == jax.numpy.bfloat16
    assert kernel.sharding == sharding("", kernel.shape, None)
    assert ("double_blocks_1/img_mlp/fc1/kernel", (TINY.hidden_size, TINY.mlp_hidden),
            np.dtype(ml_dtypes.bfloat16)) in asked
    assert_trees_equal(got, jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), unstack_layers(params)))
    with pytest.raises(ValueError, match="stacked=False"):
        load_component(path, sharding=sharding)


def test_format1_checkpoint_still_loads(tmp_path, bfl_file):
    """Checkpoints written before streaming: StandardCheckpointer, stacked, no "format" in the config."""
    import orbax.checkpoint as ocp

    params, cfg = convert_transformer(bfl_file, axes_dim=TINY.axes_dim)
    (tmp_path / "old").mkdir()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "old" / PARAMS_DIR, params)
        ckpt.wait_until_finished()
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps({"component": "transformer", "config": cfg.to_dict()}))
    stacked, got_cfg = load_component(tmp_path / "old")
    assert got_cfg == cfg
    assert_trees_equal(stacked, params)
    assert_trees_equal(load_component(tmp_path / "old", stacked=False)[0], unstack_layers(params))
    only = load_component(tmp_path / "old", select=lambda p: p.startswith(("single_blocks_", "img_in/")))[0]
    assert_trees_equal(only, {"single_blocks": params["single_blocks"], "img_in": params["img_in"]})
    mesh = jax.make_mesh((1,), ("x",))
    on_device, _ = load_checkpoint(tmp_path / "old", "bf16", lambda p, s, d: NamedSharding(mesh, PartitionSpec()))
    assert on_device["single_blocks_0"]["linear2"]["kernel"].dtype == jax.numpy.bfloat16
    assert_trees_equal(on_device, jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), unstack_layers(params)))


def test_save_checkpoint_of_a_per_layer_tree(tmp_path):
    tree = {"layers_0": {"w": np.ones((2, 3), np.float32)}, "layers_1": {"w": np.zeros((2, 3), np.float32)},
            "head": np.arange(4, dtype=np.int32)}
    save_checkpoint(tmp_path / "c", tree, {"x": 1})
    got, config = load_checkpoint(tmp_path / "c")
    assert config == {"x": 1, "format": 2}
    assert_trees_equal(got, tree)
    assert load_checkpoint(tmp_path / "c", stacked=True)[0]["layers"]["w"].shape == (2, 2, 3)


# ------------------------------------------------------------------ temp folders


def test_stale_temp_folders_are_removed(tmp_path, capsys):
    from convert.core import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free (reuse within this test is vanishingly unlikely)
    folders = {name: tmp_path / name for name in (
        f".out.tmp-{dead.pid}-abc_12@{_host()}",  # died on this host: stale
        f".out.tmp-{os.getpid()}-def34@{_host()}",  # this very process: alive
        f".out.tmp-{dead.pid}-ghi56@another-host",  # another host's pid says nothing here
        ".out.abcd_123",  # legacy mkdtemp name, untouched for 2 days: stale
        ".out.wxyz_789",  # legacy, fresh: maybe a conversion still running
        ".other.tmp-1-xyz@host")}  # another destination
    for path in folders.values():
        (path / "params").mkdir(parents=True)
        (path / "params" / "blob").write_bytes(b"x" * 1000)
    old = time.time() - 2 * STALE_AGE_S
    for p in (folders[".out.abcd_123"], folders[".out.abcd_123"] / "params", folders[".out.abcd_123"] / "params" / "blob"):
        os.utime(p, (old, old))
    atomic_dir(tmp_path / "out", lambda tmp: (tmp / "f").write_text("ok"))
    left = {name for name, path in folders.items() if path.exists()}
    assert left == {f".out.tmp-{os.getpid()}-def34@{_host()}", f".out.tmp-{dead.pid}-ghi56@another-host",
                    ".out.wxyz_789", ".other.tmp-1-xyz@host"}
    err = capsys.readouterr().err
    assert err.count("removed stale temp folder") == 2 and f".out.tmp-{dead.pid}-abc_12" in err
    assert (tmp_path / "out" / "f").read_text() == "ok"


def test_failed_write_leaves_no_temp_folder(tmp_path):
    def fail(tmp):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "out", fail)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ memory

PIECE_SHAPE = (5000, 5000)  # float32: 100 MB
N_PIECES = 15  # 1.5 GB in all
PART_BYTES_BIG = 100 * 2**20  # one piece a part
MAX_GROWTH_MB = 700
MEMORY_SCRIPT = """
import resource, sys
import numpy as np
from convert.core import Piece, save_params

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

save_params(sys.argv[1] + "/warm", [Piece("w", np.ones(3))], {{}})  # imports and Orbax's first-use costs
base = peak_mb()

def pieces():  # each made on demand, like a converter's
    for i in range({n}):
        yield Piece(f"layers_{{i}}/w", np.full({shape}, i, np.float32))

save_params(sys.argv[1] + "/big", pieces(), {{}}, part_bytes={part})
print(peak_mb() - base)
from orbax.checkpoint import v1 as ocp1  # all there (values: see the round-trip tests)
stored = ocp1.metadata(sys.argv[1] + "/big/params").metadata
assert sorted(stored) == sorted(f"layers_{{i}}" for i in range({n})), sorted(stored)
assert all(v["w"].shape == {shape} for v in stored.values())
"""


def test_save_params_memory_is_bounded(tmp_path):
    """1.5 GB of pieces written in parts of one piece: the peak grows by a few parts (Orbax's copies
    and chunk buffers) and the next piece, about 0.5 GB, not by 1.5 GB."""
    script = textwrap.dedent(MEMORY_SCRIPT.format(n=N_PIECES, shape=PIECE_SHAPE, part=PART_BYTES_BIG))
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert res.returncode == 0, res.stderr[-3000:]
    grew_mb = float(res.stdout.split()[-1])
    assert grew_mb < MAX_GROWTH_MB, f"peak RSS grew by {grew_mb:.0f} MB while writing 1.5 GB"
