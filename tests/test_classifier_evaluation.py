"""The classifier's report pieces without a run: the macro bootstrap and the markdown table."""
import numpy as np
from sklearn import metrics as skm

from cxrjax.systems.classifier.evaluation import macro, table


def _labels(n, seed, c=6):
  """(n, c) labels {0, 1, NaN} with unknown entries, a never-known and a one-class label."""
  rng = np.random.default_rng(seed)
  y = (rng.uniform(size=(n, c)) > 0.7).astype(np.float32)
  y[rng.uniform(size=y.shape) < 0.3] = np.nan
  y[:, 3] = np.nan
  y[:, 5] = np.where(np.isnan(y[:, 5]), np.nan, 0.0)
  return y, rng.uniform(size=y.shape)


def _sklearn_macro(y, p, fn):
  vals = []
  for j in range(y.shape[1]):
    known = np.isfinite(y[:, j])
    if 0 < y[known, j].sum() < known.sum():
      vals.append(fn(y[known, j], p[known, j]))
  return np.mean(vals) if vals else np.nan


def test_macro_is_sklearn_over_the_same_draws():
  y, p = _labels(40, 0)
  got = macro(y, p, n_resamples=40, alpha=0.1, seed=3)
  draws = np.random.default_rng(3).integers(0, len(y), size=(40, len(y)))
  for metric, fn in (("auroc", skm.roc_auc_score), ("auprc", skm.average_precision_score)):
    samples = np.array([_sklearn_macro(y[r], p[r], fn) for r in draws])
    lo, hi = np.quantile(samples[np.isfinite(samples)], [0.05, 0.95])
    np.testing.assert_allclose([got[metric]["lo"], got[metric]["hi"]], [lo, hi], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[metric]["value"], _sklearn_macro(y, p, fn), rtol=0, atol=1e-12)
    assert got[metric]["labels"] == 4


def test_macro_ci_contains_the_estimate_and_narrows():
  rng = np.random.default_rng(1)
  y = (rng.uniform(size=(2000, 14)) > 0.7).astype(np.float32)
  p = np.clip(0.3 * y + rng.uniform(size=y.shape), 0, 1.3)
  y[rng.uniform(size=y.shape) < 0.2] = np.nan
  m = macro(y, p, n_resamples=40, alpha=0.05, seed=0)["auroc"]
  assert m["lo"] < m["value"] < m["hi"] and m["hi"] - m["lo"] < 0.03


def test_table_text():
  row = lambda v: {"value": v, "lo": v - 0.1, "hi": v + 0.05}
  rows = [{"label": "Edema", "n": 40, "positives": 9, "auroc": row(0.8), "auprc": row(0.6)},
          {"label": "Fracture", "n": 40, "positives": 0, "auroc": None, "auprc": None}]
  mac = {"auroc": {**row(0.8), "labels": 1}, "auprc": {**row(0.6), "labels": 1}}
  assert table(rows, mac, 0.95) == (
      "| label | n | positives | AUROC [95 % CI] | AUPRC [95 % CI] |\n"
      "|---|---|---|---|---|\n"
      "| Edema | 40 | 9 | 0.800 [0.700, 0.850] | 0.600 [0.500, 0.650] |\n"
      "| Fracture | 40 | 0 | n/a | n/a |\n"
      "| **macro** (1 labels) | | | 0.800 [0.700, 0.850] | 0.600 [0.500, 0.650] |")
