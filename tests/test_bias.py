"""Tests for cxrjax.evaluate.bias (spec §B.6) and cxrjax.evaluate.subgroups (§B.5)."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from cxrjax.evaluate import bias, bias_plots
from cxrjax.evaluate.bias import Comparison, DEFAULT_COMPARISONS
from cxrjax.evaluate.classification import roc_auc
from cxrjax.evaluate import subgroups as sg

RACES = ("White", "Asian", "Black")


def _world(n=1200, d=16, seed=0):
  """Features with decaying variance and demographics that carry no signal."""
  rng = np.random.default_rng(seed)
  labels = {
    "race": rng.choice(RACES, n, p=[0.5, 0.25, 0.25]),
    "sex": rng.choice(["Male", "Female"], n),
    "disease": rng.choice(["No Finding", "Pleural Effusion", "Other"], n),
    "age_bin": rng.integers(0, 8, n),
  }
  x = rng.normal(size=(n, d)) * np.linspace(3.0, 0.3, d)
  return x, labels


def _score(x, labels, **kw):
  kw = {"n_per_group": 250, "n_simulations": 10, **kw}
  return bias.analyse_bias(x, labels, **kw)


# --------------------------------------------------------------------------- #
# Benjamini-Yekutieli, buckets, score formula
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("use_scipy", [True, False])
def test_by_matches_hand_computed_example(use_scipy):
  # m = 4, c = 1 + 1/2 + 1/3 + 1/4 = 25/12. Sorted p: .001, .03, .04, .5 ->
  # raw p*m/i*c: 1/120, 1/8, 1/9, 125/120 -> running min from the top: 1/120, 1/9, 1/9, 1.
  p = np.array([[0.04, 0.001], [0.03, 0.5]])
  adj = bias.benjamini_yekutieli(p, use_scipy=use_scipy)
  np.testing.assert_allclose(adj, [[1 / 9, 1 / 120], [1 / 9, 1.0]], rtol=1e-12)
  assert adj.shape == p.shape


def test_by_numpy_equals_scipy_on_random_family():
  p = np.random.default_rng(3).random((4, 5)) ** 3
  np.testing.assert_allclose(bias.benjamini_yekutieli(p, use_scipy=False),
                             bias.benjamini_yekutieli(p, use_scipy=True), rtol=1e-12)


def test_buckets_exact_edges():
  p = np.array([1.0, 0.05, 0.0499999, 0.001, 0.000999, 0.0])
  np.testing.assert_array_equal(bias.categorise(p), [0, 0, 1, 1, 2, 2])


def _counts(per_mode_fracs, n=5000):
  """(M, P, 3) counts from per-mode (FALSE, TRUE, TRUE+) fractions for all P pairs."""
  f = np.asarray(per_mode_fracs, dtype=float)
  return np.repeat((f * n).round()[:, None, :], len(DEFAULT_COMPARISONS), axis=1)


def test_score_verification_vectors():
  ev = np.array([0.3, 0.2, 0.1, 0.05])
  s = bias.bias_score(_counts([[0, 0, 1]] * 4), ev, DEFAULT_COMPARISONS)
  assert s["combined"] == pytest.approx(150.0)
  assert all(v == pytest.approx(150.0) for v in s["pair"].values())
  s = bias.bias_score(_counts([[0.5, 0.5, 0]] * 4), ev, DEFAULT_COMPARISONS)
  assert s["combined"] == pytest.approx(50.0)
  assert "Pleural Effusion vs No Finding" not in s["pair"]  # control excluded


def test_score_weights_and_attribute_average():
  ev = np.array([0.4, 0.3, 0.2, 0.1])  # already sums to 1
  counts = np.zeros((4, 5, 3))
  counts[..., 0] = 10
  counts[0, 1] = [0, 0, 10]   # White vs Asian: TRUE+ on mode 1 only -> 150 * 0.4 = 60
  counts[:, 4] = [0, 10, 0]   # Male vs Female: TRUE everywhere -> 100
  counts[:, 0] = [0, 0, 10]   # control: must not count
  s = bias.bias_score(counts, ev, DEFAULT_COMPARISONS)
  assert s["pair"]["White vs Asian"] == pytest.approx(60.0)
  assert s["attribute"]["race"] == pytest.approx(20.0)    # mean over 3 race pairs
  assert s["attribute"]["sex"] == pytest.approx(100.0)
  assert s["combined"] == pytest.approx(60.0)             # equal attribute weights
  assert s["columns_average"] == pytest.approx(40.0)      # race weighs 3/4
  # Normalised EV weights: scaling EV changes nothing.
  assert bias.bias_score(counts, 3 * ev, DEFAULT_COMPARISONS)["combined"] == pytest.approx(60.0)


# --------------------------------------------------------------------------- #
# KS tests and the full pipeline
# --------------------------------------------------------------------------- #
def test_ks_identical_large_p_shifted_small_p():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(800, 4))
  g = np.repeat(["a", "b"], 400)
  comp = [Comparison("g", "a", "b")]
  assert bias.ks_pvalues(z, {"g": g}, comp).min() > 0.01
  z[g == "b", 0] += 0.6
  p = bias.ks_pvalues(z, {"g": g}, comp)
  assert p[0, 0] < 1e-6 and p[1:, 0].min() > 0.01


def test_null_world_scores_zero_and_shift_scores_positive():
  x, labels = _world()
  r0 = _score(x, labels)
  assert r0.combined == 0.0
  assert r0.counts.sum(axis=2).max() == 10 and r0.n_simulations == 10
  x1 = x.copy()
  x1[labels["race"] == "Black", 0] += 2.0  # along the top-variance axis
  r1 = _score(x1, labels)
  assert r1.scores["pair"]["White vs Black"] > 30  # mode 1 alone: 150 * w_1
  assert r1.scores["pair"]["White vs Asian"] < r1.scores["pair"]["White vs Black"]
  assert r1.scores["attribute"]["sex"] == 0.0
  assert r1.combined > 0


def test_score_monotone_in_injected_shift():
  x, labels = _world(seed=2)
  black = labels["race"] == "Black"
  scores = []
  for delta in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0):
    xs = x.copy()
    xs[black, 0] += delta
    scores.append(_score(xs, labels).combined)
  # Monotone up to sampling noise: once mode-1 rejections saturate, chance
  # rejections on modes 2-4 and the EV weights still wobble by a point or so.
  assert all(b >= a - 1.0 for a, b in zip(scores, scores[1:])), scores
  assert scores[0] < 5 and scores[-1] > scores[0] + 15, scores


def test_score_invariant_to_global_scale_shift_and_rotation():
  # PCA + KS see only ranks along modes, so a global scale, a translation or an
  # orthogonal rotation leaves every p-value (hence the score) unchanged. A
  # per-feature rescaling is NOT an invariance: it changes the PCA modes.
  x, labels = _world(d=8, seed=4)
  x[labels["race"] == "Asian", 1] += 1.0
  ref = _score(x, labels)
  q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(8, 8)))
  for xt in (1000.0 * x + 7.0, x @ q):
    r = _score(xt, labels)
    np.testing.assert_allclose(r.p_raw, ref.p_raw, rtol=1e-6, atol=1e-12)
    assert r.combined == pytest.approx(ref.combined)


def test_known_answer_shortcut_model_ranked_above_clean_model():
  """Model A encodes a subgroup-correlated marker strongly; model B does not."""
  x, labels = _world(n=1500, d=32, seed=6)
  rng = np.random.default_rng(7)
  # A hospital/device marker present far more often in one group (a shortcut).
  p_marker = np.where(labels["race"] == "Black", 0.8, 0.15)
  marker = (rng.random(x.shape[0]) < p_marker).astype(float)
  direction = rng.normal(size=32)
  direction /= np.linalg.norm(direction)
  # Strong enough to rank among the top-4 PCA modes (what the score looks at);
  # a marker weaker than mode 4's variance is invisible to the §B.6 score by design.
  model_a = x + 8.0 * marker[:, None] * direction
  model_b = x.copy()
  ra, rb = _score(model_a, labels), _score(model_b, labels)
  assert ra.combined > rb.combined + 10, (ra.combined, rb.combined)
  assert ra.scores["attribute"]["race"] > rb.scores["attribute"]["race"]
  assert ra.scores["attribute"]["race"] > ra.scores["attribute"]["sex"]


def test_dedup_and_sampler():
  x, labels = _world(n=900, seed=8)
  dup = np.r_[np.arange(900), np.arange(0, 900, 3)]
  r_dup = _score(x[dup], {k: v[dup] for k, v in labels.items()}, n_per_group=150, n_simulations=3)
  r = _score(x, labels, n_per_group=150, n_simulations=3)
  assert r_dup.n_unique == 900
  np.testing.assert_array_equal(r_dup.counts, r.counts)
  np.testing.assert_array_equal(bias.deduplicate(x[dup]), np.arange(900))
  # Sampler: n per group, no repeats, strata pulled towards the average mix.
  rng = np.random.default_rng(9)
  g = np.repeat(["W", "B"], 2000)
  male = np.r_[rng.random(2000) < 0.8, rng.random(2000) < 0.2].astype(int)
  idx = bias.stratified_sample(g, male, n_per_group=300, seed=1)
  assert idx.size == 600 and np.unique(idx).size == 600
  for v in ("W", "B"):
    assert np.sum(g[idx] == v) == 300
    assert abs(male[idx][g[idx] == v].mean() - 0.5) < 0.08
  np.testing.assert_array_equal(idx, bias.stratified_sample(g, male, 300, seed=1))
  with pytest.raises(ValueError, match="n_per_group"):
    bias.stratified_sample(g, male, n_per_group=2001)


def test_all_unique_rows_mode_and_markdown():
  x, labels = _world(n=600, seed=10)
  r = bias.analyse_bias(x, labels, balance_key=None)
  assert r.n_simulations == 0 and r.counts.sum(axis=2).max() == 1
  md = r.to_markdown()
  for c in DEFAULT_COMPARISONS:
    assert c.name in md
  assert "combined (attributes average)" in md and "(control)" in md


def test_plots_write_files(tmp_path):
  x, labels = _world(n=240, seed=11)
  pca = bias.fit_pca(x)
  assert pca.explained_variance_ratio.sum() >= 0.99
  fig = bias_plots.plot_modes(pca.projections, labels["race"], order=RACES, path=tmp_path / "pca.png")
  assert (tmp_path / "pca.png").stat().st_size > 1000 and len(fig.axes) == 6
  fig, emb, rows = bias_plots.plot_tsne(pca.projections, labels["sex"], n_subsample=120,
                                  path=tmp_path / "t" / "tsne.png", max_iter=250)
  assert (tmp_path / "t" / "tsne.png").stat().st_size > 1000
  assert emb.shape == (120, 2) and rows.size == 120


# --------------------------------------------------------------------------- #
# subgroups (§B.5)
# --------------------------------------------------------------------------- #
def _scores(n=400, seed=0, decimals=None):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  s = rng.normal(size=n) + 1.0 * y
  return y, (np.round(s, decimals) if decimals is not None else s)


@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_points_and_youden_match_sklearn(decimals):
  y, s = _scores(decimals=decimals)
  fpr, tpr, thr = skm.roc_curve(y, s)  # drop_intermediate=True by default
  ours = sg.roc_points_sklearn(y, s)
  for a, b in zip(ours, (fpr, tpr, thr)):
    np.testing.assert_allclose(a, b)
  assert sg.max_youden_j(y, s) == pytest.approx(np.max(tpr - fpr))
  i = np.argmin(np.abs(fpr - 0.2))
  assert sg.youden_j_at_fpr(y, s) == pytest.approx(tpr[i] - fpr[i])
  assert sg.threshold_at_fpr(y, s) == thr[i]


def test_per_class_and_seed_summary():
  y = np.stack([_scores(seed=k)[0] for k in range(3)], axis=1)
  p = np.stack([_scores(seed=k)[1] for k in range(3)], axis=1)
  rows = sg.per_class_metrics(y, p, ["a", "b", "c"])
  assert [r["label"] for r in rows] == ["a", "b", "c", "Macro"]
  assert rows[0]["auprc"] == pytest.approx(skm.average_precision_score(y[:, 0], p[:, 0]))
  assert rows[-1]["auc"] == pytest.approx(np.mean([skm.roc_auc_score(y[:, k], p[:, k]) for k in range(3)]))
  per_seed = [{"auc": 0.8, "j": 0.4}, {"auc": 0.82, "j": 0.5}, {"auc": 0.79, "j": 0.45}]
  out = sg.mean_sd_over_seeds(per_seed)
  df = pd.DataFrame(per_seed)
  assert out["auc"]["sd"] == pytest.approx(df["auc"].std())
  assert out["j"]["pct_sd"] == pytest.approx(100 * df["j"].std() / df["j"].mean())
  vals = {name: float(i) for i, name in enumerate(sg.LABELS_BY_RELEVANCE)}
  fs = sg.focused_summary(vals)
  assert fs["Average Classes 1 to 7"] == pytest.approx(3.0) and fs["Others"] == pytest.approx(10.0)


def test_subgroup_performance_bootstrap():
  y, s = _scores(n=600, seed=12)
  rng = np.random.default_rng(13)
  race = rng.choice(RACES, y.size)
  sex = rng.choice(["Male", "Female"], y.size)
  kw = dict(subgroups={"race": RACES, "sex": ("Male", "Female")}, n_bootstrap=60)
  res = sg.subgroup_performance(y, s, {"race": race, "sex": sex}, **kw)
  assert res.groups == ("All", *RACES, "Male", "Female", "Average")
  assert res.estimate["auc"]["All"] == pytest.approx(roc_auc(y, s))
  assert res.estimate["auc"]["Asian"] == pytest.approx(roc_auc(y[race == "Asian"], s[race == "Asian"]))
  # Global threshold from the whole set, subgroup TPR at it.
  thr = sg.threshold_at_fpr(y, s)
  m = race == "White"
  assert res.estimate["tpr"]["White"] == pytest.approx(np.mean(s[m & (y == 1)] >= thr))
  sub = [res.estimate["youden_j"][g] for g in res.groups[1:-1]]
  assert res.estimate["youden_j"]["Average"] == pytest.approx(np.mean(sub))
  assert res.samples["auc"].shape == (61, 7)
  lo, hi = res.ci["auc"]["All"]
  assert lo < res.estimate["auc"]["All"] < hi
  again = sg.subgroup_performance(y, s, {"race": race, "sex": sex}, **kw)
  np.testing.assert_array_equal(again.samples["auc"], res.samples["auc"])
  assert "Average" in res.to_markdown()
