"""`python -m flux_jax.generate` on the demo model: prompt files (text and JSONL), seeds by index,
bit-identical images whatever the batch size and equal to `sample`'s, resuming (a killed job ends
with every image written once), and bad input (exit 2, one line, no model, no file)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import flux_jax.demo
from flux_jax import FluxPipeline, generate, sample
from flux_jax.generate import MANIFEST, main
from flux_jax.sample import EXIT_BAD_INPUT, MAX_SEED
from generate_helpers import FAST, SIZE, STEPS, cached_demo, finish, manifest, png_bytes, run, start, write_prompts

PROMPTS = ["a red fox", "a blue whale", "a green owl, at night", "a café in Paris", "a yellow kite"]


@pytest.fixture
def shared_demo(monkeypatch):
    monkeypatch.setattr(flux_jax.demo, "make_demo_pipeline", cached_demo)


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: bad input and finished jobs must load none."""
    def refuse(*args, **kw):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(flux_jax.demo, "make_demo_pipeline", refuse)
    monkeypatch.setattr(FluxPipeline, "from_pretrained", refuse)


@pytest.fixture(autouse=True)
def no_default_model(monkeypatch, tmp_path_factory):
    monkeypatch.delenv(sample.MODEL_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty_hub")))


def run_ok(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def run_bad(capsys, *argv) -> str:
    """Expect bad input: exit 2, exactly one line on stderr, an `error:` one."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_BAD_INPUT, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def png_text(path: Path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


def jsonl(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- bad input

def test_bad_input(tmp_path, capsys, no_model):
    """Each case: exit 2, one `error:` line naming the problem, no model, nothing written."""
    good = write_prompts(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "out"
    devices = len(jax.devices())
    j = lambda name, *records: jsonl(tmp_path / name, *records)
    cases = [
        ([], "required"),
        (["--prompts", good, "--out", out, "--steps", "0"], "--steps"),
        (["--prompts", good, "--out", out, "--height", "8"], "--height"),
        (["--prompts", good, "--out", out, "--width", "100000"], "--width"),
        (["--prompts", good, "--out", out, "--seed", "-1"], "--seed"),
        (["--prompts", good, "--out", out, "--batch-size", "0"], "--batch-size"),
        (["--prompts", good, "--out", out, "--transformer", "/t.safetensors"], "--transformer"),
        (["--prompts", good, "--out", out, "--dtype", "int8"], "dtype"),
        (["--prompts", good, "--out", out, "--true-cfg", "4"], "negative_prompt"),
        (["--prompts", good, "--out", out, "--mesh", f"data={devices + 1}"], "--mesh"),
        (["--prompts", good, "--out", out, "--mesh", "data=two"], "--mesh"),
        (["--prompts", good, "--out", out, "--coordinator", "127.0.0.1:1234"], "--num-processes"),
        (["--prompts", good, "--out", out, "--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
         "HOST:PORT"),
        (["--prompts", good, "--out", out, "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
         "--process-id"),
        (["--prompts", tmp_path / "missing.txt", "--out", out], "cannot read"),
        (["--prompts", write_prompts(tmp_path / "empty.txt", ["", "   "]), "--out", out], "no prompts"),
        (["--prompts", good, "--out", out, "--seed", str(MAX_SEED)], "p.txt line 2: seed (--seed"),
        (["--prompts", good, "--out", tmp_path / "x.png"], "folder"),
        (["--prompts", good, "--out", good], "not a folder"),
        (["--prompts", j("a.jsonl", {"prompt": "x"}, {"prompt": "y"}, "{oops"), "--out", out], "a.jsonl line 3"),
        (["--prompts", j("b.jsonl", {"prompt": "x"}, '"just text"'), "--out", out], "b.jsonl line 2: expected"),
        (["--prompts", j("c.jsonl", {"prompt": "x", "negative-prompt": "y"}), "--out", out], "'negative-prompt'"),
        (["--prompts", j("d.jsonl", {"seed": 1}), "--out", out], "d.jsonl line 1: needs a non-empty"),
        (["--prompts", j("e.jsonl", {"prompt": "x", "seed": "7"}), "--out", out], "seed must be an integer"),
        (["--prompts", j("f.jsonl", {"prompt": "x", "height": True}), "--out", out], "height must be an integer"),
        (["--prompts", j("g.jsonl", {"prompt": "x", "width": 4}), "--out", out], "g.jsonl line 1: width"),
        (["--prompts", j("h.jsonl", {"prompt": "x", "seed": 2**40}), "--out", out], "h.jsonl line 1: seed"),
        (["--prompts", j("i.jsonl", {"prompt": "x", "negative_prompt": "blur"}), "--out", out], "--true-cfg"),
    ]
    for argv, needle in cases:
        line = run_bad(capsys, *(["--demo"] if argv else []), *argv)
        assert needle in line, (argv, line)
        assert not out.exists() and not (tmp_path / "x.png").exists(), argv
    # no --demo, no model anywhere / a missing folder
    assert "no model" in run_bad(capsys, "--prompts", good, "--out", out)
    assert "no such model folder" in run_bad(capsys, "--model", tmp_path / "nope", "--prompts", good, "--out", out)
    assert not out.exists()


def test_manifest_of_another_job_is_refused(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps(dict(index=1, prompt="something else", seed=1, file="000001.png",
                                                seconds=1.0, process=0)) + "\n")
    line = run_bad(capsys, "--demo", "--prompts", write_prompts(tmp_path / "p.txt", PROMPTS[:2]), "--out", out)
    assert "image 1" in line and "another --out" in line
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]
    # PNGs without manifest lines are checked by their own metadata
    other = tmp_path / "other"
    sample.save_png(Image.new("RGB", (16, 16)), other / "000001.png", {"prompt": "a dog", "seed": 1})
    line = run_bad(capsys, "--demo", "--prompts", tmp_path / "p.txt", "--out", other)
    assert "000001.png shows 'a dog' with seed 1" in line and PROMPTS[1] in line
    (other / "000001.png").write_bytes(b"not a png")
    assert "cannot read" in run_bad(capsys, "--demo", "--prompts", tmp_path / "p.txt", "--out", other)
    assert sorted(p.name for p in other.iterdir()) == ["000001.png"]


def test_batch_size_must_fit_the_mesh(tmp_path):
    """In a child with 2 CPU devices: the mesh's batch shards must divide --batch-size; checked before loading."""
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:3])
    code, _, err = run("flux_jax.generate", "--prompts", prompts, "--out", tmp_path / "out", *FAST,
                       "--mesh", "data=2", "--batch-size", "3", devices=2)
    assert code == EXIT_BAD_INPUT and err.strip().startswith("error: --batch-size 3"), err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- prompt files, seeds, metadata

def test_text_prompts_seeds_by_index(tmp_path, capsys, shared_demo):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(["", PROMPTS[0], "   ", PROMPTS[1], PROMPTS[2], ""]), encoding="utf-8")
    out = tmp_path / "out"
    err = run_ok(capsys, "--prompts", prompts, "--out", out, "--seed", 10, "--batch-size", 4, *FAST)  # 1 padding row
    assert "process 0: wrote 3 images" in err
    names = [f"{i:06d}.png" for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [MANIFEST])  # no temp file left behind
    for i, name in enumerate(names):
        text = png_text(out / name)
        assert (text["prompt"], text["seed"]) == (PROMPTS[i], str(10 + i))
        assert (text["steps"], text["size"], text["guidance"], text["mode"]) == (str(STEPS), f"{SIZE}x{SIZE}",
                                                                                 "3.5", "text")
        assert "demo" in text["model"]
    records = manifest(out)
    assert [(r["index"], r["prompt"], r["seed"], r["file"], r["process"]) for r in records] == \
        [(i, PROMPTS[i], 10 + i, names[i], 0) for i in range(3)]
    assert all(isinstance(r["seconds"], float) and r["seconds"] > 0 for r in records)
    # prompt i's seed is fixed by its index: different prompts and seeds, different noise
    assert len(set(png_bytes(out).values())) == 3


def test_jsonl_seed_size_and_negative_prompt(tmp_path, capsys, shared_demo):
    prompts = jsonl(tmp_path / "p.txt",  # JSONL told by its first character, not its name
                    {"prompt": "a fox", "seed": 99},
                    {"prompt": "a wide fox", "width": 2 * SIZE},
                    "",
                    {"prompt": "a fox", "negative_prompt": "blur", "seed": 99},
                    {"prompt": "an owl"})
    out = tmp_path / "out"
    run_ok(capsys, "--prompts", prompts, "--out", out, "--seed", 5, "--true-cfg", 3, *FAST)
    text = {i: png_text(out / f"{i:06d}.png") for i in range(4)}
    assert [text[i]["seed"] for i in range(4)] == ["99", "6", "99", "8"]  # own seed, else --seed + index
    assert [text[i]["size"] for i in range(4)] == [f"{SIZE}x{SIZE}", f"{2 * SIZE}x{SIZE}"] + [f"{SIZE}x{SIZE}"] * 2
    assert Image.open(out / "000001.png").size == (2 * SIZE, SIZE)
    assert (text[2]["negative_prompt"], text[2]["true_cfg"]) == ("blur", "3.0")
    assert "negative_prompt" not in text[0]
    assert png_bytes(out)["000000.png"] != png_bytes(out)["000002.png"]  # the negative prompt changed it
    assert sorted(r["index"] for r in manifest(out)) == [0, 1, 2, 3]


# ---------------------------------------------------------------- reproducibility

def test_batch_size_and_sample(tmp_path, capsys, shared_demo):
    """Prompt i's PNG at batch size 1 is byte-identical to sample's; at batch size 4 (a padded last batch)
    on one device it is the same picture up to float rounding.

    Not bit-identical there: XLA:CPU emits a row reduction (LayerNorm's mean and variance) by the
    whole array's shape, so a row's summation order, and its last bit, change with the number of
    rows; the demo model's narrow widths (32, 64) hit it. Images agree bit for bit when the
    per-device batch is the same: see test_distributed (8 devices x 1 row = 1 device x 1 row).
    """
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS)
    outs = {}
    for batch in (1, 4):
        outs[batch] = tmp_path / f"b{batch}"
        run_ok(capsys, "--prompts", prompts, "--out", outs[batch], "--seed", 20, "--batch-size", batch, *FAST)
    one, four = png_bytes(outs[1]), png_bytes(outs[4])
    assert len(one) == len(PROMPTS) and one.keys() == four.keys()
    for name in one:
        a, b = (np.asarray(Image.open(out / name), np.int16) for out in (outs[1], outs[4]))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, name  # a last-bit flip rounds one level
        assert png_text(outs[1] / name) == png_text(outs[4] / name)
    for i in (0, 4):
        png = tmp_path / f"sample{i}.png"
        assert sample.main(["--prompt", PROMPTS[i], "--seed", str(20 + i), "--out", str(png), *FAST]) == 0
        capsys.readouterr()
        assert png.read_bytes() == one[f"{i:06d}.png"], f"prompt {i} differs from sample's"


# ---------------------------------------------------------------- resuming

def test_rerun_skips_done_images_and_catches_up_the_manifest(tmp_path, capsys, shared_demo, monkeypatch):
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:3])
    out = tmp_path / "out"
    run_ok(capsys, "--prompts", prompts, "--out", out, *FAST)
    before = {name: (out / name).stat() for name in png_bytes(out)}
    # A kill between a PNG and its manifest line, and a PNG deleted by hand:
    records = manifest(out)
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records if r["index"] != 1)
                                + '{"index": 7, "pro', encoding="utf-8")  # and a line torn by the kill
    (out / "000002.png").unlink()
    err = run_ok(capsys, "--prompts", prompts, "--out", out, *FAST)
    assert "1 of 3 images to make" in err and "process 0: wrote 1 images" in err
    assert "torn" in err  # the broken line is reported, and ignored
    for name in ("000000.png", "000001.png"):  # not rewritten
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
    records = {}
    for line in (out / MANIFEST).read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # the torn line stays; the reader skips it
            continue
        assert r["index"] not in records, "an index listed twice"
        records[r["index"]] = r
    assert sorted(records) == [0, 1, 2]
    assert records[1]["seconds"] is None  # caught up: its generation time is unknown
    assert records[2]["seconds"] is not None  # kept its old line (the image is the same)
    # Everything there: no model is loaded at all.
    monkeypatch.setattr(flux_jax.demo, "make_demo_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    err = run_ok(capsys, "--prompts", prompts, "--out", out, *FAST)
    assert "nothing to do" in err


def test_killed_job_resumes(tmp_path, capsys, shared_demo):
    """SIGKILL once the first PNG appears; the rerun ends with every PNG written exactly once."""
    n = 24
    prompts = write_prompts(tmp_path / "p.txt", [f"prompt number {i}" for i in range(n)])
    out = tmp_path / "out"
    args = ["--prompts", prompts, "--out", out, "--batch-size", 1, *FAST]
    job = start("flux_jax.generate", *args)
    deadline = time.monotonic() + 300
    while not list(out.glob("*.png")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(job.pid, signal.SIGKILL)
    code, _, err = finish(job)
    assert code == -signal.SIGKILL, f"the job ended before it was killed ({code}): {err}"
    before = {p.name: p.stat() for p in out.glob("*.png")}
    assert 1 <= len(before) < n, "the kill came too late to test resuming"

    code, _, err = run("flux_jax.generate", *args)
    assert code == 0, err
    assert f"{n - len(before)} of {n} images to make" in err
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(n)]
    for name, stat in before.items():
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), f"{name} was rewritten"
    indices = [r["index"] for r in manifest(out)]
    assert sorted(indices) == list(range(n)), "each image has exactly one manifest line"
    # and the images are the right ones: the first three as an in-process job makes them
    ref = tmp_path / "ref"
    run_ok(capsys, "--prompts", write_prompts(tmp_path / "p3.txt", [f"prompt number {i}" for i in range(3)]),
           "--out", ref, "--batch-size", 1, *FAST)
    assert all(png_bytes(ref)[name] == (out / name).read_bytes() for name in png_bytes(ref))


def test_plan_groups_keep_index_order():
    items = [generate.Item(i, f"p{i}", i, "neg" if i in (1, 4) else None, 64, 32 if i == 2 else 64)
             for i in range(6)]
    batches = generate.plan_batches(items, 2)
    assert [[item.index for item in b] for b in batches] == [[0, 3], [5], [1, 4], [2]]
