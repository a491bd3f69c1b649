"""The phantom renderer keeps its signs: a small CNN learns strong-sign labels from a few hundred
phantoms, and mild cases are harder than severe ones.

A fast, fixed-seed miniature of benchmarks/phantom_learnability.py (which it imports, so the
benchmark's code is exercised too): 600 training frontal phantoms at 64 x 64 (at least 40
high-severity positives of each strong label among them) and 400 test ones, a narrow SmallCNN, 400
steps of 32 on the core loop with the stored labels (U-ignore), scored against the truth. Measured
(renderer of this commit, 2 CPU cores, ~17 s): high-severity AUROC 0.996 Cardiomegaly, 0.948 Pleural
Effusion, 1.000 Enlarged Cardiomediastinum; mild AUROC 0.956, 0.713, 0.958. The 0.85 bar leaves room
for renderer changes that keep the signs; one that loses a sign leaves only what co-occurring
findings give away (these three travel with each other). A renderer that gives a label away
whatever its severity (a density that does not scale with it, a gap between the normal and the
abnormal range of a measurement) makes mild cases as easy as severe ones, and fails the second test.
"""

import numpy as np
import pytest

from cxrjax.models.small_cnn import SmallCNN
from cxrjax.tasks.small_cnn import DEFAULT_OPTIM, predict, train_cnn
from launch_util import load_benchmark

STRONG = ("Cardiomegaly", "Pleural Effusion", "Enlarged Cardiomediastinum")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  pl = load_benchmark("phantom_learnability")
  train_idx = pl.select_studies(0, 0, 600, quotas={"high": 40}, labels=STRONG)
  # Test enriched so each strong label has >= 15 high-severity and >= 25 mild positives.
  test_idx = pl.select_studies(0, pl.TEST_START, 400, quotas={"high": 15, "mild": 25}, labels=STRONG)
  train, test = pl.make_split(0, train_idx, 64), pl.make_split(0, test_idx, 64)
  model = SmallCNN(widths=(8, 16, 32, 64), convs_per_stage=(1, 1, 2, 2))
  params = train_cnn(train["images"], pl.training_targets(train), model=model, steps=400,
                     batch_size=32, seed=0, workdir=str(tmp_path_factory.mktemp("cnn")),
                     log_every=400, optim=dict(DEFAULT_OPTIM, lr=3e-3, warmup_steps=30))
  scores = predict(model, params, test["images"])
  assert scores.shape == (400, 14) and np.isfinite(scores).all()
  return {r["label"]: r for r in pl.learnability(test["truth"], test["severity"], scores,
                                                 labels=STRONG, n_resamples=200)}


def test_strong_signs_are_learned(rows):
  for name in STRONG:
    assert rows[name]["high"]["auc"] > 0.85, (name, rows[name]["high"])


def test_mild_cases_are_harder(rows):
  gaps = {n: rows[n]["gap"]["gap"] for n in STRONG}
  assert all(rows[n]["high"]["n_pos"] >= 15 and rows[n]["mild"]["n_pos"] >= 25 for n in STRONG)
  assert all(abs(g - (rows[n]["high"]["auc"] - rows[n]["mild"]["auc"])) < 1e-12 for n, g in gaps.items())
  assert min(gaps.values()) > 0.02, gaps


def test_gap_entry_wraps_the_paired_difference():
  pl = load_benchmark("phantom_learnability")
  y = np.r_[np.ones(4, bool), np.zeros(6, bool)]
  s = np.arange(10.0)[::-1]
  high, mild = np.r_[1, 1, 0, 0, np.zeros(6)].astype(bool), np.r_[0, 0, 1, 1, np.zeros(6)].astype(bool)
  g = pl._gap_entry(y, s, high, mild, 50, 0)
  assert g["gap"] == 0.0 and g["ci"][0] <= 0.0 <= g["ci"][1]
  assert pl._gap_entry(y, s, high & False, mild, 10, 0) == {"gap": None, "ci": None}
