"""Notebooks are executed so they never rot."""
import os
import shutil

import nbformat
from nbclient import NotebookClient

from launch_util import ROOT


def _execute(name):
  """Runs notebooks/<name> -> its code cells' outputs, after checking none is an error."""
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  return outputs


def _text(outputs):
  return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def _execute_on_copy(notebook, run, env_var, tmp_path, monkeypatch):
  """Runs `notebook` on a copy of a session's finished tiny run (conftest.py), named to it by
  `env_var`: its system's run() loads every stage, and the later cells run as on a fresh run.
  Training the system is its system test's (the same run). -> (outputs, text)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(run[0], workdir)
  monkeypatch.setenv(env_var, workdir)
  outputs = _execute(notebook)
  text = _text(outputs)
  assert f"workdir: {workdir}" in text
  return outputs, text


def _images(outputs):
  return [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]


def test_prior_notebook_runs(tmp_path):
  outputs = _execute("prior.ipynb")
  text = _text(outputs)
  assert "train" in text and "PE+" in text
  assert len(_images(outputs)) >= 3  # ROC, PCA scatter, histogram


def test_data_notebook_runs():
  outputs = _execute("data.ipynb")
  text = _text(outputs)
  assert "FINDINGS:" in text and "patients in two splits: 0" in text
  assert "prepared" in text  # the data CLI prepared the fake MIMIC-CXR-JPG download
  # study views, label signs, severity, shortcut marker, phantom batch, MIMIC batch
  assert len(_images(outputs)) >= 6


def test_fmkd_bias_notebook_runs(fmkd_tiny_run, tmp_path, monkeypatch):
  outputs, text = _execute_on_copy("fmkd_bias.ipynb", fmkd_tiny_run, "FMKD_WORKDIR", tmp_path,
                                   monkeypatch)
  assert "CXR-FMKD-LP" in text and "unseen sites macro AUC-ROC" in text
  assert "Male vs Female" in text and "(control)" in text
  assert len(_images(outputs)) >= 5  # PCA by race and sex for two models, one t-SNE


def test_raddiffusion_notebook_runs():
  outputs = _execute("raddiffusion.ipynb")
  text = _text(outputs)
  assert "views per study:" in text and "probe macro AUROC" in text
  assert len(_images(outputs)) >= 2  # the study batch, the reconstructions


def test_gmcd_notebook_runs(gmcd_tiny_run, tmp_path, monkeypatch):
  outputs, text = _execute_on_copy("gmcd.ipynb", gmcd_tiny_run, "GMCD_WORKDIR", tmp_path, monkeypatch)
  assert "multimodal teacher" in text and "chosen candidate columns" in text
  assert "final weights, fold 0" in text
  assert len(_images(outputs)) >= 3  # the cohort, the chosen positives, the GKM weights


def test_raygen_notebook_runs(raygen_tiny_run, tmp_path, monkeypatch):
  outputs, text = _execute_on_copy("raygen.ipynb", raygen_tiny_run, "RAYGEN_WORKDIR", tmp_path,
                                   monkeypatch)
  assert "codes from a codebook of" in text and "tokens masked at each step: (16, 11, 1)" in text
  assert "(1024, 724, 1)" in text
  assert len(_images(outputs)) >= 3  # encode/decode, guidance, decoding steps
