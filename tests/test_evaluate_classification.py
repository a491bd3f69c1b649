"""Tests for cxrjax.evaluate.classification and cxrjax.evaluate.report."""

import json
import math
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from cxrjax.evaluate.classification import (
    average_precision,
    binary_report,
    bootstrap_ci,
    bootstrap_statistic,
    confusion_at,
    model_auc_difference,
    paired_auc_difference,
    roc_auc,
    roc_curve_points,
    youden_threshold,
)
from cxrjax.evaluate.report import markdown_rows, markdown_table, plot_roc


def _tied_sample(n, seed, decimals=1, prevalence=0.3):
  """Labels with both classes and scores rounded so ties are common."""
  rng = np.random.default_rng(seed)
  y = (rng.random(n) < prevalence).astype(int)
  y[:2] = [0, 1]  # both classes even for tiny n
  s = np.round(rng.normal(size=n) * 0.3 + 0.4 * y, decimals)
  return y, s


def _separated_sample(n, seed, shift=1.0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  y[:2] = [0, 1]
  return y, rng.normal(size=n) + shift * y


CASES = [(n, seed, dec) for n in (2, 3, 7, 25, 300) for seed in (0, 1) for dec in (0, 1)]


# --------------------------------------------------------------------------- #
# point metrics vs sklearn
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n,seed,dec", CASES)
def test_auc_and_auprc_match_sklearn_with_ties(n, seed, dec):
  y, s = _tied_sample(n, seed, dec)
  assert abs(roc_auc(y, s) - skm.roc_auc_score(y, s)) < 1e-9
  assert abs(average_precision(y, s) - skm.average_precision_score(y, s)) < 1e-9


def test_label_dtypes_accepted():
  y, s = _tied_sample(50, 3)
  ref = roc_auc(y, s)
  assert roc_auc(y.astype(bool), s) == ref
  assert roc_auc(y.astype(float), list(s)) == ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_curve_points_match_sklearn(seed):
  for y, s in (_separated_sample(40, seed), _tied_sample(60, seed)):
    fpr, tpr, thr = roc_curve_points(y, s)
    f_ref, t_ref, thr_ref = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f_ref, atol=1e-12)
    np.testing.assert_allclose(tpr, t_ref, atol=1e-12)
    np.testing.assert_array_equal(thr, thr_ref)
    # Trapezoid area under our points is the AUC.
    assert abs(np.trapezoid(tpr, fpr) - roc_auc(y, s)) < 1e-12


# --------------------------------------------------------------------------- #
# bootstrap
# --------------------------------------------------------------------------- #
def test_bootstrap_ci_basic_properties():
  y, s = _separated_sample(400, 0)
  lo, hi = bootstrap_ci(y, s, n_resamples=500, seed=0)
  assert 0.0 <= lo <= roc_auc(y, s) <= hi <= 1.0


def test_bootstrap_ci_narrows_with_n():
  small = bootstrap_ci(*_separated_sample(100, 1), n_resamples=500)
  large = bootstrap_ci(*_separated_sample(2000, 1), n_resamples=500)
  assert large[1] - large[0] < 0.6 * (small[1] - small[0])


def test_bootstrap_ci_seeding():
  y, s = _tied_sample(200, 4)
  a = bootstrap_ci(y, s, n_resamples=300, seed=7)
  assert a == bootstrap_ci(y, s, n_resamples=300, seed=7)
  assert a != bootstrap_ci(y, s, n_resamples=300, seed=8)


def test_bootstrap_ci_separable_is_one():
  y = np.array([0] * 10 + [1] * 10)
  s = np.arange(20, dtype=float)
  assert bootstrap_ci(y, s, n_resamples=200) == (1.0, 1.0)
  assert bootstrap_ci(y, s, "auprc", n_resamples=200) == (1.0, 1.0)


def test_bootstrap_redraws_single_class_resamples():
  # n=4 with one positive: ~32% of raw draws lack a positive and are redrawn.
  y, s = np.array([0, 0, 0, 1]), np.array([0.1, 0.4, 0.35, 0.8])
  lo, hi, values = bootstrap_ci(y, s, n_resamples=250, seed=3, return_samples=True)
  assert values.shape == (250,)
  assert np.all(np.isfinite(values)) and 0.0 <= lo <= hi <= 1.0


def test_vectorised_resample_metrics_match_pointwise():
  """The (R, n) count-based metrics used by the bootstrap equal the point metrics."""
  from cxrjax.evaluate.classification import _ap_from_counts, _auc_from_counts, _class_counts

  y, s = _tied_sample(60, 5)
  y = y.astype(bool)
  idx = np.random.default_rng(1).integers(0, y.size, size=(30, y.size))
  idx = idx[(y[idx].sum(1) > 0) & (y[idx].sum(1) < y.size)]
  pos, neg = _class_counts(y, s, idx)
  for vec, fn in ((_auc_from_counts, roc_auc), (_ap_from_counts, average_precision)):
    np.testing.assert_allclose(vec(pos, neg), [fn(y[i], s[i]) for i in idx], atol=1e-12)


def _macro_auc(y, s):
  """Multi-label statistic for bootstrap_statistic: y (N, C) {0, 1, NaN}, s (N, C) -> idx (R, N)
  -> (R,) mean sklearn AUROC over labels with both classes among their known rows (NaN if none)."""
  def statistic(idx):
    out = []
    for r in idx:
      aucs = []
      for j in range(y.shape[1]):
        known = np.isfinite(y[r, j])
        yj = y[r, j][known]
        if 0 < yj.sum() < yj.size:
          aucs.append(skm.roc_auc_score(yj, s[r, j][known]))
      out.append(np.mean(aucs) if aucs else np.nan)
    return np.array(out)
  return statistic


def test_bootstrap_statistic_is_a_loop_over_explicit_draws():
  # Skip mode: plain draws from default_rng(seed), undefined (NaN) resamples left out.
  rng = np.random.default_rng(0)
  y = (rng.random((12, 3)) < 0.4).astype(float)
  y[rng.random(y.shape) < 0.3] = np.nan  # unknown entries are ignored per label
  y[:, 1] = np.nan
  y[:2, 1] = [0, 1]  # one class in most draws
  y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 1.0)  # one class only: never scored
  s = rng.random(y.shape)
  stat = _macro_auc(y, s)
  lo, hi, values = bootstrap_statistic(stat, 12, n_resamples=300, alpha=0.1, seed=5)
  draws = np.random.default_rng(5).integers(0, 12, size=(300, 12))
  want = [stat(r[None])[0] for r in draws]
  np.testing.assert_array_equal(values, want)
  assert np.isnan(values).any() and not np.isnan(values).all()
  finite = values[np.isfinite(values)]
  assert (lo, hi) == tuple(np.quantile(finite, [0.05, 0.95]))
  # A label with one class never enters the mean.
  assert stat(np.arange(12)[None])[0] == _macro_auc(y[:, :2], s[:, :2])(np.arange(12)[None])[0]


def test_bootstrap_statistic_redraw_and_chunks():
  y, s = _tied_sample(40, 2, prevalence=0.1)
  auc = lambda idx: np.array([roc_auc(y[r], s[r]) for r in idx])  # raises on one class
  both = lambda idx: (y[idx].sum(1) > 0) & (y[idx].sum(1) < y.size)
  lo, hi, values = bootstrap_statistic(auc, y.size, n_resamples=120, seed=1, valid=both)
  assert values.shape == (120,) and np.isfinite(values).all()
  assert bootstrap_statistic(auc, y.size, n_resamples=120, seed=1, valid=both, chunk=7)[:2] == (lo, hi)
  # bootstrap_ci is this statistic with its own batch rule: same kind of interval.
  assert abs(lo - bootstrap_ci(y, s, n_resamples=120, seed=1)[0]) < 0.1


def test_bootstrap_statistic_contains_estimate_on_large_sample():
  y, s = _separated_sample(3000, 4)
  yy = np.stack([y, 1 - y], axis=1).astype(float)
  ss = np.stack([s, -s + np.random.default_rng(0).normal(size=s.size)], axis=1)
  stat = _macro_auc(yy, ss)
  lo, hi, _ = bootstrap_statistic(stat, y.size, n_resamples=60, seed=0)
  point = stat(np.arange(y.size)[None])[0]
  assert lo < point < hi and hi - lo < 0.05


def test_bootstrap_statistic_errors():
  stat = lambda idx: np.full(len(idx), np.nan)
  with pytest.raises(ValueError, match="undefined on all 5"):
    bootstrap_statistic(stat, 10, n_resamples=5)
  with pytest.raises(ValueError, match="alpha"):
    bootstrap_statistic(stat, 10, alpha=0.0)
  with pytest.raises(ValueError, match="n_resamples"):
    bootstrap_statistic(stat, 10, n_resamples=0)


def test_bootstrap_speed():
  y, s = _separated_sample(1000, 2)
  t0 = time.perf_counter()
  bootstrap_ci(y, s, n_resamples=1000)
  assert time.perf_counter() - t0 < 1.0


def _two_groups(n, seed):
  """Tied scores, positives split into groups A (first half) and B, a few in neither."""
  y, s = _tied_sample(n, seed)
  pos = np.flatnonzero(y)
  a, b = np.zeros(n, bool), np.zeros(n, bool)
  a[pos[: len(pos) // 2]] = True
  b[pos[len(pos) // 2 : -2]] = True
  return y, s, a, b


def test_paired_auc_difference_matches_subset_definition():
  y, s, a, b = _two_groups(400, 3)
  neg = y == 0
  want = skm.roc_auc_score(y[neg | a], s[neg | a]) - skm.roc_auc_score(y[neg | b], s[neg | b])
  d, lo, hi = paired_auc_difference(y, s, a, b, n_resamples=300, seed=1)
  assert abs(d - want) < 1e-12 and lo <= d <= hi
  # Each resample is the same difference computed on the resampled rows (replayed draws).
  from cxrjax.evaluate.classification import _draw_rows
  valid = lambda i: a[i].any(1) & b[i].any(1) & neg[i].any(1)
  idx = _draw_rows(np.random.default_rng(1), y.size, 300, valid)
  vals = [skm.roc_auc_score(y[i][neg[i] | a[i]], s[i][neg[i] | a[i]])
          - skm.roc_auc_score(y[i][neg[i] | b[i]], s[i][neg[i] | b[i]]) for i in idx]
  np.testing.assert_allclose((lo, hi), np.quantile(vals, [0.025, 0.975]), rtol=0, atol=1e-12)


def test_paired_auc_difference_known_answers():
  rng = np.random.default_rng(0)
  y = np.r_[np.ones(200), np.zeros(400)].astype(int)
  a, b = np.arange(600) < 100, (np.arange(600) >= 100) & (np.arange(600) < 200)
  s = rng.normal(size=600)
  s[a] += 3.0  # group A stands out, group B scores like the negatives
  d, lo, hi = paired_auc_difference(y, s, a, b, n_resamples=300)
  assert 0.3 < lo < d < hi
  s[b] += 3.0  # equally easy: the interval straddles 0
  d, lo, hi = paired_auc_difference(y, s, a, b, n_resamples=300)
  assert lo < 0.0 < hi
  assert paired_auc_difference(y, s, a, a, n_resamples=50) == (0.0, 0.0, 0.0)
  assert paired_auc_difference(y, s, a, b, n_resamples=50, seed=4) == paired_auc_difference(
      y, s, a, b, n_resamples=50, seed=4)
  with pytest.raises(ValueError, match="at least one positive"):
    paired_auc_difference(y, s, a & False, b)


def test_model_auc_difference_replays_the_paired_resamples():
  rng = np.random.default_rng(5)
  y = (rng.random(300) < 0.3).astype(int)
  a = y * 1.0 + rng.normal(size=300)  # the better model
  b = y * 0.5 + rng.normal(size=300)
  d, lo, hi = model_auc_difference(y, a, b, n_resamples=300, seed=2)
  assert abs(d - (skm.roc_auc_score(y, a) - skm.roc_auc_score(y, b))) < 1e-12 and lo <= d <= hi
  # Both models are scored on the same resampled rows: the draws bootstrap_ci makes for one model.
  _, _, va = bootstrap_ci(y, a, n_resamples=300, seed=2, return_samples=True)
  _, _, vb = bootstrap_ci(y, b, n_resamples=300, seed=2, return_samples=True)
  np.testing.assert_allclose((lo, hi), np.quantile(va - vb, [0.025, 0.975]), rtol=0, atol=1e-12)
  assert model_auc_difference(y, a, a, n_resamples=50) == (0.0, 0.0, 0.0)
  assert model_auc_difference(y, b, a, n_resamples=300, seed=2) == pytest.approx((-d, -hi, -lo))
  # Paired: a model against itself plus small noise has a far narrower interval than two
  # independent bootstrap intervals would suggest.
  lo2, hi2 = model_auc_difference(y, a, a + 0.01 * rng.normal(size=300), n_resamples=300)[1:]
  assert hi2 - lo2 < 0.1 * (hi - lo)


# --------------------------------------------------------------------------- #
# operating points
# --------------------------------------------------------------------------- #
def test_youden_threshold_known_answers():
  assert youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.5, 0.8]) == 0.5
  # J is 2/3 at both t=0.7 and t=0.4; the documented rule picks the smaller.
  y = [0, 0, 0, 1, 1, 1]
  s = [0.1, 0.2, 0.6, 0.4, 0.7, 0.9]
  assert youden_threshold(y, s) == 0.4


def test_confusion_at_known_answers():
  y = [0, 0, 0, 1, 1, 1]
  s = [0.1, 0.2, 0.6, 0.4, 0.7, 0.9]
  c = confusion_at(y, s, 0.5)
  assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (2, 1, 2, 1)
  for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
    assert c[key] == pytest.approx(2 / 3)
# score == threshold counts as positive
  c = confusion_at(y, s, 0.4)
  assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (3, 1, 2, 0)
  assert c["npv"] == 1.0 and c["sensitivity"] == 1.0
  # nobody predicted positive: PPV has no denominator
  c = confusion_at(y, s, 1.5)
  assert math.isnan(c["ppv"]) and c["specificity"] == 1.0 and c["sensitivity"] == 0.0


def test_binary_report_is_json_ready():
  y, s = _separated_sample(300, 6)
  rep = binary_report(y, s, threshold=0.5, n_resamples=200)
  assert set(rep) == {"auc", "auc_ci", "auprc", "accuracy", "sensitivity",
                      "specificity", "threshold"}
  assert all(type(v) is float for k, v in rep.items() if k != "auc_ci")
  assert all(type(v) is float for v in rep["auc_ci"])
  assert rep["auc_ci"][0] <= rep["auc"] <= rep["auc_ci"][1]
  assert rep["accuracy"] == confusion_at(y, s, 0.5)["accuracy"]
  json.dumps(rep)
  youden = binary_report(y, s, threshold="youden", n_resamples=50)
  assert youden["threshold"] == youden_threshold(y, s)


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("fn", [roc_auc, average_precision, roc_curve_points,
                                youden_threshold, bootstrap_ci])
def test_errors(fn):
  with pytest.raises(ValueError, match="one class"):
    fn([1, 1, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="NaN"):
    fn([0, 1, 1], [0.1, np.nan, 0.3])
  with pytest.raises(ValueError, match="length"):
    fn([0, 1, 1], [0.1, 0.3])
  with pytest.raises(ValueError, match="0/1"):
    fn([0, 2, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="1-D"):
    fn([[0, 1]], [[0.1, 0.2]])


def test_bad_arguments():
  y, s = [0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]
  with pytest.raises(ValueError, match="metric"):
    bootstrap_ci(y, s, metric="f1")
  with pytest.raises(ValueError, match="alpha"):
    bootstrap_ci(y, s, alpha=1.5)
  with pytest.raises(ValueError, match="youden"):
    binary_report(y, s, threshold="best")


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #
ROW = {"model": "ctpa_only", "auc": 0.853, "auc_ci": [0.771, 0.942], "auprc": 0.7,
       "accuracy": 0.8, "specificity": 0.8, "sensitivity": 0.82, "threshold": 0.4567}


def _cells(line):
  return [c.strip() for c in line.strip().strip("|").split("|")]


def test_markdown_table_row():
  table = markdown_table([ROW], names={"ctpa_only": "CTPA only classifier"})
  header, rule, row = table.rstrip("\n").split("\n")
  assert _cells(header) == ["Model", "AUC", "Accuracy", "Specificity", "Sensitivity"]
  assert set(rule) <= {"|", "-"}
  assert _cells(row) == ["CTPA only classifier", "0.85 [0.77-0.94]", "0.80", "0.80", "0.82"]
  # columns are padded to a common width
  assert len({len(line) for line in (header, rule, row)}) == 1


def test_markdown_table_extra_columns_and_missing():
  other = {"model": "cxr|prior", "auc": float("nan")}
  table = markdown_table([ROW, other], columns=("model", "auc", "auprc", "threshold"))
  lines = table.rstrip("\n").split("\n")
  assert _cells(lines[0]) == ["Model", "AUC", "AUPRC", "Threshold"]
  assert _cells(lines[2]) == ["ctpa_only", "0.85 [0.77-0.94]", "0.70", "0.46"]
  assert lines[3].startswith("| cxr\\|prior ")
  assert lines[3].count("n/a") == 3


def test_plot_roc_writes_png(tmp_path):
  curves = {"a": _separated_sample(80, 0), "b": _tied_sample(80, 1)}
  out = tmp_path / "sub" / "roc.png"
  assert plot_roc(curves, out, title="test") == out
  data = out.read_bytes()
  assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_rows_plain_and_padded():
  header, rows = ["label", "n", "AUROC"], [["Edema", "12", "0.91"], ["**macro**", "", "0.80"]]
  assert markdown_rows(header, rows) == (
      "| label | n | AUROC |\n"
      "|---|---|---|\n"
      "| Edema | 12 | 0.91 |\n"
      "| **macro** | | 0.80 |")
  assert markdown_rows(header, rows, pad=True) == (
      "| label     | n  | AUROC |\n"
      "|-----------|----|-------|\n"
      "| Edema     | 12 | 0.91  |\n"
      "| **macro** |    | 0.80  |")
  assert markdown_rows(header, []) == "| label | n | AUROC |\n|---|---|---|"
