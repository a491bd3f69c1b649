"""The prior system end to end through the launcher (configs/prior.py:tiny)."""
import json
import os
import shutil

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
  assert [r["model"] for r in results["rows"]] == ["ctpa_only", "xray_only", "distilled",
                                                   "soft_label_lr", "ridge_teacher"]
  auc = {r["model"]: r["auc"] for r in results["rows"]}
  for other in ("xray_only", "ridge_teacher"):  # paired differences of the rows' own AUCs
    d = results["paired_auc"][f"distilled_minus_{other}"]
    assert d["value"] == pytest.approx(auc["distilled"] - auc[other], abs=1e-12)
    assert d["lo"] <= d["value"] <= d["hi"]
  for key in ("validation", "validation_centred"):
    assert set(results["prior_cosine"][key]) == {"prior_sample", "prior_sample_mean", "ridge_map"}
  assert "AUC distilled - X-ray only:" in proc.stdout and "ridge map CXR->CTPA" in proc.stdout
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


def test_curve_reruns_the_job_at_each_size_and_reuses_its_own_point(reference_run, tmp_path):
  # configs/prior.py:curve_tiny is :tiny plus the curve: the reference run's stages and table
  # serve its own point (64 labelled, 192 unlabelled); three more points train.
  reference, _ = reference_run
  workdir = str(tmp_path / "curve")
  shutil.copytree(reference, workdir)
  proc = ok(launch("--config", os.path.join(ROOT, "configs/prior.py:curve_tiny"), "--workdir",
                   workdir))
  assert proc.stdout.count("[curve] point") == 3 and "already trained" in proc.stdout
  curve = json.load(open(os.path.join(workdir, "curve.json")))
  points = {(p["labelled"], p["unlabelled"]): p for p in curve["points"]}
  assert sorted(points) == [(32, 192), (32, 384), (64, 192), (64, 384)]
  own = {r["model"]: r["auc"] for r in _results(reference)["rows"]}
  assert {m: points[(64, 192)]["auc"][m]["value"] for m in own} == own
  for n in (32, 64):
    # Neither head sees the unlabelled pairs: only the pair-trained models move with them.
    for model in ("xray_only", "ctpa_only"):
      assert points[(n, 192)]["auc"][model] == points[(n, 384)]["auc"][model]
    assert os.path.exists(os.path.join(workdir, "curve", f"labelled{n}_unlabelled384", "results.json"))
  for p in curve["points"]:
    d = p["distilled_minus_xray_only"]
    assert d["value"] == pytest.approx(p["auc"]["distilled"]["value"] - p["auc"]["xray_only"]["value"])
  assert points[(32, 192)]["auc"]["xray_only"] != points[(64, 192)]["auc"]["xray_only"]
  with open(os.path.join(workdir, "curve.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "| unlabelled pairs | labelled CXRs |" in open(os.path.join(workdir, "curve.md")).read()


def test_phantoms_source_embeds_phantom_images_and_reruns_without_work(tmp_path):
  # configs/prior.py:phantoms_tiny: the classifier system's :tiny DenseNet trained on the phantom
  # findings encodes every frontal image; the CTPA side is the phantom world's for those studies.
  from cxrjax.data.phantoms import PhantomConfig, paired_embeddings

  workdir = str(tmp_path / "phantoms")
  args = ("--config", os.path.join(ROOT, "configs/prior.py:phantoms_tiny"), "--workdir", workdir)
  proc = ok(launch(*args))
  assert "[cxr_encoder]" in proc.stdout and "[phantom_pairs]" in proc.stdout
  pairs = np.load(os.path.join(workdir, "phantom_pairs", "pairs.npz"))
  assert len(pairs["train_ids"]) == 64 and "unlabelled_label" not in pairs
  ids = np.concatenate([pairs[f"{s}_ids"] for s in ("train", "unlabelled", "valid", "test")])
  assert len(set(ids)) == len(ids) == 240  # every study of the :tiny world, in one split each
  index = np.array([int(str(i).lstrip("s")) for i in pairs["test_ids"]])
  ctpa, pe = paired_embeddings(0, index, PhantomConfig(lateral_rate=0.0), ctpa_dim=16)
  np.testing.assert_array_equal(pairs["test_ctpa"], ctpa)
  np.testing.assert_array_equal(pairs["test_label"], pe)
  assert pairs["train_cxr"].shape[1] == pairs["test_cxr"].shape[1] > 16  # the encoder's width
  results = _results(workdir)
  assert len(results["rows"]) == 5 and results["n_test"] == len(index)
  again = ok(launch(*args))
  assert "pairs already in" in again.stdout and "training steps" not in again.stdout
  assert _results(workdir)["rows"] == results["rows"]


def test_phantoms_source_takes_a_densenet_file_as_its_encoder(tmp_path):
  # phantoms.encoder_file: a DenseNet saved with torchvision's names encodes the images; no
  # encoder is trained, and the pairs' CXR side has the file's feature width.
  import safetensors.numpy
  from cxrjax.models import densenet as D
  from test_densenet import _flax_to_torch
  model = D.DenseNet(block_config=(2, 2), growth_rate=8, num_init_features=16, num_classes=3)
  variables = model.init(jax.random.PRNGKey(3), np.zeros((1, 32, 32, 1), np.float32))
  path = str(tmp_path / "encoder.safetensors")
  safetensors.numpy.save_file(_flax_to_torch(variables), path)
  workdir = str(tmp_path / "run")
  proc = ok(launch("--config", os.path.join(ROOT, "configs/prior.py:phantoms_tiny"), "--workdir",
                   workdir, f"--config.phantoms.encoder_file={path}"))
  assert f"[cxr_encoder] DenseNet from {path}" in proc.stdout
  assert not os.path.exists(os.path.join(workdir, "cxr_encoder", "classifier"))
  pairs = np.load(os.path.join(workdir, "phantom_pairs", "pairs.npz"))
  assert pairs["train_cxr"].shape == (64, 32)  # 16 + 2 x 8, halved, + 2 x 8
  marker = json.load(open(os.path.join(workdir, "phantom_pairs", "complete.json")))
  assert marker["cxr_encoder"]["file"] == path
  missing = launch("--config", os.path.join(ROOT, "configs/prior.py:phantoms_tiny"), "--workdir",
                   str(tmp_path / "other"), "--config.phantoms.encoder_file=/nonexistent.safetensors")
  assert missing.returncode == 2 and "phantoms.encoder_file" in missing.stderr.strip().splitlines()[-1]
