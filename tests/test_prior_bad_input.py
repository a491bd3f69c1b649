"""Bad input ends the launcher with one clear line, exit status 2, and nothing corrupted."""
import os

import numpy as np
import pandas as pd
import pytest

from cxrjax.data import paired_embeddings, synthetic_pe
from launch_util import ROOT, launch, tree_digest

TINY = os.path.join(ROOT, "configs/prior.py:tiny")


@pytest.fixture()
def layout(tmp_path):
  """The tiny synthetic data written in the seed's layout: (root, ctpa_dir, cxr_dir)."""
  data = synthetic_pe.generate(n_labelled=32, n_unlabelled=0, n_valid=16, n_test=16, cxr_dim=16,
                               ctpa_dim=16)
  return paired_embeddings.to_seed_layout(data, tmp_path / "data")


def _layout_args(root, ctpa, cxr):
  return ["--config.data.source=seed_layout", f"--config.data.seed_layout.root={root}",
          f"--config.data.seed_layout.ctpa_dir={ctpa}", f"--config.data.seed_layout.cxr_dir={cxr}"]


def _assert_clean_error(proc, *fragments):
  assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), last
  for fragment in fragments:
    assert fragment in last, (fragment, last)


def _first_id(root, split="train"):
  return pd.read_csv(os.path.join(root, f"y_{split}.csv"), dtype=str).iloc[0]


def test_missing_config_file(tmp_path):
  _assert_clean_error(launch("--config", "configs/does_not_exist.py", "--workdir", str(tmp_path)),
                      "does_not_exist.py", "not found")


def test_unknown_config_field(tmp_path):
  _assert_clean_error(launch("--config", TINY, "--config.train.stepz=3", "--workdir", str(tmp_path)),
                      "--config.train.stepz", "steps")


def test_value_of_wrong_type(tmp_path):
  _assert_clean_error(launch("--config", TINY, "--config.train.steps=many", "--workdir", str(tmp_path)),
                      "train.steps", "many")


def test_bad_choice(tmp_path):
  _assert_clean_error(launch("--config", TINY, "--config.diffusion.schedule=sigmoidal",
                             "--workdir", str(tmp_path)), "diffusion.schedule", "cosine")


def test_unknown_variant(tmp_path):
  _assert_clean_error(launch("--config", TINY.replace(":tiny", ":huge"), "--workdir", str(tmp_path)),
                      "huge")


def test_batch_not_divisible_by_devices(tmp_path):
  _assert_clean_error(launch("--config", TINY, "--config.train.batch_size=12", "--cpu_devices=8",
                             "--workdir", str(tmp_path)), "train.batch_size=12", "8 devices")


def test_missing_embedding_file(layout, tmp_path):
  root, ctpa, cxr = layout
  ct_id = _first_id(root)["CT_Accession_number"]
  os.remove(os.path.join(ctpa, f"{ct_id}.npy"))
  _assert_clean_error(launch("--config", TINY, *_layout_args(root, ctpa, cxr),
                             "--workdir", str(tmp_path / "w")), f"{ct_id}.npy")


def test_wrong_embedding_dimension(layout, tmp_path):
  root, ctpa, cxr = layout
  cx_id = _first_id(root, "valid")["cxr_Accession_number"]
  np.save(os.path.join(cxr, f"{cx_id}.npy"), np.zeros(15, np.float32))
  _assert_clean_error(launch("--config", TINY, *_layout_args(root, ctpa, cxr),
                             "--workdir", str(tmp_path / "w")), f"{cx_id}.npy")


def test_nan_in_embedding(layout, tmp_path):
  root, ctpa, cxr = layout
  ct_id = _first_id(root, "test")["CT_Accession_number"]
  x = np.load(os.path.join(ctpa, f"{ct_id}.npy"))
  x[3] = np.nan
  np.save(os.path.join(ctpa, f"{ct_id}.npy"), x)
  _assert_clean_error(launch("--config", TINY, *_layout_args(root, ctpa, cxr),
                             "--workdir", str(tmp_path / "w")), ct_id)


def test_empty_split(layout, tmp_path):
  root, ctpa, cxr = layout
  pd.read_csv(os.path.join(root, "y_test.csv"), dtype=str).iloc[:0].to_csv(
      os.path.join(root, "y_test.csv"), index=False)
  _assert_clean_error(launch("--config", TINY, *_layout_args(root, ctpa, cxr),
                             "--workdir", str(tmp_path / "w")), "y_test.csv")


def test_duplicate_accession(layout, tmp_path):
  root, ctpa, cxr = layout
  df = pd.read_csv(os.path.join(root, "y_train.csv"), dtype=str)
  df = pd.concat([df, df.iloc[[2]]])
  df.to_csv(os.path.join(root, "y_train.csv"), index=False)
  _assert_clean_error(launch("--config", TINY, *_layout_args(root, ctpa, cxr),
                             "--workdir", str(tmp_path / "w")), df.iloc[2]["CT_Accession_number"])


def test_label_outside_zero_one(layout, tmp_path):
  root, ctpa, cxr = layout
  df = pd.read_csv(os.path.join(root, "y_valid.csv"), dtype=str)
  df.loc[1, "PE"] = "2"
  df.to_csv(os.path.join(root, "y_valid.csv"), index=False)
  _assert_clean_error(launch("--config", TINY, *_layout_args(root, ctpa, cxr),
                             "--workdir", str(tmp_path / "w")), "y_valid.csv")


def test_corrupt_checkpoint_directory_is_reported_and_left_alone(tmp_path):
  workdir = str(tmp_path / "w")
  proc = launch("--config", TINY, "--workdir", workdir, env={"CXRJAX_FAULT_KILL_AT": "xray_only:5"})
  assert proc.returncode != 0
  state_dir = os.path.join(workdir, "ctpa_only", "ckpt", "20", "state")
  for d, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(d, f), "wb") as fh:
        fh.write(b"\x00not a checkpoint")
  digest = tree_digest(os.path.join(workdir, "ctpa_only"))
  _assert_clean_error(launch("--config", TINY, "--workdir", workdir), "ckpt/20", "cannot be restored")
  assert tree_digest(os.path.join(workdir, "ctpa_only")) == digest


def test_changed_config_in_same_workdir_is_refused(tmp_path):
  workdir = str(tmp_path / "w")
  proc = launch("--config", TINY, "--workdir", workdir, env={"CXRJAX_FAULT_KILL_AT": "xray_only:5"})
  assert proc.returncode != 0
  _assert_clean_error(launch("--config", TINY, "--config.classifier_train.optim.lr=0.5",
                             "--workdir", workdir), "lr: 0.03 -> 0.5", "--workdir")


def test_missing_seed_layout_root(tmp_path):
  _assert_clean_error(launch("--config", TINY, "--config.data.source=seed_layout",
                             "--workdir", str(tmp_path)), "seed_layout.root")
