"""GMCD end to end through the launcher on its :tiny variant (one shared reference run): results,
tables and figures, a run killed mid-fold that resumes bit-identically (the DSCD banks and GKM
weights included), and the bad-input errors of a user's tabular table, each one line."""
import json
import os

import numpy as np
import pytest

from launch_util import ROOT, copy_stages, launch, ok, restored_state

TINY = ("--config", os.path.join(ROOT, "configs/gmcd.py:tiny"))
METHODS = ("teacher", "tabular_head", "image_head", "student_ce", "student_kd", "student_dscd",
           "student_dscd_gkm")


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference_run(gmcd_tiny_run):
  return gmcd_tiny_run  # conftest.py: shared with the notebook's test


def test_tiny_run_writes_the_ablation_table_and_figures(reference_run):
  workdir, proc = reference_run
  r = _results(workdir)
  assert set(r["per_fold"]) == set(METHODS)
  for method in METHODS:
    assert sorted(r["per_fold"][method]) == ["0", "1"]
    for metrics in r["per_fold"][method].values():
      for key in ("auc", "ap", "f1", "f1_top", "acc"):
        assert 0.0 <= metrics[key] <= 1.0, (method, key, metrics)
      assert metrics["f1"] == pytest.approx(metrics["acc"])  # micro F1 = accuracy
    assert set(r["summary"][method]["auc"]) == {"mean", "sd", "folds"}
  assert r["paired"]["auc"]["folds"] == 2 and "CE-only student" in r["verdict"]
  counts = r["counts"]
  for fold in counts["folds"].values():  # an inner validation split is carved from training
    assert fold["val"] > 0 and fold["train"] + fold["val"] + fold["test"] == counts["studies"]
  curve = r["gkm_weights"]["0"]  # logged every step of 4; weights in 0..5
  assert curve["step"] == [1, 2, 3, 4] and all(0 <= w <= 5 for w in curve["gkm_w0"])
  for name in ("folds.png", "gkm_weights.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  text = open(os.path.join(workdir, "results.md")).read()
  assert "## Ablation" in text and "## Per fold" in text and "paired over folds" in text
  assert "[fold 1] test micro AUC" in proc.stdout


def test_killed_mid_fold_resumes_bit_identical(reference_run, tmp_path):
  workdir, _ = reference_run
  run = str(tmp_path / "run")
  # Every stage but the one killed is copied from the reference: the kill and the resumption are
  # what is under test, and retraining the rest would only cost CI time.
  copy_stages(workdir, run, skip=("student_dscd_gkm_fold0",))
  killed = launch(*TINY, "--workdir", run, env={"CXRJAX_FAULT_KILL_AT": "student_dscd_gkm_fold0:3"})
  assert killed.returncode != 0 and not os.path.exists(os.path.join(run, "results.json"))
  proc = ok(launch(*TINY, "--workdir", run))
  assert "[student_dscd_fold0] already trained" in proc.stdout
  # From the step-2 checkpoint, unless the kill came before its asynchronous save was committed.
  assert ("[student_dscd_gkm_fold0] resuming: step 2/4" in proc.stdout
          or "[student_dscd_gkm_fold0] training steps 0..4" in proc.stdout), proc.stdout[-3000:]
  assert _results(run)["per_fold"] == _results(workdir)["per_fold"]
  a, b = (restored_state(w, "student_dscd_gkm_fold0") for w in (workdir, run))
  for name in ("bank", "dscd_z", "gkm"):
    for x, y in zip(*(jax_leaves(s["collections"][name]) for s in (a, b))):
      np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _study_ids(workdir):
  from cxrjax.systems.gmcd import data as gdata
  from cxrjax.core.config import load_config
  config = load_config(os.path.join(ROOT, "configs/gmcd.py:tiny"))
  sources = gdata.open_sources(config.data, workdir)
  return [s[i]["study_id"].decode() for s in sources.values() for i in range(len(s))]


def test_a_table_of_the_wrong_width_is_one_line(reference_run, tmp_path):
  workdir, _ = reference_run
  ids = _study_ids(workdir)
  table = tmp_path / "clinical.csv"
  rows = ["study_id,grade," + ",".join(f"x{j}" for j in range(79))]
  rows += [f"{s},{i % 3}," + ",".join("0.5" for _ in range(79)) for i, s in enumerate(ids)]
  table.write_text("\n".join(rows) + "\n")
  proc = launch(*TINY, "--workdir", str(tmp_path / "w"), f"--config.data.table={table}",
                f"--config.data.data_dir={os.path.join(workdir, 'data')}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]  # after TFDS's own log lines
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert last.startswith("error: ") and "width 79" in last and "model.input_dim=80" in last, last
