"""The prior system end to end through the launcher (configs/prior.py:tiny)."""
import json
import os

import jax
import numpy as np
import pytest

from cxrjax.core.checkpoint import restore_state
from launch_util import ROOT, launch, ok

TINY = ("--config", os.path.join(ROOT, "configs/prior.py:tiny"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted tiny run, shared by the tests that compare against it."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = ok(launch(*TINY, "--workdir", str(workdir)))
  return workdir, proc


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _prior_state(workdir):
  return restore_state(os.path.join(workdir, "prior", "ckpt"))[0]


def _assert_trees_close(a, b, atol=0.0):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and len(la) > 0
  for x, y in zip(la, lb):
    if atol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tiny_run_writes_results_table_and_plot(reference_run):
  workdir, proc = reference_run
  results = _results(workdir)
  assert [r["model"] for r in results["rows"]] == ["ctpa_only", "xray_only", "distilled"]
  assert results["n_test"] == 64 and results["config"]["variant"] == "tiny"
  for row in results["rows"]:
    lo, hi = row["auc_ci"]
    assert 0 <= lo <= row["auc"] <= hi <= 1
    for key in ("auprc", "accuracy", "sensitivity", "specificity", "threshold"):
      assert 0 <= row[key] <= 1, (row["model"], key)
    assert set(row["at_0.5"]) == {"accuracy", "sensitivity", "specificity"}
  assert "Cross-Modal CXR-CTPA Knowledge Distillation" in proc.stdout
  assert "| AUC" in proc.stdout
  with open(os.path.join(workdir, "roc.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  norms = json.load(open(os.path.join(workdir, "normalizers.json")))
  assert norms["ctpa"]["kind"] == "minmax"
  gen = np.load(os.path.join(workdir, "generated_test.npz"))
  assert gen["generated"].shape == (64, 16) and np.isfinite(gen["generated"]).all()


def test_rerun_in_same_workdir_reproduces_results(reference_run):
  workdir, _ = reference_run
  before = _results(workdir)
  proc = ok(launch(*TINY, "--workdir", str(workdir)))
  assert "training steps" not in proc.stdout  # every stage was already complete
  assert _results(workdir) == before


def test_killed_runs_resume_bit_identical(reference_run, tmp_path):
  reference, _ = reference_run
  workdir = str(tmp_path / "interrupted")
  for fault in ("xray_only:15", "prior:13"):  # mid-stage, between checkpoints (every 10 steps)
    proc = launch(*TINY, "--workdir", workdir, env={"CXRJAX_FAULT_KILL_AT": fault})
    assert proc.returncode != 0, fault
    assert not os.path.exists(os.path.join(workdir, "results.json"))
  ok(launch(*TINY, "--workdir", workdir))
  _assert_trees_close(_prior_state(workdir), _prior_state(reference))
  assert _results(workdir) == _results(reference)


def test_eight_devices_match_one_device(reference_run, tmp_path):
  reference, _ = reference_run
  workdir = str(tmp_path / "mesh8")
  proc = ok(launch(*TINY, "--workdir", workdir, "--cpu_devices=8"))
  assert "8 device(s)" in proc.stdout
  a, b = _prior_state(workdir), _prior_state(reference)
  _assert_trees_close(a["params"], b["params"], atol=1e-5)
  _assert_trees_close(a["ema_params"], b["ema_params"], atol=1e-5)
  loss_a = [json.loads(l)["loss"] for l in open(os.path.join(workdir, "prior", "metrics.jsonl"))]
  loss_b = [json.loads(l)["loss"] for l in open(os.path.join(reference, "prior", "metrics.jsonl"))]
  np.testing.assert_allclose(loss_a, loss_b, atol=1e-5)


def test_two_processes_match_one_process(reference_run, tmp_path):
  import subprocess
  reference, _ = reference_run
  workdir = str(tmp_path / "multihost")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=os.sys.executable)
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch/local_multiprocess.sh"), "2", "--",
                         *TINY, "--workdir", workdir], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "2 process(es)" in proc.stdout
  a, b = _prior_state(workdir), _prior_state(reference)
  _assert_trees_close(a["params"], b["params"], atol=1e-5)
  _assert_trees_close(a["ema_params"], b["ema_params"], atol=1e-5)
