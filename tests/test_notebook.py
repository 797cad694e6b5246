"""notebooks/quickstart.ipynb runs top to bottom (its fast path)."""

import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow(100)
def test_quickstart_notebook_executes(monkeypatch):
  monkeypatch.setenv("FQ_QUICKSTART_FAST", "1")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
  )
  client.execute()
  text = "".join(
    o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  )
  assert "compression ratio" in text
  assert "bit for bit: True" in text
  images = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if "image/png" in o.get("data", {})
  ]
  assert len(images) >= 2  # the layer figure and the separation chart


def test_committed_notebook_has_no_stale_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
