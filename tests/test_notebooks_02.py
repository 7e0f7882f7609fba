"""notebooks/02_kontext_edit.ipynb runs top to bottom on the demo model, without torch, and shows its images."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from flux_jax.demo import NOISE_NOTICE

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "02_kontext_edit.ipynb"
TIMEOUT_S = 300  # per cell; the whole notebook takes under a minute
IMAGES_SHOWN = 2  # the input, then the side-by-side strip
# Appended cell: the notebook must need only the runtime dependencies.
REFERENCE_STACK = ("torch", "diffusers")
CHECK_IMPORTS = f"import sys; print('reference stack loaded:', [m for m in {REFERENCE_STACK!r} if m in sys.modules])"


def test_notebook_runs_without_torch():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_IMPORTS))
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == IMAGES_SHOWN
    text = "".join(o.get("text", "") for o in outputs)
    assert NOISE_NOTICE in text
    assert "reference stack loaded: []" in text
