"""A refused run touches nothing and ends in one clear line; results are never overwritten by an
evaluation made with other settings (issue 16)."""
import glob
import json
import os

import pandas as pd
import pytest

from cxrjax.core.errors import ConfigError
from cxrjax.core.stage import usable_workdir
from cxrjax.data import paired_embeddings, synthetic_pe
from launch_util import ROOT, launch, ok, tree_digest

TINY = os.path.join(ROOT, "configs/prior.py:tiny")


def _one_line_error(proc, *fragments):
  assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  assert "training steps" not in proc.stdout, "it trained before refusing"
  return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  ok(launch("--config", TINY, "--workdir", workdir))
  return workdir


@pytest.fixture()
def layout(tmp_path):
  data = synthetic_pe.generate(n_labelled=32, n_unlabelled=0, n_valid=16, n_test=16, cxr_dim=16,
                               ctpa_dim=16)
  root, ctpa, cxr = paired_embeddings.to_seed_layout(data, tmp_path / "data")
  return root, ["--config.data.source=seed_layout", f"--config.data.seed_layout.root={root}",
                f"--config.data.seed_layout.ctpa_dir={ctpa}", f"--config.data.seed_layout.cxr_dir={cxr}"]


@pytest.mark.parametrize("override,fragment", [
    ("--config.classifier.dropout=1.5", "classifier.dropout=1.5 must be in [0, 1)"),
    ("--config.classifier.dropout=-0.5", "classifier.dropout=-0.5"),
    ("--config.diffusion.cond_drop_prob=1.2", "diffusion.cond_drop_prob=1.2"),
    ("--config.train.ema.beta=1.5", "train.ema.beta=1.5"),
    ("--config.train.optim.lr=nan", "train.optim.lr=nan must be finite"),
    ("--config.train.optim.weight_decay=nan", "train.optim.weight_decay=nan"),
    ("--config.loss.w_cls=nan", "loss.w_cls=nan"),
    ("--config.loss.w_diff=inf", "loss.w_diff=inf"),
])
def test_bad_numbers_are_refused_at_parse_time(tmp_path, override, fragment):
  _one_line_error(launch("--config", TINY, override, "--workdir", str(tmp_path / "w")), fragment)
  assert not (tmp_path / "w").exists()


def test_refused_run_changes_nothing_in_the_workdir(finished):
  before = tree_digest(finished)
  _one_line_error(launch("--config", TINY, "--workdir", finished, "--config.classifier_train.steps=30"),
                  "classifier_train.steps: 20 -> 30")
  _one_line_error(launch("--config", TINY, "--workdir", finished, "--config.prior.depth=2"),
                  "prior.depth: 1 -> 2")
  assert tree_digest(finished) == before


def test_new_evaluation_settings_write_beside_the_first_result(finished):
  first = json.load(open(os.path.join(finished, "results.json")))
  proc = ok(launch("--config", TINY, "--workdir", finished, "--config.sampling.num_samples=1"))
  assert "already trained" in proc.stdout and "training steps" not in proc.stdout
  assert json.load(open(os.path.join(finished, "results.json"))) == first
  beside = glob.glob(os.path.join(finished, "evaluations", "*", "results.json"))
  assert len(beside) == 1 and "evaluations" in proc.stdout
  assert json.load(open(beside[0]))["config"]["sampling"]["num_samples"] == 1
  assert os.path.exists(os.path.join(os.path.dirname(beside[0]), "roc.png"))
  # The original settings again: the same result, in the workdir.
  ok(launch("--config", TINY, "--workdir", finished))
  assert json.load(open(os.path.join(finished, "results.json"))) == first


def test_same_cxr_in_train_and_test_is_leakage(layout, tmp_path):
  root, args = layout
  train = pd.read_csv(os.path.join(root, "y_train.csv"), dtype=str)
  test = pd.read_csv(os.path.join(root, "y_test.csv"), dtype=str)
  test.loc[0, "cxr_Accession_number"] = train.loc[3, "cxr_Accession_number"]
  test.to_csv(os.path.join(root, "y_test.csv"), index=False)
  _one_line_error(launch("--config", TINY, *args, "--workdir", str(tmp_path / "w")),
                  "leakage: 1 CXR accession(s)", train.loc[3, "cxr_Accession_number"])


@pytest.mark.parametrize("split", ["test", "valid"])
def test_split_of_one_class_is_refused_before_training(layout, tmp_path, split):
  root, args = layout
  df = pd.read_csv(os.path.join(root, f"y_{split}.csv"), dtype=str)
  df["PE"] = "0"
  df.to_csv(os.path.join(root, f"y_{split}.csv"), index=False)
  _one_line_error(launch("--config", TINY, *args, "--workdir", str(tmp_path / "w")),
                  f"split {split} holds", "needs both classes")


def test_a_single_validation_pair_is_refused(tmp_path):
  _one_line_error(launch("--config", TINY, "--config.data.synthetic.n_valid=1",
                         "--workdir", str(tmp_path / "w")), "split valid holds")


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  _one_line_error(launch("--config", TINY, "--workdir", str(path)), "is a file")
  assert path.read_text() == "not a directory"


def test_workdir_that_cannot_be_written(tmp_path, monkeypatch):
  # As root (CI), chmod does not stop writes: the check itself is tested.
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  with pytest.raises(ConfigError, match="is not writable"):
    usable_workdir(str(tmp_path))


def test_a_text_file_given_as_npz(tmp_path):
  path = tmp_path / "pairs.npz"
  path.write_text("id,label\n1,0\n")
  _one_line_error(launch("--config", TINY, "--config.data.source=npz", f"--config.data.path={path}",
                         "--workdir", str(tmp_path / "w")), "not an .npz file")


def test_a_truncated_checkpoint_is_one_line(tmp_path):
  workdir = str(tmp_path / "w")
  assert launch("--config", TINY, "--workdir", workdir,
                env={"CXRJAX_FAULT_KILL_AT": "xray_only:5"}).returncode != 0
  # The array chunks only: the metadata still reads, TensorStore fails while reading the arrays.
  files = glob.glob(os.path.join(workdir, "ctpa_only", "ckpt", "20", "state", "**", "d", "*"),
                    recursive=True)
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  proc = launch("--config", TINY, "--workdir", workdir)
  line = _one_line_error(proc, "cannot be restored")
  assert "ckpt/20" in line
