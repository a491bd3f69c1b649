"""The phantom renderer keeps its signs: a small CNN learns strong-sign labels from a few hundred
phantoms, and high-severity cases are easier than mild ones.

A fast, fixed-seed miniature of benchmarks/phantom_learnability.py (which it imports, so the
benchmark's code is exercised too): 600 training and 400 test frontal phantoms at 64 x 64, a
narrow SmallCNN, 400 steps of 32 on the core loop with the stored labels (U-ignore), scored
against the truth. Measured (renderer of bf9b264, 2 CPU cores, ~16 s): AUROC 0.987 Cardiomegaly,
0.941 Pleural Effusion, 0.989 Enlarged Cardiomediastinum; high-severity minus mild AUROC +0.017,
+0.080, +0.015. The 0.8 bar leaves room for renderer changes that keep the signs; one that loses
a sign leaves only what co-occurring findings give away (these three travel with each other).
"""

import numpy as np
import pytest

from cxrjax.models.small_cnn import SmallCNN
from launch_util import load_benchmark

STRONG = ("Cardiomegaly", "Pleural Effusion", "Enlarged Cardiomediastinum")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  pl = load_benchmark("phantom_learnability")
  train_idx = pl.select_studies(0, 0, 600)
  # Test enriched so each strong label has >= 15 high-severity and >= 25 mild positives.
  test_idx = pl.select_studies(0, pl.TEST_START, 400, quotas={"high": 15, "mild": 25}, labels=STRONG)
  train, test = pl.make_split(0, train_idx, 64), pl.make_split(0, test_idx, 64)
  model = SmallCNN(widths=(8, 16, 32, 64), convs_per_stage=(1, 1, 2, 2))
  params = pl.train_cnn(train, model=model, steps=400, batch_size=32, seed=0,
                        workdir=str(tmp_path_factory.mktemp("cnn")), log_every=400,
                        optim=dict(pl.DEFAULT_OPTIM, lr=3e-3, warmup_steps=30))
  scores = pl.predict(model, params, test["images"])
  assert scores.shape == (400, 14) and np.isfinite(scores).all()
  return {r["label"]: r for r in pl.learnability(test["truth"], test["severity"], scores,
                                                 labels=STRONG, n_resamples=200)}


def test_strong_signs_are_learned(rows):
  for name in STRONG:
    assert rows[name]["overall"]["auc"] > 0.8, (name, rows[name]["overall"])


def test_high_severity_not_harder_than_mild(rows):
  gaps = {n: rows[n]["high"]["auc"] - rows[n]["mild"]["auc"] for n in STRONG}
  assert all(rows[n]["high"]["n_pos"] >= 15 and rows[n]["mild"]["n_pos"] >= 25 for n in STRONG)
  assert max(gaps.values()) > 0.0, gaps
