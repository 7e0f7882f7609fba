"""notebooks/01_text_to_image.ipynb runs top to bottom on the demo model and shows an image."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_text_to_image.ipynb"
TIMEOUT_S = 300  # per cell; the whole notebook takes well under a minute


def test_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the generated image is not displayed"
    text = "".join(o.get("text", "") for o in outputs)
    assert "compile" in text and "random noise" in text
