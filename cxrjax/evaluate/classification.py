"""Binary classification metrics for chest-X-ray studies (pure numpy).

Every function takes 1-D ``y_true`` (labels in {0, 1}; bool/int/float accepted)
and 1-D ``scores`` (higher means "more positive") of the same length ``n``.
A case is predicted positive when ``score >= threshold``.

AUC and AUPRC are computed from per-distinct-score class counts. This one
formulation serves both single estimates and the bootstrap, where the counts
are taken for a whole ``(n_resamples, n)`` index matrix at once, so the two can
never disagree.

Every bootstrap here (and the classifier's multi-label macro CI) goes through
:func:`bootstrap_statistic`, which takes any statistic of a row-index matrix,
so one drawing and quantile rule serves them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

__all__ = [
    "roc_auc",
    "average_precision",
    "roc_curve_points",
    "bootstrap_statistic",
    "bootstrap_ci",
    "paired_auc_difference",
    "youden_threshold",
    "confusion_at",
    "binary_report",
]

Metric = Literal["auc", "auprc"]


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def _validate(y_true, scores, *, need_both_classes: bool = True):
  """Return ``(y, s)`` as 1-D ``bool`` / ``float64`` arrays, or raise ValueError."""
  y = np.asarray(y_true)
  s = np.asarray(scores, dtype=np.float64)
  if y.ndim != 1 or s.ndim != 1:
    raise ValueError(
        f"y_true and scores must be 1-D; got shapes {y.shape} and {s.shape}"
    )
  if y.shape[0] != s.shape[0]:
    raise ValueError(
        f"y_true and scores differ in length: {y.shape[0]} != {s.shape[0]}"
    )
  if y.shape[0] == 0:
    raise ValueError("y_true and scores are empty")
  if np.isnan(s).any():
    raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN value(s)")
  if np.isinf(s).any():
    raise ValueError("scores contain infinite values")
  if y.dtype.kind not in "biuf":
    raise ValueError(f"y_true must be numeric or bool, got dtype {y.dtype}")
  yf = y.astype(np.float64)
  if np.isnan(yf).any():
    raise ValueError("y_true contains NaN")
  bad = ~np.isin(yf, (0.0, 1.0))
  if bad.any():
    raise ValueError(
        f"y_true must contain only 0/1 labels; found {np.unique(yf[bad])[:5]}"
    )
  yb = yf.astype(bool)
  if need_both_classes:
    n_pos = int(yb.sum())
    if n_pos == 0 or n_pos == yb.size:
      only = "positive" if n_pos else "negative"
      raise ValueError(
          f"only one class present in y_true (all {yb.size} {only}); "
          "the metric is undefined"
      )
  return yb, s


# --------------------------------------------------------------------------- #
# count-based core shared by point estimates and the bootstrap
# --------------------------------------------------------------------------- #
def _class_counts(y: np.ndarray, s: np.ndarray, idx: np.ndarray):
  """Count positives and negatives at each distinct score, per row of ``idx``.

  ``idx`` is ``(R, m)`` integer indices into ``y``/``s``. Returns ``(pos, neg)``,
  each ``(R, K)`` with ``K`` distinct scores in *ascending* order.
  """
  uniq, inv = np.unique(s, return_inverse=True)
  k = uniq.size
  r = idx.shape[0]
  # One flat bincount over (row, value-bin, class) beats a Python loop over rows.
  flat = (np.arange(r)[:, None] * k + inv[idx]) * 2 + y[idx]
  counts = np.bincount(flat.ravel(), minlength=r * k * 2).reshape(r, k, 2)
  return counts[..., 1].astype(np.float64), counts[..., 0].astype(np.float64)


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
  """Mann–Whitney AUC per row: P(score_pos > score_neg) + 0.5 P(tie).

  Identical to the midrank statistic ``(R_pos - P(P+1)/2) / (P N)``, where a
  tied group's midrank contributes half of each positive–negative tie.
  """
  neg_below = np.cumsum(neg, axis=1) - neg
  wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
  return wins / (pos.sum(axis=1) * neg.sum(axis=1))


def _ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
  """Step-wise average precision per row, thresholds at distinct scores.

  AP = sum_k (recall_k - recall_{k-1}) * precision_k, walking distinct scores
  from highest to lowest; ties enter together as one threshold.
  """
  pos_d, neg_d = pos[:, ::-1], neg[:, ::-1]
  tp = np.cumsum(pos_d, axis=1)
  pred = tp + np.cumsum(neg_d, axis=1)
  # pred == 0 only where no case has been admitted yet, hence pos_d == 0 too.
  precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
  return (pos_d * precision).sum(axis=1) / pos_d.sum(axis=1)


_METRICS = {"auc": _auc_from_counts, "auprc": _ap_from_counts}


# --------------------------------------------------------------------------- #
# point metrics
# --------------------------------------------------------------------------- #
def roc_auc(y_true, scores) -> float:
  """Area under the ROC curve (rank/Mann–Whitney form, midranks for ties).

  Equals ``sklearn.metrics.roc_auc_score``. Raises ValueError when lengths
  differ, a score is NaN, or only one class is present.
  """
  y, s = _validate(y_true, scores)
  pos, neg = _class_counts(y, s, np.arange(y.size)[None])
  return float(_auc_from_counts(pos, neg)[0])


def average_precision(y_true, scores) -> float:
  """Area under the precision–recall curve, step-wise (no interpolation).

  Thresholds are the distinct score values, so tied scores enter together;
  equals ``sklearn.metrics.average_precision_score``. Needs both classes.
  """
  y, s = _validate(y_true, scores)
  pos, neg = _class_counts(y, s, np.arange(y.size)[None])
  return float(_ap_from_counts(pos, neg)[0])


def roc_curve_points(y_true, scores):
  """ROC curve at every distinct score (no intermediate points dropped).

  Returns ``(fpr, tpr, thresholds)``, each of length ``K + 1`` for ``K``
  distinct scores. ``thresholds`` is decreasing and starts with ``inf``
  (nothing predicted positive, the (0, 0) point), as in sklearn's
  ``roc_curve(..., drop_intermediate=False)``.
  """
  y, s = _validate(y_true, scores)
  pos, neg = _class_counts(y, s, np.arange(y.size)[None])
  pos_d, neg_d = pos[0, ::-1], neg[0, ::-1]
  tpr = np.concatenate([[0.0], np.cumsum(pos_d) / pos_d.sum()])
  fpr = np.concatenate([[0.0], np.cumsum(neg_d) / neg_d.sum()])
  thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
  return fpr, tpr, thresholds


# --------------------------------------------------------------------------- #
# bootstrap
# --------------------------------------------------------------------------- #
def _check_ci_args(alpha: float, n_resamples: int) -> None:
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  if int(n_resamples) < 1:
    raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")


def _draw_rows(rng, n: int, need: int, valid=None, batch=None) -> np.ndarray:
  """``(need, n)`` row indices drawn with replacement from ``rng``.

  Without ``valid`` this is one ``rng.integers(0, n, size=(need, n))`` call.
  With ``valid(idx (R, n)) -> (R,) bool``, failing draws are discarded and
  drawing continues in batches of ``batch(missing)`` rows (default
  ``2 * missing + 1``) until exactly ``need`` are kept. The batch rule decides
  which draws a seed yields, so a caller that changed it would change its numbers.
  """
  if valid is None:
    return rng.integers(0, n, size=(need, n))
  batch = batch or (lambda missing: 2 * missing + 1)
  kept, have = [], 0
  while have < need:
    idx = rng.integers(0, n, size=(batch(need - have), n))
    idx = idx[valid(idx)][: need - have]
    kept.append(idx)
    have += idx.shape[0]
  return np.concatenate(kept)


def _count_chunk(s: np.ndarray) -> int:
  """Resamples per ``_class_counts`` call, keeping its arrays at a few tens of MB."""
  return max(1, 4_000_000 // (2 * np.unique(s).size + s.size))


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    valid: Callable[[np.ndarray], np.ndarray] | None = None,
    batch: Callable[[int], int] | None = None,
    chunk: int | None = None,
) -> tuple[float, float, np.ndarray]:
  """Percentile bootstrap of any statistic of ``n`` rows (patients, studies).

  ``statistic`` maps ``(R, n)`` integer row indices, one resample per row, to
  ``(R,)`` float values; ``statistic(np.arange(n)[None])[0]`` is the point
  estimate. Rows are drawn with replacement by ``np.random.default_rng(seed)``.
  A resample on which the statistic is undefined is handled in one of two ways:

  * **redraw**: ``valid(idx (R, n)) -> (R,) bool`` rejects it and drawing goes
    on in batches of ``batch(missing)`` rows (default ``2 * missing + 1``)
    until ``n_resamples`` valid ones exist;
  * **skip**: ``statistic`` returns NaN for it, and it is left out of the
    quantiles.

  ``chunk`` bounds how many resamples one ``statistic`` call gets (memory);
  by default all at once. Returns ``(lo, hi, values)``: the ``alpha/2`` and
  ``1 - alpha/2`` quantiles (``np.quantile``, linear interpolation) of the
  finite values, and all ``(n_resamples,)`` values, NaN included.
  """
  _check_ci_args(alpha, n_resamples)
  need = int(n_resamples)
  idx = _draw_rows(np.random.default_rng(seed), int(n), need, valid, batch)
  step = need if chunk is None else int(chunk)
  values = np.concatenate([
      np.asarray(statistic(idx[i : i + step]), dtype=np.float64)
      for i in range(0, need, step)
  ])
  finite = values[np.isfinite(values)]
  if finite.size == 0:
    raise ValueError(f"the statistic is undefined on all {need} resamples")
  lo, hi = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
  return float(lo), float(hi), values


def _both_classes_redraw(y: np.ndarray) -> dict:
  """bootstrap_statistic's `valid` and `batch` for statistics that need both classes of y."""
  n, n_pos = y.size, int(y.sum())
  # Chance a resample holds one class; <= 0.5 once both classes exist, so the
  # redraw loop always terminates quickly.
  p_single = (n_pos / n) ** n + (1 - n_pos / n) ** n

  def both_classes(idx):
    k = y[idx].sum(axis=1)
    return (k > 0) & (k < n)

  # Oversample a little so one batch usually suffices.
  return {"valid": both_classes,
          "batch": lambda missing: int(np.ceil(missing / (1.0 - p_single) * 1.05)) + 1}


def bootstrap_ci(
    y_true,
    scores,
    metric: Metric = "auc",
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    return_samples: bool = False,
):
  """Percentile bootstrap CI for ``metric`` ("auc" or "auprc") over rows.

  Rows (patients) are resampled with replacement by
  ``np.random.default_rng(seed)``. A resample containing one class only is
  **redrawn**: draws continue in batches until exactly ``n_resamples`` valid
  resamples exist, so the result is deterministic for a given seed.
  Returns ``(lo, hi)`` as the ``alpha/2`` and ``1 - alpha/2`` quantiles
  (``np.quantile``, linear interpolation); with ``return_samples=True`` the
  ``(n_resamples,)`` metric values are returned as a third element.
  """
  if metric not in _METRICS:
    raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
  _check_ci_args(alpha, n_resamples)
  y, s = _validate(y_true, scores)
  lo, hi, values = bootstrap_statistic(
      lambda idx: _METRICS[metric](*_class_counts(y, s, idx)), y.size,
      n_resamples=n_resamples, alpha=alpha, seed=seed, **_both_classes_redraw(y),
      chunk=_count_chunk(s))
  if return_samples:
    return lo, hi, values
  return lo, hi


def paired_auc_difference(
    y_true,
    scores,
    group_a,
    group_b,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
  """AUC(positives in A vs every negative) - AUC(positives in B vs every negative).

  ``group_a`` / ``group_b`` are boolean masks over the rows (positives outside
  both, e.g. a middle severity, take no part). The CI is a paired percentile
  bootstrap: each resample draws the rows once and scores both groups on it,
  so the shared negatives' noise cancels in the difference; resamples missing
  a negative or a positive of either group are redrawn. Returns
  ``(difference, lo, hi)``. Raises ValueError when a group has no positive.
  """
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  y, s = _validate(y_true, scores)
  a = np.asarray(group_a, bool) & (y == 1)
  b = np.asarray(group_b, bool) & (y == 1)
  if not (a.any() and b.any()):
    raise ValueError("each group needs at least one positive")
  neg = (y == 0).astype(np.int64)

  def difference(idx):
    # Three binary count tables on one index matrix: A's positives, B's, all negatives.
    pos_a, _ = _class_counts(a.astype(np.int64), s, idx)
    pos_b, _ = _class_counts(b.astype(np.int64), s, idx)
    negs, _ = _class_counts(neg, s, idx)
    return _auc_from_counts(pos_a, negs) - _auc_from_counts(pos_b, negs)

  valid = lambda idx: a[idx].any(axis=1) & b[idx].any(axis=1) & (neg[idx] == 1).any(axis=1)
  lo, hi, _ = bootstrap_statistic(difference, y.size, n_resamples=n_resamples, alpha=alpha,
                                  seed=seed, valid=valid, chunk=_count_chunk(s))
  return float(difference(np.arange(y.size)[None])[0]), lo, hi


def model_auc_difference(
    y_true,
    scores_a,
    scores_b,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
  """AUC(scores_a) - AUC(scores_b): two models scored on the same rows.

  The CI is a paired percentile bootstrap: each resample draws the rows once and
  scores both models on it, so what the two share (the same hard cases) cancels
  in the difference. Resamples with one class only are redrawn by ``bootstrap_ci``'s
  rule, so the draws are those ``bootstrap_ci`` makes with the same seed. Returns
  ``(difference, lo, hi)``.
  """
  y, a = _validate(y_true, scores_a)
  _, b = _validate(y_true, scores_b)

  def difference(idx):
    return _auc_from_counts(*_class_counts(y, a, idx)) - _auc_from_counts(*_class_counts(y, b, idx))

  lo, hi, _ = bootstrap_statistic(difference, y.size, n_resamples=n_resamples, alpha=alpha,
                                  seed=seed, **_both_classes_redraw(y),
                                  chunk=min(_count_chunk(a), _count_chunk(b)))
  return float(difference(np.arange(y.size)[None])[0]), lo, hi


# --------------------------------------------------------------------------- #
# operating points
# --------------------------------------------------------------------------- #
def youden_threshold(y_true, scores) -> float:
  """Threshold maximising Youden's J = sensitivity + specificity - 1.

  Candidates are the distinct score values (positive when ``score >= t``).
  Tie rule: among thresholds with equal maximal J the **smallest** is
  returned, i.e. the most sensitive one — the safer choice for screening.
  """
  fpr, tpr, thr = roc_curve_points(y_true, scores)
  j = (tpr - fpr)[1:]  # drop the inf threshold: it never classifies anyone
  thr = thr[1:]
  # thr is decreasing, so the last index attaining the max is the smallest t.
  # The tolerance keeps float noise in tpr - fpr from splitting genuine ties.
  best = np.flatnonzero(j >= j.max() - 1e-12)[-1]
  return float(thr[best])


def _ratio(num: int, den: int) -> float:
  return float(num) / den if den else float("nan")


def confusion_at(y_true, scores, threshold: float) -> dict:
  """Confusion counts and derived rates at ``threshold`` (positive: ``score >= t``).

  Returns ``tp, fp, tn, fn`` (int) and ``accuracy, sensitivity, specificity,
  ppv, npv`` (float; NaN where the denominator is zero). One class only is
  allowed here, since counts stay meaningful.
  """
  y, s = _validate(y_true, scores, need_both_classes=False)
  if np.isnan(threshold):
    raise ValueError("threshold is NaN")
  pred = s >= threshold
  tp = int(np.sum(pred & y))
  fp = int(np.sum(pred & ~y))
  tn = int(np.sum(~pred & ~y))
  fn = int(np.sum(~pred & y))
  return {
      "accuracy": _ratio(tp + tn, y.size),
      "sensitivity": _ratio(tp, tp + fn),
      "specificity": _ratio(tn, tn + fp),
      "ppv": _ratio(tp, tp + fp),
      "npv": _ratio(tn, tn + fn),
      "tp": tp,
      "fp": fp,
      "tn": tn,
      "fn": fn,
  }


def binary_report(
    y_true,
    scores,
    *,
    threshold: float | str,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
  """Summary dict: AUC with bootstrap CI, AUPRC and operating-point rates.

  ``threshold`` is a float, or ``"youden"`` to pick it on these same data
  (optimistic; prefer a threshold chosen on validation data). Returns
  ``{"auc", "auc_ci": [lo, hi], "auprc", "accuracy", "sensitivity",
  "specificity", "threshold"}`` with plain Python floats (JSON-serialisable).
  """
  y, s = _validate(y_true, scores)
  if isinstance(threshold, str):
    if threshold != "youden":
      raise ValueError(f"threshold must be a number or 'youden', got {threshold!r}")
    threshold = youden_threshold(y, s)
  lo, hi = bootstrap_ci(y, s, "auc", n_resamples=n_resamples, alpha=alpha, seed=seed)
  conf = confusion_at(y, s, threshold)
  return {
      "auc": roc_auc(y, s),
      "auc_ci": [lo, hi],
      "auprc": average_precision(y, s),
      "accuracy": conf["accuracy"],
      "sensitivity": conf["sensitivity"],
      "specificity": conf["specificity"],
      "threshold": float(threshold),
  }
