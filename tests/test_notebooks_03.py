"""notebooks/03_train.ipynb trains the tiny model on the digits, well enough that a classifier reads
its samples; notebooks/04_rope_ids.ipynb then runs its position-id experiments on that model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TRAIN, ROPE = NOTEBOOKS / "03_train.ipynb", NOTEBOOKS / "04_rope_ids.ipynb"
RUN_ENV = "FLUX_JAX_NOTEBOOK_RUN"  # where 03 trains and 04 reads the model
TIMEOUT_S = 900  # per cell; training, the longest, takes about two minutes on two idle cores
MIN_ACCURACY = 0.8  # the training goal; chance is 0.1
TIE = 0.04  # 2 of 50 samples: "as trained" may lose this much to a harmless change by chance


def execute(path: Path) -> list:
    """Run the notebook top to bottom (the kernel inherits os.environ); its code cells' outputs."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} displays no image"
    return outputs


def test_train_then_rope_ids(tmp_path, monkeypatch):
    run = tmp_path / "digits"
    monkeypatch.setenv(RUN_ENV, str(run))

    outputs = execute(TRAIN)
    assert (run / "model_index.json").is_file() and (run / "transformer").is_dir(), "no model folder written"
    trained = json.loads((run / "accuracy.json").read_text())
    assert trained["accuracy"] >= MIN_ACCURACY, trained
    text = "".join(o.get("text", "") for o in outputs)
    assert f"accuracy with true CFG 3: {trained['accuracy']:.1%}" in text  # printed as well as written

    execute(ROPE)
    rope = json.loads((run / "rope_ids.json").read_text())
    assert rope["pixel_change"]["both + (0, 8, 8)"] < 1e-3, rope  # only differences of ids count
    accuracy = rope["accuracy"]
    base = accuracy.pop("as trained")
    assert base >= MIN_ACCURACY and all(base >= a - TIE for a in accuracy.values()), (base, accuracy)
    # No position at all (every image token at the text's id) must hurt.
    assert accuracy["image ids x 0"] < base - 0.2, (base, accuracy)
