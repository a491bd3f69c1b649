"""Notebooks are executed so they never rot."""
import os

import nbformat
from nbclient import NotebookClient

from launch_util import ROOT


def test_prior_notebook_runs(tmp_path):
  path = os.path.join(ROOT, "notebooks", "prior.ipynb")
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "train" in text and "PE+" in text
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert len(images) >= 3  # ROC, PCA scatter, histogram
