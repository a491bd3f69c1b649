"""The DenseNet classifier system (configs/classifier.py) through the launcher, its resume, starting
from converted weights, bad input, and the pieces it adds (positive weights, macro bootstrap)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from launch_util import ROOT, launch, ok

TINY = ("--config", os.path.join(ROOT, "configs/classifier.py:tiny"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("classifier")
  proc = ok(launch(*TINY, "--workdir", str(workdir)))
  return str(workdir), proc


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_tiny_run_reports_per_label_and_macro_with_cis(reference_run):
  workdir, proc = reference_run
  r = _results(workdir)
  assert [row["label"] for row in r["per_label"]][:2] == ["Atelectasis", "Cardiomegaly"]
  assert len(r["per_label"]) == 14
  scored = [row for row in r["per_label"] if row["auroc"]]
  assert scored, "no label had both classes in the tiny test split"
  for row in scored:
    for m in ("auroc", "auprc"):
      assert 0 <= row[m]["lo"] <= row[m]["value"] <= row[m]["hi"] <= 1
  assert r["macro"]["auroc"]["labels"] == len(scored)
  assert "AUROC [95 % CI]" in proc.stdout and "**macro**" in proc.stdout
  with open(os.path.join(workdir, "roc.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes_without_training(reference_run):
  workdir, _ = reference_run
  before = _results(workdir)
  proc = ok(launch(*TINY, "--workdir", workdir))
  assert "training steps" not in proc.stdout and "already trained" in proc.stdout
  assert _results(workdir) == before


def test_starts_from_a_torchvision_named_weight_file(reference_run, tmp_path):
  # A DenseNet saved with torchvision's names and a 5-way head: its body is loaded, the head
  # replaced by a 14-way one; with a vanishing learning rate the trained body is the file's.
  safetensors = pytest.importorskip("safetensors.numpy")
  import jax
  from cxrjax.models import densenet as D
  from test_densenet import _flax_to_torch
  workdir, _ = reference_run
  model = D.DenseNet(block_config=(2, 2), growth_rate=8, num_init_features=16, num_classes=5)
  variables = model.init(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 1)))
  path = str(tmp_path / "w.safetensors")
  safetensors.save_file(_flax_to_torch(variables), path)
  run = str(tmp_path / "run")
  proc = ok(launch(*TINY, "--workdir", run, f"--config.model.init_from={path}",
                   "--config.train.optim.lr=1e-12", f"--config.data.data_dir={os.path.join(workdir, 'data')}"))
  assert "5 -> 14 outputs" in proc.stdout
  from cxrjax.core.checkpoint import restore_state
  state, _ = restore_state(os.path.join(run, "classifier", "ckpt"))
  np.testing.assert_allclose(state["params"]["conv0"]["kernel"],
                             np.asarray(variables["params"]["conv0"]["kernel"]), atol=1e-6)
  assert state["params"]["classifier"]["kernel"].shape[1] == 14


def test_unprepared_real_dataset_names_the_prepare_command(tmp_path):
  proc = launch(*TINY, "--workdir", str(tmp_path / "run"), "--config.data.builder=mimic_cxr_jpg",
                f"--config.data.data_dir={tmp_path / 'tfds'}",
                "--config.data.builder_config=('image_size=64','views=PA,AP')")
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "python -m cxrjax.data prepare mimic_cxr_jpg" in last, last


@pytest.mark.parametrize("override,message", [
    ("--config.data.builder=chexpert_v9", "data.builder='chexpert_v9'; choose one of"),
    ("--config.data.uncertain=maybe", "data.uncertain='maybe'"),
    ("--config.loss.class_weights=inverse", "loss.class_weights='inverse'"),
])
def test_bad_values_are_one_line_errors(tmp_path, override, message):
  proc = launch(*TINY, "--workdir", str(tmp_path), override)
  assert proc.returncode == 2
  assert message in proc.stderr.strip().splitlines()[-1]


def test_masked_bce_positive_weights_match_torch():
  torch = pytest.importorskip("torch")
  from cxrjax.losses.classification import masked_sigmoid_bce
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
  y = (rng.uniform(size=(6, 4)) > 0.6).astype(np.float32)
  w = np.array([1.0, 3.0, 0.5, 7.0], np.float32)
  want = torch.nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(w))(
      torch.from_numpy(logits), torch.from_numpy(y)).item()
  np.testing.assert_allclose(float(masked_sigmoid_bce(logits, y, w)), want, rtol=1e-6)
  y_nan = y.copy()
  y_nan[0, :] = np.nan  # masked entries leave the mean
  want = torch.nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(w))(
      torch.from_numpy(logits[1:]), torch.from_numpy(y[1:])).item()
  np.testing.assert_allclose(float(masked_sigmoid_bce(logits, y_nan, w)), want, rtol=1e-6)


def test_macro_bootstrap_known_answers():
  from cxrjax.systems.classifier.evaluation import macro, per_label
  rng = np.random.default_rng(1)
  y = (rng.uniform(size=(300, 14)) > 0.7).astype(np.float32)
  y[:, 3] = np.nan  # a label never known: left out
  perfect = macro(y, np.nan_to_num(y), n_resamples=200, alpha=0.05, seed=0)
  assert perfect["auroc"]["labels"] == 13
  assert perfect["auroc"]["value"] == perfect["auroc"]["lo"] == perfect["auroc"]["hi"] == 1.0
  noise = macro(y, rng.uniform(size=y.shape), n_resamples=200, alpha=0.05, seed=0)
  assert noise["auroc"]["lo"] < 0.5 < noise["auroc"]["hi"] and noise["auroc"]["hi"] - noise["auroc"]["lo"] < 0.1
  rows = per_label(y, rng.uniform(size=y.shape), n_resamples=50, alpha=0.05, seed=0)
  assert rows[3]["auroc"] is None and rows[3]["n"] == 0


def test_positive_weights_count_after_the_uncertain_policy():
  from cxrjax.systems.classifier.data import positive_weights
  labels = np.full((5, 14), np.nan, np.float32)
  labels[:, 0] = [1, 0, 0, 0, -1]   # ignore: 3 neg / 1 pos; ones: 3 / 2
  labels[:, 1] = [1, 1, 1, 1, 1]    # no negative: weight 1
  source = [{"labels": row} for row in labels]
  np.testing.assert_allclose(positive_weights(source, "ignore")[:2], [3.0, 1.0])
  np.testing.assert_allclose(positive_weights(source, "ones")[:2], [1.5, 1.0])


def test_trains_and_evaluates_on_a_prepared_mimic_tree(tmp_path):
  # The real-data path end to end: a fake MIMIC-CXR-JPG download with the real layout, prepared by
  # the data command, then read by the classifier (4 studies, so the report has no label with
  # both classes and says so rather than failing).
  from cxrjax.data import cli
  from test_sources_mimic import make_mimic
  root = make_mimic(tmp_path / "mimic-cxr-jpg" / "2.0.0")
  tfds_dir = str(tmp_path / "tfds")
  cli.main(["prepare", "mimic_cxr_jpg", "--data_dir", tfds_dir, "--manual_dir", str(root),
            "--config", "image_size=32"])
  run = str(tmp_path / "run")
  proc = ok(launch(*TINY, "--workdir", run, "--config.data.builder=mimic_cxr_jpg",
                   f"--config.data.data_dir={tfds_dir}",
                   "--config.data.builder_config=('image_size=32',)",
                   "--config.data.views=('PA','AP','UNKNOWN')",  # the test study's view is blank
                   "--config.eval.batch_size=8"))
  assert "data: mimic_cxr_jpg/image_size-32 {'train': 2, 'validation': 1, 'test': 1}; 14 labels" in proc.stdout
  r = _results(run)
  assert r["counts"]["test_scored"] == 1 and len(r["per_label"]) == 14
  assert r["macro"]["auroc"] is None and "| **macro** (0 labels) | | | n/a | n/a |" in proc.stdout
